"""A teacher behind an HTTP API: one POST per batch, failures classified for the budget.

:class:`RemoteTeacher` sends a batch of inputs to ``url`` and returns the logits. It makes **one attempt per call**:
retries, concurrency and the budget belong to the fill, which calls :meth:`RemoteTeacher.query` from up to
``max_in_flight`` threads at once, with the same idempotency ``key`` for every attempt at the same batch, and
retries per ``retry``. What a failure may have cost is told by :class:`~lightning_kd.teachers.base.TeacherCallError`.

HTTP client: the standard library's :mod:`http.client`, one keep-alive connection per thread (no new dependency:
httpx is not one of this package's). It makes the step that matters explicit: the connection is opened
(``connect``) before a byte of the request is sent, so a failure there is known to be free, while every later
failure (sending, waiting for or reading the reply) may have reached the server. A pooled client opens and reuses
connections out of sight, where that line is harder to be sure of. A connection left idle is checked
before reuse (readable means the server closed it) and replaced, so an idle keep-alive timeout on the server does
not turn into a possibly-paid failure.

Wire formats (``codec``):

- ``"json"`` (:class:`JsonCodec`), ``Content-Type: application/json``. Request:
  ``{"inputs": [[...], ...], "shape": [N, C, H, W]}`` -- one row per sample, the sample flattened in C order,
  float32 values; response: ``{"logits": [[...], ...]}``, N rows of class scores.
- ``"npy"`` (:class:`NpyCodec`), ``Content-Type: application/x-npy``: the request body is the float32 input array
  as a ``.npy`` file, the response body the ``(N, C)`` logits as a ``.npy`` file (read with ``allow_pickle=False``).
- Any other API: subclass :class:`Codec` and pass an instance (or, in YAML, its ``class_path``).

Error classification (``processed``: ``False`` = known free, ``True`` = done (paid), ``None`` = unknown):

=============================================================  ===========  =========  ==========================
failure                                                        processed    retryable  retry_after
=============================================================  ===========  =========  ==========================
the inputs cannot be encoded (nothing sent)                    False        False      --
cannot connect (refused, DNS, connect timeout)                 False        True       --
error while sending; timeout, reset or close awaiting reply    None         True       --
HTTP 429                                                       False        True       ``Retry-After`` (seconds)
HTTP 408                                                       False        True       ``Retry-After`` if sent
other status in ``unprocessed_statuses`` (400, 401, 403, ...)  False        False      --
HTTP 5xx                                                       None         True       ``Retry-After`` if sent
any other non-2xx status                                       None         False      --
2xx with a ``version_header`` other than ``model_version``     True         False      --
2xx whose body does not decode, or not 2-D with N rows         True         True       --
=============================================================  ===========  =========  ==========================

A 5xx in ``unprocessed_statuses`` (an API that documents, say, 503 as "not started") is ``processed=False`` and
stays retryable. NaN/inf and the number of classes are checked where the outputs are stored, not here.

Identity: ``fingerprint`` is ``remote:<url>@<model_version>``. Without a configured ``model_version`` it is read,
once and before the first paid call, from the ``version_header`` of the reply to a ``GET`` on ``url`` (that probe
is not a prediction); a configured version is checked against that same free ``GET`` before the first paid call,
when the server announces one. Every prediction reply carrying the header is checked too: outputs of another model
version are refused, never stored under this one's identity.
"""

from __future__ import annotations

import http.client
import math
import selectors
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import torch

from lightning_kd.teachers.base import RetryPolicy, TeacherCallError
from lightning_kd.teachers.codecs import CODECS, Codec

UNPROCESSED_STATUSES = (400, 401, 403, 404, 405, 408, 413, 415, 422, 429)
_RETRYABLE_STATUSES = (408, 429)




class _Throttle:
    """Client-side rate limit: after a request of n samples the next starts ``max(1 / requests_per_second,
    n / samples_per_second)`` later, so neither rate is exceeded on average. Each caller reserves its start time
    under a lock and sleeps outside it: concurrent callers queue in order, never waiting longer than the limit
    demands."""

    def __init__(self, requests_per_second: float | None, samples_per_second: float | None) -> None:
        for name, rate in (("requests_per_second", requests_per_second), ("samples_per_second", samples_per_second)):
            if rate is not None and rate <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {rate}")
        self.rps, self.sps = requests_per_second, samples_per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self, n_samples: int) -> None:
        if self.rps is None and self.sps is None:
            return
        with self._lock:
            start = max(time.monotonic(), self._next)
            self._next = start + max(1 / self.rps if self.rps else 0.0, n_samples / self.sps if self.sps else 0.0)
        delay = start - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (absent, an HTTP-date, or anything not a finite number gives ``None``)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle keep-alive connection was closed by the server (an idle socket turns readable on EOF)."""
    if conn.sock is None:
        return False
    with selectors.DefaultSelector() as sel:  # not select.select: it fails on descriptors >= 1024
        sel.register(conn.sock, selectors.EVENT_READ)
        return bool(sel.select(0))


class RemoteTeacher:
    """A teacher behind an HTTP endpoint; see :mod:`lightning_kd.teachers.remote` for formats and failures.

    Args:
        url: the prediction endpoint (``http://`` or ``https://``); batches are POSTed to it.
        model_version: the served model's version, part of the ``fingerprint``; ``None`` reads it from the
            server's ``version_header`` (one ``GET`` on ``url``, before the first prediction).
        codec: ``"json"``, ``"npy"`` or a :class:`Codec` for another API's schema.
        timeout: socket timeout in seconds, for connecting and for each wait on the reply.
        max_in_flight: how many batches the fill may have at the server at once (threads).
        retry: how the fill retries a failed call.
        requests_per_second: client-side limit on request starts (``None``: none).
        samples_per_second: client-side limit on samples sent, on average (``None``: none).
        cost_per_request: price of one request, for the fill's accounting.
        cost_per_sample: price of one sample, for the fill's accounting.
        headers: extra request headers (e.g. ``{"Authorization": "Bearer ..."}``).
        version_header: the reply header that names the model version.
        unprocessed_statuses: HTTP statuses the API documents as rejected before any work (not billed).
    """

    def __init__(
        self,
        url: str,
        *,
        model_version: str | None = None,
        codec: str | Codec = "json",
        timeout: float = 30.0,
        max_in_flight: int = 4,
        retry: RetryPolicy = RetryPolicy(),
        requests_per_second: float | None = None,
        samples_per_second: float | None = None,
        cost_per_request: float = 0.0,
        cost_per_sample: float = 0.0,
        headers: Mapping[str, str] | None = None,
        version_header: str = "X-Model-Version",
        unprocessed_statuses: Sequence[int] = UNPROCESSED_STATUSES,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port]/path, got {url!r}")
        if isinstance(codec, str) and codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)} or a Codec, got {codec!r}")
        if timeout <= 0 or max_in_flight < 1:
            raise ValueError(f"need timeout > 0 and max_in_flight >= 1, got {timeout} and {max_in_flight}")
        self.url = url
        self.codec = CODECS[codec]() if isinstance(codec, str) else codec
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.retry = retry
        self.cost_per_request, self.cost_per_sample = cost_per_request, cost_per_sample
        self.headers = dict(headers or {})
        self.version_header = version_header
        self.unprocessed_statuses = frozenset(unprocessed_statuses)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._model_version = model_version
        self._throttle = _Throttle(requests_per_second, samples_per_second)
        self._init_local_state()

    def _init_local_state(self) -> None:
        self._local = threading.local()
        self._version_lock = threading.Lock()
        self._announced_checked = False  # per process: the free GET check before the first paid call

    def __getstate__(self) -> dict:
        """Picklable (e.g. for spawned DDP workers): connections and locks are per process, made afresh."""
        state = self.__dict__.copy()
        del state["_local"], state["_version_lock"], state["_announced_checked"]
        state["_throttle"] = (self._throttle.rps, self._throttle.sps)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._throttle = _Throttle(*state["_throttle"])
        self._init_local_state()

    def __repr__(self) -> str:
        codec = type(self.codec).__name__
        return f"{type(self).__name__}({self.url!r}, codec={codec}, max_in_flight={self.max_in_flight})"

    @property
    def model_version(self) -> str:
        """The configured version, else the one the server announces (probed once, thread-safe)."""
        if self._model_version is None:
            with self._version_lock:
                if self._model_version is None:
                    self._model_version = self._probe_version()
                    self._announced_checked = True  # the probe was that check
        return self._model_version

    @property
    def fingerprint(self) -> str:
        return f"remote:{self.url}@{self.model_version}"

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """One attempt with a fresh idempotency key (no retries): for use outside the fill."""
        return self.query(inputs, key=uuid.uuid4().hex)

    def query(self, inputs: torch.Tensor, *, key: str) -> torch.Tensor:
        """POST one batch (one HTTP request, ``Idempotency-Key: key``); float32 ``(N, C)`` logits on the CPU.

        Raises :class:`TeacherCallError` as tabled in :mod:`lightning_kd.teachers.remote`. Thread-safe.
        """
        version = self.model_version
        self._check_announced_version(version)
        n = len(inputs)
        try:
            body, content_type = self.codec.encode(inputs.detach().cpu())
        except Exception as err:
            raise TeacherCallError(
                f"could not encode a batch of {n} for {self.url}: {err}", processed=False, retryable=False
            ) from err
        self._throttle.wait(n)
        headers = {**self.headers, "Content-Type": content_type, "Idempotency-Key": str(key)}
        resp, data = self._request("POST", body, headers)
        if not 200 <= resp.status < 300:
            raise self._status_error(resp, data, key)
        served = resp.getheader(self.version_header)
        if served is not None and served != version:
            raise TeacherCallError(
                f"{self.url} replied with model version {served!r} ({self.version_header}), but this teacher is "
                f"{version!r}: outputs of another version are refused (key {key})",
                processed=True,
                retryable=False,
            )
        reply_type = resp.getheader("Content-Type", "")
        try:
            logits = self.codec.decode(data, reply_type, n)
            if logits.ndim != 2 or len(logits) != n:
                raise ValueError(f"expected 2-D logits with {n} rows, got shape {tuple(logits.shape)}")
        except Exception as err:
            raise TeacherCallError(
                f"reply from {self.url} ({resp.status}, {reply_type or 'no content type'}, {len(data)} bytes, key "
                f"{key}) does not decode with {type(self.codec).__name__}: {type(err).__name__}: {err}",
                processed=True,
                retryable=True,
            ) from err
        return logits.to(torch.float32).contiguous()

    def close(self) -> None:
        """Close the calling thread's connection (others close with their threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _connection(self) -> http.client.HTTPConnection:
        """This thread's open connection; failing to connect is known to be free (nothing was sent)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and _dropped(conn):
            conn.close()
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=self.timeout)
        if conn.sock is None:
            try:
                conn.connect()
            except OSError as err:
                conn.close()
                raise TeacherCallError(
                    f"cannot connect to {self.url}: {type(err).__name__}: {err}", processed=False, retryable=True
                ) from err
        return conn

    def _request(self, method: str, body: bytes | None, headers: dict[str, str]):
        """One request/response exchange; any failure after connecting may have reached the server."""
        conn = self._connection()
        try:
            conn.request(method, self._path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp, resp.read()
        except (OSError, http.client.HTTPException) as err:
            self.close()
            what = "timed out waiting for" if isinstance(err, TimeoutError) else "lost the connection before"
            raise TeacherCallError(
                f"{method} {self.url} {what} the reply ({type(err).__name__}: {err}); the server may have processed "
                f"the request (key {headers.get('Idempotency-Key', '-')})",
                processed=None,
                retryable=True,
            ) from err

    def _status_error(self, resp: http.client.HTTPResponse, data: bytes, key: str) -> TeacherCallError:
        status = resp.status
        processed = False if status in self.unprocessed_statuses else None
        retryable = status in _RETRYABLE_STATUSES or status >= 500
        retry_after = _retry_after(resp.getheader("Retry-After")) if retryable else None
        detail = data[:200].decode("utf-8", "replace")
        return TeacherCallError(
            f"{self.url} answered {status} {resp.reason} (key {key}): {detail}",
            processed=processed,
            retryable=retryable,
            retry_after=retry_after,
        )

    def _check_announced_version(self, version: str) -> None:
        """Once per process, before the first paid call: a server that announces another model version on a (free)
        ``GET`` is refused before anything is paid. A server that announces none, or refuses the ``GET``, is
        checked on every prediction reply instead (by then the call is paid)."""
        if self._announced_checked:
            return
        with self._version_lock:
            if self._announced_checked:
                return
            try:
                served = self._request("GET", None, dict(self.headers))[0].getheader(self.version_header)
            except TeacherCallError:
                served = None
            if served is not None and served != version:
                raise TeacherCallError(
                    f"{self.url} announces model version {served!r} ({self.version_header}), but this teacher is "
                    f"{version!r}: refused before any paid call (set model_version, or point at that model's "
                    "endpoint)",
                    processed=False,
                    retryable=False,
                )
            self._announced_checked = True

    def _probe_version(self) -> str:
        """The version the server announces in ``version_header`` on a GET (free: no prediction is asked for)."""
        try:
            resp, _ = self._request("GET", None, dict(self.headers))
        except TeacherCallError as err:
            raise TeacherCallError(
                f"version probe failed: {err}", processed=False, retryable=err.retryable
            ) from err
        version = resp.getheader(self.version_header)
        if not version:
            raise TeacherCallError(
                f"GET {self.url} ({resp.status}) sent no {self.version_header} header: pass model_version=",
                processed=False,
                retryable=False,
            )
        return version
