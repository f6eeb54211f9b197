"""``lkd cache verify|repair DIR``: report what a damaged cache still holds, and keep it.

Both work on the directory itself, exactly when :class:`~lightning_kd.cache.TeacherCache` refuses to open it.
:func:`verify` only reads: the ledger line by line (a damaged line is noted, the others still count), every segment
block's checksums, and the identity copies. :func:`repair` restores the manifest from its copies, re-states the
readable ledger in a new one, records outputs the ledger lost track of as paid, and folds the intact rows of
damaged segments into one new segment. It never lowers ``used`` and never deletes a paid output: a damaged file
is moved aside (``ledger.jsonl.damaged-<ns>``, ``manifest.json.damaged-<ns>``, ``damaged/<segment>``), and
committed outputs that are gone are recorded as ``damaged``: paid and lost.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lightning_kd.cache import format as fmt
from lightning_kd.cache.compact import _write, aside_path
from lightning_kd.cache.errors import CacheCorruptedError, CacheMismatchError
from lightning_kd.cache.ledger import (
    LEDGER,
    Ledger,
    Reservation,
    create_ledger,
    decode_indices,
    encode_indices,
    settle_dead_writers,
)
from lightning_kd.cache.lock import DirectoryLock, fsync_dir, writer_alive
from lightning_kd.cache.store import CacheSpec, TeacherCache, read_manifest

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


# -- repair ---------------------------------------------------------------------------------------------------------
@dataclass
class RepairReport:
    """What :func:`repair` did, one line per action; ``used`` before (as far as readable) and after."""

    directory: Path
    actions: list[str]
    used_before: int
    used_after: int
    kept: int  # intact outputs served after the repair
    lost: list[int]  # committed dataset indices recorded as damaged (paid and lost)

    def __str__(self) -> str:
        head = f"repaired teacher cache {self.directory}" if self.actions else f"teacher cache {self.directory}: " \
            "nothing to repair"
        body = [f"  - {a}" for a in self.actions]
        tail = f"  used {self.used_before} -> {self.used_after}; {self.kept} intact outputs kept, {len(self.lost)} lost"
        return "\n".join([head, *body, tail])


def repair(directory: str | Path, *, used_at_least: int | None = None) -> RepairReport:
    """Make ``directory`` open again, keeping every intact output and every record of spending.

    ``used_at_least`` raises ``used`` to a figure known from elsewhere (a checkpoint, a bill) when the damaged
    ledger lines held more than the readable evidence proves.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no teacher cache at {directory}")
    lock = DirectoryLock(directory)
    if not lock.writable:
        raise PermissionError(f"teacher cache {directory} is read-only: repair it on a writable copy")
    with lock:
        report = _repair(directory, used_at_least)
    lock.close()
    TeacherCache(directory)  # the point of it all: it opens (raises otherwise)
    return report


def _repair(directory: Path, used_at_least: int | None) -> RepairReport:
    writers = directory / "writers"
    alive = [p.stem for p in writers.glob("*.lock")] if writers.is_dir() else []
    alive = [w for w in alive if writer_alive(directory, w)]
    if alive:
        raise RuntimeError(f"teacher cache {directory} has live writers ({', '.join(alive)}): stop them first")
    actions: list[str] = []
    stamp = time.time_ns()
    led = read_ledger(directory / LEDGER)
    used_before = max(led.used, led.max_used)
    salvage = Salvage(directory, [r for r in led.records if r["op"] == "compact"], led.reservations)
    spec = _identity(directory, led, salvage, actions, stamp)

    if not led.ok:  # (b) re-state the readable lines in a new ledger, then swap it in atomically
        _rewrite_ledger(directory, spec, led, actions, stamp)
    ledger = Ledger(directory / LEDGER)
    ledger.refresh()

    salvage = Salvage(directory, ledger.compactions, ledger.reservations)
    settle_dead_writers(ledger, directory, REPAIR_WRITER, lambda token, writer: token in salvage.tokens)

    unpaid = np.setdiff1d(salvage.indices, _paid(ledger))  # (c) the cache proves these were paid
    if len(unpaid):
        token = f"repair-{uuid.uuid4().hex[:8]}"
        ledger.append("reserve", id=token, writer=REPAIR_WRITER, n=int(len(unpaid)), idx=encode_indices(unpaid),
                      used=ledger.used + len(unpaid))
        ledger.append("commit", id=token, by=REPAIR_WRITER, recovered=True)
        actions.append(f"recorded {len(unpaid)} stored outputs that had no reservation as paid (committed)")
    target = max(led.used, led.max_used, len(salvage.indices), used_at_least or 0, used_before)
    if ledger.used < target:
        token = f"repair-{uuid.uuid4().hex[:8]}"
        short = target - ledger.used
        ledger.append("reserve", id=token, writer=REPAIR_WRITER, n=short, idx=None, used=target)
        ledger.append("lost", id=token, by=REPAIR_WRITER, why="paid according to evidence the repair could not read")
        actions.append(f"recorded {short} samples as paid and lost (used {target}: damaged lines or --used-at-least)")

    lost = np.setdiff1d(ledger.committed_indices(), salvage.indices)  # (d) paid, now lost
    if len(lost):
        ledger.append("damaged", idx=encode_indices(lost), by=REPAIR_WRITER)
        actions.append(f"recorded {len(lost)} committed outputs as damaged (paid and lost; buying them again needs "
                       "new budget)")
    if salvage.problems:
        _fold(directory, salvage, ledger, spec, actions)
    return RepairReport(directory, actions, used_before, ledger.used, len(salvage.indices), lost.tolist())


def _paid(ledger: Ledger) -> np.ndarray:
    parts = [r.indices for r in ledger.reservations.values() if r.status != "released" and r.indices is not None]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _identity(directory: Path, led: LedgerRead, salvage: Salvage, actions: list[str], stamp: int) -> CacheSpec:
    """(a) The cache identity all readable copies agree on; a missing or unreadable manifest is restored."""
    state, stored = _manifest_state(directory)
    copies = {src: _spec(body, src) for src, body in _copies(led, salvage).items()}
    if stored is not None:
        copies = {"manifest.json": stored, **copies}
    specs = set(copies.values())
    if None in specs or len(specs) != 1:
        listing = "; ".join(f"{src}: {s}" for src, s in copies.items()) or "none found"
        raise CacheMismatchError(f"teacher cache {directory}: the copies of its identity do not agree ({listing}); "
                                 "repair cannot tell which outputs belong here. Move the foreign files out"
                                 + (" (only manifest.json, which has no checksum, differs: if it was damaged rather "
                                    "than replaced, move it aside and run repair again)"
                                    if stored is not None and len(set(copies.values()) - {stored}) == 1 and
                                    len(copies) > 1 and list(copies.values()).count(stored) == 1 else "") + ".")
    spec = specs.pop()
    if stored is None:
        path = directory / MANIFEST
        if path.exists():
            os.replace(path, directory / f"{MANIFEST}.damaged-{stamp}")
        tmp = directory / f".manifest.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps({"format_version": 2, **asdict(spec)}, indent=2).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
        kept = f" (the unreadable one kept as {MANIFEST}.damaged-{stamp})" if state != "missing" else ""
        actions.append(f"restored manifest.json ({state}) from {', '.join(copies)}{kept}")
    return spec


def _rewrite_ledger(directory: Path, spec: CacheSpec, led: LedgerRead, actions: list[str], stamp: int) -> None:
    """Re-state every readable record in a new ledger, built aside and swapped in (the old one is kept)."""
    staging = directory / f".repair-{stamp}"
    staging.mkdir()
    create_ledger(staging, asdict(spec))
    new = Ledger(staging / LEDGER)
    new.refresh()
    skipped = 0
    for rec in led.records:
        op, fields = rec["op"], {k: v for k, v in rec.items() if k not in ("seq", "op")}
        if op in ("open", "torn"):
            continue
        if op == "reserve":
            fields["used"] = new.used + int(fields.get("n", 0))
        try:
            new.append(op, **fields)
        except (KeyError, TypeError, ValueError, zlib.error):
            skipped += 1  # e.g. the commit of a reservation whose line is unreadable
    aside = directory / f"{LEDGER}.damaged-{stamp}"
    if led.exists:
        os.link(directory / LEDGER, aside)
    os.replace(staging / LEDGER, directory / LEDGER)
    shutil.rmtree(staging)
    fsync_dir(directory)
    what = "missing" if not led.exists else f"damaged: {led.strict_error}"
    actions.append(f"rebuilt the ledger ({what}) from its {len(led.records)} readable lines"
                   + (f", kept the old one as {aside.name}" if led.exists else "")
                   + (f"; unreadable: {'; '.join(led.bad[:5])}" if led.bad else "")
                   + (f"; {skipped} records that referred to unreadable lines were not re-stated" if skipped else ""))


def _fold(directory: Path, salvage: Salvage, ledger: Ledger, spec: CacheSpec, actions: list[str]) -> None:
    """(d) Write the intact rows of all live segments into one new segment; move the old files to damaged/."""
    aside = directory / "damaged"
    aside.mkdir(exist_ok=True)
    live = salvage.live
    salvage.spec, salvage.ledger = spec, ledger
    if len(salvage.indices):
        _write(salvage, salvage.indices, live, aside=aside)
    else:
        for name in live:
            os.replace(salvage.segments_dir / name, aside_path(aside, name))
        fsync_dir(salvage.segments_dir)
    actions.append(f"wrote the {len(salvage.indices)} intact outputs into one new segment; moved "
                   f"{', '.join(live)} to {aside} ({'; '.join(salvage.problems[:3])})")
