"""Locks on a cache directory: one exclusive lock for every budget decision, and one lease per live writer.

Both are ``flock`` locks, which the kernel drops when their process dies (``kill -9`` included), so a crashed
writer never leaves a stale lock behind and its liveness is a lock test, not a guess from pids or clocks.
``flock`` holds between processes of one machine and between threads holding separate ``DirectoryLock``
objects. On NFS, Linux maps ``flock`` to POSIX byte-range locks served by the NFS lock manager (NFSv4: held by
the client's lease, released when that client stops renewing it), so several machines sharing a cache over NFS
are serialised where the server supports locking; on file systems without working locks (some FUSE mounts,
SMB without byte-range locking) nothing can be guaranteed across machines: give each machine its own cache.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a created, renamed or removed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryLock:
    """An exclusive, re-entrant (within one thread of this object) lock of ``directory/lock``.

    On a read-only directory whose lock file cannot be created, the lock is a no-op and ``writable`` is False:
    a complete cache is then served as it is, and anything that would write raises.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "lock"
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self.writable = True
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            self.writable = False
            if self.path.exists():
                self._fd = os.open(self.path, os.O_RDONLY)  # flock needs no write access

    def __enter__(self) -> DirectoryLock:
        self._thread_lock.acquire()
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


def lease_path(directory: Path, name: str) -> Path:
    return Path(directory) / "writers" / f"{name}.lock"


class WriterLease:
    """Held (``flock`` exclusive on ``writers/<name>.lock``) for as long as a writer may still commit outputs."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = lease_path(directory, name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def writer_alive(directory: Path, name: str) -> bool:
    """Whether writer ``name`` still holds its lease (call under the directory lock)."""
    path = lease_path(directory, name)
    try:
        fd = os.open(path, os.O_RDWR)  # NFS maps flock to POSIX locks: an exclusive one needs write access
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the test lock when it was taken
    return False
