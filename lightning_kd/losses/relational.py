"""Relational distillation losses on logits: RKD and DIST, the relational baselines of the CKD paper.

Teacher outputs are detached; inputs are (B, C) logits (RKD also accepts (B, ...) and flattens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, min_batch: int) -> None:
    if student.dim() < 2:
        raise ValueError(f"student must be (B, C, ...), got shape {tuple(student.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape")
    if student.shape[0] < min_batch:
        raise ValueError(f"need a batch of at least {min_batch}, got B={student.shape[0]}")


def _normalized_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise Euclidean distances (B, B), zero diagonal, over their off-diagonal mean (RKD distance potential)."""
    sq = x.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * x @ x.t()).clamp_min(eps).sqrt()
    off_diag = 1.0 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    d = d * off_diag
    return d / (d.sum() / off_diag.sum())


def _angles(x: torch.Tensor) -> torch.Tensor:
    """cos ∠(x_j − x_i, x_k − x_i) for all (i, j, k), as a (B, B, B) tensor (RKD angle potential)."""
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return diff @ diff.transpose(1, 2)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> torch.Tensor:
    """RKD (Park et al., CVPR 2019): ``w_dist · L_D + w_angle · L_A``, distance-wise + angle-wise Huber losses.

    L_D compares mean-normalized pairwise distances, L_A the cosines of all triplet angles; the Huber penalty is
    smooth-L1 with δ = 1, averaged over all (B×B resp. B×B×B) entries, diagonal included, as in RepDistiller's
    ``RKDLoss`` (weights 25 / 50), which the CKD code uses on logits.
    """
    _check_pair(student, teacher, min_batch=2)
    s = student.reshape(student.shape[0], -1)
    t = teacher.detach().reshape(teacher.shape[0], -1)
    loss_d = F.smooth_l1_loss(_normalized_distances(s), _normalized_distances(t))
    loss_a = F.smooth_l1_loss(_angles(s), _angles(t))
    return w_dist * loss_d + w_angle * loss_a


def _mean_pearson(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over rows of the Pearson correlation of rows of ``a`` and ``b`` (eps-guarded cosine of centred rows)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 4.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): ``τ² · (β · (1 − ρ̄_inter) + γ · (1 − ρ̄_intra))``.

    With Y = softmax(z/τ) (B, C): ρ̄_inter is the mean Pearson correlation between student and teacher rows
    (each sample's class distribution), ρ̄_intra that between columns (each class over the batch). β = γ = 1 as in
    the paper. τ defaults to 4, the CIFAR-100 value used by the CKD baseline (``distiller_zoo/DIST.py``); the
    official DIST code's default (ImageNet) is τ = 1.
    """
    _check_pair(student_logits, teacher_logits, min_batch=2)
    if student_logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    y_s = (student_logits / temperature).softmax(dim=1)
    y_t = (teacher_logits.detach() / temperature).softmax(dim=1)
    inter = 1.0 - _mean_pearson(y_s, y_t, eps)
    intra = 1.0 - _mean_pearson(y_s.t(), y_t.t(), eps)
    return temperature**2 * (beta * inter + gamma * intra)
