"""Wide ``nn.Linear`` (GPD Sec. 3.2 / 3.3): channels on the last dim.

``W'[o', j] = W[m(o'), m(j)] / n_{m(j)}``, ``b'[o'] = b[m(o')]``; student view ``n_i * W'[S_o, :C_i]``,
``b'[S_o]`` with ``S_o`` the student's output rows (the leading ``C_o``; for attention's fused qkv the leading
rows of each of q, k, v). The layer writing the network output keeps its output width.

No CBR branches on Linear layers: a parallel linear branch merged into the weight has the weight's own shape, so
``W + B`` is the same function class with the same gradient on both terms; the paper's branches (Sec. 3.3, after
OREPA) add structure only for spatial kernels (a 1x1 or average-pooling branch of a kxk conv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.reparam.layer import Copies, WideLayer, owned, wide_parameter, widen_dense

__all__ = ["WideLinear"]


class WideLinear(WideLayer):
    """Wide ``nn.Linear`` of the DT, its output and input channels widened by ``out`` / ``inp``.

    ``out`` may have several blocks (attention's fused projections); ``inp`` has one.
    """

    in_copies: torch.Tensor | None
    student_rows: torch.Tensor | None

    def __init__(self, linear: nn.Linear, out: Copies, inp: Copies, *, noise_std: float = 0.0) -> None:
        super().__init__()
        if inp.chunks != 1:
            raise ValueError(f"the input axis of a wide Linear has one block, got {inp}")
        self.student_out_features, self.student_in_features = linear.out_features, linear.in_features
        self.out_features, self.in_features = out.chunks * out.wide, inp.wide
        weight = linear.weight.detach()
        out_index = out.index(weight.device)
        wide, counts = widen_dense(weight, out_index, inp.index(weight.device))
        self.weight = wide_parameter(linear.weight, wide, noise_std, out, inp)
        if linear.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = wide_parameter(linear.bias, linear.bias.detach()[out_index], noise_std, out)
        self.register_buffer("in_copies", None if inp.is_identity else counts, persistent=False)
        rows = None if out.chunks == 1 else out.positions(weight.device)
        self.register_buffer("student_rows", rows, persistent=False)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        if self.student_rows is None:
            return t[: self.student_out_features]
        return t.index_select(0, self.student_rows)

    def student_weight(self) -> torch.Tensor:
        """``n_i * W'[S_o, :C_i]``, a differentiable view of the DT."""
        weight = self._rows(self.weight)[:, : self.student_in_features]
        return weight if self.in_copies is None else weight * self.in_copies

    def student_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self._rows(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.student_mode:
            return F.linear(x, self.student_weight(), self.student_bias())
        return F.linear(x, self.weight, self.bias)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        state = {"weight": owned(self.student_weight())}
        if self.bias is not None:
            state["bias"] = owned(self.student_bias())
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"student=({self.student_in_features}, {self.student_out_features})"
        )
