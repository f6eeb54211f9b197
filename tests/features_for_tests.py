"""A local teacher network that counts the samples it computes, and a CachedTeacherDataModule over it."""

from __future__ import annotations

import torch
from torch import nn

from lightning_kd.models import create_model

LAYERS = {"l2": "net.layer2", "pool": "net.avgpool"}  # the teacher's layer-2 map (32, 16, 16), pooled (64, 1, 1)


class CountingNet(nn.Module):
    """A seeded zoo resnet8 (as ``net``) counting the samples of every real forward; the meta-device forward
    that reads layer shapes computes nothing and is not counted."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = create_model("resnet8")
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta:
            self.samples += len(x)
        return self.net(x)


def feature_datamodule(teacher, cache_dir, budget: int = 48, **kw):
    from lightning_kd.data import CachedTeacherDataModule, CIFAR10DataModule

    kw.setdefault("teacher_features", LAYERS)
    return CachedTeacherDataModule(CIFAR10DataModule(batch_size=16), teacher, budget=budget, cache_dir=str(cache_dir),
                                   fill_batch_size=32, progress=False, **kw)
