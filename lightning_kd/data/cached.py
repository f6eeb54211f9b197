"""CachedTeacherDataModule: the few-teacher-inference setting as a DataModule.

It chooses exactly ``budget`` training samples (seeded, nested: a larger budget's selection contains a smaller
one's), runs the teacher once on each sample that has no cached output yet (one fixed augmented view, as the
official CKD code does, or the clean image), commits the outputs to a :class:`~lightning_kd.cache.TeacherCache`,
and then serves training batches ``{"index", "input", "target", "teacher_logits"}`` with a fresh augmentation of
``input`` at every step (with ``teacher_features``, the same call also records named teacher layers' outputs,
stored beside the logits and served as ``teacher_features``). Validation (``val_fraction``: the official 80/20
split, drawn from the unchosen training samples) and test batches carry labels only and never cost a teacher call.

With ``rounds=R > 1`` the budget is bought in R shares (:mod:`lightning_kd.data.rounds`): a class-balanced
random one before training, then one at each round's first epoch, chosen by a selection strategy
(:mod:`lightning_kd.selection`) from the student's scores of the samples not bought yet. Each round's choice is
recorded in the cache, so a resume or a rerun replays it for free.

Under DDP every rank computes the same plan, fills a disjoint shard with its own budget quota, waits at a
barrier, and then reads the complete cache.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_kd.cache import CacheSpec, TeacherBudget, TeacherCache
from lightning_kd.data.base import IndexedDataModule, collate
from lightning_kd.data.distributed import barrier, rank_world
from lightning_kd.data.multiview import KeyedViews, view_keys
from lightning_kd.data.plan import (
    budget_in_checkpoint,
    open_cache,
)
from lightning_kd.data.purchase import PurchaseMixin
from lightning_kd.data.rounds import RoundSchedule, RoundsMixin, plan_key
from lightning_kd.data.selection import select_samples
from lightning_kd.data.serving import CachedOutputs, CachedTuples
from lightning_kd.data.teacher_side import TeacherSideMixin
from lightning_kd.data.tuples import sample_tuples, split_sides
from lightning_kd.selection import SelectionStrategy, create_strategy
from lightning_kd.teachers import Teacher, teacher_fingerprint


class CachedTeacherDataModule(PurchaseMixin, TeacherSideMixin, RoundsMixin, IndexedDataModule):
    """Wraps an :class:`IndexedDataModule`; trains on ``budget`` samples with cached teacher outputs.

    Args:
        datamodule: the data (its training split is the pool samples are chosen from).
        teacher: a file / spec for :func:`~lightning_kd.teachers.load_teacher`, or any callable
            ``inputs -> logits`` (e.g. a remote API wrapper; give it a ``fingerprint`` attribute).
        budget: the number of training samples, and the most samples the teacher is ever run on.
        cache_dir: where outputs live; default ``$LKD_CACHE_DIR/teacher_outputs/<teacher>-<view>``.
        selection: a strategy of :mod:`lightning_kd.selection` by name, or a strategy object. "random" and
            "class_balanced" are seeded and nested; the student-driven ones ("entropy", "margin", "kcenter",
            "margin_kcenter", "badge") need ``rounds >= 2``. "cached": exactly the samples the cache already holds
            outputs for (no teacher call), e.g. after a change of selection or seed that would leave paid outputs
            unused — the fill says so and names this option.
        rounds: buy the budget in this many shares; round ``r`` is bought at epoch ``floor(r * buy_within *
            max_epochs / rounds)`` (the DataModule has the Trainer reload the train dataloader each epoch). Every
            epoch is ``budget // batch_size`` steps, drawn from the samples bought so far, so the total number of
            steps does not depend on ``rounds`` or the strategy. 1: everything before training.
        buy_within: the fraction of the epochs within which every round is bought (1: rounds spread over the whole
            run).
        initial_fraction: the share of the budget the first, class-balanced random round buys (None: equal shares,
            ``1 / rounds``); the rest is split evenly over the later rounds.
        retrain: train on everything an earlier fit with the same round plan bought, from the first epoch, as if
            it had all been bought up front: each round's choice is read from the cache's ledger (no scoring, no
            new choice; 0 teacher calls once that fit has bought them). The student that trained through the
            rounds was warm-started on a growing subset, which costs it accuracy: retrain the student you keep.
            Refused, naming the rounds missing, before that fit has recorded them all.
        views_per_sample: teacher views bought per sample (:mod:`lightning_kd.data.multiview`): the budget counts
            calls, so ``budget // views_per_sample`` samples are chosen; batches then carry the (sample, view) key
            as ``"index"``. 1: one fixed view, as the official CKD code.
        matched_views: train the student on exactly the teacher's views (as FKD does) instead of fresh
            augmentations of the sample whose crop the teacher never saw.
        view: "augmented" (one fixed random crop + flip per sample, derived from ``seed``) or "clean".
        val_fraction: labelled validation samples = budget·f/(1−f), from the unchosen training samples.
        dtype / topk: cache storage ("float32", "float16", or "topk" with ``topk`` classes kept).
        teacher_features: ``{name: teacher layer (module path)}``: record these layers' outputs (forward hooks) in
            the same teacher call as the logits, store them with the logits in ``feature_dtype`` ("float16" or
            "float32"; names, layers, shapes and dtype are part of the cache's identity) and serve them as
            ``batch["teacher_features"][name]``. The teacher must be a local
            module whose layers run as modules (not a remote endpoint, TorchScript or ``.pt2`` program).
        serve_teacher_view: also serve ``batch["teacher_view"]``: the input the teacher saw (its fixed view), in
            the student's normalization, beside the student's fresh ``input``.
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
        selection: str | SelectionStrategy = "random",
        rounds: int = 1,
        initial_fraction: float | None = None,
        buy_within: float = 1.0,
        retrain: bool = False,
        views_per_sample: int = 1,
        matched_views: bool = False,
        view: Literal["augmented", "clean"] = "augmented",
        val_fraction: float = 0.2,
        seed: int = 0,
        dtype: Literal["float32", "float16", "topk"] = "float32",
        topk: int | None = None,
        teacher_features: dict[str, str] | None = None,
        feature_dtype: Literal["float16", "float32"] = "float16",
        serve_teacher_view: bool = False,
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
            rounds=rounds,
            initial_fraction=initial_fraction,
            buy_within=buy_within,
            retrain=retrain,
            views_per_sample=views_per_sample,
            matched_views=matched_views,
            view=view,
            val_fraction=val_fraction,
            seed=seed,
            dtype=dtype,
            topk=topk,
            teacher_features=dict(teacher_features or {}),
            feature_dtype=feature_dtype,
            serve_teacher_view=serve_teacher_view,
            teacher_normalize=teacher_normalize,
            fill_batch_size=fill_batch_size,
            group_size=group_size,
            max_tuples=max_tuples,
            strict=strict,
            progress=progress,
        )
        for name, value in (("budget", budget), ("fill_batch_size", fill_batch_size), ("group_size", group_size),
                            ("views_per_sample", views_per_sample)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if views_per_sample > budget:
            raise ValueError(f"views_per_sample={views_per_sample} is larger than the budget {budget}: not one sample "
                             "could have all its views bought")
        if views_per_sample > 1 and (rounds > 1 or selection == "cached"):
            raise ValueError("views_per_sample > 1 buys all views of each sample at once: it needs rounds=1 and a "
                             "selection other than 'cached'")
        if matched_views and view != "augmented":
            raise ValueError("matched_views=True trains on the teacher's augmented views: it needs view='augmented'")
        self.schedule = RoundSchedule(budget, rounds, initial_fraction, buy_within)
        try:
            self.strategy = None if selection == "cached" else create_strategy(selection)
        except ValueError as err:
            raise ValueError(f"{err}; or 'cached' (train on what the cache holds)") from None
        if selection == "cached" and rounds > 1:
            raise ValueError("selection='cached' trains on what the cache holds: it cannot buy in rounds (rounds=1)")
        if retrain and (rounds == 1 or self.strategy is None):
            raise ValueError("retrain=True trains on what an earlier fit bought in rounds: give that fit's rounds "
                             "(>= 2) and selection, the plan its choices are recorded under")
        if self.strategy is not None and self.strategy.needs_student and rounds == 1:
            raise ValueError(f"selection={self.selection_name!r} chooses from the student's outputs, so it needs a "
                             "first round to train the student on: set rounds >= 2")
        if view not in ("augmented", "clean"):
            raise ValueError(f"view must be 'augmented' or 'clean', got {view!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.h.teacher_features.items()):
            raise ValueError(f"teacher_features maps names to teacher layers (module paths), got {teacher_features!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.datamodule = datamodule
        self.teacher_spec = teacher
        self.num_classes = datamodule.num_classes
        self.cache: TeacherCache | None = None
        self.budget_state: TeacherBudget | None = None
        self.teacher: Teacher | None = None  # the resolved teacher (a FeatureTeacher with teacher_features)
        self._features = None  # feature_specs, once known
        self.new_teacher_calls = 0  # samples this run (all its ranks) sent to the teacher
        self.round = 0  # the last round bought
        self.round_log: list[dict] = []  # per round: samples chosen, bought, scoring seconds, replayed or not
        self._train_loader: DataLoader | None = None
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

    @property
    def selection_name(self) -> str:
        return "cached" if self.strategy is None else getattr(self.strategy, "name", type(self.strategy).__qualname__)

    def _plan(self) -> None:
        dm, h = self.datamodule, self.h
        dm.setup("fit")
        pool = dm.train_indices
        if h.budget > len(pool):
            raise ValueError(f"budget {h.budget} exceeds the {len(pool)} training samples available")
        if self.strategy is None:  # train on what was paid for: no teacher call
            held = self._open_cache(self._resolve_teacher()).indices
            self.selected = np.intersect1d(held, pool)
            if not len(self.selected):
                raise ValueError("selection='cached' but the teacher cache holds no outputs for this training pool")
        else:
            first = "class_balanced" if h.rounds > 1 else self.selection_name
            n = self.schedule.sizes[0] // h.views_per_sample
            self.selected = select_samples(pool, dm.targets(pool), n, first, h.seed)
            if h.retrain:
                self.selected = np.union1d(self.selected, self._recorded_rounds())
        rest = np.setdiff1d(pool, self.selected)
        n_val = min(round(h.budget * h.val_fraction / (1 - h.val_fraction)), len(rest))
        self.val_indices = np.random.default_rng(h.seed + 1).permutation(rest)[:n_val]  # any prefix: all classes
        self.candidates = np.setdiff1d(rest, self.val_indices)  # what later rounds choose from

    def _recorded_rounds(self) -> np.ndarray:
        """Every later round's choice recorded in the cache under this plan (``retrain``); refuses missing ones."""
        cache = self._open_cache(self._resolve_teacher())
        budget, key = TeacherBudget(self.h.budget, cache.directory), plan_key(self._round_plan())
        picks = {r: budget.recorded_round(key, r) for r in range(1, self.h.rounds)}
        missing = [r + 1 for r, p in picks.items() if p is None]  # rounds are counted from 1 in messages
        if missing:
            raise ValueError(
                f"retrain=True trains on what a fit with this plan ({self._round_plan()}) bought, but round(s) "
                f"{missing} of {self.h.rounds} are not recorded in {cache.directory}: run that fit first (the same "
                "settings with retrain=False), to its last round")
        return np.concatenate(list(picks.values()))

    def _open_cache(self, teacher: Teacher) -> TeacherCache:
        h = self.h
        spec = CacheSpec(teacher=teacher_fingerprint(teacher), dataset=self.datamodule.fingerprint(),
                         view=self.view_protocol, num_classes=self.num_classes, dtype=h.dtype, topk=h.topk,
                         features=self.feature_specs, feature_dtype=h.feature_dtype if h.teacher_features else None)
        return open_cache(spec, h.cache_dir, self.datamodule)

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Choose the training and validation samples (cheap; no teacher call); with rounds, check the Trainer."""
        if not hasattr(self, "selected"):
            self._plan()
        if self.buys_in_rounds and stage == "fit" and self.trainer is not None:
            self._check_trainer_for_rounds(self.trainer)

    def fill(self) -> None:
        """Open the cache and run the teacher on the selected samples that have no outputs yet (once, ever).

        Called by ``train_dataloader`` — after Lightning restored a checkpoint, so that the budget recorded there
        counts — or directly (``lkd cache``). Under DDP every rank must call it: ranks are concurrent writers of
        one cache, each starting on its own shard, and the shared ledger keeps the total within the budget. With
        rounds, this buys the first round; ``train_dataloader`` buys the others when they are due.
        """
        if self.cache is not None:
            return
        self.setup("fit")
        rank, _ = rank_world()
        teacher = self._resolve_teacher()
        cache = self._open_cache(teacher) if rank == 0 else None
        barrier()  # rank 0 created the manifest; the others open it now
        cache = cache or self._open_cache(teacher)
        budget = TeacherBudget(self.h.budget, cache.directory)
        budget.load_state_dict(self._checkpoint_budget or budget_in_checkpoint(self.trainer, type(self).__qualname__))
        self.cache, self.budget_state = cache, budget
        self._buy()

    @property
    def stride(self) -> int:
        """Keys of view ``v`` of sample ``i`` are ``i + v * stride`` (:mod:`lightning_kd.data.multiview`)."""
        return self.datamodule.num_indices if self.h.views_per_sample > 1 or self.h.matched_views else 1

    @property
    def wanted(self) -> np.ndarray:
        """The cache keys this run trains on: the selected samples, or each of their views."""
        v = self.h.views_per_sample
        return self.selected if v == 1 else view_keys(self.selected, v, self.stride)

    @property
    def buys_in_rounds(self) -> bool:
        """Whether this fit buys (or replays) rounds at epoch boundaries; a retrain has them all from the start."""
        return self.h.rounds > 1 and not self.h.retrain

    def _plan_record(self) -> dict:
        """What this fit trains on, recorded in the ledger (a retrain says so)."""
        plan = self._round_plan()
        return {**plan, "retrain": True} if self.h.retrain else plan

    def _round_plan(self) -> dict:
        """The settings a round's choice depends on: fits with the same plan replay each other's rounds."""
        h = self.h
        plan = {"selection": self.selection_name, "seed": h.seed, "budget": h.budget}
        if h.views_per_sample > 1:
            plan["views_per_sample"] = h.views_per_sample
        if h.rounds == 1:
            return plan
        plan = {**plan, "rounds": h.rounds, "initial_fraction": h.initial_fraction}
        return plan if h.buy_within == 1 else {**plan, "buy_within": h.buy_within}  # the student that chooses

    def _device(self) -> torch.device | None:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"budget": self.budget_state.state_dict() if self.budget_state else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._checkpoint_budget = state.get("budget", {})
        if self.budget_state is not None:
            self.budget_state.load_state_dict(self._checkpoint_budget)

    # -- data --------------------------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        self.fill()
        h, dm = self.h, self.datamodule
        if h.matched_views:
            items = self.teacher_views()
        elif h.views_per_sample > 1:  # fresh augmentations; each item's outputs are those of one teacher view
            items = KeyedViews(self.train_keys, self.stride, seed=h.seed,
                               make=lambda idx, _: dm.make_dataset(idx, "train"))
        else:
            items = dm.make_dataset(self.train_indices, "train")
        train = CachedOutputs(items, self.cache, self.teacher_views() if h.serve_teacher_view else None)
        if h.group_size == 1:
            return train
        return CachedTuples(train, sample_tuples(len(self.train_keys), h.group_size, h.max_tuples, h.seed))

    @property
    def sides(self) -> tuple[int, int]:
        """(p, n): positive and negative members of a CKD tuple."""
        return split_sides(self.h.group_size)

    def train_dataloader(self) -> DataLoader:
        if self.buys_in_rounds:
            return self._round_loader()
        ds = self.train_dataset()
        if self.h.group_size == 1:
            return self.loader(ds, train=True)
        # An epoch of tuples has as many optimizer steps as an epoch of single samples (full batches only), so
        # that every method trains the same number of steps at a budget; tuples are freshly drawn each epoch.
        steps = max(len(self.train_keys) // self.batch_size, 1)
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
