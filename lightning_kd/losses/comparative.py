"""Comparative Knowledge Distillation losses (Wilf et al., "Comparative Knowledge Distillation",
arXiv 2311.02253 / WACV 2025).

CKD distils the *difference* between a group of positive samples and a group of negative samples: with
Δz = mean_P z − mean_N z, the student's Δz_S is matched to the teacher's Δz_T (relational term) and to the
difference of the groups' averaged one-hot labels Δy (label term). Teacher logits are detached.

The official code's ablations change only how the two sides are combined (``combine``), alike for student
logits, teacher logits and labels: ``"difference"`` a − b (CKD), ``"average"`` ½a + ½b (``ckd_add``),
``"mixup"`` λa + (1 − λ)b with one λ ~ Beta(1, 1) per batch (``ckd_mixup``; outputs are mixed, inputs never).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lightning_kd.losses.kd import kd_loss

Variant = Literal["mse", "kl"]
Combine = Literal["difference", "average", "mixup"]


def combine_sides(
    a: torch.Tensor, b: torch.Tensor, combine: Combine = "difference", lam: float | None = None
) -> torch.Tensor:
    """Combine the positive-side mean ``a`` and the negative-side mean ``b`` (see the module docstring)."""
    if combine == "difference":
        return a - b
    if combine == "average":
        return 0.5 * a + 0.5 * b
    if combine == "mixup":
        if lam is None or not 0.0 <= lam <= 1.0:
            raise ValueError(f"combine='mixup' needs lam in [0, 1] (one draw of Beta(1, 1) per batch), got {lam!r}")
        return lam * a + (1.0 - lam) * b
    raise ValueError(f"unknown combine {combine!r}; expected 'difference', 'average' or 'mixup'")


def compare_sides(x: torch.Tensor, combine: Combine = "difference", lam: float | None = None) -> torch.Tensor:
    """Tuples (B, k, ...) -> (B, ...): the positive side's mean (members ``[:p]``, p = k − ⌊k/2⌋) combined with the
    negative side's (``[p:]``) by :func:`combine_sides` — how CKD compares features (official ``avg_feat_dif``)."""
    if x.dim() < 2 or x.shape[1] < 2:
        raise ValueError(f"compare_sides needs tuples (B, k, ...) with k >= 2, got shape {tuple(x.shape)}")
    p = x.shape[1] - x.shape[1] // 2
    return combine_sides(x[:, :p].mean(dim=1), x[:, p:].mean(dim=1), combine, lam)


def _group_label_mean(target: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Mean one-hot of each row of ``target`` (B, k) -> (B, C): class c gets (#members of class c) / k."""
    out = torch.zeros(target.shape[0], num_classes, dtype=dtype, device=target.device)
    weights = torch.full(target.shape, 1.0 / target.shape[1], dtype=dtype, device=target.device)
    return out.scatter_add_(1, target.long(), weights)


def _check_groups(
    student_pos: torch.Tensor,
    student_neg: torch.Tensor,
    teacher_pos: torch.Tensor,
    teacher_neg: torch.Tensor,
    target_pos: torch.Tensor | None,
    target_neg: torch.Tensor | None,
) -> None:
    named = {
        "student_pos": student_pos,
        "student_neg": student_neg,
        "teacher_pos": teacher_pos,
        "teacher_neg": teacher_neg,
    }
    for name, t in named.items():
        if t.dim() != 3:
            raise ValueError(f"{name} must be (B, group, C), got shape {tuple(t.shape)}")
    if student_pos.shape != teacher_pos.shape:
        raise ValueError(f"student_pos {tuple(student_pos.shape)} and teacher_pos {tuple(teacher_pos.shape)} differ")
    if student_neg.shape != teacher_neg.shape:
        raise ValueError(f"student_neg {tuple(student_neg.shape)} and teacher_neg {tuple(teacher_neg.shape)} differ")
    if student_pos.shape[0] != student_neg.shape[0]:
        raise ValueError(f"batch sizes differ: pos has B={student_pos.shape[0]}, neg has B={student_neg.shape[0]}")
    if student_pos.shape[2] != student_neg.shape[2]:
        raise ValueError(f"class counts differ: pos has C={student_pos.shape[2]}, neg has C={student_neg.shape[2]}")
    if student_pos.shape[1] == 0 or student_neg.shape[1] == 0:
        raise ValueError("each group needs at least one sample (p >= 1 and n >= 1)")
    if (target_pos is None) != (target_neg is None):
        raise ValueError("give both target_pos and target_neg, or neither")
    if target_pos is not None and target_neg is not None:
        if target_pos.shape != student_pos.shape[:2]:
            raise ValueError(
                f"target_pos must be (B, p) = {tuple(student_pos.shape[:2])}, got {tuple(target_pos.shape)}"
            )
        if target_neg.shape != student_neg.shape[:2]:
            raise ValueError(
                f"target_neg must be (B, n) = {tuple(student_neg.shape[:2])}, got {tuple(target_neg.shape)}"
            )
        if target_pos.dtype.is_floating_point or target_neg.dtype.is_floating_point:
            raise ValueError("targets must be integer class ids")


def comparative_kd_loss(
    student_pos: torch.Tensor,
    student_neg: torch.Tensor,
    teacher_pos: torch.Tensor,
    teacher_neg: torch.Tensor,
    target_pos: torch.Tensor | None = None,
    target_neg: torch.Tensor | None = None,
    variant: Variant = "mse",
    temperature: float = 4.0,
    w_rel: float = 1.0,
    w_cls: float = 1.0,
    combine: Combine = "difference",
    lam: float | None = None,
) -> torch.Tensor:
    """CKD loss ``w_rel · D(Δz_S, Δz_T) + w_cls · D(Δz_S, Δy)`` for groups of p positives and n negatives.

    Logits are (B, p, C) and (B, n, C); targets (B, p) / (B, n) integer class ids, or both None to drop the label
    term. ``variant`` selects D as in the two official releases (alextxu/ckd ``train_student.py``):

    * ``"mse"`` (WACV 2025 release): ``nn.MSELoss()``, the mean over B × C.
    * ``"kl"`` (arXiv release): ``DistillKL(T)``, i.e. :func:`kd_loss` = T² · KL(softmax(a/T) ‖ softmax(Δz_S/T))
      with batchmean reduction; for the label term Δy is used as if it were logits (a = Δy).

    ``combine`` / ``lam``: how Δ is formed from the two sides' means (:func:`combine_sides`).
    """
    _check_groups(student_pos, student_neg, teacher_pos, teacher_neg, target_pos, target_neg)
    if variant not in ("mse", "kl"):
        raise ValueError(f"unknown variant {variant!r}; expected 'mse' or 'kl'")
    if variant == "kl" and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dz_s = combine_sides(student_pos.mean(dim=1), student_neg.mean(dim=1), combine, lam)
    dz_t = combine_sides(teacher_pos.mean(dim=1), teacher_neg.mean(dim=1), combine, lam).detach()

    def distance(target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(dz_s, target) if variant == "mse" else kd_loss(dz_s, target, temperature)

    loss = w_rel * distance(dz_t)
    if target_pos is not None and target_neg is not None:
        num_classes, dtype = dz_s.shape[1], dz_s.dtype
        y_pos = _group_label_mean(target_pos, num_classes, dtype)
        dy = combine_sides(y_pos, _group_label_mean(target_neg, num_classes, dtype), combine, lam)
        loss = loss + w_cls * distance(dy)
    return loss


def tuple_comparative_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None = None,
    variant: Variant = "mse",
    temperature: float = 4.0,
    w_rel: float = 1.0,
    w_cls: float = 1.0,
    combine: Combine = "difference",
    lam: float | None = None,
) -> torch.Tensor:
    """:func:`comparative_kd_loss` on CKD tuples: logits (B, k, C), targets (B, k) or None.

    Members ``[:p]`` are the positive side and ``[p:]`` the negative side, p = k − ⌊k/2⌋ (the split of
    :func:`lightning_kd.data.tuples.split_sides` and of the official ``train_student.py``).
    """
    if student.dim() != 3 or student.shape[1] < 2:
        raise ValueError(f"student logits must be tuples (B, k, C) with k >= 2, got shape {tuple(student.shape)}")
    p = student.shape[1] - student.shape[1] // 2
    pos, neg = (None, None) if target is None else (target[:, :p], target[:, p:])
    return comparative_kd_loss(
        student[:, :p], student[:, p:], teacher[:, :p], teacher[:, p:], pos, neg,
        variant=variant, temperature=temperature, w_rel=w_rel, w_cls=w_cls, combine=combine, lam=lam,
    )  # fmt: skip


def in_batch_comparative_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over all pairs i < j and classes of ((z_s[i] − z_s[j]) − (z_t[i] − z_t[j]))².

    Pairwise CKD (p = n = 1, MSE relational term) over every pair inside a batch, without a tuple sampler.
    Computed in O(B·C) with e = z_s − z_t: Σ_{i<j} ‖e_i − e_j‖² = B · Σ_i ‖e_i − ē‖², so the loss is
    2 · (unbiased per-class variance of e over the batch), averaged over classes.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (B, C), got shape {tuple(student_logits.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} differ"
        )
    if student_logits.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to form a pair, got B={student_logits.shape[0]}")
    e = student_logits - teacher_logits.detach()
    return 2.0 * e.var(dim=0, correction=1).mean()
