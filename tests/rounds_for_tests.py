"""Budgeted runs in rounds on a small synthetic dataset, in-process or as subprocess entry points.

``python tests/rounds_for_tests.py run OUT CACHE LOG STRATEGY [die_at] [start_at] [resume]`` trains one run and
writes ``OUT`` (JSON); ``die_at=k`` kills the process (``os._exit``) at the teacher's k-th call, or
``epoch<e>`` at the end of epoch e; ``resume`` continues from ``<OUT dir>/last.ckpt``. ``ddp OUT_DIR CACHE LOG
STRATEGY`` runs the same on 2 CPU DDP ranks and writes ``rank<r>.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).parent))
from teachers_for_tests import CountingTeacher  # noqa: E402

N, CLASSES, SIZE = 360, 10, 16
BUDGET, ROUNDS, EPOCHS, BATCH = 90, 3, 3, 15


class Blobs(Dataset):
    """``N`` (image, label) items: a class-coloured 16-px square plus seeded noise, floats in [0, 1]."""

    classes = [str(c) for c in range(CLASSES)]

    def __init__(self) -> None:
        self.targets = [i % CLASSES for i in range(N)]
        colours = torch.rand(CLASSES, 3, 1, 1, generator=torch.Generator().manual_seed(0))
        noise = torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        self.images = (0.6 * colours[torch.tensor(self.targets)] + 0.4 * noise).clamp(0, 1)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


class DyingTeacher(CountingTeacher):
    """A counting teacher whose process dies hard (no cleanup) on its ``die_at``-th call, after being paid."""

    def __init__(self, die_at: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.die_at = die_at

    def __call__(self, x):
        out = super().__call__(x)
        if self.die_at == self.invocations:
            os._exit(17)
        return out


def datamodule(teacher, cache_dir, strategy: str, **kw):
    from lightning_kd.data import CachedTeacherDataModule, DatasetDataModule

    data = DatasetDataModule(Blobs(), batch_size=BATCH, eval_batch_size=64, fingerprint="blobs-v1")
    kw.setdefault("rounds", ROUNDS)
    return CachedTeacherDataModule(data, teacher, budget=kw.pop("budget", BUDGET), cache_dir=str(cache_dir),
                                   selection=strategy, fill_batch_size=10, progress=False, **kw)


def fit(dm, root, epochs: int = EPOCHS, resume: bool = False, callbacks=(), **trainer_kw):
    """Train KD on ``dm`` for ``epochs`` epochs (a checkpoint after each in ``root``); returns the Trainer."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_kd.modules import KnowledgeDistillation

    L.seed_everything(0, verbose=False)
    model = KnowledgeDistillation(student="resnet8", lr=0.05)
    trainer_kw.setdefault("accelerator", "cpu")
    trainer_kw.setdefault("devices", 1)
    trainer = L.Trainer(
        max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1, default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True, every_n_epochs=1), *callbacks], **trainer_kw,
    )
    trainer.fit(model, dm, ckpt_path=str(Path(root) / "last.ckpt") if resume else None)
    return trainer


def summary(dm, trainer) -> dict:
    return {"selected": dm.selected.tolist(), "train": len(dm.train_indices), "new_calls": dm.new_teacher_calls,
            "rounds": dm.round_log, "steps": trainer.global_step, "round": dm.round,
            "rank": trainer.global_rank,
            "selected_sha": hashlib.sha256(np.sort(dm.selected).tobytes()).hexdigest()}


def _run(out: str, cache: str, log: str, strategy: str, die_at: str = "", start_at: str = "0", resume: str = ""):
    import lightning as L

    class DieAtEpochEnd(L.Callback):
        def __init__(self, epoch: int) -> None:
            self.epoch = epoch

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.current_epoch == self.epoch:
                trainer.save_checkpoint(Path(out).parent / "last.ckpt")
                os._exit(18)

    calls = int(die_at) if die_at.isdigit() else None
    dm = datamodule(DyingTeacher(die_at=calls, log=log), cache, strategy)
    dm.setup("fit")
    while time.time() < float(start_at):
        time.sleep(0.001)
    cbs = [DieAtEpochEnd(int(die_at[5:]))] if die_at.startswith("epoch") else []
    trainer = fit(dm, Path(out).parent, resume=bool(resume), callbacks=cbs)
    Path(out).write_text(json.dumps(summary(dm, trainer)))


def _ddp(out_dir: str, cache: str, log: str, strategy: str) -> None:
    dm = datamodule(CountingTeacher(log=log), cache, strategy)
    trainer = fit(dm, out_dir, devices=2, strategy="ddp")
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(summary(dm, trainer)))


if __name__ == "__main__":
    {"run": _run, "ddp": _ddp}[sys.argv[1]](*sys.argv[2:])
