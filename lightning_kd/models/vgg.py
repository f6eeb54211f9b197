"""CIFAR VGGs with BN as defined in RepDistiller (``models/vgg.py``, ``vgg8_bn``/``vgg13_bn``).

Five conv blocks of 3x3 conv(bias)-BN-ReLU layers, 2x2 max-pooling after the
first three (32 -> 16 -> 8 -> 4; the reference pools after the fourth only for
64x64 inputs), global average pooling and a single linear ``fc`` (the
reference's ``classifier``; VGG's large FC head is dropped).
"""

from typing import Any

import torch
from torch import nn

from lightning_kd.models.registry import register_model

# Output channels of each conv, per block (RepDistiller cfg 'S' and 'B').
_CFG_VGG8 = ((64,), (128,), (256,), (512,), (512,))
_CFG_VGG13 = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


def _conv_block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=False),
        ]
        in_channels = width
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG-BN for 32x32 inputs; ``forward`` returns logits."""

    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int = 10) -> None:
        super().__init__()
        ins = (3,) + tuple(block[-1] for block in cfg[:-1])
        self.block0 = _conv_block(ins[0], cfg[0])
        self.pool0 = nn.MaxPool2d(2, 2)
        self.block1 = _conv_block(ins[1], cfg[1])
        self.pool1 = nn.MaxPool2d(2, 2)
        self.block2 = _conv_block(ins[2], cfg[2])
        self.pool2 = nn.MaxPool2d(2, 2)
        self.block3 = _conv_block(ins[3], cfg[3])
        self.block4 = _conv_block(ins[4], cfg[4])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg[-1][-1], num_classes)
        # Reference init: He-normal (fan_out) convs with zero bias, BN at identity,
        # N(0, 0.01) Linear weight with zero bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def vgg8(num_classes: int = 10, **kwargs: Any) -> CifarVGG:
    """VGG-8 with BN (RepDistiller ``vgg8_bn``), the usual student of VGG-13."""
    return CifarVGG(_CFG_VGG8, num_classes=num_classes, **kwargs)


@register_model
def vgg13(num_classes: int = 10, **kwargs: Any) -> CifarVGG:
    """VGG-13 with BN (RepDistiller ``vgg13_bn``), the usual CIFAR-100 KD teacher."""
    return CifarVGG(_CFG_VGG13, num_classes=num_classes, **kwargs)
