"""StudentExtraction: write the GPD student as a standalone checkpoint at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.modules.gpd import build_dynamic_teacher
from lightning_kd.reparam import extract_student


class StudentExtraction(L.Callback):
    """At the end of fit: gather the full dynamic-teacher state (collective under DDP/FSDP, FSDP2 included), and
    on rank zero rebuild the dynamic teacher on the CPU, extract the student
    (:func:`~lightning_kd.reparam.extract_student`: the original student class, branches merged, no
    post-training) and save it to ``dirpath/filename``.

    The file is a Lightning-style checkpoint ``{"hyper_parameters": {"student", "num_classes", "model_kwargs"},
    "state_dict": {"student.*": ...}}`` read with ``weights_only=True``, so
    :func:`~lightning_kd.teachers.load_teacher` (and ``create_model`` + ``load_state_dict``) load it. The
    extracted student's accuracy on the validation set is logged as ``extracted/val_acc``, and its largest
    deviation from the in-training student view on one validation batch as ``extracted/max_abs_diff``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "student.ckpt", evaluate: bool = True) -> None:
        self.dirpath, self.filename, self.evaluate = dirpath, filename, evaluate
        self.path: Path | None = None
        self.student: torch.nn.Module | None = None
        self.metrics: dict[str, float] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = _full_state_dict(trainer)  # collective: every rank must call it
        if not trainer.is_global_zero:
            return
        h = pl_module.hparams
        dt = build_dynamic_teacher(
            h.student, h.num_classes, h.ratio, h.branches, 0.0, h.model_kwargs, None, tuple(h.input_size)
        )
        prefix = "dynamic_teacher."
        dt.load_state_dict({k[len(prefix) :]: v.cpu() for k, v in state.items() if k.startswith(prefix)}, strict=True)
        dt.eval()
        self.student = extract_student(dt).eval()
        directory = Path(self.dirpath or Path(trainer.default_root_dir) / "student")
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / self.filename
        torch.save(
            {
                "hyper_parameters": {
                    "student": h.student,
                    "num_classes": h.num_classes,
                    "model_kwargs": h.model_kwargs,
                },
                "state_dict": {f"student.{k}": v for k, v in self.student.state_dict().items()},
            },
            self.path,
        )
        if self.evaluate and trainer.datamodule is not None:
            self._log_accuracy(trainer, dt)

    @torch.no_grad()
    def _log_accuracy(self, trainer: L.Trainer, dt: torch.nn.Module) -> None:
        loader = trainer.datamodule.val_dataloader()
        # rank zero alone: a metric syncing across ranks at compute() would wait for ranks that never come
        acc = MulticlassAccuracy(trainer.lightning_module.hparams.num_classes, average="micro", sync_on_compute=False)
        max_diff = 0.0
        for i, batch in enumerate(loader):
            logits = self.student(batch["input"])
            acc.update(logits, batch["target"])
            if i == 0:
                max_diff = float((logits - dt.forward_student(batch["input"])).abs().max())
        metrics = {"extracted/val_acc": float(acc.compute()), "extracted/max_abs_diff": max_diff}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        print(
            f"[lightning_kd] extracted student -> {self.path}: val acc {metrics['extracted/val_acc']:.4f}, "
            f"max |extracted - student view| = {max_diff:.2e}"
        )
        self.metrics = metrics


def _full_state_dict(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The strategy's LightningModule state dict, full on rank zero: FSDP2's sharded entries (DTensors, as
    ``ModelParallelStrategy(save_distributed_checkpoint=True)`` returns them) are all-gathered, in the same
    order on every rank."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    state = trainer.strategy.lightning_module_state_dict()
    if not isinstance(trainer.strategy, ModelParallelStrategy):
        return state
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
