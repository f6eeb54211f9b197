"""CIFAR ResNets as defined in RepDistiller / mdistiller (``models/resnet.py``).

Post-activation BasicBlock ResNets of depth 6n+2 (He et al. 2016, CIFAR
variant): 3x3 stem conv-BN-ReLU, three stages of n blocks at strides 1/2/2,
global average pooling and a linear ``fc``. Where a block changes shape the
shortcut is an option-B projection (1x1 conv + BN), as in the reference.
``widths`` is ``[stem, stage1, stage2, stage3]``: 16/16/32/64 for the plain
nets, 32/64/128/256 for the ``x4`` nets (so their first stage projects too).
"""

from typing import Any

import torch
from torch import nn

from lightning_kd.models.registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``forward`` returns logits."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        # Reference init: Kaiming-normal (fan_out) convs, BN at identity, default Linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_PLAIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@register_model
def resnet8(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-8, widths 16/16/32/64."""
    return CifarResNet(8, _PLAIN, num_classes=num_classes, **kwargs)


@register_model
def resnet14(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-14, widths 16/16/32/64."""
    return CifarResNet(14, _PLAIN, num_classes=num_classes, **kwargs)


@register_model
def resnet20(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-20, widths 16/16/32/64."""
    return CifarResNet(20, _PLAIN, num_classes=num_classes, **kwargs)


@register_model
def resnet32(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-32, widths 16/16/32/64."""
    return CifarResNet(32, _PLAIN, num_classes=num_classes, **kwargs)


@register_model
def resnet44(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-44, widths 16/16/32/64."""
    return CifarResNet(44, _PLAIN, num_classes=num_classes, **kwargs)


@register_model
def resnet56(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-56, widths 16/16/32/64."""
    return CifarResNet(56, _PLAIN, num_classes=num_classes, **kwargs)


@register_model
def resnet110(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-110, widths 16/16/32/64."""
    return CifarResNet(110, _PLAIN, num_classes=num_classes, **kwargs)


@register_model
def resnet8x4(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-8 with 4x stage widths (32/64/128/256), the usual CIFAR-100 KD student."""
    return CifarResNet(8, _X4, num_classes=num_classes, **kwargs)


@register_model
def resnet32x4(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-32 with 4x stage widths (32/64/128/256), the usual CIFAR-100 KD teacher."""
    return CifarResNet(32, _X4, num_classes=num_classes, **kwargs)
