"""Batched image transforms on uint8 tensors: random crop with padding, horizontal flip, normalization.

They work on whole batches (N, C, H, W) with tensor ops, so a DataLoader fetches and augments a batch with no
per-sample Python loop. The crop offsets and flips are either drawn from a ``torch.Generator`` (fresh views for
the student) or derived from ``(seed, index)`` by a counter-based hash (one fixed view per sample, the same on
every rank and after every resume: the view the teacher is run on).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer on int64 tensors (wrapping arithmetic): a fast, well-mixed integer hash."""
    x = x + torch.tensor(0x9E3779B97F4A7C15 - (1 << 64), dtype=torch.int64)
    x = (x ^ (x >> 30) & 0x3FFFFFFFF) * torch.tensor(0xBF58476D1CE4E5B9 - (1 << 64), dtype=torch.int64)
    x = (x ^ (x >> 27) & 0x1FFFFFFFFF) * torch.tensor(0x94D049BB133111EB - (1 << 64), dtype=torch.int64)
    return x ^ (x >> 31) & 0x1FFFFFFFF


def crop_flip_params(
    n: int,
    padding: int,
    *,
    generator: torch.Generator | None = None,
    index: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets (dy, dx) in [0, 2·padding] and flip flags for ``n`` images.

    With ``index`` the parameters are a pure function of ``(seed, index)``; otherwise they are drawn from
    ``generator`` (or the global RNG).
    """
    span = 2 * padding + 1
    if index is not None:
        h = _splitmix64(index.to(torch.int64) * 1_000_003 + seed)
        h = h & 0x7FFFFFFFFFFFFFFF
        return h % span, (h // span) % span, ((h // (span * span)) % 2).bool()
    dy = torch.randint(0, span, (n,), generator=generator)
    dx = torch.randint(0, span, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return dy, dx, flip


def crop_flip(
    images: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Zero-pad by ``padding``, crop back to (H, W) at offsets (dy, dx), and mirror the images where ``flip``.

    One ``gather`` over each padded image's flattened pixels (the same source pixel for every channel): 2-4x
    faster on CPU than advanced indexing with three index tensors, with identical output.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h)  # (N, H)
    cols = dx[:, None] + torch.arange(w)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    hp, wp = padded.shape[-2:]
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, hp * wp).gather(2, flat).view(n, c, h, w)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], *, inplace: bool = False
) -> torch.Tensor:
    """Per-channel (x - mean) / std on a float batch (N, C, H, W); ``inplace`` overwrites ``images`` (same values)."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return images.sub_(m).div_(s) if inplace else (images - m) / s
