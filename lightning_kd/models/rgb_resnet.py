"""The shared teacher's state dict as the zoo's ResNet-20 on RGB in [0, 1] (normalization inside).

``load_teacher({"model": "resnet20_rgb", "num_classes": 10, "weights": "cifar10_resnet20_teacher.state_dict.pt"})``
loads ``../shared/data/cifar10_resnet20_teacher.state_dict.pt`` strictly, as a module whose layers can be named
(its ``.pt2`` export inlines them). The network is the zoo's ``resnet20`` (same blocks and projections); the file's
own key layout (``net.conv``, ``net.layers.<i>.c1`` ...) is renamed to the zoo's on load, so the teacher's layers
carry the student's names: ``net.layer1`` .. ``net.layer3`` (stage outputs), ``net.avgpool``, ``net.fc``.
"""

import re
from typing import Any

import torch
from torch import nn

from lightning_kd.models.cifar_resnet import CifarResNet, resnet20
from lightning_kd.models.registry import register_model

CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
_PARTS = {"c1": "conv1", "b1": "bn1", "c2": "conv2", "b2": "bn2", "short": "downsample"}


class RGBResNet(nn.Module):
    """``net((x - mean) / std)`` for a zoo :class:`CifarResNet` ``net``; ``mean``/``std`` buffers (1, 3, 1, 1).

    Also loads state dicts in the shared teacher file's layout (see the module docstring).
    """

    def __init__(self, net: CifarResNet, mean: tuple[float, ...] = CIFAR10_MEAN,
                 std: tuple[float, ...] = CIFAR10_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.net = net
        self._register_load_state_dict_pre_hook(self._from_file_layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def _from_file_layout(self, state: dict, prefix: str, *args: Any) -> None:
        """Rename the file's keys in place: ``net.conv``/``net.bn`` -> ``net.conv1``/``net.bn1``; block ``i`` of
        ``net.layers`` -> ``net.layer<s>.<j>`` (n blocks a stage) with ``c1 b1 c2 b2 short`` -> the zoo's names."""
        n = len(self.net.layer1)
        for key in [k for k in state if k.startswith(prefix + "net.")]:
            rest = key[len(prefix) + 4 :]
            new = re.sub(r"^(conv|bn)\.", r"\g<1>1.", rest)
            block = re.match(r"^layers\.(\d+)\.(\w+)(\..*)$", rest)
            if block:
                i, part, tail = int(block[1]), block[2], block[3]
                new = f"layer{i // n + 1}.{i % n}.{_PARTS.get(part, part)}{tail}"
            if new != rest:
                state[f"{prefix}net.{new}"] = state.pop(key)


@register_model
def resnet20_rgb(num_classes: int = 10, **kwargs: Any) -> RGBResNet:
    """The zoo's ResNet-20 (16/16/32/64) on RGB in [0, 1], loading the shared teacher's state-dict layout."""
    return RGBResNet(resnet20(num_classes=num_classes), **kwargs)
