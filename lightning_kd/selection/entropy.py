"""Uncertainty sampling by predictive entropy: buy the samples the student is least sure about."""

from __future__ import annotations

import numpy as np
import torch

from lightning_kd.selection.base import (
    DEFAULT_CHUNK_SIZE,
    SelectionContext,
    SelectionStrategy,
    as_float64,
    check_chunk_size,
    row_chunks,
)
from lightning_kd.selection.registry import register_strategy


def softmax_entropy(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """(P,) float64 entropy of ``softmax(logits)`` in nats, computed ``chunk_size`` rows at a time."""
    out = torch.empty(logits.shape[0], dtype=torch.float64)
    for rows in row_chunks(logits.shape[0], chunk_size):
        log_p = torch.log_softmax(as_float64(logits[rows]), dim=1)
        out[rows] = -(log_p.exp() * log_p).sum(dim=1)
    return out


@register_strategy
class EntropySelection(SelectionStrategy):
    """The ``n`` pool samples with the highest softmax entropy (ties: lower pool position first)."""

    name = "entropy"
    needs_student = True

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = check_chunk_size(chunk_size)

    def select(self, ctx: SelectionContext) -> np.ndarray:
        entropy = softmax_entropy(self.require_scores(ctx).logits, self.chunk_size)
        order = torch.sort(entropy, descending=True, stable=True).indices[: ctx.n]
        return np.sort(ctx.pool[order.numpy()])
