"""Distillation from cached teacher outputs: Hinton KD and the few-teacher-inference baselines of CKD (logit-level,
and the white-box ones on cached teacher features)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lightning_kd.losses import (
    cutmix,
    dist_loss,
    hinton_kd_loss,
    kd_loss,
    mix_targets,
    mixup,
    rkd_loss,
    soft_cross_entropy,
)
from lightning_kd.modules.base import StudentModule
from lightning_kd.modules.contrast import ContrastHead
from lightning_kd.modules.features import FEATURE_LOSSES, FeatureDistillationMixin

Method = Literal["kd", "mixup", "cutmix", "rkd", "dist", "crd", "hint", "vid", "cc"]
METHODS = ("kd", "mixup", "cutmix", "rkd", "dist", "crd", *FEATURE_LOSSES)


class KnowledgeDistillation(FeatureDistillationMixin, StudentModule):
    """Distill from ``batch["teacher_logits"]`` (read from the cache: training never calls the teacher).

    ``method``:

    - ``"kd"`` (Hinton et al. 2015): L = α·CE(z_S, y) + (1 − α)·T²·KL(softmax(z_T/T) ‖ softmax(z_S/T)).
    - ``"mixup"`` / ``"cutmix"`` (the CKD paper's baselines): the student sees x' = mix(x_i, x_j), λ ~ Beta(1, 1).
      The teacher is not run on x': its target is the mix of the cached distributions, as in the official code
      (T = 1): L = CE(z_S(x'), λ·y_i + (1−λ)·y_j) + w_rel·CE(z_S(x'), λ·softmax(z_T,i) + (1−λ)·softmax(z_T,j)).
    - ``"rkd"`` (Park et al. 2019) / ``"dist"`` (Huang et al. 2022) on logits: L = CE(z_S, y) + w_rel·R(z_S, z_T).
    - ``"crd"`` (Tian et al. 2020) on logits, as the official CKD baseline: L = CE + T²·KL + w_rel·CRD, with
      :class:`~lightning_kd.modules.contrast.ContrastHead` (embeddings to ``crd_dim``, memory banks over the
      DataModule's selected samples, ``crd_negatives`` other-class negatives, NCE at ``crd_temperature``).
    - ``"hint"`` / ``"vid"`` / ``"cc"`` (the official CKD code's white-box baselines): L = CE + T²·KL + w_feat·F,
      F the FitNet hint, VID or CC loss between the student layers ``student_features`` and the cached teacher
      features of the same names (:class:`~lightning_kd.modules.features.FeatureHead`; ``feature_view``: see
      :class:`~lightning_kd.modules.features.FeatureDistillationMixin`). ``w_feat`` defaults to the official
      weights: 100 (hint), 1 (VID), 0.02 (CC); ``feature_dim``: CC's embedding size.

    ``w_rel`` defaults to the official CKD baselines' weights: 2 for DIST, 0.8 for CRD, 1 otherwise.
    """

    def __init__(
        self,
        method: Method = "kd",
        alpha: float = 0.1,
        temperature: float = 4.0,
        w_rel: float | None = None,
        mix_alpha: float = 1.0,
        crd_dim: int = 128,
        crd_negatives: int = 16384,
        crd_temperature: float = 0.07,
        crd_momentum: float = 0.5,
        student_features: Mapping[str, str] | None = None,
        w_feat: float | None = None,
        feature_dim: int = 128,
        feature_view: Literal["student", "teacher"] = "student",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        self.w_rel = w_rel if w_rel is not None else {"dist": 2.0, "crd": 0.8}.get(method, 1.0)
        self._init_features(method if method in FEATURE_LOSSES else None, student_features, feature_view, w_feat)
        self.contrast: ContrastHead | None = None  # CRD: built in setup(), once the training samples are known
        self._beta = torch.distributions.Beta(mix_alpha, mix_alpha)

    def setup(self, stage: str) -> None:
        """Feature methods: the head; CRD: memory banks over the samples the DataModule selected (known after its
        setup, before training)."""
        super().setup(stage)
        if self.hparams.method != "crd" or self.contrast is not None:
            return
        dm = self.trainer.datamodule if self.trainer is not None else None
        rows = getattr(dm, "selected", getattr(dm, "train_indices", None))
        if rows is None or not hasattr(dm, "targets"):
            raise ValueError("method='crd' keeps a memory bank per training sample: train with a DataModule that has "
                             "`selected` or `train_indices` and `targets(indices)` (e.g. CachedTeacherDataModule)")
        h = self.hparams
        self._crd_index = np.sort(np.asarray(rows, dtype=np.int64))
        self.contrast = ContrastHead(self.num_classes, dm.targets(self._crd_index), h.crd_dim, h.crd_negatives,
                                     h.crd_temperature, h.crd_momentum)

    def _crd_rows(self, index: torch.Tensor) -> torch.Tensor:
        idx = index.cpu().numpy()
        rows = np.searchsorted(self._crd_index, idx).clip(max=len(self._crd_index) - 1)
        if not np.array_equal(self._crd_index[rows], idx):
            raise ValueError("method='crd' has a memory bank for each sample selected at fit start; this batch holds "
                             "others (rounds, several views per sample or another DataModule are not supported)")
        return torch.from_numpy(rows).to(index.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        h = self.hparams
        x, z_t, y = batch["input"], batch["teacher_logits"], batch["target"]
        if h.method in ("mixup", "cutmix"):
            lam = float(self._beta.sample())
            perm = torch.randperm(len(x), device=x.device)
            x, lam = (mixup if h.method == "mixup" else cutmix)(x, lam, perm)
            logits = self(x)
            onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
            p_t = z_t.softmax(1)
            loss = soft_cross_entropy(logits, mix_targets(onehot, onehot[perm], lam)) + self.w_rel * soft_cross_entropy(
                logits, mix_targets(p_t, p_t[perm], lam)
            )
        elif h.method in FEATURE_LOSSES:
            logits, feats = self.student_pass(x, batch)
            feature = self.feature_term(feats, batch["teacher_features"])
            loss = F.cross_entropy(logits, y) + kd_loss(logits, z_t, h.temperature) + self.w_feat * feature
        else:
            logits = self(x)
            if h.method == "kd":
                loss = hinton_kd_loss(logits, z_t, y, h.alpha, h.temperature)
            elif h.method == "crd":
                crd = self.contrast(logits, z_t, self._crd_rows(batch["index"]))
                loss = F.cross_entropy(logits, y) + kd_loss(logits, z_t, h.temperature) + self.w_rel * crd
            else:
                rel = rkd_loss(logits, z_t) if h.method == "rkd" else dist_loss(logits, z_t, temperature=h.temperature)
                loss = F.cross_entropy(logits, y) + self.w_rel * rel
        self.log_train(loss, logits, y)
        return loss
