"""Buying the budget in rounds: how much each round buys, when it starts, and the student's scores of the pool.

Round 0 buys a class-balanced random share of the budget; round ``r >= 1`` starts at epoch
``floor(r * buy_within * max_epochs / rounds)`` (every round within the first ``buy_within`` of the epochs), where
the selection strategy scores the samples not bought yet with the student trained so far (forward passes only,
never the teacher) and the DataModule buys the next share.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_kd.cache import TeacherBudget
from lightning_kd.data.base import collate
from lightning_kd.data.distributed import any_rank, barrier, gather_strided, rank_world
from lightning_kd.selection import PoolScores, SelectionContext, SelectionStrategy


@dataclass(frozen=True)
class RoundSchedule:
    """``budget`` split into ``rounds`` purchases: ``initial_fraction`` of it first (None: equal shares), the rest
    evenly over the later rounds (earlier rounds take the remainder); the rounds start at equal steps within the
    first ``buy_within`` of the epochs."""

    budget: int
    rounds: int = 1
    initial_fraction: float | None = None
    buy_within: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if self.rounds > self.budget:
            raise ValueError(f"rounds={self.rounds} is larger than the budget {self.budget}: every round must buy at "
                             "least one sample")
        if isinstance(self.buy_within, bool) or not isinstance(self.buy_within, (int, float)) \
                or not 0 < self.buy_within <= 1:
            raise ValueError(f"buy_within must be a fraction of the epochs in (0, 1], got {self.buy_within!r}")
        f = self.initial_fraction
        if f is not None and not 0 < f < 1:
            raise ValueError(f"initial_fraction must be in (0, 1) or None (equal shares), got {f}")
        if min(self.sizes) < 1:
            raise ValueError(f"initial_fraction={f} leaves a round of the budget {self.budget} with nothing to buy "
                             f"(round sizes {self.sizes})")

    @property
    def sizes(self) -> list[int]:
        """Samples bought in each round; they sum to the budget."""
        b, r = self.budget, self.rounds
        if r == 1:
            return [b]
        first = b // r + (b % r > 0) if self.initial_fraction is None else round(self.initial_fraction * b)
        rest, later = b - first, r - 1
        return [first] + [rest // later + (i < rest % later) for i in range(later)]

    def start_epoch(self, round_: int, max_epochs: int) -> int:
        """The epoch at which round ``round_`` is bought (round 0: before training)."""
        return math.floor(round_ * self.buy_within * max_epochs / self.rounds)

    def min_epochs(self) -> int:
        """The fewest ``max_epochs`` at which every round starts at an epoch of its own."""
        return math.ceil(self.rounds / self.buy_within - 1e-9)

    def round_at(self, epoch: int, max_epochs: int) -> int:
        """The last round whose start epoch is ``<= epoch``."""
        return max(r for r in range(self.rounds) if self.start_epoch(r, max_epochs) <= epoch)


def plan_key(plan: dict) -> str:
    """The identity a round's record is filed under: runs with the same plan replay each other's rounds."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def choose_round(
    strategy: SelectionStrategy,
    budget: TeacherBudget,
    key: str,
    round_: int,
    n: int,
    candidates: np.ndarray,
    chosen: np.ndarray,
    targets: Callable[[np.ndarray], np.ndarray],
    score: Callable[[np.ndarray, np.ndarray], PoolScores],
    seed: int,
    device: torch.device | None,
) -> tuple[np.ndarray, dict]:
    """The samples round ``round_`` buys, and how they were found (``{"replayed", "score_s"}``).

    A selection recorded in the cache's ledger (by an earlier attempt of this run, a rerun, or a concurrent run of
    the same plan) is replayed: no scoring, no new choice. Otherwise every rank scores the pool with the student
    (``score(candidates, chosen)``; a collective under DDP), rank 0 chooses and records, and after a barrier every
    rank reads the recorded choice: one rank decides, all agree, and a kill at any point replays what was recorded.
    """
    rank, _ = rank_world()
    recorded = budget.recorded_round(key, round_) if rank == 0 else None
    need = any_rank(rank == 0 and recorded is None, device)
    info = {"replayed": not need, "score_s": 0.0}
    if need:
        scores = None
        if strategy.needs_student:
            start = time.perf_counter()
            scores = score(candidates, chosen)
            info["score_s"] = round(time.perf_counter() - start, 3)
        if rank == 0:
            ctx = SelectionContext(pool=candidates, targets=targets(candidates), n=min(n, len(candidates)), seed=seed,
                                   round=round_, chosen=chosen, chosen_targets=targets(chosen), scores=scores)
            budget.record_round(key, round_, strategy.select(ctx), strategy=getattr(strategy, "name", "custom"),
                                score_s=info["score_s"])
    barrier()
    picked = budget.recorded_round(key, round_)
    if picked is None:
        raise RuntimeError(f"round {round_} of plan {key} was not recorded in {budget.directory}")
    return picked, info


def classifier_of(model: nn.Module) -> nn.Module:
    """The student's final linear layer, whose input is the embedding strategies such as k-center use.

    timm models name it through ``get_classifier()``; the zoo's CNNs call it ``fc``; else the last ``nn.Linear``.
    """
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "fc", None)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"cannot find the classifier of {type(model).__name__} (no nn.Linear): strategies that use "
                        "embeddings (kcenter, margin_kcenter, badge) need one; entropy and margin do not")
    return linears[-1]


@torch.no_grad()
def score_samples(
    module: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | None,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "scoring the pool",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, embeddings) of ``module`` on every sample of ``dataset``, in order, in eval mode (restored after).

    Under DDP each rank scores the positions ``rank::world`` and the results are all-gathered, so every rank
    takes part in the same forward passes (FSDP needs that) and gets the whole table.
    """
    rank, world = rank_world()
    positions = list(range(rank, len(dataset), world))
    student = getattr(module, "student", module)
    head = classifier_of(student)
    feats: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _, args: feats.append(args[0].detach().float().cpu()))
    was_training = module.training
    module.eval()
    logits = []
    try:
        shard = torch.utils.data.Subset(dataset, positions)
        loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
        per_rank = -(-len(dataset) // world)
        n_batches = -(-per_rank // batch_size)  # every rank runs as many forwards, the short ones on padding
        batches = iter(loader)
        bar = _progress(n_batches, desc) if progress and rank == 0 else None
        width = None  # (classes, embedding size), known after the first forward
        for _ in range(n_batches):
            batch = next(batches, None)
            x = batch["input"] if batch is not None else dataset.__getitems__([0])["input"]
            out = module(x.to(device) if device is not None else x).float().cpu()
            width = (out.shape[1], feats[-1].shape[1]) if feats else (out.shape[1], 0)
            if batch is not None:
                logits.append(out)
            elif feats:
                feats.pop()
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
    finally:
        handle.remove()
        module.train(was_training)
    if len(feats) != len(logits):
        raise RuntimeError(f"{type(student).__name__}'s classifier {type(head).__name__} ran {len(feats)} times in "
                           f"{len(logits)} forwards: cannot take the embeddings from it")
    c, d = width or (0, 0)
    z = torch.cat(logits) if logits else torch.zeros(0, c)
    h = torch.cat(feats) if feats else torch.zeros(0, d)
    return gather_strided(z, len(dataset), device), gather_strided(h, len(dataset), device)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)


class RoundsMixin:
    """The round-buying part of :class:`~lightning_kd.data.CachedTeacherDataModule` (``rounds > 1``).

    It uses the DataModule's plan (``schedule``, ``strategy``, ``candidates``, ``selected``), its budget and
    ``_buy()`` (the same claimed, budgeted fill as the first round), and the Trainer it is attached to.
    """

    def _check_trainer_for_rounds(self, trainer) -> None:
        """Rounds start at epochs, so they need ``max_epochs`` and a train dataloader reloaded every epoch."""
        r, need = self.h.rounds, self.schedule.min_epochs()
        if trainer.max_epochs is None or trainer.max_epochs < need:
            within = f" within the first {self.h.buy_within:g} of them" if self.h.buy_within < 1 else ""
            raise ValueError(f"rounds={r} buys the budget at epoch boundaries{within}: give the Trainer max_epochs >= "
                             f"{need} (got max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps})")
        every = trainer.reload_dataloaders_every_n_epochs
        if every not in (0, 1):
            raise ValueError(f"rounds={r} needs the train dataloader reloaded every epoch, but the Trainer reloads it "
                             f"every {every} epochs: use Trainer(reload_dataloaders_every_n_epochs=1) (or leave it "
                             "at 0, and the DataModule sets 1)")
        trainer.reload_dataloaders_every_n_epochs = 1  # train_dataloader() then buys each round when it is due

    def _buy_due_rounds(self) -> None:
        """Buy every round that is due at the Trainer's current epoch (several after a resume: they replay).

        ``round_log`` gets one entry per round bought here, ``round`` counted from 0 (the first, bought before
        training, has none): samples chosen, new teacher calls, scoring seconds, and whether it was replayed.
        """
        epochs = self.trainer.max_epochs if self.trainer is not None else None
        due = self.schedule.round_at(self.trainer.current_epoch, epochs) if epochs else 0
        while self.round < due:
            r = self.round + 1
            candidates = np.setdiff1d(self.candidates, self.selected)
            picked, info = choose_round(
                self.strategy, self.budget_state, plan_key(self._round_plan()), r, self.schedule.sizes[r],
                candidates, self.selected, self.datamodule.targets, self._score, self.h.seed, self._device(),
            )
            self.selected, self.round, self._train_loader = np.union1d(self.selected, picked), r, None
            before = self.new_teacher_calls
            self._buy()
            self.round_log.append({"round": r, "epoch": self.trainer.current_epoch, "chosen": int(len(picked)),
                                   "new_calls": self.new_teacher_calls - before, **info})

    def _score(self, candidates: np.ndarray, chosen: np.ndarray) -> PoolScores:
        """The student's logits and embeddings on the candidates and the samples already bought (eval view)."""
        both = np.concatenate([candidates, chosen])
        rank, _ = rank_world()
        z, e = score_samples(
            self.trainer.lightning_module, self.datamodule.make_dataset(both, "eval"), batch_size=self.eval_batch_size,
            device=self._device(), num_workers=self.num_workers, progress=self.h.progress and rank == 0,
            desc=f"round {self.round + 2} of {self.h.rounds}: scoring {len(candidates)} samples",  # counted from 1
        )
        p = len(candidates)
        return PoolScores(z[:p], e[:p], z[p:], e[p:])

    def _round_loader(self) -> DataLoader:
        """With rounds: buy what is due, then serve the epoch length of the whole budget from what is bought."""
        self.fill()
        self._buy_due_rounds()
        if self._train_loader is None:
            ds = self.train_dataset()
            bs, budget = self.batch_size, self.h.budget
            steps = max(budget // bs, 1)  # the same optimizer steps per epoch for tuples and single samples
            sampler = RandomSampler(ds, num_samples=steps * bs)  # repeats whole permutations of a smaller set
            self._train_loader = DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=self.num_workers,
                                            pin_memory=self.pin_memory, collate_fn=collate)
        return self._train_loader
