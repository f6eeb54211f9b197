"""TeacherCache: an on-disk, memory-mapped store of teacher outputs keyed by dataset index.

Layout of a cache directory::

    manifest.json                      what the outputs are: teacher, dataset and view fingerprints, storage
                                       dtype, number of classes, format version (written once, atomically)
    segments/<name>.index.npy          int64 (n,)    dataset indices of the segment's rows
    segments/<name>.values.npy         (n, C) fp32/fp16 logits, or (n, k + 1) fp16 for top-k (see below)
    segments/<name>.topi.npy           int32 (n, k)  top-k class ids (top-k storage only)
    segments/<name>.json               the segment's commit record: row count, size and sha256 of each file
    ledger/<writer>.jsonl              the teacher budget's journals (see :mod:`lightning_kd.budget`)

A segment is committed when its record appears: data files are written to temporary names, fsynced and renamed
first, the record last. A crash at any instant therefore leaves every committed segment readable and loses at
most the segment in flight (its files have no record and are removed on the next open). Records of different
writers never collide, so DDP ranks commit concurrently without locks. :meth:`TeacherCache.compact` merges
segments into one (new segment committed before the old records are removed), so reads gather from a single
memory map.

Top-k storage keeps the k largest logits exactly (fp16) and one value r for all other classes, chosen so that
their total probability mass at T = 1 is preserved: r = logsumexp(rest) - log(C - k).
"""

from __future__ import annotations

import json
import mmap
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lightning_kd.budget import _fsync_dir
from lightning_kd.utils import sha256_file

FORMAT_VERSION = 1
StorageDtype = Literal["float32", "float16", "topk"]


class CacheMismatchError(ValueError):
    """The cache directory holds outputs of another teacher, dataset, view protocol or format."""


class CacheCorruptedError(RuntimeError):
    """A committed file of the cache is missing, truncated or fails its checksum."""


@dataclass(frozen=True)
class CacheSpec:
    """What the cached outputs are; a cache whose manifest differs in any field is refused."""

    teacher: str
    dataset: str
    view: str
    num_classes: int
    dtype: StorageDtype = "float32"
    topk: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "topk"):
            raise ValueError(f"dtype must be 'float32', 'float16' or 'topk', got {self.dtype!r}")
        if self.dtype == "topk" and not (self.topk and 0 < self.topk < self.num_classes):
            raise ValueError(f"topk storage needs 0 < topk < num_classes ({self.num_classes}), got {self.topk}")
        if self.dtype != "topk" and self.topk is not None:
            raise ValueError(f"topk={self.topk} is only meaningful with dtype='topk'")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype, fill: Callable[[np.ndarray], None]) -> dict:
    """Write an .npy file through a memory map (no in-memory copy), fsync it, rename it into place.

    Returns its size and sha256, for the commit record.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    fill(out)
    out.flush()
    del out
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    meta = {"bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    os.replace(tmp, path)
    return meta


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map an .npy file for random row reads (no read-ahead of neighbouring pages)."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    mm = getattr(array, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return array


def encode_topk(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, C) logits -> fp16 (n, k + 1) [top-k logits, rest value r] and int32 (n, k) class ids."""
    top, ids = logits.topk(k, dim=1)
    rest = logits.scatter(1, ids, float("-inf"))
    r = torch.logsumexp(rest, dim=1, keepdim=True) - np.log(logits.shape[1] - k)
    return torch.cat([top, r], 1).to(torch.float16).numpy(), ids.to(torch.int32).numpy()


def decode_topk(values: np.ndarray, ids: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse of :func:`encode_topk`: float32 (n, C) logits with the rest classes at the value r."""
    v = torch.from_numpy(np.asarray(values, dtype=np.float32))
    out = v[:, -1:].expand(-1, num_classes).clone()
    return out.scatter_(1, torch.from_numpy(np.asarray(ids, dtype=np.int64)), v[:, :-1])


class TeacherCache:
    """Teacher outputs on disk, keyed by dataset index, read through memory maps.

    Opening an existing directory checks its manifest against ``spec`` (raising :class:`CacheMismatchError`
    naming every differing field) and every committed file's size, and with ``verify=True`` its sha256
    (raising :class:`CacheCorruptedError` naming the file). ``reset=True`` starts a new cache when the
    manifest differs: the old directory is moved aside to ``<directory>.stale-<time>``, never deleted.
    """

    def __init__(
        self, directory: str | Path, spec: CacheSpec | None = None, *, verify: bool = True, reset: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.segments_dir = self.directory / "segments"
        manifest = self.directory / "manifest.json"
        if manifest.exists():
            stored = self._read_manifest(manifest)
            if spec is not None and stored != spec:
                if not reset:
                    diffs = [
                        f"{k}: cache has {getattr(stored, k)!r}, requested {getattr(spec, k)!r}"
                        for k in asdict(spec)
                        if getattr(stored, k) != getattr(spec, k)
                    ]
                    raise CacheMismatchError(
                        f"teacher cache {self.directory} was made for other outputs ("
                        + "; ".join(diffs)
                        + "). Use another cache directory, or reset=True to move this one aside and start anew."
                    )
                os.replace(self.directory, self.directory.with_name(f"{self.directory.name}.stale-{time.time_ns()}"))
                self._create(spec)
            else:
                self.spec = stored
        elif spec is None:
            raise FileNotFoundError(
                f"no teacher cache at {self.directory} (manifest.json missing) and no spec to create one"
            )
        else:
            self._create(spec)
        self.verify = verify
        self._verified: set[str] = set()
        self.refresh()

    # -- manifest ---------------------------------------------------------------------------------------------
    def _create(self, spec: CacheSpec) -> None:
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        body = {"format_version": FORMAT_VERSION, **asdict(spec)}
        _atomic_write(self.directory / "manifest.json", json.dumps(body, indent=2).encode())
        _fsync_dir(self.directory)
        self.spec = spec

    def _read_manifest(self, path: Path) -> CacheSpec:
        try:
            body = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CacheCorruptedError(f"{path} is not valid JSON: {err}") from err
        version = body.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise CacheMismatchError(f"{path}: cache format version {version}, this library reads {FORMAT_VERSION}")
        try:
            return CacheSpec(**body)
        except TypeError as err:
            raise CacheCorruptedError(f"{path}: unexpected manifest fields: {err}") from err

    # -- reading ----------------------------------------------------------------------------------------------
    def _records(self) -> dict[str, dict]:
        records = {}
        for rec_path in sorted(self.segments_dir.glob("*.json")):
            try:
                records[rec_path.stem] = json.loads(rec_path.read_text())
            except json.JSONDecodeError as err:
                raise CacheCorruptedError(f"commit record {rec_path} is not valid JSON: {err}") from err
        return records

    def refresh(self) -> None:
        """(Re)load the committed segments, verify their files and build the index lookup."""
        records = self._records()
        superseded = {name for rec in records.values() for name in rec.get("supersedes", [])}
        for name in superseded & records.keys():  # a compaction committed but crashed before removing these
            (self.segments_dir / f"{name}.json").unlink(missing_ok=True)
            del records[name]
        self._segments: list[dict[str, np.ndarray]] = []
        self._names: list[str] = []
        for name, rec in records.items():
            self._segments.append(self._open_segment(rec))
            self._names.append(name)
        self._build_lookup()

    def _open_segment(self, rec: dict) -> dict[str, np.ndarray]:
        """Check a committed segment's files (size always; sha256 once per process with ``verify``) and map them."""
        arrays = {}
        for fname, meta in rec["files"].items():
            path = self.segments_dir / fname
            if not path.exists():
                raise CacheCorruptedError(f"committed file {path} is missing")
            if path.stat().st_size != meta["bytes"]:
                raise CacheCorruptedError(
                    f"committed file {path} is truncated or altered: {path.stat().st_size} bytes, "
                    f"expected {meta['bytes']}"
                )
            if self.verify and fname not in self._verified:
                if sha256_file(path) != meta["sha256"]:
                    raise CacheCorruptedError(f"committed file {path} fails its sha256 checksum: its content changed")
                self._verified.add(fname)  # committed files never change: one check per process is enough
            try:
                arrays[fname.split(".")[-2]] = _open_npy(path)
            except ValueError as err:
                raise CacheCorruptedError(f"committed file {path} is not a readable .npy file: {err}") from err
        return arrays

    def _build_lookup(self) -> None:
        n = max((int(s["index"].max()) + 1 for s in self._segments if len(s["index"])), default=0)
        self._seg_of = np.full(n, -1, dtype=np.int32)
        self._row_of = np.full(n, -1, dtype=np.int64)
        for sid, seg in enumerate(self._segments):
            idx = np.asarray(seg["index"])
            self._seg_of[idx] = sid
            self._row_of[idx] = np.arange(len(idx))

    @property
    def indices(self) -> np.ndarray:
        """Sorted dataset indices that have committed outputs."""
        return np.flatnonzero(self._seg_of >= 0)

    def __len__(self) -> int:
        return int((self._seg_of >= 0).sum())

    def contains(self, indices: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``indices`` have committed outputs."""
        idx = np.asarray(indices, dtype=np.int64)
        inside = idx < len(self._seg_of)
        out = np.zeros(len(idx), dtype=bool)
        out[inside] = self._seg_of[idx[inside]] >= 0
        return out

    def get(self, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float32 logits (B, C) for dataset ``indices``; raises KeyError naming indices without outputs."""
        idx = np.asarray(indices, dtype=np.int64)
        missing = idx[~self.contains(idx)]
        if len(missing):
            raise KeyError(
                f"no cached teacher outputs for dataset indices {missing[:10].tolist()} ({len(missing)} in all)"
            )
        segs, rows = self._seg_of[idx], self._row_of[idx]
        if len(self._segments) == 1:
            return self._decode(self._segments[0], rows)
        out = torch.empty(len(idx), self.spec.num_classes)
        for sid in np.unique(segs):
            sel = np.flatnonzero(segs == sid)
            out[torch.from_numpy(sel)] = self._decode(self._segments[sid], rows[sel])
        return out

    def _decode(self, seg: dict[str, np.ndarray], rows: np.ndarray) -> torch.Tensor:
        values = seg["values"][rows]
        if self.spec.dtype == "topk":
            return decode_topk(values, seg["topi"][rows], self.spec.num_classes)
        return torch.from_numpy(np.asarray(values, dtype=np.float32))

    # -- writing ----------------------------------------------------------------------------------------------
    def validate(self, indices: np.ndarray, logits: torch.Tensor) -> None:
        """Raise ValueError (before anything is stored) for wrong shapes, non-finite values or re-used indices."""
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
        present = np.asarray(indices)[self.contains(indices)]
        if len(present):
            raise ValueError(
                f"dataset indices {present[:10].tolist()} already have cached outputs; they are never overwritten"
            )

    def write(self, indices: np.ndarray | torch.Tensor, logits: torch.Tensor, writer: str = "main") -> str:
        """Validate and atomically commit one segment of outputs; returns the segment name."""
        idx = np.asarray(indices, dtype=np.int64)
        logits = logits.detach().to("cpu", torch.float32)
        self.validate(idx, logits)
        if self.spec.dtype == "topk":
            values, topi = encode_topk(logits, self.spec.topk)
            arrays = {"index": idx, "values": values, "topi": topi}
        else:
            arrays = {"index": idx, "values": logits.numpy().astype(self.spec.dtype)}
        name, record = self._commit(
            {k: (v.shape, v.dtype, lambda out, v=v: out.__setitem__(..., v)) for k, v in arrays.items()}, writer
        )
        self._verified.update(record["files"])
        self._segments.append(self._open_segment(record))
        self._names.append(name)
        self._extend_lookup(idx, len(self._segments) - 1)
        return name

    def _commit(self, parts: dict[str, tuple], writer: str, supersedes: list[str] | None = None) -> tuple[str, dict]:
        """Write data files ``{key: (shape, dtype, fill)}``, then the commit record (the commit point)."""
        name = f"seg-{writer}-{time.time_ns()}-{uuid.uuid4().hex[:6]}"
        files = {
            f"{name}.{key}.npy": _write_npy(self.segments_dir / f"{name}.{key}.npy", *part)
            for key, part in parts.items()
        }
        _fsync_dir(self.segments_dir)
        record = {"rows": parts["index"][0][0], "files": files, "supersedes": supersedes or []}
        _atomic_write(self.segments_dir / f"{name}.json", json.dumps(record).encode())
        _fsync_dir(self.segments_dir)
        return name, record

    def _extend_lookup(self, idx: np.ndarray, sid: int) -> None:
        n = int(idx.max()) + 1 if len(idx) else 0
        if n > len(self._seg_of):
            self._seg_of = np.concatenate([self._seg_of, np.full(n - len(self._seg_of), -1, np.int32)])
            self._row_of = np.concatenate([self._row_of, np.full(n - len(self._row_of), -1, np.int64)])
        self._seg_of[idx] = sid
        self._row_of[idx] = np.arange(len(idx))

    def compact(self, writer: str = "compact") -> None:
        """Merge all segments into one (sorted by index) so reads gather from a single memory map, and remove
        data files that no commit record references (superseded, or written by a crashed write).

        The merged segment is committed first, naming the segments it supersedes; only then are their records
        and files removed. A crash in between leaves both, and the next open drops the superseded records.
        Run it from one process at a time (it deletes files other writers might be about to commit).
        """
        if len(self._segments) > 1:
            idx = self.indices
            segs, rows = self._seg_of[idx], self._row_of[idx]
            order = np.argsort(segs, kind="stable")
            bounds = np.searchsorted(segs[order], np.arange(len(self._segments) + 1))

            def gather(key: str) -> Callable[[np.ndarray], None]:
                def fill(out: np.ndarray) -> None:  # segment by segment: memory stays at one segment's rows
                    for sid, seg in enumerate(self._segments):
                        sel = order[bounds[sid] : bounds[sid + 1]]
                        out[sel] = seg[key][rows[sel]]

                return fill

            first = self._segments[0]
            parts = {key: ((len(idx),) + first[key].shape[1:], first[key].dtype, gather(key)) for key in first}
            old = list(self._names)
            self._commit(parts, writer, supersedes=old)
            for name in old:
                (self.segments_dir / f"{name}.json").unlink(missing_ok=True)
            _fsync_dir(self.segments_dir)
            self.refresh()
        live = {f for rec in self._records().values() for f in rec["files"]}
        for path in self.segments_dir.glob("*.npy"):
            if path.name not in live:
                path.unlink()

    def __repr__(self) -> str:
        s = self.spec
        return f"TeacherCache({str(self.directory)!r}, {len(self)} outputs, dtype={s.dtype}, classes={s.num_classes})"
