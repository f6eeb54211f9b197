"""Loading teachers from files, and fingerprinting them so that a cache knows whose outputs it holds.

A teacher is any callable ``inputs -> logits``. :func:`load_teacher` turns a file or a model spec into an
eval-mode :class:`FrozenTeacher` carrying a ``fingerprint``; :func:`teacher_fingerprint` names any teacher.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_kd.teachers.base import Teacher
from lightning_kd.utils import sha256_file


class FrozenTeacher(nn.Module):
    """An inference-only wrapper: its mode never changes, so a Trainer switching modes cannot touch it.

    ``torch.export`` programs raise on ``.train()`` / ``.eval()``; TorchScript and plain modules are put in eval
    mode once here. The parameters are frozen (``requires_grad=False``).
    """

    def __init__(self, module: Callable[[torch.Tensor], torch.Tensor], fingerprint: str, source: str = "") -> None:
        super().__init__()
        if isinstance(module, nn.Module):
            try:
                module.eval()
            except NotImplementedError:  # torch.export programs are frozen in eval mode already
                pass
            for p in module.parameters():
                p.requires_grad_(False)
        self.module = module
        self.fingerprint = fingerprint
        self.source = source
        self.training = False

    def train(self, mode: bool = True) -> FrozenTeacher:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, shapes, dtypes, values), in state_dict order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "params:" + h.hexdigest()


def teacher_fingerprint(teacher: Teacher) -> str:
    """The teacher's ``fingerprint`` attribute; else a hash of its parameters and buffers (``nn.Module``).

    A plain function has neither: it is named by its qualified name, with a warning that the cache then cannot
    tell two versions of it apart (set ``teacher.fingerprint = "..."`` to fix that).
    """
    fp = getattr(teacher, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    if isinstance(teacher, nn.Module):
        return state_fingerprint(teacher)
    name = f"{getattr(teacher, '__module__', '?')}.{getattr(teacher, '__qualname__', type(teacher).__qualname__)}"
    warnings.warn(
        f"teacher {name} has no `fingerprint` attribute: the cache identifies it by name only. Give it a "
        "fingerprint string (e.g. the remote model's version) so that outputs of another version are refused.",
        stacklevel=2,
    )
    return "callable:" + name


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _model_from_checkpoint(ckpt: Mapping[str, Any], source: str) -> nn.Module:
    """Rebuild the trained network of a checkpoint written by this package's LightningModules."""
    from lightning_kd.models import create_model

    hp = ckpt.get("hyper_parameters", {})
    for attr in ("student", "model"):
        name = hp.get(attr)
        if isinstance(name, str):
            break
    else:
        raise ValueError(f"{source}: hyper_parameters name no `student` or `model`; not a lightning_kd checkpoint")
    prefix = attr + "."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model = create_model(name, num_classes=hp.get("num_classes", 10), **(hp.get("model_kwargs") or {}))
    model.load_state_dict(state, strict=True)
    return model


def load_teacher(spec: str | Path | Mapping[str, Any] | nn.Module) -> FrozenTeacher:
    """An eval-mode teacher from a file or a model spec.

    ``spec`` may be a path to a ``torch.export`` program (``.pt2``), a TorchScript file, a Lightning checkpoint
    (``.ckpt``) of this package's modules, or a mapping ``{"model": name, "num_classes": C, "weights": path}``
    (a zoo/timm name plus a state dict). An ``nn.Module`` is wrapped as is. Files are read with
    ``torch.load(weights_only=True)`` only.
    """
    if isinstance(spec, FrozenTeacher):
        return spec
    if isinstance(spec, nn.Module):
        return FrozenTeacher(spec, state_fingerprint(spec), source=type(spec).__name__)
    if isinstance(spec, Mapping):
        from lightning_kd.models import create_model

        weights = Path(spec["weights"])
        model = create_model(spec["model"], num_classes=spec.get("num_classes", 10), **spec.get("model_kwargs", {}))
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        return FrozenTeacher(model, "sha256:" + sha256_file(weights), source=str(weights))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"teacher file {path} does not exist")
    fingerprint = "sha256:" + sha256_file(path)
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()
    elif _is_torchscript(path):
        module = torch.jit.load(str(path), map_location="cpu")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{path} is not a torch.export (.pt2), TorchScript or Lightning checkpoint file "
                f"readable with weights_only=True: {err}"
            ) from err
        if not (isinstance(ckpt, Mapping) and "state_dict" in ckpt):
            raise ValueError(
                f"{path} holds a bare state dict; load it with a model name: "
                "load_teacher({'model': NAME, 'num_classes': C, 'weights': PATH})"
            )
        module = _model_from_checkpoint(ckpt, str(path))
    return FrozenTeacher(module, fingerprint, source=str(path))
