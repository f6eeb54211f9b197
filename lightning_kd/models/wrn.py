"""Wide ResNets for CIFAR as defined in RepDistiller (``models/wrn.py``).

WRN-d-k (Zagoruyko & Komodakis 2016): 3x3 stem conv (no BN), three stages of
n = (d-4)/6 pre-activation blocks at widths 16k/32k/64k and strides 1/2/2,
then BN-ReLU, global average pooling and a linear ``fc``. Where a block
changes shape its shortcut is a bare 1x1 conv applied to the block's
pre-activated input, as in the reference.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.models.registry import register_model


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus the (projected) input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        # Reference: the projection sees the activated input, the identity the raw one.
        identity = x if self.shortcut is None else self.shortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + identity


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs; ``forward`` returns logits."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_stage(widths[0], widths[1], n, 1, drop_rate)
        self.block2 = self._make_stage(widths[1], widths[2], n, 2, drop_rate)
        self.block3 = self._make_stage(widths[2], widths[3], n, 2, drop_rate)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        # Reference init: He-normal (fan_out) convs, BN at identity, zero Linear bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int, drop_rate: float) -> nn.Sequential:
        layers = [WideBasicBlock(in_channels, out_channels, stride, drop_rate)]
        layers += [WideBasicBlock(out_channels, out_channels, 1, drop_rate) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def wrn_16_1(num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes=num_classes, **kwargs)


@register_model
def wrn_16_2(num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-16-2, the usual student of WRN-40-2."""
    return WideResNet(16, 2, num_classes=num_classes, **kwargs)


@register_model
def wrn_40_1(num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-40-1, the usual thin student of WRN-40-2."""
    return WideResNet(40, 1, num_classes=num_classes, **kwargs)


@register_model
def wrn_40_2(num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-40-2, the usual CIFAR-100 KD teacher."""
    return WideResNet(40, 2, num_classes=num_classes, **kwargs)
