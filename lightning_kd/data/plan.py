"""The budgeted run's bookkeeping around a fill: the teacher it calls, the plan it records, the order it buys in."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_kd.cache import CacheMismatchError, CacheSpec, TeacherBudget, TeacherBudgetExceeded, TeacherCache
from lightning_kd.cache.budget import LedgerSummary
from lightning_kd.cache.spec import read_manifest
from lightning_kd.data.cifar import default_cache_dir, default_data_dir
from lightning_kd.teachers import Teacher, load_teacher


def _in_data_dir(path: str | Path) -> Path:
    """``path``, or the data folder's file of that name when ``path`` is relative and does not exist here."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (default_data_dir() / path).exists():
        return default_data_dir() / path
    return path


def resolve_teacher(teacher: str | dict | Teacher) -> Teacher:
    """Load a teacher spec; a relative file path (a file, or a spec's ``weights``) that does not exist is also
    looked up in the data folder."""
    if isinstance(teacher, str | Path):
        return load_teacher(_in_data_dir(teacher))
    if isinstance(teacher, dict):
        return load_teacher({**teacher, "weights": _in_data_dir(teacher["weights"])} if "weights" in teacher
                            else teacher)
    if isinstance(teacher, nn.Module):
        return load_teacher(teacher)
    if callable(teacher):
        return teacher
    raise TypeError(f"teacher must be a path, a model spec dict, an nn.Module or a callable, got {type(teacher)}")


def spend_text(teacher: object, s: LedgerSummary) -> str:
    """'; spent X (N requests)' when the teacher states its prices (``cost_per_sample``, ``cost_per_request``)."""
    per_sample, per_request = getattr(teacher, "cost_per_sample", 0) or 0, getattr(teacher, "cost_per_request", 0) or 0
    if not (per_sample or per_request):
        return ""
    return f"; spent {s.used * per_sample + s.requests * per_request:.4g} ({s.requests} requests)"


def purchase_order(missing: np.ndarray, seed: int, rank: int, world: int) -> np.ndarray:
    """Missing samples in the order they are bought: seeded (a budget that runs short still buys a uniform
    share), this rank's shard first so that DDP ranks rarely meet; every rank may finish the others' work."""
    order = np.random.default_rng(seed + 2).permutation(missing)
    mine = np.zeros(len(order), dtype=bool)
    mine[rank::world] = True
    return np.concatenate([order[mine], order[~mine]])


def check_plan(cache: TeacherCache, budget: TeacherBudget, selected: np.ndarray, plan: dict, *, check_unused: bool,
               n_missing: int) -> None:
    """Record this run's ``plan`` (its settings, and the selection's size and digest) when it differs from the last
    one; with ``check_unused``, say when it leaves paid outputs unused, and refuse when it also cannot be bought,
    naming the setting that changed and the option that trains on what was paid for."""
    plan = {**plan, "n": int(len(selected)),
            "sha": hashlib.sha256(np.sort(selected).astype("<i8").tobytes()).hexdigest()[:16]}
    plans = cache.ledger.plans
    last = {k: plans[-1].get(k) for k in plan} if plans else None
    if last != plan and cache.lock.writable:
        budget.record("plan", **plan)
    unused = np.setdiff1d(cache.indices, selected)
    if not len(unused) or not check_unused:
        return
    changed = [f"{k} {last[k]!r} -> {plan[k]!r}" for k in ("selection", "seed", "budget")
               if last and last[k] != plan[k]]
    with budget.lock:
        budget.ledger.refresh()
        free = len(budget.free(selected[~cache.contains(selected)]))
    msg = (f"this run's selection leaves {len(unused)} paid teacher outputs in {cache.directory} unused"
           + (f" (changed since they were bought: {', '.join(changed)})" if changed else ""))
    if not n_missing:  # e.g. a smaller budget: its nested selection is all paid for already
        warnings.warn(msg + f"; it needs no new teacher call. selection='cached' trains on all {len(cache)} samples "
                      "already paid for instead.", stacklevel=4)
        return
    msg += f" and needs {n_missing} samples without outputs"
    if free > budget.remaining:
        raise TeacherBudgetExceeded(
            msg + f", but only {budget.remaining} of the budget {budget.total} remain. Set selection='cached' to "
            f"train on the {len(cache)} samples already paid for, or restore the earlier setting."
        )
    warnings.warn(msg + f"; buying them ({budget.remaining} of the budget remain). selection='cached' trains on "
                  "the samples already paid for instead.", stacklevel=4)


def open_cache(spec: CacheSpec, cache_dir: str | None, datamodule) -> TeacherCache:
    """The cache for ``spec`` in ``cache_dir`` (None: a directory per spec under the default cache folder); a cache
    made for other data is refused with what changed in the data, and kept."""
    if cache_dir is not None:
        try:
            return TeacherCache(cache_dir, spec)
        except CacheMismatchError as err:
            stored = read_manifest(Path(cache_dir) / "manifest.json")
            if stored.dataset == spec.dataset:
                raise
            raise CacheMismatchError(
                f"{datamodule.fingerprint_change(stored.dataset)}. Its outputs in {cache_dir} belong to "
                "the old data and are kept; start a new cache for the new data with another cache_dir (or "
                f"none: a directory per dataset fingerprint), or restore the old data. ({err})"
            ) from None
    key = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return TeacherCache(default_cache_dir() / "teacher_outputs" / key, spec)


def budget_in_checkpoint(trainer, owner: str) -> dict[str, int]:
    """When resuming from a checkpoint, the budget it recorded under ``owner`` (read before filling anything)."""
    ckpt_path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    if not ckpt_path or not Path(ckpt_path).exists():
        return {}
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # a checkpoint holding objects weights_only refuses: the ledger still holds
        warnings.warn(f"could not read the teacher budget from {ckpt_path} ({err}); using the cache's ledger alone")
        return {}
    return ckpt.get(owner, {}).get("budget", {})
