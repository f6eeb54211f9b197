"""Greedy k-center (core-set) selection, Sener & Savarese, ICLR 2018.

Choosing the points that minimise the largest distance from any pool sample to its nearest bought sample
bounds the core-set loss; the greedy 2-approximation repeatedly buys the sample farthest from every center.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_kd.selection.base import (
    DEFAULT_CHUNK_SIZE,
    SelectionContext,
    SelectionStrategy,
    as_float64,
    check_chunk_size,
    row_chunks,
)
from lightning_kd.selection.registry import register_strategy

SPACES = ("embedding", "softmax")


def squared_norms(x: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """(N,) row-wise ‖x_i‖², without an (N, D) temporary."""
    out = torch.empty(x.shape[0], dtype=x.dtype)
    for rows in row_chunks(x.shape[0], chunk_size):
        out[rows] = x[rows].square().sum(dim=1)
    return out


def min_squared_distances(
    x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """(P,) squared Euclidean distance of each row of ``x`` to its nearest row of ``centers`` (Q >= 1).

    Uses ‖a‖² + ‖b‖² − 2a·b clamped at 0, in blocks of at most ``chunk_size`` × ``chunk_size``.
    """
    c_sq = squared_norms(centers, chunk_size)
    out = torch.full((x.shape[0],), torch.inf, dtype=x.dtype)
    for rows in row_chunks(x.shape[0], chunk_size):
        for cols in row_chunks(centers.shape[0], chunk_size):
            block = torch.addmm(x_sq[rows, None] + c_sq[None, cols], x[rows], centers[cols].T, alpha=-2.0)
            out[rows] = torch.minimum(out[rows], block.min(dim=1).values)
    return out.clamp_min_(0.0)


def greedy_k_center(
    x: torch.Tensor,
    centers: torch.Tensor,
    n: int,
    rng: np.random.Generator,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """Positions (pick order) of ``n`` rows of ``x`` chosen greedily, farthest from the current centers first.

    ``centers`` are the initial centers; when there are none the first pick is ``rng.integers(len(x))``.
    Ties go to the lowest position (``torch.argmax`` returns the first maximum).
    """
    x_sq = squared_norms(x, chunk_size)
    picks: list[int] = []
    if centers.shape[0] == 0:
        picks.append(int(rng.integers(x.shape[0])))
        nearest = (x_sq + x_sq[picks[0]] - 2.0 * (x @ x[picks[0]])).clamp_min_(0.0)
    else:
        nearest = min_squared_distances(x, x_sq, centers, chunk_size)
    nearest[picks] = -torch.inf  # a bought sample is never picked again
    while len(picks) < n:
        j = int(torch.argmax(nearest))
        picks.append(j)
        torch.minimum(nearest, (x_sq + x_sq[j] - 2.0 * (x @ x[j])).clamp_min_(0.0), out=nearest)
        nearest[j] = -torch.inf
    return np.asarray(picks, dtype=np.int64)


@register_strategy
class KCenterSelection(SelectionStrategy):
    """Greedy k-center on the student's penultimate features (``space="embedding"``) or its softmax outputs.

    The samples bought in earlier rounds are the initial centers; distances are Euclidean, in float64.
    """

    name = "kcenter"
    needs_student = True

    def __init__(self, space: str = "embedding", chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.space = space
        self.chunk_size = check_chunk_size(chunk_size)

    def select(self, ctx: SelectionContext) -> np.ndarray:
        scores = self.require_scores(ctx)
        if self.space == "embedding":
            x, centers = as_float64(scores.embeddings), as_float64(scores.chosen_embeddings)
        else:
            x = torch.softmax(as_float64(scores.logits), dim=1)
            centers = torch.softmax(as_float64(scores.chosen_logits), dim=1)
        positions = greedy_k_center(x, centers, ctx.n, ctx.rng(), self.chunk_size)
        return np.sort(ctx.pool[positions])
