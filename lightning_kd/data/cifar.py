"""CIFAR-10 from the offline JPEG archive (``cifar10_jpeg.npz``), with torchvision's copy as a fallback.

The JPEGs are decoded once into a uint8 array cached outside the repository (``$LKD_CACHE_DIR`` or
``~/.cache/lightning_kd``). Sample ``i`` of a split is row ``i`` of that split's arrays: the stable index that
the teacher-output cache keys on.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lightning_kd.data.base import IndexedDataModule, IndexedImages, View
from lightning_kd.utils import sha256_file

NPZ_NAME = "cifar10_jpeg.npz"
NPZ_SHA256 = "b1091c5ea41ae05745b054dfe78e169e8ec1f4dc2df004961759ace1b182b15c"
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataNotFoundError(FileNotFoundError):
    """Raised when neither the offline archive nor torchvision's CIFAR-10 can be had."""


def project_root() -> Path:
    """The directory holding ``lightning_kd/`` (the repository root for a source checkout)."""
    return Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    """``$LKD_DATA_DIR`` if set, else ``../shared/data`` beside the repository root."""
    env = os.environ.get("LKD_DATA_DIR")
    return Path(env) if env else project_root().parent / "shared" / "data"


def default_cache_dir() -> Path:
    """Where decoded arrays (and torchvision downloads) go: ``$LKD_CACHE_DIR`` or ``~/.cache/lightning_kd``."""
    env = os.environ.get("LKD_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lightning_kd"


def _decode_split(npz: np.lib.npyio.NpzFile, split: str) -> tuple[np.ndarray, np.ndarray]:
    blob, offsets, labels = npz[f"{split}_jpeg"], npz[f"{split}_offsets"], npz[f"{split}_labels"]
    n = len(labels)
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in tqdm(range(n), desc=f"decoding CIFAR-10 {split} JPEGs (once)", unit="img", mininterval=1.0):
        with Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())) as im:
            images[i] = np.asarray(im.convert("RGB"))
    return images, labels.astype(np.int64)


def _load_npz(npz_path: Path, cache_dir: Path) -> dict[str, np.ndarray]:
    digest = sha256_file(npz_path)
    if digest != NPZ_SHA256:
        raise ValueError(
            f"{npz_path} has sha256 {digest}, expected {NPZ_SHA256}: the file is corrupted or a different version. "
            "Replace it with the published archive."
        )
    decoded = cache_dir / f"cifar10_jpeg_{digest[:16]}.npz"
    if not decoded.exists():
        with np.load(npz_path) as npz:
            train_x, train_y = _decode_split(npz, "train")
            test_x, test_y = _decode_split(npz, "test")
        decoded.parent.mkdir(parents=True, exist_ok=True)
        tmp = decoded.with_name(decoded.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
        os.replace(tmp, decoded)
    with np.load(decoded) as arrays:
        return {k: arrays[k] for k in ("train_x", "train_y", "test_x", "test_y")} | {"source": np.array(digest)}


def _load_torchvision(root: Path, download: bool) -> dict[str, np.ndarray]:
    from torchvision.datasets import CIFAR10

    train, test = CIFAR10(root, train=True, download=download), CIFAR10(root, train=False, download=download)
    digest = hashlib.sha256(train.data.tobytes() + np.asarray(train.targets, dtype=np.int64).tobytes()).hexdigest()
    return {
        "train_x": train.data,
        "train_y": np.asarray(train.targets, dtype=np.int64),
        "test_x": test.data,
        "test_y": np.asarray(test.targets, dtype=np.int64),
        "source": np.array("torchvision:" + digest),
    }


def load_cifar10(
    data_dir: str | Path | None = None, cache_dir: str | Path | None = None, download: bool = True
) -> dict[str, np.ndarray]:
    """Arrays ``train_x``/``test_x`` uint8 (N, 32, 32, 3), ``train_y``/``test_y`` int64, and a ``source`` digest.

    Looks for ``cifar10_jpeg.npz`` in ``data_dir`` (default :func:`default_data_dir`); without it falls back to
    torchvision's CIFAR-10 under ``cache_dir`` (downloaded when ``download`` and online).
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    npz_path = data_dir / NPZ_NAME
    if npz_path.exists():
        return _load_npz(npz_path, cache_dir)
    tv_root = cache_dir / "torchvision"
    try:
        return _load_torchvision(tv_root, download)
    except Exception as err:  # torchvision raises RuntimeError / URLError / OSError depending on what failed
        raise DataNotFoundError(
            f"CIFAR-10 not found. Looked for the offline archive at {npz_path} and for torchvision's CIFAR-10 under "
            f"{tv_root} ({type(err).__name__}: {err}). Fix it either way: put {NPZ_NAME} in that folder or point "
            "LKD_DATA_DIR (or data_dir=) at the folder holding it; or let torchvision download CIFAR-10 by running "
            "once with network access (download=True)."
        ) from err


class CIFAR10DataModule(IndexedDataModule):
    """CIFAR-10 as indexed batches ``{"index", "input", "target"}``.

    Training: random crop (pad 4) + horizontal flip, normalized with the CIFAR-10 channel statistics. A seeded
    split holds out ``val_size`` training images for validation; the test split is the archive's test set.
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str | None = None,
        cache_dir: str | None = None,
        val_size: int = 5000,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.data_dir, self.cache_dir, self.download = data_dir, cache_dir, download
        self.val_size, self.seed = val_size, seed
        self._arrays: dict[str, np.ndarray] | None = None

    def prepare_data(self) -> None:
        load_cifar10(self.data_dir, self.cache_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self._arrays is not None:
            return
        a = load_cifar10(self.data_dir, self.cache_dir, self.download)
        self._arrays = a
        self._train_x = torch.from_numpy(a["train_x"]).permute(0, 3, 1, 2).contiguous()
        self._train_y = torch.from_numpy(a["train_y"])
        self._test_x = torch.from_numpy(a["test_x"]).permute(0, 3, 1, 2).contiguous()
        self._test_y = torch.from_numpy(a["test_y"])
        n = len(self._train_y)
        if not 0 <= self.val_size < n:
            raise ValueError(f"val_size must be in [0, {n}), got {self.val_size}")
        order = np.random.default_rng(self.seed).permutation(n)
        self.val_indices = order[: self.val_size]  # shuffled: the archive is ordered by class
        self.train_indices = np.sort(order[self.val_size :])

    def fingerprint(self) -> str:
        self.setup()
        return f"cifar10:{self._arrays['source']}"

    def targets(self, indices: np.ndarray) -> np.ndarray:
        self.setup()
        return self._train_y.numpy()[np.asarray(indices)]

    @property
    def num_indices(self) -> int:
        """Training-split rows: every sample index is below this."""
        self.setup()
        return len(self._train_y)

    def make_dataset(self, indices: np.ndarray, view: View, normalize: bool = True, seed: int = 0) -> IndexedImages:
        """A dataset over training-split rows ``indices`` (views: see :class:`IndexedImages`)."""
        self.setup()
        return IndexedImages(
            self._train_x,
            self._train_y,
            indices,
            view=view,
            normalize=normalize,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            seed=seed,
        )

    def test_dataset(self) -> IndexedImages:
        self.setup()
        order = np.random.default_rng(0).permutation(len(self._test_y))  # so that any prefix covers all classes
        return IndexedImages(self._test_x, self._test_y, order, mean=CIFAR10_MEAN, std=CIFAR10_STD)

    def train_dataloader(self):
        return self.loader(self.make_dataset(self.train_indices, "train"), train=True)

    def val_dataloader(self):
        return self.loader(self.make_dataset(self.val_indices, "eval"), train=False)

    def test_dataloader(self):
        return self.loader(self.test_dataset(), train=False)

    def predict_dataloader(self):
        return self.test_dataloader()
