"""Several processes on one cache, started at the same instant: the budget is spent once, every run gets every
sample, and a writer killed mid-fill has its claims taken over. Counts come from the teacher's own log."""

import json
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_kd.cache import TeacherBudget, TeacherCache

sys.path.insert(0, str(Path(__file__).parents[1]))
from teachers_for_tests import CountingTeacher, logged_samples, make_datamodule  # noqa: E402

HELPER = Path(__file__).parents[1] / "teachers_for_tests.py"
BUDGET, BATCH, SLEEP = 300, 20, 0.05


def start_fills(tmp_path, n: int, stagger: float = 0.0) -> list[tuple[subprocess.Popen, Path, Path]]:
    """``n`` fill processes on one cache, released together ``stagger`` seconds apart once all have loaded (a gate,
    not a fixed instant: on a loaded machine one process can take far longer than another to import and load)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    runs = []
    for i in range(n):
        log, out = tmp_path / f"calls{i}.log", tmp_path / f"result{i}.json"
        args = [tmp_path / "cache", log, BUDGET, BATCH, SLEEP, gate, out, i * stagger]
        proc = subprocess.Popen([sys.executable, str(HELPER), "fill", *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        runs.append((proc, log, out))
    deadline = time.time() + 300
    while len(list(gate.glob("ready-*"))) < n:
        for proc, _, _ in runs:
            assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the fill processes did not load within 300 s"
        time.sleep(0.01)
    (gate / "go.tmp").write_text(repr(time.time() + 0.2))
    (gate / "go.tmp").rename(gate / "go")  # atomic: a process reads the whole instant or nothing
    return runs


def finish(runs) -> list[dict]:
    results = []
    for proc, _, out in runs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.read_text()))
    return results


@pytest.mark.parametrize("n, stagger", [(2, 0.0), (3, 0.0), (2, 0.3)])
def test_concurrent_fills_spend_the_budget_once_and_all_train_on_every_sample(tmp_path, n, stagger):
    runs = start_fills(tmp_path, n, stagger)
    results = finish(runs)
    paid = [d for _, log, _ in runs for d in logged_samples(log)]
    assert len(paid) == BUDGET  # counted by the teacher: the budget, once, over all processes
    assert max(Counter(paid).values()) == 1  # no sample paid twice
    assert sum(r["calls"] for r in results) == BUDGET
    assert all(r["train"] == r["selected"] == BUDGET for r in results)  # every run trains on every sample
    assert not any("lost" in w and "0 lost" not in w for r in results for w in r["warnings"])
    s = TeacherBudget(BUDGET, tmp_path / "cache").summary()
    assert (s.used, s.committed, s.lost, s.in_flight) == (BUDGET, BUDGET, 0, 0)


def test_kill_9_of_one_writer_while_another_runs(tmp_path):
    (a, log_a, _), (b, log_b, out_b) = start_fills(tmp_path, 2)
    cache_dir = tmp_path / "cache"
    deadline = time.time() + 60
    while time.time() < deadline and len(logged_samples(log_a)) < 3 * BATCH:
        assert a.poll() is None, a.stderr.read()
        time.sleep(0.01)
    a.send_signal(signal.SIGKILL)
    a.wait()
    (result_b,) = finish([(b, log_b, out_b)])
    paid_a, paid_b = logged_samples(log_a), logged_samples(log_b)
    assert len(paid_a) + len(paid_b) <= BUDGET
    # Only the killed writer's last call can be paid twice: if the kill came after the teacher answered but
    # before the outputs were stored, that payment is lost and the taken-over samples are bought again.
    last_call_of_a = set(log_a.read_text().splitlines()[-1].split())
    twice = {d for d, n in Counter(paid_a + paid_b).items() if n > 1}
    assert twice <= last_call_of_a and len(twice) <= BATCH
    cache = TeacherCache(cache_dir)
    s = TeacherBudget(BUDGET, cache_dir).summary()
    assert s.in_flight == 0 and s.lost <= BATCH  # the killed writer's batch in flight, taken over as lost
    assert 0 <= s.used - (len(paid_a) + len(paid_b)) <= BATCH  # a reservation counts even if the kill beat the call
    assert len(cache) == s.committed == BUDGET - s.lost
    assert result_b["train"] == len(cache)
    before = cache.get(cache.indices).clone()
    assert torch.equal(TeacherCache(cache_dir).get(cache.indices), before)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_kill_9_of_a_lone_fill_at_a_random_moment_loses_at_most_one_batch(tmp_path, trial):
    import random

    (proc, log, _), = start_fills(tmp_path, 1)
    cache_dir = tmp_path / "cache"
    while len(logged_samples(log)) < BATCH:  # the fill is under way ...
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    time.sleep(random.Random(trial).uniform(0, (BUDGET / BATCH - 2) * SLEEP))  # ... then a random moment
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    paid = len(logged_samples(log))
    s = TeacherBudget(BUDGET, cache_dir).summary()
    assert paid <= s.used <= BUDGET and s.used - s.committed - s.lost == 0
    assert s.lost <= BATCH, f"trial {trial}: {s.lost} lost"  # at most the batch in flight
    before = TeacherCache(cache_dir)
    snapshot = before.get(before.indices).clone()
    teacher = CountingTeacher()
    dm = make_datamodule(teacher, cache_dir, BUDGET, fill_batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lost batch cannot be bought again: the fill says so
        dm.fill()
    assert paid + teacher.calls <= BUDGET
    assert torch.equal(dm.cache.get(before.indices), snapshot)  # committed outputs byte-identical
    assert len(dm.train_indices) == BUDGET - s.lost
    print(f"trial {trial}: killed after {paid} paid samples; stored {s.committed}, lost {s.lost}; resume paid "
          f"{teacher.calls}; trains on {len(dm.train_indices)}")
