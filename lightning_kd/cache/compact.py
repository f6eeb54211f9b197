"""Compaction: fold finished segments into one block sorted by index, so reads gather from a single map."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np

from lightning_kd.cache import format as fmt
from lightning_kd.cache.budget import settle_dead_writers
from lightning_kd.cache.ledger import new_writer_name
from lightning_kd.cache.lock import fsync_dir


def compact(cache) -> bool:
    """See :meth:`TeacherCache.compact`. Returns whether a compacted segment was written."""
    if not cache.lock.writable:
        return False  # a read-only cache is served as it is: compaction is only an optimisation
    with cache.lock:
        cache.refresh()
        settle_dead_writers(cache.ledger, cache.directory, new_writer_name(), cache.holds)
        cache.refresh()
        busy = {v.name for v in cache._views if v.scan.writer and cache.writer_alive(v.scan.writer)}
        folded = [v.name for v in cache._views if v.name not in busy]
        blocks = [b for b, f in enumerate(cache._block_file) if f in folded]
        if len(blocks) <= 1 or cache.damage:
            return False  # nothing to gain, or damage to repair first (`lkd cache repair` compacts around it)
        idx = cache.indices
        idx = idx[np.isin(cache._seg_of[idx], blocks)]
        _write(cache, idx, folded)
        cache.refresh()
    return True


def aside_path(folder: Path, name: str) -> Path:
    """Where a file ``name`` is moved aside in ``folder``, never over an earlier one."""
    path = folder / name
    return path.with_name(f"{name}.{time.time_ns()}") if path.exists() else path


def _write(cache, idx: np.ndarray, supersedes: list[str], aside: Path | None = None) -> None:
    """Write ``idx``'s outputs as one new verified segment, record it, rename it, remove what it replaces.

    With ``aside`` (repair), the replaced files are moved into that folder instead of being removed.
    """
    first = cache._blocks[int(cache._seg_of[idx[0]])]
    width, dtype = first["values"].shape[1], first["values"].dtype
    k = first["topi"].shape[1] if "topi" in first else 0
    token = f"compact-{uuid.uuid4().hex[:12]}"
    name = f"{token}.seg"
    tmp = cache.segments_dir / f".{name}.tmp"

    def chunks():
        for s in range(0, len(idx), fmt.CHUNK_ROWS):
            part = idx[s : s + fmt.CHUNK_ROWS]
            blocks, rows = cache._seg_of[part], cache._row_of[part]
            out = {"index": part, "values": np.empty((len(part), width), dtype)}
            if k:
                out["topi"] = np.empty((len(part), k), np.int32)
            for bid in np.unique(blocks):
                sel = np.flatnonzero(blocks == bid)
                for key in out:
                    if key != "index":
                        out[key][sel] = cache._blocks[bid][key][rows[sel]]
            yield out

    header = fmt.file_header(cache.spec.to_dict(), token)
    fmt.write_compacted(tmp, header, token, len(idx), width, k, dtype, chunks)
    buf = fmt.open_map(tmp)
    scan = fmt.scan(tmp, buf)
    ok = len(scan.blocks) == 1 and not scan.damaged and not fmt.bad_chunks(buf, scan.blocks[0])
    if not ok or not np.array_equal(fmt.arrays(buf, scan.blocks[0])["index"], idx):
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compaction of {cache.directory} did not verify; the original segments are kept")
    del buf
    cache.ledger.append("compact", seg=name, supersedes=supersedes, rows=int(len(idx)))
    tmp.rename(cache.segments_dir / name)
    fsync_dir(cache.segments_dir)
    for old in supersedes:
        if aside is None:
            (cache.segments_dir / old).unlink(missing_ok=True)
        elif (cache.segments_dir / old).exists():
            os.replace(cache.segments_dir / old, aside_path(aside, old))
    fsync_dir(cache.segments_dir)
