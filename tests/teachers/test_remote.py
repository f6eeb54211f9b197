"""RemoteTeacher against a real HTTP server on 127.0.0.1 (tests/remote_server.py): both codecs, idempotency keys,
every fault's TeacherCallError fields next to what the server really processed, versions, rate limit, threads.

The server counts what it processed itself (``read_count`` of its count file), so each classification is checked
against the truth: ``processed=False`` must mean the server ran nothing. The cheap ``teacher_function`` serves
everywhere except one test with the shared CIFAR-10 teacher (skipped only with ``LKD_SKIP_SHARED_TEACHER=1``).
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_kd.teachers import Codec, JsonCodec, NpyCodec, RemoteTeacher, TeacherCallError, load_teacher
from lightning_kd.teachers.codecs import read_npy

sys.path.insert(0, str(Path(__file__).parents[1]))
from remote_server import control, read_count, spawn_server, start_server  # noqa: E402
from teachers_for_tests import teacher_function  # noqa: E402

N = 8


def batch(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def count_file(tmp_path) -> Path:
    return tmp_path / "count"


@pytest.fixture
def server(count_file):
    with start_server(count_file=count_file) as srv:
        yield srv


def remote(url: str, **kw) -> RemoteTeacher:
    kw.setdefault("timeout", 0.5)
    return RemoteTeacher(url, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- codecs and keys ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["json", "npy"])
def test_codec_round_trips_exactly(server, count_file, codec):
    x = batch()
    out = remote(server.url, codec=codec).query(x, key="k")
    assert out.dtype == torch.float32 and out.shape == (N, 10)
    assert torch.equal(out, teacher_function(x))  # float32 survives JSON exactly
    assert read_count(count_file) == N


def npy_bytes(array, version=None):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("version", [None, (1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(4, 3),
        np.asfortranarray(np.arange(12, dtype=">f8").reshape(3, 4)),
        np.arange(5, dtype=np.int16),
        np.zeros((0, 10), np.float16),
        np.float32(3.5).reshape(()),
    ],
)
def test_npy_reader_agrees_with_np_load(array, version):
    body = npy_bytes(array, version)
    got = read_npy(body)
    want = np.load(io.BytesIO(body), allow_pickle=False)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"PK\x03\x04 not npy", "magic"),
        (npy_bytes(np.zeros((4, 3), np.float32))[:-4], "data bytes"),
        (npy_bytes(np.array([1, 2], dtype=[("a", "<i4")])), "header"),
        (npy_bytes(np.zeros(3, np.float32), (1, 0)).replace(b"\x01\x00", b"\x07\x00", 1), "version 7"),
    ],
)
def test_npy_reader_refuses_what_it_cannot_read(body, message):
    with pytest.raises(ValueError, match=message):
        read_npy(body)


def test_npy_decoding_in_many_threads_at_once():
    """The fill decodes in ``max_in_flight`` threads; np.load's ast-based header parse is not thread-safe on 3.11."""
    arrays = [np.random.default_rng(i).standard_normal((64, 10)).astype(np.float32) for i in range(16)]
    bodies = [npy_bytes(a) for a in arrays]

    def decode_all(i):
        return all(np.array_equal(read_npy(bodies[(i + j) % 16]), arrays[(i + j) % 16]) for j in range(200))

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(decode_all, range(16)))


class HalfNpy(Codec):
    """Another API's wire format: half-precision inputs (the hook a user would write)."""

    def encode(self, inputs):
        buf = io.BytesIO()
        np.save(buf, inputs.half().numpy(), allow_pickle=False)
        return buf.getvalue(), "application/x-npy"

    def decode(self, body, content_type, n_samples):
        return NpyCodec().decode(body, content_type, n_samples)


def test_custom_codec_is_used(server):
    x = batch()
    out = remote(server.url, codec=HalfNpy()).query(x, key="k")
    assert torch.allclose(out, teacher_function(x.half().float()), atol=1e-5)


def test_same_key_arrives_unchanged_for_two_attempts_and_call_makes_fresh_keys(server, count_file):
    teacher, x = remote(server.url), batch()
    key = "fill-3f2a/batch-17"
    teacher.query(x, key=key)
    teacher.query(x, key=key)
    teacher(x)
    teacher(x)
    keys = [e["key"] for e in server.state.log]
    assert keys[:2] == [key, key]
    assert keys[2] != keys[3] and all(len(k) == 32 for k in keys[2:])
    assert count_file.read_text().splitlines()[:2] == [f"{N} {key}", f"{N} {key}"]  # no idempotency: paid twice
    assert read_count(count_file) == 4 * N


def test_idempotent_server_processes_a_repeated_key_once(count_file):
    with start_server(count_file=count_file, idempotency=True, faults={"drop": {"next": 1}}) as srv:
        teacher, x = remote(srv.url, codec="npy"), batch()
        with pytest.raises(TeacherCallError) as err:
            teacher.query(x, key="a")  # processed, then the connection dropped: maybe paid, as the fill is told
        assert err.value.processed is None and read_count(count_file) == N
        first, again = teacher.query(x, key="a"), teacher.query(x, key="a")  # the retries are replayed
        assert torch.equal(first, teacher_function(x)) and torch.equal(again, first)
        assert read_count(count_file) == N
        teacher.query(x, key="b")
        assert read_count(count_file) == 2 * N


# -- failures: what the client claims vs what the server did --------------------------------------------------------

FAULTS = [
    # fault, its parameters, processed, retryable, retry_after, samples the server processed, message
    ("http429", {"retry_after": 0.25}, False, True, 0.25, 0, "429"),
    ("http500", {}, None, True, None, N, "500"),
    ("http500", {"retry_after": 2}, None, True, 2.0, N, "500"),
    ("slow", {"seconds": 2}, None, True, None, N, "timed out"),
    ("drop", {}, None, True, None, N, "lost the connection"),
    ("malformed", {}, True, True, None, N, "does not decode"),
    ("wrong_shape", {}, True, True, None, N, "with 8 rows"),
]


@pytest.mark.parametrize("codec", ["json", "npy"])
@pytest.mark.parametrize(("fault", "params", "processed", "retryable", "retry_after", "count", "match"), FAULTS)
def test_fault_is_classified_as_the_server_behaved(
    server, count_file, codec, fault, params, processed, retryable, retry_after, count, match
):
    teacher, x = remote(server.url, codec=codec, timeout=0.3), batch()
    control(server.url, faults={fault: {"next": 1, **params}})
    start = time.monotonic()
    with pytest.raises(TeacherCallError, match=match) as err:
        teacher.query(x, key="k")
    assert (err.value.processed, err.value.retryable, err.value.retry_after) == (processed, retryable, retry_after)
    assert read_count(count_file) == count  # processed=False: the server really ran nothing
    assert time.monotonic() - start < 1.5  # a slow reply is given up at the timeout, not waited for
    assert torch.equal(teacher.query(x, key="k"), teacher_function(x))  # the next attempt works
    assert read_count(count_file) == count + N


def test_nan_reply_is_passed_on_for_the_cache_to_check(server):
    control(server.url, faults={"nan": {"next": 1}})
    x = batch()
    out = remote(server.url).query(x, key="k")
    assert out[0, 0].isnan() and torch.equal(out.flatten()[1:], teacher_function(x).flatten()[1:])


class Raw(Codec):
    """Sends a fixed body: a request the server must reject."""

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body, self.content_type = body, content_type

    def encode(self, inputs):
        return self.body, self.content_type

    def decode(self, body, content_type, n_samples):
        return JsonCodec().decode(body, content_type, n_samples)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [(b'{"inputs": [[0.5]], "shape": [1, 3, 32, 32]}', "application/json", 400), (b"pixels", "text/plain", 415)],
)
def test_rejected_request_is_free_and_final(server, count_file, body, content_type, status):
    with pytest.raises(TeacherCallError, match=str(status)) as err:
        remote(server.url, codec=Raw(body, content_type)).query(batch(), key="k")
    assert (err.value.processed, err.value.retryable) == (False, False)
    assert read_count(count_file) == 0


def test_status_outside_unprocessed_statuses_may_have_been_paid(server):
    with pytest.raises(TeacherCallError, match="400") as err:
        remote(server.url, codec=Raw(b"{}", "application/json"), unprocessed_statuses=()).query(batch(), key="k")
    assert (err.value.processed, err.value.retryable) == (None, False)


def test_inputs_that_cannot_be_encoded_are_never_sent(server):
    x = batch()
    x[0, 0, 0, 0] = float("nan")  # not JSON
    with pytest.raises(TeacherCallError, match="encode") as err:
        remote(server.url).query(x, key="k")
    assert (err.value.processed, err.value.retryable) == (False, False)
    assert server.state.requests == 0


def test_connection_refused_is_free_and_retryable():
    with pytest.raises(TeacherCallError, match="cannot connect") as err:
        remote(f"http://127.0.0.1:{free_port()}/predict", model_version="v1").query(batch(), key="k")
    assert (err.value.processed, err.value.retryable) == (False, True)


def test_subprocess_server_killed_then_restarted_on_its_port(count_file):
    proc, url = spawn_server("--port", "0", "--count-file", str(count_file))
    teacher, x = remote(url, timeout=2.0), batch()
    try:
        assert torch.equal(teacher.query(x, key="a"), teacher_function(x))
    finally:
        proc.kill()
        proc.wait(timeout=10)
    with pytest.raises(TeacherCallError) as err:  # the kept-alive connection is found dead, the reconnect refused
        teacher.query(x, key="b")
    assert (err.value.processed, err.value.retryable) == (False, True)
    port = url.split(":")[2].split("/")[0]
    fault = "http429:next=1,retry_after=0.5"
    proc, url2 = spawn_server("--port", port, "--count-file", str(count_file), "--fault", fault)
    try:
        assert url2 == url
        with pytest.raises(TeacherCallError) as err:
            teacher.query(x, key="b")
        assert (err.value.processed, err.value.retry_after) == (False, 0.5)
        assert torch.equal(teacher.query(x, key="b"), teacher_function(x))
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert count_file.read_text().splitlines() == [f"{N} a", f"{N} b"]  # both runs, fsynced before each reply


# -- identity -------------------------------------------------------------------------------------------------------


def test_fingerprint_from_config_needs_no_server():
    url = f"http://127.0.0.1:{free_port()}/predict"
    assert remote(url, model_version="resnet20-2024-06").fingerprint == f"remote:{url}@resnet20-2024-06"


def test_fingerprint_from_version_header_is_probed_for_free(count_file):
    with start_server(count_file=count_file, model_version="r20.3", version_header="X-Served-Model") as srv:
        teacher = remote(srv.url, version_header="X-Served-Model")
        assert teacher.fingerprint == f"remote:{srv.url}@r20.3"
        assert srv.state.requests == 0 and read_count(count_file) == 0  # the GET probe is not a prediction
        teacher.query(batch(), key="k")
        with pytest.raises(TeacherCallError, match="X-Model-Version") as err:
            _ = remote(srv.url).fingerprint  # a header the server does not send
        assert (err.value.processed, err.value.retryable) == (False, False)


def test_model_version_change_mid_run_is_refused(server, count_file):
    teacher, x = remote(server.url), batch()
    assert teacher.fingerprint.endswith("@v1")
    teacher.query(x, key="a")
    control(server.url, model_version="v2")
    with pytest.raises(TeacherCallError, match="'v2'.*'v1'") as err:
        teacher.query(x, key="b")
    assert (err.value.processed, err.value.retryable) == (True, False)
    assert read_count(count_file) == 2 * N  # the refused outputs were computed (and paid for)
    with pytest.raises(TeacherCallError, match="'v2'.*'v0'"):
        remote(server.url, model_version="v0").query(x, key="c")  # a configured version is checked too


def test_a_configured_version_the_server_does_not_announce_is_refused_before_any_paid_call(count_file):
    with start_server(count_file=count_file, model_version="v2") as srv:
        teacher = remote(srv.url, model_version="v1")
        with pytest.raises(TeacherCallError, match="announces model version 'v2'.*'v1': refused before any paid call"
                           ) as err:
            teacher.query(batch(), key="a")
        assert (err.value.processed, err.value.retryable) == (False, False)
        assert srv.state.requests == 0 and read_count(count_file) == 0  # nothing was predicted, nothing paid


def test_pickled_teacher_queries(server):
    teacher = remote(server.url)
    teacher.query(batch(), key="a")  # opens a connection and probes the version: neither travels
    clone = pickle.loads(pickle.dumps(teacher))
    assert clone.fingerprint == teacher.fingerprint
    assert torch.equal(clone.query(batch(), key="b"), teacher_function(batch()))


# -- rate limit and threads -----------------------------------------------------------------------------------------


def test_rate_limits_hold_across_threads(server):
    teacher, x = remote(server.url, model_version="v1", requests_per_second=20), batch(2)
    start = time.monotonic()
    for _ in range(10):
        teacher.query(x, key="k")
    assert time.monotonic() - start >= 0.45  # 10 starts, 1/20 s apart
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: teacher.query(x, key="k"), range(12)))
    assert time.monotonic() - start >= 0.55
    teacher = remote(server.url, model_version="v1", samples_per_second=400)
    start = time.monotonic()
    for _ in range(5):
        teacher.query(batch(20), key="k")
    assert time.monotonic() - start >= 0.2  # 20 samples per 1/20 s


def test_query_from_four_threads_at_once(server, count_file):
    teacher = remote(server.url, timeout=5.0)
    batches = [batch(1 + i % 5, seed=i) for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda ix: teacher.query(ix[1], key=str(ix[0])), enumerate(batches)))
    for x, out in zip(batches, outs):
        assert torch.equal(out, teacher_function(x))
    assert read_count(count_file) == sum(map(len, batches))
    assert len({e["port"] for e in server.state.log}) <= 4  # one kept-alive connection per thread


# -- the shared teacher ---------------------------------------------------------------------------------------------


def test_shared_teacher_served_matches_in_process(data_dir):
    if os.environ.get("LKD_SKIP_SHARED_TEACHER") == "1":
        pytest.skip("LKD_SKIP_SHARED_TEACHER=1: no shared teacher file here (CI)")
    path = data_dir / "cifar10_resnet20_teacher.pt2"
    if not path.is_file():
        pytest.fail(f"shared teacher missing: {path}", pytrace=False)
    x = batch(32)
    with torch.inference_mode():
        expected = load_teacher(path)(x)
    with start_server("shared") as srv:
        for codec in ("json", "npy"):
            out = remote(srv.url, codec=codec, timeout=30.0).query(x, key=codec)
            assert out.shape == (32, 10) and (out - expected).abs().max() <= 1e-5
