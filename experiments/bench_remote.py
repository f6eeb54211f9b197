"""What a teacher behind HTTP costs, and what concurrency buys back: RemoteTeacher throughput without the fill.

    python experiments/bench_remote.py [--threads 1] [--n 2000] [--batch 100]    # prints JSON

Samples/s over ``n`` random (N, 3, 32, 32) inputs in batches of ``batch``, one warm-up batch untimed, of:

- ``in_process``: the shared CIFAR-10 teacher (``cifar10_resnet20_teacher.pt2``) called directly;
- ``remote_{json,npy}``: ``RemoteTeacher`` against ``tests/remote_server.py --teacher shared`` in a subprocess on
  127.0.0.1, one request in flight -- encoding, HTTP and decoding on top of the same model;
- ``latency50ms_{1,4}_in_flight``: the cheap test teacher behind a server adding 50 ms to every request (a network
  round trip), ``npy`` codec, 1 request in flight vs 4 (a ThreadPoolExecutor calling ``query``, as the fill does).

``ratios``: remote / in-process, and 4 / 1 in flight at 50 ms (goal >= 3). ``threads`` sets torch's intra-op
threads in this process and in the servers. Client and server share the machine's cores, so on a small machine
the remote numbers include the server's compute competing with the client's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from remote_server import spawn_server  # noqa: E402

from lightning_kd.data.cifar import default_data_dir  # noqa: E402
from lightning_kd.teachers import RemoteTeacher, load_teacher  # noqa: E402

GOAL_4_VS_1 = 3.0


def _throughput(call, batches: list[torch.Tensor], in_flight: int = 1) -> float:
    """Samples/s of ``call(i, x)`` over ``batches`` (the first one is a warm-up, untimed)."""
    call(0, batches[0])
    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(call, range(1, len(batches) + 1), batches[1:]))
    return sum(map(len, batches[1:])) / (time.perf_counter() - start)


def _served(args: list[str], batches: list[torch.Tensor], codec: str, in_flight: int) -> float:
    proc, url = spawn_server(*args)
    try:
        teacher = RemoteTeacher(url, codec=codec, timeout=60.0, max_in_flight=in_flight)
        return _throughput(lambda i, x: teacher.query(x, key=f"bench-{i}"), batches, in_flight)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def run(threads: int = 1, n: int = 2000, batch: int = 100) -> dict:
    """Measure the throughputs above; a JSON-ready dict."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.rand(n + batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        batches = list(x.split(batch))
        teacher = load_teacher(default_data_dir() / "cifar10_resnet20_teacher.pt2")

        def local(_, xb):
            with torch.inference_mode():
                return teacher(xb)

        sps = {"in_process": _throughput(local, batches)}
        shared = ["--teacher", "shared", "--threads", str(threads)]
        for codec in ("json", "npy"):
            sps[f"remote_{codec}"] = _served(shared, batches, codec, 1)
        slow = ["--teacher", "test", "--latency", "0.05", "--threads", str(threads)]
        for k in (1, 4):
            sps[f"latency50ms_{k}_in_flight"] = _served(slow, batches, "npy", k)
    finally:
        torch.set_num_threads(previous)
    ratios = {
        "remote_json_vs_in_process": sps["remote_json"] / sps["in_process"],
        "remote_npy_vs_in_process": sps["remote_npy"] / sps["in_process"],
        "latency50ms_4_vs_1_in_flight": sps["latency50ms_4_in_flight"] / sps["latency50ms_1_in_flight"],
    }
    return {
        "config": {"threads": threads, "n": n, "batch": batch},
        "samples_per_s": {k: round(v, 1) for k, v in sps.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "goal_4_vs_1_in_flight": GOAL_4_VS_1,
        "goal_met": ratios["latency50ms_4_vs_1_in_flight"] >= GOAL_4_VS_1,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, here and in the servers")
    p.add_argument("--n", type=int, default=2000, help="timed samples per measurement")
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args()
    print(json.dumps(run(args.threads, args.n, args.batch), indent=2))
