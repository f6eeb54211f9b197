"""The segment file format: self-describing, append-only files of checksummed blocks of teacher outputs.

A segment file is a file header followed by blocks::

    file header   b"LKDSEG02" | u32 length | u32 crc32 | JSON {"spec": the cache identity, "writer": name}
    block         header (64 B) | index int64 (n) | values (n, width) fp32/fp16 | topi int32 (n, k) |
                  crc32 table (one per chunk of CHUNK_ROWS rows) | trailer (a copy of the header)

Every writer appends one block per teacher batch to its own file (fsynced before its next teacher call), so a
hard kill loses at most the batch in flight; compaction writes one large block. Damage is contained: a bad chunk
costs its rows; a damaged block header is recovered from its trailer; a torn last block (a crash mid-append) is
recognised and skipped. Space is reserved with ``posix_fallocate`` before anything is written, so a full disk is
an ``OSError`` naming the file and the bytes needed, never a crash.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FILE_MAGIC = b"LKDSEG02"
BLOCK_MAGIC = b"LKDBLK02"
CHUNK_ROWS = 1024
_HEADER = struct.Struct("<8sIIIIB3x24sI4xI")  # magic, rows, chunk_rows, width, k, dtype, token, table_crc, crc
DTYPES = {1: np.dtype("float32"), 2: np.dtype("float16")}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


@dataclass
class Block:
    """Where one block's arrays lie in its file, read from its (verified) header."""

    offset: int
    token: str
    rows: int
    chunk_rows: int
    width: int
    k: int
    dtype: np.dtype
    table_crc: int

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def layout(self) -> dict[str, tuple[int, int]]:
        """``{part: (offset, bytes)}`` of index, values, topi and the crc table."""
        pos, out = self.offset + _HEADER.size, {}
        for part, nbytes in (
            ("index", self.rows * 8),
            ("values", self.rows * self.width * self.dtype.itemsize),
            ("topi", self.rows * self.k * 4),
            ("table", self.n_chunks * 4),
        ):
            out[part] = (pos, nbytes)
            pos += _pad8(nbytes)
        return out

    @property
    def end(self) -> int:
        off, n = self.layout()["table"]
        return off + _pad8(n) + _HEADER.size


def _pack_header(token: str, rows: int, chunk_rows: int, width: int, k: int, dtype: np.dtype, table_crc: int) -> bytes:
    body = _HEADER.pack(BLOCK_MAGIC, rows, chunk_rows, width, k, DTYPE_CODES[dtype], token.encode(), table_crc, 0)
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


def _parse_header(buf, offset: int) -> Block | None:
    raw = bytes(buf[offset : offset + _HEADER.size])
    if len(raw) < _HEADER.size or raw[:8] != BLOCK_MAGIC:
        return None
    magic, rows, chunk_rows, width, k, code, token, table_crc, crc = _HEADER.unpack(raw)
    if zlib.crc32(raw[:-4]) != crc or code not in DTYPES or rows == 0 or chunk_rows == 0:
        return None
    return Block(offset, token.rstrip(b"\0").decode("ascii", "replace"), rows, chunk_rows, width, k, DTYPES[code],
                 table_crc)


def _chunk_crcs(index: np.ndarray, values: np.ndarray, topi: np.ndarray | None, chunk_rows: int) -> np.ndarray:
    crcs = []
    for s in range(0, len(index), chunk_rows):
        c = zlib.crc32(np.ascontiguousarray(index[s : s + chunk_rows]).data)
        c = zlib.crc32(np.ascontiguousarray(values[s : s + chunk_rows]).data, c)
        if topi is not None:
            c = zlib.crc32(np.ascontiguousarray(topi[s : s + chunk_rows]).data, c)
        crcs.append(c)
    return np.asarray(crcs, dtype="<u4")


def file_header(spec: dict, writer: str) -> bytes:
    body = json.dumps({"spec": spec, "writer": writer}, sort_keys=True).encode()
    raw = FILE_MAGIC + struct.pack("<II", len(body), zlib.crc32(body)) + body
    return raw + b"\0" * (_pad8(len(raw)) - len(raw))


def encode_block(token: str, index: np.ndarray, values: np.ndarray, topi: np.ndarray | None = None) -> bytes:
    """One block holding ``index`` (n,), ``values`` (n, width) and optional ``topi`` (n, k), as bytes."""
    index = np.ascontiguousarray(index, dtype="<i8")
    values = np.ascontiguousarray(values)
    k = 0 if topi is None else topi.shape[1]
    if topi is not None:
        topi = np.ascontiguousarray(topi, dtype="<i4")
    table = _chunk_crcs(index, values, topi, CHUNK_ROWS)
    header = _pack_header(token, len(index), CHUNK_ROWS, values.shape[1], k, values.dtype, zlib.crc32(table.data))
    parts = [header]
    for arr in (index, values, topi, table):
        if arr is None:
            continue
        raw = arr.tobytes()
        parts += [raw, b"\0" * (_pad8(len(raw)) - len(raw))]
    return b"".join(parts) + header


def _no_space(path: Path, nbytes: int, err: OSError) -> OSError:
    return OSError(err.errno, f"cannot write {nbytes} bytes to {path}: {os.strerror(err.errno)} (teacher outputs "
                   "already committed are kept; free space and resume)")


def append(path: Path, data: bytes, header: bytes) -> int:
    """Append ``data`` (one or more blocks) durably to ``path``, creating it with ``header``; returns the offset.

    The space is reserved first; on any failure the file is cut back to its previous size and the ``OSError``
    names the file and the bytes needed.
    """
    new = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        payload = (header if start == 0 else b"") + data
        try:
            os.posix_fallocate(fd, start, len(payload))
            os.pwrite(fd, payload, start)
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, start)
            raise _no_space(path, len(payload), err) if err.errno in (errno.ENOSPC, errno.EDQUOT) else err
        offset = start + (len(header) if start == 0 else 0)
    finally:
        os.close(fd)
    if new:
        from lightning_kd.cache.lock import fsync_dir

        fsync_dir(path.parent)
    return offset


@dataclass
class SegmentScan:
    """What a scan of one segment file found: its identity, intact-header blocks, and damaged regions."""

    path: Path
    spec: dict | None = None
    writer: str | None = None
    blocks: list[Block] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # human-readable, each naming an offset
    torn_tail: int = 0  # bytes of a partial last block (a crash mid-append)


def _find_next_header(buf, start: int) -> int:
    pos = start
    while (pos := buf.find(BLOCK_MAGIC, pos)) != -1:
        if _parse_header(buf, pos) is not None:
            return pos
        pos += 1
    return -1


def scan(path: Path, buf=None) -> SegmentScan:
    """Read a segment file's header and block headers (not its payloads); damage is reported, never raised."""
    out = SegmentScan(Path(path))
    if buf is None:
        buf = Path(path).read_bytes()
    size = len(buf)
    pos = 0
    if size == 0:
        return out  # created, nothing written yet: a writer that died or found the disk full before its first block
    if bytes(buf[:8]) != FILE_MAGIC or size < 16:
        out.damaged.append("file header: not a segment file (bad magic)")
    else:
        length, crc = struct.unpack("<II", bytes(buf[8:16]))
        body = bytes(buf[16 : 16 + length])
        try:
            if zlib.crc32(body) != crc:
                raise ValueError("checksum mismatch")
            head = json.loads(body)
            out.spec, out.writer = dict(head["spec"]), str(head["writer"])
        except (ValueError, KeyError, TypeError) as err:
            out.damaged.append(f"file header: unreadable ({err})")
        pos = _pad8(16 + length)
    if out.spec is None:
        pos = max(_find_next_header(buf, 0), 0) if size else 0
    while pos < size:
        block = _parse_header(buf, pos)
        if block is not None:
            if block.end > size:
                out.torn_tail = size - pos  # a partial last block: its writer died while appending it
                break
            out.blocks.append(block)
            pos = block.end
            continue
        nxt = _find_next_header(buf, pos + 1)
        if nxt == -1:
            out.torn_tail = size - pos  # nothing readable follows: a torn or never-written (zero) tail
            break
        copy = _parse_header(buf, nxt)
        copy.offset = pos
        if copy.end == nxt + _HEADER.size:  # the first readable header is this block's own trailer
            out.blocks.append(copy)
            pos = copy.end
            continue
        out.damaged.append(f"bytes {pos}..{nxt}: damaged block (header and trailer unreadable)")
        pos = nxt
    return out


def arrays(buf, block: Block) -> dict[str, np.ndarray]:
    """Zero-copy views of a block's index, values (and topi) in ``buf`` (a memory map)."""
    lay = block.layout()
    out = {
        "index": np.frombuffer(buf, "<i8", block.rows, lay["index"][0]),
        "values": np.frombuffer(buf, block.dtype, block.rows * block.width, lay["values"][0]).reshape(
            block.rows, block.width
        ),
    }
    if block.k:
        out["topi"] = np.frombuffer(buf, "<i4", block.rows * block.k, lay["topi"][0]).reshape(block.rows, block.k)
    return out


def bad_chunks(buf, block: Block) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of ``block`` whose checksum fails (all rows if its crc table is damaged).

    Reads chunk by chunk and, on a memory map, drops each chunk's pages from this process's resident set once
    checked (they stay in the page cache), so verifying a 2.6 GB cache does not make the training process 2.6 GB.
    """
    lay = block.layout()
    off, n = lay["table"]
    table = np.frombuffer(buf, "<u4", block.n_chunks, off)
    if zlib.crc32(bytes(buf[off : off + n])) != block.table_crc:
        return [(0, block.rows)]
    view = memoryview(buf)
    widths = (8, block.width * block.dtype.itemsize, block.k * 4)  # bytes per row of index, values, topi
    parts = [(lay[key][0], w) for key, w in zip(("index", "values", "topi"), widths)]
    bad = []
    for c in range(block.n_chunks):
        a, b = c * block.chunk_rows, min((c + 1) * block.chunk_rows, block.rows)
        crc = 0
        for start, per_row in parts:
            if per_row:
                lo, hi = start + a * per_row, start + b * per_row
                crc = zlib.crc32(view[lo:hi], crc)
                _release_pages(buf, lo, hi)
        if crc != int(table[c]):
            bad.append((a, b))
    return bad


def _release_pages(buf, lo: int, hi: int) -> None:
    if isinstance(buf, mmap.mmap):
        first, last = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE, hi // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            buf.madvise(mmap.MADV_DONTNEED, first, last - first)


def write_compacted(
    path: Path,
    header: bytes,
    token: str,
    rows: int,
    width: int,
    k: int,
    dtype: np.dtype,
    chunks: Callable[[], Iterator[dict[str, np.ndarray]]],
) -> None:
    """Write a new segment of one block, streaming ``chunks()`` (dicts of CHUNK_ROWS-row arrays), to ``path``.

    The whole size is reserved first; the file is fsynced; on failure it is removed and the ``OSError`` names it.
    """
    probe = Block(0, token, rows, CHUNK_ROWS, width, k, np.dtype(dtype), 0)
    total = len(header) + probe.end
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as err:
            raise _no_space(path, total, err) if err.errno in (errno.ENOSPC, errno.EDQUOT) else err
        base = len(header)
        lay = Block(base, token, rows, CHUNK_ROWS, width, k, np.dtype(dtype), 0).layout()
        os.pwrite(fd, header, 0)
        crcs, row = [], 0
        for chunk in chunks():
            n = len(chunk["index"])
            crcs.append(int(_chunk_crcs(chunk["index"], chunk["values"], chunk.get("topi"), CHUNK_ROWS)[0]))
            for part, per_row in (("index", 8), ("values", width * np.dtype(dtype).itemsize), ("topi", k * 4)):
                if per_row:
                    arr = np.ascontiguousarray(chunk[part])
                    os.pwrite(fd, arr.tobytes(), lay[part][0] + row * per_row)
            row += n
        if row != rows:
            raise RuntimeError(f"compaction wrote {row} rows, expected {rows}")
        table = np.asarray(crcs, dtype="<u4")
        head = _pack_header(token, rows, CHUNK_ROWS, width, k, np.dtype(dtype), zlib.crc32(table.data))
        os.pwrite(fd, table.tobytes(), lay["table"][0])
        os.pwrite(fd, head, base)
        os.pwrite(fd, head, total - _HEADER.size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def open_map(path: Path):
    """A read-only memory map of ``path`` (random-access reads: no read-ahead), or ``b""`` for an empty file."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return mm
