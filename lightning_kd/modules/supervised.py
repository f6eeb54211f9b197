"""Cross-entropy training with no teacher: the no-teacher baseline, and the way to train a teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.modules.base import StudentModule


class Supervised(StudentModule):
    """L = CE(z_S, y), optionally with label smoothing. Takes every :class:`StudentModule` argument."""

    def __init__(self, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input"])
        loss = F.cross_entropy(logits, batch["target"], label_smoothing=self.hparams.label_smoothing)
        self.log_train(loss, logits, batch["target"])
        return loss
