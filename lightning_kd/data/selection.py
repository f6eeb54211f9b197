"""One-shot selection: which training samples the teacher is run on, before any training."""

from __future__ import annotations

import numpy as np

from lightning_kd.selection import SelectionContext, SelectionStrategy, create_strategy


def select_samples(
    pool: np.ndarray, targets: np.ndarray, n: int, selection: str | SelectionStrategy = "random", seed: int = 0
) -> np.ndarray:
    """``n`` indices from ``pool`` by a strategy that needs no student ("random", "class_balanced" or an object).

    Both built-in ones take prefixes of seeded permutations, so the selection for a larger ``n`` contains the one
    for a smaller ``n`` (a bigger budget reuses every output already paid for).
    """
    pool = np.asarray(pool)
    if n > len(pool):
        raise ValueError(f"budget {n} exceeds the {len(pool)} training samples available")
    strategy = create_strategy(selection)
    if strategy.needs_student:
        raise ValueError(f"selection {strategy.name!r} needs the student's outputs: it can only choose later rounds")
    return strategy.select(SelectionContext(pool=pool, targets=np.asarray(targets), n=n, seed=seed))
