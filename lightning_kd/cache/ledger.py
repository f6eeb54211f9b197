"""The teacher budget: a hard limit on the number of samples the teacher is ever run on, shared by every process.

One append-only ledger per cache directory, ``ledger.jsonl``; every line is ``<JSON>\\t<crc32>`` and carries a
sequence number, so a changed, missing or reordered line is detected, never skipped. Every append happens under
the directory's exclusive lock after re-reading what other processes appended, so any number of concurrent
writers (runs, DDP ranks, sweep workers) decide against the same totals. Records:

``open``     the first line: format version and the cache identity (a copy of the manifest's).
``plan``     the selection, seed and budget that chose a run's samples.
``reserve``  before a teacher call: a *claim* on its dataset indices, its writer, ``n``, and the running total
             ``used`` after it (a cross-check). Other writers skip claimed samples.
``commit``   the outputs are durable in the writer's segment file.
``release``  the call is known to have failed before the teacher processed anything: the samples come back.
``lost``     the call may have been paid but produced no stored output (a failure after sending, invalid outputs,
             or a writer that died: its claims are taken over by the next writer to find its lease free).
``damaged``  committed outputs later found damaged (``lkd cache repair``): still paid, now lost.
``torn``     acknowledges a torn last line (a crash mid-append) so that later lines may follow it.

So ``used`` = reserved − released, ``lost`` = reserved − committed − released − in flight, and nothing a damaged
file does can make ``used`` read lower: a damaged line stops every reader with :class:`CacheCorruptedError`.
Only a torn *last* line — whose append never returned, so its call was never made — is ignored.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_kd.cache.errors import CacheCorruptedError, TeacherBudgetExceeded, recovery_hint
from lightning_kd.cache.lock import DirectoryLock, WriterLease, fsync_dir, lease_path, writer_alive

LEDGER = "ledger.jsonl"
FORMAT_VERSION = 2
FREE, PENDING, STORED = 0, 1, 2


def encode_indices(idx: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.asarray(idx, dtype="<i8").tobytes())).decode()


def decode_indices(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<i8")


def new_writer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass
class Reservation:
    id: str
    writer: str
    n: int
    indices: np.ndarray | None
    status: str = "pending"  # pending -> committed | released | lost


@dataclass
class Ledger:
    """The parsed ledger of one cache directory, read incrementally (only what was appended since)."""

    path: Path | None
    offset: int = 0
    seq: int = -1
    header: dict | None = None
    reservations: dict[str, Reservation] = field(default_factory=dict)
    plans: list[dict] = field(default_factory=list)
    compactions: list[dict] = field(default_factory=list)
    damaged: list[np.ndarray] = field(default_factory=list)
    state: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # per dataset index: FREE/PENDING/STORED
    used: int = 0
    _last_line: bytes = b""
    _torn: tuple[int, bytes] | None = None
    _bad: tuple[int, bytes] | None = None  # a complete line that fails its checksum (must be acknowledged)

    def _fail(self, what: str) -> CacheCorruptedError:
        return CacheCorruptedError(f"teacher budget ledger {self.path}: {what}." + recovery_hint(self.path.parent))

    def refresh(self) -> None:
        """Read lines appended since the last call; raise :class:`CacheCorruptedError` on any damage."""
        if self.path is None:
            return
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            if self.offset:
                raise self._fail("the file disappeared while the cache was in use") from None
            return
        if size < self.offset:
            raise self._fail(f"the file shrank from {self.offset} to {size} bytes")
        with open(self.path, "rb") as f:
            if self._last_line:
                f.seek(self.offset - len(self._last_line))
                if f.read(len(self._last_line)) != self._last_line:
                    raise self._fail(f"line {self.seq} changed after it was read")
            f.seek(self.offset)
            data = f.read(size - self.offset)
        pos = 0
        self._torn = None
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end == -1:
                self._torn = (self.offset + pos, data[pos:])
                break
            self._line(self.offset + pos, data[pos : end + 1])
            pos = end + 1
        self.offset += pos
        if self._bad is not None:
            raise self._fail(f"line {self.seq + 1} (byte {self._bad[0]}) is damaged: it fails its checksum")

    def _line(self, at: int, raw: bytes) -> None:
        body, _, crc = raw.rstrip(b"\n").rpartition(b"\t")
        try:
            if zlib.crc32(body) != int(crc, 16):
                raise ValueError
            rec = json.loads(body)
            if not isinstance(rec, dict) or not isinstance(rec.get("op"), str):
                raise ValueError
        except ValueError:
            if self._bad is not None:
                raise self._fail(f"line {self.seq + 1} (byte {self._bad[0]}) is damaged: it fails its checksum")
            self._bad = (at, raw)
            return
        if self._bad is not None:  # only an acknowledged torn line may stand before a good one
            bad_at, bad_raw = self._bad
            if not (rec["op"] == "torn" and rec.get("offset") == bad_at and rec.get("crc") == zlib.crc32(bad_raw)):
                raise self._fail(f"line {self.seq + 1} (byte {bad_at}) is damaged: it fails its checksum")
            self._bad = None
        if rec.get("seq") != self.seq + 1:
            raise self._fail(f"line at byte {at} has sequence number {rec.get('seq')}, expected {self.seq + 1} "
                             "(a line is missing or out of order)")
        try:
            self._apply(rec)
        except (KeyError, TypeError, ValueError) as err:
            raise self._fail(f"line {self.seq + 1} is not a valid {rec['op']!r} record ({err!r})") from None
        self.seq += 1
        self._last_line = raw

    def _apply(self, rec: dict) -> None:
        op = rec["op"]
        if (op == "open") != (self.seq == -1):
            raise ValueError("the first line, and only it, is the 'open' record")
        if op == "open":
            if rec["format"] != FORMAT_VERSION:
                raise ValueError(f"ledger format {rec['format']}, this library reads {FORMAT_VERSION}")
            self.header = rec
        elif op == "reserve":
            n = int(rec["n"])
            idx = decode_indices(rec["idx"]) if rec.get("idx") else None
            if n < 1 or (idx is not None and len(idx) != n) or rec["id"] in self.reservations:
                raise ValueError("bad reservation")
            self.used += n
            if int(rec["used"]) != self.used:
                raise ValueError(f"running total {self.used} != recorded {rec['used']}: an earlier line is missing")
            self.reservations[rec["id"]] = Reservation(str(rec["id"]), str(rec["writer"]), n, idx)
            self._mark(idx, PENDING)
        elif op in ("commit", "release", "lost"):
            res = self.reservations[rec["id"]]
            if res.status != "pending":
                raise ValueError(f"reservation {res.id} is already {res.status}")
            res.status = {"commit": "committed", "release": "released", "lost": "lost"}[op]
            self._mark(res.indices, STORED if op == "commit" else FREE)
            if op == "release":
                self.used -= res.n
        elif op == "plan":
            self.plans.append(rec)
        elif op == "compact":
            self.compactions.append(rec)
        elif op == "damaged":
            self.damaged.append(decode_indices(rec["idx"]))
            self._mark(self.damaged[-1], FREE)  # paid and lost: free to be bought again with budget left
        elif op != "torn":
            raise ValueError(f"unknown op {op!r}")

    def append(self, op: str, **fields) -> dict:
        """Validate, apply and durably append one record (the caller holds the lock and has just refreshed).

        An in-memory ledger (``path=None``) only applies it.
        """
        rec = {"seq": self.seq + 1, "op": op, **fields}
        if self._torn is not None:  # terminate a torn last line and acknowledge it, so that lines may follow it
            at, frag = self._torn
            ack = {"seq": self.seq + 1, "op": "torn", "offset": at, "crc": zlib.crc32(frag + b"\n")}
            rec["seq"] += 1
            lines = [b"\n", _line_bytes(ack), _line_bytes(rec)]
        else:
            lines = [_line_bytes(rec)]
        self._apply(rec)  # validates before anything is written
        if self.path is None:
            self.seq = rec["seq"]
            return rec
        try:
            new = not self.path.exists()
            with open(self.path, "ab") as f:
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
                self.offset = f.tell()
            if new:
                fsync_dir(self.path.parent)
        except BaseException:
            self.__dict__.update(Ledger(self.path).__dict__)  # forget the applied record; re-read on next use
            raise
        self.seq, self._last_line, self._torn = rec["seq"], lines[-1], None
        return rec

    # -- views --------------------------------------------------------------------------------------------------
    def pending(self) -> list[Reservation]:
        return [r for r in self.reservations.values() if r.status == "pending"]

    def _mark(self, idx: np.ndarray | None, value: int) -> None:
        if idx is None or not len(idx):
            return
        top = int(idx.max()) + 1
        if top > len(self.state):
            self.state = np.concatenate([self.state, np.zeros(max(top, 2 * len(self.state)) - len(self.state), np.int8)])
        self.state[idx] = value

    def status(self, indices: np.ndarray) -> np.ndarray:
        """FREE / PENDING / STORED of each of ``indices`` (the latest record about it wins)."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.zeros(len(idx), dtype=np.int8)
        inside = idx < len(self.state)
        out[inside] = self.state[idx[inside]]
        return out

    def committed_indices(self) -> np.ndarray:
        """Samples whose outputs were committed and not later found damaged."""
        return np.flatnonzero(self.state == STORED)


def holds_outputs(directory: Path) -> bool:
    """Whether ``directory`` shows evidence of a cache: a manifest or any segment file."""
    seg = directory / "segments"
    return (directory / "manifest.json").exists() or (seg.is_dir() and any(seg.iterdir()))


def create_ledger(directory: Path, spec: dict | None) -> None:
    """Create ``directory/ledger.jsonl`` with its ``open`` record, atomically (no torn first line is possible)."""
    tmp = directory / f".{LEDGER}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(_line_bytes({"seq": 0, "op": "open", "format": FORMAT_VERSION, "spec": spec}))
        f.flush()
        os.fsync(f.fileno())
    os.link(tmp, directory / LEDGER)  # fails if another process created it first: never overwrite a ledger
    tmp.unlink()
    fsync_dir(directory)


def _line_bytes(rec: dict) -> bytes:
    body = json.dumps(rec, separators=(",", ":")).encode()
    return body + b"\t" + f"{zlib.crc32(body):08x}".encode() + b"\n"


def settle_dead_writers(ledger: Ledger, directory: Path, me: str, recovered=None) -> None:
    """Close the pending reservations of writers whose lease is free (under the lock, freshly refreshed).

    ``recovered(token, writer)`` says whether the outputs reached disk before the writer died (then the
    reservation is committed); otherwise it is recorded as lost: paid, and its samples free to be bought again.
    """
    for r in ledger.pending():
        if r.writer == me or writer_alive(directory, r.writer):
            continue
        if recovered is not None and recovered(r.id, r.writer):
            ledger.append("commit", id=r.id, by=me, recovered=True)
        else:
            ledger.append("lost", id=r.id, by=me, why=f"writer {r.writer} died before storing the outputs")
        lease_path(directory, r.writer).unlink(missing_ok=True)


@dataclass(frozen=True)
class LedgerSummary:
    """Totals over every writer that ever used the cache, in samples."""

    used: int  # committed + lost + in flight
    committed: int
    lost: int
    in_flight: int
    requests: int  # reservations still counted (each one a teacher request)
    writers_in_flight: tuple[str, ...] = ()


class TeacherBudget:
    """At most ``total`` teacher calls (counted in samples) for the cache in ``directory``, across processes.

    ``reserve(n, indices)`` raises :class:`TeacherBudgetExceeded` before a call that would exceed ``total`` and
    journals the reservation (a claim on ``indices``); ``commit`` / ``release`` / ``lose`` close it. ``claim``
    picks samples no live writer holds, taking over the claims of dead writers (counted as lost). Without a
    ``directory`` the budget lives in memory only (tests, one-off use).
    """

    def __init__(self, total: int, directory: str | Path | None = None, *, writer: str | None = None) -> None:
        if isinstance(total, bool) or not isinstance(total, int | np.integer) or total < 0:
            raise ValueError(f"budget must be an integer >= 0, got {total!r}")
        self.total = int(total)
        self.writer = writer or new_writer_name()
        self.directory = Path(directory) if directory is not None else None
        self._floor = 0  # `used` restored from a checkpoint, when larger than the ledger says
        self._lease: WriterLease | None = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.lock = DirectoryLock(self.directory)
            self.ledger = Ledger(self.directory / LEDGER)
            with self.lock:
                self.ledger.refresh()
                if self.ledger.header is None:
                    if self.ledger.path.exists() or holds_outputs(self.directory):  # creation is atomic
                        raise self.ledger._fail("the file is missing, empty or has no readable first line, but the "
                                                "directory holds a cache")
                    if self.lock.writable:
                        create_ledger(self.directory, None)
                        self.ledger.refresh()
        else:
            self.lock, self.ledger = DirectoryLockStub(), Ledger(None)
            self.ledger.append("open", format=FORMAT_VERSION, spec=None)

    # -- reading ------------------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        self.ledger.refresh()

    def summary(self) -> LedgerSummary:
        with self.lock:
            self._refresh()
            return self._summary()

    def _summary(self) -> LedgerSummary:
        led = self.ledger
        committed = sum(r.n for r in led.reservations.values() if r.status == "committed")
        damaged = sum(len(d) for d in led.damaged)
        live, dead = [], 0
        for r in led.pending():
            if r.writer == self.writer or self._alive(r.writer):
                live.append(r)
            else:
                dead += r.n
        lost = sum(r.n for r in led.reservations.values() if r.status == "lost") + dead + damaged
        requests = sum(1 for r in led.reservations.values() if r.status != "released")
        writers = tuple(sorted({r.writer for r in live}))
        return LedgerSummary(led.used, committed - damaged, lost, sum(r.n for r in live), requests, writers)

    def _alive(self, writer: str) -> bool:
        return self.directory is not None and writer_alive(self.directory, writer)

    @property
    def used(self) -> int:
        """Samples the teacher has been (or may have been) run on, over all runs on this cache."""
        return max(self.summary().used, self._floor)

    @property
    def remaining(self) -> int:
        return max(self.total - self.used, 0)

    @property
    def lost(self) -> int:
        return self.summary().lost

    @property
    def in_flight(self) -> int:
        return self.summary().in_flight

    # -- writing ------------------------------------------------------------------------------------------------
    def _hold_lease(self) -> None:
        if self._lease is None and self.directory is not None:
            if not self.lock.writable:
                raise PermissionError(f"teacher cache {self.directory} is read-only: no teacher call can be recorded")
            self._lease = WriterLease(self.directory, self.writer)

    def _check(self, n: int) -> None:
        used = max(self.ledger.used, self._floor)
        if used + n > self.total:
            s = self._summary()
            raise TeacherBudgetExceeded(
                f"teacher budget exceeded: {n} more sample(s) requested, {used} of {self.total} used "
                f"({s.committed} committed, {s.in_flight} in flight, {s.lost} lost; {max(self.total - used, 0)} "
                "remaining). No call was made."
            )

    def reserve(self, n: int, indices: np.ndarray | None = None) -> str:
        """Journal a reservation of ``n`` samples (a claim on ``indices``) before calling the teacher."""
        with self.lock:
            self._refresh()
            self._check(n)
            self._hold_lease()
            return self._reserve(n, indices)

    def _reserve(self, n: int, indices: np.ndarray | None) -> str:
        token = uuid.uuid4().hex[:12]
        idx = None if indices is None else encode_indices(indices)
        self.ledger.append("reserve", id=token, writer=self.writer, n=n, idx=idx, used=self.ledger.used + n)
        return token

    def claim(self, candidates: np.ndarray, max_n: int, *, recovered=None) -> tuple[str, np.ndarray] | None:
        """Reserve up to ``max_n`` of ``candidates`` (in their order) that have no outputs and no live claim.

        Claims of dead writers are taken over first: ``recovered(reservation)`` says whether their outputs
        reached disk anyway (then they are committed), else they are recorded as lost. Returns ``None`` when no
        candidate is free; raises :class:`TeacherBudgetExceeded` when some are but no budget is left.
        """
        with self.lock:
            self._refresh()
            self._take_over(recovered)
            free = self.free(candidates)
            if not len(free):
                return None
            n = min(max_n, len(free), self.total - max(self.ledger.used, self._floor))
            if n <= 0:
                self._check(1)
            self._hold_lease()
            idx = free[:n]
            return self._reserve(n, idx), idx

    def free(self, candidates: np.ndarray) -> np.ndarray:
        """``candidates`` without committed outputs and without a pending claim (call under the lock)."""
        candidates = np.asarray(candidates)
        return candidates[self.ledger.status(candidates) == FREE]

    def _take_over(self, recovered) -> None:
        settle_dead_writers(self.ledger, self.directory, self.writer, recovered)

    def commit(self, token: str, **where) -> None:
        """The outputs of reservation ``token`` are durable in the cache: the samples stay counted."""
        with self.lock:
            self._refresh()
            self.ledger.append("commit", id=token, **where)

    def release(self, token: str) -> None:
        """The call of ``token`` failed before the teacher processed anything: give the samples back."""
        with self.lock:
            self._refresh()
            self.ledger.append("release", id=token)

    def lose(self, token: str, why: str) -> None:
        """The call of ``token`` may have been paid but left no stored output: it stays counted, as lost."""
        with self.lock:
            self._refresh()
            self.ledger.append("lost", id=token, why=why)

    def record(self, op: str, **fields) -> None:
        """Append a bookkeeping record (``plan``, ``compact``, ``damaged``) under the lock."""
        with self.lock:
            self._refresh()
            self.ledger.append(op, **fields)

    def close(self) -> None:
        """End this writer: its still-pending reservations are lost; other writers no longer wait for it.

        The budget object stays usable; its next reservation starts a new writer (a new name and segment file).
        """
        if self._lease is None:
            return
        with self.lock:
            self._refresh()
            for r in self.ledger.pending():
                if r.writer == self.writer:
                    self.ledger.append("lost", id=r.id, why="its writer stopped before storing the outputs")
            self._lease.release()
            self._lease = None
        self.writer = new_writer_name()  # a later fill is a new writer: its segment file is never a replaced one

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        s = self.summary()
        return {"total": self.total, "used": max(s.used, self._floor), "lost": s.lost}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore from a checkpoint: ``used`` never goes below what the checkpoint recorded."""
        self._floor = max(self._floor, int(state.get("used", 0)))

    def __repr__(self) -> str:
        s = self.summary()
        return (f"TeacherBudget(total={self.total}, used={max(s.used, self._floor)}, remaining={self.remaining}, "
                f"in_flight={s.in_flight}, lost={s.lost})")


class DirectoryLockStub:
    """The lock of an in-memory budget: nothing to lock."""

    writable = True

    def __enter__(self) -> DirectoryLockStub:
        return self

    def __exit__(self, *exc) -> None:
        return None
