"""The budgeted fill: run the teacher once on every chosen sample that has no stored output, never over budget.

Each batch goes through the same steps, whatever the teacher and however many processes share the cache:

1. **claim** — under the cache's lock, after re-reading the ledger: take over the claims of dead writers, pick up
   to ``batch_size`` samples that have no output and no live claim, and reserve them (``TeacherBudgetExceeded``
   when nothing is left to spend);
2. **call** — the teacher runs (``teacher.query(x, key=...)`` when it has one: the key is the same on every
   attempt at the batch); a failure known to be unprocessed releases the reservation, any other stays counted
   as lost; ``teacher.retry`` retries, a possibly paid retry with budget of its own;
3. **store** — valid outputs (logits; with a :class:`~lightning_kd.teachers.features.FeatureTeacher`, also the
   features its hooks recorded in the same call) are appended to this writer's segment and fsynced before the
   next call, then committed in the ledger: a hard kill loses at most the batches in flight.

With ``teacher.max_in_flight > 1`` that many batches are in flight at once (threads), hiding a remote teacher's
latency; each thread calls ``teacher.close()`` (when there is one) as it ends. Samples claimed by another live
writer are waited for, not bought again.

With ``num_workers > 0`` a DataLoader decodes the batches ahead, in purchase order, in worker processes; each
prefetched batch is claimed right before its call, and samples already stored or claimed meanwhile are dropped
from it (decoding ahead never spends budget). A sample that fails to load is never sent: its claim is released.
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lightning_kd.cache import TeacherBudget, TeacherBudgetExceeded, TeacherCache, as_logits
from lightning_kd.cache.budget import settle_dead_writers
from lightning_kd.data.base import collate
from lightning_kd.teachers import Teacher, TeacherCallError


def _batch_key(spec_id: str, idx: np.ndarray) -> str:
    """An idempotency key for a batch: the same for every attempt, in every process, at the same samples."""
    return hashlib.sha256(spec_id.encode() + np.sort(idx).astype("<i8").tobytes()).hexdigest()[:32]


def _known_unprocessed(teacher: Teacher, err: BaseException) -> bool:
    """Only a local module's failure, or one the teacher says never reached processing, is free."""
    if isinstance(err, TeacherCallError):
        return err.processed is False
    return isinstance(teacher, nn.Module) and isinstance(err, Exception)


class _Fill:
    """The state of one writer's fill, shared by its worker threads."""

    def __init__(self, teacher, dataset, cache, budget, batch_size, device, poll, bar) -> None:
        self.teacher, self.cache, self.budget = teacher, cache, budget
        self.dataset, self.batch_size, self.device, self.poll, self.bar = dataset, batch_size, device, poll, bar
        self.order = np.asarray(dataset.indices)
        self._pos = np.argsort(self.order)
        self.policy = getattr(teacher, "retry", None)
        self.spec_id = repr(cache.spec)
        self.stop = threading.Event()
        self.write_lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.calls = 0
        self.short = False  # the budget ran out with samples left to buy
        self.batches = None  # an iterator over prefetched batches in purchase order (num_workers > 0)
        self.batches_lock = threading.Lock()

    def load(self, idx: np.ndarray) -> torch.Tensor:
        positions = self._pos[np.searchsorted(self.order, idx, sorter=self._pos)]
        x = self.dataset.__getitems__(positions.tolist())["input"]
        return x if self.device is None else x.to(self.device, non_blocking=True)

    def call(self, x: torch.Tensor, key: str) -> torch.Tensor:
        with torch.inference_mode():
            query = getattr(self.teacher, "query", None)
            return query(x, key=key) if query is not None else self.teacher(x)

    def claim(self, idx: np.ndarray | None = None) -> tuple[str, np.ndarray] | None:
        """Reserve the next free batch (or what is still free of ``idx``); None when none is free or affordable."""
        try:
            return self.budget.claim(self.order if idx is None else idx, self.batch_size, recovered=self.cache.holds)
        except TeacherBudgetExceeded:
            self.short = True
            return None

    def waiting(self) -> int:
        """Samples of this fill claimed by other live writers (their outputs are awaited, not bought)."""
        with self.budget.lock:
            self.budget.ledger.refresh()
            led = self.budget.ledger
            others = [r.indices for r in led.pending() if r.writer != self.budget.writer and r.indices is not None]
            return int(np.isin(self.order, np.concatenate(others)).sum()) if others else 0

    def run_batch(self, token: str, idx: np.ndarray, x: torch.Tensor | None = None) -> None:
        if x is None:
            try:
                x = self.load(idx)
            except BaseException:  # nothing was sent: the samples are free again
                self.budget.release(token)
                raise
        elif self.device is not None:
            x = x.to(self.device, non_blocking=True)
        key, attempt = _batch_key(self.spec_id, idx), 1
        while True:
            try:
                out = self.call(x, key)
                break
            except BaseException as err:
                free = _known_unprocessed(self.teacher, err)
                if free:
                    self.budget.release(token)
                else:
                    self.budget.lose(token, why=f"{type(err).__name__}: {err}"[:300])
                    self.calls += len(idx)
                retry = isinstance(err, TeacherCallError) and err.retryable and self.policy is not None
                if not retry or attempt >= self.policy.attempts or self.stop.is_set():
                    raise
                time.sleep(self.policy.delay(attempt, err.retry_after))
                attempt += 1
                got = self.claim(idx)  # a possibly paid attempt needs budget of its own
                if got is None:
                    return  # out of budget (the samples stay lost) or claimed meanwhile by another writer
                token, now = got
                if len(now) != len(idx):
                    idx, x, key = now, self.load(now), _batch_key(self.spec_id, now)
        self.calls += len(idx)
        try:
            out, features = out if isinstance(out, tuple) else (out, None)  # a FeatureTeacher: (logits, features)
            logits = as_logits(out)
            if logits.ndim != 2 or logits.shape[1] != self.cache.spec.num_classes:
                raise ValueError(f"the teacher returned outputs of shape {tuple(logits.shape)}: "
                                 f"{logits.shape[-1]} classes, but the dataset has {self.cache.spec.num_classes}")
            with self.write_lock:
                where = self.cache.append(self.budget.writer, token, idx, logits, features)
        except BaseException as err:
            self.budget.lose(token, why=f"outputs not stored: {type(err).__name__}: {err}"[:300])
            raise
        self.budget.commit(token, **where)
        self.bar.update(len(idx))

    def prefetched(self) -> None:
        """Call the prefetched batches: claim each one's still-free samples right before its call, drop the rest."""
        while not self.stop.is_set():
            with self.batches_lock:
                batch = next(self.batches, None)
            if batch is None:
                return
            index = batch["index"].numpy()
            got = self.claim(index)
            if got is None:
                if self.short:
                    return
                continue
            token, idx = got
            x = batch["input"] if len(idx) == len(index) else batch["input"][torch.from_numpy(np.isin(index, idx))]
            self.run_batch(token, idx, x)
            self.bar.set_postfix_str(self._status(), refresh=False)

    def worker(self) -> None:
        try:
            if self.batches is not None:
                self.prefetched()
            while not self.stop.is_set():
                got = self.claim()
                if got is None:
                    if not self.short and (n := self.waiting()):
                        writers = ", ".join(self.budget.summary().writers_in_flight)
                        self.bar.set_postfix_str(f"waiting for {n} samples claimed by {writers}", refresh=True)
                        time.sleep(self.poll)
                        continue
                    return
                self.run_batch(*got)
                self.bar.set_postfix_str(self._status(), refresh=False)
        except BaseException as err:
            self.errors.append(err)
            self.stop.set()
        finally:
            close = getattr(self.teacher, "close", None)  # per-thread resources (a remote teacher's connection)
            if callable(close) and not isinstance(self.teacher, nn.Module):
                close()

    def _status(self) -> str:
        s = self.budget.summary()
        return f"budget {s.used}/{self.budget.total} (in flight {s.in_flight}, lost {s.lost})"


def fill_cache(
    teacher: Teacher,
    dataset: Dataset,
    cache: TeacherCache,
    budget: TeacherBudget,
    *,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "teacher -> cache",
    partial: bool = False,
    poll: float = 0.2,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> int:
    """Run ``teacher`` on every sample of ``dataset`` that has no stored output; returns samples sent to it.

    ``dataset`` is an indexed dataset (``.indices``, ``__getitems__``) of the samples wanted, in the order they
    are bought. When the budget cannot cover the samples that are free (not stored, not claimed by a live
    writer), :class:`TeacherBudgetExceeded` is raised before any call — unless ``partial``: then it buys what
    the budget allows. Outputs of calls that returned are stored even when the fill stops on an error.
    ``num_workers`` > 0 decodes batches ahead in that many DataLoader workers (``pin_memory`` for a GPU teacher).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with budget.lock:
        budget.ledger.refresh()
        settle_dead_writers(budget.ledger, cache.directory, budget.writer, cache.holds)
        free = budget.free(np.asarray(dataset.indices))
        if len(free) > budget.remaining and not partial:
            raise TeacherBudgetExceeded(
                f"{len(free)} samples need teacher outputs but only {budget.remaining} of the budget "
                f"{budget.total} remain ({budget.used} used). No call was made."
            )
    n_threads = max(1, int(getattr(teacher, "max_in_flight", 1)))
    bar = tqdm(total=len(dataset), desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    state = _Fill(teacher, dataset, cache, budget, batch_size, device, poll, bar)
    if num_workers > 0:
        state.batches = iter(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                                        pin_memory=pin_memory))
    try:
        with bar:
            if n_threads == 1:
                state.worker()
            else:
                threads = [threading.Thread(target=state.worker, daemon=True) for _ in range(n_threads)]
                for t in threads:
                    t.start()
                try:
                    for t in threads:
                        t.join()
                except BaseException:  # Ctrl-C: no new batch; the ones in flight are still stored
                    state.stop.set()
                    for t in threads:
                        t.join()
                    raise
    finally:
        state.batches = None  # shuts the loader's workers down
        budget.close()
    if state.errors:
        raise state.errors[0]
    if state.short and not partial:
        raise TeacherBudgetExceeded(f"the teacher budget {budget.total} ran out during the fill ({budget.used} used; "
                                    "other runs on this cache spent part of it). Outputs bought so far are kept.")
    return state.calls
