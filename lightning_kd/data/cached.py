"""CachedTeacherDataModule: the few-teacher-inference setting as a DataModule.

It chooses exactly ``budget`` training samples (seeded, nested: a larger budget's selection contains a smaller
one's), runs the teacher once on each sample that has no cached output yet (one fixed augmented view, as the
official CKD code does, or the clean image), commits the outputs to a :class:`~lightning_kd.cache.TeacherCache`,
and then serves training batches ``{"index", "input", "target", "teacher_logits"}`` with a fresh augmentation of
``input`` at every step. Validation (``val_fraction``: the official 80/20 split, drawn from the unchosen training
samples) and test batches carry labels only and never cost a teacher call.

Under DDP every rank computes the same plan, fills a disjoint shard with its own budget quota, waits at a
barrier, and then reads the complete cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_kd.cache import CacheMismatchError, CacheSpec, TeacherBudget, TeacherBudgetExceeded, TeacherCache
from lightning_kd.cache.budget import LedgerSummary
from lightning_kd.cache.spec import read_manifest
from lightning_kd.data.base import IndexedDataModule, collate
from lightning_kd.data.cifar import default_cache_dir, default_data_dir
from lightning_kd.data.fill import fill_cache
from lightning_kd.data.selection import select_samples
from lightning_kd.data.serving import CachedOutputs, CachedTuples
from lightning_kd.data.tuples import sample_tuples, split_sides
from lightning_kd.teachers import Teacher, load_teacher, teacher_fingerprint


def _spend(teacher: object, s: LedgerSummary) -> str:
    per_sample, per_request = getattr(teacher, "cost_per_sample", 0) or 0, getattr(teacher, "cost_per_request", 0) or 0
    if not (per_sample or per_request):
        return ""
    return f"; spent {s.used * per_sample + s.requests * per_request:.4g} ({s.requests} requests)"


def _resolve_teacher(teacher: str | dict | Teacher) -> Teacher:
    """Load a teacher spec; a relative file path that does not exist is also looked up in the data folder."""
    if isinstance(teacher, str | Path):
        path = Path(teacher)
        if not path.exists() and not path.is_absolute() and (default_data_dir() / path).exists():
            path = default_data_dir() / path
        return load_teacher(path)
    if isinstance(teacher, dict) or isinstance(teacher, nn.Module):
        return load_teacher(teacher)
    if callable(teacher):
        return teacher
    raise TypeError(f"teacher must be a path, a model spec dict, an nn.Module or a callable, got {type(teacher)}")


class CachedTeacherDataModule(IndexedDataModule):
    """Wraps an :class:`IndexedDataModule`; trains on ``budget`` samples with cached teacher outputs.

    Args:
        datamodule: the data (its training split is the pool samples are chosen from).
        teacher: a file / spec for :func:`~lightning_kd.teachers.load_teacher`, or any callable
            ``inputs -> logits`` (e.g. a remote API wrapper; give it a ``fingerprint`` attribute).
        budget: the number of training samples, and the most samples the teacher is ever run on.
        cache_dir: where outputs live; default ``$LKD_CACHE_DIR/teacher_outputs/<teacher>-<view>``.
        selection: "random" or "class_balanced" (seeded, nested); "cached": exactly the samples the cache already
            holds outputs for (no teacher call), e.g. after a change of selection or seed that would leave paid
            outputs unused — the fill says so and names this option.
        view: "augmented" (one fixed random crop + flip per sample, derived from ``seed``) or "clean".
        val_fraction: labelled validation samples = budget·f/(1−f), from the unchosen training samples.
        dtype / topk: cache storage ("float32", "float16", or "topk" with ``topk`` classes kept).
        teacher_normalize: give the teacher normalized inputs (False: RGB in [0, 1], the shared teacher's
            contract; the student always gets normalized inputs).
        fill_batch_size: samples per teacher call; each returned batch is durable before the next call.
        group_size: 1 serves samples; k >= 2 serves CKD tuples of k samples, ``max_tuples`` drawn once.
        strict: if the budget left cannot cover the selection, raise instead of buying what it allows and training
            on the samples that have outputs.
    """

    def __init__(
        self,
        datamodule: IndexedDataModule,
        teacher: Any = None,
        budget: int = 2000,
        cache_dir: str | None = None,
        selection: Literal["random", "class_balanced", "cached"] = "random",
        view: Literal["augmented", "clean"] = "augmented",
        val_fraction: float = 0.2,
        seed: int = 0,
        dtype: Literal["float32", "float16", "topk"] = "float32",
        topk: int | None = None,
        teacher_normalize: bool = False,
        fill_batch_size: int = 500,
        group_size: int = 1,
        max_tuples: int = 100_000,
        batch_size: int | None = None,
        strict: bool = False,
        progress: bool = True,
    ) -> None:
        super().__init__(
            batch_size=batch_size or datamodule.batch_size,
            eval_batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            pin_memory=datamodule.pin_memory,
        )
        self.save_hyperparameters(ignore=["datamodule", "teacher"])
        # Read options from `self.h`, not `self.hparams` (LightningCLI rewrites hparams of nested DataModules).
        self.h = SimpleNamespace(
            budget=budget,
            cache_dir=cache_dir,
            selection=selection,
            view=view,
            val_fraction=val_fraction,
            seed=seed,
            dtype=dtype,
            topk=topk,
            teacher_normalize=teacher_normalize,
            fill_batch_size=fill_batch_size,
            group_size=group_size,
            max_tuples=max_tuples,
            strict=strict,
            progress=progress,
        )
        for name, value in (("budget", budget), ("fill_batch_size", fill_batch_size), ("group_size", group_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if selection not in ("random", "class_balanced", "cached"):
            raise ValueError(f"selection must be 'random', 'class_balanced' or 'cached', got {selection!r}")
        if view not in ("augmented", "clean"):
            raise ValueError(f"view must be 'augmented' or 'clean', got {view!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.datamodule = datamodule
        self.teacher_spec = teacher
        self.num_classes = datamodule.num_classes
        self.cache: TeacherCache | None = None
        self.budget_state: TeacherBudget | None = None
        self.teacher: Teacher | None = None  # the resolved teacher, once the fill ran
        self.new_teacher_calls = 0  # samples this run (all its ranks) sent to the teacher
        self._checkpoint_budget: dict[str, int] = {}

    # -- plan ----------------------------------------------------------------------------------------------------
    @property
    def teacher_view(self) -> str:
        """The datamodule's view that the teacher is run on: "fixed" (augmented) or "eval" (clean)."""
        return "fixed" if self.h.view == "augmented" else "eval"

    @property
    def view_protocol(self) -> str:
        """The teacher view's identity, recorded in the cache (from the datamodule's ``view_fingerprint``)."""
        return self.datamodule.view_fingerprint(self.teacher_view, self.h.teacher_normalize, self.h.seed)

    def _plan(self) -> None:
        dm, h = self.datamodule, self.h
        dm.setup("fit")
        pool = dm.train_indices
        if h.budget > len(pool):
            raise ValueError(f"budget {h.budget} exceeds the {len(pool)} training samples available")
        if h.selection == "cached":  # train on what was paid for: no teacher call
            held = self._open_cache(_resolve_teacher(self.teacher_spec)).indices
            self.selected = np.intersect1d(held, pool)
            if not len(self.selected):
                raise ValueError("selection='cached' but the teacher cache holds no outputs for this training pool")
        else:
            self.selected = select_samples(pool, dm.targets(pool), h.budget, h.selection, h.seed)
        rest = np.setdiff1d(pool, self.selected)
        n_val = min(round(h.budget * h.val_fraction / (1 - h.val_fraction)), len(rest))
        self.val_indices = np.random.default_rng(h.seed + 1).permutation(rest)[:n_val]  # any prefix: all classes

    def _open_cache(self, teacher: Teacher) -> TeacherCache:
        h = self.h
        spec = CacheSpec(
            teacher=teacher_fingerprint(teacher),
            dataset=self.datamodule.fingerprint(),
            view=self.view_protocol,
            num_classes=self.num_classes,
            dtype=h.dtype,
            topk=h.topk,
        )
        if h.cache_dir is not None:
            try:
                return TeacherCache(h.cache_dir, spec)
            except CacheMismatchError as err:
                stored = read_manifest(Path(h.cache_dir) / "manifest.json")
                if stored.dataset == spec.dataset:
                    raise
                raise CacheMismatchError(
                    f"{self.datamodule.fingerprint_change(stored.dataset)}. Its outputs in {h.cache_dir} belong to "
                    "the old data and are kept; start a new cache for the new data with another cache_dir (or "
                    f"none: a directory per dataset fingerprint), or restore the old data. ({err})"
                ) from None
        key = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:16]
        return TeacherCache(default_cache_dir() / "teacher_outputs" / key, spec)

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Choose the training and validation samples (cheap; no teacher call)."""
        if not hasattr(self, "selected"):
            self._plan()

    def fill(self) -> None:
        """Open the cache and run the teacher on the selected samples that have no outputs yet (once, ever).

        Called by ``train_dataloader`` — after Lightning restored a checkpoint, so that the budget recorded there
        counts — or directly (``lkd cache``). Under DDP every rank must call it: ranks are concurrent writers of
        one cache, each starting on its own shard, and the shared ledger keeps the total within the budget.
        """
        if self.cache is not None:
            return
        self.setup("fit")
        h = self.h
        rank, world = self._rank_world()
        teacher = _resolve_teacher(self.teacher_spec)
        cache = self._open_cache(teacher) if rank == 0 else None
        self._barrier()  # rank 0 created the manifest; the others open it now
        cache = cache or self._open_cache(teacher)
        budget = TeacherBudget(h.budget, cache.directory)
        budget.load_state_dict(self._checkpoint_budget or self._budget_from_ckpt())
        missing = self.selected[~cache.contains(self.selected)]
        if rank == 0:
            self._check_plan(cache, budget, len(missing))
        order = self._purchase_order(missing, rank, world)
        calls, error = 0, None
        try:
            if len(order):
                calls = self._fill_shard(teacher, order, cache, budget, rank, world)
        except BaseException as err:  # tell the other ranks instead of leaving them waiting at the barrier
            error = err
        if self._any_rank_failed(error is not None):
            raise error or RuntimeError("the teacher-output fill failed on another rank (committed outputs are kept)")
        if rank == 0:
            cache.compact()
        self._barrier()
        cache.refresh()
        self.cache, self.budget_state, self.teacher = cache, budget, teacher
        self.new_teacher_calls = self._all_sum(calls)
        self.train_indices = self.selected[cache.contains(self.selected)]
        s = budget.summary()
        if not len(self.train_indices):
            raise TeacherBudgetExceeded(
                f"none of the {len(self.selected)} selected samples has teacher outputs and the budget {h.budget} is "
                f"spent ({budget.describe(s)}): no sample to train on."
            )
        if len(self.train_indices) < len(self.selected):
            warnings.warn(
                f"{len(self.selected) - len(self.train_indices)} of the {len(self.selected)} selected samples have "
                f"no teacher outputs and the budget {h.budget} cannot buy them ({budget.describe(s)}). Training "
                f"on the {len(self.train_indices)} samples that have outputs.",
                stacklevel=2,
            )
        if rank == 0:
            print(
                f"[lightning_kd] {self.new_teacher_calls} new teacher calls by this run (budget {h.budget}); training "
                f"on {len(self.train_indices)} samples with cached outputs. Cache {cache.directory}: "
                f"{budget.describe(s)}{_spend(teacher, s)}."
            )

    def _purchase_order(self, missing: np.ndarray, rank: int, world: int) -> np.ndarray:
        """Missing samples in the order they are bought: seeded (a budget that runs short still buys a uniform
        share), this rank's shard first so that DDP ranks rarely meet; every rank may finish the others' work."""
        order = np.random.default_rng(self.h.seed + 2).permutation(missing)
        mine = np.zeros(len(order), dtype=bool)
        mine[rank::world] = True
        return np.concatenate([order[mine], order[~mine]])

    def _check_plan(self, cache: TeacherCache, budget: TeacherBudget, n_missing: int) -> None:
        """Record this run's plan; say when it would leave paid outputs unused, and refuse when it also cannot be
        bought, naming the setting that changed and the option that trains on what was paid for."""
        h = self.h
        plan = {"selection": h.selection, "seed": h.seed, "budget": h.budget, "n": int(len(self.selected)),
                "sha": hashlib.sha256(np.sort(self.selected).astype("<i8").tobytes()).hexdigest()[:16]}
        plans = cache.ledger.plans
        last = {k: plans[-1].get(k) for k in plan} if plans else None
        if last != plan and cache.lock.writable:
            budget.record("plan", **plan)
        unused = np.setdiff1d(cache.indices, self.selected)
        if not len(unused) or h.selection == "cached":
            return
        changed = [f"{k} {last[k]!r} -> {plan[k]!r}" for k in ("selection", "seed", "budget")
                   if last and last[k] != plan[k]]
        with budget.lock:
            budget.ledger.refresh()
            free = len(budget.free(self.selected[~cache.contains(self.selected)]))
        msg = (f"this run's selection leaves {len(unused)} paid teacher outputs in {cache.directory} unused"
               + (f" (changed since they were bought: {', '.join(changed)})" if changed else "")
               + f" and needs {n_missing} samples without outputs")
        if free > budget.remaining:
            raise TeacherBudgetExceeded(
                msg + f", but only {budget.remaining} of the budget {h.budget} remain. Set selection='cached' to "
                f"train on the {len(cache)} samples already paid for, or restore the earlier setting."
            )
        warnings.warn(msg + f"; buying them ({budget.remaining} of the budget remain). selection='cached' trains on "
                      "the samples already paid for instead.", stacklevel=3)

    def _fill_shard(self, teacher, order, cache, budget, rank: int, world: int) -> int:
        h = self.h
        device = self._device()
        if isinstance(teacher, nn.Module) and device is not None:
            teacher = teacher.to(device)
        dataset = self.datamodule.teacher_dataset(order, self.teacher_view, normalize=h.teacher_normalize,
                                                  seed=h.seed)
        with budget.lock:
            budget.ledger.refresh()
            free = len(budget.free(order))
        if free > budget.remaining:
            msg = (f"{free} of the {len(self.selected)} selected samples have no teacher outputs but only "
                   f"{budget.remaining} of the budget {budget.total} remain ({budget.describe()})")
            if h.strict:
                raise TeacherBudgetExceeded(msg + ". strict=True: stopping before any call.")
            warnings.warn(msg + f". Buying {budget.remaining} and training on the samples that have outputs.",
                          stacklevel=3)
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

    def _all_sum(self, n: int) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return n
        t = torch.tensor([n], device=self._device() or "cpu")
        dist.all_reduce(t)
        return int(t.item())

    def _any_rank_failed(self, failed: bool) -> bool:
        """A collective OR of ``failed`` over ranks (it also serves as the barrier after the fill)."""
        if not (dist.is_available() and dist.is_initialized()):
            return failed
        flag = torch.tensor([int(failed)], device=self._device() or "cpu")  # NCCL needs a GPU tensor
        dist.all_reduce(flag)
        return bool(flag.item())

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def _device(self) -> torch.device | None:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return None

    def _budget_from_ckpt(self) -> dict[str, int]:
        """When resuming from a checkpoint, the budget it recorded (read before filling anything)."""
        ckpt_path = getattr(self.trainer, "ckpt_path", None) if self.trainer is not None else None
        if not ckpt_path or not Path(ckpt_path).exists():
            return {}
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:  # a checkpoint holding objects weights_only refuses: the ledger still holds
            warnings.warn(f"could not read the teacher budget from {ckpt_path} ({err}); using the cache's ledger alone")
            return {}
        return ckpt.get(type(self).__qualname__, {}).get("budget", {})

    def state_dict(self) -> dict[str, Any]:
        return {"budget": self.budget_state.state_dict() if self.budget_state else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._checkpoint_budget = state.get("budget", {})
        if self.budget_state is not None:
            self.budget_state.load_state_dict(self._checkpoint_budget)

    # -- data --------------------------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        self.fill()
        train = CachedOutputs(self.datamodule.make_dataset(self.train_indices, "train"), self.cache)
        k = self.h.group_size
        if k == 1:
            return train
        return CachedTuples(train, sample_tuples(len(self.train_indices), k, self.h.max_tuples, self.h.seed))

    @property
    def sides(self) -> tuple[int, int]:
        """(p, n): positive and negative members of a CKD tuple."""
        return split_sides(self.h.group_size)

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        if self.h.group_size == 1:
            return self.loader(ds, train=True)
        # An epoch is ceil(train samples / batch) batches of tuples, freshly drawn from the pre-sampled tuples.
        steps = math.ceil(len(self.train_indices) / self.batch_size)
        sampler = RandomSampler(ds, num_samples=min(steps * self.batch_size, len(ds)))
        return DataLoader(
            ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, collate_fn=collate
        )

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.datamodule.make_dataset(self.val_indices, "eval"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self.datamodule.test_dataloader()

    def fingerprint(self) -> str:
        return self.datamodule.fingerprint()

    def targets(self, indices: np.ndarray) -> np.ndarray:
        return self.datamodule.targets(indices)

    def make_dataset(self, indices, view, normalize=True, seed=0):
        return self.datamodule.make_dataset(indices, view, normalize, seed)
