"""Indexed datasets, the CIFAR-10 DataModule, any (image, target) dataset, and the teacher-output cache DataModule."""

from lightning_kd.data.base import IndexedDataModule, IndexedImages, collate
from lightning_kd.data.cached import CachedTeacherDataModule
from lightning_kd.data.cifar import CIFAR10DataModule, DataNotFoundError, default_data_dir, load_cifar10
from lightning_kd.data.dataset_module import DatasetDataModule, ImageFolderDataModule
from lightning_kd.data.fill import fill_cache
from lightning_kd.data.hf import HFImageDataset
from lightning_kd.data.samples import IndexedSamples, SampleLoadError, sample_rng
from lightning_kd.data.selection import select_samples
from lightning_kd.data.tuples import sample_tuples, split_sides
from lightning_kd.data.views import image_transform, timm_data_config, timm_transform

__all__ = [
    "CIFAR10DataModule",
    "CachedTeacherDataModule",
    "DataNotFoundError",
    "DatasetDataModule",
    "HFImageDataset",
    "ImageFolderDataModule",
    "IndexedDataModule",
    "IndexedImages",
    "IndexedSamples",
    "SampleLoadError",
    "collate",
    "default_data_dir",
    "fill_cache",
    "image_transform",
    "load_cifar10",
    "sample_rng",
    "sample_tuples",
    "select_samples",
    "split_sides",
    "timm_data_config",
    "timm_transform",
]
