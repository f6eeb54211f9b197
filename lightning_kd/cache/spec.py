"""What the cache stores: its identity (:class:`CacheSpec`, the manifest) and how outputs are encoded.

Top-k storage keeps the k largest logits exactly (fp16) and one value r for all other classes, chosen so that
their total probability mass at T = 1 is preserved: r = logsumexp(rest) - log(C - k).

Teacher features (``CacheSpec.features``) are stored in the same row as the logits: a row is the logits in the
storage dtype, then each feature flattened in ``feature_dtype``, in the spec's order, as bytes, padded to a
whole column. The block format, its checksums, compaction, verify and repair move rows as bytes, unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lightning_kd.cache.errors import CacheCorruptedError, CacheMismatchError, recovery_hint

StorageDtype = Literal["float32", "float16", "topk"]
FeatureDtype = Literal["float16", "float32"]


@dataclass(frozen=True)
class FeatureSpec:
    """A teacher feature stored with the logits: its ``name``, the teacher ``layer`` (module path) it is the
    output of, and its per-sample ``shape``."""

    name: str
    layer: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name and isinstance(self.layer, str) and self.layer):
            raise ValueError(f"a feature needs a name and a layer (strings), got {self.name!r}, {self.layer!r}")
        if not (isinstance(self.shape, tuple) and self.shape
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.shape)):
            raise ValueError(f"feature {self.name!r} needs a shape of positive integers, got {self.shape!r}")

    @property
    def size(self) -> int:
        """Values per sample."""
        return int(np.prod(self.shape))


@dataclass(frozen=True, repr=False)
class CacheSpec:
    """What the cached outputs are; a cache whose manifest differs in any field is refused.

    ``features`` (with their ``feature_dtype``) are the teacher features stored with each sample's logits; a
    cache without features writes neither field, so its identity is the one it had before features existed.
    """

    teacher: str
    dataset: str
    view: str
    num_classes: int
    dtype: StorageDtype = "float32"
    topk: int | None = None
    features: tuple[FeatureSpec, ...] = ()
    feature_dtype: FeatureDtype | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "topk"):
            raise ValueError(f"dtype must be 'float32', 'float16' or 'topk', got {self.dtype!r}")
        if self.dtype == "topk" and not (self.topk and 0 < self.topk < self.num_classes):
            raise ValueError(f"topk storage needs 0 < topk < num_classes ({self.num_classes}), got {self.topk}")
        if self.dtype != "topk" and self.topk is not None:
            raise ValueError(f"topk={self.topk} is only meaningful with dtype='topk'")
        if (self.feature_dtype is not None) != bool(self.features):
            raise ValueError("feature_dtype is given with features, and only then")
        if self.features and self.feature_dtype not in ("float16", "float32"):
            raise ValueError(f"feature_dtype must be 'float16' or 'float32', got {self.feature_dtype!r}")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must differ, got {names}")

    def to_dict(self) -> dict:
        """The identity as stored (manifest, ledger, segment headers); the feature fields only when there are any."""
        out = asdict(self)
        if not self.features:
            del out["features"], out["feature_dtype"]
        return out

    def __repr__(self) -> str:
        return f"CacheSpec({', '.join(f'{k}={getattr(self, k)!r}' for k in self.to_dict())})"

    @property
    def logit_columns(self) -> int:
        """Columns of a row that hold the logits (k + 1 for top-k storage)."""
        return self.topk + 1 if self.dtype == "topk" else self.num_classes

    @property
    def storage(self) -> np.dtype:
        """The numpy dtype of a row's columns."""
        return np.dtype("float32" if self.dtype == "float32" else "float16")

    def feature_offsets(self) -> list[tuple[FeatureSpec, int]]:
        """Each feature with the byte offset of its values in a row."""
        out, pos = [], self.logit_columns * self.storage.itemsize
        for f in self.features:
            out.append((f, pos))
            pos += f.size * np.dtype(self.feature_dtype).itemsize
        return out

    @property
    def width(self) -> int:
        """Columns of a stored row: the logits, then the features' bytes rounded up to whole columns."""
        size = np.dtype(self.feature_dtype).itemsize if self.features else 0
        end = self.logit_columns * self.storage.itemsize + sum(f.size for f in self.features) * size
        return -(-end // self.storage.itemsize)

    @classmethod
    def from_dict(cls, body: object, source: Path | str) -> CacheSpec:
        """Parse a stored identity; anything but the expected fields and types is :class:`CacheCorruptedError`."""
        types = {"teacher": str, "dataset": str, "view": str, "num_classes": int, "dtype": str}
        optional = {f.name for f in fields(cls)} - set(types)
        if not isinstance(body, dict) or set(body) - {*types, *optional} or not set(types) <= set(body):
            what = f"fields {sorted(body)}" if isinstance(body, dict) else type(body).__name__
            raise CacheCorruptedError(f"{source}: not a cache identity ({what})")
        for key, typ in types.items():
            if not isinstance(body[key], typ) or isinstance(body[key], bool):
                raise CacheCorruptedError(f"{source}: field {key!r} should be {typ.__name__}, got {body[key]!r}")
        if body.get("topk") is not None and not isinstance(body["topk"], int):
            raise CacheCorruptedError(f"{source}: field 'topk' should be an integer, got {body['topk']!r}")
        body = dict(body)
        try:
            body["features"] = tuple(FeatureSpec(f["name"], f["layer"], tuple(f["shape"]))
                                     for f in body.get("features", ()))
        except (TypeError, KeyError, ValueError) as err:
            raise CacheCorruptedError(f"{source}: field 'features' is not a list of name/layer/shape ({err})") from None
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


def as_features(spec: CacheSpec, n: int, features: dict | None) -> dict[str, torch.Tensor]:
    """A teacher's features as float32 CPU tensors, checked against ``spec`` (names, shapes, finite values that
    ``feature_dtype`` can hold); ValueError naming the feature otherwise, before anything is stored."""
    wanted = [f.name for f in spec.features]
    given = sorted(features or {})
    if given != sorted(wanted):
        raise ValueError(f"the cache stores teacher features {wanted}, the teacher gave {given}")
    out = {}
    for f in spec.features:
        t = features[f.name]
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(t)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = getattr(t, "dtype", type(t).__name__)
            raise TypeError(f"teacher feature {f.name!r} is a {what}, not a float tensor")
        if tuple(t.shape) != (n, *f.shape):
            raise ValueError(f"teacher feature {f.name!r} has shape {tuple(t.shape)}, expected {(n, *f.shape)}")
        t = t.detach().to("cpu", torch.float32)
        stored = t.to(getattr(torch, spec.feature_dtype))
        if not torch.isfinite(stored).all():
            why = "NaN/inf" if not torch.isfinite(t).all() else f"values beyond {spec.feature_dtype}'s range"
            raise ValueError(f"teacher feature {f.name!r} has {why} (max |x| = {float(t.abs().max()):.4g})"
                             + ("; store it with feature_dtype='float32'" if torch.isfinite(t).all() else ""))
        out[f.name] = t
    return out


def encode_rows(spec: CacheSpec, logits: torch.Tensor, features: dict[str, torch.Tensor] | None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Checked float32 logits (n, C) and features -> the stored rows (n, width) and the top-k class ids (or None)."""
    if spec.dtype == "topk":
        values, topi = encode_topk(logits, spec.topk)
    else:
        values, topi = logits.numpy().astype(spec.dtype), None
    if not spec.features:
        return values, topi
    n = len(values)
    rows = np.zeros((n, spec.width * spec.storage.itemsize), np.uint8)
    head = np.ascontiguousarray(values).view(np.uint8)
    rows[:, : head.shape[1]] = head
    for f, offset in spec.feature_offsets():
        part = features[f.name].reshape(n, -1).numpy().astype(spec.feature_dtype).view(np.uint8)
        rows[:, offset : offset + part.shape[1]] = part
    return rows.view(spec.storage), topi


def decode_features(spec: CacheSpec, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Stored rows (n, width) -> ``{name: float32 (n, *shape)}``."""
    raw = np.ascontiguousarray(rows).view(np.uint8)
    size = np.dtype(spec.feature_dtype).itemsize if spec.features else 0
    out = {}
    for f, offset in spec.feature_offsets():
        part = np.ascontiguousarray(raw[:, offset : offset + f.size * size]).view(spec.feature_dtype)
        out[f.name] = torch.from_numpy(part.astype(np.float32)).view(len(rows), *f.shape)
    return out


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
