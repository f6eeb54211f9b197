"""``lkd cache repair DIR``: make a damaged cache open again, keeping every intact output and every record of
spending. It restores the manifest from its checksummed copies, re-states the readable ledger in a new one,
records outputs the ledger lost track of as paid, and folds the intact rows of damaged segments into one new
segment. It never lowers ``used`` and never deletes a paid output: a damaged file is moved aside
(``ledger.jsonl.damaged-<ns>``, ``manifest.json.damaged-<ns>``, ``damaged/<segment>``), and committed outputs that
are gone are recorded as ``damaged``: paid and lost.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_kd.cache.budget import settle_dead_writers
from lightning_kd.cache.compact import _write, aside_path
from lightning_kd.cache.errors import CacheCorruptedError, CacheMismatchError
from lightning_kd.cache.ledger import LEDGER, Ledger, create_ledger, encode_indices
from lightning_kd.cache.lock import DirectoryLock, fsync_dir, writer_alive
from lightning_kd.cache.spec import CacheSpec
from lightning_kd.cache.store import TeacherCache
from lightning_kd.cache.verify import MANIFEST, LedgerRead, Salvage, _copies, _manifest_state, _spec, read_ledger

REPAIR_WRITER = "repair"


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
    """(a) The cache identity. The ledger's ``open`` record and the segment headers carry checksums; when they all
    agree, a manifest that is missing, unreadable or names another identity (it has no checksum: one flipped
    character can make valid JSON) is restored from them, the old one kept aside."""
    state, stored = _manifest_state(directory)
    copies = {src: _spec(body, src) for src, body in _copies(led, salvage).items()}
    specs = set(copies.values())
    if None in specs or len(specs) > 1:
        listing = "; ".join(f"{src}: {s}" for src, s in copies.items())
        raise CacheMismatchError(f"teacher cache {directory}: the checksummed copies of its identity do not agree "
                                 f"({listing}); repair cannot tell which outputs belong here. Move the foreign "
                                 "segment files out and run repair again.")
    if not specs:
        if stored is None:
            raise CacheCorruptedError(f"teacher cache {directory}: manifest.json is {state} and no copy of the "
                                      "identity survives (ledger and segment headers unreadable)")
        return stored
    spec = specs.pop()
    if stored == spec:
        return spec
    path = directory / MANIFEST
    if path.exists():
        os.replace(path, directory / f"{MANIFEST}.damaged-{stamp}")
        state = "unreadable" if stored is None else f"naming another identity ({stored})"
    tmp = directory / f".manifest.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(json.dumps({"format_version": 2, **spec.to_dict()}, indent=2).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)
    kept = f" (the old one kept as {MANIFEST}.damaged-{stamp})" if state != "missing" else ""
    actions.append(f"restored manifest.json ({state}) from {', '.join(copies)}{kept}")
    return spec


def _rewrite_ledger(directory: Path, spec: CacheSpec, led: LedgerRead, actions: list[str], stamp: int) -> None:
    """Re-state every readable record in a new ledger, built aside and swapped in (the old one is kept)."""
    staging = directory / f".repair-{stamp}"
    staging.mkdir()
    create_ledger(staging, spec.to_dict())
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
