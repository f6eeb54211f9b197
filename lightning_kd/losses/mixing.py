"""Mixup and CutMix as pure tensor functions (the data-augmentation baselines of the CKD paper).

Callers draw λ ~ Beta(1, 1) and the pairing permutation; these functions only mix. Inputs are not modified.
"""

from __future__ import annotations

import torch


def _check_mix_args(x: torch.Tensor, lam: float, perm: torch.Tensor) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if perm.dim() != 1 or perm.shape[0] != x.shape[0]:
        raise ValueError(f"perm must be a 1-D index of length B={x.shape[0]}, got shape {tuple(perm.shape)}")
    if perm.dtype.is_floating_point:
        raise ValueError("perm must be an integer tensor")


def mixup(x: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``λ · x + (1 − λ) · x[perm]`` (Zhang et al., mixup, ICLR 2018); returns the mixed batch and λ."""
    _check_mix_args(x, lam, perm)
    return lam * x + (1.0 - lam) * x[perm], lam


def cutmix(
    x: torch.Tensor, lam: float, perm: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """Paste one random box of ``x[perm]`` into ``x`` (Yun et al. 2019, CutMix); returns (mixed, λ_adjusted).

    Box as in the official CutMix code (also used by CKD's ``CutMixHelpers``): side ``int(S · √(1 − λ))`` per
    spatial dim S, centre uniform over the image (drawn with ``generator``), clipped at the borders, one box
    for the whole batch. λ_adjusted = 1 − box area / (H · W) is the exact fraction of pixels kept from ``x``.
    ``x``: (B, ..., H, W).
    """
    if x.dim() < 3:
        raise ValueError(f"x must be (B, ..., H, W), got shape {tuple(x.shape)}")
    _check_mix_args(x, lam, perm)
    h, w = x.shape[-2], x.shape[-1]
    cut_ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(h * cut_ratio), int(w * cut_ratio)
    cy = int(torch.randint(h, (1,), generator=generator).item())
    cx = int(torch.randint(w, (1,), generator=generator).item())
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[..., y1:y2, x1:x2] = x[perm][..., y1:y2, x1:x2]
    return mixed, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)


def mix_targets(probs_a: torch.Tensor, probs_b: torch.Tensor, lam: float) -> torch.Tensor:
    """``λ · q_a + (1 − λ) · q_b`` for one-hot labels or teacher probabilities of the two mixed inputs.

    Cross-entropy is linear in the target, so ``soft_cross_entropy(z, mix_targets(q_a, q_b, λ))`` equals CKD's
    mixup / cutmix baseline loss ``λ · CE(z, q_a) + (1 − λ) · CE(z, q_b)``.
    """
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"probs_a {tuple(probs_a.shape)} and probs_b {tuple(probs_b.shape)} must have the same shape")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam * probs_a + (1.0 - lam) * probs_b
