"""Which training samples the teacher is run on: seeded, nested selections."""

from __future__ import annotations

import numpy as np


def select_samples(
    pool: np.ndarray, targets: np.ndarray, n: int, selection: str = "random", seed: int = 0
) -> np.ndarray:
    """``n`` indices from ``pool``: uniformly ("random") or with equal counts per class ("class_balanced").

    Both take prefixes of seeded permutations, so the selection for a larger ``n`` contains the one for a
    smaller ``n`` (a bigger budget reuses every output already paid for).
    """
    pool = np.asarray(pool)
    if n > len(pool):
        raise ValueError(f"budget {n} exceeds the {len(pool)} training samples available")
    rng = np.random.default_rng(seed)
    if selection == "random":
        return np.sort(pool[rng.permutation(len(pool))[:n]])
    if selection == "class_balanced":
        classes = np.unique(targets)
        per_class = [pool[targets == c][rng.permutation(int((targets == c).sum()))] for c in classes]
        # Round-robin over classes: position r of the interleaving is the r-th pick of each class.
        rank = np.concatenate([np.arange(len(p)) for p in per_class])
        cls = np.concatenate([np.full(len(p), i) for i, p in enumerate(per_class)])
        order = np.lexsort((cls, rank))
        return np.sort(np.concatenate(per_class)[order][:n])
    raise ValueError(f"selection must be 'random' or 'class_balanced', got {selection!r}")
