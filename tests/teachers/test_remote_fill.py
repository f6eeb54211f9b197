"""The budgeted fill through RemoteTeacher against a real server that counts what it processed: the budget holds
server-side under every fault, retries never overspend, and two fills at the same instant pay once."""

from __future__ import annotations

import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_kd.cache import TeacherBudget, TeacherCache
from lightning_kd.teachers import RemoteTeacher, RetryPolicy

sys.path.insert(0, str(Path(__file__).parents[1]))
from remote_server import read_count, spawn_server, start_server  # noqa: E402
from teachers_for_tests import make_datamodule, teacher_function  # noqa: E402

BUDGET, BATCH = 120, 20


def remote(url: str, **kw) -> RemoteTeacher:
    kw.setdefault("timeout", 0.5)
    kw.setdefault("model_version", "v1")
    kw.setdefault("retry", RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05))
    return RemoteTeacher(url, codec="npy", **kw)


def expected(dm, indices) -> torch.Tensor:
    ds = dm.datamodule.make_dataset(indices, "fixed", normalize=False, seed=dm.h.seed)
    return teacher_function(ds.__getitems__(list(range(len(indices))))["input"])


def fill(url, cache_dir, **kw):
    dm = make_datamodule(remote(url, **kw), cache_dir, BUDGET, fill_batch_size=BATCH)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.fill()
    return dm, [str(w.message) for w in caught]


def test_fill_through_a_remote_teacher_pays_exactly_the_budget(tmp_path):
    with start_server(count_file=tmp_path / "count") as srv:
        dm, caught = fill(srv.url, tmp_path / "cache")
        assert read_count(tmp_path / "count") == BUDGET and not caught
        assert torch.allclose(dm.cache.get(dm.train_indices), expected(dm, dm.train_indices), atol=1e-6)
        again, _ = fill(srv.url, tmp_path / "cache")
        assert read_count(tmp_path / "count") == BUDGET and again.new_teacher_calls == 0


@pytest.mark.parametrize(
    "fault, spec, paid_extra",
    [
        ("http429", {"next": 2, "retry_after": 0.05}, 0),  # rejected unprocessed: retried on the same budget
        ("http500", {"next": 1}, BATCH),  # processed and billed, no outputs: lost, the retry buys anew
        ("drop", {"next": 1}, BATCH),
        ("slow", {"next": 1, "seconds": 1.0}, BATCH),
        ("malformed", {"next": 1}, BATCH),
        ("wrong_shape", {"next": 1}, BATCH),  # a reply without N rows: paid, refused by the client, retried
    ],
)
def test_faults_never_overspend_and_paid_losses_are_counted(tmp_path, fault, spec, paid_extra):
    with start_server(count_file=tmp_path / "count", faults={fault: spec}) as srv:
        dm, caught = fill(srv.url, tmp_path / "cache")
        processed = read_count(tmp_path / "count")
    s = TeacherBudget(BUDGET, tmp_path / "cache").summary()
    assert processed <= BUDGET and s.used == processed  # the ledger counts exactly what the server billed
    assert s.lost == paid_extra and s.committed == BUDGET - paid_extra
    assert len(dm.train_indices) == BUDGET - paid_extra
    if paid_extra:
        assert any(f"{paid_extra} of the {BUDGET} selected samples have no teacher outputs" in w for w in caught)
    cache = TeacherCache(tmp_path / "cache")
    assert torch.allclose(cache.get(dm.train_indices), expected(dm, dm.train_indices), atol=1e-6)


def test_nan_replies_are_never_stored_and_the_error_names_them(tmp_path):
    with start_server(count_file=tmp_path / "count", faults={"nan": {"every": 3}}) as srv:
        with pytest.raises(ValueError, match="NaN"):
            fill(srv.url, tmp_path / "cache")
        processed = read_count(tmp_path / "count")
    s = TeacherBudget(BUDGET, tmp_path / "cache").summary()
    assert processed <= BUDGET and s.used == processed and s.lost == processed - s.committed >= BATCH  # paid: lost
    cache = TeacherCache(tmp_path / "cache")
    assert len(cache) == s.committed and np.isfinite(cache.get(cache.indices).numpy()).all()


def test_a_fill_against_another_model_version_pays_nothing(tmp_path):
    from lightning_kd.teachers import TeacherCallError

    with start_server(count_file=tmp_path / "count", model_version="v2") as srv:
        with pytest.raises(TeacherCallError, match="refused before any paid call"):
            fill(srv.url, tmp_path / "cache")  # the teacher is configured as v1
        assert read_count(tmp_path / "count") == 0
    s = TeacherBudget(BUDGET, tmp_path / "cache").summary()
    assert (s.used, s.lost, s.committed) == (0, 0, 0)


def test_server_killed_mid_fill_and_restarted(tmp_path):
    """Requests in flight at the kill may have been processed: paid and lost. While the server is down, connection
    refused is known unprocessed: free and retried. The fill completes once it is back; nothing is paid twice."""
    count = tmp_path / "count"
    args = ["--count-file", str(count), "--latency", "0.05"]
    proc, url = spawn_server(*args)
    port = url.split(":")[2].split("/")[0]
    teacher = remote(url, max_in_flight=2, retry=RetryPolicy(attempts=40, backoff=0.1, max_backoff=0.5))
    dm = make_datamodule(teacher, tmp_path / "cache", BUDGET, fill_batch_size=BATCH)
    done = threading.Event()
    caught: list = []

    def run():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            dm.fill()
        caught.extend(str(x.message) for x in w)
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.time() + 60
        while read_count(count) < 2 * BATCH and time.time() < deadline:
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        time.sleep(0.3)  # down: the fill's requests are refused meanwhile
        proc, _ = spawn_server(*args, "--port", port)
        thread.join(120)
    finally:
        proc.kill()
        proc.wait()
    assert done.is_set()
    processed = read_count(count)
    s = TeacherBudget(BUDGET, tmp_path / "cache").summary()
    assert processed <= s.used <= BUDGET  # everything the server did is counted; never over budget
    assert s.committed + s.lost == s.used and s.lost <= 2 * BATCH  # at most the requests in flight at the kill
    assert len(dm.train_indices) == s.committed
    assert torch.allclose(dm.cache.get(dm.train_indices), expected(dm, dm.train_indices), atol=1e-6)


def test_two_fills_started_together_through_one_server_pay_once(tmp_path):
    with start_server(count_file=tmp_path / "count", latency=0.02) as srv:
        go, results, errors = threading.Barrier(2), [], []

        def run():
            dm = make_datamodule(remote(srv.url), tmp_path / "cache", BUDGET, fill_batch_size=BATCH)
            dm.setup("fit")
            go.wait()
            try:
                dm.fill()
                results.append(len(dm.train_indices))
            except BaseException as err:  # surfaced below
                errors.append(err)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert read_count(tmp_path / "count") == BUDGET and results == [BUDGET, BUDGET]
