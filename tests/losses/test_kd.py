"""Tests for the Hinton KD and soft-target cross-entropy losses (lightning_kd.losses.kd)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.losses import hinton_kd_loss, kd_loss, soft_cross_entropy


def _kd_reference(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Loop form of T² · (1/B) Σ_b Σ_c p_t log(p_t / p_s)."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(s.shape[0]):
        p_s = torch.softmax(s[b].double() / temperature, dim=0)
        p_t = torch.softmax(t[b].double() / temperature, dim=0)
        for c in range(s.shape[1]):
            total = total + p_t[c] * torch.log(p_t[c] / p_s[c])
    return total / s.shape[0] * temperature**2


def test_kd_loss_golden_t1():
    # Sample 0: z_s = [0, 0] -> p_s = [1/2, 1/2]; z_t = [ln 3, 0] -> p_t = [3/4, 1/4].
    #   KL = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 3/4 ln(3/2) - 1/4 ln 2 ≈ 0.130812.
    # Sample 1: identical logits -> KL = 0. batchmean over B = 2 -> 0.130812 / 2.
    s = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    expected = (0.75 * math.log(1.5) - 0.25 * math.log(2.0)) / 2
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_golden_t2():
    # T = 2: z_t / T = [ln 3 / 2, 0] = [ln √3, 0] -> p_t = [√3, 1] / (√3 + 1); p_s = [1/2, 1/2].
    #   loss = T² · Σ p_t ln(2 p_t) = 4 · (a ln 2a + b ln 2b), a = √3/(√3+1), b = 1/(√3+1) ≈ 4 · 0.036360.
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), 0.0]])
    a, b = math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)
    expected = 4 * (a * math.log(2 * a) + b * math.log(2 * b))
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_loop_reference(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    assert kd_loss(s, t, temperature).item() == pytest.approx(_kd_reference(s, t, temperature).item(), rel=1e-5)


def test_kd_loss_zero_when_equal_and_gradients():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    assert kd_loss(s.detach(), s.detach()).item() == pytest.approx(0.0, abs=1e-6)
    kd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher is a constant


def test_kd_loss_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        kd_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)


def test_hinton_kd_loss_golden():
    # z_s = [0, 0], z_t = [ln 3, 0], y = 0, T = 1, alpha = 0.25 (weight of CE):
    #   CE = -ln(1/2) = ln 2; KL = 3/4 ln(3/2) - 1/4 ln 2 -> 0.25 ln 2 + 0.75 KL.
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.75 * math.log(1.5) - 0.25 * math.log(2.0)
    expected = 0.25 * math.log(2.0) + 0.75 * kl
    got = hinton_kd_loss(s, t, torch.tensor([0]), alpha=0.25, temperature=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_hinton_kd_loss_is_alpha_weighted_ce_plus_kd():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    got = hinton_kd_loss(s, t, y, alpha=0.3, temperature=4.0)
    expected = 0.3 * F.cross_entropy(s, y) + 0.7 * _kd_reference(s, t, 4.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert hinton_kd_loss(s, t, y, alpha=1.0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_hinton_kd_loss_errors():
    with pytest.raises(ValueError, match="alpha"):
        hinton_kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), alpha=1.5)
    with pytest.raises(ValueError, match="target"):
        hinton_kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_soft_cross_entropy_golden():
    # z = [ln 3, 0] -> log p = [ln 3/4, ln 1/4]; q = [1, 0], ε = 0.2, C = 2 -> q' = 0.8 q + 0.1 = [0.9, 0.1].
    #   loss = -(0.9 ln 0.75 + 0.1 ln 0.25) ≈ 0.397543.
    z = torch.tensor([[math.log(3.0), 0.0]])
    q = torch.tensor([[1.0, 0.0]])
    expected = -(0.9 * math.log(0.75) + 0.1 * math.log(0.25))
    assert soft_cross_entropy(z, q, label_smoothing=0.2).item() == pytest.approx(expected, rel=1e-6)
    assert soft_cross_entropy(z, q).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_soft_cross_entropy_matches_gpd_form_and_torch():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 6, generator=g)
    q = torch.randn(8, 6, generator=g).softmax(dim=1)
    eps = 0.1
    # GPD's form: (1 - ε) · (-Σ q log p) + ε · mean_c(-log p), averaged over the batch.
    log_p = torch.log_softmax(z, dim=1)
    gpd = ((1 - eps) * (-(q * log_p).sum(1)) + eps * (-log_p.mean(1))).mean()
    assert soft_cross_entropy(z, q, eps).item() == pytest.approx(gpd.item(), rel=1e-6)
    # torch's probability-target CE uses the same smoothing.
    torch_ce = F.cross_entropy(z, q, label_smoothing=eps)
    assert soft_cross_entropy(z, q, eps).item() == pytest.approx(torch_ce.item(), rel=1e-6)


def test_soft_cross_entropy_gradients_and_errors():
    z = torch.randn(3, 4, requires_grad=True)
    soft_cross_entropy(z, torch.full((3, 4), 0.25)).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="label_smoothing"):
        soft_cross_entropy(torch.zeros(3, 4), torch.zeros(3, 4), label_smoothing=1.0)
