"""Uniform random selection: the baseline every active strategy must beat."""

from __future__ import annotations

import numpy as np

from lightning_kd.selection.base import SelectionContext, SelectionStrategy
from lightning_kd.selection.registry import register_strategy


@register_strategy
class RandomSelection(SelectionStrategy):
    """``n`` pool samples uniformly at random.

    A prefix of a ``default_rng([seed, round])`` permutation, so a larger budget contains a smaller one; in
    round 0 this is the original one-shot draw of ``default_rng(seed)`` (see :meth:`SelectionContext.rng`).
    """

    name = "random"
    needs_student = False

    def select(self, ctx: SelectionContext) -> np.ndarray:
        return np.sort(ctx.pool[ctx.rng().permutation(len(ctx.pool))[: ctx.n]])
