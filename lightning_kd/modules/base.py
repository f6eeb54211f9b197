"""Plumbing shared by every LightningModule here: the student network, accuracy metrics, evaluation steps and
optimizers, so that each subclass's ``training_step`` is only its paper's loss."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.models import create_model


class StudentModule(L.LightningModule):
    """A student network (zoo or timm name) evaluated by cross-entropy and top-1 accuracy.

    Logs ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``; subclasses log ``train/*``. Optimizer: SGD
    (momentum, optional Nesterov) or AdamW; schedule: cosine over the run, one-cycle, step decay at
    ``milestones`` (fractions of the run), LR x0.1 on a ``val/acc`` plateau (at most ``max_lr_drops`` times, as
    in the CKD protocol), or constant.

    ``channels_last`` stores the student's convolution weights (and its 4-D inputs) channels-last (NHWC): the same
    function up to float rounding, and faster convolutions where the backend prefers that layout (oneDNN on CPU:
    a ResNet-8 training step takes ~0.7x the time on 2 cores; cuDNN with bf16 on GPUs).
    """

    def __init__(
        self,
        student: str = "resnet8",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        scheduler: Literal["cosine", "onecycle", "step", "plateau", "constant"] = "cosine",
        milestones: tuple[float, ...] = (0.5, 0.75),
        plateau_patience: int = 5,
        max_lr_drops: int = 3,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # also records the calling subclass's own arguments
        self.student = create_model(student, num_classes=num_classes, **(model_kwargs or {}))
        if channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._train_acc_logged: int | None = None  # the epoch whose first step handed train_acc to self.log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.student(x)

    def log_train(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, **terms: torch.Tensor) -> None:
        """Log the training loss and its named terms (every step) and top-1 accuracy (over the epoch).

        The step's cost is kept to what the logs need: the accuracy metric is only updated (its per-batch value is
        never logged), and the metric object is handed to ``self.log`` once per epoch, on the epoch's first step
        (Lightning keeps the object, computes it at the epoch's end and resets it, exactly as when it is passed
        every step; each ``self.log`` call costs about 1 ms of Lightning bookkeeping on CPU). ``train/loss`` goes
        to the progress bar when the Trainer has one: that conversion is a ``.item()``, a device sync every step.
        """
        self.train_acc.update(logits.detach(), target)
        self.log("train/loss", loss, prog_bar=self._has_progress_bar())
        if self._train_acc_logged != self.current_epoch:
            self._train_acc_logged = self.current_epoch
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value)

    def on_train_epoch_start(self) -> None:
        """Let :meth:`log_train` log ``train/acc`` again (also when a new fit starts at an epoch already seen)."""
        self._train_acc_logged = None

    def _has_progress_bar(self) -> bool:
        trainer = self._trainer
        return trainer is None or trainer.progress_bar_callback is not None

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        logits = self(batch["input"])
        metric.update(logits, batch["target"])  # logged on the epoch: the per-batch value would go unused
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["target"]), prog_bar=stage == "val")
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["input"])

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if h.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=h.lr, momentum=h.momentum, nesterov=h.nesterov, weight_decay=h.weight_decay
            )
        elif h.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
        else:
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {h.optimizer!r}")
        total = self.trainer.estimated_stepping_batches
        if h.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(total), 1))
        elif h.scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=h.lr, total_steps=max(int(total), 1))
        elif h.scheduler == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(m * total) for m in h.milestones], gamma=0.1)
        elif h.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max", factor=0.1, patience=h.plateau_patience, min_lr=h.lr * 0.1**h.max_lr_drops
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/acc", "interval": "epoch"}}
        elif h.scheduler == "constant":
            return {"optimizer": opt}
        else:
            raise ValueError(f"unknown scheduler {h.scheduler!r}")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
