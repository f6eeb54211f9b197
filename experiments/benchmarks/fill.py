"""Section 2: the budgeted fill vs a bare teacher loop."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import summary, time_interleaved


# --------------------------------------------------------------------------------------------------------------
# 2. cache fill
# --------------------------------------------------------------------------------------------------------------
def bench_fill(teacher, samples: int, batch_size: int, device, warmup: int, repeats: int, tmp_root: Path) -> dict:
    """fill_cache vs a bare inference_mode teacher loop over the same DataLoader, interleaved, paired per repeat."""
    import torch
    from torch.utils.data import DataLoader

    from lightning_kd.cache import CacheSpec, TeacherBudget, TeacherCache
    from lightning_kd.data import CIFAR10DataModule
    from lightning_kd.data.base import collate
    from lightning_kd.data.fill import fill_cache

    dm = CIFAR10DataModule()
    dm.setup("fit")
    dataset = dm.make_dataset(dm.train_indices[:samples], "fixed", normalize=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)  # what fill_cache builds
    spec = CacheSpec(teacher="bench-teacher", dataset=dm.fingerprint(), view="fixed", num_classes=dm.num_classes)
    state: dict = {}

    def fresh_cache() -> None:
        if "dir" in state:
            shutil.rmtree(state["dir"], ignore_errors=True)
        state["dir"] = tempfile.mkdtemp(prefix="fill-", dir=tmp_root)
        state["cache"] = TeacherCache(state["dir"], spec)
        state["budget"] = TeacherBudget(len(dataset), state["dir"])

    def fill() -> None:
        fill_cache(teacher, dataset, state["cache"], state["budget"], batch_size=batch_size,
                   device=None if device.type == "cpu" else device, progress=False)

    def bare() -> None:
        with torch.inference_mode():
            for batch in loader:
                teacher(batch["input"].to(device, non_blocking=True)).cpu()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        times = time_interleaved({"fill_cache": fill, "bare_teacher": bare}, warmup, repeats, sync,
                                 {"fill_cache": fresh_cache})
    finally:
        if "dir" in state:
            shutil.rmtree(state["dir"], ignore_errors=True)
    fill_t, bare_t = np.asarray(times["fill_cache"]), np.asarray(times["bare_teacher"])
    return {
        "ratio": summary(bare_t / fill_t),  # (n / t_fill) / (n / t_bare)
        "fill_samples_per_s": summary(samples / fill_t),
        "bare_samples_per_s": summary(samples / bare_t),
        "overhead_ms_per_segment": summary((fill_t - bare_t) / math.ceil(samples / batch_size) * 1e3),
        "samples": samples,
        "batch_size": batch_size,
        "segments_per_fill": math.ceil(samples / batch_size),
    }
