"""What a selection strategy is given and what it must return.

A strategy picks which pool samples the paid teacher is queried on next. :class:`SelectionContext` holds the
candidate pool, what was bought in earlier rounds and, for strategies that need it, the student's outputs
(:class:`PoolScores`); it checks them once so that strategies can trust their inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

DEFAULT_CHUNK_SIZE = 4096  # rows per block: a 4096 x 4096 float64 block is 128 MiB at most


def _empty_indices() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class PoolScores:
    """Student outputs (eval view, no teacher call) on the candidate pool and on the samples already bought."""

    logits: torch.Tensor  # (P, C) float, row i belongs to ctx.pool[i]
    embeddings: torch.Tensor  # (P, D) float: the student's penultimate features (input of its classifier)
    chosen_logits: torch.Tensor  # (Q, C) for ctx.chosen (Q may be 0)
    chosen_embeddings: torch.Tensor  # (Q, D)

    def __post_init__(self) -> None:
        shapes = {name: tuple(getattr(self, name).shape) for name in self.__dataclass_fields__}
        if any(len(s) != 2 for s in shapes.values()):
            raise ValueError(f"scores must all be 2-D tensors, got shapes {shapes}")
        if shapes["logits"][1] != shapes["chosen_logits"][1]:
            raise ValueError(
                f"logits {shapes['logits']} and chosen_logits {shapes['chosen_logits']} have different class counts"
            )
        if shapes["embeddings"][1] != shapes["chosen_embeddings"][1]:
            raise ValueError(
                f"embeddings {shapes['embeddings']} and chosen_embeddings {shapes['chosen_embeddings']} "
                "have different feature sizes"
            )


@dataclass(frozen=True)
class SelectionContext:
    """One selection round: choose ``n`` of ``pool``, knowing what was bought before (``chosen``)."""

    pool: np.ndarray  # int64 candidate sample indices (not yet bought), sorted, distinct
    targets: np.ndarray  # int labels of pool (same length)
    n: int  # how many to choose, 1 <= n <= len(pool)
    seed: int = 0
    round: int = 0  # 0 = first round
    chosen: np.ndarray = field(default_factory=_empty_indices)  # indices bought in earlier rounds
    chosen_targets: np.ndarray = field(default_factory=_empty_indices)
    scores: PoolScores | None = None  # given only to strategies with needs_student = True

    def __post_init__(self) -> None:
        for name in ("pool", "targets", "chosen", "chosen_targets"):
            value = np.asarray(getattr(self, name))
            if value.ndim != 1 or not (value.size == 0 or np.issubdtype(value.dtype, np.integer)):
                raise ValueError(f"{name} must be a 1-D integer array, got dtype {value.dtype}, shape {value.shape}")
            object.__setattr__(self, name, value.astype(np.int64, copy=False))
        for name in ("n", "seed", "round"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.seed < 0 or self.round < 0:
            raise ValueError(f"seed and round must be >= 0, got seed={self.seed}, round={self.round}")
        pool_size = len(self.pool)
        if not 1 <= self.n <= pool_size:
            raise ValueError(f"n must be in [1, pool size], got n={self.n} with a pool of {pool_size} samples")
        if np.any(np.diff(self.pool) <= 0):
            raise ValueError("pool must be sorted and distinct")
        if len(self.targets) != pool_size:
            raise ValueError(f"targets has {len(self.targets)} entries but the pool has {pool_size}")
        if len(self.chosen_targets) != len(self.chosen):
            raise ValueError(f"chosen_targets has {len(self.chosen_targets)} entries but chosen has {len(self.chosen)}")
        if np.isin(self.chosen, self.pool).any():
            raise ValueError("chosen and pool must be disjoint (a bought sample is no longer a candidate)")
        if self.scores is not None:
            s = self.scores
            want = {"logits": pool_size, "embeddings": pool_size}
            want.update(chosen_logits=len(self.chosen), chosen_embeddings=len(self.chosen))
            for name, rows in want.items():
                if getattr(s, name).shape[0] != rows:
                    raise ValueError(
                        f"scores.{name} has shape {tuple(getattr(s, name).shape)} but must have {rows} rows "
                        f"(pool: {pool_size}, chosen: {len(self.chosen)})"
                    )

    def rng(self) -> np.random.Generator:
        """The generator of this round, ``default_rng([seed, round])``: each round draws independently.

        In round 0 it equals ``default_rng(seed)`` (``SeedSequence`` pads its entropy with zero words, so
        ``[seed, 0]`` and ``seed`` mix identically for any seed below 2**96): round 0 reproduces the one-shot draws.
        """
        return np.random.default_rng([self.seed, self.round])


class SelectionStrategy(ABC):
    """Chooses which pool samples to buy teacher outputs for."""

    name: ClassVar[str]
    needs_student: ClassVar[bool]  # True: the caller must run the student on pool+chosen and pass scores

    @abstractmethod
    def select(self, ctx: SelectionContext) -> np.ndarray:
        """ctx.n distinct indices taken from ctx.pool, returned sorted (int64)."""

    def require_scores(self, ctx: SelectionContext) -> PoolScores:
        """``ctx.scores``, or a ValueError if the caller did not run the student."""
        if ctx.scores is None:
            raise ValueError(
                f"selection strategy {self.name!r} needs the student's outputs: pass SelectionContext(scores=...)"
            )
        return ctx.scores


def as_float64(x: torch.Tensor) -> torch.Tensor:
    """A detached float64 CPU copy (float64 keeps the greedy argmax choices stable against rounding)."""
    return x.detach().to(device="cpu", dtype=torch.float64)


def row_chunks(rows: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk_size`` rows covering ``range(rows)``."""
    for start in range(0, rows, chunk_size):
        yield slice(start, min(start + chunk_size, rows))


def check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size
