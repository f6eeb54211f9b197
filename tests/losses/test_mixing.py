"""Tests for the mixup / cutmix tensor functions (lightning_kd.losses.mixing)."""

import pytest
import torch

from lightning_kd.losses import cutmix, mix_targets, mixup, soft_cross_entropy


def test_mixup_golden():
    # x = [0, 10], perm swaps them, λ = 0.3: [0.3·0 + 0.7·10, 0.3·10 + 0.7·0] = [7, 3].
    x = torch.tensor([[0.0], [10.0]])
    mixed, lam = mixup(x, 0.3, torch.tensor([1, 0]))
    assert torch.allclose(mixed, torch.tensor([[7.0], [3.0]]))
    assert lam == 0.3
    assert torch.equal(x, torch.tensor([[0.0], [10.0]]))  # input untouched


def test_mixup_gradients_and_errors():
    x = torch.randn(3, 2, requires_grad=True)
    mixed, _ = mixup(x, 0.5, torch.tensor([2, 0, 1]))
    mixed.sum().backward()
    assert torch.allclose(x.grad, torch.ones(3, 2))
    with pytest.raises(ValueError, match="lam"):
        mixup(x, 1.5, torch.tensor([2, 0, 1]))
    with pytest.raises(ValueError, match="perm"):
        mixup(x, 0.5, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="integer"):
        mixup(x, 0.5, torch.tensor([1.0, 0.0, 2.0]))


def _box_of(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    rows = mask.any(dim=1).nonzero().flatten()
    cols = mask.any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


@pytest.mark.parametrize("seed", range(20))
def test_cutmix_box_and_adjusted_lambda(seed):
    # Sample 0 is all zeros, sample 1 all ones; perm swaps them, so the pasted box of sample 0 is exactly the
    # set of ones in its mixed image.
    h, w, lam = 8, 6, 0.6
    x = torch.stack([torch.zeros(3, h, w), torch.ones(3, h, w)])
    mixed, lam_adj = cutmix(x, lam, torch.tensor([1, 0]), generator=torch.Generator().manual_seed(seed))
    pasted = mixed[0, 0] == 1
    assert torch.equal(mixed[1], 1 - mixed[0])
    assert torch.equal(mixed[0, 0], mixed[0, 2])  # same box in every channel
    assert lam_adj == pytest.approx(1 - pasted.float().mean().item())  # fraction kept from x
    box = _box_of(pasted)
    if box is not None:
        y1, y2, x1, x2 = box
        assert pasted[y1:y2, x1:x2].all() and pasted.sum() == (y2 - y1) * (x2 - x1)  # one solid rectangle
        # side int(S·√(1−λ)) centred at (cy, cx): the box spans at most 2·(side // 2) pixels.
        side_h, side_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        assert y2 - y1 <= 2 * (side_h // 2) and x2 - x1 <= 2 * (side_w // 2)
    assert torch.equal(x[0], torch.zeros(3, h, w))  # input untouched


def test_cutmix_golden_extremes_and_determinism():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    perm = torch.tensor([1, 0])
    same, lam_one = cutmix(x, 1.0, perm)  # √(1 − 1) = 0 -> empty box, nothing pasted
    assert torch.equal(same, x) and lam_one == 1.0
    a = cutmix(x, 0.4, perm, generator=torch.Generator().manual_seed(5))
    b = cutmix(x, 0.4, perm, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_cutmix_full_box_golden():
    # λ = 0, H = W = 4: side int(4·1) = 4, half-side 2, box rows [cy−2, cy+2) ∩ [0, 4) for cy ∈ {0, 1, 2, 3}:
    #   heights 2, 3, 4, 3 (same for columns), so λ_adj = 1 − h·w/16 with h, w ∈ {2, 3, 4}; a centre at (2, 2)
    #   pastes the whole image (λ_adj = 0, output = x[perm]).
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    allowed = {1 - h * w / 16 for h in (2, 3, 4) for w in (2, 3, 4)}
    seen = set()
    for seed in range(200):
        mixed, lam_adj = cutmix(x, 0.0, torch.tensor([1, 0]), generator=torch.Generator().manual_seed(seed))
        assert lam_adj in allowed
        seen.add(lam_adj)
        if lam_adj == 0.0:
            assert torch.equal(mixed, x[[1, 0]])
    assert seen == allowed  # every centre position occurs: the centre is uniform over the whole image


def test_cutmix_errors():
    with pytest.raises(ValueError, match=r"\(B, \.\.\., H, W\)"):
        cutmix(torch.zeros(2, 4), 0.5, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="lam"):
        cutmix(torch.zeros(2, 1, 4, 4), -0.1, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="perm"):
        cutmix(torch.zeros(2, 1, 4, 4), 0.5, torch.tensor([[1, 0]]))


def test_mix_targets_golden_and_linearity():
    # λ = 0.25: 0.25·[1, 0] + 0.75·[0, 1] = [0.25, 0.75].
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(mix_targets(a, b, 0.25), torch.tensor([[0.25, 0.75]]))
    # CE is linear in the target: CE(z, mix) = λ·CE(z, q_a) + (1−λ)·CE(z, q_b) (CKD's mixup baseline form).
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=g)
    qa, qb = torch.randn(4, 5, generator=g).softmax(1), torch.randn(4, 5, generator=g).softmax(1)
    lhs = soft_cross_entropy(z, mix_targets(qa, qb, 0.7))
    rhs = 0.7 * soft_cross_entropy(z, qa) + 0.3 * soft_cross_entropy(z, qb)
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        mix_targets(a, torch.zeros(1, 3), 0.5)
    with pytest.raises(ValueError, match="lam"):
        mix_targets(a, b, 2.0)
