"""DynamicTeacherSharing: check that the GPD student stays a view of the dynamic teacher's parameters."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import lightning as L
import torch
import torch.distributed as dist

from lightning_kd.reparam import DynamicTeacher


class SharingViolation(RuntimeError):
    """The student is no longer exactly the scaled slice of the dynamic teacher, or ranks disagree."""


def _dynamic_teacher(pl_module: L.LightningModule) -> DynamicTeacher:
    dt = getattr(pl_module, "dynamic_teacher", None)
    if not isinstance(dt, DynamicTeacher):
        raise TypeError(
            f"DynamicTeacherSharing needs a module with a `dynamic_teacher`, got {type(pl_module).__name__}"
        )
    return dt


def _digest(tensors: dict[str, torch.Tensor]) -> bytes:
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(name.encode())
        # a copy: numpy() on FSDP2's unsharded parameter would make its storage unresizable (no reshard)
        h.update(t.detach().to("cpu", torch.float32, copy=True).numpy().tobytes())
    return h.digest()


class DynamicTeacherSharing(L.Callback):
    """Keeps the GPD hard-sharing invariant honest.

    Sharing holds by construction (the student's weights are computed from the DT's in ``forward``); what can
    break it is state outside that construction. At fit start this checks that every trainable parameter of the
    LightningModule belongs to the dynamic teacher (no separate student copy for an optimizer to update). Every
    ``check_every_n_steps`` optimizer steps, and at the end of fit, it computes the student's tensors from the
    DT (they must be finite) and, under DDP/FSDP, checks that every rank holds the same DT and student
    parameters (a digest all-gathered across ranks; BN running statistics are per rank). Under FSDP it works on
    the gathered full parameters (:func:`full_parameters`), the same on every rank by construction: there the
    check is of the student's tensors. A violation raises :class:`SharingViolation`.
    """

    def __init__(self, check_every_n_steps: int = 100) -> None:
        self.check_every_n_steps = check_every_n_steps

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dt = _dynamic_teacher(pl_module)
        shared = {id(p) for p in dt.parameters()}
        outside = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in shared]
        if outside:
            raise SharingViolation(f"trainable parameters outside the dynamic teacher: {outside[:5]}")
        self.check(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.check_every_n_steps and trainer.global_step % self.check_every_n_steps == 0:
            self.check(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)

    @torch.no_grad()
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with full_parameters(trainer):
            dt = _dynamic_teacher(pl_module)
            student = dt.student_state_dict()
            bad = [k for k, v in student.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise SharingViolation(f"non-finite student tensors at step {trainer.global_step}: {bad[:5]}")
            # Parameters only: BN running statistics legitimately differ between ranks (each sees its own data;
            # DDP re-broadcasts rank zero's at the next forward).
            params = {n for n, _ in dt.student_template.named_parameters()}
            digest = _digest(
                dict(dt.named_parameters()) | {f"student.{k}": v for k, v in student.items() if k in params}
            )
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[bytes | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, digest)
            if len(set(gathered)) != 1:
                raise SharingViolation(f"ranks hold different dynamic teachers at step {trainer.global_step}")


@contextlib.contextmanager
def full_parameters(trainer: L.Trainer) -> Iterator[None]:
    """The LightningModule's full (unsharded) parameters inside the block; a collective under FSDP.

    FSDP2 (``fully_shard``, as under ``ModelParallelStrategy``): every sharded module is unsharded, and resharded
    on exit. Lightning's ``FSDPStrategy`` (FSDP1): ``summon_full_params``. Other strategies: nothing to do."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, recurse=True):
            yield
        return
    sharded = []
    if isinstance(trainer.strategy, ModelParallelStrategy):
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in trainer.lightning_module.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
