"""Comparative Knowledge Distillation (Wilf et al., arXiv 2311.02253; WACV 2025)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_kd.losses.comparative import compare_sides, in_batch_comparative_loss, tuple_comparative_loss
from lightning_kd.modules.base import StudentModule
from lightning_kd.modules.features import FEATURE_WEIGHTS, FeatureDistillationMixin, FeatureLoss


class ComparativeDistillation(FeatureDistillationMixin, StudentModule):
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

    ``feature_loss`` (the official ``ckd_inter``): adds w_feat · F(Δf_S, Δf_T), the FitNet hint, VID or CC loss
    (:class:`~lightning_kd.modules.features.FeatureHead`) between the combined sides of the student layers
    ``student_features`` and of the cached teacher features of the same names (Δf = mean_P f − mean_N f, or as
    ``combine`` says). ``w_feat`` defaults to the official weights: 100 (hint), 1 (VID), 0.02 (CC);
    ``feature_view``: see :class:`~lightning_kd.modules.features.FeatureDistillationMixin`.
    """

    def __init__(
        self,
        variant: Literal["mse", "kl"] = "mse",
        temperature: float = 4.0,
        w_rel: float = 1.0,
        w_cls: float = 1.0,
        pairing: Literal["tuples", "in_batch"] = "tuples",
        combine: Literal["difference", "average", "mixup"] = "difference",
        feature_loss: FeatureLoss | None = None,
        student_features: Mapping[str, str] | None = None,
        w_feat: float | None = None,
        feature_dim: int = 128,
        feature_view: Literal["student", "teacher"] = "student",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if feature_loss is not None and feature_loss not in FEATURE_WEIGHTS:
            raise ValueError(f"feature_loss must be one of {', '.join(FEATURE_WEIGHTS)} or None; got {feature_loss!r}")
        if feature_loss is not None and pairing != "tuples":
            raise ValueError("feature_loss compares the sides of CKD tuples: it needs pairing='tuples'")
        self._init_features(feature_loss, student_features, feature_view, w_feat)
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
        lam = float(torch.rand(())) if h.combine == "mixup" else None  # Beta(1, 1) is uniform on [0, 1]
        if h.feature_loss is None:
            z_s = self(x.flatten(0, 1)).view(b, k, -1)
        else:
            z_s, feats = self.student_pass(x.flatten(0, 1), batch)
            z_s = z_s.view(b, k, -1)
        loss = tuple_comparative_loss(  # members [:p] positive, [p:] negative, p = k - k // 2
            z_s,
            z_t,
            y,
            variant=h.variant,
            temperature=h.temperature,
            w_rel=h.w_rel,
            w_cls=h.w_cls,
            combine=h.combine,
            lam=lam,
        )
        if h.feature_loss is not None:
            student = {n: compare_sides(f.view(b, k, *f.shape[1:]), h.combine, lam) for n, f in feats.items()}
            teacher = {n: compare_sides(batch["teacher_features"][n], h.combine, lam) for n in student}
            loss = loss + self.w_feat * self.feature_term(student, teacher)
        self.log_train(loss, z_s.flatten(0, 1), y.flatten())
        return loss
