"""Gap Preserving Distillation (Guo et al., ICLR 2025, arXiv 2410.04140)."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.losses import kd_loss, soft_cross_entropy
from lightning_kd.losses.comparative import tuple_comparative_loss
from lightning_kd.models import create_model
from lightning_kd.modules.base import StudentModule
from lightning_kd.reparam import DynamicTeacher, expand


def build_dynamic_teacher(
    student: str | torch.nn.Module,
    num_classes: int,
    ratio: float,
    branches: bool,
    noise_std: float,
    model_kwargs: dict[str, Any] | None = None,
    student_weights: str | None = None,
    input_size: tuple[int, int, int] = (3, 32, 32),
) -> DynamicTeacher:
    """The zoo/timm ``student`` (a name, or a model built from it; optionally loaded from a state dict: fine-tune
    mode) widened by IR + CBR."""
    net = student if isinstance(student, torch.nn.Module) else create_model(student, num_classes=num_classes,
                                                                           **(model_kwargs or {}))
    if student_weights:
        net.load_state_dict(torch.load(student_weights, map_location="cpu", weights_only=True), strict=True)
    return expand(net, ratio, noise_std=noise_std, branches=branches, example_input=torch.randn(2, *input_size))


class GapPreservingDistillation(StudentModule):
    """A wide dynamic teacher (DT) trained with the student it shares its parameters with (GPD Eq. 8):

        L = [CE(z_DT, y) + w·D(z_DT, z_T)] + [CE(z_S, y) + w·D(z_S, z_T)] + λ·SCE(z_S, softmax(sg(z_DT)))

    z_T: the static teacher's cached outputs (``batch["teacher_logits"]``, from
    :class:`~lightning_kd.data.CachedTeacherDataModule`, so GPD runs under a teacher budget). D is how the DT
    and the student learn from the static teacher, chosen by ``distill``:

    * ``"kd"`` (the paper): D = KD = T²·KL at ``temperature``, per sample. Batches without teacher outputs (a
      plain DataModule) drop both D terms: training from scratch, or fine-tuning ``student_weights``; so does
      ``kd_weight=0`` on batches that carry them (from scratch on a budget's samples: the outputs are not read).
    * ``"ckd"``: D = the CKD loss of :class:`~lightning_kd.modules.ComparativeDistillation` (Wilf et al.,
      arXiv 2311.02253), ``w_rel·D'(Δz, Δz_T) + w_cls·D'(Δz, Δy)`` on differences Δ = mean_P − mean_N of
      tuples (``ckd_variant``: D' = MSE or T²·KL; ``combine``: the difference or an ablation). Batches are
      tuples (B, k, ...) from ``CachedTeacherDataModule(group_size=k)``, k >= 2; CE and SCE stay per sample,
      over the B·k members. Needs teacher outputs: GPD from scratch has no static teacher to compare against.

    w = ``kd_weight``; SCE = soft cross-entropy with label smoothing ``sce_smoothing`` at T = 1, weight
    λ = ``sce_weight``. Only the DT's parameters exist: the student is a scaled slice of them
    (:func:`~lightning_kd.reparam.expand`), so one optimizer step trains both. ``self(x)`` is the student;
    ``val/acc`` / ``test/acc`` are the student's (the extracted student's, up to rounding), ``val/dt_acc`` /
    ``test/dt_acc`` the DT's (evaluation batches are plain in both modes). Students: the CNN zoo, timm CNNs and
    timm ViT / PVTv2 models by name, e.g. ``student="vit_tiny_patch16_224"`` with
    ``model_kwargs={"img_size": 32, "patch_size": 4}`` (``experiments/cifar10/gpd_vit.yaml``; GPD-CKD:
    ``experiments/cifar10/gpd_ckd.yaml``).
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
        distill: Literal["kd", "ckd"] = "kd",
        ckd_variant: Literal["mse", "kl"] = "mse",
        w_rel: float = 1.0,
        w_cls: float = 1.0,
        combine: Literal["difference", "average", "mixup"] = "difference",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if distill not in ("kd", "ckd"):
            raise ValueError(f"distill must be 'kd' (GPD's KD terms) or 'ckd' (comparative KD), got {distill!r}")
        if ckd_variant not in ("mse", "kl"):
            raise ValueError(f"ckd_variant must be 'mse' or 'kl', got {ckd_variant!r}")
        if combine not in ("difference", "average", "mixup"):
            raise ValueError(f"combine must be 'difference', 'average' or 'mixup', got {combine!r}")
        h = self.hparams
        net = self.student  # built by StudentModule: under one seed, the same initial student as KD's or CE's
        del self.student  # the student lives inside the dynamic teacher, as a view of its parameters
        self.dynamic_teacher = build_dynamic_teacher(
            net, h.num_classes, ratio, branches, noise_std, h.model_kwargs, student_weights, tuple(input_size)
        )
        if h.channels_last:
            self.dynamic_teacher.to(memory_format=torch.channels_last)  # the student view slices these weights
        self.val_dt_acc = MulticlassAccuracy(h.num_classes, average="micro")
        self.test_dt_acc = MulticlassAccuracy(h.num_classes, average="micro")

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``: rank
        zero's dynamic teacher is broadcast (ranks may have initialised differently, and ``fully_shard`` keeps each
        rank's own chunk), then sharded over the data-parallel ranks as one group, whose forward serves the DT
        and the student view alike. A no-op under other strategies, and when already sharded."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.dynamic_teacher.model, FSDPModule):
            return
        if mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "GapPreservingDistillation shards the dynamic teacher with FSDP2 only (no tensor parallelism): use "
                "ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1)"
            )
        group = mesh["data_parallel"].get_group()
        self.dynamic_teacher.to(self.trainer.strategy.root_device)  # a collective needs the backend's device
        for tensor in [*self.dynamic_teacher.parameters(), *self.dynamic_teacher.buffers()]:
            torch.distributed.broadcast(tensor.data, torch.distributed.get_global_rank(group, 0), group=group)
        fully_shard(self.dynamic_teacher.model, mesh=mesh["data_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dynamic_teacher.forward_student(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """GPD Eq. 8 with D chosen by ``distill`` (w = ``kd_weight``, λ = ``sce_weight``, ε = ``sce_smoothing``):

            L = [CE(z_DT, y) + w·D(z_DT, z_T)] + [CE(z_S, y) + w·D(z_S, z_T)] + λ·SCE_ε(z_S, softmax(sg(z_DT)))

        ``"kd"``: D(z, z_T) = KD_T(z, z_T), per sample. ``"ckd"``: on tuples (B, k) with sides P = [:p],
        N = [p:], p = k − ⌊k/2⌋, and Δa = combine(mean_P a, mean_N a),

            D(z, z_T) = w_rel·D'(Δz, Δz_T) + w_cls·D'(Δz, Δonehot(y)),   D' = MSE or T²·KL (``ckd_variant``),

        while CE and SCE are per sample over the B·k flattened members; a ``"mixup"`` λ is drawn once per batch
        and shared by the DT's and the student's term.
        """
        h = self.hparams
        x, y, z_t = self._samples(batch)  # per sample: (N, C, H, W), (N,), and z_T as the batch holds it
        z_dt = self.dynamic_teacher(x)
        z_s = self.dynamic_teacher.forward_student(x)
        loss_dt = F.cross_entropy(z_dt, y)
        loss_s = F.cross_entropy(z_s, y)
        if z_t is not None and h.kd_weight != 0:  # a weight of 0 reads no teacher output
            distance = self._static_teacher_loss(z_t, batch["target"])
            loss_dt = loss_dt + h.kd_weight * distance(z_dt)
            loss_s = loss_s + h.kd_weight * distance(z_s)
        loss_sce = soft_cross_entropy(z_s, z_dt.detach().softmax(1), label_smoothing=h.sce_smoothing)
        loss = loss_dt + loss_s + h.sce_weight * loss_sce
        self.log_train(loss, z_s, y, loss_dt=loss_dt, loss_student=loss_s, loss_sce=loss_sce)
        return loss

    def _samples(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The batch's inputs and labels as flat samples, and its teacher outputs; refuses the wrong batch shape."""
        x, y, z_t = batch["input"], batch["target"], batch.get("teacher_logits")
        if self.hparams.distill == "kd":
            if x.ndim != 4:
                raise ValueError(
                    f"distill='kd' needs plain batches (B, C, H, W); got {tuple(x.shape)}: use distill='ckd' for "
                    "CKD tuples, or group_size: 1 on the DataModule"
                )
            return x, y, z_t
        if x.ndim != 5 or x.shape[1] < 2:
            raise ValueError(
                f"distill='ckd' needs tuple batches (B, k, C, H, W) with k >= 2; got {tuple(x.shape)}: set "
                "group_size >= 2 (e.g. group_size: 2) on the CachedTeacherDataModule"
            )
        if z_t is None:
            raise ValueError(
                "distill='ckd' compares the static teacher's outputs, but the batch has no 'teacher_logits': GPD "
                "from scratch has no static teacher; use a CachedTeacherDataModule, or distill='kd' to train "
                "without a teacher (CE + SCE)"
            )
        return x.flatten(0, 1), y.flatten(), z_t

    def _static_teacher_loss(self, z_t: torch.Tensor, target: torch.Tensor):
        """D(·, z_T): the loss by which a network's flat logits (N, C) learn from the static teacher."""
        h = self.hparams
        if h.distill == "kd":
            return lambda z: kd_loss(z, z_t, h.temperature)
        lam = float(torch.rand(())) if h.combine == "mixup" else None  # Beta(1, 1) is uniform on [0, 1]
        return lambda z: tuple_comparative_loss(
            z.view(z_t.shape), z_t, target, variant=h.ckd_variant, temperature=h.temperature,
            w_rel=h.w_rel, w_cls=h.w_cls, combine=h.combine, lam=lam,
        )  # fmt: skip

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.val_dt_acc(self.dynamic_teacher(batch["input"]), batch["target"])
        self.log("val/dt_acc", self.val_dt_acc, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.test_dt_acc(self.dynamic_teacher(batch["input"]), batch["target"])
        self.log("test/dt_acc", self.test_dt_acc)
