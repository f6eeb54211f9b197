"""CRD, contrastive representation distillation (Tian et al., ICLR 2020), as pure functions of tensors.

Student and teacher representations are embedded to unit vectors; each is scored against K+1 rows of the other
side's memory bank (row 0: the sample itself, rows 1..K: negatives), h(v, m) = exp(v·m / τ) / Z, and the NCE
loss (Eq. 10-12 of the paper, with the noise distribution uniform over the N samples, P_n = 1/N) pushes the
positive's share up and the negatives' down. Banks are updated with momentum after each step.
"""

from __future__ import annotations

import torch


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit Euclidean norm."""
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(⟨memory[rows[b, j]], anchor[b]⟩ / τ) as a (B, K+1) tensor; the bank is not differentiated.

    A bank with no more rows than draws per sample (a budget's 2,000 samples, 16,385 draws each) is scored whole,
    once per anchor, and the draws read from those scores: the same dot products without gathering a
    (B, K+1, dim) copy of the bank (537 MB per call at B = 64, K = 16,384, dim = 128)."""
    memory = memory.detach()
    if memory.shape[0] <= rows.shape[1]:  # a copy: the backward must not see the bank's in-place update after it
        dots = (anchor @ memory.clone().T).gather(1, rows)
    else:
        dots = torch.bmm(memory[rows.reshape(-1)].view(*rows.shape, memory.shape[1]), anchor.unsqueeze(2)).squeeze(2)
    return torch.exp(dots / temperature)


def nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """The NCE objective on normalised scores (B, K+1), column 0 the positive, K negatives, P_n = 1/N:

    −(1/B)·Σ_b [log(P_b0 / (P_b0 + K·P_n)) + Σ_j log(K·P_n / (P_bj + K·P_n))].
    """
    k = scores.shape[1] - 1
    noise = k / n_data
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / scores.shape[0]


def momentum_rows(memory: torch.Tensor, rows: torch.Tensor, v: torch.Tensor, momentum: float) -> torch.Tensor:
    """The bank rows ``rows`` moved towards ``v``: normalize(momentum · memory[rows] + (1 − momentum) · v)."""
    return l2_normalize(memory[rows] * momentum + v.detach() * (1 - momentum))
