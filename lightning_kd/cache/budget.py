"""TeacherBudget: at most ``total`` teacher calls for one cache, decided against the shared ledger.

Every decision happens under the cache directory's lock after re-reading the ledger (:mod:`.ledger`), so runs,
DDP ranks and sweep workers that share a cache spend its budget once. A reservation is a *claim* on dataset
indices; a writer holds a lease (:mod:`.lock`) while it may still store outputs, so a dead writer's claims are
taken over — committed when its outputs reached disk, else counted as paid and lost.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_kd.cache.errors import TeacherBudgetExceeded
from lightning_kd.cache.ledger import (
    FORMAT_VERSION,
    FREE,
    LEDGER,
    Ledger,
    create_ledger,
    encode_indices,
    holds_outputs,
    new_writer_name,
)
from lightning_kd.cache.lock import DirectoryLock, WriterLease, lease_path, writer_alive


def settle_dead_writers(ledger: Ledger, directory: Path, me: str, recovered=None) -> None:
    """Close the pending reservations of writers whose lease is free (under the lock, freshly refreshed).

    ``recovered(token, writer)`` says whether the outputs reached disk before the writer died (then the
    reservation is committed); otherwise it is recorded as lost: paid, and its samples free to be bought again.
    """
    for r in ledger.pending():
        if r.writer == me or writer_alive(directory, r.writer):
            continue
        if recovered is not None and recovered(r.id, r.writer):
            ledger.append("commit", id=r.id, by=me, recovered=True)
        else:
            ledger.append("lost", id=r.id, by=me, why=f"writer {r.writer} died before storing the outputs")
        lease_path(directory, r.writer).unlink(missing_ok=True)


@dataclass(frozen=True)
class LedgerSummary:
    """Totals over every writer that ever used the cache, in samples."""

    used: int  # committed + lost + in flight
    committed: int
    lost: int
    in_flight: int
    requests: int  # reservations still counted (each one a teacher request)
    writers_in_flight: tuple[str, ...] = ()


class TeacherBudget:
    """At most ``total`` teacher calls (counted in samples) for the cache in ``directory``, across processes.

    ``reserve(n, indices)`` raises :class:`TeacherBudgetExceeded` before a call that would exceed ``total`` and
    journals the reservation (a claim on ``indices``); ``commit`` / ``release`` / ``lose`` close it. ``claim``
    picks samples no live writer holds, taking over the claims of dead writers (counted as lost). Without a
    ``directory`` the budget lives in memory only (tests, one-off use).
    """

    def __init__(self, total: int, directory: str | Path | None = None, *, writer: str | None = None) -> None:
        if isinstance(total, bool) or not isinstance(total, int | np.integer) or total < 0:
            raise ValueError(f"budget must be an integer >= 0, got {total!r}")
        self.total = int(total)
        self.writer = writer or new_writer_name()
        self.directory = Path(directory) if directory is not None else None
        self._floor = 0  # `used` restored from a checkpoint, when larger than the ledger says
        self._lease: WriterLease | None = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.lock = DirectoryLock(self.directory)
            self.ledger = Ledger(self.directory / LEDGER)
            with self.lock:
                self.ledger.refresh()
                if self.ledger.header is None:
                    if self.ledger.path.exists() or holds_outputs(self.directory):  # creation is atomic
                        raise self.ledger._fail("the file is missing, empty or has no readable first line, but the "
                                                "directory holds a cache")
                    if self.lock.writable:
                        create_ledger(self.directory, None)
                        self.ledger.refresh()
        else:
            self.lock, self.ledger = DirectoryLockStub(), Ledger(None)
            self.ledger.append("open", format=FORMAT_VERSION, spec=None)

    # -- reading ------------------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        self.ledger.refresh()

    def summary(self) -> LedgerSummary:
        with self.lock:
            self._refresh()
            return self._summary()

    def _summary(self) -> LedgerSummary:
        led = self.ledger
        committed = sum(r.n for r in led.reservations.values() if r.status == "committed")
        damaged = sum(len(d) for d in led.damaged)
        live, dead = [], 0
        for r in led.pending():
            if r.writer == self.writer or self._alive(r.writer):
                live.append(r)
            else:
                dead += r.n
        lost = sum(r.n for r in led.reservations.values() if r.status == "lost") + dead + damaged
        requests = sum(1 for r in led.reservations.values() if r.status != "released")
        writers = tuple(sorted({r.writer for r in live}))
        return LedgerSummary(led.used, committed - damaged, lost, sum(r.n for r in live), requests, writers)

    def _alive(self, writer: str) -> bool:
        return self.directory is not None and writer_alive(self.directory, writer)

    @property
    def used(self) -> int:
        """Samples the teacher has been (or may have been) run on, over all runs on this cache."""
        return max(self.summary().used, self._floor)

    @property
    def remaining(self) -> int:
        return max(self.total - self.used, 0)

    @property
    def lost(self) -> int:
        return self.summary().lost

    @property
    def in_flight(self) -> int:
        return self.summary().in_flight

    # -- writing ------------------------------------------------------------------------------------------------
    def _hold_lease(self) -> None:
        if self._lease is None and self.directory is not None:
            if not self.lock.writable:
                raise PermissionError(f"teacher cache {self.directory} is read-only: no teacher call can be recorded")
            self._lease = WriterLease(self.directory, self.writer)

    def _check(self, n: int) -> None:
        used = max(self.ledger.used, self._floor)
        if used + n > self.total:
            s = self._summary()
            raise TeacherBudgetExceeded(
                f"teacher budget exceeded: {n} more sample(s) requested, {used} of {self.total} used "
                f"({s.committed} committed, {s.in_flight} in flight, {s.lost} lost; {max(self.total - used, 0)} "
                "remaining). No call was made."
            )

    def reserve(self, n: int, indices: np.ndarray | None = None) -> str:
        """Journal a reservation of ``n`` samples (a claim on ``indices``) before calling the teacher."""
        with self.lock:
            self._refresh()
            self._check(n)
            self._hold_lease()
            return self._reserve(n, indices)

    def _reserve(self, n: int, indices: np.ndarray | None) -> str:
        token = uuid.uuid4().hex[:12]
        idx = None if indices is None else encode_indices(indices)
        self.ledger.append("reserve", id=token, writer=self.writer, n=n, idx=idx, used=self.ledger.used + n)
        return token

    def claim(self, candidates: np.ndarray, max_n: int, *, recovered=None) -> tuple[str, np.ndarray] | None:
        """Reserve up to ``max_n`` of ``candidates`` (in their order) that have no outputs and no live claim.

        Claims of dead writers are taken over first: ``recovered(token, writer)`` says whether their outputs
        reached disk anyway (then they are committed), else they are recorded as lost. Returns ``None`` when no
        candidate is free; raises :class:`TeacherBudgetExceeded` when some are but no budget is left.
        """
        with self.lock:
            self._refresh()
            self._take_over(recovered)
            free = self.free(candidates)
            if not len(free):
                return None
            n = min(max_n, len(free), self.total - max(self.ledger.used, self._floor))
            if n <= 0:
                self._check(1)
            self._hold_lease()
            idx = free[:n]
            return self._reserve(n, idx), idx

    def free(self, candidates: np.ndarray) -> np.ndarray:
        """``candidates`` without committed outputs and without a pending claim (call under the lock)."""
        candidates = np.asarray(candidates)
        return candidates[self.ledger.status(candidates) == FREE]

    def _take_over(self, recovered) -> None:
        settle_dead_writers(self.ledger, self.directory, self.writer, recovered)

    def commit(self, token: str, **where) -> None:
        """The outputs of reservation ``token`` are durable in the cache: the samples stay counted."""
        with self.lock:
            self._refresh()
            self.ledger.append("commit", id=token, **where)

    def release(self, token: str) -> None:
        """The call of ``token`` failed before the teacher processed anything: give the samples back."""
        with self.lock:
            self._refresh()
            self.ledger.append("release", id=token)

    def lose(self, token: str, why: str) -> None:
        """The call of ``token`` may have been paid but left no stored output: it stays counted, as lost."""
        with self.lock:
            self._refresh()
            self.ledger.append("lost", id=token, why=why)

    def record(self, op: str, **fields) -> None:
        """Append a bookkeeping record (``plan``, ``compact``, ``damaged``) under the lock."""
        with self.lock:
            self._refresh()
            self.ledger.append(op, **fields)

    def recorded_round(self, key: str, round_: int) -> np.ndarray | None:
        """The selection recorded for round ``round_`` of the plan ``key``, or None (re-read under the lock)."""
        with self.lock:
            self._refresh()
            held = self.ledger.rounds.get((key, round_))
        return None if held is None else held.copy()

    def record_round(self, key: str, round_: int, indices: np.ndarray, **fields) -> np.ndarray:
        """Record round ``round_`` of the plan ``key`` as buying ``indices``, unless a run recorded it first:
        returns the recorded selection, which every run of the plan (and every rank) then buys and trains on."""
        with self.lock:
            self._refresh()
            held = self.ledger.rounds.get((key, round_))
            if held is None:
                self.ledger.append("round", key=key, round=round_, n=int(len(indices)),
                                   idx=encode_indices(np.sort(indices)), **fields)
                held = self.ledger.rounds[key, round_]
            return held.copy()

    def close(self) -> None:
        """End this writer: its still-pending reservations are lost; other writers no longer wait for it.

        The budget object stays usable; its next reservation starts a new writer (a new name and segment file).
        """
        if self._lease is None:
            return
        with self.lock:
            self._refresh()
            for r in self.ledger.pending():
                if r.writer == self.writer:
                    self.ledger.append("lost", id=r.id, why="its writer stopped before storing the outputs")
            self._lease.release()
            self._lease = None
        self.writer = new_writer_name()  # a later fill is a new writer: its segment file is never a replaced one

    def describe(self, s: LedgerSummary | None = None) -> str:
        """The accounting in words: ``used = stored + in flight (by whom) + lost; remaining``."""
        s = s or self.summary()
        where = f" by {', '.join(s.writers_in_flight)}" if s.writers_in_flight else ""
        floor = self._floor - s.used
        extra = f" + {floor} recorded only in a checkpoint" if floor > 0 else ""
        used = max(s.used, self._floor)
        return (f"{used} used = {s.committed} stored + {s.in_flight} in flight{where} + {s.lost} lost{extra}; "
                f"{max(self.total - used, 0)} remaining")

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        s = self.summary()
        return {"total": self.total, "used": max(s.used, self._floor), "lost": s.lost}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore from a checkpoint: ``used`` never goes below what the checkpoint recorded."""
        self._floor = max(self._floor, int(state.get("used", 0)))

    def __repr__(self) -> str:
        s = self.summary()
        return (f"TeacherBudget(total={self.total}, used={max(s.used, self._floor)}, remaining={self.remaining}, "
                f"in_flight={s.in_flight}, lost={s.lost})")


class DirectoryLockStub:
    """The lock of an in-memory budget: nothing to lock."""

    writable = True

    def __enter__(self) -> DirectoryLockStub:
        return self

    def __exit__(self, *exc) -> None:
        return None
