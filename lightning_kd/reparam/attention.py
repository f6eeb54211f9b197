"""Wide multi-head self-attention (timm ``Attention``, PVTv2's ``Attention``): more heads at the same head dim.

The residual stream widens from ``D`` to ``D'`` channels as everywhere else. The attention width ``A = H * d``
(``H`` heads of dimension ``d``) widens to ``A' = H' * d`` with ``H' = ceil(ratio * H)`` whole heads; since
``A'`` is a multiple of ``d``, copying attention channel ``a`` from ``a mod A`` copies whole heads (wide head
``h`` is student head ``h mod H``). The head dimension, hence the softmax scale ``d^-1/2``, is unchanged, so each
wide head computes exactly its student head, and the output projection divides by the head copy counts like any
layer reading copied channels. The fused ``qkv`` projection widens q, k and v separately, so the wide layer is
again a standard ``[q' | k' | v']`` projection with ``H'`` heads (PVTv2: ``q`` and ``[k | v]``). PVTv2's spatial
reduction (a strided conv, or average pooling and a 1x1 conv, then LayerNorm and GELU) works on the residual
stream and widens like any such layer.

Student view (CBR hard sharing, Sec. 3.3): ``qkv`` keeps the leading ``A`` rows of each of q', k', v' and the
leading ``D`` columns (times the stream copy counts), ``proj`` the leading ``D`` rows and ``A`` columns (times the
head copy counts); the student runs with ``H`` heads. The official code (``RVT/gpd_layers.py``,
``DynamicAttention``) multiplies the heads by an integer ratio, lays the wide qkv out as ``r`` concatenated
student ``[q | k | v]`` blocks re-gathered in the forward, and rescales q and k by ``r`` (its activations are
``x / r``); here any ratio works and the wide forward is timm's own computation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.pvt_v2 import Attention as PvtAttention
from torch import nn

from lightning_kd.reparam.conv import WideConv2d
from lightning_kd.reparam.layer import Copies, UnsupportedLayerError, WideLayer, wide_channels
from lightning_kd.reparam.linear import WideLinear
from lightning_kd.reparam.norm import WideLayerNorm

__all__ = ["WideAttention", "WidePvtAttention", "attention_problem", "scaled_dot_product"]


def attention_problem(attn: nn.Module) -> str | None:
    """Why the timm / PVTv2 attention module ``attn`` cannot be widened, or None if it can."""
    base = PvtAttention if isinstance(attn, PvtAttention) else Attention
    if type(attn).forward is not base.forward:
        return f"{type(attn).__name__} overrides {base.__module__}.{base.__name__}.forward"
    if base is PvtAttention:
        return None
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, name), nn.Identity):
            return f"qk / scale normalization ({name}) is not supported"
    if attn.gate is not None:
        return "gated attention is not supported"
    return None


def scaled_dot_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    dropout: nn.Dropout,
    fused: bool,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` over ``(B, heads, N, d)`` tensors, as timm's ``Attention`` computes it."""
    if fused:
        p = dropout.p if dropout.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = maybe_add_mask(attn, resolve_self_attn_mask(q.shape[-2], attn, attn_mask, is_causal))
    return dropout(attn.softmax(dim=-1)) @ v


class _WideHeads(WideLayer):
    """What both wide attentions share: the refusal of unsupported variants and ``ceil(ratio * H)`` heads."""

    def _widen_heads(self, attn: nn.Module, ratio: float) -> None:
        problem = attention_problem(attn)
        if problem:
            raise UnsupportedLayerError(problem)
        self.student_num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.num_heads = wide_channels(attn.num_heads, ratio)
        self.scale, self.fused_attn = attn.scale, attn.fused_attn


class WideAttention(_WideHeads):
    """Wide timm ``Attention`` with ``ceil(ratio * H)`` heads; ``qkv`` / ``proj`` are :class:`WideLinear`.

    Masks must broadcast over the head dimension (the wide and the student view have different head counts).
    """

    def __init__(self, attn: Attention, ratio: float, *, noise_std: float = 0.0) -> None:
        super().__init__()
        self._widen_heads(attn, ratio)
        heads = Copies(attn.attn_dim, self.num_heads * self.head_dim)
        self.qkv = WideLinear(
            attn.qkv, Copies(heads.channels, heads.wide, chunks=3), Copies.widen(attn.qkv.in_features, ratio),
            noise_std=noise_std,
        )
        self.attn_drop = copy.deepcopy(attn.attn_drop)
        self.proj = WideLinear(attn.proj, Copies.widen(attn.proj.out_features, ratio), heads, noise_std=noise_std)
        self.proj_drop = copy.deepcopy(attn.proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        batch, tokens, _ = x.shape
        heads = self.student_num_heads if self.student_mode else self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = scaled_dot_product(q, k, v, self.scale, self.attn_drop, self.fused_attn, attn_mask, is_causal)
        x = x.transpose(1, 2).reshape(batch, tokens, heads * self.head_dim)
        return self.proj_drop(self.proj(x))

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # held by the qkv / proj children

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, student_heads={self.student_num_heads}"


class WidePvtAttention(_WideHeads):
    """Wide PVTv2 spatial-reduction attention with ``ceil(ratio * H)`` heads; ``q`` / ``kv`` / ``proj`` are
    :class:`WideLinear`, the reduction ``sr`` a :class:`WideConv2d` and ``norm`` a :class:`WideLayerNorm`."""

    def __init__(self, attn: PvtAttention, ratio: float, *, noise_std: float = 0.0) -> None:
        super().__init__()
        self._widen_heads(attn, ratio)
        stream, heads = Copies.widen(attn.dim, ratio), Copies(attn.dim, self.num_heads * self.head_dim)
        self.q = WideLinear(attn.q, heads, stream, noise_std=noise_std)
        self.kv = WideLinear(attn.kv, Copies(heads.channels, heads.wide, chunks=2), stream, noise_std=noise_std)
        self.attn_drop = copy.deepcopy(attn.attn_drop)
        self.proj = WideLinear(attn.proj, stream, heads, noise_std=noise_std)
        self.proj_drop = copy.deepcopy(attn.proj_drop)
        self.pool, self.act = copy.deepcopy(attn.pool), copy.deepcopy(attn.act)
        self.sr = self.norm = None
        if attn.sr is not None:
            self.sr = WideConv2d(attn.sr, ratio, expand_in=True, expand_out=True, noise_std=noise_std)
            self.norm = WideLayerNorm(attn.norm, stream, noise_std=noise_std)

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        batch, tokens, channels = x.shape
        heads = self.student_num_heads if self.student_mode else self.num_heads
        q = self.q(x).reshape(batch, tokens, heads, self.head_dim).permute(0, 2, 1, 3)
        if self.sr is not None:
            x = x.permute(0, 2, 1).reshape(batch, channels, *feat_size)
            x = self.sr(x if self.pool is None else self.pool(x)).reshape(batch, channels, -1).permute(0, 2, 1)
            x = self.norm(x)
            x = x if self.act is None else self.act(x)
        kv = self.kv(x).reshape(batch, -1, 2, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = scaled_dot_product(q, k, v, self.scale, self.attn_drop, self.fused_attn)
        x = x.transpose(1, 2).reshape(batch, tokens, heads * self.head_dim)
        return self.proj_drop(self.proj(x))

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # held by the projection, reduction and norm children

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, student_heads={self.student_num_heads}"
