"""Inverse Reparameterization: widen a student into a dynamic teacher that shares it (GPD).

Gap Preserving Distillation (Guo et al., ICLR 2025, arXiv 2410.04140) trains a *dynamic teacher* (DT) from
scratch next to the student. Inverse Reparameterization (IR, Sec. 3.2) initialises the DT as a wider copy of the
student that computes exactly the same function; Channel-Branch Reparameterization (CBR, Sec. 3.3) makes the
student a sub-network of the DT so that both are trained through one set of parameters ("hard sharing").

Construction (Net2WiderNet style)
---------------------------------
A hidden tensor with ``C`` channels gets ``C' = ceil(ratio * C)`` channels in the DT; wide channel ``j`` is a
*copy* of student channel ``m(j) = j mod C`` and ``n_c`` counts the copies of channel ``c``. Every hidden
activation of the DT is the copy-expansion of the student's: a layer reading copied channels divides its weights
by ``n`` (``W'[o', j] = W[m(o'), m(j)] / n_{m(j)}``), per-channel tensors are tiled by ``m``. The layer reading
the network input keeps its input width, the one writing the network output its output width. One file per layer
family holds the exact rule: ``conv`` (dense, depthwise, grouped), ``linear``, ``norm`` (BatchNorm, LayerNorm,
LayerScale), ``attention`` (timm and PVTv2 multi-head attention: more heads at the same head dimension),
``embed`` (a ViT's class / register tokens and position embeddings).

Because copies are identical, elementwise activations, residual additions, pooling and token reshapes commute
with the expansion: the construction is exact for *any* elementwise activation (ReLU6, SiLU, GELU), for BN with a
fused activation, and for non-integer ratios (LayerNorm then weights each copy by ``1 / n``). The official code
(``CNN/`` and ``RVT/gpd_utils.py``, ``gpd_layers.py``) instead divides each output copy by ``r`` so wide
activations are ``x / r`` and evaluates BN / LayerNorm / GELU / attention logits on ``r * x``; that needs integer
ratios (copies are concatenated ``r`` times) and, for the activations between, ``act(x / r) == act(x) / r``
(ReLU only; the official code rescales GELU's input explicitly).

Limits: only the layers above, with their standard forward, hold state; anything else with parameters or
buffers, and any other attention module, raises ``UnsupportedLayerError`` naming the first such module.
Operations that do not commute with channel copying (channel concatenation, channel attention from functional
ops) are caught by the check ``expand`` runs on the example input (``ExpansionCheckError``).

Student view (CBR, Sec. 3.3)
----------------------------
Only the DT's parameters exist. Each wide layer computes the student's tensors from them in ``forward`` when in
student mode: ``W_S[o, i] = n_i * W'[o, i]`` on the student block (the leading ``C_o`` rows and ``C_i`` columns;
per q / k / v for attention), ``b_S = b'[:C_o]``, per-channel affines and embeddings ``[..., :C]``. At init this
is the original student (bit for bit where every ``n_i`` is a power of two, else up to one rounding of
``n * (W / n)``); ``noise_std`` perturbs only entries outside the student block. Gradients of the student loss
flow into the shared DT parameters, so one optimizer over ``dt.parameters()`` trains both: the paper's rule
"student = slice of the DT scaled by r" with the scale put on the input copy count. BN running statistics are not
shared: the student keeps its own buffers, updated only by student-mode train forwards.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from timm.layers import Attention, BatchNormAct2d, LayerNorm, LayerScale
from timm.models.pvt_v2 import Attention as PvtAttention
from torch import nn
from torch.utils._pytree import tree_flatten

from lightning_kd.reparam.attention import WideAttention, WidePvtAttention, attention_problem
from lightning_kd.reparam.conv import WideConv2d
from lightning_kd.reparam.embed import embedding_names, has_embeddings, widen_embeddings
from lightning_kd.reparam.layer import Copies, UnsupportedLayerError, WideLayer, wide_channels
from lightning_kd.reparam.linear import WideLinear
from lightning_kd.reparam.norm import WideBatchNorm2d, WideLayerNorm, WideLayerScale
from lightning_kd.reparam.teacher import DynamicTeacher

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


class ExpansionCheckError(ValueError):
    """The built dynamic teacher does not reproduce the student on the example input."""


_LAYER_NORMS = (nn.LayerNorm.forward, LayerNorm.forward)


def _layer_kind(module: nn.Module) -> str | None:
    """The family of a layer we widen (standard forward only), else None."""
    forward = type(module).forward
    if isinstance(module, nn.Conv2d) and forward is nn.Conv2d.forward:
        return "conv"
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.BatchNorm2d) and forward in (nn.BatchNorm2d.forward, BatchNormAct2d.forward):
        return "bn"
    if isinstance(module, nn.LayerNorm) and forward in _LAYER_NORMS and len(module.normalized_shape) == 1:
        return "ln"
    if isinstance(module, LayerScale) and forward is LayerScale.forward:
        return "layerscale"
    if isinstance(module, (Attention, PvtAttention)):
        return "attention"
    return None


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """``path -> layer`` for the layers to widen; an attention layer's projections belong to it."""
    layers: dict[str, nn.Module] = {}
    units: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(unit) for unit in units):
            continue
        kind = _layer_kind(module)
        if kind is not None:
            layers[path] = module
        if kind == "attention":
            units.append(f"{path}." if path else "")
    return layers


def _check_supported(student: nn.Module) -> None:
    """Raise on the first module that holds state (or is an attention) but cannot be widened."""
    layers = _layers(student)
    for path, module in student.named_modules():
        name = f"module {path or '<root>'!r} of type {type(module).__name__}"
        if path in layers:
            problem = attention_problem(module) if _layer_kind(module) == "attention" else None
            if problem:
                raise UnsupportedLayerError(f"cannot widen {name}: {problem}")
            continue
        if any(path.startswith(f"{unit}.") for unit in layers):
            continue
        embeddings = embedding_names(module)
        own = [n for n, _ in module.named_parameters(recurse=False) if n not in embeddings]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        holds = f" (holds {', '.join(own)})" if own else ""
        if type(module).__name__.endswith("Attention"):
            raise UnsupportedLayerError(
                f"cannot widen {name}{holds}: of the attention modules only timm's Attention and PVTv2's are "
                "supported (the head reshapes and per-head tensors of others do not commute with channel copying)"
            )
        if own:
            raise UnsupportedLayerError(
                f"cannot widen {name}{holds}; supported: Conv2d, Linear, BatchNorm2d, timm BatchNormAct2d, "
                "LayerNorm, timm LayerScale, timm and PVTv2 Attention with their standard forward, the cls / "
                "register tokens and position embeddings of timm's VisionTransformer, and parameter-free modules"
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
    layers = _layers(model)
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
        out, inp = module.out_features, module.in_features
        out_copies = Copies.widen(out, ratio) if expand_out else Copies.keep(out)
        return WideLinear(
            module, out_copies, Copies.widen(inp, ratio) if expand_in else Copies.keep(inp), noise_std=noise_std
        )
    if not (expand_in and expand_out):
        raise UnsupportedLayerError(f"{type(module).__name__} {path!r} reads the network input or writes its output")
    if kind == "bn":
        return WideBatchNorm2d(module, ratio, noise_std=noise_std)
    if kind == "ln":
        return WideLayerNorm(module, Copies.widen(module.normalized_shape[0], ratio), noise_std=noise_std)
    if kind == "layerscale":
        return WideLayerScale(module, Copies.widen(module.gamma.shape[0], ratio), noise_std=noise_std)
    if isinstance(module, PvtAttention):
        return WidePvtAttention(module, ratio, noise_std=noise_std)
    return WideAttention(module, ratio, noise_std=noise_std)


def _copy_modes(layer: nn.Module, original: nn.Module) -> None:
    """Train/eval flags of ``original``'s submodules onto ``layer``'s at the same paths (else ``original``'s)."""
    modes = {path: m.training for path, m in original.named_modules()}
    for path, m in layer.named_modules():
        m.training = modes.get(path, original.training)


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
                    "channel attention computed from non-module ops, channels-last flattening, ...)"
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
        ratio: width multiplier >= 1 (non-integer allowed; grouped non-depthwise convs need an integer;
            attention gets ``ceil(ratio * heads)`` whole heads).
        noise_std: std of Gaussian noise added to the DT weights *outside* the student block
            (symmetry breaking; the official code uses 1e-6). The student view stays exact.
        branches: give every 3x3 stride-1 groups-1 conv zero-initialised CBR branches (Linear layers
            get none: see :mod:`lightning_kd.reparam.linear`; a ViT has no such conv).
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
        like = next(iter(student.parameters()), torch.empty(0))
        example_input = torch.randn(2, 3, 32, 32, device=like.device, dtype=like.dtype)
    roles = _trace_roles(student, example_input)

    # The layers and the embeddings hold every parameter and buffer (_check_supported), so
    # copying the rest of the tree on ``meta`` and widening from the student's own tensors
    # never duplicates the student's weights.
    model = _meta_copy(student)
    originals = dict(student.named_modules())
    wide: dict[int, WideLayer] = {}
    for path, module in model.named_modules():
        if path in roles:
            wide[id(module)] = _widen(originals[path], path, roles[path], ratio, noise_std, branches)
            _copy_modes(wide[id(module)], originals[path])
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in wide:
            if path:
                model.set_submodule(path, wide[id(module)])
            else:
                model = wide[id(module)]
    for path, module in originals.items():
        if has_embeddings(module):
            widen_embeddings(model.get_submodule(path), module, ratio, noise_std)
    leftover = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"dynamic teacher tensors that no wide layer set: {leftover}")
    dt = DynamicTeacher(model, _meta_copy(student), ratio)
    _verify(dt, student, example_input, check_wide=noise_std == 0)
    return dt
