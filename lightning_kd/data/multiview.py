"""Several teacher views per sample (FKD-style): the budget counts teacher calls, i.e. (sample, view) pairs.

View ``v`` of sample ``i`` is the datamodule's fixed view under the seed ``view_seed(seed, v)``: reproducible from
``(seed, i, v)`` for any random pipeline, and view 0 is the one fixed view a single-view run buys (so their
outputs are shared). Its outputs are stored under the key ``i + v * stride``, ``stride`` being the number of
sample indices of the training split (``datamodule.num_indices``): view 0's key is the sample index itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset


def view_seed(seed: int, view: int) -> int:
    """The seed of view ``view`` of every sample; view 0 keeps ``seed`` (the single-view run's fixed view)."""
    return seed if view == 0 else int(np.random.SeedSequence([seed, view]).generate_state(1, np.uint32)[0] >> 1)


def view_keys(indices: np.ndarray, views: int, stride: int) -> np.ndarray:
    """The cache keys of views ``0..views-1`` of ``indices``, sorted."""
    idx = np.asarray(indices, dtype=np.int64)
    return np.sort(np.concatenate([idx + v * stride for v in range(views)]))


class KeyedViews(Dataset):
    """(sample, view) pairs named by their keys, as one indexed dataset whose batches carry ``"index"`` = key.

    ``make(indices, seed)`` builds the dataset of one view of ``indices`` under ``seed`` (e.g. the teacher's fixed
    view, or the student's matched or freshly augmented view); :func:`view_seed` gives each view its seed.
    """

    def __init__(self, keys: np.ndarray, stride: int, make: Callable[[np.ndarray, int], Dataset], seed: int) -> None:
        self.indices = np.asarray(keys, dtype=np.int64)
        self.stride = stride
        views = self.indices // stride
        self.parts = {}
        for v in np.unique(views):
            samples = np.sort(self.indices[views == v] % stride)
            self.parts[int(v)] = (samples, make(samples, view_seed(seed, int(v))))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        keys = self.indices[np.asarray(positions, dtype=np.int64)]
        views, samples = keys // self.stride, keys % self.stride
        out: dict[str, torch.Tensor] | None = None
        for v in np.unique(views):
            rows = np.flatnonzero(views == v)
            part_samples, part = self.parts[int(v)]
            batch = part.__getitems__(np.searchsorted(part_samples, samples[rows]).tolist())
            if out is None:
                out = {k: t.new_empty((len(keys), *t.shape[1:])) for k, t in batch.items()}
            for k, t in batch.items():
                out[k][torch.from_numpy(rows)] = t
        out["index"] = torch.from_numpy(keys)
        return out
