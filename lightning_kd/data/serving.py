"""Training datasets that serve cached teacher outputs with every batch: plain samples and CKD tuples."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from lightning_kd.cache import TeacherCache


class CachedOutputs(Dataset):
    """Adds ``teacher_logits`` from the cache to the batches of an indexed dataset, and ``teacher_features``
    (``{name: (B, *shape)}``) when the cache stores features; with ``teacher_view`` (a dataset of the teacher's
    views of the same samples, in the same order), also ``teacher_view``: the input the teacher saw."""

    def __init__(self, dataset: Dataset, cache: TeacherCache, teacher_view: Dataset | None = None) -> None:
        self.dataset, self.cache, self.teacher_view = dataset, cache, teacher_view

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, positions: list[int]) -> dict:
        batch = self.dataset.__getitems__(positions)
        batch["teacher_logits"] = self.cache.get(batch["index"])
        if self.cache.spec.features:
            batch["teacher_features"] = self.cache.get_features(batch["index"])
        if self.teacher_view is not None:
            batch["teacher_view"] = self.teacher_view.__getitems__(positions)["input"]
        return batch


def _grouped(value, shape: tuple[int, ...]):
    return {k: _grouped(v, shape) for k, v in value.items()} if isinstance(value, dict) else value.view(
        shape + value.shape[1:])


class CachedTuples(Dataset):
    """CKD tuples: item ``t`` is the group ``tuples[t]`` of positions in ``dataset``; batches are (B, k, ...).

    Every member gets its own fresh augmentation; ``teacher_logits`` (and ``teacher_features``) are the cached
    outputs of the members.
    """

    def __init__(self, dataset: Dataset, tuples: np.ndarray) -> None:
        self.dataset, self.tuples = dataset, tuples

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitems__(self, positions: list[int]) -> dict:
        members = self.tuples[np.asarray(positions)]
        batch = self.dataset.__getitems__(members.reshape(-1).tolist())
        return {k: _grouped(v, members.shape) for k, v in batch.items()}
