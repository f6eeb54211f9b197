"""Knowledge distillation from cached teacher outputs (Hinton et al. 2015)."""

from __future__ import annotations

import torch

from lightning_kd.losses import hinton_kd_loss
from lightning_kd.modules.base import StudentModule


class KnowledgeDistillation(StudentModule):
    """L = alpha·CE(z_S, y) + (1 − alpha)·T²·KL(softmax(z_T/T) ‖ softmax(z_S/T)).

    z_T is ``batch["teacher_logits"]``, read from the cache: training never calls the teacher.
    Takes every :class:`StudentModule` argument.
    """

    def __init__(self, alpha: float = 0.1, temperature: float = 4.0, **kwargs) -> None:
        super().__init__(**kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input"])
        loss = hinton_kd_loss(logits, batch["teacher_logits"], batch["target"], self.hparams.alpha, self.hparams.temperature)
        self.log_train(loss, logits, batch["target"])
        return loss
