"""``lkd cache verify DIR``: report what a cache holds, exactly when :class:`~lightning_kd.cache.TeacherCache`
refuses to open it. It only reads: the ledger line by line (a damaged line is noted, the others still count),
every segment block's checksums, and the copies of the identity. :mod:`.repair` builds on what it reads.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_kd.cache import format as fmt
from lightning_kd.cache.errors import CacheCorruptedError, CacheMismatchError
from lightning_kd.cache.ledger import LEDGER, Ledger, Reservation, decode_indices
from lightning_kd.cache.lock import DirectoryLock, writer_alive
from lightning_kd.cache.spec import CacheSpec, read_manifest

MANIFEST = "manifest.json"
REPAIR_WRITER = "repair"


# -- the ledger, read tolerantly ------------------------------------------------------------------------------------
@dataclass
class LedgerRead:
    """What the readable lines of a ledger prove; damaged lines are listed, not applied."""

    path: Path
    exists: bool = False
    records: list[dict] = field(default_factory=list)  # lines that pass their checksum, in file order
    bad: list[str] = field(default_factory=list)  # one entry per unreadable line: "line N (byte B): why"
    torn_tail: int = 0  # bytes of an unterminated last line
    strict_error: str | None = None  # why `Ledger` refuses the file (None: it reads it)
    spec: dict | None = None
    reservations: dict[str, Reservation] = field(default_factory=dict)
    max_used: int = 0  # the largest running total any readable reserve line recorded

    @property
    def ok(self) -> bool:
        return self.exists and self.strict_error is None

    @property
    def used(self) -> int:
        """Reserved minus released, over the readable lines."""
        return sum(r.n for r in self.reservations.values() if r.status != "released")

    def total(self, status: str) -> int:
        return sum(r.n for r in self.reservations.values() if r.status == status)

    def paid_indices(self) -> np.ndarray:
        parts = [r.indices for r in self.reservations.values() if r.status != "released" and r.indices is not None]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def read_ledger(path: Path) -> LedgerRead:
    """Parse every line of ``path`` on its own; a line that fails its checksum is noted and skipped."""
    out = LedgerRead(Path(path))
    if not out.path.exists():
        out.strict_error = "the file is missing"
        return out
    out.exists = True
    data = out.path.read_bytes()
    pos, lineno, bad_at = 0, 0, {}
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end == -1:
            out.torn_tail = len(data) - pos
            break
        raw, lineno = data[pos : end + 1], lineno + 1
        rec = _parse_line(raw)
        if isinstance(rec, str):
            bad_at[pos] = (zlib.crc32(raw), f"line {lineno} (byte {pos}): {rec}")
        elif rec["op"] == "torn" and bad_at.get(rec.get("offset"), (None,))[0] == rec.get("crc"):
            del bad_at[rec["offset"]]  # an acknowledged torn line: a crash mid-append, not damage
        else:
            out.records.append(rec)
        pos = end + 1
    out.bad = [why for _, why in bad_at.values()]
    for rec in out.records:
        _apply_tolerantly(out, rec)
    try:
        strict = Ledger(out.path)
        strict.refresh()
        if strict.header is None:
            out.strict_error = "no readable 'open' record" + (f" ({out.torn_tail} bytes without a line end)"
                                                               if out.torn_tail else " (the file is empty)")
    except CacheCorruptedError as err:
        out.strict_error = str(err).split(": ", 1)[-1].split(". Run `lkd", 1)[0]
    return out


def _parse_line(raw: bytes) -> dict | str:
    body, _, crc = raw.rstrip(b"\n").rpartition(b"\t")
    try:
        if zlib.crc32(body) != int(crc, 16):
            return "fails its checksum"
        rec = json.loads(body)
    except ValueError:
        return "fails its checksum"
    if not isinstance(rec, dict) or not isinstance(rec.get("op"), str):
        return "not a ledger record"
    return rec


def _apply_tolerantly(out: LedgerRead, rec: dict) -> None:
    op = rec["op"]
    try:
        if op == "open" and out.spec is None:
            out.spec = rec.get("spec")
        elif op == "reserve" and rec["id"] not in out.reservations:
            idx = decode_indices(rec["idx"]) if rec.get("idx") else None
            out.reservations[rec["id"]] = Reservation(str(rec["id"]), str(rec["writer"]), int(rec["n"]), idx)
            out.max_used = max(out.max_used, int(rec["used"]))
        elif op in ("commit", "release", "lost"):
            res = out.reservations.get(rec["id"])
            if res is not None and res.status == "pending":
                res.status = {"commit": "committed", "release": "released", "lost": "lost"}[op]
    except (KeyError, TypeError, ValueError, zlib.error):
        out.bad.append(f"seq {rec.get('seq')}: not a valid {op!r} record")


# -- segments -------------------------------------------------------------------------------------------------------
@dataclass
class SegmentReport:
    name: str
    live: bool
    blocks: int = 0
    intact_rows: int = 0
    damaged_rows: int = 0
    damaged: list[str] = field(default_factory=list)
    torn_tail: int = 0
    spec: dict | None = None


class Salvage:
    """The intact rows of the live segments (first copy of an index wins, in the store's order).

    Quacks like the :class:`TeacherCache` that :func:`~lightning_kd.cache.compact._write` reads from.
    """

    def __init__(self, directory: Path, compactions: list[dict], reservations: dict[str, Reservation]) -> None:
        self.directory = Path(directory)
        self.segments_dir = self.directory / "segments"
        files = sorted(self.segments_dir.glob("*.seg")) if self.segments_dir.is_dir() else []
        recorded = {c["seg"] for c in compactions}
        superseded = {n for c in compactions if (self.segments_dir / c["seg"]).exists() for n in c["supersedes"]}
        self.files = [SegmentReport(p.name, p.name not in superseded) for p in files]
        self.problems: list[str] = []
        self.tokens: dict[str, str] = {}  # intact block token -> its file
        self._blocks: list[dict[str, np.ndarray]] = []
        idx_parts, owner_parts, row_parts = [], [], []
        for report in self.files:
            buf = fmt.open_map(self.segments_dir / report.name)
            scan = fmt.scan(self.segments_dir / report.name, buf)
            report.spec, report.torn_tail, report.damaged = scan.spec, scan.torn_tail, list(scan.damaged)
            report.blocks = len(scan.blocks)
            for block in scan.blocks:
                good = np.ones(block.rows, dtype=bool)
                for a, b in fmt.bad_chunks(buf, block):
                    good[a:b] = False
                    report.damaged.append(f"block at byte {block.offset}: rows {a}..{b} fail their checksum")
                report.intact_rows += int(good.sum())
                report.damaged_rows += int((~good).sum())
                res = reservations.get(block.token)
                if report.live and report.name not in recorded and (res is None or res.status == "released"):
                    self.problems.append(f"{report.name} at byte {block.offset}: {block.rows} outputs under "
                                         f"reservation {block.token!r}, which the ledger "
                                         f"{'released' if res else 'does not know'}")
                if not report.live or not good.any():
                    continue
                self.tokens[block.token] = report.name
                arrays = fmt.arrays(buf, block)
                rows = np.flatnonzero(good)
                idx_parts.append(arrays["index"][rows])
                row_parts.append(rows)
                owner_parts.append(np.full(len(rows), len(self._blocks), dtype=np.int32))
                self._blocks.append(arrays)
            if report.live:
                self.problems += [f"{report.name}: {d}" for d in report.damaged]
        idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
        n = int(idx.max()) + 1 if len(idx) else 0
        self._seg_of = np.full(n, -1, dtype=np.int32)
        self._row_of = np.full(n, -1, dtype=np.int64)
        if len(idx):
            first = np.unique(idx, return_index=True)[1]
            self._seg_of[idx[first]] = np.concatenate(owner_parts)[first]
            self._row_of[idx[first]] = np.concatenate(row_parts)[first]
        self.indices = np.flatnonzero(self._seg_of >= 0)

    @property
    def live(self) -> list[str]:
        return [f.name for f in self.files if f.live]


# -- verify ---------------------------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    """What :func:`verify` found; ``str()`` is the human report, ``ok`` whether the cache opens as it is."""

    directory: Path
    manifest: str  # "ok", "missing" or "unreadable (why)"
    manifest_copies: list[str]
    ledger: str  # "ok", "missing" or why it is refused
    bad_lines: list[str]
    paid: int  # what the readable evidence proves was spent (ledger lines, recorded totals, stored outputs)
    committed: int
    lost: int
    in_flight: int
    segments: list[SegmentReport]
    intact: int  # distinct dataset indices with an intact stored output
    damaged: int  # committed outputs that are not intact (missing or failing their checksum)
    unpaid: int  # intact outputs that no readable reservation pays for
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        copies = f" (copies: {', '.join(self.manifest_copies)})" if self.manifest_copies else " (no copy found)"
        lines = [f"teacher cache {self.directory}: {'intact' if self.ok else 'DAMAGED'}",
                 f"  manifest: {self.manifest}{copies if self.manifest != 'ok' else ''}",
                 f"  ledger:   {self.ledger}"]
        lines += [f"    unreadable {b}" for b in self.bad_lines[:10]]
        lines.append(f"  paid {self.paid}: {self.committed} committed, {self.lost} lost, {self.in_flight} in flight")
        for s in self.segments:
            state = "" if s.live else " (superseded)"
            torn = f", torn tail {s.torn_tail} B" if s.torn_tail else ""
            lines.append(f"  segments/{s.name}{state}: {s.intact_rows} intact rows, {s.damaged_rows} damaged{torn}")
            lines += [f"    {d}" for d in s.damaged[:5]]
        lines.append(f"  outputs: {self.intact} intact, {self.damaged} committed but damaged or missing, "
                     f"{self.unpaid} without a reservation")
        if not self.ok:
            lines.append(f"  run `lkd cache repair {self.directory}` to keep what is intact")
        return "\n".join(lines)


def _manifest_state(directory: Path) -> tuple[str, CacheSpec | None]:
    path = directory / MANIFEST
    if not path.exists():
        return "missing", None
    try:
        return "ok", read_manifest(path)
    except (CacheCorruptedError, CacheMismatchError, OSError) as err:
        return f"unreadable ({str(err).split('. Run `lkd', 1)[0]})", None


def _copies(led: LedgerRead, salvage: Salvage) -> dict[str, dict]:
    """The identity copies: the ledger's ``open`` record and every readable segment header."""
    out = {"ledger open record": led.spec} if led.spec is not None else {}
    out.update({f"segments/{s.name} header": s.spec for s in salvage.files if s.spec is not None})
    return out


def verify(directory: str | Path) -> VerifyReport:
    """Report what ``directory`` holds: manifest, ledger, every segment; writes nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no teacher cache at {directory}")
    with DirectoryLock(directory) as lock:
        del lock
        return _verify(directory)


def _verify(directory: Path) -> VerifyReport:
    manifest, spec = _manifest_state(directory)
    led = read_ledger(directory / LEDGER)
    strict = Ledger(directory / LEDGER)
    if led.ok:
        strict.refresh()
    compactions = strict.compactions if led.ok else [r for r in led.records if r["op"] == "compact"]
    salvage = Salvage(directory, compactions, strict.reservations if led.ok else led.reservations)
    problems = list(salvage.problems)
    copies = _copies(led, salvage)
    if manifest != "ok" and (salvage.files or led.reservations):
        problems.append(f"manifest.json is {manifest}")
    if spec is not None:
        problems += [f"{src} names another identity" for src, c in copies.items() if _spec(c, src) != spec]
    if not led.ok and (led.exists or salvage.files):
        problems.append(f"ledger: {led.strict_error}")
    damaged_idx = [decode_indices(r["idx"]) for r in led.records if r["op"] == "damaged" and "idx" in r]
    done = [r.indices for r in led.reservations.values() if r.status == "committed" and r.indices is not None]
    committed = np.setdiff1d(np.concatenate(done or [np.zeros(0, np.int64)]), np.concatenate(damaged_idx or [[]]))
    missing = np.setdiff1d(committed, salvage.indices)
    anonymous = sum(r.n for r in led.reservations.values() if r.status != "released" and r.indices is None)
    unpaid = np.setdiff1d(salvage.indices, led.paid_indices())
    if len(missing):
        problems.append(f"{len(missing)} committed outputs are missing or damaged")
    if len(unpaid) > anonymous:
        problems.append(f"{len(unpaid)} stored outputs have no reservation in the ledger")
    pending = [r for r in led.reservations.values() if r.status == "pending"]
    dead = sum(r.n for r in pending if not writer_alive(directory, r.writer))
    n_damaged = sum(len(d) for d in damaged_idx)
    return VerifyReport(
        directory=directory,
        manifest=manifest,
        manifest_copies=list(copies),
        ledger="ok" if led.ok else (led.strict_error or "missing"),
        bad_lines=led.bad,
        paid=max(led.used + len(unpaid), led.max_used),
        committed=led.total("committed") - n_damaged,
        lost=led.total("lost") + dead + n_damaged,
        in_flight=sum(r.n for r in pending) - dead,
        segments=salvage.files,
        intact=len(salvage.indices),
        damaged=len(missing),
        unpaid=len(unpaid),
        problems=problems,
    )


def _spec(body: object, source: str) -> CacheSpec | None:
    try:
        return CacheSpec.from_dict(body, source)
    except CacheCorruptedError:
        return None
