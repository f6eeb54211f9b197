"""Channel-Branch Reparameterization branches for 3x3 convolutions (GPD Sec. 3.3).

The paper (following OREPA, official ``orepa_ft.py``) gives each 3x3 conv of the
dynamic teacher extra *linear* branches that are merged into one 3x3 kernel
before the convolution, so training sees an over-parameterised conv while the
forward runs a single ``F.conv2d``. We keep two branches that merge exactly:

* a 1x1 conv, zero-padded to the centre of the 3x3 kernel;
* a 1x1 conv followed by 3x3 average pooling, i.e. a learnable scale per
  (out, in) pair times the uniform 3x3 kernel (``1/9`` everywhere).

Both start at zero, so the merged kernel (and the network function) is the
original one at init; the official code instead keeps random branch weights
and zeroes a per-branch output scale (``single_active_init``). Zero branch
weights still receive gradients (the centre / the spatial mean of the kernel
gradient), so they learn from the first step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def supports_branches(conv: nn.Conv2d) -> bool:
    """True for the convs that get branches: 3x3 kernel, stride 1, groups 1."""
    return tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1) and conv.groups == 1


class ConvBranches(nn.Module):
    """Zero-initialised 1x1 and average-pooling branches of one 3x3 conv kernel.

    ``delta(out, inp)`` is the branches' contribution to the merged kernel,
    restricted to the leading ``out`` output and ``inp`` input channels, so the
    student view (a leading slice of the dynamic teacher) can slice the branch
    parameters by the same rule as the main kernel.
    """

    def __init__(
        self,
        out_channels: int,
        in_channels: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.pointwise = nn.Parameter(torch.zeros(out_channels, in_channels, **factory))
        self.avg = nn.Parameter(torch.zeros(out_channels, in_channels, **factory))
        self.register_buffer("avg_kernel", torch.full((3, 3), 1.0 / 9.0, **factory), persistent=False)

    def delta(self, out: int | None = None, inp: int | None = None) -> torch.Tensor:
        """Merged branch kernel ``pad(W_1x1) + W_avg * U_3x3`` of shape (out, inp, 3, 3)."""
        pointwise = self.pointwise[:out, :inp]
        avg = self.avg[:out, :inp]
        return F.pad(pointwise[:, :, None, None], (1, 1, 1, 1)) + avg[:, :, None, None] * self.avg_kernel

    def extra_repr(self) -> str:
        out_channels, in_channels = self.pointwise.shape
        return f"{in_channels}, {out_channels}, branches=(1x1, 1x1+avg3x3)"
