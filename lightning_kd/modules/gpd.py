"""Gap Preserving Distillation (Guo et al., ICLR 2025, arXiv 2410.04140)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.losses import kd_loss, soft_cross_entropy
from lightning_kd.models import create_model
from lightning_kd.modules.base import StudentModule
from lightning_kd.reparam import DynamicTeacher, expand


def build_dynamic_teacher(
    student: str,
    num_classes: int,
    ratio: float,
    branches: bool,
    noise_std: float,
    model_kwargs: dict[str, Any] | None = None,
    student_weights: str | None = None,
    input_size: tuple[int, int, int] = (3, 32, 32),
) -> DynamicTeacher:
    """The zoo/timm ``student`` (optionally loaded from a state dict: fine-tune mode) widened by IR + CBR."""
    net = create_model(student, num_classes=num_classes, **(model_kwargs or {}))
    if student_weights:
        net.load_state_dict(torch.load(student_weights, map_location="cpu", weights_only=True), strict=True)
    return expand(net, ratio, noise_std=noise_std, branches=branches, example_input=torch.randn(2, *input_size))


class GapPreservingDistillation(StudentModule):
    """A wide dynamic teacher (DT) trained with the student it shares its parameters with (GPD Eq. 8):

        L = [CE(z_DT, y) + KD(z_DT, z_T)] + [CE(z_S, y) + KD(z_S, z_T)] + λ·SCE(z_S, softmax(sg(z_DT)))

    z_T: the static teacher's cached outputs (``batch["teacher_logits"]``, from
    :class:`~lightning_kd.data.CachedTeacherDataModule`, so GPD runs under a teacher budget). Batches without
    them (a plain DataModule) drop both KD terms: training from scratch, or fine-tuning ``student_weights``.
    KD = T²·KL at ``temperature``; SCE = soft cross-entropy with label smoothing ``sce_smoothing`` at T = 1,
    weight λ = ``sce_weight``. Only the DT's parameters exist: the student is a scaled slice of them
    (:func:`~lightning_kd.reparam.expand`), so one optimizer step trains both. ``self(x)`` is the student;
    ``val/acc`` / ``test/acc`` are the student's, ``val/dt_acc`` the DT's. Students: the CNN zoo, timm CNNs and
    timm ViT / PVTv2 models by name, e.g. ``student="vit_tiny_patch16_224"`` with
    ``model_kwargs={"img_size": 32, "patch_size": 4}`` (``experiments/cifar10/gpd_vit.yaml``).
    """

    def __init__(
        self,
        ratio: float = 2.0,
        branches: bool = True,
        noise_std: float = 1e-6,
        sce_weight: float = 3.0,
        sce_smoothing: float = 0.1,
        kd_weight: float = 1.0,
        temperature: float = 4.0,
        student_weights: str | None = None,
        input_size: tuple[int, int, int] = (3, 32, 32),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        h = self.hparams
        del self.student  # the student lives inside the dynamic teacher, as a view of its parameters
        self.dynamic_teacher = build_dynamic_teacher(
            h.student, h.num_classes, ratio, branches, noise_std, h.model_kwargs, student_weights, tuple(input_size)
        )
        self.val_dt_acc = MulticlassAccuracy(h.num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dynamic_teacher.forward_student(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        h = self.hparams
        x, y, z_t = batch["input"], batch["target"], batch.get("teacher_logits")
        z_dt = self.dynamic_teacher(x)
        z_s = self.dynamic_teacher.forward_student(x)
        loss_dt = F.cross_entropy(z_dt, y)
        loss_s = F.cross_entropy(z_s, y)
        if z_t is not None:
            loss_dt = loss_dt + h.kd_weight * kd_loss(z_dt, z_t, h.temperature)
            loss_s = loss_s + h.kd_weight * kd_loss(z_s, z_t, h.temperature)
        loss_sce = soft_cross_entropy(z_s, z_dt.detach().softmax(1), label_smoothing=h.sce_smoothing)
        loss = loss_dt + loss_s + h.sce_weight * loss_sce
        self.log_train(loss, z_s, y, loss_dt=loss_dt, loss_student=loss_s, loss_sce=loss_sce)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.val_dt_acc(self.dynamic_teacher(batch["input"]), batch["target"])
        self.log("val/dt_acc", self.val_dt_acc, prog_bar=True)
