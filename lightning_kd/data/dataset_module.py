"""Bring your own data: any map-style dataset of ``(image, target)`` items as an indexed DataModule.

:class:`DatasetDataModule` wraps e.g. a torchvision ``ImageFolder`` with separate pipelines for the student's
training view, the evaluation view and the teacher's view (its own resolution and normalisation, seeded per
sample); :class:`ImageFolderDataModule` builds it from a folder and a few sizes, for ``lkd`` configs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from lightning_kd.data.base import IndexedDataModule, View
from lightning_kd.data.fingerprint import dataset_fingerprint, describe_change
from lightning_kd.data.samples import IndexedSamples, check_target, sample_path
from lightning_kd.data.views import image_transform, timm_transform


def _wrap(dataset: Dataset | None) -> Dataset | None:
    """A Hugging Face ``datasets.Dataset`` is read through :class:`HFImageDataset`; others are used as they are."""
    if dataset is not None and type(dataset).__module__.startswith("datasets."):
        from lightning_kd.data.hf import HFImageDataset

        return HFImageDataset(dataset)
    return dataset


def _stored_targets(dataset: Dataset) -> np.ndarray | None:
    for name in ("targets", "labels"):  # ImageFolder / DatasetFolder / CIFAR / MNIST; SVHN; HFImageDataset
        value = getattr(dataset, name, None)
        if value is not None and not callable(value) and len(value) == len(dataset):
            return np.asarray(value, dtype=np.int64)
    return None


class DatasetDataModule(IndexedDataModule):
    """Any map-style dataset whose items are ``(image, target)``, for training with cached teacher outputs.

    Sample ``i`` is item ``i`` of ``train``: the stable index the cache keys on. Images are decoded when fetched,
    in DataLoader workers when ``num_workers > 0`` (training, evaluation and the teacher fill alike).

    Args:
        train: the training dataset, e.g. ``torchvision.datasets.ImageFolder(root)`` (no transform of its own
            needed), any torchvision dataset, or a Hugging Face ``datasets.Dataset`` (``image``/``label`` columns).
        val / test: optional evaluation datasets, read with ``eval_transform``. Without ``val``, ``val_size``
            training items (seeded) are held out for validation.
        num_classes: default ``len(train.classes)``, else the largest target + 1.
        train_transform: the student's training view (fresh randomness at every fetch); default ``eval_transform``.
        eval_transform: the student's evaluation view; default: the image as a float tensor in [0, 1].
        teacher_transform: the teacher's view, at its own resolution and normalisation. It runs under RNGs seeded
            from ``(seed, index)``, ``seed`` being the cache's: a random pipeline gives one fixed augmented view
            per sample. A timm model name or teacher spec ``{"model": ...}`` takes timm's data config (evaluation
            pipeline). Default ``eval_transform``.
        fingerprint: the data's identity recorded in the cache; default computed (:mod:`lightning_kd.data.fingerprint`).
        pin_memory: pinned host memory for the loaders; default: when CUDA is available.

    The transforms carry their own normalisation: ``make_dataset``'s ``normalize`` does not apply here.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None = None,
        test: Dataset | None = None,
        *,
        num_classes: int | None = None,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        teacher_transform: Callable | str | Mapping[str, Any] | None = None,
        val_size: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        fingerprint: str | None = None,
    ) -> None:
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin)
        self.train_set, self.val_set, self.test_set = _wrap(train), _wrap(val), _wrap(test)
        self.eval_transform = eval_transform or v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.train_transform = train_transform or self.eval_transform
        if isinstance(teacher_transform, str | Mapping):
            teacher_transform = timm_transform(teacher_transform)
        self.teacher_transform = teacher_transform or self.eval_transform
        self.val_size, self.seed, self._fingerprint = val_size, seed, fingerprint
        classes = getattr(self.train_set, "classes", None)
        self._num_classes = num_classes or (len(classes) if classes else None)
        self._targets: np.ndarray | None = None

    @property
    def fill_workers(self) -> int:
        return self.num_workers

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._num_classes = int(self._all_targets().max()) + 1
        return self._num_classes

    def _all_targets(self) -> np.ndarray:
        if self._targets is None:
            stored = _stored_targets(self.train_set)
            if stored is None:
                warnings.warn(
                    f"{type(self.train_set).__name__} has no `targets` or `labels` attribute: reading all "
                    f"{len(self.train_set)} items (decoding every image) to learn their labels. Give the dataset a "
                    "`targets` list to skip this.",
                    stacklevel=3,
                )
                stored = np.asarray([int(self.train_set[i][1]) for i in range(len(self.train_set))], dtype=np.int64)
            self._targets = stored
        return self._targets

    def setup(self, stage: str | None = None) -> None:
        """Check every target against ``num_classes`` (without decoding) and hold out the validation items."""
        if hasattr(self, "train_indices"):
            return
        targets = self._all_targets()
        bad = np.flatnonzero((targets < 0) | (targets >= self.num_classes))
        if len(bad):
            i, path = int(bad[0]), sample_path(self.train_set, int(bad[0]))
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            where = f"sample {i}" + (f" ({path})" if path else "") + more
            check_target(int(targets[i]), self.num_classes, where)
        n = len(targets)
        if not 0 <= self.val_size < n:
            raise ValueError(f"val_size must be in [0, {n}), got {self.val_size}")
        order = np.random.default_rng(self.seed).permutation(n)
        self.val_indices = order[: self.val_size if self.val_set is None else 0]
        self.train_indices = np.sort(order[len(self.val_indices):])

    def targets(self, indices: np.ndarray) -> np.ndarray:
        return self._all_targets()[np.asarray(indices)]

    @property
    def num_indices(self) -> int:
        """Items of the training dataset: every sample index is below this."""
        return len(self.train_set)

    def fingerprint(self) -> str:
        return self._fingerprint or dataset_fingerprint(self.train_set)

    def fingerprint_change(self, previous: str) -> str:
        return describe_change(previous, self.fingerprint())

    def make_dataset(self, indices: np.ndarray, view: View, normalize: bool = True, seed: int = 0) -> IndexedSamples:
        """Training items ``indices``: "train" (student augmentation), "eval", or "fixed" (the teacher's view)."""
        if view == "fixed":
            return self.teacher_dataset(indices, view, seed=seed)
        if view not in ("train", "eval"):
            raise ValueError(f"view must be 'train', 'eval' or 'fixed', got {view!r}")
        transform = self.train_transform if view == "train" else self.eval_transform
        return IndexedSamples(self.train_set, indices, transform, num_classes=self.num_classes)

    def teacher_dataset(self, indices: np.ndarray, view: View, normalize: bool = False, seed: int = 0):
        """The teacher's view of ``indices``, seeded per sample for "fixed" and "eval" alike (reproducible)."""
        self._no_normalize(normalize)
        return IndexedSamples(self.train_set, indices, self.teacher_transform, num_classes=self.num_classes,
                              seed=seed)

    def view_fingerprint(self, view: View, normalize: bool = False, seed: int = 0) -> str:
        """The teacher pipeline's repr and the seed: a cache made with another teacher view is refused."""
        self._no_normalize(normalize)
        text = repr(self.teacher_transform)
        if " at 0x" in text:
            warnings.warn(f"the teacher transform's repr names a memory address ({text[:120]}...): it differs in "
                          "every process, so its cached outputs will not be found again. Use transforms with a "
                          "stable repr (torchvision, timm, or a class defining __repr__).", stacklevel=3)
        return f"{'fixed' if view == 'fixed' else 'clean'}(seed={seed}):{text}"

    @staticmethod
    def _no_normalize(normalize: bool) -> None:
        if normalize:
            raise ValueError("DatasetDataModule: the teacher's normalisation belongs in teacher_transform; "
                             "leave teacher_normalize=False")

    def _eval_loader(self, dataset: Dataset | None):
        if dataset is None:
            return []
        samples = IndexedSamples(dataset, np.arange(len(dataset)), self.eval_transform, num_classes=self.num_classes)
        return self.loader(samples, train=False)

    def train_dataloader(self):
        self.setup()
        return self.loader(self.make_dataset(self.train_indices, "train"), train=True)

    def val_dataloader(self):
        self.setup()
        if self.val_set is None and len(self.val_indices):
            return self.loader(self.make_dataset(self.val_indices, "eval"), train=False)
        return self._eval_loader(self.val_set)

    def test_dataloader(self):
        return self._eval_loader(self.test_set)


class ImageFolderDataModule(DatasetDataModule):
    """Class sub-folders of images (torchvision ``ImageFolder``) with standard pipelines, for ``lkd`` configs.

    The student trains on RandomResizedCrop + flip at ``image_size`` and is evaluated on Resize + CenterCrop,
    normalized with ``mean``/``std``. The teacher sees Resize + CenterCrop at ``teacher_image_size``, normalized
    with ``teacher_mean``/``teacher_std`` (none: RGB in [0, 1]); ``teacher_model`` (a timm name) takes timm's data
    config instead, and ``teacher_augment`` gives it one fixed RandomResizedCrop + flip view per sample.
    """

    def __init__(
        self,
        root: str,
        val_root: str | None = None,
        test_root: str | None = None,
        image_size: int = 224,
        mean: Sequence[float] | None = (0.485, 0.456, 0.406),
        std: Sequence[float] | None = (0.229, 0.224, 0.225),
        teacher_image_size: int | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
        teacher_model: str | None = None,
        teacher_augment: bool = False,
        val_size: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        fingerprint: str | None = None,
    ) -> None:
        from torchvision.datasets import ImageFolder

        size = teacher_image_size or image_size
        if teacher_model is not None:
            teacher = timm_transform(teacher_model, is_training=teacher_augment)
        else:
            teacher = image_transform(size, train=teacher_augment, mean=teacher_mean, std=teacher_std)
        super().__init__(
            ImageFolder(root),
            ImageFolder(val_root) if val_root else None,
            ImageFolder(test_root) if test_root else None,
            train_transform=image_transform(image_size, train=True, mean=mean, std=std),
            eval_transform=image_transform(image_size, mean=mean, std=std),
            teacher_transform=teacher,
            val_size=val_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            fingerprint=fingerprint,
        )
