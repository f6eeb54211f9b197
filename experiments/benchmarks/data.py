"""Section 7: images/s of the fill's and the training loop's data paths over an ImageFolder, each against a
plain torchvision ``DataLoader(ImageFolder(root, transform=...))`` with the same transform, batch size and workers.

* fill: ``fill_cache`` with a free teacher (zeros) over ``DatasetDataModule.teacher_dataset`` — decoding in
  DataLoader workers, the seeded per-sample view, claims, fsynced appends and commits — vs the plain loader with
  the teacher's transform;
* train: one epoch of ``CachedTeacherDataModule.train_dataloader()`` (the student's augmentation + cached
  outputs) vs the plain loader with the student's transform (shuffled, persistent workers, both warmed up).

Goal: both ratios >= 0.9 (wall time, interleaved). Under ``cpu``: the same ratios in CPU seconds of the process and
its DataLoader workers (Linux), steadier than wall time on a shared machine. ``run(...)`` returns the result as a dict.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, summary, time_interleaved

DEFAULT_ROOT = ROOT / "experiments" / "imagefolder" / "data" / "train"


class FreeTeacher:
    """Zeros for every sample: the teacher costs nothing, so only the data path is timed."""

    fingerprint = "bench-free-teacher"

    def __call__(self, x):
        import torch

        return torch.zeros(len(x), 10)


def _worker_cpu_s(loader) -> float:
    """CPU seconds so far of a persistent-worker loader's live worker processes (Linux /proc; 0 elsewhere)."""
    total = 0
    for w in getattr(getattr(loader, "_iterator", None), "_workers", []):
        try:
            fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def _cpu_s(*loaders) -> float:
    """CPU seconds of this process, its finished children (the fill's and a plain loader's joined workers) and the
    live workers of ``loaders``."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
            + sum(_worker_cpu_s(loader) for loader in loaders))


def _with_cpu(fns: dict, cpu: dict, *loaders) -> dict:
    """``fns`` that also append their CPU seconds (see :func:`_cpu_s`) to ``cpu[name]``."""
    def timed(name, fn):
        def call():
            c0 = _cpu_s(*loaders)
            fn()
            cpu.setdefault(name, []).append(_cpu_s(*loaders) - c0)
        return call
    return {name: timed(name, fn) for name, fn in fns.items()}


def _random_folder(root: Path, n: int, size: int = 64) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"c{i % 10}" / f"{i}.jpg")
    return root


def run(
    root: str | Path | None = None,
    samples: int = 2000,
    batch_size: int = 250,
    num_workers: int = 2,
    student_size: int = 64,
    teacher_size: int = 32,
    warmup: int = 1,
    repeats: int = 15,
) -> dict:
    """Images/s (median, quartiles over ``repeats``) of both data paths and their ratio to the plain loader."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    from lightning_kd.cache import CacheSpec, TeacherBudget, TeacherCache
    from lightning_kd.data import CachedTeacherDataModule, ImageFolderDataModule
    from lightning_kd.data.fill import fill_cache

    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        if root is None:
            root = DEFAULT_ROOT if DEFAULT_ROOT.exists() else _random_folder(tmp / "images", samples)
        dm = ImageFolderDataModule(str(root), image_size=student_size, teacher_image_size=teacher_size,
                                   teacher_augment=True, batch_size=batch_size, num_workers=num_workers)
        dm.setup()
        indices = np.random.default_rng(0).permutation(dm.train_indices)[:samples]
        teacher_view = dm.teacher_dataset(indices, "fixed")
        spec = CacheSpec(teacher=FreeTeacher.fingerprint, dataset=dm.fingerprint(), view="bench", num_classes=10)
        state: dict = {}

        def fresh_cache() -> None:
            state["dir"] = tempfile.mkdtemp(prefix="fill-", dir=tmp)
            state["cache"], state["budget"] = TeacherCache(state["dir"], spec), TeacherBudget(samples, state["dir"])

        def fill() -> None:
            fill_cache(FreeTeacher(), teacher_view, state["cache"], state["budget"], batch_size=batch_size,
                       progress=False, num_workers=num_workers)

        def plain(transform, shuffle: bool, persistent: bool = False) -> DataLoader:
            return DataLoader(Subset(ImageFolder(str(root), transform=transform), indices.tolist()),
                              batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, num_workers=num_workers,
                              persistent_workers=persistent and num_workers > 0)

        plain_fill = plain(dm.teacher_transform, shuffle=False)
        fill_cpu: dict = {}
        fill_times = time_interleaved(_with_cpu({"fill": fill, "plain": lambda: sum(1 for _ in plain_fill)}, fill_cpu),
                                      warmup, repeats, prepare={"fill": fresh_cache})

        cached = CachedTeacherDataModule(dm, FreeTeacher(), budget=samples, cache_dir=str(tmp / "train-cache"),
                                         val_fraction=0, progress=False, fill_batch_size=batch_size)
        cached.setup()
        train_loader, plain_train = cached.train_dataloader(), plain(dm.train_transform, True, persistent=True)
        train_cpu: dict = {}
        train_times = time_interleaved(_with_cpu({"train": lambda: sum(1 for _ in train_loader),
                                                  "plain": lambda: sum(1 for _ in plain_train)},
                                                 train_cpu, train_loader, plain_train), warmup, repeats)
        n_train = len(train_loader) * batch_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def rates(times: dict, cpu: dict, n: int, name: str) -> dict:
        ours, base = np.asarray(times[name]), np.asarray(times["plain"])
        cpu_ours, cpu_base = (np.asarray(cpu[k][-len(ours):]) for k in (name, "plain"))  # the timed calls
        return {"images_per_s": summary(n / ours), "plain_images_per_s": summary(n / base),
                "ratio": summary(base / ours),
                "cpu": {"s": summary(cpu_ours), "plain_s": summary(cpu_base), "ratio": summary(cpu_base / cpu_ours)}}

    return {
        "setup": {"root": str(root), "samples": samples, "batch_size": batch_size, "num_workers": num_workers,
                  "student_size": student_size, "teacher_size": teacher_size, "repeats": repeats,
                  "torch_threads": torch.get_num_threads(),
                  "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "fill": rates(fill_times, fill_cpu, samples, "fill"),
        "train": rates(train_times, train_cpu, n_train, "train"),
    }
