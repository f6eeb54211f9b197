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
    - ``"mixup"`` / ``"cutmix"``: the student sees x' = mix(x_i, x_j) with λ ~ Beta(1, 1); the teacher is not
      run on x', its target is the mix of the cached distributions, q = λ·softmax(z_T,i/T) + (1−λ)·softmax(z_T,j/T):
      L = α·CE(z_S(x'), λ·y_i + (1−λ)·y_j) + (1 − α)·T²·CE_soft(z_S(x')/T, q)  (= KL up to the entropy of q).
    - ``"rkd"`` (Park et al. 2019) / ``"dist"`` (Huang et al. 2022) on logits: L = α·CE(z_S, y) + (1 − α)·R(z_S, z_T).
    """

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 4.0,
        method: Method = "kd",
        mix_alpha: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if method not in ("kd", "mixup", "cutmix", "rkd", "dist"):
            raise ValueError(f"method must be one of kd, mixup, cutmix, rkd, dist; got {method!r}")
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
            p_t = (z_t / h.temperature).softmax(1)
            ce = soft_cross_entropy(logits, mix_targets(onehot, onehot[perm], lam))
            kd = h.temperature**2 * soft_cross_entropy(logits / h.temperature, mix_targets(p_t, p_t[perm], lam))
            loss = h.alpha * ce + (1 - h.alpha) * kd
        else:
            logits = self(x)
            if h.method == "kd":
                loss = hinton_kd_loss(logits, z_t, y, h.alpha, h.temperature)
            else:
                rel = rkd_loss(logits, z_t) if h.method == "rkd" else dist_loss(logits, z_t, temperature=h.temperature)
                loss = h.alpha * F.cross_entropy(logits, y) + (1 - h.alpha) * rel
        self.log_train(loss, logits, y)
        return loss
