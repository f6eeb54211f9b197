"""Indexed datasets and the DataModule contract that the teacher-output cache builds on.

Every sample has a stable integer ``index`` (its row in the split's source arrays) and every batch is one dict:
``{"index": int64 (B,), "input": float32 (B, C, H, W), "target": int64 (B,)}``; the cache adds
``"teacher_logits"``. Datasets fetch and transform whole batches (``__getitems__``), so loading costs a few
tensor ops per batch, not a Python loop per sample.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_kd.data import transforms as T

View = Literal["train", "eval", "fixed"]


class IndexedImages(Dataset):
    """A view of a uint8 image split (N, C, H, W) restricted to ``indices``, transformed per batch.

    ``view``: "train" draws a fresh random crop + flip on every fetch (the student's augmentation); "fixed" uses
    the crop + flip derived from ``(seed, index)`` (one augmented view per sample, reproducible); "eval" none.
    ``normalize`` applies ``(x - mean) / std`` after scaling to [0, 1]; without it inputs stay in [0, 1].
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        indices: np.ndarray | torch.Tensor,
        *,
        view: View = "eval",
        normalize: bool = True,
        mean: tuple[float, ...] = (0.0, 0.0, 0.0),
        std: tuple[float, ...] = (1.0, 1.0, 1.0),
        padding: int = 4,
        seed: int = 0,
    ) -> None:
        if view not in ("train", "eval", "fixed"):
            raise ValueError(f"view must be 'train', 'eval' or 'fixed', got {view!r}")
        self.images, self.targets = images, targets
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        self.view, self.normalize, self.mean, self.std = view, normalize, mean, std
        self.padding, self.seed = padding, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        index = self.indices[torch.as_tensor(positions, dtype=torch.int64)]
        images = self.images[index]
        if self.view == "train":
            images = T.crop_flip(images, self.padding, *T.crop_flip_params(len(index), self.padding))
        elif self.view == "fixed":
            images = T.crop_flip(
                images, self.padding, *T.crop_flip_params(len(index), self.padding, index=index, seed=self.seed)
            )
        x = T.to_float(images)
        if self.normalize:
            x = T.normalize(x, self.mean, self.std, inplace=True)  # x is this call's own copy
        return {"index": index, "input": x, "target": self.targets[index]}

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}


def collate(batch: dict | list) -> dict:
    """Collate for datasets with ``__getitems__`` (already a batch dict) and for plain per-sample datasets."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class IndexedDataModule(L.LightningDataModule):
    """A DataModule whose training samples can be addressed by stable index.

    What :class:`~lightning_kd.data.cached.CachedTeacherDataModule` needs from the DataModule it wraps:
    ``num_classes``, ``train_indices`` (the pool that training samples are chosen from), ``targets(indices)``,
    ``make_dataset(indices, view, normalize)`` over the training split, ``fingerprint()`` (identity of the data,
    recorded in the cache manifest), and ``val_dataloader()`` / ``test_dataloader()``. The teacher's inputs come
    from ``teacher_dataset`` and are named by ``view_fingerprint`` (both default to the :class:`IndexedImages`
    views); ``fill_workers`` DataLoader workers decode them during the fill (0: in the fill's own thread).
    """

    num_classes: int
    train_indices: np.ndarray

    fill_workers: int = 0

    def __init__(
        self, batch_size: int = 128, eval_batch_size: int = 512, num_workers: int = 0, pin_memory: bool = False
    ) -> None:
        super().__init__()
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.pin_memory = pin_memory

    def make_dataset(self, indices: np.ndarray, view: View, normalize: bool = True, seed: int = 0) -> IndexedImages:
        raise NotImplementedError

    def targets(self, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    @property
    def num_indices(self) -> int:
        """How many sample indices the training split has (all below it); needed for several views per sample."""
        raise NotImplementedError(f"{type(self).__name__} does not say how many sample indices it has (num_indices): "
                                  "views_per_sample > 1 and matched_views need it")

    def fingerprint_change(self, previous: str) -> str:
        """What changed in the data since a cache recorded ``previous`` as its fingerprint."""
        return f"the data changed since the cache was made (it was {previous!r}, now {self.fingerprint()!r})"

    def teacher_dataset(self, indices: np.ndarray, view: View, normalize: bool = False, seed: int = 0) -> Dataset:
        """What the teacher is run on: ``view`` "fixed" (one seeded augmented view per sample) or "eval" (clean)."""
        return self.make_dataset(indices, view, normalize, seed)

    def view_fingerprint(self, view: View, normalize: bool = False, seed: int = 0) -> str:
        """The identity of ``teacher_dataset``'s view, recorded in the cache: another view's outputs are refused."""
        norm = "normalized" if normalize else "raw"
        return f"augmented(seed={seed},pad=4,{norm})" if view == "fixed" else f"clean({norm})"

    def loader(self, dataset: Dataset, *, train: bool, batch_size: int | None = None) -> DataLoader:
        """A DataLoader with the project's collate; shuffled and dropping the last partial batch when training."""
        return DataLoader(
            dataset,
            batch_size=batch_size or (self.batch_size if train else self.eval_batch_size),
            shuffle=train,
            drop_last=train and len(dataset) > (batch_size or self.batch_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=collate,
        )
