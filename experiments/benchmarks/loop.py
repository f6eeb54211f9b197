"""Section 9: the library's KD training run end to end vs a plain PyTorch loop doing the same work.

The library run is ``experiments/sweep_budget.run_one``'s (method "kd"): ``KnowledgeDistillation`` (resnet8, SGD
lr 0.05 momentum 0.9 Nesterov wd 5e-4, cosine per step over the run, Hinton KD alpha 0.1 T 4) trained by a
``Trainer`` (no logger, no progress bar, no model summary, no sanity check) on a ``CachedTeacherDataModule`` over
``CIFAR10DataModule(batch_size=64)`` with the cached outputs of the shared teacher, validation every epoch,
``ModelCheckpoint(monitor="val/acc", mode="max")``, then ``trainer.test(ckpt_path="best")``.

The plain loop does the same work with bare PyTorch: the same student init (same seed), the cached teacher logits
read once up front from the same ``TeacherCache`` (opened with the same checksum verification; the library's fill
also loads the teacher to check the cache was made by it, the plain loop does not), every epoch a
``randperm`` of the training samples in batches of 64 (last partial batch dropped, as the library's loader does),
the library's batched tensor crop + flip (``lightning_kd.data.transforms``) and normalization per batch (the global
RNG drawn exactly as the library's DataLoader draws it, so both train on the same batches and views: the runs end
with the same weights, validation curve and test accuracy, ``same_test_acc``), the same
loss / optimizer / per-step cosine schedule, a running train loss and accuracy (tensors, no sync), validation on the
same split at the same eval batch (512) under ``inference_mode`` with loss and accuracy, ``torch.save`` of the
model, optimizer and scheduler state when the validation accuracy improves (strictly: what ModelCheckpoint's
``save_top_k=1`` does), and at the end the best state loaded back and the test split evaluated.

Both runs get a fresh DataModule, set up (CIFAR-10 arrays loaded, samples planned) *outside* the timed part; the
timed part starts at ``seed_everything`` and ends with the test accuracy. The runs alternate (order rotated per
repeat, same threads; ``warmup`` untimed one-epoch runs of each first) and ratios are paired per repeat. Each run
also records when each epoch started, so the per-epoch cost (training + validation + checkpoint) and the fixed cost
(start-up, fit / test set-up, test) are reported apart: ``ratio_extrapolated`` extrapolates the measured run to
``target_epochs`` (the sweep's 30) from them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import SHARED_TEACHER, summary, time_interleaved

STUDENT, LR, ALPHA, TEMPERATURE, PADDING = "resnet8", 0.05, 0.1, 4.0, 4


def _now() -> np.ndarray:
    """(wall, process CPU) seconds: on a shared machine CPU time is the steadier of the two (1 thread: ~ the work)."""
    return np.array([time.perf_counter(), time.process_time()])


def _times(total: np.ndarray, starts: list[np.ndarray]) -> dict:
    epochs = np.diff(np.asarray(starts), axis=0)
    return {"total_s": float(total[0]), "total_cpu_s": float(total[1]), "epoch_s": epochs[:, 0].tolist(),
            "epoch_cpu_s": epochs[:, 1].tolist()}


def _loader_rng(shuffle: bool):
    """Draw from the global RNG what an iterator of a ``DataLoader(shuffle=shuffle)`` (no workers) draws: its base
    seed, then the RandomSampler's seed (returned as its generator). With these draws, the same ``randperm`` and
    the same crop / flip draws per batch, the plain loop trains on exactly the library's batches: same weights,
    same validation accuracies, same checkpoints, same test accuracy."""
    import torch

    torch.empty((), dtype=torch.int64).random_()
    if shuffle:
        return torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
    return None


def _datamodule(budget: int, seed: int, cache_dir: Path, batch_size: int, cifar=None):
    """What ``sweep_budget._datamodule`` builds (set up: arrays loaded, samples planned; the cache is not opened).

    ``cifar``: a set-up ``CIFAR10DataModule(batch_size, seed=0)`` to wrap (read-only once set up), so that repeats
    do not decode / load the arrays again."""
    from lightning_kd.data import CachedTeacherDataModule, CIFAR10DataModule

    dm = CachedTeacherDataModule(cifar or CIFAR10DataModule(batch_size=batch_size, seed=0), teacher=SHARED_TEACHER,
                                 budget=budget, cache_dir=str(cache_dir), seed=seed, progress=False)
    dm.setup("fit")
    return dm


def library_run(dm, epochs: int, seed: int, ckpt_dir: Path, test_batches: int | None = None) -> dict:
    """``run_one``'s Trainer run (KD): fit with ModelCheckpoint on val/acc, then test at the best checkpoint."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_kd.modules import KnowledgeDistillation

    class EpochClock(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.starts.append(_now())

        def on_train_end(self, trainer, pl_module) -> None:
            self.starts.append(_now())

    t0 = _now()
    L.seed_everything(seed, workers=True, verbose=False)
    model = KnowledgeDistillation(method="kd", student=STUDENT, lr=LR, scheduler="cosine")
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/acc", mode="max")
    clock = EpochClock()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=[ckpt, clock],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_test_batches=test_batches if test_batches else 1.0)
    trainer.fit(model, dm)
    test = trainer.test(model, dm, ckpt_path="best", verbose=False)[0]
    total = _now() - t0
    Path(ckpt.best_model_path).unlink(missing_ok=True)
    return {**_times(total, clock.starts), "test_acc": float(test["test/acc"]),
            "best_val_acc": float(ckpt.best_model_score), "steps": trainer.global_step}


def plain_run(dm, epochs: int, seed: int, ckpt_dir: Path, test_batches: int | None = None) -> dict:
    """The same work as :func:`library_run` in a plain PyTorch loop (see the module docstring)."""
    import lightning as L
    import torch
    import torch.nn.functional as F

    from lightning_kd.cache import TeacherCache
    from lightning_kd.data import transforms as T
    from lightning_kd.losses import hinton_kd_loss
    from lightning_kd.models import create_model

    t0 = _now()
    L.seed_everything(seed, workers=True, verbose=False)
    model = create_model(STUDENT, num_classes=dm.num_classes)
    cache = TeacherCache(dm.h.cache_dir)  # opened and checksummed as the library's fill does; no teacher is loaded
    keys = dm.selected[cache.contains(dm.selected)]  # the fill's training samples (all, once the cache is full)
    train = dm.make_dataset(keys, "eval", normalize=False)
    val = dm.make_dataset(dm.val_indices, "eval", normalize=False)
    test = dm.datamodule.test_dataset()
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (train.mean, train.std))

    def normalized(images: torch.Tensor) -> torch.Tensor:  # = T.normalize(T.to_float(images), ...), in place
        return T.to_float(images).sub_(mean).div_(std)

    x_train, y_train = train.images[train.indices], train.targets[train.indices]
    z_train = cache.get(keys)
    x_val, y_val = val.images[val.indices], val.targets[val.indices]
    x_test, y_test = test.images[test.indices], test.targets[test.indices]
    bs, eval_bs, n = dm.batch_size, dm.eval_batch_size, len(y_train)
    steps = n // bs if n > bs else 1
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps * epochs, 1))

    def evaluate(x_all: torch.Tensor, y_all: torch.Tensor, batches: int | None = None) -> tuple[float, float]:
        _loader_rng(shuffle=False)
        model.eval()
        correct, loss_sum, seen = torch.zeros((), dtype=torch.int64), torch.zeros(()), 0
        with torch.inference_mode():
            for b, start in enumerate(range(0, len(y_all), eval_bs)):
                if batches is not None and b >= batches:
                    break
                x = normalized(x_all[start:start + eval_bs])
                y = y_all[start:start + eval_bs]
                logits = model(x)
                loss_sum += F.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
        return correct.item() / seen, loss_sum.item() / seen

    best, path, starts = -1.0, ckpt_dir / "best.pt", []
    for epoch in range(epochs):
        starts.append(_now())
        model.train()
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.int64)
        perm = torch.randperm(n, generator=_loader_rng(shuffle=True))
        for s in range(steps):
            pos = perm[s * bs:(s + 1) * bs]
            images = T.crop_flip(x_train[pos], PADDING, *T.crop_flip_params(len(pos), PADDING))
            x = normalized(images)
            y = y_train[pos]
            logits = model(x)
            loss = hinton_kd_loss(logits, z_train[pos], y, ALPHA, TEMPERATURE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
        acc, _ = evaluate(x_val, y_val)
        if acc > best:
            best = acc
            torch.save({"epoch": epoch, "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict()}, path)
    starts.append(_now())
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    test_acc, _ = evaluate(x_test, y_test, test_batches)
    total = _now() - t0
    path.unlink(missing_ok=True)
    return {**_times(total, starts), "test_acc": test_acc, "best_val_acc": best, "steps": steps * epochs}


def bench_loop(epochs: int = 5, budget: int = 2000, repeats: int = 3, *, seed: int = 0, warmup: int = 1,
               cache_dir: str | Path | None = None, test_batches: int | None = None, batch_size: int = 64,
               tmp_root: Path | None = None, target_epochs: int = 30) -> dict:
    """Library run vs plain loop, alternating: wall (and under "cpu", process CPU) times of whole runs, epochs and
    fixed parts, and ratios library / plain paired per repeat."""
    import os

    import torch

    from lightning_kd.data.cifar import default_cache_dir

    os.environ.setdefault("WANDB_MODE", "disabled")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "sweep_budget" / f"seed{seed}"
    first = _datamodule(budget, seed, cache_dir, batch_size)
    first.fill()  # untimed: buys what the cache lacks (normally nothing)
    work = Path(tempfile.mkdtemp(prefix="lkd-bench-loop-", dir=tmp_root))
    state: dict = {}
    runs: dict[str, list[dict]] = {"library": [], "plain": []}
    fns = {"library": library_run, "plain": plain_run}

    def prepare(name: str):
        def make() -> None:
            state["dm"] = _datamodule(budget, seed, cache_dir, batch_size, first.datamodule)
            state["dir"] = Path(tempfile.mkdtemp(prefix=name + "-", dir=work))
        return make

    def call(name: str):
        def go() -> None:
            runs[name].append(fns[name](state["dm"], epochs, seed, state["dir"], test_batches))
        return go

    try:
        for _ in range(warmup):  # untimed, short: imports, lazy initialisation, allocator and page-cache warm-up
            for name, fn in fns.items():
                prepare(name)()
                fn(state["dm"], 1, seed, state["dir"], 1)
        time_interleaved({k: call(k) for k in fns}, 0, repeats, prepare={k: prepare(k) for k in fns})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lib, plain = runs["library"], runs["plain"]
    return {
        **_compare(lib, plain, "", epochs, target_epochs),
        "cpu": _compare(lib, plain, "_cpu", epochs, target_epochs),
        "test_acc": {"library": [r["test_acc"] for r in lib], "plain": [r["test_acc"] for r in plain]},
        "same_test_acc": all(abs(a["test_acc"] - b["test_acc"]) < 1e-6 for a, b in zip(lib, plain)),
        "runs": {name: [{k: r[k] for k in ("total_s", "total_cpu_s", "epoch_s", "epoch_cpu_s")} for r in rs]
                 for name, rs in (("library", lib), ("plain", plain))},
        "config": {"epochs": epochs, "budget": budget, "repeats": repeats, "warmup": warmup, "seed": seed,
                   "batch_size": batch_size, "steps_per_epoch": lib[0]["steps"] // epochs,
                   "val_samples": len(state["dm"].val_indices), "test_batches": test_batches,
                   "threads": torch.get_num_threads(), "target_epochs": target_epochs, "cache_dir": str(cache_dir)},
    }


def _compare(lib: list[dict], plain: list[dict], kind: str, epochs: int, target_epochs: int) -> dict:
    """Paired ratios of whole runs and of their parts, in wall seconds (``kind`` "") or process CPU ("_cpu")."""

    def parts(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        total = np.array([r[f"total{kind}_s"] for r in runs])
        # the median epoch after the first (the first carries one-time set-up)
        epoch = np.array([np.median(r[f"epoch{kind}_s"][1:] or r[f"epoch{kind}_s"]) for r in runs])
        return total, epoch

    (t_lib, ep_lib), (t_plain, ep_plain) = parts(lib), parts(plain)
    fix_lib, fix_plain = t_lib - ep_lib * epochs, t_plain - ep_plain * epochs
    return {
        "ratio": summary(t_lib / t_plain),
        "epoch_ratio": summary(ep_lib / ep_plain),
        "ratio_extrapolated": summary((fix_lib + target_epochs * ep_lib) / (fix_plain + target_epochs * ep_plain)),
        "library_s": summary(t_lib),
        "plain_s": summary(t_plain),
        "library_epoch_s": summary(ep_lib),
        "plain_epoch_s": summary(ep_plain),
        "library_fixed_s": summary(fix_lib),
        "plain_fixed_s": summary(fix_plain),
    }
