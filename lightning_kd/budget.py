"""The teacher budget: a hard limit on the number of samples the teacher is ever run on.

Accounting is conservative and persistent. Before each teacher call the writer appends a *reservation* to its
journal (``ledger/<writer>.jsonl``, fsynced); after the outputs are committed to the cache it appends a
*commit*; if the call raised (no output was produced) it appends a *release*. So:

- ``used`` = reserved - released, over every journal ever written into the cache directory;
- a reservation with neither commit nor release was made by a process that died between calling the teacher and
  committing the outputs: the call may have been paid for, so it stays counted and shows up in ``lost``.

Each writer may also be given a ``quota`` (its share of the remaining budget when several DDP ranks fill
disjoint shards), so that the total over all writers never exceeds ``total`` even while they run concurrently.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


class TeacherBudgetExceeded(RuntimeError):
    """Raised *before* a teacher call that would exceed the budget."""


@dataclass(frozen=True)
class LedgerSummary:
    """Totals read from all journals: ``used`` samples (committed + lost + in flight), ``lost`` samples."""

    used: int
    lost: int
    committed: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_ledger(ledger_dir: Path, exclude: str | None = None) -> LedgerSummary:
    """Sum all journals in ``ledger_dir`` (a torn last line, from a crash mid-append, reserved nothing)."""
    used = lost = committed = 0
    if not ledger_dir.exists():
        return LedgerSummary(0, 0, 0)
    for journal in sorted(ledger_dir.glob("*.jsonl")):
        if journal.stem == exclude:
            continue
        pending: dict[str, int] = {}
        for line in journal.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            op, rid = rec.get("op"), rec.get("id")
            if op == "reserve":
                pending[rid] = int(rec["n"])
                used += int(rec["n"])
            elif op == "commit":
                committed += pending.pop(rid, 0)
            elif op == "release":
                used -= pending.pop(rid, 0)
        lost += sum(pending.values())
    return LedgerSummary(used, lost, committed)


class TeacherBudget:
    """At most ``total`` teacher calls (counted in samples) for the cache in ``directory``.

    ``reserve(n)`` raises :class:`TeacherBudgetExceeded` before a call that would exceed ``total`` (or this
    writer's ``quota``) and journals the reservation; ``commit(token)`` / ``release(token)`` close it. Without a
    ``directory`` the budget lives in memory only (tests, one-off use).
    """

    def __init__(
        self, total: int, directory: str | Path | None = None, *, quota: int | None = None, writer: str | None = None
    ) -> None:
        if total < 0:
            raise ValueError(f"budget must be >= 0, got {total}")
        self.total = int(total)
        self.quota = quota
        self.writer = writer or f"{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1e3)}-{uuid.uuid4().hex[:6]}"
        self.ledger_dir = Path(directory) / "ledger" if directory is not None else None
        past = read_ledger(self.ledger_dir) if self.ledger_dir else LedgerSummary(0, 0, 0)
        self._base_used, self.lost = past.used, past.lost
        self._own = 0  # reserved - released by this writer
        self._pending: dict[str, int] = {}
        self._floor = 0  # `used` restored from a checkpoint, when larger than the journals say

    @property
    def used(self) -> int:
        """Samples the teacher has been (or may have been) run on, over all runs on this cache."""
        return max(self._base_used + self._own, self._floor)

    @property
    def remaining(self) -> int:
        return max(self.total - self.used, 0)

    def _append(self, rec: dict) -> None:
        if self.ledger_dir is None:
            return
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        path = self.ledger_dir / f"{self.writer}.jsonl"
        new = not path.exists()
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            _fsync_dir(self.ledger_dir)

    def reserve(self, n: int) -> str:
        """Journal a reservation of ``n`` samples before calling the teacher; returns its token."""
        if self.used + n > self.total:
            raise TeacherBudgetExceeded(
                f"teacher budget exceeded: {n} more sample(s) requested, {self.used} of {self.total} used "
                f"({self.remaining} remaining). No call was made."
            )
        if self.quota is not None and self._own + n > self.quota:
            raise TeacherBudgetExceeded(
                f"this writer's share of the teacher budget is exceeded: {n} more sample(s) requested, "
                f"{self._own} of its quota {self.quota} used. No call was made."
            )
        token = uuid.uuid4().hex[:12]
        self._append({"op": "reserve", "id": token, "n": n})
        self._pending[token] = n
        self._own += n
        return token

    def commit(self, token: str) -> None:
        """The outputs of reservation ``token`` are committed to the cache: the samples stay counted."""
        self._pending.pop(token)
        self._append({"op": "commit", "id": token})

    def release(self, token: str) -> None:
        """The call of reservation ``token`` raised and produced nothing: give the samples back."""
        self._own -= self._pending.pop(token)
        self._append({"op": "release", "id": token})

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "used": self.used, "lost": self.lost}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore from a checkpoint: ``used`` never goes below what the checkpoint recorded."""
        self._floor = max(self._floor, int(state.get("used", 0)))

    def __repr__(self) -> str:
        return f"TeacherBudget(total={self.total}, used={self.used}, remaining={self.remaining}, lost={self.lost})"
