"""Standard image pipelines for the student's and the teacher's views, and teacher views from timm's data config."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms import v2


def image_transform(
    size: int,
    *,
    train: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: tuple[float, float] = (0.35, 1.0),
) -> v2.Compose:
    """A torchvision v2 pipeline to float (C, ``size``, ``size``) tensors in [0, 1], normalized when ``mean``/``std``.

    ``train``: RandomResizedCrop(``scale``) + horizontal flip (the usual student augmentation); else Resize +
    CenterCrop (the evaluation view).
    """
    if train:
        ops = [v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    ops = [v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True)]
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        ops.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(ops)


def timm_data_config(model: str | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """timm's data config (input size, interpolation, mean/std, crop) for a timm model name or teacher spec.

    ``model`` is a name or a spec ``{"model": name, ...}`` as :func:`~lightning_kd.teachers.load_teacher` takes;
    ``overrides`` (e.g. ``input_size=(3, 160, 160)``) win over the model's defaults.
    """
    import timm
    from timm.data import resolve_data_config

    name = model["model"] if isinstance(model, Mapping) else model
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        if not timm.is_model(name):
            raise ValueError(f"{name!r} is not a timm model: give the teacher's transform explicitly")
        return resolve_data_config(overrides, model=timm.create_model(name, pretrained=False))
    return resolve_data_config(overrides, pretrained_cfg=cfg.to_dict())


def timm_transform(model: str | Mapping[str, Any], *, is_training: bool = False, **overrides: Any) -> Callable:
    """The pipeline timm builds from the model's data config (``is_training``: timm's training augmentation)."""
    from timm.data import create_transform

    return create_transform(**timm_data_config(model, **overrides), is_training=is_training)
