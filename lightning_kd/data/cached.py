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
import time
from types import SimpleNamespace
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from lightning_kd.budget import TeacherBudget, TeacherBudgetExceeded
from lightning_kd.cache import CacheSpec, TeacherCache
from lightning_kd.data.base import IndexedDataModule, collate
from lightning_kd.data.cifar import default_cache_dir, default_data_dir
from lightning_kd.data.tuples import sample_tuples, split_sides
from lightning_kd.teachers import Teacher, load_teacher, teacher_fingerprint


def select_samples(
    pool: np.ndarray, targets: np.ndarray, n: int, selection: str = "random", seed: int = 0
) -> np.ndarray:
    """``n`` indices from ``pool``: uniformly ("random") or with equal counts per class ("class_balanced").

    Both take prefixes of seeded permutations, so the selection for a larger ``n`` contains the one for a
    smaller ``n`` (a bigger budget reuses every output already paid for).
    """
    pool = np.asarray(pool)
    if n > len(pool):
        raise ValueError(f"budget {n} exceeds the {len(pool)} training samples available")
    rng = np.random.default_rng(seed)
    if selection == "random":
        return np.sort(pool[rng.permutation(len(pool))[:n]])
    if selection == "class_balanced":
        classes = np.unique(targets)
        per_class = [pool[targets == c][rng.permutation(int((targets == c).sum()))] for c in classes]
        # Round-robin over classes: position r of the interleaving is the r-th pick of each class.
        rank = np.concatenate([np.arange(len(p)) for p in per_class])
        cls = np.concatenate([np.full(len(p), i) for i, p in enumerate(per_class)])
        order = np.lexsort((cls, rank))
        return np.sort(np.concatenate(per_class)[order][:n])
    raise ValueError(f"selection must be 'random' or 'class_balanced', got {selection!r}")


def fill_cache(
    teacher: Teacher,
    dataset: Dataset,
    cache: TeacherCache,
    budget: TeacherBudget,
    *,
    batch_size: int = 500,
    commit_seconds: float = 1.0,
    device: torch.device | str | None = None,
    writer: str = "main",
    progress: bool = True,
    desc: str = "teacher -> cache",
) -> int:
    """Run ``teacher`` once on every sample of ``dataset`` and commit its outputs; returns samples queried.

    Each batch is reserved in ``budget`` before the call (raising :class:`TeacherBudgetExceeded` before any
    call that would exceed it) and validated (shape, finite values) right after it, before anything is stored.
    Valid outputs are committed as one cache segment every ``commit_seconds`` (0: after every batch), and when
    the fill stops for any reason, an error included: only a hard kill loses the outputs of the last
    ``commit_seconds``, and those stay counted in the budget as lost. A call that raises is released.
    """
    if len(dataset) > budget.remaining:
        raise TeacherBudgetExceeded(
            f"{len(dataset)} samples need teacher outputs but only {budget.remaining} of the budget "
            f"{budget.total} remain ({budget.used} used). No call was made."
        )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    pending: list[tuple[torch.Tensor, torch.Tensor, str]] = []

    def commit() -> None:
        chunk = pending[:]
        pending.clear()
        if chunk:
            cache.write(torch.cat([c[0] for c in chunk]), torch.cat([c[1] for c in chunk]), writer=writer)
            for *_, token in chunk:
                budget.commit(token)

    calls, last_commit = 0, time.perf_counter()
    bar = tqdm(total=len(dataset), desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        with bar:
            for batch in loader:
                x = batch["input"] if device is None else batch["input"].to(device, non_blocking=True)
                token = budget.reserve(len(x))
                try:
                    with torch.inference_mode():
                        logits = teacher(x)
                except BaseException:
                    budget.release(token)
                    raise
                calls += len(x)
                logits = logits.detach().to("cpu", torch.float32)
                cache.validate(batch["index"].numpy(), logits)  # a paid call with bad outputs stays counted
                pending.append((batch["index"], logits, token))
                if time.perf_counter() - last_commit >= commit_seconds:
                    commit()
                    last_commit = time.perf_counter()
                bar.set_postfix_str(f"budget {budget.used}/{budget.total}", refresh=False)
                bar.update(len(x))
    finally:
        commit()  # outputs already paid for are kept even when the fill stops on an error
    return calls


class CachedOutputs(Dataset):
    """Adds ``teacher_logits`` from the cache to the batches of an indexed dataset."""

    def __init__(self, dataset: Dataset, cache: TeacherCache) -> None:
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        batch = self.dataset.__getitems__(positions)
        batch["teacher_logits"] = self.cache.get(batch["index"])
        return batch


class CachedTuples(Dataset):
    """CKD tuples: item ``t`` is the group ``tuples[t]`` of positions in ``dataset``; batches are (B, k, ...).

    Every member gets its own fresh augmentation; ``teacher_logits`` are the cached outputs of the members.
    """

    def __init__(self, dataset: Dataset, tuples: np.ndarray) -> None:
        self.dataset, self.tuples = dataset, tuples

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        members = self.tuples[np.asarray(positions)]
        batch = self.dataset.__getitems__(members.reshape(-1).tolist())
        return {k: v.view(members.shape + v.shape[1:]) for k, v in batch.items()}


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
        selection: "random" or "class_balanced".
        view: "augmented" (one fixed random crop + flip per sample, derived from ``seed``) or "clean".
        val_fraction: labelled validation samples = budget·f/(1−f), from the unchosen training samples.
        dtype / topk: cache storage ("float32", "float16", or "topk" with ``topk`` classes kept).
        teacher_normalize: give the teacher normalized inputs (False: RGB in [0, 1], the shared teacher's
            contract; the student always gets normalized inputs).
        fill_batch_size / commit_seconds: teacher batch size; outputs are committed to disk every
            ``commit_seconds`` (a hard kill loses at most that much teacher work; 0 commits every batch).
        group_size: 1 serves samples; k >= 2 serves CKD tuples of k samples, ``max_tuples`` drawn once.
        strict: if lost outputs leave too little budget to cover the selection, raise instead of training on
            the samples that have outputs.
    """

    def __init__(
        self,
        datamodule: IndexedDataModule,
        teacher: Any = None,
        budget: int = 2000,
        cache_dir: str | None = None,
        selection: Literal["random", "class_balanced"] = "random",
        view: Literal["augmented", "clean"] = "augmented",
        val_fraction: float = 0.2,
        seed: int = 0,
        dtype: Literal["float32", "float16", "topk"] = "float32",
        topk: int | None = None,
        teacher_normalize: bool = False,
        fill_batch_size: int = 500,
        commit_seconds: float = 1.0,
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
            commit_seconds=commit_seconds,
            group_size=group_size,
            max_tuples=max_tuples,
            strict=strict,
            progress=progress,
        )
        if view not in ("augmented", "clean"):
            raise ValueError(f"view must be 'augmented' or 'clean', got {view!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.datamodule = datamodule
        self.teacher_spec = teacher
        self.num_classes = datamodule.num_classes
        self.cache: TeacherCache | None = None
        self.budget_state: TeacherBudget | None = None
        self.last_fill_calls = 0  # samples this process ran the teacher on in its fill
        self._checkpoint_budget: dict[str, int] = {}

    # -- plan ----------------------------------------------------------------------------------------------------
    @property
    def view_protocol(self) -> str:
        h = self.h
        norm = "normalized" if h.teacher_normalize else "raw"
        return f"augmented(seed={h.seed},pad=4,{norm})" if h.view == "augmented" else f"clean({norm})"

    def _plan(self) -> None:
        dm, h = self.datamodule, self.h
        dm.setup("fit")
        pool = dm.train_indices
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
            return TeacherCache(h.cache_dir, spec)
        key = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:16]
        return TeacherCache(default_cache_dir() / "teacher_outputs" / key, spec)

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Choose the training and validation samples (cheap; no teacher call)."""
        if not hasattr(self, "selected"):
            self._plan()

    def fill(self) -> None:
        """Open the cache and run the teacher on the selected samples that have no outputs yet (once).

        Called by ``train_dataloader`` — after Lightning restored a checkpoint, so that the budget recorded there
        counts — or directly (``lkd cache``). Under DDP every rank must call it.
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
        missing = self.selected[~cache.contains(self.selected)]
        floor = self._checkpoint_budget or self._budget_from_ckpt()
        budget = TeacherBudget(h.budget, cache.directory)
        budget.load_state_dict(floor)
        used_before = budget.used
        if len(missing) > budget.remaining:
            msg = (
                f"{len(missing)} of the {len(self.selected)} selected samples have no teacher outputs but only "
                f"{budget.remaining} of the budget {budget.total} remain ({budget.used} used, {budget.lost} lost "
                "to earlier runs that died between a teacher call and its commit)"
            )
            if h.strict or len(missing) == len(self.selected):
                why = ". strict=True: stopping." if h.strict else ": no sample to train on."
                raise TeacherBudgetExceeded(msg + why)
            usable = len(self.selected) - len(missing) + budget.remaining
            warnings.warn(msg + f". Training on the samples that have outputs (up to {usable}).")
            missing = missing[: budget.remaining]
        shard = missing[rank::world]
        budget.quota = len(shard)
        self.last_fill_calls = 0
        error: BaseException | None = None
        try:
            if len(missing):
                self.last_fill_calls = self._fill_shard(teacher, shard, cache, budget, len(missing), rank, world)
        except BaseException as err:  # tell the other ranks instead of leaving them waiting at the barrier
            error = err
        if self._any_rank_failed(error is not None):
            raise error or RuntimeError("the teacher-output fill failed on another rank (committed outputs are kept)")
        cache.refresh()
        if rank == 0 and len(cache._names) > 1:
            cache.compact()
        self._barrier()
        cache.refresh()
        self.cache, self.budget_state = cache, TeacherBudget(h.budget, cache.directory)
        self.budget_state.load_state_dict(floor)
        self.new_teacher_calls = self.budget_state.used - used_before  # all ranks together
        self.train_indices = self.selected[cache.contains(self.selected)]
        if rank == 0:
            b = self.budget_state
            print(
                f"[lightning_kd] {self.new_teacher_calls} new teacher calls (budget {h.budget}); training on "
                f"{len(self.train_indices)} samples with cached outputs. Cache {cache.directory}: {b.used} teacher "
                f"calls recorded in all, {b.lost} lost."
            )

    def _fill_shard(self, teacher, shard, cache, budget, n_missing: int, rank: int, world: int) -> int:
        h = self.h
        device = self._device()
        if isinstance(teacher, nn.Module) and device is not None:
            teacher = teacher.to(device)
        view = "fixed" if h.view == "augmented" else "eval"
        dataset = self.datamodule.make_dataset(shard, view, normalize=h.teacher_normalize, seed=h.seed)
        where = f", {len(shard)} on rank {rank} of {world}" if world > 1 else ""
        return fill_cache(
            teacher,
            dataset,
            cache,
            budget,
            batch_size=h.fill_batch_size,
            commit_seconds=h.commit_seconds,
            device=device,
            writer=f"{budget.writer}-rank{rank}",
            progress=h.progress and rank == 0,
            desc=f"teacher outputs ({n_missing} missing{where})",
        )

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
