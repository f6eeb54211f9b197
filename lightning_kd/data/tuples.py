"""CKD tuple sampler: which training samples are compared with which.

A tuple of ``group_size = k`` distinct positions is split into a positive side of p = k − ⌊k/2⌋ positions
(columns ``[:p]``) and a negative side of n = ⌊k/2⌋ positions (columns ``[p:]``). As in the official
``dataset/sampling/CKDSample.py``, a tuple is identified by its (positive set, negative set): order inside a
side does not matter (each side is stored ascending) but which side a sample is on does, so there are
C(N, p) · C(N − p, n) distinct tuples.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

# As in CKDSample.py: enumerate every tuple unless there are at least this many times more than requested.
_ENUMERATE_FACTOR = 5


def split_sides(group_size: int) -> tuple[int, int]:
    """(p, n) with n = ⌊k/2⌋ negatives and p = k − n positives, as in CKD's ``train_student.py``."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (one positive and one negative), got {group_size}")
    n = group_size // 2
    return group_size - n, n


def _enumerate_all(num_samples: int, p: int, n: int) -> np.ndarray:
    """Every (positive set, negative set) pair: each k-subset (ascending) times each choice of its p positives."""
    k = p + n
    count = math.comb(num_samples, k)
    flat = itertools.chain.from_iterable(itertools.combinations(range(num_samples), k))
    subsets = np.fromiter(flat, dtype=np.int64, count=count * k).reshape(count, k)
    blocks = []
    for pos_cols in itertools.combinations(range(k), p):
        neg_cols = [c for c in range(k) if c not in pos_cols]
        blocks.append(np.concatenate([subsets[:, list(pos_cols)], subsets[:, neg_cols]], axis=1))
    return np.concatenate(blocks, axis=0)


def _draw_distinct(rng: np.random.Generator, num_samples: int, k: int, m: int) -> np.ndarray:
    """m rows of k distinct positions, each row a uniform ordered draw without replacement.

    Member j is the r-th still-unused position, r ~ U{0, …, N − j − 1}: r is shifted past the already chosen
    positions in ascending order. O(m · k²) vectorized work, no rejection.
    """
    out = np.empty((m, k), dtype=np.int64)
    for j in range(k):
        x = rng.integers(0, num_samples - j, size=m, dtype=np.int64)
        for chosen in np.sort(out[:, :j], axis=1).T:
            x += x >= chosen
        out[:, j] = x
    return out


def _canonical(rows: np.ndarray, p: int) -> np.ndarray:
    """Sort each side of each tuple so that equal (positive set, negative set) pairs give equal rows."""
    return np.concatenate([np.sort(rows[:, :p], axis=1), np.sort(rows[:, p:], axis=1)], axis=1)


def sample_tuples(num_samples: int, group_size: int, max_tuples: int = 100_000, seed: int = 0) -> np.ndarray:
    """Distinct CKD tuples of positions 0..num_samples−1, shuffled: an int64 array (T, group_size).

    T = min(max_tuples, C(N, p) · C(N − p, n)). The result is a uniform random subset of all tuples (all of them
    when there are at most ``max_tuples``), in random order; no position repeats inside a tuple. When there are
    fewer than 5 · max_tuples tuples they are enumerated and subsampled, otherwise drawn at random and
    de-duplicated, the same split as the official sampler.
    """
    p, n = split_sides(group_size)
    if num_samples < group_size:
        raise ValueError(f"num_samples ({num_samples}) must be >= group_size ({group_size})")
    if max_tuples < 1:
        raise ValueError(f"max_tuples must be >= 1, got {max_tuples}")
    rng = np.random.default_rng(seed)
    total = math.comb(num_samples, p) * math.comb(num_samples - p, n)
    if total < _ENUMERATE_FACTOR * max_tuples:
        rows = _enumerate_all(num_samples, p, n)
    else:
        rows = np.empty((0, group_size), dtype=np.int64)
        while len(rows) < max_tuples:
            need = max_tuples - len(rows)
            fresh = _canonical(_draw_distinct(rng, num_samples, group_size, need + need // 10 + 16), p)
            rows = np.unique(np.concatenate([rows, fresh]), axis=0)
    return rows[rng.permutation(len(rows))[:max_tuples]]
