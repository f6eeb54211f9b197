"""A teacher that gives the outputs of named layers with its logits, from the same forward (one call per batch).

Only a local ``nn.Module`` whose layers run as modules can: a remote endpoint or a plain callable returns logits
only, TorchScript modules take no hooks, and a ``torch.export`` program (``.pt2``) inlines its layers into one
graph (their parameters keep their names, but no hook on them fires). These are refused before any call, with
an error naming the teacher and the layer. Load the weights into the model class instead, e.g. the shared
teacher's state dict as ``{"model": "resnet20_rgb", "weights": ...}`` (:mod:`lightning_kd.models.rgb_resnet`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_kd.models.hooks import capture, layer_shapes
from lightning_kd.teachers.local import FrozenTeacher, teacher_fingerprint


def _name(teacher: object) -> str:
    source = getattr(teacher, "source", "")
    return f"{type(teacher).__name__}({source!r})" if source else repr(teacher)


def _module(teacher: object, layers: Mapping[str, str]) -> nn.Module:
    """The ``nn.Module`` whose layers are hooked; refuses, naming the teacher and layer, any that cannot be."""
    name, path = next(iter(layers.items()))
    module = teacher.module if isinstance(teacher, FrozenTeacher) else teacher
    what = f"teacher {_name(teacher)} cannot give feature {name!r} (layer {path!r})"
    if not isinstance(module, nn.Module):
        raise ValueError(f"{what}: it is not a local nn.Module (a {type(module).__name__}), so it returns logits "
                         "only. Features need the model itself: a zoo/timm name with a state dict, or the module.")
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError(f"{what}: a TorchScript module takes no forward hooks. Load its weights into the model "
                         "class instead ({'model': NAME, 'weights': STATE_DICT}).")
    if isinstance(module, torch.fx.GraphModule):
        called = {str(node.target) for node in module.graph.nodes if node.op == "call_module"}
        for name, path in layers.items():
            if path not in called:
                raise ValueError(
                    f"teacher {_name(teacher)} cannot give feature {name!r} (layer {path!r}): it is an exported "
                    "program, whose layers are inlined into one graph, so a hook on that layer never runs. Load "
                    "the weights into the model class instead ({'model': NAME, 'weights': STATE_DICT}; the shared "
                    "teacher: 'resnet20_rgb' with cifar10_resnet20_teacher.state_dict.pt)."
                )
    for name, path in layers.items():
        try:
            module.get_submodule(path)
        except AttributeError:
            raise ValueError(f"teacher {_name(teacher)} cannot give feature {name!r}: it has no layer "
                             f"{path!r}") from None
    return module


class FeatureTeacher(nn.Module):
    """``teacher(x) -> (logits, {name: output of layers[name]})`` in one forward; the teacher's fingerprint.

    The hooks are added for each call and removed after it; the fill stores the features beside the logits.
    """

    def __init__(self, teacher: nn.Module, layers: Mapping[str, str]) -> None:
        super().__init__()
        if not layers:
            raise ValueError("FeatureTeacher needs at least one {name: layer} pair")
        self.net = _module(teacher, layers)
        self.teacher = teacher
        self.layers = dict(layers)
        self.fingerprint = teacher_fingerprint(teacher)
        self.source = _name(teacher)

    def train(self, mode: bool = True) -> FeatureTeacher:
        return self  # inference only, like FrozenTeacher

    def feature_shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each feature for inputs of ``input_shape`` (a meta-device forward: no call)."""
        try:
            return layer_shapes(self.net, self.layers, input_shape)
        except (ValueError, TypeError) as err:
            raise ValueError(f"teacher {self.source} cannot give the features {self.layers}: {err}") from None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with capture(self.net, self.layers) as found:
            logits = self.teacher(x)
        return logits, found
