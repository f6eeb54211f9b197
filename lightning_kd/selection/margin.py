"""Margin sampling: buy the samples closest to the student's decision boundary (Scheffer et al. 2001)."""

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


def softmax_margin(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """(P,) float64 top-1 minus top-2 softmax probability, computed ``chunk_size`` rows at a time."""
    if logits.shape[1] < 2:
        raise ValueError(f"the margin needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
    out = torch.empty(logits.shape[0], dtype=torch.float64)
    for rows in row_chunks(logits.shape[0], chunk_size):
        top2 = torch.softmax(as_float64(logits[rows]), dim=1).topk(2, dim=1).values
        out[rows] = top2[:, 0] - top2[:, 1]
    return out


def smallest_margin_positions(logits: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """Pool positions of the ``k`` smallest margins, smallest first (ties: lower position first)."""
    margin = softmax_margin(logits, chunk_size)
    return torch.sort(margin, stable=True).indices[:k].numpy()


@register_strategy
class MarginSelection(SelectionStrategy):
    """The ``n`` pool samples with the smallest top-1 minus top-2 softmax probability."""

    name = "margin"
    needs_student = True

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = check_chunk_size(chunk_size)

    def select(self, ctx: SelectionContext) -> np.ndarray:
        positions = smallest_margin_positions(self.require_scores(ctx).logits, ctx.n, self.chunk_size)
        return np.sort(ctx.pool[positions])
