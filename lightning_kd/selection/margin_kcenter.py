"""Margin prefilter, then k-center: ActiveThief (Pal et al., AAAI 2020) with margin in place of DeepFool.

ActiveThief keeps the samples closest to the decision boundary and spreads the purchase among them with the
core-set greedy, so that the uncertain samples bought are not near-duplicates of each other. The margin is a
cheap stand-in for DeepFool's distance to the boundary (no per-sample attack).
"""

from __future__ import annotations

import numpy as np

from lightning_kd.selection.base import (
    DEFAULT_CHUNK_SIZE,
    SelectionContext,
    SelectionStrategy,
    as_float64,
    check_chunk_size,
)
from lightning_kd.selection.kcenter import greedy_k_center
from lightning_kd.selection.margin import smallest_margin_positions
from lightning_kd.selection.registry import register_strategy


@register_strategy
class MarginKCenterSelection(SelectionStrategy):
    """Greedy k-center (embedding space, seeded with the bought samples) among the ``prefilter · n`` pool
    samples with the smallest margin (capped at the pool size; taken in pool order)."""

    name = "margin_kcenter"
    needs_student = True

    def __init__(self, prefilter: int = 10, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if isinstance(prefilter, bool) or not isinstance(prefilter, int) or prefilter < 1:
            raise ValueError(f"prefilter must be an int >= 1, got {prefilter!r}")
        self.prefilter = prefilter
        self.chunk_size = check_chunk_size(chunk_size)

    def select(self, ctx: SelectionContext) -> np.ndarray:
        scores = self.require_scores(ctx)
        k = min(self.prefilter * ctx.n, len(ctx.pool))
        candidates = np.sort(smallest_margin_positions(scores.logits, k, self.chunk_size))
        x = as_float64(scores.embeddings[candidates])
        positions = greedy_k_center(x, as_float64(scores.chosen_embeddings), ctx.n, ctx.rng(), self.chunk_size)
        return np.sort(ctx.pool[candidates[positions]])
