"""Class-balanced random selection: even per-class totals of everything bought so far."""

from __future__ import annotations

import numpy as np

from lightning_kd.selection.base import SelectionContext, SelectionStrategy
from lightning_kd.selection.registry import register_strategy


@register_strategy
class ClassBalancedSelection(SelectionStrategy):
    """``n`` pool samples making the per-class totals of chosen ∪ new as even as possible, random within a class.

    Water-filling: each pick goes to the class with the smallest total that still has candidates (ties: lower
    class id). Class c's k-th pick comes when its total is ``bought_c + k``, so the greedy order is the sort of
    all candidates by ``(bought_c + k, c)``. In round 0 (nothing bought) this is a round-robin over classes,
    identical to the original one-shot selection. The draws come from ``default_rng([seed, round])``, which
    in round 0 is ``default_rng(seed)`` (see :meth:`SelectionContext.rng`).
    """

    name = "class_balanced"
    needs_student = False

    def select(self, ctx: SelectionContext) -> np.ndarray:
        rng, pool, targets = ctx.rng(), ctx.pool, ctx.targets
        classes = np.unique(targets)
        per_class = [pool[targets == c][rng.permutation(int((targets == c).sum()))] for c in classes]
        bought = [int((ctx.chosen_targets == c).sum()) for c in classes]
        level = np.concatenate([b + np.arange(len(p)) for b, p in zip(bought, per_class)])
        cls = np.concatenate([np.full(len(p), i) for i, p in enumerate(per_class)])
        order = np.lexsort((cls, level))
        return np.sort(np.concatenate(per_class)[order][: ctx.n])
