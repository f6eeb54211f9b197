"""Inverse Reparameterization of vision transformers (GPD Sec. 3.2): the dynamic teacher reproduces the student.

Models: a 2-block ViT (embed 48, 3 heads of 16, patch 8 on 32x32), timm's ``vit_tiny_patch16_224`` built for
32x32 images with patch 4, a 2-stage PVTv2 and timm's ``pvt_v2_b0`` (hierarchical: spatial-reduction attention,
depthwise-conv MLP, overlapping patch embeddings). Parameters are perturbed so that LayerNorm affines, tokens and
position embeddings are not at their trivial init. Ratio 1.5 gives 5 heads from 3 (whole heads) and a weighted
LayerNorm; 2 and 3 plain LayerNorms.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

from lightning_kd.reparam import (
    UnsupportedLayerError,
    WideAttention,
    WideLayerNorm,
    expand,
    weighted_layer_norm,
)

RATIOS = [1.5, 2, 3]


def small_vit(**kwargs) -> nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10) | kwargs
    return VisionTransformer(**args)


def small_pvt(**kwargs) -> nn.Module:
    args = dict(depths=(1, 1), embed_dims=(16, 40), num_heads=(1, 5), sr_ratios=(2, 1), mlp_ratios=(2, 2))
    return PyramidVisionTransformerV2(num_classes=10, **(args | kwargs))


BUILDERS = {
    "vit": small_vit,
    "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10),
    "pvt": small_pvt,
    "pvt_v2_b0": lambda: timm.create_model("pvt_v2_b0", num_classes=10),
}


def build(name: str, dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[name](**kwargs) if kwargs else BUILDERS[name]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_exact(student: nn.Module, ratio: float, tol: float, train: bool = False) -> None:
    """DT and student view equal the student on one input, eval mode (or train mode, same RNG)."""
    dtype = next(student.parameters()).dtype
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    dt = expand(student, ratio, example_input=x)
    student.train(train)
    dt.train(train)
    with torch.no_grad():
        torch.manual_seed(1)
        y = student(x)
        torch.manual_seed(1)
        assert max_err(dt(x), y) <= tol
        torch.manual_seed(1)
        assert max_err(dt.forward_student(x), y) <= tol


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_float32_eval_within_1e_5(name: str, ratio: float) -> None:
    check_exact(build(name, torch.float32), ratio, tol=1e-5)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", ["vit", "pvt", "pvt_v2_b0"])
def test_float64_eval_within_1e_12(name: str, ratio: float) -> None:
    check_exact(build(name), ratio, tol=1e-12)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", ["vit", "pvt"])
def test_train_mode_without_dropout(name: str, ratio: float) -> None:
    """Dropout and drop-path at 0: train mode is exact too (LayerNorm has no batch statistics)."""
    check_exact(build(name), ratio, tol=1e-12, train=True)


@pytest.mark.parametrize("ratio", RATIOS)
def test_train_mode_drop_path_with_the_same_rng(ratio: float) -> None:
    """Drop-path draws one mask entry per sample, the same shape in both widths: exact under the same seed.

    (Elementwise dropout is not: the wide tensor draws a different mask; the student view still matches.)
    """
    check_exact(build("vit", drop_path_rate=0.3), ratio, tol=1e-12, train=True)


@pytest.mark.parametrize(
    "variant",
    [
        {"global_pool": "avg"},  # fc_norm after pooling instead of norm
        {"class_token": False, "global_pool": "avg"},
        {"reg_tokens": 2},
        {"no_embed_class": True},
        {"init_values": 0.1},  # LayerScale
        {"pre_norm": True},  # norm_pre, patch embedding without bias
        {"qkv_bias": False, "mlp_ratio": 2.5},
        {"dynamic_img_size": True},  # position embeddings resampled per input
    ],
    ids=lambda v: ",".join(v),
)
def test_vit_variants_at_a_non_integer_ratio(variant: dict) -> None:
    check_exact(build("vit", **variant), 1.5, tol=1e-12)


def test_pvt_linear_attention_variant() -> None:
    check_exact(build("pvt", linear=True), 1.5, tol=1e-12)


@pytest.mark.parametrize("name", ["vit", "pvt"])
def test_unfused_attention_path(name: str) -> None:
    """timm's explicit softmax path (``fused_attn = False``) is mirrored as well as SDPA."""
    student = build(name)
    attentions = [m for m in student.modules() if hasattr(m, "fused_attn")]
    assert attentions
    for m in attentions:
        m.fused_attn = False
    check_exact(student, 1.5, tol=1e-12)
    assert not any(m.fused_attn for m in expand(student, 1.5).modules() if hasattr(m, "fused_attn"))


@pytest.mark.parametrize(("ratio", "heads"), [(1.5, 5), (2, 6), (3, 9)])
def test_attention_copies_whole_heads(ratio: float, heads: int) -> None:
    """Wide head h is student head h mod H at the same head dim; qkv is [q' | k' | v'] of H' heads."""
    student = build("vit")
    dt = expand(student, ratio)
    attn: WideAttention = dt.model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.student_num_heads) == (heads, 16, 3)
    dim, wide_dim = 48, math.ceil(ratio * 48)
    w = student.blocks[0].attn.qkv.weight.detach().view(3, 3, 16, dim)
    wide = attn.qkv.weight.detach().view(3, heads, 16, wide_dim)
    copies = torch.bincount(torch.arange(wide_dim) % dim).double()
    for h in range(heads):
        for j in range(wide_dim):
            assert torch.allclose(wide[:, h, :, j], w[:, h % 3, :, j % dim] / copies[j % dim], atol=1e-15)


@pytest.mark.parametrize(("ratio", "weighted"), [(1.5, True), (2, False), (3, False)])
def test_layer_norm_is_weighted_only_at_non_integer_ratios(ratio: float, weighted: bool) -> None:
    dt = expand(build("vit"), ratio)
    norms = [layer for _, layer in dt.wide_layers() if isinstance(layer, WideLayerNorm)]
    assert len(norms) == 5 and all((n.mean_weights is not None) == weighted for n in norms)


def test_weighted_layer_norm_of_copies_is_the_student_layer_norm() -> None:
    """Channel j weighted by 1 / (C n_{m(j)}): mean and variance of the copies are the student's."""
    torch.manual_seed(0)
    c, wide = 5, 8
    index = torch.arange(wide) % c
    counts = torch.bincount(index).double()
    x, weight, bias = torch.randn(3, 4, c, dtype=torch.float64), torch.randn(c).double(), torch.randn(c).double()
    expected = F.layer_norm(x, (c,), weight, bias, 1e-6)[..., index]
    got = weighted_layer_norm(x[..., index], 1 / (c * counts[index]), weight[index], bias[index], 1e-6)
    assert torch.allclose(got, expected, atol=1e-14)
    assert not torch.allclose(F.layer_norm(x[..., index], (wide,), weight[index], bias[index], 1e-6), expected)
    uniform = torch.full((c,), 1 / c, dtype=torch.float64)
    assert torch.allclose(weighted_layer_norm(x, uniform, None, None, 1e-6), F.layer_norm(x, (c,), eps=1e-6))


def test_ratio_one_is_the_student() -> None:
    student = build("vit")
    dt = expand(student, 1)
    for key, value in dt.student_state_dict().items():
        assert torch.equal(value, student.state_dict()[key]), key


def small_swin() -> nn.Module:
    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(1,), num_heads=(3,))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (small_swin, r"'layers\.0\.blocks\.0\.attn' of type WindowAttention \(holds relative_position_bias_table"),
        (lambda: VisionTransformerRelPos(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3),
         r"'blocks\.0\.attn' of type RelPosAttention"),
        (lambda: small_vit(qk_norm=True), r"'blocks\.0\.attn' of type Attention: qk / scale normalization"),
        (lambda: small_vit(global_pool="map"), r"'attn_pool' of type AttentionPoolLatent \(holds latent\)"),
        (lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8),
         r"'<root>' of type VisionTransformerDistilled \(holds cls_token, pos_embed, dist_token\)"),
    ],
    ids=["swin-relative-position-bias", "relpos-vit", "qk-norm", "attention-pool", "distilled-token"],
)
def test_unsupported_transformer_layers_name_the_first_one(make, match: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=match):
        expand(make(), 2)
