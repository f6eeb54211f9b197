"""Outputs of named layers, read with forward hooks: the features that feature distillation compares.

A layer is named by its module path (``model.get_submodule(path)``, e.g. ``"layer2"`` of a zoo ResNet or
``"stages.1"`` of a timm model); it must run once per forward and return a tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from itertools import chain

import torch
from torch import nn


@contextmanager
def capture(module: nn.Module, layers: Mapping[str, str]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict that one forward of ``module`` inside the block fills with ``{name: output of layers[name]}``.

    ValueError naming the layer when a path is not a submodule, runs twice in the forward, or did not run;
    TypeError when its output is not a tensor. The hooks are removed on exit.
    """
    found: dict[str, torch.Tensor] = {}

    def hook(name: str, path: str):
        def store(_module: nn.Module, _inputs: object, output: object) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {path!r} returns a {type(output).__name__}, not a tensor: name a layer whose "
                                "output is one tensor")
            if name in found:
                raise ValueError(f"layer {path!r} runs more than once in one forward (a module used in several "
                                 "places): name a layer that runs once")
            found[name] = output

        return store

    handles = []
    try:
        for name, path in layers.items():
            try:
                sub = module.get_submodule(path)
            except AttributeError:
                raise ValueError(f"{type(module).__name__} has no layer {path!r}") from None
            handles.append(sub.register_forward_hook(hook(name, path)))
        yield found
    finally:
        for handle in handles:
            handle.remove()
    silent = [path for name, path in layers.items() if name not in found]
    if silent:
        raise ValueError(f"layer {silent[0]!r} of {type(module).__name__} did not run in its forward, so a hook on it "
                         "cannot see its output")


def layer_shapes(module: nn.Module, layers: Mapping[str, str], input_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Per-sample output shape of each named layer for inputs of ``input_shape``, from a forward on the meta device
    (no computation, no change to ``module``: its parameters and buffers are swapped for meta tensors)."""
    meta = {k: torch.empty_like(v, device="meta") for k, v in chain(module.named_parameters(), module.named_buffers())}
    with capture(module, layers) as found, torch.no_grad():
        torch.func.functional_call(module, meta, (torch.empty(2, *input_shape, device="meta"),))
    return {name: tuple(found[name].shape[1:]) for name in layers}
