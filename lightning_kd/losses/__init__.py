"""Distillation losses and mixing functions: pure functions of tensors (they depend only on torch)."""

from lightning_kd.losses.comparative import (
    comparative_kd_loss,
    compare_sides,
    in_batch_comparative_loss,
    tuple_comparative_loss,
)
from lightning_kd.losses.features import cc_loss, hint_loss, match_spatial, vid_loss, vid_variance
from lightning_kd.losses.kd import hinton_kd_loss, kd_loss, soft_cross_entropy
from lightning_kd.losses.mixing import cutmix, mix_targets, mixup
from lightning_kd.losses.relational import dist_loss, rkd_loss

__all__ = [
    "cc_loss",
    "compare_sides",
    "comparative_kd_loss",
    "cutmix",
    "dist_loss",
    "hint_loss",
    "hinton_kd_loss",
    "in_batch_comparative_loss",
    "kd_loss",
    "match_spatial",
    "mix_targets",
    "mixup",
    "rkd_loss",
    "soft_cross_entropy",
    "tuple_comparative_loss",
    "vid_loss",
    "vid_variance",
]
