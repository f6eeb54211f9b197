"""A real HTTP teacher server on 127.0.0.1 with switchable faults, for RemoteTeacher tests and benchmarks.

Run as a script (prints ``PORT <n>`` once listening, then serves until killed)::

    python tests/remote_server.py --port 0 --teacher test --count-file /tmp/count \\
        [--model-version v1] [--version-header X-Model-Version] [--idempotency] [--latency 0.05] \\
        [--fault http500:every=3] [--fault http429:next=2,retry_after=0.5] [--teacher-path FILE] [--threads 1]

or in-process: ``with start_server(teacher="test") as srv: srv.url ...`` (:func:`start_server`), or as a
subprocess: :func:`spawn_server`.

Endpoints:

- ``POST`` on any path but ``/_control`` (e.g. ``/predict``): a prediction. The body is JSON
  (``{"inputs": rows, "shape": [N, C, H, W]}``, reply ``{"logits": rows}``) or ``.npy`` (``application/x-npy``,
  any numeric dtype, reply float32 ``.npy``), chosen by ``Content-Type`` (else 415; a bad body: 400). Replies carry
  the version header. Every request the teacher ran on is *processed*: counted in ``state.processed`` and appended
  to ``--count-file`` as one fsynced line ``<n> <idempotency key or ->``, so the count survives a killed server.
- ``GET`` on any path: ``{"model_version": v}`` plus the version header (the version probe; never counted).
- ``POST /_control``: a JSON object changing the state at runtime, any of
  ``{"faults": {NAME: SPEC, ...}, "latency": s, "model_version": v, "idempotency": bool, "reset": true}``
  (``reset`` clears faults, counters and the log first). Replies with the current state.

Faults (``SPEC``: ``{"every": n}`` fires on every n-th prediction request from when it was set, ``{"next": k}`` on
the next k; both may be given; ``{}`` or ``null`` switches it off). Command line: ``--fault NAME:key=value,...``.

- ``http429`` (``retry_after``, default 1): 429 with ``Retry-After``, before processing (not counted);
- ``http500`` (``retry_after``, optional): processes and counts, then answers 500 -- why a 5xx may have been paid;
- ``slow`` (``seconds``, default 2): processes and counts, then waits before replying (past a client's timeout);
- ``drop``: processes and counts, then closes the connection without replying;
- ``malformed``: processes and counts, replies a body that is not JSON / npy;
- ``wrong_shape``: processes and counts, replies one row fewer;
- ``nan``: processes and counts, replies logits whose first value is NaN.

``--latency s`` delays every prediction by ``s`` seconds before processing (concurrent requests overlap), as a
network round trip would. With ``--idempotency``, a repeated ``Idempotency-Key`` gets the stored reply
without processing (not counted again); the reply is stored as soon as the teacher ran, so a retry after a 500,
a drop or a slow reply is free too. (Two concurrent requests with the same new key are both processed.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

FAULTS = ("http429", "http500", "slow", "drop", "malformed", "wrong_shape", "nan")
MAX_SLEEP = 30.0  # bound on any wait the server does (slow replies, latency)


def make_teacher(name: str, path: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``test``: the cheap deterministic ``teacher_function``; ``shared``: the shared CIFAR-10 ``.pt2`` teacher."""
    if name == "test":
        sys.path.insert(0, str(Path(__file__).parent))
        from teachers_for_tests import teacher_function

        return teacher_function
    if name == "shared":
        from lightning_kd.data.cifar import default_data_dir
        from lightning_kd.teachers import load_teacher

        return load_teacher(path or default_data_dir() / "cifar10_resnet20_teacher.pt2")
    raise ValueError(f"teacher must be 'test' or 'shared', got {name!r}")


def read_count(path: str | Path) -> int:
    """Samples processed according to a count file (0 if it does not exist yet)."""
    path = Path(path)
    return sum(int(line.split()[0]) for line in path.read_text().splitlines()) if path.exists() else 0


def parse_fault(text: str) -> tuple[str, dict]:
    """``"http429:next=2,retry_after=0.5"`` -> ``("http429", {"next": 2, "retry_after": 0.5})``."""
    name, _, params = text.partition(":")
    spec = {}
    for item in filter(None, params.split(",")):
        key, _, value = item.partition("=")
        spec[key] = float(value) if "." in value else int(value)
    return name, spec


class _Fault:
    """One switchable fault: fires on every ``every``-th request since it was set and/or on the next ``next``."""

    def __init__(self, every: int = 0, next: int = 0, **params) -> None:
        self.every, self.next, self.params, self.seen = int(every), int(next), params, 0

    def fires(self) -> bool:
        self.seen += 1
        if self.next > 0:
            self.next -= 1
            return True
        return bool(self.every) and self.seen % self.every == 0

    def as_dict(self) -> dict:
        return {"every": self.every, "next": self.next, **self.params}


class ServerState:
    """What the server does (settings, faults) and what it saw (counters, a log); changed under ``lock``."""

    def __init__(self, model_version: str = "v1", latency: float = 0.0, idempotency: bool = False) -> None:
        self.lock = threading.Lock()
        self.model_version, self.latency, self.idempotency = model_version, latency, idempotency
        self.faults: dict[str, _Fault] = {}
        self.reset()

    def reset(self) -> None:
        self.faults.clear()
        self.requests = 0  # prediction requests received
        self.processed = 0  # samples the teacher ran on
        self.log: list[dict] = []  # one entry per prediction request: key, n, client port, outcome
        self.replies: dict[str, tuple[str, bytes]] = {}  # idempotency key -> (content type, body)

    def configure(self, control: dict) -> None:
        unknown = set(control) - {"faults", "latency", "model_version", "idempotency", "reset"}
        if unknown:
            raise ValueError(f"unknown control keys {sorted(unknown)}")
        with self.lock:
            if control.get("reset"):
                self.reset()
            for name, spec in (control.get("faults") or {}).items():
                if name not in FAULTS:
                    raise ValueError(f"unknown fault {name!r}; one of {FAULTS}")
                if spec:
                    self.faults[name] = _Fault(**spec)
                else:
                    self.faults.pop(name, None)
            self.latency = float(control.get("latency", self.latency))
            self.model_version = str(control.get("model_version", self.model_version))
            self.idempotency = bool(control.get("idempotency", self.idempotency))

    def as_dict(self) -> dict:
        with self.lock:
            return {
                "faults": {k: f.as_dict() for k, f in self.faults.items()},
                "latency": self.latency,
                "model_version": self.model_version,
                "idempotency": self.idempotency,
                "requests": self.requests,
                "processed": self.processed,
            }


_NPY_LOCK = threading.Lock()


def _decode_inputs(body: bytes, content_type: str) -> torch.Tensor:
    if content_type == "application/json":
        payload = json.loads(body)
        x = torch.tensor(payload["inputs"], dtype=torch.float32).reshape(payload["shape"])
    else:
        with _NPY_LOCK:  # np.load parses headers with ast, which CPython 3.11 cannot do in two threads at once
            array = np.load(io.BytesIO(body), allow_pickle=False)
        x = torch.from_numpy(np.array(array, dtype=np.float32))
    if x.ndim != 4:
        raise ValueError(f"inputs must be (N, C, H, W), got shape {tuple(x.shape)}")
    return x


def _encode_logits(logits: torch.Tensor, content_type: str) -> bytes:
    if content_type == "application/json":
        return json.dumps({"logits": logits.tolist()}).encode()  # NaN is written as NaN (what Python reads back)
    buf = io.BytesIO()
    np.save(buf, logits.numpy(), allow_pickle=False)
    return buf.getvalue()


class TeacherServer(ThreadingHTTPServer):
    """A threading HTTP server running ``teacher``; tracks open connections so that ``stop`` ends them all."""

    allow_reuse_address = True  # SO_REUSEADDR: a killed server can be restarted on its port at once
    daemon_threads = True

    def __init__(self, address, teacher, state: ServerState, count_file=None, version_header="X-Model-Version"):
        self.teacher, self.state, self.count_file, self.version_header = teacher, state, count_file, version_header
        self.stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/predict"

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and close every open connection."""
        self.stopping.set()
        self.shutdown()
        with self._open_lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self.server_close()

    def handle_error(self, request, client_address) -> None:
        """A client that went away (it timed out, or the server is stopping) is expected here: no traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError) and not self.stopping.is_set():
            super().handle_error(request, client_address)

    def record(self, n: int, key: str) -> None:
        """Count ``n`` processed samples (memory, and the count file, fsynced)."""
        with self.state.lock:
            self.state.processed += n
            if self.count_file:
                with open(self.count_file, "a") as f:
                    f.write(f"{n} {key or '-'}\n")
                    f.flush()
                    os.fsync(f.fileno())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body go out as two writes: without this, delayed ACKs add ~40 ms
    server: TeacherServer

    def log_message(self, format, *args) -> None:
        pass

    def _reply(self, status: int, body: bytes, content_type: str = "application/json", headers=()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header(self.server.version_header, self.server.state.model_version)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(200, json.dumps({"model_version": self.server.state.model_version}).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/_control":
            try:
                self.server.state.configure(json.loads(body))
            except (ValueError, TypeError) as err:
                return self._reply(400, json.dumps({"error": str(err)}).encode())
            return self._reply(200, json.dumps(self.server.state.as_dict()).encode())
        self._predict(body)

    def _predict(self, body: bytes) -> None:
        srv, state = self.server, self.server.state
        key = self.headers.get("Idempotency-Key", "")
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
        entry = {"key": key, "n": None, "port": self.client_address[1], "outcome": "ok"}
        with state.lock:
            state.requests += 1
            state.log.append(entry)
            fired = {name for name, fault in state.faults.items() if fault.fires()}
            params = {name: state.faults[name].params for name in fired}
            latency, idempotent = state.latency, bool(state.idempotency and key)
            stored = state.replies.get(key) if idempotent else None
        if content_type not in ("application/json", "application/x-npy"):
            entry["outcome"] = "415"
            return self._reply(415, b'{"error": "Content-Type must be application/json or application/x-npy"}')
        if stored is not None:
            entry["outcome"] = "replayed"
            return self._reply(200, stored[1], stored[0])
        if "http429" in fired:
            entry["outcome"] = "429"
            retry_after = str(params["http429"].get("retry_after", 1))
            return self._reply(429, b'{"error": "rate limited"}', headers=[("Retry-After", retry_after)])
        try:
            x = _decode_inputs(body, content_type)
        except Exception as err:  # any malformed request: rejected before processing
            entry["outcome"] = "400"
            return self._reply(400, json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
        srv.stopping.wait(min(latency, MAX_SLEEP))
        with torch.inference_mode():
            logits = srv.teacher(x).float()
        entry["n"] = len(x)
        srv.record(len(x), key)
        reply = _encode_logits(logits, content_type)
        if idempotent:  # stored once processed: a retry after any fault below is replayed, free
            with state.lock:
                state.replies[key] = (content_type, reply)
        if "http500" in fired:
            entry["outcome"] = "500"
            retry_after = params["http500"].get("retry_after")
            headers = [("Retry-After", str(retry_after))] if retry_after is not None else []
            return self._reply(500, b'{"error": "internal error"}', headers=headers)
        if "slow" in fired:
            entry["outcome"] = "slow"
            srv.stopping.wait(min(float(params["slow"].get("seconds", 2.0)), MAX_SLEEP))
        if "drop" in fired:
            entry["outcome"] = "drop"
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        corrupt = sorted(fired & {"nan", "wrong_shape", "malformed"})
        if corrupt:
            entry["outcome"] = "+".join(corrupt)
            bad = logits.clone()
            if "nan" in fired:
                bad[0, 0] = float("nan")
            if "wrong_shape" in fired:
                bad = bad[:-1]
            reply = b"{not json" if "malformed" in fired else _encode_logits(bad, content_type)
        self._reply(200, reply, content_type)


@contextlib.contextmanager
def start_server(
    teacher: str | Callable = "test",
    *,
    count_file: str | Path | None = None,
    model_version: str = "v1",
    version_header: str = "X-Model-Version",
    latency: float = 0.0,
    idempotency: bool = False,
    faults: dict[str, dict] | None = None,
    port: int = 0,
) -> Iterator[TeacherServer]:
    """An in-process server on ``127.0.0.1:port`` (0: a free port), serving on a thread; stopped on exit."""
    model = make_teacher(teacher) if isinstance(teacher, str) else teacher
    state = ServerState(model_version, latency, idempotency)
    state.configure({"faults": faults or {}})
    server = TeacherServer(("127.0.0.1", port), model, state, count_file, version_header)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=5)


def control(url: str, **changes) -> dict:
    """POST ``changes`` to the server's ``/_control`` endpoint; the server's state after the change."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.request("POST", "/_control", json.dumps(changes), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        if resp.status != 200:
            raise ValueError(body["error"])
        return body
    finally:
        conn.close()


def spawn_server(*args: str, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Run this file as a server subprocess (command-line ``args``); ``(process, prediction url)`` once listening."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {proc.communicate(timeout=5)[1][-2000:]}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/predict"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--teacher", choices=("test", "shared"), default="test")
    p.add_argument("--teacher-path", help="the shared teacher's .pt2 (default: in the shared data folder)")
    p.add_argument("--count-file", help="append '<n> <key>' per processed request here, fsynced")
    p.add_argument("--model-version", default="v1")
    p.add_argument("--version-header", default="X-Model-Version")
    p.add_argument("--idempotency", action="store_true", help="replay the stored reply for a repeated key")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every prediction")
    p.add_argument("--fault", action="append", default=[], help="NAME:key=value,... e.g. http500:every=3")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    state = ServerState(args.model_version, args.latency, args.idempotency)
    state.configure({"faults": dict(map(parse_fault, args.fault))})
    teacher = make_teacher(args.teacher, args.teacher_path)
    server = TeacherServer((args.host, args.port), teacher, state, args.count_file, args.version_header)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
