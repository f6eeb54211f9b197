"""BADGE: k-means++ seeding on gradient embeddings, Ash et al., ICLR 2020.

The gradient of the cross-entropy at the student's own prediction with respect to its last linear layer,
g_i = (softmax(z_i) − onehot(argmax z_i)) ⊗ h_i, is large for uncertain samples and points in diverse directions
for diverse ones; k-means++ seeding on the g_i trades the two off without a hyper-parameter.
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
from lightning_kd.selection.kcenter import squared_norms
from lightning_kd.selection.registry import register_strategy


def gradient_factors(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """(P, C) float64 ``a = softmax(z) − onehot(argmax z)``, the class factor of the gradient embedding."""
    out = torch.empty(logits.shape, dtype=torch.float64)
    for rows in row_chunks(logits.shape[0], chunk_size):
        z = as_float64(logits[rows])
        a = torch.softmax(z, dim=1)
        a[torch.arange(a.shape[0]), z.argmax(dim=1)] -= 1.0
        out[rows] = a
    return out


def gradient_squared_distances(
    a: torch.Tensor,
    h: torch.Tensor,
    g_sq: torch.Tensor,
    a_c: torch.Tensor,
    h_c: torch.Tensor,
    g_c_sq: torch.Tensor,
) -> torch.Tensor:
    """(P, K) ‖a_i ⊗ h_i − a_k ⊗ h_k‖² without forming the (P, C·D) gradient embeddings.

    ‖a⊗h‖² = ‖a‖²‖h‖² and ⟨a_i⊗h_i, a_k⊗h_k⟩ = (a_i·a_k)(h_i·h_k); ``g_sq`` / ``g_c_sq`` are the squared norms
    of the rows / centers. Clamped at 0 against rounding.
    """
    cross = (a @ a_c.T) * (h @ h_c.T)
    return (g_sq[:, None] + g_c_sq[None, :] - 2.0 * cross).clamp_min_(0.0)


@register_strategy
class BadgeSelection(SelectionStrategy):
    """k-means++ seeding on gradient embeddings (h = the student's penultimate features).

    The first center is the largest gradient (ties: lowest position), each next one is drawn with probability
    ∝ its squared distance to the nearest center picked this round (``default_rng([seed, round])``; uniform
    among the rest if all distances are 0). As in the paper, samples bought in earlier rounds are not centers.
    """

    name = "badge"
    needs_student = True

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = check_chunk_size(chunk_size)

    def select(self, ctx: SelectionContext) -> np.ndarray:
        scores = self.require_scores(ctx)
        rng = ctx.rng()
        a = gradient_factors(scores.logits, self.chunk_size)
        h = as_float64(scores.embeddings)
        g_sq = squared_norms(a, self.chunk_size) * squared_norms(h, self.chunk_size)
        picked = np.zeros(len(ctx.pool), dtype=bool)
        nearest = torch.full_like(g_sq, torch.inf)
        j = int(torch.argmax(g_sq))
        picked[j] = True
        for _ in range(ctx.n - 1):
            d = gradient_squared_distances(a, h, g_sq, a[j : j + 1], h[j : j + 1], g_sq[j : j + 1])[:, 0]
            torch.minimum(nearest, d, out=nearest)
            nearest[j] = 0.0  # earlier picks stay at 0: the minimum with d >= 0 keeps them there
            weights = nearest.numpy()
            total = weights.sum()
            if total > 0:
                j = int(rng.choice(len(weights), p=weights / total))
            else:
                j = int(rng.choice(np.flatnonzero(~picked)))
            picked[j] = True
        return np.sort(ctx.pool[picked])
