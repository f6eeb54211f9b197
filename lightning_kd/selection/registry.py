"""Strategies by name, timm-style: ``@register_strategy`` on a class, ``create_strategy("kcenter", ...)``."""

from __future__ import annotations

from typing import Any

from lightning_kd.selection.base import SelectionStrategy

_STRATEGIES: dict[str, type[SelectionStrategy]] = {}


def register_strategy(cls: type[SelectionStrategy]) -> type[SelectionStrategy]:
    """Class decorator: make ``cls`` available to :func:`create_strategy` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls!r} needs a non-empty class attribute 'name' to be registered")
    if _STRATEGIES.get(name, cls) is not cls:
        raise ValueError(f"selection strategy {name!r} is already registered by {_STRATEGIES[name]!r}")
    _STRATEGIES[name] = cls
    return cls


def list_strategies() -> list[str]:
    """The registered names, sorted."""
    return sorted(_STRATEGIES)


def create_strategy(spec: Any, **kwargs: Any) -> SelectionStrategy:
    """A strategy from a registered name (built with ``kwargs``), or ``spec`` itself if it is already one.

    An object counts as a strategy if it has a ``select`` method and a ``needs_student`` attribute.
    """
    if isinstance(spec, str):
        if spec not in _STRATEGIES:
            raise ValueError(f"unknown selection strategy {spec!r}; known: {', '.join(list_strategies())}")
        return _STRATEGIES[spec](**kwargs)
    if not isinstance(spec, type) and callable(getattr(spec, "select", None)) and hasattr(spec, "needs_student"):
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} are only accepted with a strategy name, not an object")
        return spec
    raise TypeError(
        f"a selection strategy must be a registered name or an object with select() and needs_student, got {spec!r}"
    )
