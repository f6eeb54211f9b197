"""Shared pieces of the benchmark: statistics, interleaved timing, memory readings, machine, device, teacher."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9
SHARED_TEACHER = "cifar10_resnet20_teacher.pt2"


# --------------------------------------------------------------------------------------------------------------
# statistics and timing
# --------------------------------------------------------------------------------------------------------------
def summary(values) -> dict[str, float]:
    """Median, quartiles, min, max and count of a list of numbers."""
    a = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(a.min()), "max": float(a.max()),
            "n": len(a)}


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] = lambda: None,
    prepare: dict[str, Callable[[], None]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function; repeat r runs all of them once, starting at a rotated position.

    ``prepare[name]`` (untimed) runs before every call of ``name``; ``sync`` brackets every timed call.
    """
    names, prepare = list(fns), prepare or {}
    for _ in range(warmup):
        for name in names:
            prepare.get(name, lambda: None)()
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            prepare.get(name, lambda: None)()
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def proc_memory() -> dict[str, float]:
    """This process's resident memory in GB: VmRSS, VmHWM (peak), RssAnon, RssFile (Linux /proc; else peak only)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / GB
        return {"VmRSS": peak, "VmHWM": peak}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024 / GB
    return out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: ``echo 5 > /proc/self/clear_refs``); False if not
    possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# machine, device, teacher
# --------------------------------------------------------------------------------------------------------------
def machine_info(device) -> dict:
    import lightning
    import timm
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "lightning_version": lightning.__version__,
        "timm_version": timm.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["cuda_version"] = torch.version.cuda
    return info


def resolve_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench.py --device cuda: no CUDA device is available to this process (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built with CUDA {torch.version.cuda}). Run on a GPU machine or use "
            "--device cpu."
        )
    return torch.device(name)


def resolve_teacher(spec: str, num_classes: int):
    """(teacher, description): "auto" = the shared CIFAR-10 ResNet-20 file if present, else a zoo resnet20;
    an existing path = :func:`load_teacher`; any other string = a randomly initialised zoo/timm model."""
    from lightning_kd.data.cifar import default_data_dir
    from lightning_kd.models import create_model
    from lightning_kd.teachers import load_teacher

    if spec == "auto":
        shared = default_data_dir() / SHARED_TEACHER
        if shared.exists() and num_classes == 10:
            return load_teacher(shared), str(shared)
        spec = "resnet20"
    if Path(spec).exists():
        return load_teacher(spec), spec
    return load_teacher(create_model(spec, num_classes=num_classes)), f"{spec} (random init)"
