"""Logit distillation losses: Hinton KD and soft-target cross-entropy.

All functions take logits of shape (B, C), return a scalar averaged over the batch, and treat teacher
outputs as constants (they are detached here, so a caller that forgets ``no_grad`` cannot train the teacher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.dim() != 2:
        raise ValueError(f"{name_a} must be (B, C), got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), summed over classes and averaged over the batch.

    Hinton et al. 2015, §2, with the T² gradient-scale correction; the reduction is ``batchmean``, i.e.
    ``sum / B``, as RepDistiller's ``DistillKL`` (used unchanged by the CKD code). For soft targets that are
    already probabilities (mixup / cutmix teacher targets, GPD) use :func:`soft_cross_entropy`.
    """
    _check_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    _check_temperature(temperature)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def hinton_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.1,
    temperature: float = 4.0,
) -> torch.Tensor:
    """``alpha · CE(z_s, y) + (1 − alpha) · T² · KL`` (Hinton et al. 2015, §2).

    ``alpha`` is the weight of the hard-label cross-entropy; the default 0.1 (KD weight 0.9) is the CIFAR
    recipe of RepDistiller (``-r 0.1 -a 0.9``). ``target``: int64 class ids (B,).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if target.shape != student_logits.shape[:1]:
        raise ValueError(f"target must be (B,) = {tuple(student_logits.shape[:1])}, got {tuple(target.shape)}")
    kd = kd_loss(student_logits, teacher_logits, temperature)
    return alpha * F.cross_entropy(student_logits, target) + (1.0 - alpha) * kd


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """−Σ_c q'_c · log softmax(z)_c averaged over the batch, with q' = (1 − ε)·q + ε/C.

    This is GPD's ``sce`` distillation term (``LabelSmoothingCrossEntropy`` in GPD ``CNN/gpd_utils.py``:
    ``(1−ε)·(−Σ q log p) + ε·mean_c(−log p)``, equal to the smoothed-target form above; GPD uses ε = 0.1,
    q = softmax of the detached wide model's logits at T = 1, weight λ = 3). With ε = 0 it is the
    soft-target CE that CKD's mixup / cutmix baselines apply to softmaxed teacher logits.
    """
    _check_pair(logits, soft_targets, "logits", "soft_targets")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    q = soft_targets.detach()
    if label_smoothing > 0:
        q = (1.0 - label_smoothing) * q + label_smoothing / logits.shape[1]
    return -(q * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
