"""Buying what a run lacks: fill the missing teacher outputs of the chosen samples (this rank's shard, under the
budget), compact, and report in words what was bought and what is trained on."""

from __future__ import annotations

import warnings

import numpy as np
from torch import nn

from lightning_kd.cache import TeacherBudgetExceeded
from lightning_kd.data.distributed import all_sum, any_rank, barrier, rank_world
from lightning_kd.data.fill import fill_cache
from lightning_kd.data.multiview import KeyedViews
from lightning_kd.data.plan import check_plan, purchase_order, spend_text


class PurchaseMixin:
    """For :class:`~lightning_kd.data.CachedTeacherDataModule` (its ``h``, cache, budget, teacher and plan)."""

    def _buy(self) -> None:
        """Fill the outputs ``self.selected`` lacks, then train on the selected samples that have outputs."""
        h, cache, budget, teacher = self.h, self.cache, self.budget_state, self.teacher
        rank, world = rank_world()
        wanted = self.wanted
        missing = wanted[~cache.contains(wanted)]
        if rank == 0 and self.round == 0:
            check_plan(cache, budget, wanted, self._plan_record(), n_missing=len(missing),
                       check_unused=self.strategy is not None and h.rounds == 1)
        order = purchase_order(missing, h.seed, rank, world)
        calls, error = 0, None
        try:
            if len(order):
                calls = self._fill_shard(teacher, order, cache, budget, rank, world)
        except BaseException as err:  # tell the other ranks instead of leaving them waiting at the barrier
            error = err
        if any_rank(error is not None, self._device()):
            raise error or RuntimeError("the teacher-output fill failed on another rank (committed outputs are kept)")
        if rank == 0:
            try:
                cache.compact()
            except OSError as err:  # compaction is an optimisation: a full disk must not fail a complete fill
                warnings.warn(f"the teacher-output cache was not compacted ({err.strerror or err}); its outputs "
                              "are served from their segments as they are", stacklevel=3)
        barrier()
        cache.refresh()
        calls = all_sum(calls, self._device())
        self.new_teacher_calls += calls
        self.train_keys = wanted[cache.contains(wanted)]
        self.train_indices = np.unique(self.train_keys % self.stride) if h.views_per_sample > 1 else self.train_keys
        s = budget.summary()
        what = "selected samples" if h.views_per_sample == 1 else "selected (sample, view) pairs"
        if not len(self.train_keys):
            raise TeacherBudgetExceeded(
                f"none of the {len(wanted)} {what} has teacher outputs and the budget {h.budget} is "
                f"spent ({budget.describe(s)}): no sample to train on."
            )
        if len(self.train_keys) < len(wanted):
            warnings.warn(
                f"{len(wanted) - len(self.train_keys)} of the {len(wanted)} {what} have "
                f"no teacher outputs and the budget {h.budget} cannot buy them ({budget.describe(s)}). Training "
                f"on the {len(self.train_keys)} that have outputs.",
                stacklevel=3,
            )
        if rank == 0:
            where = (f"round {self.round + 1} of {h.rounds}: {calls} new teacher calls, " if self.buys_in_rounds
                     else f"retrain on the {h.rounds} rounds recorded: " if h.retrain else "")
            print(
                f"[lightning_kd] {where}{self.new_teacher_calls} new teacher calls by this run (budget {h.budget}); "
                f"training on {len(self.train_indices)} samples with cached outputs. Cache {cache.directory}: "
                f"{budget.describe(s)}{spend_text(teacher, s)}."
            )

    def _fill_shard(self, teacher, order, cache, budget, rank: int, world: int) -> int:
        h = self.h
        device = self._device()
        if isinstance(teacher, nn.Module) and device is not None:
            teacher = teacher.to(device)
        if h.views_per_sample == 1:
            dataset = self.datamodule.teacher_dataset(order, self.teacher_view, normalize=h.teacher_normalize,
                                                      seed=h.seed)
        else:
            dataset = KeyedViews(order, self.stride, seed=h.seed,
                                 make=lambda idx, seed: self.datamodule.teacher_dataset(
                                     idx, self.teacher_view, normalize=h.teacher_normalize, seed=seed))
        with budget.lock:
            budget.ledger.refresh()
            free = len(budget.free(order))
        if free > budget.remaining:
            msg = (f"{free} of the {len(self.selected)} selected samples have no teacher outputs but only "
                   f"{budget.remaining} of the budget {budget.total} remain ({budget.describe()})")
            if h.strict:
                raise TeacherBudgetExceeded(msg + ". strict=True: stopping before any call.")
            warnings.warn(msg + f". Buying {budget.remaining} and training on the samples that have outputs.",
                          stacklevel=4)
        where = f", rank {rank} of {world}" if world > 1 else ""
        return fill_cache(
            teacher,
            dataset,
            cache,
            budget,
            batch_size=h.fill_batch_size,
            device=device,
            progress=h.progress and rank == 0,
            desc=f"teacher outputs ({len(order)} missing{where})",
            partial=True,
            num_workers=self.datamodule.fill_workers,
            pin_memory=self.pin_memory and device is not None and device.type == "cuda",
        )
