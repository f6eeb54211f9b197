"""Indexed datasets, the CIFAR-10 DataModule and the budgeted teacher-output cache DataModule."""

from lightning_kd.data.base import IndexedDataModule, IndexedImages, collate
from lightning_kd.data.cached import CachedTeacherDataModule, select_samples
from lightning_kd.data.cifar import CIFAR10DataModule, DataNotFoundError, default_data_dir, load_cifar10
from lightning_kd.data.fill import fill_cache
from lightning_kd.data.tuples import sample_tuples, split_sides

__all__ = [
    "CIFAR10DataModule",
    "CachedTeacherDataModule",
    "DataNotFoundError",
    "IndexedDataModule",
    "IndexedImages",
    "collate",
    "default_data_dir",
    "fill_cache",
    "load_cifar10",
    "sample_tuples",
    "select_samples",
    "split_sides",
]
