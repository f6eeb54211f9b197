"""Name -> factory registry for the CIFAR zoo, with timm as the fallback.

Zoo factories are plain functions ``fn(num_classes=..., **kwargs) -> nn.Module``
registered under their function name (timm style). Names not in the zoo are
handed to ``timm.create_model`` with ``pretrained=False``: this library never
downloads weights.
"""

from collections.abc import Callable
from typing import Any

import timm
from torch import nn

ModelFactory = Callable[..., nn.Module]

_ZOO: dict[str, ModelFactory] = {}


def register_model(fn: ModelFactory) -> ModelFactory:
    """Register ``fn`` under ``fn.__name__``; a duplicate name is an error."""
    name = fn.__name__
    if name in _ZOO:
        raise ValueError(f"model {name!r} is already registered")
    _ZOO[name] = fn
    return fn


def list_models() -> list[str]:
    """Sorted names of the zoo models (timm's own models are not listed)."""
    return sorted(_ZOO)


def is_zoo_model(name: str) -> bool:
    """True if ``name`` is a zoo model (zoo names take precedence over timm's)."""
    return name in _ZOO


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name``, else timm model ``name``, with random weights.

    Raises ``ValueError`` if ``pretrained=True`` is asked for (no network
    weights are loaded here) or if neither the zoo nor timm knows ``name``.
    """
    if kwargs.pop("pretrained", False):
        raise ValueError(
            f"create_model({name!r}, pretrained=True): no network weights are loaded "
            "here (models are always randomly initialised); load a checkpoint "
            "with model.load_state_dict instead"
        )
    if name in _ZOO:
        return _ZOO[name](num_classes=num_classes, **kwargs)
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}: not in the zoo ({', '.join(list_models())}) and also unknown to timm")
