"""Selection strategies: the round-0 draws equal the one-shot references, the active strategies equal simple
brute-force versions, and every registered strategy returns ``n`` sorted distinct pool members."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_kd.selection import PoolScores, SelectionContext, create_strategy, list_strategies
from lightning_kd.selection.badge import gradient_factors, gradient_squared_distances
from lightning_kd.selection.kcenter import squared_norms
from lightning_kd.selection.margin import softmax_margin

ALL = ["badge", "class_balanced", "entropy", "kcenter", "margin", "margin_kcenter", "random"]


def reference_random(pool, n, seed):
    return np.sort(pool[np.random.default_rng(seed).permutation(len(pool))[:n]])


def reference_class_balanced(pool, targets, n, seed):
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    per_class = [pool[targets == c][rng.permutation(int((targets == c).sum()))] for c in classes]
    rank = np.concatenate([np.arange(len(p)) for p in per_class])
    cls = np.concatenate([np.full(len(p), i) for i, p in enumerate(per_class)])
    order = np.lexsort((cls, rank))
    return np.sort(np.concatenate(per_class)[order][:n])


def reference_kcenter(x, centers, n, first):
    """Plain greedy k-center: distances by explicit differences, one center at a time."""
    x, centers = np.asarray(x, dtype=np.float64), np.asarray(centers, dtype=np.float64)
    picks = [] if len(centers) else [first]
    centers = centers if len(centers) else x[[first]]
    nearest = np.array([min(((xi - c) ** 2).sum() for c in centers) for xi in x])
    while len(picks) < n:
        nearest[picks] = -1.0
        j = int(np.argmax(nearest))
        picks.append(j)
        nearest = np.minimum(nearest, ((x - x[j]) ** 2).sum(axis=1))
    return np.array(picks)


def random_case(pool_size=200, n_chosen=0, classes=10, dim=8, seed=0):
    """A pool that is not 0..P-1 (a sorted subset of range(10000)), labels, chosen indices and student scores."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10000, size=pool_size + n_chosen, replace=False)
    pool, chosen = np.sort(ids[:pool_size]), np.sort(ids[pool_size:])
    g = torch.Generator().manual_seed(seed)
    scores = PoolScores(
        logits=torch.randn(pool_size, classes, generator=g) * 2,
        embeddings=torch.randn(pool_size, dim, generator=g),
        chosen_logits=torch.randn(n_chosen, classes, generator=g) * 2,
        chosen_embeddings=torch.randn(n_chosen, dim, generator=g),
    )
    targets = rng.integers(0, classes, pool_size)
    return pool, targets, chosen, rng.integers(0, classes, n_chosen), scores


def test_registry_names():
    assert list_strategies() == ALL


@pytest.mark.parametrize("seed", [0, 1, 7, 2**40])
@pytest.mark.parametrize("n", [1, 13, 250, 500])
def test_round0_equals_references(seed, n):
    pool, targets, *_ = random_case(pool_size=500)
    ctx = SelectionContext(pool, targets, n, seed=seed)
    np.testing.assert_array_equal(create_strategy("random").select(ctx), reference_random(pool, n, seed))
    expected = reference_class_balanced(pool, targets, n, seed)
    np.testing.assert_array_equal(create_strategy("class_balanced").select(ctx), expected)


def test_random_later_round_uses_round_seed():
    pool, targets, chosen, chosen_targets, _ = random_case(pool_size=500, n_chosen=20)
    ctx = SelectionContext(pool, targets, 50, seed=3, round=2, chosen=chosen, chosen_targets=chosen_targets)
    expected = np.sort(pool[np.random.default_rng([3, 2]).permutation(500)[:50]])
    np.testing.assert_array_equal(create_strategy("random").select(ctx), expected)


def test_class_balanced_later_round_evens_totals():
    # Pool: 4 of class 0, 2 of class 1, 3 of class 2. Already bought: 3, 1, 0. Water-filling 5 picks:
    # c2 (0->1), c1 (1->2), c2 (->2), c1 (->3), c2 (->3): all of classes 1 and 2, nothing of class 0.
    pool = np.array([10, 11, 12, 13, 20, 21, 30, 31, 32])
    targets = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    chosen, chosen_targets = np.array([1, 2, 3, 4]), np.array([0, 0, 0, 1])
    strategy = create_strategy("class_balanced")
    ctx = SelectionContext(pool, targets, 5, seed=0, round=1, chosen=chosen, chosen_targets=chosen_targets)
    np.testing.assert_array_equal(strategy.select(ctx), [20, 21, 30, 31, 32])
    # 7 picks: classes 1 and 2 run out at 3 each, the last two go to class 0 (totals 5, 3, 3).
    ctx = SelectionContext(pool, targets, 7, seed=0, round=1, chosen=chosen, chosen_targets=chosen_targets)
    out = strategy.select(ctx)
    assert np.isin([20, 21, 30, 31, 32], out).all() and np.isin(out, pool[:4]).sum() == 2
    # 2 picks with totals 3, 1, 0: one each to classes 2 and 1 (round-robin would give one to class 0).
    ctx = SelectionContext(pool, targets, 2, seed=5, round=1, chosen=chosen, chosen_targets=chosen_targets)
    out = strategy.select(ctx)
    assert sorted(targets[np.searchsorted(pool, out)]) == [1, 2]


def tiny_scores(logits):
    logits = torch.as_tensor(logits, dtype=torch.float32)
    return PoolScores(logits, torch.zeros(len(logits), 2), torch.zeros(0, logits.shape[1]), torch.zeros(0, 2))


def test_entropy_and_margin_by_hand():
    # probs: row 0 uniform (max entropy, margin 0); row 1 confident; row 2 two-way tie (margin 0);
    # row 3 equal to row 0 (tie: lower position first); row 4 mildly confident.
    logits = [[0, 0, 0], [10, 0, 0], [5, 5, -5], [0, 0, 0], [1, 0, 0]]
    pool = np.array([3, 8, 15, 16, 42])
    ctx = SelectionContext(pool, np.zeros(5, dtype=np.int64), 2, scores=tiny_scores(logits))
    ctx1 = SelectionContext(pool, np.zeros(5, dtype=np.int64), 1, scores=tiny_scores(logits))
    # entropy order: rows 0, 3 (ln 3), 4, 2 (≈ ln 2), 1
    np.testing.assert_array_equal(create_strategy("entropy").select(ctx1), [3])
    np.testing.assert_array_equal(create_strategy("entropy").select(ctx), [3, 16])
    ctx3 = SelectionContext(pool, np.zeros(5, dtype=np.int64), 3, scores=tiny_scores(logits))
    np.testing.assert_array_equal(create_strategy("entropy").select(ctx3), [3, 16, 42])
    # margin order: rows 0, 2, 3 (all 0; stable by position), then 4, then 1
    np.testing.assert_array_equal(create_strategy("margin").select(ctx1), [3])
    np.testing.assert_array_equal(create_strategy("margin").select(ctx), [3, 15])
    np.testing.assert_array_equal(create_strategy("margin").select(ctx3), [3, 15, 16])
    e = np.e
    expected = [0, 1 / (1 + 2 * np.exp(-10)) - np.exp(-10) / (1 + 2 * np.exp(-10)), 0, 0, (e - 1) / (e + 2)]
    np.testing.assert_allclose(softmax_margin(torch.tensor(logits, dtype=torch.float32)), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["entropy", "margin"])
def test_uncertainty_ties_keep_pool_order(name):
    logits = torch.zeros(3000, 4)
    logits[::7, 0] = 9.0  # confident rows never chosen first; the rest tie exactly
    pool = np.arange(3000) * 3
    ctx = SelectionContext(pool, np.zeros(3000, dtype=np.int64), 20, scores=tiny_scores(logits))
    expected = pool[np.flatnonzero(logits[:, 0] == 0)[:20]]
    np.testing.assert_array_equal(create_strategy(name).select(ctx), expected)


@pytest.mark.parametrize("n_chosen", [0, 15])
@pytest.mark.parametrize("space", ["embedding", "softmax"])
def test_kcenter_equals_brute_force(n_chosen, space):
    pool, targets, chosen, chosen_targets, scores = random_case(pool_size=120, n_chosen=n_chosen, seed=3)
    ctx = SelectionContext(
        pool, targets, 25, seed=4, round=1, chosen=chosen, chosen_targets=chosen_targets, scores=scores
    )
    out = create_strategy("kcenter", space=space, chunk_size=8).select(ctx)
    if space == "embedding":
        x, c = scores.embeddings.double().numpy(), scores.chosen_embeddings.double().numpy()
    else:
        x = torch.softmax(scores.logits.double(), 1).numpy()
        c = torch.softmax(scores.chosen_logits.double(), 1).numpy()
    first = int(np.random.default_rng([4, 1]).integers(len(pool)))
    np.testing.assert_array_equal(out, np.sort(pool[reference_kcenter(x, c, 25, first)]))


def test_margin_kcenter_is_prefilter_then_kcenter():
    pool, targets, chosen, chosen_targets, scores = random_case(pool_size=300, n_chosen=10, seed=5)
    n, prefilter = 12, 4
    ctx = SelectionContext(pool, targets, n, seed=2, chosen=chosen, chosen_targets=chosen_targets, scores=scores)
    out = create_strategy("margin_kcenter", prefilter=prefilter, chunk_size=16).select(ctx)
    p = torch.softmax(scores.logits.double(), 1).numpy()
    top2 = np.sort(p, axis=1)[:, -2:]
    low = np.sort(np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[: prefilter * n])
    assert np.isin(out, pool[low]).all()
    x = scores.embeddings.double().numpy()[low]
    expected = reference_kcenter(x, scores.chosen_embeddings.double().numpy(), n, first=-1)
    np.testing.assert_array_equal(out, np.sort(pool[low][expected]))
    # with nothing bought, the first center is drawn from the prefiltered candidates
    ctx = SelectionContext(pool, targets, n, seed=2, scores=random_case(300, 0, seed=5)[-1])
    out = create_strategy("margin_kcenter", prefilter=prefilter).select(ctx)
    first = int(np.random.default_rng([2, 0]).integers(prefilter * n))
    np.testing.assert_array_equal(out, np.sort(pool[low][reference_kcenter(x, x[:0], n, first)]))


def test_badge_factorized_distance_equals_outer_products():
    g = torch.Generator().manual_seed(0)
    logits, h = torch.randn(9, 4, generator=g), torch.randn(9, 6, generator=g)
    a = gradient_factors(logits)
    onehot = torch.nn.functional.one_hot(logits.argmax(1), 4).double()
    torch.testing.assert_close(a, torch.softmax(logits.double(), 1) - onehot)
    grads = (a[:, :, None] * h.double()[:, None, :]).reshape(9, -1)
    explicit = torch.cdist(grads, grads[:3]) ** 2
    hd = h.double()
    g_sq = squared_norms(a) * squared_norms(hd)
    got = gradient_squared_distances(a, hd, g_sq, a[:3], hd[:3], g_sq[:3])
    torch.testing.assert_close(got, explicit, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(g_sq, (grads**2).sum(1))


def test_badge_first_pick_and_seeding():
    pool, targets, chosen, chosen_targets, scores = random_case(pool_size=400, n_chosen=10, dim=16, seed=6)
    a = gradient_factors(scores.logits)
    norms = squared_norms(a) * squared_norms(scores.embeddings.double())
    first = pool[int(norms.argmax())]
    badge = create_strategy("badge")

    def run(n, seed):
        ctx = SelectionContext(pool, targets, n, seed=seed, chosen=chosen, chosen_targets=chosen_targets, scores=scores)
        return badge.select(ctx)

    np.testing.assert_array_equal(run(1, 0), [first])
    out = run(40, 0)
    assert first in out and len(np.unique(out)) == 40 and np.isin(out, pool).all()
    np.testing.assert_array_equal(out, run(40, 0))
    assert not np.array_equal(out, run(40, 1))


def test_badge_all_zero_distances_picks_uniformly():
    # zero features: every gradient embedding is 0, so the first pick is position 0 and the rest are uniform
    scores = PoolScores(torch.randn(8, 3), torch.zeros(8, 2), torch.zeros(0, 3), torch.zeros(0, 2))
    pool = np.arange(8) * 2
    out = create_strategy("badge").select(SelectionContext(pool, np.zeros(8, dtype=np.int64), 3, seed=4, scores=scores))
    rng, picked = np.random.default_rng([4, 0]), [0]
    for _ in range(2):
        picked.append(int(rng.choice(np.setdiff1d(np.arange(8), picked))))
    np.testing.assert_array_equal(out, np.sort(pool[picked]))


@pytest.mark.parametrize("name", list_strategies())
def test_every_strategy_contract(name):
    pool, targets, chosen, chosen_targets, scores = random_case(pool_size=300, n_chosen=20, seed=9)
    strategy = create_strategy(name)

    def ctx(n):
        return SelectionContext(
            pool,
            targets,
            n,
            seed=11,
            round=1,
            chosen=chosen,
            chosen_targets=chosen_targets,
            scores=scores if strategy.needs_student else None,
        )

    for n in (1, 37, 300):
        out = strategy.select(ctx(n))
        assert out.dtype == np.int64 and len(out) == n
        assert np.all(np.diff(out) > 0) and np.isin(out, pool).all()
        np.testing.assert_array_equal(out, create_strategy(name).select(ctx(n)))


@pytest.mark.parametrize("name", [s for s in list_strategies() if create_strategy(s).needs_student])
def test_needs_student_without_scores(name):
    pool, targets, *_ = random_case(pool_size=50)
    with pytest.raises(ValueError, match="needs the student's outputs"):
        create_strategy(name).select(SelectionContext(pool, targets, 5))


def test_context_validation():
    pool, targets, chosen, chosen_targets, scores = random_case(pool_size=50, n_chosen=5)
    with pytest.raises(ValueError, match=r"n=51 .* 50 samples"):
        SelectionContext(pool, targets, 51)
    with pytest.raises(ValueError, match=r"n=0 .* 50 samples"):
        SelectionContext(pool, targets, 0)
    with pytest.raises(ValueError, match="targets"):
        SelectionContext(pool, targets[:-1], 5)
    with pytest.raises(ValueError, match="disjoint"):
        SelectionContext(pool, targets, 5, chosen=pool[:2], chosen_targets=targets[:2])
    with pytest.raises(ValueError, match=r"scores.embeddings has shape \(49, 8\)"):
        bad = PoolScores(scores.logits, scores.embeddings[:49], scores.chosen_logits, scores.chosen_embeddings)
        SelectionContext(pool, targets, 5, chosen=chosen, chosen_targets=chosen_targets, scores=bad)
    with pytest.raises(ValueError, match=r"scores.chosen_logits has shape \(5, 10\)"):
        SelectionContext(pool, targets, 5, scores=scores)
    with pytest.raises(ValueError, match="class counts"):
        PoolScores(scores.logits, scores.embeddings, scores.chosen_logits[:, :3], scores.chosen_embeddings)


def test_create_strategy_specs():
    with pytest.raises(ValueError) as err:
        create_strategy("foo")
    assert str(err.value) == (
        "unknown selection strategy 'foo'; known: badge, class_balanced, entropy, kcenter, margin, margin_kcenter, "
        "random"
    )

    class Mine:
        needs_student = False

        def select(self, ctx):
            return ctx.pool[: ctx.n]

    mine = Mine()
    assert create_strategy(mine) is mine
    with pytest.raises(TypeError, match="keyword arguments"):
        create_strategy(mine, seed=1)
    with pytest.raises(TypeError):
        create_strategy(3)
    with pytest.raises(TypeError):
        create_strategy(Mine)
    assert create_strategy("kcenter", space="softmax").space == "softmax"
    with pytest.raises(ValueError, match="space"):
        create_strategy("kcenter", space="gradient")
