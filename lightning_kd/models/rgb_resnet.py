"""The CIFAR ResNet of the shared teacher's files, layer for layer: RGB in [0, 1] in, normalization inside.

``load_teacher({"model": "resnet20_rgb", "num_classes": 10, "weights": "cifar10_resnet20_teacher.state_dict.pt"})``
loads ``../shared/data/cifar10_resnet20_teacher.state_dict.pt`` strictly, as a module whose layers can be named
(its ``.pt2`` export inlines them). Layers: ``net.conv``/``net.bn`` (stem), ``net.layers.0`` .. ``net.layers.8``
(BasicBlocks; stage outputs ``net.layers.2``, ``.5``, ``.8``), ``net.pool`` (global average pool), ``net.fc``.
The same network as the zoo's ``resnet20`` (post-activation blocks, 1x1-conv + BN projections).
"""

from typing import Any

import torch
from torch import nn

from lightning_kd.models.registry import register_model

CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


class Block(nn.Module):
    """relu(b2(c2(relu(b1(c1(x))))) + short(x)); ``short`` a 1x1 conv + BN where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(out_channels)
        self.c2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(out_channels)
        self.short = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.short = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                       nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(out + self.short(x))


class Net(nn.Module):
    def __init__(self, depth: int, widths: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, c = [], widths[0]
        for stage, width in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(Block(c, width, 2 if stage > 0 and i == 0 else 1))
                c = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.pool(x).flatten(1))


class RGBResNet(nn.Module):
    """``net((x - mean) / std)`` with ``mean``/``std`` buffers of shape (1, 3, 1, 1)."""

    def __init__(self, depth: int, widths: tuple[int, ...], num_classes: int = 10,
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.net = Net(depth, widths, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@register_model
def resnet20_rgb(num_classes: int = 10, **kwargs: Any) -> RGBResNet:
    """ResNet-20 (16/16/32/64) on RGB in [0, 1]: the shared teacher's state-dict layout."""
    return RGBResNet(20, (16, 16, 32, 64), num_classes=num_classes, **kwargs)
