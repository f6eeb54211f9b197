"""Tests for the CKD losses (lightning_kd.losses.comparative)."""

import itertools
import math

import pytest
import torch

from lightning_kd.losses import comparative_kd_loss, in_batch_comparative_loss, kd_loss


def _one_pair():
    # B = 1, p = n = 1, C = 2.
    sp, sn = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])  # Δz_S = [1, -1]
    tp, tn = torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0.0, 0.0]]])  # Δz_T = [2, 0]
    return sp, sn, tp, tn


def test_mse_golden():
    sp, sn, tp, tn = _one_pair()
    # rel = mean((1 - 2)², (-1 - 0)²) = 1.
    assert comparative_kd_loss(sp, sn, tp, tn).item() == pytest.approx(1.0)
    # labels pos = 1, neg = 0 -> Δy = [-1, 1]; cls = mean((1 + 1)², (-1 - 1)²) = 4.
    yp, yn = torch.tensor([[1]]), torch.tensor([[0]])
    assert comparative_kd_loss(sp, sn, tp, tn, yp, yn).item() == pytest.approx(5.0)
    assert comparative_kd_loss(sp, sn, tp, tn, yp.int(), yn.int()).item() == pytest.approx(5.0)  # any int dtype
    # weighted: 2 · 1 + 0.5 · 4 = 4.
    assert comparative_kd_loss(sp, sn, tp, tn, yp, yn, w_rel=2.0, w_cls=0.5).item() == pytest.approx(4.0)


def test_mse_golden_groups():
    # B = 1, p = 2, n = 1, C = 2: positives' logits [1, 0] and [3, 0] average to [2, 0]; negative [0, 2].
    #   Δz_S = [2, -2]; teacher all zeros -> rel = mean(4, 4) = 4.
    #   labels pos = (0, 1) -> [1/2, 1/2]; neg = (0,) -> [1, 0]; Δy = [-1/2, 1/2].
    #   cls = mean((2 + 1/2)², (-2 - 1/2)²) = 6.25. Total 10.25.
    sp = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    sn = torch.tensor([[[0.0, 2.0]]])
    tp, tn = torch.zeros(1, 2, 2), torch.zeros(1, 1, 2)
    loss = comparative_kd_loss(sp, sn, tp, tn, torch.tensor([[0, 1]]), torch.tensor([[0]]))
    assert loss.item() == pytest.approx(10.25)


def test_kl_golden():
    # T = 1. Student Δz_S = [0, 0] -> uniform; teacher Δz_T = [ln 3, 0] -> [3/4, 1/4].
    #   rel = 3/4 ln(3/2) - 1/4 ln 2 ≈ 0.130812 (batchmean with B = 1).
    #   Δy = [1, -1] (pos = 0, neg = 1) taken as logits -> q = [1/(1+e^-2), 1/(1+e^2)];
    #   cls = Σ q ln(2q) ≈ 0.327813.
    sp = sn = torch.zeros(1, 1, 2)
    tp, tn = torch.tensor([[[math.log(3.0), 0.0]]]), torch.zeros(1, 1, 2)
    rel = 0.75 * math.log(1.5) - 0.25 * math.log(2.0)
    q = [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))]
    cls = sum(qi * math.log(2 * qi) for qi in q)
    got = comparative_kd_loss(sp, sn, tp, tn, torch.tensor([[0]]), torch.tensor([[1]]), variant="kl", temperature=1.0)
    assert got.item() == pytest.approx(rel + cls, rel=1e-6)


def _reference(sp, sn, tp, tn, yp, yn, variant, temperature):
    """Per-sample loops: Δ's from explicit sums, then MSE (mean over B·C) or T²·KL (sum / B)."""
    B, p, C = sp.shape
    n = sn.shape[1]
    rel = cls = 0.0
    for b in range(B):
        def diff(pos, neg):
            return [sum(pos(i, c) for i in range(p)) / p - sum(neg(i, c) for i in range(n)) / n for c in range(C)]

        dzs = diff(lambda i, c: sp[b, i, c].item(), lambda i, c: sn[b, i, c].item())
        dzt = diff(lambda i, c: tp[b, i, c].item(), lambda i, c: tn[b, i, c].item())
        dy = diff(lambda i, c: float(yp[b, i].item() == c), lambda i, c: float(yn[b, i].item() == c))
        for target, is_rel in ((dzt, True), (dy, False)):
            if variant == "mse":
                term = sum((a - t) ** 2 for a, t in zip(dzs, target)) / (B * C)
            else:
                zs = [a / temperature for a in dzs]
                zt = [t / temperature for t in target]
                ls = math.log(sum(math.exp(v) for v in zs))
                lt = math.log(sum(math.exp(v) for v in zt))
                term = sum(math.exp(b_ - lt) * ((b_ - lt) - (a_ - ls)) for a_, b_ in zip(zs, zt)) * temperature**2 / B
            if is_rel:
                rel += term
            else:
                cls += term
    return rel, cls


@pytest.mark.parametrize("variant", ["mse", "kl"])
@pytest.mark.parametrize("p,n", [(1, 1), (2, 1), (2, 2)])
def test_matches_loop_reference(variant, p, n):
    g = torch.Generator().manual_seed(10 * p + n)
    B, C = 4, 5
    sp, sn = torch.randn(B, p, C, generator=g), torch.randn(B, n, C, generator=g)
    tp, tn = torch.randn(B, p, C, generator=g) * 2, torch.randn(B, n, C, generator=g) * 2
    yp, yn = torch.randint(0, C, (B, p), generator=g), torch.randint(0, C, (B, n), generator=g)
    rel, cls = _reference(sp, sn, tp, tn, yp, yn, variant, 4.0)
    got = comparative_kd_loss(sp, sn, tp, tn, yp, yn, variant=variant, temperature=4.0, w_rel=0.7, w_cls=1.3)
    assert got.item() == pytest.approx(0.7 * rel + 1.3 * cls, rel=1e-5)
    no_labels = comparative_kd_loss(sp, sn, tp, tn, variant=variant, temperature=4.0, w_rel=0.7)
    assert no_labels.item() == pytest.approx(0.7 * rel, rel=1e-5)


def test_gradients_reach_both_student_groups_only():
    sp = torch.randn(3, 2, 4, requires_grad=True)
    sn = torch.randn(3, 1, 4, requires_grad=True)
    tp = torch.randn(3, 2, 4, requires_grad=True)
    tn = torch.randn(3, 1, 4, requires_grad=True)
    for variant in ("mse", "kl"):
        yp, yn = torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1, dtype=torch.long)
        comparative_kd_loss(sp, sn, tp, tn, yp, yn, variant=variant).backward()
    assert sp.grad.abs().sum() > 0 and sn.grad.abs().sum() > 0
    assert tp.grad is None and tn.grad is None


@pytest.mark.parametrize(
    "shapes,targets,match",
    [
        (((2, 1, 3), (3, 1, 3), (2, 1, 3), (3, 1, 3)), None, "batch sizes differ"),
        (((2, 1, 3), (2, 1, 4), (2, 1, 3), (2, 1, 4)), None, "class counts differ"),
        (((2, 1, 3), (2, 1, 3), (2, 2, 3), (2, 1, 3)), None, "student_pos .* teacher_pos"),
        (((2, 1, 3), (2, 1, 3), (2, 1, 3), (2, 1, 4)), None, "student_neg .* teacher_neg"),
        (((2, 3), (2, 1, 3), (2, 3), (2, 1, 3)), None, r"\(B, group, C\)"),
        (((2, 0, 3), (2, 1, 3), (2, 0, 3), (2, 1, 3)), None, "at least one sample"),
        (((2, 2, 3), (2, 1, 3), (2, 2, 3), (2, 1, 3)), ((2, 1), (2, 1)), "target_pos"),
        (((2, 2, 3), (2, 1, 3), (2, 2, 3), (2, 1, 3)), ((2, 2), (2, 2)), "target_neg"),
        (((2, 2, 3), (2, 1, 3), (2, 2, 3), (2, 1, 3)), ((2, 2), None), "both"),
    ],
)
def test_shape_errors(shapes, targets, match):
    tensors = [torch.zeros(s) for s in shapes]
    kwargs = {}
    if targets is not None:
        kwargs["target_pos"] = torch.zeros(targets[0], dtype=torch.long)
        kwargs["target_neg"] = None if targets[1] is None else torch.zeros(targets[1], dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        comparative_kd_loss(*tensors, **kwargs)


def test_variant_and_dtype_errors():
    x = torch.zeros(2, 1, 3)
    with pytest.raises(ValueError, match="unknown variant"):
        comparative_kd_loss(x, x, x, x, variant="l1")
    with pytest.raises(ValueError, match="integer"):
        comparative_kd_loss(x, x, x, x, torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="temperature"):
        comparative_kd_loss(x, x, x, x, variant="kl", temperature=0.0)


def test_in_batch_golden():
    # z_s = [0, 1, 3] (C = 1), z_t = 0: pairs (0,1): (0-1)² = 1, (0,2): 9, (1,2): 4 -> mean 14/3.
    s = torch.tensor([[0.0], [1.0], [3.0]])
    assert in_batch_comparative_loss(s, torch.zeros(3, 1)).item() == pytest.approx(14 / 3, rel=1e-6)


def test_in_batch_matches_pair_loop():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(7, 5, generator=g) + 10.0, torch.randn(7, 5, generator=g)
    pair_losses = [((s[i] - s[j]) - (t[i] - t[j])).pow(2).mean() for i, j in itertools.combinations(range(7), 2)]
    expected = torch.stack(pair_losses).mean()
    assert in_batch_comparative_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_in_batch_gradients_and_errors():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    in_batch_comparative_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="at least 2"):
        in_batch_comparative_loss(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="differ"):
        in_batch_comparative_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        in_batch_comparative_loss(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))


# -- the official ablations: how the two sides are combined (alextxu/ckd ckd / ckd_add / ckd_mixup) --------------
PAIR = dict(  # p = n = 1, C = 2: values small enough to combine by hand
    student_pos=torch.tensor([[[1.0, 2.0]]]), student_neg=torch.tensor([[[3.0, 0.0]]]),
    teacher_pos=torch.tensor([[[0.0, 1.0]]]), teacher_neg=torch.tensor([[[2.0, 2.0]]]),
    target_pos=torch.tensor([[0]]), target_neg=torch.tensor([[1]]),
)


@pytest.mark.parametrize("combine, lam, expected", [
    # difference: Δs = [-2, 2], Δt = [-2, -1], Δy = [1, -1]: rel (0² + 3²)/2 = 4.5, cls (3² + 3²)/2 = 9
    ("difference", None, 4.5 + 9.0),
    # average: s = [2, 1], t = [1, 1.5], y = [.5, .5]: rel (1² + .5²)/2 = .625, cls (1.5² + .5²)/2 = 1.25
    ("average", None, 0.625 + 1.25),
    # mixup λ = .25: s = [2.5, .5], t = [1.5, 1.75], y = [.25, .75]: rel (1 + 1.5625)/2, cls (5.0625 + .0625)/2
    ("mixup", 0.25, 1.28125 + 2.5625),
])
def test_combine_golden_values_mse(combine, lam, expected):
    loss = comparative_kd_loss(**PAIR, combine=combine, lam=lam)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_combine_groups_of_three_and_the_kl_variant_use_the_combined_means():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    y = torch.randint(0, 5, (4, 3), generator=g)
    onehot = torch.nn.functional.one_hot(y, 5).float()
    lam = 0.7
    mix = lambda z: lam * z[:, :2].mean(1) + (1 - lam) * z[:, 2:].mean(1)  # noqa: E731  p = 2, n = 1
    expected = kd_loss(mix(s), mix(t), 4.0) + kd_loss(mix(s), mix(onehot), 4.0)
    got = comparative_kd_loss(s[:, :2], s[:, 2:], t[:, :2], t[:, 2:], y[:, :2], y[:, 2:], variant="kl",
                              combine="mixup", lam=lam)
    assert torch.allclose(got, expected, atol=1e-6)


def test_combine_refuses_a_missing_lambda_and_unknown_modes():
    with pytest.raises(ValueError, match="lam in"):
        comparative_kd_loss(**PAIR, combine="mixup")
    with pytest.raises(ValueError, match="unknown combine"):
        comparative_kd_loss(**PAIR, combine="sum")
