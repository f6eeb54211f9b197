"""What lightning_kd's machinery costs: training steps, cache fill, an ImageNet-size cache, student extraction.

    python experiments/bench.py                         # CPU, writes experiments/results/bench_cpu.{json,md}
    python experiments/bench.py --device cuda --bf16 --channels-last
    python experiments/bench.py --skip-scale --repeats 10   # quick look, no 2.6 GB cache

The numbers (every "median / spread" is over repeats: median and interquartile range, plus min/max in the JSON)
-----------------------------------------------------------------------------------------------------------
1. Step cost. Each variant is one full optimizer step -- ``zero_grad``, forward + loss through the module's own
   ``training_step``, ``backward``, ``optimizer.step()`` (SGD with the module's own lr / momentum / Nesterov /
   weight decay, as ``configure_optimizers`` builds it) -- on the same student architecture (same init) and the
   same batch of B images. The variants run *interleaved*: every repeat runs each variant once, in an order rotated
   from repeat to repeat, so background load hits all of them alike. There is no Trainer, so ``self.log`` is
   replaced by a no-op on every module (Lightning would only warn and return); ``log_train`` still runs, so the
   training-accuracy update each step does is included, Trainer-side logging is not. Ratios are formed *per
   repeat* (paired, so slow drifts of background load cancel) and then summarized:

   - ``cached_kd_step``     = t(KnowledgeDistillation step on a batch that carries cached ``teacher_logits``)
                              / t(CE step). The CE step (the floor, = 1.0) is ``Supervised.training_step``.
                              Goal <= 1.05.
   - ``ckd_step_per_image`` = [t(ComparativeDistillation step on B/2 pairs, a (B/2, 2, C, H, W) batch) / B]
                              / [t(CE step on B images) / B]: both steps push the same B images through the
                              student, so the per-image ratio equals the per-step ratio. Goal <= 1.10.
   - ``online_kd_step``     = t(teacher forward under ``inference_mode`` + KD step) / t(CE step): a teacher in
                              the loop, i.e. what the cache saves on every step. No goal (informative).
   - ``gpd_step_vs_parts``  = t(GapPreservingDistillation step, batch with cached teacher logits)
                              / [t(CE step of a plain wide model) + t(CE step of the plain student)], each part
                              its own optimizer step. The plain wide model is the dynamic teacher materialised as
                              ordinary Conv2d / Linear / BatchNorm2d layers of the DT's widths (branches merged).
                              Goal <= 1.15.

   On CPU the JSON also holds ``ops_per_step`` (ATen operator calls in one step, views included, counted with a
   TorchDispatchMode) and ``ops_ratios`` (the same ratios over op counts): small models on a GPU are bound by
   kernel launches, so these hint at the GPU ratios on a machine that has none. ``--threads 1`` gives steadier
   CPU timings on a loaded machine.

2. Cache fill. ``cache_fill_vs_teacher`` = samples/s of ``fill_cache`` (teacher + a claim in the shared ledger
   under the directory lock + one validated, fsynced block per batch + its commit record, over ``CIFAR10DataModule().make_dataset(indices, "fixed", normalize=False)`` into a
   fresh float32 ``TeacherCache`` with a ``TeacherBudget``) / samples/s of a bare ``torch.inference_mode``
   teacher loop over the same batches of the same dataset (same batch size, same DataLoader, outputs brought to
   the CPU). Paired per repeat, interleaved. Creating the empty cache and budget is not timed. Goal >= 0.9.
   ``overhead_ms_per_segment`` = (t_fill - t_bare) / batches (one block per teacher batch): the fixed cost of
   the claim + durable block + commit protocol, to set against the teacher's time per batch on another device.

3. Scale. A synthetic ImageNet-size cache (``--scale-rows`` x ``--scale-classes``, default 1,281,167 x 1,000),
   once in float16 and once top-k (k = ``--topk``), written in chunks of ``--scale-chunk`` rows through
   ``TeacherCache.write`` (``build_s``: write time only, the random logits are made beforehand) and compacted to
   one block as ``CachedTeacherDataModule`` does after a fill (``compact_s``, streamed in 1,024-row chunks). ``disk_gb`` is the size of the
   live files (GB = 1e9 bytes). ``gather_ms_batch256_*``: median time of ``cache.get(256 random indices)``
   through the memory map of the compacted cache, after warm-up (the page cache is warm: the file was just
   written; cold reads from disk are slower). ``..._uncompacted``: the same on the cache as written (one memory
   map per block). ``open_s``: ``TeacherCache(dir)`` with the default verification (crc32 of every chunk).
   ``train_rss_gb``: peak resident memory (VmHWM) of a separate process that opens the cache and runs
   ``--rss-gathers`` random batch-256 gathers, next to ``..._baseline_gb`` (that process right after importing
   torch and ``lightning_kd.cache``, the package ``__init__`` bypassed), split into anonymous memory (what the
   process owns: it must stay far below the file size) and file-backed pages (clean page-cache pages that the
   kernel's fault-around maps 64 KB at a time around each random read of a warm file; reclaimable, not owned).
   ``build_rss_gb``: how much the building process's RSS grew while writing. Needs ~2x the fp16 size on disk
   (compaction writes its copy before the old blocks go); checked first, skipped with a message otherwise.

4. Remote teacher (``experiments/bench_remote.py``). Samples/s of ``fill_cache`` through ``RemoteTeacher``
   against ``tests/remote_server.py`` on 127.0.0.1 (JSON and npy codecs, 1 request in flight) vs the in-process
   teacher, and against a server adding 50 ms per request, 4 requests in flight vs 1
   (``latency50ms_4_vs_1_in_flight``, goal >= 3: latency hiding). One measurement each.

5. Extraction. ``extraction_s_resnet18``: median time of ``extract_student`` on a GPD dynamic teacher built from
   timm ``resnet18`` (ratio 2, CBR branches, noise 1e-6, as ``GapPreservingDistillation`` builds it), CPU. Goal
   < 1 s. ``expand_s_resnet18``: time of ``expand`` itself (tracing + verification forwards included).

6. ``--device cuda`` also runs section 1 for resnet32x4 -> resnet8x4 (32x32) and timm resnet50 -> resnet18
   (224x224, ``--imagenet-batch-size``) with bf16 autocast and channels_last, under ``cuda_pairs``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
SHARED_TEACHER = "cifar10_resnet20_teacher.pt2"

# name -> (goal, comparison); a ratio "meets" its goal when its median does.
GOALS: dict[str, tuple[float, str]] = {
    "cached_kd_step": (1.05, "<="),
    "ckd_step_per_image": (1.10, "<="),
    "gpd_step_vs_parts": (1.15, "<="),
    "cache_fill_vs_teacher": (0.9, ">="),
    "gather_ms_batch256_fp16": (2.0, "<="),
    "gather_ms_batch256_topk": (2.0, "<="),
    "extraction_s_resnet18": (1.0, "<"),
    "latency50ms_4_vs_1_in_flight": (3.0, ">="),
}


# --------------------------------------------------------------------------------------------------------------
# statistics and timing
# --------------------------------------------------------------------------------------------------------------
def summary(values) -> dict[str, float]:
    """Median, quartiles, min, max and count of a list of numbers."""
    a = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(a.min()), "max": float(a.max()), "n": len(a)}


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
    """Reset this process's VmHWM to its current RSS (Linux: ``echo 5 > /proc/self/clear_refs``); False if not possible."""
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
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
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
            f"torch {torch.__version__}, built with CUDA {torch.version.cuda}). Run on a GPU machine or use --device cpu."
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


# --------------------------------------------------------------------------------------------------------------
# 1. step cost
# --------------------------------------------------------------------------------------------------------------
@dataclass
class StepConfig:
    student: str
    teacher: object
    num_classes: int
    image_size: int
    batch_size: int
    device: object
    bf16: bool = False
    channels_last: bool = False
    gpd_ratio: float = 2.0


def plain_wide_model(dt):
    """The dynamic teacher's architecture as ordinary layers of the wide shapes (CBR branches merged)."""
    import torch
    from torch import nn

    from lightning_kd.reparam.expand import WideBatchNorm2d, WideConv2d, WideLinear

    def plain(layer):
        if isinstance(layer, WideConv2d):
            new = nn.Conv2d(
                layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups, bias=layer.bias is not None, padding_mode=layer.padding_mode,
            )
            new.weight.copy_(layer.kernel())
        elif isinstance(layer, WideLinear):
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            new.weight.copy_(layer.weight)
        elif isinstance(layer, WideBatchNorm2d):
            new = nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
            if layer.weight is not None:
                new.weight.copy_(layer.weight)
                new.bias.copy_(layer.bias)
            return nn.Sequential(new, copy.deepcopy(layer.drop), copy.deepcopy(layer.act)) if layer.has_act else new
        else:
            raise TypeError(f"unexpected wide layer {type(layer).__name__}")
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
        return new

    model = copy.deepcopy(dt.model)
    with torch.no_grad():
        for path, layer in list(dt.wide_layers()):
            model.set_submodule(path, plain(layer))
    return model


def _ready(module, cfg: StepConfig):
    """Train mode on the device (channels_last if asked), with ``self.log`` a no-op (there is no Trainer)."""
    import torch

    module.log = lambda *args, **kwargs: None
    module.train().to(cfg.device)
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def _optimizer_step(module, make_batch: Callable[[], dict], autocast) -> Callable[[], None]:
    """One full optimizer step of ``module.training_step``, with the SGD ``configure_optimizers`` would build."""
    import torch

    h = module.hparams
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=h.lr, momentum=h.momentum, nesterov=h.nesterov, weight_decay=h.weight_decay)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = module.training_step(make_batch(), 0)
        loss.backward()
        opt.step()

    return step


def make_batches(cfg: StepConfig) -> dict[str, dict]:
    """One batch of B images in the layouts each variant takes: plain, with cached logits, (B/2, 2, ...) pairs."""
    import torch

    if cfg.batch_size % 2:
        raise ValueError(f"--batch-size must be even (CKD pairs B/2 tuples of 2), got {cfg.batch_size}")
    g = torch.Generator().manual_seed(0)
    b, s = cfg.batch_size, cfg.image_size
    x = torch.randn(b, 3, s, s, generator=g).to(cfg.device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (b,), generator=g).to(cfg.device)
    with torch.no_grad():
        z_t = cfg.teacher(x).float().clone()
    if z_t.shape != (b, cfg.num_classes):
        raise ValueError(f"teacher gives {tuple(z_t.shape)} outputs, the student {cfg.num_classes} classes")
    plain = {"index": torch.arange(b, device=cfg.device), "input": x, "target": y}
    cached = {**plain, "teacher_logits": z_t}
    pairs = {k: v.view(b // 2, 2, *v.shape[1:]) for k, v in cached.items()}  # a view: channels_last survives
    return {"plain": plain, "cached": cached, "pairs": pairs}


def step_variants(cfg: StepConfig) -> dict[str, Callable[[], None]]:
    """The optimizer steps compared in section 1, keyed by variant name."""
    import torch

    from lightning_kd.modules import (
        ComparativeDistillation,
        GapPreservingDistillation,
        KnowledgeDistillation,
        Supervised,
    )

    batches = make_batches(cfg)
    autocast = (lambda: torch.autocast(cfg.device.type, dtype=torch.bfloat16)) if cfg.bf16 else nullcontext
    common = {"student": cfg.student, "num_classes": cfg.num_classes}

    def module(cls, **kw):
        torch.manual_seed(0)  # the same student init in every variant
        return _ready(cls(**common, **kw), cfg)

    teacher = cfg.teacher

    def online_batch() -> dict:
        with torch.inference_mode():
            z_t = teacher(batches["plain"]["input"])
        return {**batches["plain"], "teacher_logits": z_t}

    gpd = module(GapPreservingDistillation, ratio=cfg.gpd_ratio, input_size=(3, cfg.image_size, cfg.image_size))
    wide = Supervised(**common)
    wide.student = plain_wide_model(gpd.dynamic_teacher)
    _ready(wide, cfg)
    return {
        "ce": _optimizer_step(module(Supervised), lambda: batches["plain"], autocast),
        "cached_kd": _optimizer_step(module(KnowledgeDistillation), lambda: batches["cached"], autocast),
        "ckd_pairs": _optimizer_step(module(ComparativeDistillation), lambda: batches["pairs"], autocast),
        "online_kd": _optimizer_step(module(KnowledgeDistillation), online_batch, autocast),
        "gpd": _optimizer_step(gpd, lambda: batches["cached"], autocast),
        "wide_ce": _optimizer_step(wide, lambda: batches["plain"], autocast),
    }


def step_ratios(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-repeat (paired) ratios of section 1."""
    t = {k: np.asarray(v) for k, v in times.items()}
    return {
        "cached_kd_step": (t["cached_kd"] / t["ce"]).tolist(),
        "ckd_step_per_image": (t["ckd_pairs"] / t["ce"]).tolist(),  # same B images in both: per image = per step
        "online_kd_step": (t["online_kd"] / t["ce"]).tolist(),
        "gpd_step_vs_parts": (t["gpd"] / (t["wide_ce"] + t["ce"])).tolist(),
    }


def count_ops(fn: Callable[[], None]) -> int:
    """ATen operator calls in one call of ``fn`` (forward, backward and optimizer; views included): a
    device-independent proxy for the kernel launches that bound small models on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls


def bench_steps(cfg: StepConfig, warmup: int, repeats: int) -> dict:
    import torch

    variants = step_variants(cfg)
    sync = torch.cuda.synchronize if cfg.device.type == "cuda" else (lambda: None)
    times = time_interleaved(variants, warmup, repeats, sync)
    ratios = step_ratios(times)
    out = {
        "ratios": {k: summary(v) for k, v in ratios.items()},
        "timings_ms": {k: summary(np.asarray(v) * 1e3) for k, v in times.items()},
    }
    if cfg.device.type == "cpu":  # (on CUDA the backward runs on another thread: count kernels with a profiler)
        ops = {k: count_ops(fn) for k, fn in variants.items()}
        out["ops_per_step"] = ops
        out["ops_ratios"] = {name: float(v[0]) for name, v in step_ratios({k: [n] for k, n in ops.items()}).items()}
    return out


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
        times = time_interleaved({"fill_cache": fill, "bare_teacher": bare}, warmup, repeats, sync, {"fill_cache": fresh_cache})
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


# --------------------------------------------------------------------------------------------------------------
# 3. scale
# --------------------------------------------------------------------------------------------------------------
def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _mem_available() -> float | None:
    try:
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable"))
        return int(line.split()[1]) * 1024 / GB
    except (OSError, StopIteration):
        return None


def scale_requirements(rows: int, classes: int, topk: int) -> dict[str, float]:
    fp16 = rows * (classes * 2 + 8) / GB
    top = rows * ((topk + 1) * 2 + topk * 4 + 8) / GB
    # compaction writes the merged block before removing the old ones; it streams chunks, reading through maps
    return {"disk_gb": 2 * (fp16 + top) + 0.5, "memory_gb": 1.0, "fp16_gb": fp16, "topk_gb": top}


def time_gathers(cache, rows: int, batch: int, warmup: int, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    batches = rng.integers(0, rows, size=(warmup + n, batch))
    for idx in batches[:warmup]:
        cache.get(idx)
    times = []
    for idx in batches[warmup:]:
        t0 = time.perf_counter()
        cache.get(idx)
        times.append((time.perf_counter() - t0) * 1e3)
    return summary(times)


def rss_child(directory: str, gathers: int, batch: int) -> dict:
    """Run in a separate process: open the cache, do ``gathers`` random gathers, report resident memory."""
    from lightning_kd.cache import TeacherCache

    base = proc_memory()
    t0 = time.perf_counter()
    cache = TeacherCache(directory)  # default verification, as CachedTeacherDataModule opens it
    open_s = time.perf_counter() - t0
    pool = cache.indices
    rng = np.random.default_rng(1)
    check = 0.0
    for _ in range(gathers):
        z = cache.get(pool[rng.integers(0, len(pool), batch)])
        check += float(z[:, 0].sum())  # consume the batch like a loss would
    end = proc_memory()
    return {"baseline_gb": base["VmRSS"], "peak_gb": end["VmHWM"], "end_gb": end["VmRSS"],
            "anon_gb": end.get("RssAnon"), "file_gb": end.get("RssFile"), "open_s": open_s,
            "gathers": gathers, "finite": math.isfinite(check)}


def run_rss_child(directory: Path, gathers: int, batch: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(directory),
           "--rss-gathers", str(gathers), "--rss-batch", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_cache(directory: Path, spec, rows: int, chunk: int) -> dict:
    """Write ``rows`` synthetic outputs in chunks through TeacherCache.write, then compact (timed apart)."""
    import torch

    from lightning_kd.cache import TeacherCache

    block = torch.randn(min(chunk, rows), spec.num_classes, generator=torch.Generator().manual_seed(0)) * 3
    rss0 = proc_memory()["VmRSS"]
    cache = TeacherCache(directory, spec)
    t0 = time.perf_counter()
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        cache.write(np.arange(start, start + n), block[:n])
    build_s = time.perf_counter() - t0
    build_rss = proc_memory()["VmRSS"] - rss0
    segments = cache.n_blocks
    disk_written = _dir_bytes(directory / "segments")
    del cache
    # the cache as a resumed run would read it before compaction: one memory map per segment
    t0 = time.perf_counter()
    cache = TeacherCache(directory, verify=False)
    open_unverified_s = time.perf_counter() - t0
    rss0, peak_reset = proc_memory()["VmRSS"], reset_peak_rss()
    t0 = time.perf_counter()
    cache.compact()
    compact_s = time.perf_counter() - t0
    compact_peak = proc_memory()["VmHWM"] - rss0 if peak_reset else None
    return {"build_s": build_s, "build_rss_gb": build_rss, "segments": segments, "disk_gb_written": disk_written / GB,
            "compact_s": compact_s, "compact_peak_rss_gb": compact_peak,
            "open_uncompacted_unverified_s": open_unverified_s, "uncompacted": cache}


def bench_scale(args) -> dict:
    """Section 3; returns {"skipped": reason} when disk or memory is short."""
    from lightning_kd.cache import CacheSpec, TeacherCache

    rows, classes, k = args.scale_rows, args.scale_classes, args.topk
    need = scale_requirements(rows, classes, k)
    root_parent = Path(args.scale_dir or tempfile.gettempdir())
    free = shutil.disk_usage(root_parent).free / GB
    if free < need["disk_gb"]:
        return {"skipped": f"needs ~{need['disk_gb']:.1f} GB free disk under {root_parent}, only {free:.1f} GB free"}
    mem = _mem_available()
    if mem is not None and mem < need["memory_gb"]:
        return {"skipped": f"needs ~{need['memory_gb']:.1f} GB available memory, only {mem:.1f} GB"}
    print(f"[scale] building a {rows:,} x {classes:,} cache in fp16 (~{need['fp16_gb']:.2f} GB) and top-{k} "
          f"(~{need['topk_gb']:.2f} GB) under {root_parent}; at full size this takes minutes and ~{need['disk_gb']:.1f} GB "
          "of disk at its peak", flush=True)
    root = Path(tempfile.mkdtemp(prefix="lkd-bench-scale-", dir=root_parent))
    out: dict = {"rows": rows, "classes": classes, "topk": k, "chunk_rows": args.scale_chunk, "dir": str(root)}
    try:
        for name, dtype, topk in (("fp16", "float16", None), ("topk", "topk", k)):
            directory = root / name
            spec = CacheSpec(teacher="synthetic", dataset=f"synthetic-{rows}x{classes}", view="none",
                             num_classes=classes, dtype=dtype, topk=topk)
            built = build_cache(directory, spec, rows, args.scale_chunk)
            out[f"gather_ms_batch256_{name}_uncompacted"] = time_gathers(
                built.pop("uncompacted"), rows, args.gather_batch, args.gather_warmup, max(args.gathers // 5, 10)
            )["median"]
            out.update({f"{key}_{name}": value for key, value in built.items()})
            out[f"disk_gb_{name}"] = _dir_bytes(directory / "segments") / GB
            t0 = time.perf_counter()
            cache = TeacherCache(directory)
            out[f"open_s_{name}"] = time.perf_counter() - t0
            gather = time_gathers(cache, rows, args.gather_batch, args.gather_warmup, args.gathers)
            out[f"gather_ms_batch256_{name}"] = gather["median"]
            out[f"gather_ms_batch256_{name}_summary"] = gather
            del cache
            child = run_rss_child(directory, args.rss_gathers, args.gather_batch)
            suffix = "" if name == "fp16" else "_topk"
            out[f"train_rss_gb{suffix}"] = child["peak_gb"]
            out[f"train_rss_anon_gb{suffix}"] = child["anon_gb"]
            out[f"train_rss_file_gb{suffix}"] = child["file_gb"]
            out[f"train_rss_{name}"] = child
            print(f"[scale] {name}: built in {out[f'build_s_{name}']:.1f} s, {out[f'disk_gb_{name}']:.3f} GB, "
                  f"gather {gather['median']:.3f} ms, child peak RSS {child['peak_gb']:.3f} GB", flush=True)
    finally:
        if args.keep:
            print(f"[scale] kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------------------------
# 4. extraction
# --------------------------------------------------------------------------------------------------------------
def bench_extraction(model: str, ratio: float, input_size: int, repeats: int) -> dict:
    import torch

    from lightning_kd.models import create_model
    from lightning_kd.reparam import expand, extract_student

    torch.manual_seed(0)
    net = create_model(model, num_classes=1000)
    t0 = time.perf_counter()
    dt = expand(net, ratio, noise_std=1e-6, branches=True, example_input=torch.randn(2, 3, input_size, input_size))
    expand_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        extract_student(dt)
        times.append(time.perf_counter() - t0)
    return {"model": model, "ratio": ratio, "example_input": input_size, "expand_s": expand_s, "extract": summary(times)}


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _goal_cells(name: str, value: float) -> tuple[str, str]:
    if name not in GOALS:
        return "", ""
    goal, op = GOALS[name]
    ok = {"<=": value <= goal, ">=": value >= goal, "<": value < goal}[op]
    return f"{op.replace('<=', '≤').replace('>=', '≥')} {goal:g}", "✓" if ok else "✗"


RATIO_LABELS = {
    "cached_kd_step": "cached-KD step / CE step",
    "ckd_step_per_image": "CKD step per image / CE step per image",
    "online_kd_step": "online KD (teacher in the loop) step / CE step",
    "gpd_step_vs_parts": "GPD step / (wide CE step + student CE step)",
    "cache_fill_vs_teacher": "fill_cache samples/s / bare teacher samples/s",
}


def _row(label: str, stats: dict, name: str = "", digits: int = 3) -> str:
    goal, ok = _goal_cells(name, stats["median"])
    q = f"{stats['q1']:.{digits}f}–{stats['q3']:.{digits}f}"
    return f"| {label} | {stats['median']:.{digits}f} | {q} | {goal} | {ok} |"


def _headline_rows(result: dict) -> list[str]:
    """Every ratio and goal: ratios, gathers, extraction."""
    rows = [_row(label, result["ratio_summaries"][name], name)
            for name, label in RATIO_LABELS.items() if name in result["ratio_summaries"]]
    sc = result.get("scale", {})
    for name in ("fp16", "topk"):
        key = f"gather_ms_batch256_{name}"
        if key in sc:
            rows.append(_row(f"gather, batch 256, {name}, ms", sc[f"{key}_summary"], key))
    if "extraction" in result:
        e = result["extraction"]
        rows.append(_row(f"extract_student, {e['model']} ratio {e['ratio']:g}, s", e["extract"], "extraction_s_resnet18"))
        rows.append(f"| expand, {e['model']} ratio {e['ratio']:g} (example input {e['example_input']}²), s | "
                    f"{e['expand_s']:.3f} | | | |")
    return rows


def _remote_rows(r: dict) -> list[str]:
    """Section 4: the budgeted fill through RemoteTeacher (one measurement each, samples/s)."""
    sps, ratios = r["fill_samples_per_s"], r["ratios"]
    rows = ["", f"Remote teacher: fill_cache samples/s over {r['config']['n']} CIFAR-10 samples, batch "
            f"{r['config']['batch']} (client and local server on the same cores; `experiments/bench_remote.py`)", "",
            "| fill through | samples/s | vs in-process | goal | |", "|---|---|---|---|---|",
            f"| in-process shared teacher | {sps['in_process']:.0f} | 1 | | |"]
    for codec in ("json", "npy"):
        rows.append(f"| RemoteTeacher, {codec}, 1 in flight | {sps[f'remote_{codec}']:.0f} | "
                    f"{ratios[f'remote_{codec}_vs_in_process']:.3f} | | |")
    name = "latency50ms_4_vs_1_in_flight"
    goal, ok = _goal_cells(name, ratios[name])
    rows.append(f"| server + 50 ms latency: 1 / 4 in flight | {sps['latency50ms_1_in_flight']:.0f} / "
                f"{sps['latency50ms_4_in_flight']:.0f} | 4 vs 1: {ratios[name]:.2f} | {goal} | {ok} |")
    return rows


def _scale_rows(sc: dict) -> list[str]:
    if "skipped" in sc:
        return ["", f"Scale: skipped ({sc['skipped']})."]
    rows = ["", f"Scale: {sc['rows']:,} x {sc['classes']:,} synthetic cache, written in chunks of {sc['chunk_rows']:,} rows",
            "", "| | fp16 | top-k |", "|---|---|---|"]

    def line(label: str, fmt: str, key: Callable[[str], object]) -> None:
        cells = []
        for name in ("fp16", "topk"):
            value = key(name)
            cells.append("n/a" if value is None else format(value, fmt))
        rows.append(f"| {label} | {cells[0]} | {cells[1]} |")

    line("size on disk, GB", ".3f", lambda n: sc[f"disk_gb_{n}"])
    line("build (TeacherCache.write), s", ".1f", lambda n: sc[f"build_s_{n}"])
    line("blocks written (one per write)", "d", lambda n: sc[f"segments_{n}"])
    line("writer RSS growth while building, GB", ".3f", lambda n: sc[f"build_rss_gb_{n}"])
    line("compact, s", ".1f", lambda n: sc[f"compact_s_{n}"])
    line("compact peak RSS above start, GB", ".3f", lambda n: sc[f"compact_peak_rss_gb_{n}"])
    line("open (crc32 verification of every chunk), s", ".2f", lambda n: sc[f"open_s_{n}"])
    line("gather batch 256 before compaction, ms", ".3f", lambda n: sc[f"gather_ms_batch256_{n}_uncompacted"])
    line("gather batch 256, ms", ".3f", lambda n: sc[f"gather_ms_batch256_{n}"])
    line("training process: peak RSS, GB", ".3f", lambda n: sc[f"train_rss_{n}"]["peak_gb"])
    line("training process: baseline RSS (torch imported), GB", ".3f", lambda n: sc[f"train_rss_{n}"]["baseline_gb"])
    line("training process: anonymous / file-backed RSS (clean page-cache pages, reclaimable), GB", "", lambda n: (
        f"{sc[f'train_rss_{n}']['anon_gb']:.3f} / {sc[f'train_rss_{n}']['file_gb']:.3f}"
        if sc[f"train_rss_{n}"].get("anon_gb") is not None else None))
    return rows


def _timing_rows(result: dict) -> list[str]:
    ops = result.get("ops_per_step", {})
    rows = ["", "| step / loop | median | IQR | min–max | ATen ops per step |", "|---|---|---|---|---|"]
    for name, t in result["timings_ms"].items():
        rows.append(f"| {name}, ms | {_fmt(t['median'])} | {_fmt(t['q1'])}–{_fmt(t['q3'])} | "
                    f"{_fmt(t['min'])}–{_fmt(t['max'])} | {ops.get(name, '')} |")
    if "fill" in result:
        for key in ("fill_samples_per_s", "bare_samples_per_s", "overhead_ms_per_segment"):
            t = result["fill"][key]
            rows.append(f"| {key} | {_fmt(t['median'])} | {_fmt(t['q1'])}–{_fmt(t['q3'])} | {_fmt(t['min'])}–{_fmt(t['max'])} | |")
    if "ops_ratios" in result:
        rows += ["", "Op-count ratios (same formulas as the time ratios, ATen calls instead of seconds): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in result["ops_ratios"].items())]
    return rows


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        f"## lightning_kd benchmark: {m['device']} ({m['device_name']}, {m['cpu_cores']} cores, torch {m['torch_version']})",
        "",
        f"student {s['student']}, teacher {s['teacher']}, batch {s['batch_size']}, {s['repeats']} interleaved repeats "
        f"(+{s['warmup']} warm-up), bf16 {s['bf16']}, channels_last {s['channels_last']}; load average at start / "
        f"end {m.get('loadavg_start')} / {m.get('loadavg_end')}. ✓/✗: the median meets the goal.",
        "",
        "| quantity | median | spread (IQR) | goal | |",
        "|---|---|---|---|---|",
        *_headline_rows(result),
    ]
    if result.get("scale"):
        lines += _scale_rows(result["scale"])
    if result.get("remote"):
        lines += _remote_rows(result["remote"])
    lines += _timing_rows(result)
    for pair, r in result.get("cuda_pairs", {}).items():
        lines += ["", f"**{pair}** ({r['image_size']}², batch {r['batch_size']}, bf16 autocast, channels_last)", "",
                  "| quantity | median | spread (IQR) | goal | |", "|---|---|---|---|---|"]
        lines += [_row(RATIO_LABELS[name], v, name) for name, v in r["ratios"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--teacher", default="auto", help="'auto' (shared ResNet-20 file, else zoo resnet20), a path, or a model name")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--gpd-ratio", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default); 1 is steadier on a loaded machine")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in the steps (meant for cuda)")
    p.add_argument("--channels-last", action="store_true", help="channels_last models and inputs (meant for cuda)")
    p.add_argument("--fill-samples", type=int, default=5000)
    p.add_argument("--fill-batch-size", type=int, default=500, help="fill_cache's default")
    p.add_argument("--fill-repeats", type=int, default=5)
    p.add_argument("--skip-fill", action="store_true")
    p.add_argument("--scale-rows", type=int, default=1_281_167)
    p.add_argument("--scale-classes", type=int, default=1000)
    p.add_argument("--scale-chunk", type=int, default=10_000, help="rows per TeacherCache.write (one segment each)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--scale-dir", default=None, help="where the temporary caches go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scale caches")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--remote-samples", type=int, default=2000, help="samples per remote fill measurement")
    p.add_argument("--remote-batch", type=int, default=100)
    p.add_argument("--skip-remote", action="store_true")
    p.add_argument("--gather-batch", type=int, default=256)
    p.add_argument("--gather-warmup", type=int, default=50)
    p.add_argument("--gathers", type=int, default=1000)
    p.add_argument("--rss-gathers", type=int, default=300)
    p.add_argument("--extract-model", default="resnet18")
    p.add_argument("--extract-input", type=int, default=224)
    p.add_argument("--extract-repeats", type=int, default=5)
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--imagenet-batch-size", type=int, default=64, help="cuda pair resnet50 -> resnet18 at 224x224")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-batch", type=int, default=256, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """All sections; returns the JSON-ready result (also written to --json / --md)."""
    import torch

    device = resolve_device(args.device)
    teacher, teacher_desc = resolve_teacher(args.teacher, args.num_classes)
    result: dict = {"machine": machine_info(device), "settings": {**vars(args), "teacher": teacher_desc}}
    result["settings"].pop("rss_child")
    ratio_summaries: dict[str, dict] = {}

    teacher.to(device)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    cfg = StepConfig(args.student, teacher, args.num_classes, 32, args.batch_size, device,
                     args.bf16, args.channels_last, args.gpd_ratio)
    print(f"[steps] {args.student} <- {teacher_desc}, batch {args.batch_size}, {args.repeats} interleaved repeats", flush=True)
    clock = time.perf_counter()
    steps = bench_steps(cfg, args.warmup, args.repeats)
    section_s = {"steps": time.perf_counter() - clock}
    ratio_summaries.update(steps["ratios"])
    result["timings_ms"] = steps["timings_ms"]
    for key in ("ops_per_step", "ops_ratios"):
        if key in steps:
            result[key] = steps[key]

    if not args.skip_fill:
        print(f"[fill] {args.fill_samples} CIFAR-10 samples, batch {args.fill_batch_size}, {args.fill_repeats} repeats", flush=True)
        tmp_root = Path(args.scale_dir or tempfile.gettempdir())
        result["fill"] = bench_fill(teacher, args.fill_samples, args.fill_batch_size, device,
                                    min(args.warmup, 1), args.fill_repeats, tmp_root)
        ratio_summaries["cache_fill_vs_teacher"] = result["fill"]["ratio"]
        section_s["fill"] = time.perf_counter() - clock - sum(section_s.values())

    if not args.skip_scale:
        result["scale"] = bench_scale(args)
        section_s["scale"] = time.perf_counter() - clock - sum(section_s.values())
    if not args.skip_remote:
        print(f"[remote] fill through RemoteTeacher, {args.remote_samples} samples, batch {args.remote_batch}", flush=True)
        result["remote"] = _bench_remote().run(max(args.threads, 1), args.remote_samples, args.remote_batch)
        section_s["remote"] = time.perf_counter() - clock - sum(section_s.values())
    if not args.skip_extract:
        print(f"[extract] {args.extract_model} ratio 2", flush=True)
        result["extraction"] = bench_extraction(args.extract_model, 2.0, args.extract_input, args.extract_repeats)
        result["extraction_s_resnet18"] = result["extraction"]["extract"]["median"]
        result["expand_s_resnet18"] = result["extraction"]["expand_s"]
        section_s["extraction"] = time.perf_counter() - clock - sum(section_s.values())

    if device.type == "cuda":
        result["cuda_pairs"] = bench_cuda_pairs(args, device)
        section_s["cuda_pairs"] = time.perf_counter() - clock - sum(section_s.values())

    result["section_s"] = section_s
    result["ratio_summaries"] = ratio_summaries
    result["ratios"] = {k: v["median"] for k, v in ratio_summaries.items()}
    result["goals"] = {k: f"{op} {g}" for k, (g, op) in GOALS.items()}
    result["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


def _bench_remote():
    """experiments/bench_remote.py (section 4), imported from beside this file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lkd_bench_remote", Path(__file__).with_name("bench_remote.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_cuda_pairs(args: argparse.Namespace, device) -> dict:
    """Section 6: section 1 with bf16 autocast + channels_last for a CIFAR and an ImageNet pair."""
    import torch

    out = {}
    pairs = [("resnet32x4", "resnet8x4", 10, 32, args.batch_size), ("resnet50", "resnet18", 1000, 224, args.imagenet_batch_size)]
    for teacher_name, student, classes, size, batch in pairs:
        teacher, _ = resolve_teacher(teacher_name, classes)
        teacher.to(device).to(memory_format=torch.channels_last)
        cfg = StepConfig(student, teacher, classes, size, batch, device, bf16=True, channels_last=True, gpd_ratio=args.gpd_ratio)
        print(f"[cuda pair] {teacher_name} -> {student}, {size}x{size}, batch {batch}", flush=True)
        res = bench_steps(cfg, args.warmup, args.repeats)
        out[f"{teacher_name}->{student}"] = {"image_size": size, "batch_size": batch, **res}
        del teacher
        torch.cuda.empty_cache()
    return out


def write_outputs(result: dict, args: argparse.Namespace) -> tuple[Path, Path]:
    default = ROOT / "experiments" / "results" / f"bench_{args.device}"
    json_path = Path(args.json) if args.json else default.with_suffix(".json")
    md_path = Path(args.md) if args.md else default.with_suffix(".md")
    for path in (json_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.rss_gathers, args.rss_batch)))
        return {}
    import torch

    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting
    json_path, md_path = write_outputs(result, args)
    print(markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    if "--rss-child" in sys.argv:
        # Import lightning_kd.cache without the package __init__ (Lightning, timm, ...): the child's memory is then
        # the cache's plus torch's, not the framework's.
        import types

        pkg = types.ModuleType("lightning_kd")
        pkg.__path__ = [str(ROOT / "lightning_kd")]
        sys.modules.setdefault("lightning_kd", pkg)
    main()
