"""Shared pieces of the wide layers: the channel copy map, dense widening, the ``WideLayer`` base.

A hidden tensor with ``C`` channels gets ``C' = ceil(ratio * C)`` channels in the dynamic teacher; wide channel
``j`` copies student channel ``m(j) = j mod C`` and ``n_c`` counts the copies of channel ``c`` (Net2WiderNet; GPD
Inverse Reparameterization, Sec. 3.2). Each layer family (``conv``, ``linear``, ``norm``, ...) builds its wide
tensors from these maps and computes its student view (CBR hard sharing, Sec. 3.3) from the wide parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Copies",
    "UnsupportedLayerError",
    "WideLayer",
    "copy_map",
    "noise_outside",
    "owned",
    "wide_channels",
    "wide_parameter",
    "widen_dense",
]


class UnsupportedLayerError(ValueError):
    """A module of the student cannot be widened function-preservingly."""


def wide_channels(channels: int, ratio: float) -> int:
    """``ceil(ratio * channels)``, rounded first so ``1.1 * 10`` gives 11, not 12."""
    return max(channels, math.ceil(round(ratio * channels, 6)))


def copy_map(channels: int, wide: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``m``: wide channel -> student channel, ``n``: copies per student channel)."""
    index = torch.arange(wide, device=device) % channels
    return index, torch.bincount(index, minlength=channels)


@dataclass(frozen=True)
class Copies:
    """The copy map of one channel axis: ``chunks`` blocks of ``channels`` student channels, each made ``wide``.

    Wide channel ``a * wide + j`` copies student channel ``a * channels + j mod channels``; the student view of
    the axis is the leading ``channels`` of every block. One block is an ordinary hidden tensor; attention's fused
    ``[q | k | v]`` projection has three, so that the wide tensor is again ``[q' | k' | v']``.
    """

    channels: int
    wide: int
    chunks: int = 1

    @classmethod
    def widen(cls, channels: int, ratio: float) -> Copies:
        return cls(channels, wide_channels(channels, ratio))

    @classmethod
    def keep(cls, channels: int) -> Copies:
        return cls(channels, channels)

    @property
    def is_identity(self) -> bool:
        """Not widened (ratio 1, or the network's input / output channels)."""
        return self.wide == self.channels

    @property
    def is_uniform(self) -> bool:
        """Every student channel has the same number of copies (an integer ratio)."""
        return self.wide % self.channels == 0

    def index(self, device: torch.device | None = None) -> torch.Tensor:
        """``m``: the student channel of each of the ``chunks * wide`` wide channels."""
        block, _ = copy_map(self.channels, self.wide, device)
        return torch.cat([block + a * self.channels for a in range(self.chunks)])

    def counts(self, device: torch.device | None = None) -> torch.Tensor:
        """``n``: the copies of each of the ``chunks * channels`` student channels."""
        return torch.bincount(self.index(device), minlength=self.chunks * self.channels)

    def positions(self, device: torch.device | None = None) -> torch.Tensor:
        """Where the student's channels sit in the wide axis."""
        block = torch.arange(self.channels, device=device)
        return torch.cat([block + a * self.wide for a in range(self.chunks)])


def noise_outside(like: torch.Tensor, std: float, *axes: int | Copies) -> torch.Tensor:
    """N(0, std) noise shaped like ``like``, zero on the student block of its leading dims.

    Axis ``d`` is a ``Copies`` map, or an int ``c`` for the leading ``c`` entries.
    """
    noise = torch.randn_like(like) * std
    inside = torch.ones((), dtype=torch.bool, device=like.device)
    for size, axis in zip(like.shape, axes):
        flag = torch.zeros(size, dtype=torch.bool, device=like.device)
        flag[axis.positions(like.device) if isinstance(axis, Copies) else slice(0, axis)] = True
        inside = inside.unsqueeze(-1) & flag
    return noise.masked_fill(inside.view(inside.shape + (1,) * (like.dim() - inside.dim())), 0)


def owned(t: torch.Tensor) -> torch.Tensor:
    """Detached contiguous copy, so a state dict never aliases DT storage."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def wide_parameter(like: nn.Parameter, wide: torch.Tensor, noise_std: float, *student: int | Copies) -> nn.Parameter:
    """``wide`` as a parameter with ``like``'s ``requires_grad``, plus noise outside the student block."""
    if noise_std > 0:
        wide = wide + noise_outside(wide, noise_std, *student)
    return nn.Parameter(wide, requires_grad=like.requires_grad)


def widen_dense(
    weight: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wide dense ``(out, in, ...)`` weight ``W'[o', j] = W[m(o'), m(j)] / n_{m(j)}`` and the copy counts.

    The counts come back shaped ``(1, C_in, 1, ...)``: the student view is ``n_i * W'[:C_o, :C_i]``.
    """
    c_in = weight.shape[1]
    counts = torch.bincount(in_index, minlength=c_in).to(weight.dtype).view((1, c_in) + (1,) * (weight.dim() - 2))
    return weight[out_index][:, in_index] / counts[:, in_index], counts


class WideLayer(nn.Module):
    """Base of the wide layers: a DT layer that can also run as its student view."""

    student_mode: bool = False

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The original layer's state dict (its own keys), computed from the DT parameters."""
        raise NotImplementedError
