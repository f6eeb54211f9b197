"""Distillation from cached teacher outputs: Hinton KD and the few-teacher-inference baselines of CKD."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lightning_kd.losses import cutmix, dist_loss, hinton_kd_loss, mix_targets, mixup, rkd_loss, soft_cross_entropy
from lightning_kd.modules.base import StudentModule

Method = Literal["kd", "mixup", "cutmix", "rkd", "dist"]


class KnowledgeDistillation(StudentModule):
    """Distill from ``batch["teacher_logits"]`` (read from the cache: training never calls the teacher).

    ``method``:

    - ``"kd"`` (Hinton et al. 2015): L = α·CE(z_S, y) + (1 − α)·T²·KL(softmax(z_T/T) ‖ softmax(z_S/T)).
    - ``"mixup"`` / ``"cutmix"`` (the CKD paper's baselines): the student sees x' = mix(x_i, x_j), λ ~ Beta(1, 1).
      The teacher is not run on x': its target is the mix of the cached distributions, as in the official code
      (T = 1): L = CE(z_S(x'), λ·y_i + (1−λ)·y_j) + w_rel·CE(z_S(x'), λ·softmax(z_T,i) + (1−λ)·softmax(z_T,j)).
    - ``"rkd"`` (Park et al. 2019) / ``"dist"`` (Huang et al. 2022) on logits: L = CE(z_S, y) + w_rel·R(z_S, z_T).

    ``w_rel`` defaults to the official CKD baselines' weights: 2 for DIST, 1 otherwise.
    """

    def __init__(
        self,
        method: Method = "kd",
        alpha: float = 0.1,
        temperature: float = 4.0,
        w_rel: float | None = None,
        mix_alpha: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if method not in ("kd", "mixup", "cutmix", "rkd", "dist"):
            raise ValueError(f"method must be one of kd, mixup, cutmix, rkd, dist; got {method!r}")
        self.w_rel = w_rel if w_rel is not None else (2.0 if method == "dist" else 1.0)
        self._beta = torch.distributions.Beta(mix_alpha, mix_alpha)

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
        else:
            logits = self(x)
            if h.method == "kd":
                loss = hinton_kd_loss(logits, z_t, y, h.alpha, h.temperature)
            else:
                rel = rkd_loss(logits, z_t) if h.method == "rkd" else dist_loss(logits, z_t, temperature=h.temperature)
                loss = F.cross_entropy(logits, y) + self.w_rel * rel
        self.log_train(loss, logits, y)
        return loss
