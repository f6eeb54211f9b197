"""Training datasets that serve cached teacher outputs with every batch: plain samples and CKD tuples."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_kd.cache import TeacherCache


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
