"""The stateful part of CRD: embeddings, the two memory banks and the negatives drawn for each sample."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lightning_kd.losses.contrastive import contrast_scores, l2_normalize, momentum_rows, nce_loss


class ContrastHead(nn.Module):
    """CRD on (cached) teacher logits over the ``n_data`` training samples, as in the official CKD baselines.

    Linear embeddings of student and teacher logits to ``dim`` (unit-normalized); bank ``memory_s`` holds student
    embeddings, ``memory_t`` teacher ones, both initialised uniform in ±1/√(dim/3) and updated with ``momentum``.
    ``forward(z_s, z_t, rows, labels)`` draws ``negatives`` bank rows per sample uniformly, with replacement, from
    the samples of other classes (``row_labels``), and returns NCE(student vs teacher bank) + NCE(teacher vs
    student bank). The normalisers Z are fixed at the first batch (mean score · N), as in RepDistiller.
    """

    def __init__(self, in_dim: int, row_labels: np.ndarray | torch.Tensor, dim: int = 128, negatives: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        labels = torch.as_tensor(np.asarray(row_labels), dtype=torch.int64)
        if labels.ndim != 1 or len(labels) < 2:
            raise ValueError(f"row_labels must be the labels of >= 2 training samples, got shape {tuple(labels.shape)}")
        if len(labels.unique()) < 2:
            raise ValueError("CRD draws negatives from other classes: the training samples hold only one class")
        self.embed_s, self.embed_t = nn.Linear(in_dim, dim), nn.Linear(in_dim, dim)
        self.negatives, self.temperature, self.momentum = negatives, temperature, momentum
        n, bound = len(labels), 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(n, dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_t", torch.rand(n, dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z for the student and teacher scores; < 0: not set
        self.register_buffer("row_labels", labels)
        self._others = {int(c): torch.nonzero(labels != c).flatten() for c in labels.unique()}

    @property
    def n_data(self) -> int:
        return len(self.row_labels)

    def sample_rows(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 1 + K) bank rows: each sample's own row, then K rows drawn from samples of other classes."""
        out = torch.empty(len(rows), 1 + self.negatives, dtype=torch.int64)
        out[:, 0] = rows.cpu()
        labels = self.row_labels[rows.cpu()].cpu()
        for c in labels.unique().tolist():
            sel = torch.nonzero(labels == c).flatten()
            pool = self._others[c]
            out[sel, 1:] = pool[torch.randint(len(pool), (len(sel), self.negatives), generator=generator)]
        return out.to(rows.device)

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        v_s, v_t = l2_normalize(self.embed_s(z_s)), l2_normalize(self.embed_t(z_t.detach()))
        drawn = self.sample_rows(rows)
        p_s = contrast_scores(v_s, self.memory_t, drawn, self.temperature)  # student anchor, teacher bank
        p_t = contrast_scores(v_t, self.memory_s, drawn, self.temperature)
        if self.z[0] < 0:
            self.z.copy_(torch.stack([p_s.mean(), p_t.mean()]).detach() * self.n_data)
        loss = nce_loss(p_s / self.z[0], self.n_data) + nce_loss(p_t / self.z[1], self.n_data)
        with torch.no_grad():
            self.memory_s.index_copy_(0, rows, momentum_rows(self.memory_s, rows, v_s, self.momentum))
            self.memory_t.index_copy_(0, rows, momentum_rows(self.memory_t, rows, v_t, self.momentum))
        return loss
