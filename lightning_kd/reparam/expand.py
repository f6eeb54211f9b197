"""Inverse Reparameterization: widen a student into a dynamic teacher that shares it (GPD).

Gap Preserving Distillation (Guo et al., ICLR 2025, arXiv 2410.04140) trains a
*dynamic teacher* (DT) from scratch next to the student. Inverse
Reparameterization (IR, Sec. 3.2) initialises the DT as a wider copy of the
student that computes exactly the same function; Channel-Branch
Reparameterization (CBR, Sec. 3.3) makes the student a sub-network of the DT
so that both are trained through one set of parameters ("hard sharing").

Construction (Net2WiderNet style)
---------------------------------
A hidden tensor with ``C`` channels gets ``C' = ceil(ratio * C)`` channels in
the DT; wide channel ``j`` is a *copy* of student channel ``m(j) = j mod C``
and ``n_c`` is the number of copies of channel ``c``. Every hidden activation
of the DT is then the copy-expansion of the student's activation:

* conv / linear with expanded input and output:
  ``W'[o', j] = W[m(o'), m(j)] / n_{m(j)}``, ``b'[o'] = b[m(o')]``; the layer
  reading the network input keeps its input width, the layer writing the
  network output keeps its output width;
* depthwise conv (``groups == C_in == C_out``): ``W'[o'] = W[m(o')]``,
  ``groups' = C'``; other grouped convs need an integer ratio ``r``
  (``groups' = r * groups``, copy ``a`` of group ``g`` is wide group
  ``a * groups + g`` and reads copy ``a`` of its inputs, ``W'[a*C_o+o] = W[o]``);
* BatchNorm2d (and timm's ``BatchNormAct2d``): gamma, beta and the running
  statistics are tiled by ``m``; in train mode every copy sees the same batch
  statistics.

Because copies are identical, elementwise activations, BN, residual additions
and pooling commute with the expansion, so the construction is exact for *any*
elementwise activation (ReLU6, SiLU, GELU), for BN modules with a fused
activation, and for non-integer ratios. The official code (``CNN/gpd_utils.py``,
``CNN/gpd_layers.py``) instead divides each output copy by ``r`` so wide
activations are ``x / r``, and evaluates BN as ``BN(r * x) / r``; that relies on
``act(x / r) == act(x) / r`` (positively homogeneous activations such as ReLU
only: not ReLU6, SiLU, GELU, nor the activation inside ``BatchNormAct2d``) and
on integer ratios (copies are concatenated ``r`` times).

Limits: only Conv2d, Linear, BatchNorm2d / ``BatchNormAct2d`` with their
standard forward hold state; anything else with parameters or buffers raises
``UnsupportedLayerError``. Operations that do not commute with channel copying
(channel concatenation, flattening spatial maps into a Linear, channel
attention from functional ops) are caught by the check ``expand`` runs on the
example input (``ExpansionCheckError``).

Student view (CBR, Sec. 3.3)
----------------------------
Only the DT's parameters exist. Each wide layer computes the student's weights
from them in ``forward`` when in student mode:
``W_S[o, i] = n_i * W'[o, i]`` for ``o < C_o``, ``i < C_i`` (first layer:
``W'[:C_o]``; depthwise/grouped: ``W'[:C_o]``), ``b_S = b'[:C_o]``,
``gamma_S = gamma'[:C]``, ``beta_S = beta'[:C]``. At init this is the original
student (bit for bit where every ``n_i`` is a power of two, else up to one
rounding of ``n * (W / n)``); ``noise_std`` perturbs only entries outside this
student block. Gradients of the student loss flow into the shared DT
parameters, so one optimizer over ``dt.parameters()`` trains both. This is the
paper's rule "student = slice of the DT scaled by r" with the scale put on the
input-channel copy count. BN running statistics are not shared: the student
keeps its own buffers, updated only by student-mode train forwards.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils._pytree import tree_flatten

from lightning_kd.reparam.branches import ConvBranches, supports_branches

__all__ = [
    "DynamicTeacher",
    "ExpansionCheckError",
    "UnsupportedLayerError",
    "WideBatchNorm2d",
    "WideConv2d",
    "WideLayer",
    "WideLinear",
    "expand",
    "wide_channels",
]


class UnsupportedLayerError(ValueError):
    """A module of the student cannot be widened function-preservingly."""


class ExpansionCheckError(ValueError):
    """The built dynamic teacher does not reproduce the student on the example input."""


def wide_channels(channels: int, ratio: float) -> int:
    """``ceil(ratio * channels)``, rounded first so ``1.1 * 10`` gives 11, not 12."""
    return max(channels, math.ceil(round(ratio * channels, 6)))


def _copy_map(channels: int, wide: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(``m``: wide channel -> student channel, ``n``: copies per student channel)."""
    index = torch.arange(wide, device=device) % channels
    return index, torch.bincount(index, minlength=channels)


def _noise_outside(shape: torch.Size, like: torch.Tensor, std: float, *student: int) -> torch.Tensor:
    """N(0, std) noise that is zero on the leading student block ``[:student[0], :student[1], ...]``."""
    noise = torch.randn(shape, device=like.device, dtype=like.dtype) * std
    noise[tuple(slice(0, s) for s in student)] = 0
    return noise


def _owned(t: torch.Tensor) -> torch.Tensor:
    """Detached contiguous copy, so a state dict never aliases DT storage."""
    return t.detach().clone(memory_format=torch.contiguous_format)


class WideLayer(nn.Module):
    """Base of the wide layers: a DT layer that can also run as its student view."""

    student_mode: bool = False

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The original layer's state dict (its own keys), computed from the DT parameters."""
        raise NotImplementedError


class _WideDense(WideLayer):
    """Shared widening of a dense ``(out, in, ...)`` weight (conv with groups 1, linear)."""

    in_copies: torch.Tensor | None

    def _init_dense(
        self,
        layer: nn.Conv2d | nn.Linear,
        c_out: int,
        c_in: int,
        expand_in: bool,
        expand_out: bool,
        ratio: float,
        noise_std: float,
    ) -> tuple[int, int]:
        weight = layer.weight.detach()
        w_out = wide_channels(c_out, ratio) if expand_out else c_out
        w_in = wide_channels(c_in, ratio) if expand_in else c_in
        out_index, _ = _copy_map(c_out, w_out, weight.device)
        in_index, in_counts = _copy_map(c_in, w_in, weight.device)
        shape = (1, c_in) + (1,) * (weight.dim() - 2)
        counts = in_counts.to(weight.dtype).view(shape)
        wide = weight[out_index][:, in_index] / counts[:, in_index]
        if noise_std > 0:
            wide = wide + _noise_outside(wide.shape, wide, noise_std, c_out, c_in)
        self.weight = nn.Parameter(wide, requires_grad=layer.weight.requires_grad)
        self._init_bias(layer.bias, out_index, c_out, noise_std)
        self.register_buffer("in_copies", counts if expand_in else None, persistent=False)
        return w_out, w_in

    def _init_bias(self, bias: torch.Tensor | None, out_index: torch.Tensor, c_out: int, noise_std: float) -> None:
        if bias is None:
            self.register_parameter("bias", None)
            return
        wide = bias.detach()[out_index]
        if noise_std > 0:
            wide = wide + _noise_outside(wide.shape, wide, noise_std, c_out)
        self.bias = nn.Parameter(wide, requires_grad=bias.requires_grad)

    def _scaled(self, weight: torch.Tensor) -> torch.Tensor:
        """Student weight: slice times the copy count of each input channel."""
        return weight if self.in_copies is None else weight * self.in_copies


class WideConv2d(_WideDense):
    """Wide ``nn.Conv2d`` of the DT, optionally with CBR branches; student view by slicing.

    Wide mode runs ``F.conv2d`` with the (branch-merged) wide kernel; student mode
    with ``n_i * K[:C_o, :C_i]`` (``K[:C_o]`` for grouped convs) and the student's groups.
    """

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
            self.out_channels, self.in_channels = self._init_dense(
                conv, c_out, c_in, expand_in, expand_out, ratio, noise_std
            )
            self.groups = 1
        else:
            self._init_grouped(conv, ratio, expand_in, expand_out, noise_std)
        self.branches: ConvBranches | None = None
        if branches and supports_branches(conv):
            self.branches = ConvBranches(
                self.out_channels, self.in_channels, device=conv.weight.device, dtype=conv.weight.dtype
            )

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
        out_index, _ = _copy_map(c_out, self.out_channels, weight.device)
        wide = weight[out_index]
        if noise_std > 0:
            wide = wide + _noise_outside(wide.shape, wide, noise_std, c_out)
        self.weight = nn.Parameter(wide, requires_grad=conv.weight.requires_grad)
        self._init_bias(conv.bias, out_index, c_out, noise_std)
        # Each input channel appears once per wide group: no copy-count scaling.
        self.register_buffer("in_copies", None, persistent=False)

    def kernel(self, out: int | None = None, inp: int | None = None) -> torch.Tensor:
        """Branch-merged kernel restricted to ``[:out, :inp]`` (None = full width)."""
        weight = self.weight[:out, :inp]
        if self.branches is not None:
            weight = weight + self.branches.delta(out, inp)
        return weight

    def student_weight(self) -> torch.Tensor:
        """``n_i * K[:C_o, :C_i]`` (grouped: ``K[:C_o]``), a differentiable view of the DT."""
        inp = self.student_in_channels if self.groups == 1 else None
        return self._scaled(self.kernel(self.student_out_channels, inp))

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
        state = {"weight": _owned(self.student_weight())}
        if self.bias is not None:
            state["bias"] = _owned(self.bias[: self.student_out_channels])
        return state

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, "
            f"student=({self.student_in_channels}, {self.student_out_channels}, groups={self.student_groups})"
        )


class WideLinear(_WideDense):
    """Wide ``nn.Linear`` of the DT (channels on the last dim); student view by slicing."""

    def __init__(
        self, linear: nn.Linear, ratio: float, *, expand_in: bool, expand_out: bool, noise_std: float = 0.0
    ) -> None:
        super().__init__()
        c_out, c_in = linear.out_features, linear.in_features
        self.student_out_features, self.student_in_features = c_out, c_in
        self.out_features, self.in_features = self._init_dense(
            linear, c_out, c_in, expand_in, expand_out, ratio, noise_std
        )

    def student_weight(self) -> torch.Tensor:
        """``n_i * W'[:C_o, :C_i]``, a differentiable view of the DT."""
        return self._scaled(self.weight[: self.student_out_features, : self.student_in_features])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.student_mode:
            bias = None if self.bias is None else self.bias[: self.student_out_features]
            return F.linear(x, self.student_weight(), bias)
        return F.linear(x, self.weight, self.bias)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        state = {"weight": _owned(self.student_weight())}
        if self.bias is not None:
            state["bias"] = _owned(self.bias[: self.student_out_features])
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"student=({self.student_in_features}, {self.student_out_features})"
        )


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
        index, _ = _copy_map(c, self.num_features, torch.device("cpu") if state is None else state.device)
        for name in ("weight", "bias"):
            param = getattr(bn, name)
            if param is None:
                self.register_parameter(name, None)
                continue
            wide = param.detach()[index]
            if noise_std > 0:
                wide = wide + _noise_outside(wide.shape, wide, noise_std, c)
            setattr(self, name, nn.Parameter(wide, requires_grad=param.requires_grad))
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
            state["weight"] = _owned(self.weight[:c])
            state["bias"] = _owned(self.bias[:c])
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buf = getattr(self, f"student_{name}")
            if buf is not None:
                state[name] = _owned(buf)
        return state

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, student={self.student_num_features}"
        )


class DynamicTeacher(nn.Module):
    """The wide DT; ``forward`` runs it, ``forward_student`` runs the shared student view.

    ``self.model`` is the student's module tree with every Conv2d / Linear /
    BatchNorm2d replaced by its wide counterpart at the same path, so the
    student's own forward code runs unchanged in both modes. A pristine copy of
    the student on the ``meta`` device (``student_template``: no storage, not a
    submodule, so not in ``parameters()`` or ``state_dict()``) defines the
    extracted student's class, structure and state-dict keys.
    """

    def __init__(self, model: nn.Module, student_template: nn.Module, ratio: float) -> None:
        super().__init__()
        self.model = model
        self.ratio = float(ratio)
        self.student_class: type[nn.Module] = type(student_template)
        object.__setattr__(self, "student_template", student_template)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def student_mode(self) -> Iterator[None]:
        """Switch every wide layer to its student view; restored on exit, even on errors."""
        layers = [layer for _, layer in self.wide_layers()]
        previous = [layer.student_mode for layer in layers]
        try:
            for layer in layers:
                layer.student_mode = True
            yield
        finally:
            for layer, mode in zip(layers, previous):
                layer.student_mode = mode

    def forward_student(self, *args: Any, **kwargs: Any) -> Any:
        """The student's forward, computed from the DT's parameters (grads flow into them)."""
        with self.student_mode():
            return self.model(*args, **kwargs)

    def wide_layers(self) -> Iterator[tuple[str, WideLayer]]:
        """``(path, layer)`` for every wide layer of ``self.model`` (paths as in the student)."""
        for path, module in self.model.named_modules():
            if isinstance(module, WideLayer):
                yield path, module

    @torch.no_grad()
    def student_state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """The student's state dict computed from the DT: scaled slices and student BN stats.

        Keys (and their order) are exactly the original student's; tensors are
        detached copies on the DT's device and dtype.
        """
        entries: dict[str, torch.Tensor] = {}
        for path, module in self.model.named_modules(remove_duplicate=False):
            if isinstance(module, WideLayer):
                prefix = f"{path}." if path else ""
                entries.update({prefix + key: value for key, value in module.student_state_dict().items()})
        keys = list(self.student_template.state_dict().keys())
        if set(keys) != set(entries):
            raise RuntimeError(
                f"student state dict mismatch: missing {sorted(set(keys) - set(entries))}, "
                f"unexpected {sorted(set(entries) - set(keys))}"
            )
        return OrderedDict((key, entries[key]) for key in keys)


def _layer_kind(module: nn.Module) -> str | None:
    """'conv' / 'linear' / 'bn' for layers we can widen (standard forward only), else None."""
    forward = type(module).forward
    if isinstance(module, nn.Conv2d) and forward is nn.Conv2d.forward:
        return "conv"
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.BatchNorm2d) and forward in (nn.BatchNorm2d.forward, BatchNormAct2d.forward):
        return "bn"
    return None


def _check_supported(student: nn.Module) -> None:
    """Raise on any module that holds parameters/buffers but is not a widenable layer."""
    for path, module in student.named_modules():
        if _layer_kind(module) is not None:
            continue
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        if own:
            raise UnsupportedLayerError(
                f"cannot widen module {path or '<root>'!r} of type {type(module).__name__} "
                f"(holds {', '.join(own)}); supported: Conv2d, Linear, BatchNorm2d, timm BatchNormAct2d "
                "with their standard forward, and parameter-free modules"
            )


def _same_storage(a: Any, b: torch.Tensor) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and a.numel() > 0
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode; restore every submodule's own flag on exit."""
    modes = {m: m.training for module in modules for m in module.modules()}
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _meta_copy(module: nn.Module) -> nn.Module:
    """Deep copy whose parameters and buffers are storage-free ``meta`` tensors (ties kept)."""
    memo: dict[int, Any] = {}
    for t in module.parameters():
        memo[id(t)] = nn.Parameter(t.detach().to("meta"), requires_grad=t.requires_grad)
    for t in module.buffers():
        memo[id(t)] = t.detach().to("meta")
    return copy.deepcopy(module, memo)


@torch.no_grad()
def _trace_roles(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[bool, bool]]:
    """``path -> (expand_in, expand_out)`` from one eval forward with hooks.

    A layer whose input shares storage with the network input keeps its input
    width; one whose output shares storage with a network output keeps its
    output width (a view such as ``flatten`` still counts).
    """
    layers = {path: m for path, m in model.named_modules() if _layer_kind(m) is not None}
    calls: dict[str, list[tuple[bool, torch.Tensor]]] = {path: [] for path in layers}

    def make_hook(path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            calls[path].append((bool(args) and _same_storage(args[0], example_input), output))

        return hook

    handles = [m.register_forward_hook(make_hook(path)) for path, m in layers.items()]
    try:
        with _eval_mode(model):
            outputs = [t for t in tree_flatten(model(example_input))[0] if isinstance(t, torch.Tensor)]
    finally:
        for handle in handles:
            handle.remove()
    roles = {}
    for path, records in calls.items():
        name = f"{path or '<root>'!r} ({type(layers[path]).__name__})"
        if not records:
            raise UnsupportedLayerError(f"layer {name} never ran in the traced forward on the example input")
        flags = {(not reads_input, not any(_same_storage(out, o) for o in outputs)) for reads_input, out in records}
        if len(flags) > 1:
            raise UnsupportedLayerError(f"layer {name} is called both at the network boundary and inside it")
        roles[path] = flags.pop()
    return roles


def _widen(
    module: nn.Module, path: str, role: tuple[bool, bool], ratio: float, noise_std: float, branches: bool
) -> WideLayer:
    expand_in, expand_out = role
    kind = _layer_kind(module)
    if kind == "conv":
        return WideConv2d(
            module, ratio, expand_in=expand_in, expand_out=expand_out, branches=branches, noise_std=noise_std
        )
    if kind == "linear":
        return WideLinear(module, ratio, expand_in=expand_in, expand_out=expand_out, noise_std=noise_std)
    if not (expand_in and expand_out):
        raise UnsupportedLayerError(f"BatchNorm {path!r} reads the network input or writes its output")
    return WideBatchNorm2d(module, ratio, noise_std=noise_std)


def _max_abs_diff(expected: Any, actual: Any) -> float:
    """Max |a - b| over matching tensor leaves; inf if the structures or shapes differ."""
    exp_leaves, exp_spec = tree_flatten(expected)
    act_leaves, act_spec = tree_flatten(actual)
    if exp_spec != act_spec:
        return math.inf
    worst = 0.0
    for e, a in zip(exp_leaves, act_leaves):
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor) or e.shape != a.shape:
                return math.inf
            worst = max(worst, (e.double() - a.double()).abs().max().item() if e.numel() else 0.0)
    return worst


@torch.no_grad()
def _verify(dt: DynamicTeacher, reference: nn.Module, example_input: torch.Tensor, check_wide: bool) -> None:
    """Check in eval mode that the student view (and, without noise, the DT) reproduce the student."""
    with _eval_mode(dt, reference):
        expected = reference(example_input)
        scale = max(
            [1.0]
            + [t.abs().max().item() for t in tree_flatten(expected)[0] if isinstance(t, torch.Tensor) and t.numel()]
        )
        checks = [("student view", dt.forward_student)] + ([("dynamic teacher", dt)] if check_wide else [])
        for name, fn in checks:
            try:
                err = _max_abs_diff(expected, fn(example_input))
            except RuntimeError as exc:
                raise ExpansionCheckError(
                    f"the {name} failed to run on the example input ({exc}); the student probably mixes "
                    "channels in a way the copy construction cannot see (concatenation, reshapes, ...)"
                ) from exc
            if not err <= 1e-4 * scale:
                raise ExpansionCheckError(
                    f"the {name} is not function-preserving: max |diff| = {err:.3g} vs student output scale "
                    f"{scale:.3g}; some operation does not commute with channel copying (concatenation, "
                    "channel attention computed from non-module ops, flatten of spatial maps, ...)"
                )


def expand(
    student: nn.Module,
    ratio: float,
    noise_std: float = 0.0,
    branches: bool = False,
    example_input: torch.Tensor | None = None,
) -> DynamicTeacher:
    """Build the dynamic teacher of ``student`` by IR (Sec. 3.2) with CBR sharing (Sec. 3.3).

    Args:
        student: the network to widen; left untouched (the DT owns copies).
        ratio: width multiplier >= 1 (non-integer allowed; grouped non-depthwise convs need an integer).
        noise_std: std of Gaussian noise added to the DT weights *outside* the student block
            (symmetry breaking; the official code uses 1e-6). The student view stays exact.
        branches: give every 3x3 stride-1 groups-1 conv zero-initialised CBR branches.
        example_input: input used to find the first/last layers and to verify the result;
            default ``randn(2, 3, 32, 32)`` on the student's device and dtype.

    Raises:
        ValueError: ratio < 1 or noise_std < 0.
        UnsupportedLayerError: a module cannot be widened, or a layer does not run on ``example_input``.
        ExpansionCheckError: the result does not reproduce the student on ``example_input`` (eval mode).
    """
    if not (math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"ratio must be a finite number >= 1, got {ratio}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    _check_supported(student)
    if example_input is None:
        tensor = next(iter(student.parameters()), None)
        example_input = torch.randn(
            2,
            3,
            32,
            32,
            device=None if tensor is None else tensor.device,
            dtype=None if tensor is None else tensor.dtype,
        )
    roles = _trace_roles(student, example_input)

    # The layers hold every parameter and buffer (_check_supported), so copying
    # the rest of the tree on ``meta`` and widening from the student's own layers
    # never duplicates the student's weights.
    model = _meta_copy(student)
    originals = dict(student.named_modules())
    wide: dict[int, WideLayer] = {}
    for path, module in model.named_modules():
        if path in roles:
            wide[id(module)] = _widen(originals[path], path, roles[path], ratio, noise_std, branches)
            wide[id(module)].training = module.training
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in wide:
            if path:
                model.set_submodule(path, wide[id(module)])
            else:
                model = wide[id(module)]
    dt = DynamicTeacher(model, _meta_copy(student), ratio)
    _verify(dt, student, example_input, check_wide=noise_std == 0)
    return dt
