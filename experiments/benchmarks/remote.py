"""Section 4: what a teacher behind HTTP costs the budgeted fill, and what requests in flight buy back.

Samples/s of :func:`lightning_kd.data.fill_cache` (claims, ledger, one fsynced block per batch: the real fill)
over ``n`` CIFAR-10 training samples in batches of ``batch``, into a fresh cache each time, with:

- ``in_process``: the shared CIFAR-10 teacher (``cifar10_resnet20_teacher.pt2``) called directly;
- ``remote_{json,npy}``: ``RemoteTeacher`` against ``tests/remote_server.py --teacher shared`` in a subprocess on
  127.0.0.1, one request in flight: encoding, HTTP and decoding on top of the same model;
- ``latency50ms_{1,4}_in_flight``: the cheap test teacher behind a server adding 50 ms to every request (a network
  round trip), ``npy`` codec, ``max_in_flight`` 1 vs 4.

``ratios``: remote / in-process, and 4 / 1 in flight at 50 ms (goal >= 3). ``threads`` sets torch's intra-op
threads here and in the servers. Client and server share the machine's cores: on a small machine the remote
numbers include the server's compute competing with the client's.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT

GOAL_4_VS_1 = 3.0


def _spawn_server(*args: str):
    """tests/remote_server.py as a subprocess: ``(process, url)``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from remote_server import spawn_server

    return spawn_server(*args)


def fill_throughput(teacher, dataset, batch: int) -> float:
    """Samples/s of one budgeted fill of ``dataset`` into a fresh cache (after one untimed warm-up batch)."""
    import torch

    from lightning_kd.cache import CacheSpec, TeacherBudget, TeacherCache
    from lightning_kd.data import fill_cache

    with torch.inference_mode():
        teacher(dataset.__getitems__(list(range(batch)))["input"])
    root = Path(tempfile.mkdtemp(prefix="lkd-bench-remote-"))
    try:
        cache = TeacherCache(root, CacheSpec("bench", "cifar10", "fixed", 10))
        budget = TeacherBudget(len(dataset), root)
        start = time.perf_counter()
        fill_cache(teacher, dataset, cache, budget, batch_size=batch, progress=False)
        return len(dataset) / (time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _served(args: list[str], dataset, batch: int, codec: str, in_flight: int) -> float:
    from lightning_kd.teachers import RemoteTeacher

    proc, url = _spawn_server(*args)
    try:
        teacher = RemoteTeacher(url, model_version="v1", codec=codec, timeout=60.0, max_in_flight=in_flight)
        return fill_throughput(teacher, dataset, batch)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def run(threads: int = 1, n: int = 2000, batch: int = 100) -> dict:
    """Measure the throughputs above; a JSON-ready dict."""
    import torch

    from lightning_kd.data import CIFAR10DataModule
    from lightning_kd.data.cifar import default_data_dir
    from lightning_kd.teachers import load_teacher

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dm = CIFAR10DataModule()
        dm.setup("fit")
        dataset = dm.make_dataset(dm.train_indices[:n], "fixed", normalize=False)
        teacher = load_teacher(default_data_dir() / "cifar10_resnet20_teacher.pt2")
        sps = {"in_process": fill_throughput(teacher, dataset, batch)}
        shared = ["--teacher", "shared", "--threads", str(threads)]
        for codec in ("json", "npy"):
            sps[f"remote_{codec}"] = _served(shared, dataset, batch, codec, 1)
        slow = ["--teacher", "test", "--latency", "0.05", "--threads", str(threads)]
        for k in (1, 4):
            sps[f"latency50ms_{k}_in_flight"] = _served(slow, dataset, batch, "npy", k)
    finally:
        torch.set_num_threads(previous)
    ratios = {
        "remote_json_vs_in_process": sps["remote_json"] / sps["in_process"],
        "remote_npy_vs_in_process": sps["remote_npy"] / sps["in_process"],
        "latency50ms_4_vs_1_in_flight": sps["latency50ms_4_in_flight"] / sps["latency50ms_1_in_flight"],
    }
    return {
        "config": {"threads": threads, "n": n, "batch": batch},
        "fill_samples_per_s": {k: round(v, 1) for k, v in sps.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "goal_4_vs_1_in_flight": GOAL_4_VS_1,
        "goal_met": ratios["latency50ms_4_vs_1_in_flight"] >= GOAL_4_VS_1,
    }
