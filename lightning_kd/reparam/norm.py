"""Wide normalization and channel-scale layers (GPD Sec. 3.2 / 3.3): per-channel tensors tiled by the copy map.

* BatchNorm2d (and timm's ``BatchNormAct2d``): gamma, beta and the running statistics are tiled by ``m``; in train
  mode every copy sees the same batch statistics, so the layer commutes with channel copying at any ratio. The
  student view shares gamma/beta (``[:C]``) and keeps its own running statistics.
* LayerNorm over the channel (last) dim: a plain LayerNorm over copied channels is exact only when every channel
  has the same number of copies (integer ratio). At other ratios the wide LayerNorm weights channel ``j`` by
  ``1 / (C * n_{m(j)})`` in its mean and variance, which are then the student's own: exact at any ratio (the
  official code, ``RVT/gpd_layers.py``, needs an integer ratio). The student view is ``F.layer_norm`` with
  ``gamma'[:C]``, ``beta'[:C]``.
* timm ``LayerScale``: ``gamma'[j] = gamma[m(j)]``, student ``gamma'[:C]``.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, LayerScale
from torch import nn

from lightning_kd.reparam.layer import Copies, WideLayer, copy_map, owned, wide_channels, wide_parameter

__all__ = ["WideBatchNorm2d", "WideLayerNorm", "WideLayerScale", "weighted_layer_norm"]


def weighted_layer_norm(
    x: torch.Tensor, mean_weights: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dim whose mean and (biased) variance weight channel ``j`` by ``mean_weights[j]``."""
    mean = (x @ mean_weights).unsqueeze(-1)
    centred = x - mean
    var = (centred.square() @ mean_weights).unsqueeze(-1)
    x = centred * torch.rsqrt(var + eps)
    if weight is not None:
        x = x * weight
    return x if bias is None else x + bias


class WideBatchNorm2d(WideLayer):
    """Wide BatchNorm2d (or timm ``BatchNormAct2d``, whose ``drop``/``act`` run after it).

    gamma/beta are shared (student: ``[:C]``); the DT and the student each keep
    their own running statistics (``running_*`` and ``student_running_*``).
    """

    def __init__(self, bn: nn.BatchNorm2d, ratio: float, *, noise_std: float = 0.0) -> None:
        super().__init__()
        c = bn.num_features
        self.num_features, self.student_num_features = wide_channels(c, ratio), c
        self.eps, self.momentum = bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        state = next(itertools.chain(bn.parameters(), bn.buffers()), None)
        index, _ = copy_map(c, self.num_features, torch.device("cpu") if state is None else state.device)
        for name in ("weight", "bias"):
            param = getattr(bn, name)
            if param is None:
                self.register_parameter(name, None)
            else:
                setattr(self, name, wide_parameter(param, param.detach()[index], noise_std, c))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buf = getattr(bn, name)
            wide = None if buf is None else (buf.detach().clone() if buf.dim() == 0 else buf.detach()[index])
            self.register_buffer(name, wide)
            self.register_buffer(f"student_{name}", None if buf is None else buf.detach().clone())
        self.has_act = type(bn).forward is BatchNormAct2d.forward
        if self.has_act:
            self.drop, self.act = copy.deepcopy(bn.drop), copy.deepcopy(bn.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        weight, bias = self.weight, self.bias
        mean, var, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        if self.student_mode:
            c = self.student_num_features
            weight = None if weight is None else weight[:c]
            bias = None if bias is None else bias[:c]
            mean, var, tracked = self.student_running_mean, self.student_running_var, self.student_num_batches_tracked
        # Same control flow as torch.nn.modules.batchnorm._BatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and tracked is not None:
            tracked.add_(1)
            factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (mean is None and var is None)
        keep = not self.training or self.track_running_stats
        x = F.batch_norm(
            x, mean if keep else None, var if keep else None, weight, bias, use_batch_stats, factor, self.eps
        )
        if self.has_act:
            x = self.act(self.drop(x))
        return x

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        c = self.student_num_features
        state = {}
        if self.weight is not None:
            state["weight"] = owned(self.weight[:c])
            state["bias"] = owned(self.bias[:c])
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buf = getattr(self, f"student_{name}")
            if buf is not None:
                state[name] = owned(buf)
        return state

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, student={self.student_num_features}"
        )


class WideLayerNorm(WideLayer):
    """Wide LayerNorm over the last dim (``nn.LayerNorm`` or timm's ``LayerNorm``); see the module docstring.

    ``mean_weights`` is None at integer ratios (the wide layer is a plain LayerNorm), else ``1 / (C * n_{m(j)})``.
    Both modes run ``F.layer_norm`` (or its weighted form), not timm's optional fast-norm kernels.
    """

    mean_weights: torch.Tensor | None

    def __init__(self, ln: nn.LayerNorm, channels: Copies, *, noise_std: float = 0.0) -> None:
        super().__init__()
        self.channels, self.eps = channels, ln.eps
        self.normalized_shape = (channels.wide,)
        self.student_normalized_shape = (channels.channels,)
        like = next(ln.parameters(), torch.empty(0))
        index = channels.index(like.device)
        for name in ("weight", "bias"):
            param = getattr(ln, name, None)
            if param is None:
                self.register_parameter(name, None)
            else:
                setattr(self, name, wide_parameter(param, param.detach()[index], noise_std, channels))
        mean_weights = 1.0 / (channels.channels * channels.counts(like.device)[index].to(like.dtype))
        self.register_buffer("mean_weights", None if channels.is_uniform else mean_weights, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.student_mode:
            c = self.channels.channels
            weight = None if self.weight is None else self.weight[:c]
            bias = None if self.bias is None else self.bias[:c]
            return F.layer_norm(x, self.student_normalized_shape, weight, bias, self.eps)
        if self.mean_weights is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return weighted_layer_norm(x, self.mean_weights, self.weight, self.bias, self.eps)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        c = self.channels.channels
        return {name: owned(t[:c]) for name, t in (("weight", self.weight), ("bias", self.bias)) if t is not None}

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, student={self.student_normalized_shape}, "
            f"weighted={self.mean_weights is not None}"
        )


class WideLayerScale(WideLayer):
    """Wide timm ``LayerScale`` (per-channel scale on the last dim)."""

    def __init__(self, scale: LayerScale, channels: Copies, *, noise_std: float = 0.0) -> None:
        super().__init__()
        self.channels, self.inplace = channels, scale.inplace
        index = channels.index(scale.gamma.device)
        self.gamma = wide_parameter(scale.gamma, scale.gamma.detach()[index], noise_std, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma[: self.channels.channels] if self.student_mode else self.gamma
        return x.mul_(gamma) if self.inplace else x * gamma

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return {"gamma": owned(self.gamma[: self.channels.channels])}

    def extra_repr(self) -> str:
        return f"{self.channels.wide}, student={self.channels.channels}"
