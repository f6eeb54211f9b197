"""Indexed batches over any map-style dataset of ``(image, target)`` items, decoded lazily, one sample at a time.

:class:`IndexedSamples` is what :class:`~lightning_kd.data.DatasetDataModule` serves: sample ``i`` is item ``i``
of the wrapped dataset (the stable index the teacher-output cache keys on), decoded and transformed when fetched
(in DataLoader workers when ``num_workers > 0``). With a ``seed`` each sample's transform runs under RNGs seeded
from ``(seed, index)``: any random pipeline (torchvision ``transforms.v2``, timm, NumPy-based) then gives the same
view of sample ``i`` in every process, on every rank and after every resume — the teacher's fixed view.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset


class SampleLoadError(RuntimeError):
    """A sample could not be read or decoded; the message names the file when the dataset knows it."""


@contextmanager
def sample_rng(seed: int, index: int) -> Iterator[None]:
    """Seed torch's, Python's and NumPy's global RNGs from ``(seed, index)``; restore their states afterwards.

    torchvision's v2 transforms draw from torch's RNG, timm's from Python's ``random`` too, some pipelines from
    NumPy's; the caller's RNG streams (e.g. the student's augmentation in the same worker) are left undisturbed.
    """
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])
    gen = torch.default_generator  # CPU only: torch.manual_seed would also seed (and record a stack for) CUDA
    saved = gen.get_state(), random.getstate(), np.random.get_state()
    gen.manual_seed(state)
    random.seed(state)
    np.random.seed(state & 0xFFFFFFFF)
    try:
        yield
    finally:
        gen.set_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


def sample_path(dataset: Dataset, index: int) -> str | None:
    """The file behind item ``index`` (torchvision ``ImageFolder`` / ``DatasetFolder`` ``samples``), if known."""
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, Sequence) and 0 <= index < len(samples):
        entry = samples[index]
        return str(entry[0] if isinstance(entry, tuple | list) else entry)
    return None


def _target(value: object, where: Callable[[], str]) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{where()}: the target is {type(value).__name__} {value!r}, not an integer class index")


def check_target(target: int, num_classes: int, where: str) -> None:
    """A class index must lie in ``[0, num_classes)``."""
    if not 0 <= target < num_classes:
        raise ValueError(
            f"{where}: target {target} is outside the {num_classes} classes [0, {num_classes - 1}]. Pass the "
            "right num_classes to DatasetDataModule, or remap the labels (e.g. ImageFolder's target_transform)."
        )


def _image_tensor(x: object, where: Callable[[], str]) -> torch.Tensor:
    """``x`` if it is a float (C, H, W) tensor; ``where()`` describes the sample in the error (built only then)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        kind = f"a {tuple(x.shape)} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
        raise TypeError(f"{where()}: the transform returned {kind}, not a (C, H, W) tensor. End the pipeline with "
                        "transforms.v2.ToImage() and transforms.v2.ToDtype(torch.float32, scale=True).")
    if not x.is_floating_point():
        raise TypeError(f"{where()}: the transform returned a {x.dtype} tensor; add "
                        "transforms.v2.ToDtype(torch.float32, scale=True) so that inputs are floats in [0, 1].")
    return x


class IndexedSamples(Dataset):
    """Items ``indices`` of ``source`` as batch dicts ``{"index", "input", "target"}``, each decoded when fetched.

    ``transform`` maps the item's image to a float (C, H, W) tensor. ``seed``: None draws fresh randomness on
    every fetch (the student's augmentation); an int runs the transform under :func:`sample_rng` (one fixed view
    per sample). Items must be ``(image, target)`` with an integer target in ``[0, num_classes)``.
    """

    def __init__(
        self,
        source: Dataset,
        indices: np.ndarray | Sequence[int],
        transform: Callable,
        *,
        num_classes: int,
        seed: int | None = None,
    ) -> None:
        self.source, self.transform, self.num_classes, self.seed = source, transform, num_classes, seed
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def _describe(self, index: int) -> str:
        path = sample_path(self.source, index)
        return f"sample {index} of {type(self.source).__name__}" + (f" ({path})" if path else "")

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        def where() -> str:
            return self._describe(index)

        try:
            item = self.source[index]
        except Exception as err:
            raise SampleLoadError(f"could not load {where()}: {type(err).__name__}: {err}") from err
        if not (isinstance(item, tuple | list) and len(item) == 2):
            got = f"a dict with keys {sorted(item)}" if isinstance(item, dict) else f"a {type(item).__name__}"
            if isinstance(item, tuple | list):
                got += f" of {len(item)} elements"
            raise TypeError(f"{where()} is {got}; DatasetDataModule needs (image, target) items. Wrap the dataset "
                            "(a Hugging Face dataset: lightning_kd.data.HFImageDataset) or map its items to pairs.")
        image, target = item
        target = _target(target, where)
        if not 0 <= target < self.num_classes:
            check_target(target, self.num_classes, where())
        return _image_tensor(self.transform(image), where), target

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        index = int(self.indices[position])
        if self.seed is None:
            x, y = self._load(index)
        else:
            with sample_rng(self.seed, index):
                x, y = self._load(index)
        return {"index": torch.tensor(index), "input": x, "target": torch.tensor(y)}

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        items = [self[p] for p in positions]
        shapes = {tuple(it["input"].shape) for it in items}
        if len(shapes) > 1:
            raise ValueError(f"the transform gives images of different shapes {sorted(shapes)} in one batch; "
                             "resize or crop to one size (e.g. transforms.v2.Resize + CenterCrop)")
        return {k: torch.stack([it[k] for it in items]) for k in ("index", "input", "target")}
