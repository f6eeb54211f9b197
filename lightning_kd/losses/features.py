"""Feature distillation losses, as in the CKD paper's white-box baselines (alextxu/ckd ``distiller_zoo``).

The trainable parts (FitNet's connector, VID's regressor and variances, CC's embeddings) live in
:class:`lightning_kd.modules.features.FeatureHead`; these functions take their outputs. Teacher features are
constants (cached), so the teacher side is detached where it is not the output of a trainable embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hint_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al. 2015), ``HintLoss``: MSE between the connected student feature and the teacher's."""
    if student.shape != teacher.shape:
        raise ValueError(f"hint: the connected student feature {tuple(student.shape)} and the teacher feature "
                         f"{tuple(teacher.shape)} differ in shape")
    return F.mse_loss(student, teacher.detach())


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two (B, C, H, W) maps to the other's H x W (``VIDLoss``'s size match)."""
    (hs, ws), (ht, wt) = student.shape[2:], teacher.shape[2:]
    if (hs, ws) == (ht, wt):
        return student, teacher
    if hs >= ht and ws >= wt:
        return F.adaptive_avg_pool2d(student, (ht, wt)), teacher
    if hs <= ht and ws <= wt:
        return student, F.adaptive_avg_pool2d(teacher, (hs, ws))
    raise ValueError(f"cannot pool maps of {hs}x{ws} and {ht}x{wt} to one size")


def vid_variance(log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """VID's per-channel variance: softplus(log_scale) + eps."""
    return F.softplus(log_scale) + eps


def vid_loss(mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """VID (Ahn et al. 2019), ``VIDLoss``: the Gaussian negative log-likelihood (without its constant) of the teacher
    feature ``target`` (B, C, H, W) under mean ``mean`` (the regressed student feature) and per-channel variance
    σ² = :func:`vid_variance` (``log_scale``: (C,)): mean over all entries of ½((μ − t)² / σ² + log σ²)."""
    if mean.shape != target.shape or log_scale.shape != mean.shape[1:2]:
        raise ValueError(f"vid: mean {tuple(mean.shape)}, target {tuple(target.shape)} and log_scale "
                         f"{tuple(log_scale.shape)} (one per channel) do not match")
    var = vid_variance(log_scale, eps).view(1, -1, *([1] * (mean.dim() - 2)))
    return (0.5 * ((mean - target.detach()) ** 2 / var + torch.log(var))).mean()


def cc_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """CC (Peng et al. 2019) as in the official code's ``Correlation``: with Δ = |e_S − e_T| (embeddings, (B, d)),
    the mean over consecutive samples i of Σ_d Δ_i · Δ_{i+1}."""
    if student.dim() != 2 or student.shape != teacher.shape or len(student) < 2:
        raise ValueError(f"cc: needs two (B, d) embeddings with B >= 2, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    delta = (student - teacher).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()
