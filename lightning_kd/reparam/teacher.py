"""The dynamic teacher module of GPD: the wide network and, by switching its layers, the student it shares."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_kd.reparam.layer import WideLayer

__all__ = ["DynamicTeacher"]


class DynamicTeacher(nn.Module):
    """The wide DT; ``forward`` runs it, ``forward_student`` runs the shared student view.

    ``self.model`` is the student's module tree with every widenable layer replaced by its wide counterpart at
    the same path (a ViT itself becomes a ``WideVisionTransformer`` for its embeddings), so the student's own
    forward code runs unchanged in both modes. A pristine copy of the student on the ``meta`` device
    (``student_template``: no storage, not a submodule, so not in ``parameters()`` or ``state_dict()``) defines
    the extracted student's class, structure and state-dict keys.
    """

    def __init__(self, model: nn.Module, student_template: nn.Module, ratio: float) -> None:
        super().__init__()
        self.model = model
        self.ratio = float(ratio)
        self.student_class: type[nn.Module] = type(student_template)
        object.__setattr__(self, "student_template", student_template)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def student_mode(self) -> Iterator[None]:
        """Switch every wide layer to its student view; restored on exit, even on errors."""
        layers = [layer for _, layer in self.wide_layers()]
        previous = [layer.student_mode for layer in layers]
        try:
            for layer in layers:
                layer.student_mode = True
            yield
        finally:
            for layer, mode in zip(layers, previous):
                layer.student_mode = mode

    def forward_student(self, *args: Any, **kwargs: Any) -> Any:
        """The student's forward, computed from the DT's parameters (grads flow into them)."""
        with self.student_mode():
            return self.model(*args, **kwargs)

    def wide_layers(self) -> Iterator[tuple[str, WideLayer]]:
        """``(path, layer)`` for every wide layer of ``self.model`` (paths as in the student)."""
        for path, module in self.model.named_modules():
            if isinstance(module, WideLayer):
                yield path, module

    @torch.no_grad()
    def student_state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """The student's state dict computed from the DT: scaled slices and student BN stats.

        Keys (and their order) are exactly the original student's; tensors are
        detached copies on the DT's device and dtype.
        """
        entries: dict[str, torch.Tensor] = {}
        for path, module in self.model.named_modules(remove_duplicate=False):
            if isinstance(module, WideLayer):
                prefix = f"{path}." if path else ""
                entries.update({prefix + key: value for key, value in module.student_state_dict().items()})
        keys = list(self.student_template.state_dict().keys())
        if set(keys) != set(entries):
            raise RuntimeError(
                f"student state dict mismatch: missing {sorted(set(keys) - set(entries))}, "
                f"unexpected {sorted(set(entries) - set(keys))}"
            )
        return OrderedDict((key, entries[key]) for key in keys)
