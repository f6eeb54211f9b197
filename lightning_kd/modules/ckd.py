"""Comparative Knowledge Distillation (Wilf et al., arXiv 2311.02253; WACV 2025)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lightning_kd.losses.comparative import in_batch_comparative_loss, tuple_comparative_loss
from lightning_kd.modules.base import StudentModule


class ComparativeDistillation(StudentModule):
    """The student learns from differences between the cached teacher outputs of samples in a group.

    ``pairing="tuples"`` (the official method): batches of pre-sampled tuples (B, k, ...) from
    :class:`~lightning_kd.data.CachedTeacherDataModule` with ``group_size = k``; the first p = k − ⌊k/2⌋
    members are the positive side, the rest the negative side, and

        L = w_rel · D(Δz_S, Δz_T) + w_cls · D(Δz_S, Δy),   Δz = mean_P z − mean_N z   (CKD Eq. 3–5)

    with D = MSE (``variant="mse"``, WACV release) or T²·KL (``"kl"``, arXiv release). ``combine`` runs the
    official ablations: ``"average"`` (½a + ½b, ``ckd_add``) or ``"mixup"`` (λa + (1 − λ)b, λ ~ Beta(1, 1) drawn
    once per batch, ``ckd_mixup``) in place of the difference a − b. ``pairing="in_batch"``
    compares all pairs i < j of a plain batch (``group_size = 1``) with D = MSE: cheaper, not the paper's
    sampling. Every member is freshly augmented; the teacher is never called.
    """

    def __init__(
        self,
        variant: Literal["mse", "kl"] = "mse",
        temperature: float = 4.0,
        w_rel: float = 1.0,
        w_cls: float = 1.0,
        pairing: Literal["tuples", "in_batch"] = "tuples",
        combine: Literal["difference", "average", "mixup"] = "difference",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if pairing not in ("tuples", "in_batch"):
            raise ValueError(f"pairing must be 'tuples' or 'in_batch', got {pairing!r}")
        if combine not in ("difference", "average", "mixup"):
            raise ValueError(f"combine must be 'difference', 'average' or 'mixup', got {combine!r}")
        if pairing == "in_batch" and combine != "difference":
            raise ValueError("pairing='in_batch' compares differences of pairs: it needs combine='difference'")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        h = self.hparams
        x, z_t, y = batch["input"], batch["teacher_logits"], batch["target"]
        if h.pairing == "in_batch":
            if x.ndim != 4:
                raise ValueError(
                    f"pairing='in_batch' needs plain batches (B, C, H, W); got {tuple(x.shape)}: set group_size: 1"
                )
            z_s = self(x)
            onehot = F.one_hot(y, z_s.shape[1]).to(z_s.dtype)
            loss = h.w_rel * in_batch_comparative_loss(z_s, z_t) + h.w_cls * in_batch_comparative_loss(z_s, onehot)
            self.log_train(loss, z_s, y)
            return loss
        if x.ndim != 5 or x.shape[1] < 2:
            raise ValueError(
                f"pairing='tuples' needs tuple batches (B, k, C, H, W) with k >= 2; got {tuple(x.shape)}: "
                "set group_size: 2 or 3 in CachedTeacherDataModule"
            )
        b, k = x.shape[:2]
        z_s = self(x.flatten(0, 1)).view(b, k, -1)
        loss = tuple_comparative_loss(  # members [:p] positive, [p:] negative, p = k - k // 2
            z_s,
            z_t,
            y,
            variant=h.variant,
            temperature=h.temperature,
            w_rel=h.w_rel,
            w_cls=h.w_cls,
            combine=h.combine,
            lam=float(torch.rand(())) if h.combine == "mixup" else None,  # Beta(1, 1) is uniform on [0, 1]
        )
        self.log_train(loss, z_s.flatten(0, 1), y.flatten())
        return loss
