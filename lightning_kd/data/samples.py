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
from torch.utils.data import Dataset, default_collate


class SampleLoadError(RuntimeError):
    """A sample could not be read or decoded; the message names the file when the dataset knows it."""


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit RNG seed of sample ``index`` under ``seed``: NumPy's ``SeedSequence([seed, index])``'s first
    64-bit word."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


_U32 = 0xFFFFFFFF
# SeedSequence's hash constants (numpy/random/bit_generator.pyx), pool size 4, 32-bit words
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)


def _sample_seeds_vectorized(seed: int, indices: np.ndarray) -> np.ndarray:
    """``sample_seed(seed, i)`` for every ``i`` at once: SeedSequence's entropy mixing and ``generate_state``,
    element-wise over uint32 arrays (valid when ``seed`` and every index are in [0, 2**32): entropy of 2 words)."""
    mult, shift = [_INIT_A], np.uint32(16)

    def hashmix(v: np.ndarray) -> np.ndarray:
        v = v ^ np.uint32(mult[0])
        mult[0] = (mult[0] * _MULT_A) & _U32
        v = v * np.uint32(mult[0])
        return v ^ (v >> shift)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = _MIX_L * x - _MIX_R * y
        return r ^ (r >> shift)

    zero = np.zeros(len(indices), np.uint32)
    pool = [hashmix(e) for e in (np.full(len(indices), seed, np.uint32), indices.astype(np.uint32), zero, zero)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    words, h = [], _INIT_B
    for word in pool[:2]:  # generate_state(1, uint64): two 32-bit words, low word first
        v = word ^ np.uint32(h)
        h = (h * _MULT_B) & _U32
        v = v * np.uint32(h)
        words.append((v ^ (v >> shift)).astype(np.uint64))
    return words[0] | (words[1] << np.uint64(32))


def sample_seeds(seed: int, indices: np.ndarray | Sequence[int]) -> list[int]:
    """:func:`sample_seed` of each index (one vectorized pass for a batch: ~1 us a sample instead of ~10-35)."""
    idx = np.asarray(indices, dtype=np.int64)
    if not (0 <= seed <= _U32 and len(idx) > 1 and idx.min() >= 0 and idx.max() <= _U32 and _VECTORIZED_OK):
        return [sample_seed(seed, int(i)) for i in idx]
    return _sample_seeds_vectorized(int(seed), idx).tolist()


# the vectorized pass is used only where it reproduces this NumPy's SeedSequence (checked once, at import)
_CHECKED = [0, 1, 2, 12345, 2**31, _U32]
_VECTORIZED_OK = all(
    _sample_seeds_vectorized(s, np.array(_CHECKED)).tolist() == [sample_seed(s, i) for i in _CHECKED]
    for s in (0, 7, _U32)
)


def _seed_all(state: int) -> None:
    """Reset torch's (CPU), Python's and NumPy's global RNGs completely (cached normal samples included)."""
    # CPU only: torch.manual_seed would also seed (and record a stack for) CUDA
    torch.default_generator.manual_seed(state)
    random.seed(state)
    np.random.seed(state & 0xFFFFFFFF)


def seed_rng(seed: int, index: int) -> None:
    """Seed torch's (CPU), Python's and NumPy's global RNGs from ``(seed, index)`` alone (nothing is restored):
    whatever runs next draws streams that depend on ``(seed, index)`` only, not on anything drawn before."""
    _seed_all(sample_seed(seed, index))


@contextmanager
def saved_rng() -> Iterator[None]:
    """Restore torch's (CPU), Python's and NumPy's global RNG states on exit.

    Saving and restoring costs ~0.1 ms (NumPy's state alone ~70 us), several times seeding: a batch of seeded
    samples saves once around the batch, not once per sample.
    """
    gen = torch.default_generator
    saved = gen.get_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        gen.set_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


@contextmanager
def sample_rng(seed: int, index: int) -> Iterator[None]:
    """Seed torch's, Python's and NumPy's global RNGs from ``(seed, index)``; restore their states afterwards.

    torchvision's v2 transforms draw from torch's RNG, timm's from Python's ``random`` too, some pipelines from
    NumPy's; the caller's RNG streams (e.g. the student's augmentation in the same worker) are left undisturbed.
    """
    with saved_rng():
        seed_rng(seed, index)
        yield


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
        index = self.indices[np.asarray(positions, dtype=np.int64)]
        if self.seed is None:
            loaded = [self._load(i) for i in index.tolist()]
        else:
            # The batch's seeds in one vectorized pass; the RNG states are saved and restored once per batch (~0.1
            # ms), and each sample reseeds all three RNGs before its transform (a few us).
            seeds = sample_seeds(self.seed, index)
            loaded = []
            with saved_rng():
                for i, state in zip(index.tolist(), seeds):
                    _seed_all(state)
                    loaded.append(self._load(i))
        inputs = [x for x, _ in loaded]
        shapes = {tuple(x.shape) for x in inputs}
        if len(shapes) > 1:
            raise ValueError(f"the transform gives images of different shapes {sorted(shapes)} in one batch; "
                             "resize or crop to one size (e.g. transforms.v2.Resize + CenterCrop)")
        # In a DataLoader worker, default_collate stacks straight into shared memory, and index and target are rows
        # of one tensor: every separate storage sent back to the main process costs a shared-memory segment.
        ids = torch.from_numpy(np.stack([index, np.fromiter((y for _, y in loaded), np.int64, len(loaded))]))
        return {"index": ids[0], "input": default_collate(inputs), "target": ids[1]}
