"""Tests for the CKD tuple sampler (lightning_kd.data.tuples)."""

import itertools
import math
import time

import numpy as np
import pytest

from lightning_kd.data.tuples import sample_tuples, split_sides


def _canonical_set(rows: np.ndarray, p: int) -> set[tuple[int, ...]]:
    return {tuple(sorted(r[:p])) + tuple(sorted(r[p:])) for r in rows.tolist()}


def _brute_force(num_samples: int, group_size: int) -> set[tuple[int, ...]]:
    """All (positive set, negative set) pairs, from every ordered draw of distinct positions."""
    p, _ = split_sides(group_size)
    perms = np.array(list(itertools.permutations(range(num_samples), group_size)))
    return _canonical_set(perms, p)


def _check_valid(rows: np.ndarray, num_samples: int, group_size: int) -> None:
    p, _ = split_sides(group_size)
    assert rows.dtype == np.int64 and rows.ndim == 2 and rows.shape[1] == group_size
    assert rows.min() >= 0 and rows.max() < num_samples
    assert (np.sort(rows, axis=1)[:, 1:] != np.sort(rows, axis=1)[:, :-1]).all()  # no repeat within a tuple
    assert (np.diff(rows[:, :p], axis=1) > 0).all() and (np.diff(rows[:, p:], axis=1) > 0).all()  # sides sorted
    assert len(np.unique(rows, axis=0)) == len(rows)  # no duplicate tuple


@pytest.mark.parametrize("k,expected", [(2, (1, 1)), (3, (2, 1)), (4, (2, 2)), (5, (3, 2))])
def test_split_sides(k, expected):
    assert split_sides(k) == expected


@pytest.mark.parametrize("num_samples,group_size", [(4, 2), (5, 3), (6, 4)])
def test_returns_all_tuples_when_few(num_samples, group_size):
    # N = 4, k = 2: C(4,1)·C(3,1) = 12; N = 5, k = 3: C(5,2)·C(3,1) = 30; N = 6, k = 4: C(6,2)·C(4,2) = 90.
    p, n = split_sides(group_size)
    rows = sample_tuples(num_samples, group_size, max_tuples=1000)
    _check_valid(rows, num_samples, group_size)
    assert len(rows) == math.comb(num_samples, p) * math.comb(num_samples - p, n)
    assert _canonical_set(rows, p) == _brute_force(num_samples, group_size)
    assert rows.tolist() != sorted(rows.tolist())  # shuffled, not in enumeration order


def test_golden_pairs():
    # N = 3, k = 2 -> p = n = 1: the 6 ordered pairs of distinct positions.
    rows = sample_tuples(3, 2)
    assert sorted(map(tuple, rows.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]


def test_subsamples_enumeration_regime():
    # N = 6, k = 3: 60 tuples < 5 · 20, so all are enumerated and 20 kept.
    rows = sample_tuples(6, 3, max_tuples=20, seed=1)
    assert rows.shape == (20, 3)
    _check_valid(rows, 6, 3)
    assert _canonical_set(rows, 2) <= _brute_force(6, 3)


def test_large_is_fast_valid_and_seeded():
    start = time.perf_counter()
    rows = sample_tuples(4000, 4, max_tuples=100_000, seed=0)
    elapsed = time.perf_counter() - start
    assert rows.shape == (100_000, 4)
    _check_valid(rows, 4000, 4)
    assert elapsed < 1.0, f"sampling took {elapsed:.2f}s"
    assert np.array_equal(rows, sample_tuples(4000, 4, max_tuples=100_000, seed=0))
    assert not np.array_equal(rows, sample_tuples(4000, 4, max_tuples=100_000, seed=1))


@pytest.mark.parametrize("seed", range(5))
def test_sampling_regime_near_threshold_has_no_duplicates(seed):
    # N = 20, k = 2: 380 ordered pairs = exactly 5 · 76, the smallest case drawn at random; ~100 draws from 380
    # collide about a dozen times, so the duplicates must be removed and topped up.
    rows = sample_tuples(20, 2, max_tuples=76, seed=seed)
    assert rows.shape == (76, 2)
    _check_valid(rows, 20, 2)


def test_large_group_sampling_regime():
    # N = 20, k = 10: C(20,5)·C(15,5) ≈ 4.7e7 tuples -> random regime with half the positions in each tuple.
    rows = sample_tuples(20, 10, max_tuples=2000, seed=3)
    assert rows.shape == (2000, 10)
    _check_valid(rows, 20, 10)


def test_uniform_over_positions_and_sides():
    # N = 20, k = 3 (p = 2, n = 1): 3420 tuples >= 5 · 500, so the random regime is used.
    # Over 20 seeds (10,000 tuples) each position should be a positive 1000 times and a negative 500 times;
    # a chi-square statistic with 19 degrees of freedom stays far below 60 for a uniform sampler.
    rows = np.concatenate([sample_tuples(20, 3, max_tuples=500, seed=s) for s in range(20)])
    pos_counts = np.bincount(rows[:, :2].ravel(), minlength=20)
    neg_counts = np.bincount(rows[:, 2], minlength=20)
    for counts, expected in ((pos_counts, 1000), (neg_counts, 500)):
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 60, counts


def test_errors():
    with pytest.raises(ValueError, match="group_size"):
        split_sides(1)
    with pytest.raises(ValueError, match="group_size"):
        sample_tuples(10, 1)
    with pytest.raises(ValueError, match="num_samples"):
        sample_tuples(3, 4)
    with pytest.raises(ValueError, match="max_tuples"):
        sample_tuples(10, 2, max_tuples=0)
