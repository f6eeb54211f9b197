"""What the cache stores: its identity (:class:`CacheSpec`, the manifest) and how outputs are encoded.

Top-k storage keeps the k largest logits exactly (fp16) and one value r for all other classes, chosen so that
their total probability mass at T = 1 is preserved: r = logsumexp(rest) - log(C - k).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lightning_kd.cache.errors import CacheCorruptedError, CacheMismatchError, recovery_hint

StorageDtype = Literal["float32", "float16", "topk"]


@dataclass(frozen=True)
class CacheSpec:
    """What the cached outputs are; a cache whose manifest differs in any field is refused."""

    teacher: str
    dataset: str
    view: str
    num_classes: int
    dtype: StorageDtype = "float32"
    topk: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "topk"):
            raise ValueError(f"dtype must be 'float32', 'float16' or 'topk', got {self.dtype!r}")
        if self.dtype == "topk" and not (self.topk and 0 < self.topk < self.num_classes):
            raise ValueError(f"topk storage needs 0 < topk < num_classes ({self.num_classes}), got {self.topk}")
        if self.dtype != "topk" and self.topk is not None:
            raise ValueError(f"topk={self.topk} is only meaningful with dtype='topk'")

    @classmethod
    def from_dict(cls, body: object, source: Path | str) -> CacheSpec:
        """Parse a stored identity; anything but the expected fields and types is :class:`CacheCorruptedError`."""
        types = {"teacher": str, "dataset": str, "view": str, "num_classes": int, "dtype": str}
        if not isinstance(body, dict) or set(body) - {*types, "topk"} or not set(types) <= set(body):
            what = f"fields {sorted(body)}" if isinstance(body, dict) else type(body).__name__
            raise CacheCorruptedError(f"{source}: not a cache identity ({what})")
        for key, typ in types.items():
            if not isinstance(body[key], typ) or isinstance(body[key], bool):
                raise CacheCorruptedError(f"{source}: field {key!r} should be {typ.__name__}, got {body[key]!r}")
        if body.get("topk") is not None and not isinstance(body["topk"], int):
            raise CacheCorruptedError(f"{source}: field 'topk' should be an integer, got {body['topk']!r}")
        try:
            return cls(**body)
        except ValueError as err:
            raise CacheCorruptedError(f"{source}: {err}") from err


def encode_topk(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, C) logits -> fp16 (n, k + 1) [top-k logits, rest value r] and int32 (n, k) class ids."""
    top, ids = logits.topk(k, dim=1)
    rest = logits.scatter(1, ids, float("-inf"))
    r = torch.logsumexp(rest, dim=1, keepdim=True) - np.log(logits.shape[1] - k)
    return torch.cat([top, r], 1).to(torch.float16).numpy(), ids.to(torch.int32).numpy()


def decode_topk(values: np.ndarray, ids: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse of :func:`encode_topk`: float32 (n, C) logits with the rest classes at the value r."""
    v = torch.from_numpy(np.asarray(values, dtype=np.float32))
    out = v[:, -1:].expand(-1, num_classes).clone()
    return out.scatter_(1, torch.from_numpy(np.asarray(ids, dtype=np.int64)), v[:, :-1])


def as_logits(outputs: object) -> torch.Tensor:
    """A teacher's outputs as a float32 CPU tensor; a numpy array is converted, anything else is refused."""
    if isinstance(outputs, np.ndarray):
        outputs = torch.from_numpy(outputs)
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"the teacher returned a {type(outputs).__name__}; it must return a tensor (or numpy array) "
                        "of logits")
    if not outputs.is_floating_point():
        raise TypeError(f"the teacher returned {outputs.dtype} outputs; logits must be floating point (class ids "
                        "or integer scores cannot be distilled from)")
    return outputs.detach().to("cpu", torch.float32)


def read_manifest(path: Path) -> CacheSpec:
    """The identity in ``manifest.json``; unreadable or ill-typed content is :class:`CacheCorruptedError`."""
    try:
        body = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheCorruptedError(f"{path} is not valid JSON ({err})." + recovery_hint(path.parent)) from None
    if not isinstance(body, dict):
        raise CacheCorruptedError(f"{path} should hold a JSON object, got {type(body).__name__}."
                                  + recovery_hint(path.parent))
    version = body.pop("format_version", None)
    if version == 1:
        raise CacheMismatchError(f"{path}: a format-1 cache (written by lightning_kd before the shared ledger); this "
                                 "version reads format 2. Its outputs are intact: keep the directory, fill a new one.")
    if version != 2:
        raise CacheCorruptedError(f"{path}: unknown cache format version {version!r}." + recovery_hint(path.parent))
    try:
        return CacheSpec.from_dict(body, path)
    except CacheCorruptedError as err:
        raise CacheCorruptedError(f"{err}." + recovery_hint(path.parent)) from None
