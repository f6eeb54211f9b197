"""The ledger: the record of every teacher call ever reserved for one cache, shared by every process.

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

from lightning_kd.cache.errors import CacheCorruptedError, recovery_hint
from lightning_kd.cache.lock import fsync_dir

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
    rounds: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (plan key, round) -> indices bought
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
        elif op == "round":  # a round's selection: the first record for (key, round) is the one every run replays
            self.rounds.setdefault((str(rec["key"]), int(rec["round"])), decode_indices(rec["idx"]))
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
            grow = max(top, 2 * len(self.state)) - len(self.state)
            self.state = np.concatenate([self.state, np.zeros(grow, np.int8)])
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
