"""Section 3: an ImageNet-size cache: build, compaction, open, gathers, a training process's memory."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import GB, ROOT, proc_memory, reset_peak_rss, summary


# --------------------------------------------------------------------------------------------------------------
# 3. scale
# --------------------------------------------------------------------------------------------------------------
def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _mem_available() -> float | None:
    try:
        line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable"))
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
    cmd = [sys.executable, str(ROOT / "experiments" / "bench.py"), "--rss-child", str(directory),
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
          f"(~{need['topk_gb']:.2f} GB) under {root_parent}; at full size this takes minutes and "
          f"~{need['disk_gb']:.1f} GB of disk at its peak", flush=True)
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
