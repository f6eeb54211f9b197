"""TeacherCache: an on-disk, memory-mapped store of teacher outputs keyed by dataset index.

Layout of a cache directory::

    manifest.json        the cache's identity: teacher, dataset and view fingerprints, storage dtype, classes
    ledger.jsonl         the teacher budget's ledger (:mod:`lightning_kd.cache.ledger`); keeps a copy of the identity
    segments/<writer>.seg   one append-only file per writer: a block per teacher batch (:mod:`.format`)
    segments/compact-*.seg  compacted segments: one block, checksummed per 1,024 rows
    writers/<writer>.lock   the lease a live writer holds (:mod:`.lock`); lock   the directory lock

What the cache holds is evidence of what was spent, and the ledger is the record of what was paid: on every open
both are read and checked against each other. Outputs the ledger has no reservation for, committed outputs that
are missing or fail their checksum, a manifest that is gone while outputs remain, or a segment made for another
identity stop the run with :class:`CacheCorruptedError` (or :class:`CacheMismatchError`) naming the file and
the ``lkd cache`` command that recovers; nothing is ever deleted to make the two agree.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from lightning_kd.cache import format as fmt
from lightning_kd.cache.errors import CacheCorruptedError, CacheMismatchError, recovery_hint
from lightning_kd.cache.ledger import Ledger, create_ledger, encode_indices, new_writer_name
from lightning_kd.cache.lock import DirectoryLock, fsync_dir, writer_alive
from lightning_kd.cache.spec import (
    CacheSpec,
    as_features,
    as_logits,
    decode_features,
    decode_topk,
    encode_rows,
    read_manifest,
)


@dataclass
class SegmentView:
    """One mapped segment file: its scan, its memory map, and the blocks served from it."""

    name: str
    scan: fmt.SegmentScan
    buf: object


class TeacherCache:
    """Teacher outputs on disk, keyed by dataset index, read through memory maps.

    Opening checks the manifest against ``spec`` (:class:`CacheMismatchError` naming every differing field),
    cross-checks outputs and ledger, and with ``verify=True`` every block's checksums (once per process).
    ``reset=True`` starts a new cache when the manifest differs: the old directory is moved aside to
    ``<directory>.stale-<time>``, never deleted.
    """

    def __init__(
        self, directory: str | Path, spec: CacheSpec | None = None, *, verify: bool = True, reset: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.segments_dir = self.directory / "segments"
        self.verify = verify
        self._verified: set[tuple[str, int]] = set()
        if not self.directory.exists() and spec is None:
            raise FileNotFoundError(f"no teacher cache at {self.directory} and no spec to create one")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lock = DirectoryLock(self.directory)
        self.ledger = Ledger(self.directory / "ledger.jsonl")
        with self.lock:
            self.ledger.refresh()
            self.spec = self._open_identity(spec, reset)
        self.refresh()

    # -- identity -------------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"

    def _open_identity(self, spec: CacheSpec | None, reset: bool) -> CacheSpec:
        if not self.manifest_path.exists():
            if self.ledger.reservations or self._segment_files():
                raise CacheCorruptedError(
                    f"teacher cache {self.directory}: manifest.json is missing but the directory holds paid teacher "
                    "outputs or budget records; the manifest is never recreated from a new request."
                    + recovery_hint(self.directory) + " (repair restores it from the copies in the ledger and segments)"
                )
            if spec is None:
                raise FileNotFoundError(f"no teacher cache at {self.directory} (manifest.json missing) and no spec")
            return self._create(spec)
        stored = read_manifest(self.manifest_path)
        copy = (self.ledger.header or {}).get("spec")
        if copy is not None and CacheSpec.from_dict(copy, self.ledger.path) != stored:
            raise CacheCorruptedError(
                f"teacher cache {self.directory}: manifest.json names {stored} but the ledger was opened for "
                f"{copy}: the manifest was replaced." + recovery_hint(self.directory)
            )
        if spec is not None and stored != spec:
            if not reset:
                diffs = [f"{k}: cache has {getattr(stored, k)!r}, requested {getattr(spec, k)!r}"
                         for k in (f.name for f in fields(spec)) if getattr(stored, k) != getattr(spec, k)]
                raise CacheMismatchError(
                    f"teacher cache {self.directory} was made for other outputs (" + "; ".join(diffs)
                    + "). Use another cache directory, or reset=True to move this one aside and start anew."
                )
            self.lock.close()
            os.replace(self.directory, self.directory.with_name(f"{self.directory.name}.stale-{time.time_ns()}"))
            self.directory.mkdir()
            self.lock = DirectoryLock(self.directory)
            self.ledger = Ledger(self.directory / "ledger.jsonl")
            with self.lock:
                return self._create(spec)
        return stored

    def _create(self, spec: CacheSpec) -> CacheSpec:
        """A new cache (under the lock): the ledger (with a copy of the identity) first, the manifest last."""
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        if not self.ledger.path.exists():
            create_ledger(self.directory, spec.to_dict())
        self.ledger.refresh()
        tmp = self.directory / f".manifest.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(json.dumps({"format_version": 2, **spec.to_dict()}, indent=2).encode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest_path)
        fsync_dir(self.directory)
        return spec

    # -- reading --------------------------------------------------------------------------------------------------
    def _segment_files(self) -> list[Path]:
        return sorted(self.segments_dir.glob("*.seg")) if self.segments_dir.is_dir() else []

    def _live_files(self) -> list[Path]:
        """Segment files that serve outputs: all but those a recorded (and present) compaction replaced.

        A compaction is recorded before its file is renamed into place, so a record whose file is absent (a crash
        in between) never took effect. Under the lock, on a writable directory, ``.tmp`` leftovers of crashed
        writes are removed here, and so are replaced files a crash left behind — only once the file that replaced
        them verifies (else they are kept: they may be the last intact copy).
        """
        done = [c for c in self.ledger.compactions if (self.segments_dir / c["seg"]).exists()]
        superseded = {name for c in done for name in c["supersedes"]}
        files = self._segment_files()
        if self.lock.writable and self.segments_dir.is_dir():
            for path in self.segments_dir.glob(".*.tmp"):
                path.unlink(missing_ok=True)
            for c in done:
                left = [p for p in files if p.name in c["supersedes"]]
                if left and _intact(self.segments_dir / c["seg"]):
                    for path in left:
                        path.unlink(missing_ok=True)
        return [p for p in files if p.name not in superseded]

    def holds(self, token: str, writer: str) -> bool:
        """Whether ``writer``'s segment holds an intact block of reservation ``token`` (a takeover's question)."""
        path = self.segments_dir / f"{writer}.seg"
        if not path.exists():
            return False
        buf = fmt.open_map(path)
        return any(b.token == token and not fmt.bad_chunks(buf, b) for b in fmt.scan(path, buf).blocks)

    def refresh(self) -> None:
        """Re-read the ledger, map the live segments, verify them, and rebuild the index lookup."""
        with self.lock:
            self.ledger.refresh()
            files = self._live_files()
            self._views = [SegmentView(p.name, *self._map(p)) for p in files]
        self._build_lookup()

    def _map(self, path: Path) -> tuple[fmt.SegmentScan, object]:
        buf = fmt.open_map(path)
        scan = fmt.scan(path, buf)
        if scan.spec is not None:
            seg_spec = CacheSpec.from_dict(scan.spec, path)
            if seg_spec != self.spec:
                raise CacheMismatchError(
                    f"segment {path} holds outputs for {seg_spec}, but this cache is {self.spec}: outputs of another "
                    "teacher, dataset or view were put into this directory; move that file out."
                )
        return scan, buf

    def _build_lookup(self) -> None:
        """Index -> (block, row) over intact blocks; cross-check with the ledger; fail closed on any damage."""
        led = self.ledger
        known = {r.id: r for r in led.reservations.values()}
        compactions = {c["seg"]: c for c in led.compactions}
        self._blocks: list[dict[str, np.ndarray]] = []
        self._block_file: list[str] = []
        self.damage: list[str] = []
        self.tokens: set[str] = set()
        owner_parts, row_parts, idx_parts = [], [], []
        for view in self._views:
            self.damage += [f"{view.name}: {d}" for d in view.scan.damaged]
            for block in view.scan.blocks:
                res = known.get(block.token)
                if view.name not in compactions and (res is None or res.status == "released"):
                    self.damage.append(f"{view.name} at byte {block.offset}: {block.rows} outputs under reservation "
                                       f"{block.token!r}, which the ledger {'released' if res else 'does not know'}")
                    continue
                arrays = fmt.arrays(view.buf, block)
                good = np.ones(block.rows, dtype=bool)
                if self.verify and (view.name, block.offset) not in self._verified:
                    for a, b in fmt.bad_chunks(view.buf, block):
                        good[a:b] = False
                        self.damage.append(f"{view.name} at byte {block.offset}: rows {a}..{b} fail their checksum")
                    if good.all():
                        self._verified.add((view.name, block.offset))
                self.tokens.add(block.token)
                bid = len(self._blocks)
                self._blocks.append(arrays)
                self._block_file.append(view.name)
                rows = np.flatnonzero(good)
                idx_parts.append(arrays["index"][rows])
                row_parts.append(rows)
                owner_parts.append(np.full(len(rows), bid, dtype=np.int32))
        idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
        n = int(idx.max()) + 1 if len(idx) else 0
        self._seg_of = np.full(n, -1, dtype=np.int32)
        self._row_of = np.full(n, -1, dtype=np.int64)
        if len(idx):
            first = np.unique(idx, return_index=True)[1]  # duplicates (a re-bought sample): the first copy serves
            self._seg_of[idx[first]] = np.concatenate(owner_parts)[first]
            self._row_of[idx[first]] = np.concatenate(row_parts)[first]
        self._cross_check()

    def _cross_check(self) -> None:
        led, have = self.ledger, self.indices
        missing = np.setdiff1d(led.committed_indices(), have)
        paid = [r.indices for r in led.reservations.values() if r.status != "released" and r.indices is not None]
        anonymous = sum(r.n for r in led.reservations.values() if r.status != "released" and r.indices is None)
        unpaid = np.setdiff1d(have, np.concatenate(paid)) if paid else have
        problems = list(self.damage)
        if led.header is None and self._views:
            problems.insert(0, f"{led.path.name} is missing or has no readable first line, but outputs are stored")
        if len(missing):
            problems.append(f"{len(missing)} committed outputs are missing or damaged (dataset indices "
                            f"{missing[:8].tolist()}{' ...' if len(missing) > 8 else ''})")
        if len(unpaid) > anonymous:
            problems.append(f"{len(unpaid)} stored outputs have no reservation in the ledger: ledger lines are "
                            "missing, so it would read as less spent than the cache proves")
        if problems:
            raise CacheCorruptedError(f"teacher cache {self.directory} is damaged: " + "; ".join(problems[:6])
                                      + ("; ..." if len(problems) > 6 else "") + "." + recovery_hint(self.directory))

    @property
    def indices(self) -> np.ndarray:
        """Sorted dataset indices that have stored outputs."""
        return np.flatnonzero(self._seg_of >= 0)

    def __len__(self) -> int:
        return int((self._seg_of >= 0).sum())

    @property
    def n_blocks(self) -> int:
        return len(self._blocks)

    def contains(self, indices: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``indices`` have stored outputs."""
        idx = np.asarray(indices, dtype=np.int64)
        inside = idx < len(self._seg_of)
        out = np.zeros(len(idx), dtype=bool)
        out[inside] = self._seg_of[idx[inside]] >= 0
        return out

    def get(self, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float32 logits (B, C) for dataset ``indices``; raises KeyError naming indices without outputs."""
        idx = self._present(indices)
        blocks, rows = self._seg_of[idx], self._row_of[idx]
        if len(self._blocks) == 1:
            return self._decode(self._blocks[0], rows)
        out = torch.empty(len(idx), self.spec.num_classes)
        for bid in np.unique(blocks):
            sel = np.flatnonzero(blocks == bid)
            out[torch.from_numpy(sel)] = self._decode(self._blocks[bid], rows[sel])
        return out

    def get_features(self, indices: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """``{name: float32 (B, *shape)}``: the teacher features stored with the logits of ``indices``."""
        idx = self._present(indices)
        blocks, rows = self._seg_of[idx], self._row_of[idx]
        if len(self._blocks) == 1:
            return decode_features(self.spec, self._blocks[0]["values"][rows])
        values = np.empty((len(idx), self.spec.width), self.spec.storage)
        for bid in np.unique(blocks):
            sel = np.flatnonzero(blocks == bid)
            values[sel] = self._blocks[bid]["values"][rows[sel]]
        return decode_features(self.spec, values)

    def _present(self, indices: torch.Tensor | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        missing = idx[~self.contains(idx)]
        if len(missing):
            raise KeyError(
                f"no cached teacher outputs for dataset indices {missing[:10].tolist()} ({len(missing)} in all)"
            )
        return idx

    def _decode(self, block: dict[str, np.ndarray], rows: np.ndarray) -> torch.Tensor:
        values = block["values"]
        values = values[rows] if not self.spec.features else values[rows, : self.spec.logit_columns]
        if self.spec.dtype == "topk":
            return decode_topk(values, block["topi"][rows], self.spec.num_classes)
        return torch.from_numpy(np.asarray(values, dtype=np.float32))

    # -- writing --------------------------------------------------------------------------------------------------
    def validate(self, indices: np.ndarray, logits: torch.Tensor, features: dict | None = None) -> dict:
        """Raise ValueError (before anything is stored) for wrong shapes, non-finite values or re-used indices;
        return the features as checked float32 tensors (:func:`~lightning_kd.cache.spec.as_features`)."""
        n, c = len(indices), self.spec.num_classes
        if logits.ndim != 2 or logits.shape != (n, c):
            raise ValueError(
                f"teacher outputs have shape {tuple(logits.shape)}, expected ({n}, {c}) logits for {n} samples"
            )
        if not torch.isfinite(logits).all():
            bad = (~torch.isfinite(logits)).any(1).nonzero().flatten()[:10]
            raise ValueError(
                f"teacher outputs contain NaN/inf for dataset indices {np.asarray(indices)[bad.numpy()].tolist()}"
            )
        if n == 0:
            raise ValueError("no outputs to write")
        if len(np.unique(indices)) != n:
            raise ValueError("duplicate dataset indices in one write")
        return as_features(self.spec, n, features) if self.spec.features or features else {}

    def append(self, writer: str, token: str, indices: np.ndarray, logits: torch.Tensor,
               features: dict | None = None) -> dict:
        """Make one batch of outputs (logits, and the spec's teacher features) durable in ``writer``'s segment
        (before the next teacher call).

        Returns where it lies (``{"seg", "offset"}``, for the ledger's commit record). The lookup is not
        extended: call :meth:`refresh` to serve what was appended.
        """
        idx = np.asarray(indices, dtype=np.int64)
        logits = as_logits(logits)
        values, topi = encode_rows(self.spec, logits, self.validate(idx, logits, features))
        path = self.segments_dir / f"{writer}.seg"
        block = fmt.encode_block(token, idx, values, topi)
        offset = fmt.append(path, block, fmt.file_header(self.spec.to_dict(), writer))
        return {"seg": path.name, "offset": offset}

    def write(self, indices: np.ndarray | torch.Tensor, logits: torch.Tensor, features: dict | None = None) -> str:
        """Store outputs obtained outside a budgeted fill: recorded in the ledger as paid, then served."""
        idx = np.asarray(indices, dtype=np.int64)
        present = idx[self.contains(idx)]
        if len(present):
            raise ValueError(f"dataset indices {present[:10].tolist()} already have cached outputs; they are never "
                             "overwritten")
        self.validate(idx, as_logits(logits), features)
        self._writer = getattr(self, "_writer", None) or new_writer_name()  # one segment file per cache object
        writer, token = self._writer, uuid.uuid4().hex[:12]
        with self.lock:
            self.ledger.refresh()
            self.ledger.append("reserve", id=token, writer=writer, n=len(idx), idx=encode_indices(idx),
                               used=self.ledger.used + len(idx))
            try:
                where = self.append(writer, token, idx, logits, features)
            except BaseException:
                self.ledger.append("lost", id=token, why="the write failed")
                raise
            self.ledger.append("commit", id=token, **where)
        self.refresh()
        return where["seg"]

    def compact(self) -> bool:
        """Fold the finished segments into one block (sorted by index) for single-map reads; returns whether it did.

        Segments of live writers are left alone; on a read-only directory nothing happens. The compacted file is
        written, fsynced and verified before the ledger records it, and the segments it replaces are removed
        only after that record: a crash at any point leaves every output readable.
        """
        from lightning_kd.cache.compact import compact

        return compact(self)

    def __getstate__(self) -> dict:
        """DataLoader workers started by spawn/forkserver reopen the directory (maps and locks do not pickle)."""
        return {"directory": self.directory, "spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["spec"], verify=False)  # the parent verified it

    def writer_alive(self, name: str) -> bool:
        return writer_alive(self.directory, name)

    def __repr__(self) -> str:
        s = self.spec
        return f"TeacherCache({str(self.directory)!r}, {len(self)} outputs, dtype={s.dtype}, classes={s.num_classes})"


def _intact(path: Path) -> bool:
    """Whether a segment file scans clean and every chunk passes its checksum."""
    buf = fmt.open_map(path)
    scan = fmt.scan(path, buf)
    return not scan.damaged and not scan.torn_tail and not any(fmt.bad_chunks(buf, b) for b in scan.blocks)
