"""Fingerprints of user datasets: the identity recorded in a teacher-output cache, so that changed data is refused.

A folder dataset (torchvision ``ImageFolder`` / ``DatasetFolder``: a ``samples`` list of ``(path, target)``) is
fingerprinted by its file list: each file's path relative to ``root``, size, modification time (ns) and target,
and the class names. That covers files added, removed, renamed, rewritten or relabelled; it does not read the
pixels, so a copy that does not preserve mtimes (``cp`` without ``-p``) counts as changed, and an edit that keeps
size and mtime does not. The listing is also saved under ``$LKD_CACHE_DIR/dataset_listings/`` so that a later
mismatch can name the files that changed. Arrays in RAM (``data`` of torchvision's CIFAR/MNIST) are hashed; a
Hugging Face dataset has its own fingerprint; any other dataset must be given one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from lightning_kd.data.cifar import default_cache_dir

Listing = dict[str, list[int]]  # relative path -> [size, mtime_ns, target]


def _listings_dir() -> Path:
    return default_cache_dir() / "dataset_listings"


def folder_listing(dataset: Dataset) -> Listing:
    """``{relative path: [size, mtime_ns, target]}`` over a folder dataset's ``samples`` (one ``stat`` per file)."""
    root = Path(getattr(dataset, "root", "") or "")
    listing: Listing = {}
    for path, target in dataset.samples:
        st = os.stat(path)
        rel = os.path.relpath(path, root) if root.parts else str(path)
        listing[rel] = [st.st_size, st.st_mtime_ns, int(target)]
    return listing


def folder_fingerprint(dataset: Dataset) -> str:
    """``folder(files=N):<sha256 prefix>`` over the file listing and class names; saves the listing by digest."""
    listing = folder_listing(dataset)
    body = json.dumps({"classes": list(getattr(dataset, "classes", [])), "files": listing}, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()[:20]
    path = _listings_dir() / f"{digest}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(body)
        os.replace(tmp, path)
    return f"folder(files={len(listing)}):{digest}"


def dataset_fingerprint(dataset: Dataset) -> str:
    """The identity of ``dataset``'s content (see the module docstring for what each kind covers)."""
    if isinstance(getattr(dataset, "samples", None), list) and hasattr(dataset, "root"):
        return folder_fingerprint(dataset)
    fp = getattr(dataset, "fingerprint", None)  # HFImageDataset: the Hugging Face dataset's fingerprint
    if isinstance(fp, str) and fp:
        return fp
    data = getattr(dataset, "data", None)
    if isinstance(data, np.ndarray) or hasattr(data, "numpy"):
        arr = np.ascontiguousarray(np.asarray(data))
        targets = np.asarray(getattr(dataset, "targets", getattr(dataset, "labels", [])), dtype=np.int64)
        digest = hashlib.sha256(arr.tobytes() + targets.tobytes()).hexdigest()[:20]
        return f"{type(dataset).__name__}(n={len(arr)}):{digest}"
    warnings.warn(
        f"cannot fingerprint the content of a {type(dataset).__name__}: the teacher cache identifies it by type and "
        "length only, so changed data would be served stale outputs. Pass DatasetDataModule(fingerprint=...) "
        "naming this data's version.",
        stacklevel=3,
    )
    return f"{type(dataset).__name__}(n={len(dataset)})"


def _names(paths: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(paths)[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def describe_change(previous: str, current: str) -> str:
    """What differs between two folder fingerprints, file by file when the earlier listing was saved."""
    old_path = _listings_dir() / f"{previous.rsplit(':', 1)[-1]}.json"
    new_path = _listings_dir() / f"{current.rsplit(':', 1)[-1]}.json"
    if not (previous.startswith("folder(") and old_path.exists() and new_path.exists()):
        return f"the data changed since the cache was made (it was {previous!r}, now {current!r})"
    old, new = json.loads(old_path.read_text()), json.loads(new_path.read_text())
    of, nf = old["files"], new["files"]
    parts = []
    if added := [p for p in nf if p not in of]:
        parts.append(f"{len(added)} file(s) added ({_names(added)})")
    if removed := [p for p in of if p not in nf]:
        parts.append(f"{len(removed)} removed ({_names(removed)})")
    if relabelled := [p for p in nf if p in of and nf[p][2] != of[p][2]]:
        parts.append(f"{len(relabelled)} relabelled ({_names(relabelled)})")
    if modified := [p for p in nf if p in of and nf[p][:2] != of[p][:2] and p not in relabelled]:
        parts.append(f"{len(modified)} modified: size or mtime ({_names(modified)})")
    if old["classes"] != new["classes"]:
        parts.append(f"classes {old['classes']} -> {new['classes']}")
    return "the data changed since the cache was made: " + "; ".join(parts or ["the file list differs"])
