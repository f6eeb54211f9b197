"""Tests for the RKD and DIST losses (lightning_kd.losses.relational)."""

import itertools
import math

import pytest
import torch

from lightning_kd.losses import dist_loss, rkd_loss


def _huber(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def _rkd_reference(s: torch.Tensor, t: torch.Tensor, w_dist: float, w_angle: float) -> float:
    """Loops over pairs / triplets; means over all B² resp. B³ entries, diagonal included."""
    B = s.shape[0]

    def dists(x):
        d = [[(x[i] - x[j]).norm().item() for j in range(B)] for i in range(B)]
        mu = sum(d[i][j] for i in range(B) for j in range(B) if i != j) / (B * (B - 1))
        return [[v / mu for v in row] for row in d]

    def angle(x, i, j, k):
        a, b = x[j] - x[i], x[k] - x[i]
        if a.norm() == 0 or b.norm() == 0:
            return 0.0
        return (a @ b / (a.norm() * b.norm())).item()

    ds, dt = dists(s), dists(t)
    loss_d = sum(_huber(ds[i][j] - dt[i][j]) for i in range(B) for j in range(B)) / B**2
    triplets = list(itertools.product(range(B), repeat=3))
    loss_a = sum(_huber(angle(s, *ijk) - angle(t, *ijk)) for ijk in triplets) / B**3
    return w_dist * loss_d + w_angle * loss_a


def test_rkd_golden_distance_and_angle():
    # 1-D points, teacher x = [0, 1, 2], student x = [0, 2, 1].
    # Distances (pairs 01, 02, 12): teacher 1, 2, 1 (mean 4/3) -> 3/4, 3/2, 3/4;
    #   student 2, 1, 1 (mean 4/3) -> 3/2, 3/4, 3/4. Diffs 3/4, -3/4, 0 -> Huber 9/32 each, each pair
    #   appears twice in the 3×3 matrix: L_D = 4 · 9/32 / 9 = 1/8.
    # Angles are products of unit directions sign(x_j - x_i) · sign(x_k - x_i). They differ only for anchor 1
    #   at (j, k) = (0, 2), (2, 0) and for anchor 2 at (0, 1), (1, 0): each differs by 2 -> Huber 1.5;
    #   L_A = 4 · 1.5 / 27 = 2/9.
    t = torch.tensor([[0.0], [1.0], [2.0]])
    s = torch.tensor([[0.0], [2.0], [1.0]])
    assert rkd_loss(s, t, w_dist=1.0, w_angle=0.0).item() == pytest.approx(1 / 8, rel=1e-5)
    assert rkd_loss(s, t, w_dist=0.0, w_angle=1.0).item() == pytest.approx(2 / 9, rel=1e-5)
    assert rkd_loss(s, t).item() == pytest.approx(25 / 8 + 50 * 2 / 9, rel=1e-5)


def test_rkd_scale_invariant():
    t = torch.randn(6, 4)
    assert rkd_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-5)


def test_rkd_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    got = rkd_loss(s, t, w_dist=25.0, w_angle=50.0).item()
    assert got == pytest.approx(_rkd_reference(s, t, 25.0, 50.0), rel=1e-4)


def test_rkd_gradients_and_errors():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    loss = rkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="same shape"):
        rkd_loss(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least 2"):
        rkd_loss(torch.zeros(1, 2), torch.zeros(1, 2))


def test_dist_golden():
    # τ = 1, logits = log of the probabilities below, so softmax recovers them exactly.
    # Teacher rows [.5, .25, .25], [.25, .5, .25]; student rows [.25, .25, .5], [.25, .5, .25].
    # Inter (rows): row 0 centred: t = [1/6, -1/12, -1/12], s = [-1/12, -1/12, 1/6];
    #   dot = -3/144, |t||s| = 6/144 -> ρ = -1/2; row 1 identical -> ρ = 1. 1 - mean = 3/4.
    # Intra (columns over B = 2): col 0 student constant -> ρ = 0 (eps guard); col 1 identical -> 1;
    #   col 2 teacher constant -> 0. 1 - mean = 2/3. Total 3/4 + 2/3 = 17/12.
    t = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]).log()
    s = torch.tensor([[0.25, 0.25, 0.5], [0.25, 0.5, 0.25]]).log()
    assert dist_loss(s, t, temperature=1.0).item() == pytest.approx(17 / 12, rel=1e-5)
    assert dist_loss(s, t, beta=1.0, gamma=0.0, temperature=1.0).item() == pytest.approx(3 / 4, rel=1e-5)


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (den + 1e-8)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dist_matches_loop_reference(temperature):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    ys = (s / temperature).softmax(1).tolist()
    yt = (t / temperature).softmax(1).tolist()
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    cols_s, cols_t = list(zip(*ys)), list(zip(*yt))
    intra = 1 - sum(_pearson(list(a), list(b)) for a, b in zip(cols_s, cols_t)) / len(cols_s)
    expected = temperature**2 * (0.5 * inter + 2.0 * intra)
    got = dist_loss(s, t, beta=0.5, gamma=2.0, temperature=temperature).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_dist_gradients_and_errors():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    dist_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert dist_loss(t.detach(), t.detach(), temperature=1.0).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        dist_loss(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        dist_loss(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="temperature"):
        dist_loss(torch.zeros(3, 2), torch.zeros(3, 2), temperature=-1.0)
