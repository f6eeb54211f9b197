"""Wide ``nn.Conv2d`` (GPD Sec. 3.2 / 3.3), optionally with CBR branches.

* groups 1: ``W'[o', j] = W[m(o'), m(j)] / n_{m(j)}``, ``b'[o'] = b[m(o')]``; the conv reading the network input
  keeps its input width, the one writing the network output keeps its output width;
* depthwise (``groups == C_in == C_out``): ``W'[o'] = W[m(o')]``, ``groups' = C'``;
* other grouped convs need an integer ratio ``r``: ``groups' = r * groups``, copy ``a`` of group ``g`` is wide
  group ``a * groups + g`` and reads copy ``a`` of its inputs, ``W'[a*C_o+o] = W[o]``.

Student view: ``n_i * K[:C_o, :C_i]`` (grouped: ``K[:C_o]``) with ``K`` the branch-merged kernel, ``b'[:C_o]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from lightning_kd.reparam.branches import ConvBranches, supports_branches
from lightning_kd.reparam.layer import (
    UnsupportedLayerError,
    WideLayer,
    copy_map,
    owned,
    wide_channels,
    wide_parameter,
    widen_dense,
)

__all__ = ["WideConv2d"]


class WideConv2d(WideLayer):
    """Wide ``nn.Conv2d`` of the DT, optionally with CBR branches; student view by slicing.

    Wide mode runs ``F.conv2d`` with the (branch-merged) wide kernel; student mode
    with ``n_i * K[:C_o, :C_i]`` (``K[:C_o]`` for grouped convs) and the student's groups.
    """

    in_copies: torch.Tensor | None

    def __init__(
        self,
        conv: nn.Conv2d,
        ratio: float,
        *,
        expand_in: bool,
        expand_out: bool,
        branches: bool = False,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__()
        c_out, c_in, groups = conv.out_channels, conv.in_channels, conv.groups
        self.student_out_channels, self.student_in_channels, self.student_groups = c_out, c_in, groups
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding, self.padding_mode = conv.padding, conv.padding_mode
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        if groups == 1:
            self._init_dense(conv, ratio, expand_in, expand_out, noise_std)
        else:
            self._init_grouped(conv, ratio, expand_in, expand_out, noise_std)
        self.branches: ConvBranches | None = None
        if branches and supports_branches(conv):
            self.branches = ConvBranches(
                self.out_channels, self.in_channels, device=conv.weight.device, dtype=conv.weight.dtype
            )

    def _init_dense(self, conv: nn.Conv2d, ratio: float, expand_in: bool, expand_out: bool, noise_std: float) -> None:
        c_out, c_in = conv.out_channels, conv.in_channels
        self.out_channels = wide_channels(c_out, ratio) if expand_out else c_out
        self.in_channels = wide_channels(c_in, ratio) if expand_in else c_in
        self.groups = 1
        weight = conv.weight.detach()
        out_index, _ = copy_map(c_out, self.out_channels, weight.device)
        in_index, _ = copy_map(c_in, self.in_channels, weight.device)
        wide, counts = widen_dense(weight, out_index, in_index)
        self.weight = wide_parameter(conv.weight, wide, noise_std, c_out, c_in)
        self._init_bias(conv.bias, out_index, c_out, noise_std)
        self.register_buffer("in_copies", counts if expand_in else None, persistent=False)

    def _init_grouped(self, conv: nn.Conv2d, ratio: float, expand_in: bool, expand_out: bool, noise_std: float) -> None:
        c_out, c_in, groups = conv.out_channels, conv.in_channels, conv.groups
        kind = f"grouped Conv2d (in={c_in}, out={c_out}, groups={groups})"
        if not (expand_in and expand_out):
            raise UnsupportedLayerError(f"{kind} reading the network input or writing its output")
        if not (groups == c_in == c_out or float(ratio).is_integer()):
            raise UnsupportedLayerError(f"{kind} needs an integer ratio, got {ratio}")
        weight = conv.weight.detach()
        self.out_channels, self.in_channels = wide_channels(c_out, ratio), wide_channels(c_in, ratio)
        self.groups = self.in_channels // (c_in // groups)
        out_index, _ = copy_map(c_out, self.out_channels, weight.device)
        self.weight = wide_parameter(conv.weight, weight[out_index], noise_std, c_out)
        self._init_bias(conv.bias, out_index, c_out, noise_std)
        # Each input channel appears once per wide group: no copy-count scaling.
        self.register_buffer("in_copies", None, persistent=False)

    def _init_bias(self, bias: nn.Parameter | None, out_index: torch.Tensor, c_out: int, noise_std: float) -> None:
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = wide_parameter(bias, bias.detach()[out_index], noise_std, c_out)

    def kernel(self, out: int | None = None, inp: int | None = None) -> torch.Tensor:
        """Branch-merged kernel restricted to ``[:out, :inp]`` (None = full width)."""
        weight = self.weight[:out, :inp]
        if self.branches is not None:
            weight = weight + self.branches.delta(out, inp)
        return weight

    def student_weight(self) -> torch.Tensor:
        """``n_i * K[:C_o, :C_i]`` (grouped: ``K[:C_o]``), a differentiable view of the DT."""
        inp = self.student_in_channels if self.groups == 1 else None
        weight = self.kernel(self.student_out_channels, inp)
        return weight if self.in_copies is None else weight * self.in_copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.student_mode:
            weight, groups = self.student_weight(), self.student_groups
            bias = None if self.bias is None else self.bias[: self.student_out_channels]
        else:
            weight, bias, groups = self.kernel(), self.bias, self.groups
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = _pair(0)
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, groups)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        state = {"weight": owned(self.student_weight())}
        if self.bias is not None:
            state["bias"] = owned(self.bias[: self.student_out_channels])
        return state

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, "
            f"student=({self.student_in_channels}, {self.student_out_channels}, groups={self.student_groups})"
        )
