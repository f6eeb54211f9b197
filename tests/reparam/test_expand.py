"""Inverse Reparameterization (GPD Sec. 3.2): the dynamic teacher reproduces the student.

Every model/ratio is checked in float32 against 1e-5 relative to the logit
scale (measured worst case: 1.8e-6, mobilenetv2_050 at ratio 3, from float32
accumulation order). Small nets are also checked in float64, where the
construction is exact up to summation order (~1e-15), against 1e-10; float64
depthwise convs are too slow on CPU to do that for the timm models.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from lightning_kd.models import create_model
from lightning_kd.reparam import (
    ExpansionCheckError,
    UnsupportedLayerError,
    WideConv2d,
    WideLayer,
    expand,
    wide_channels,
)

MODELS = ["resnet8", "resnet20", "resnet8x4", "resnet18", "mobilenetv2_050"]


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (defaults would hide tiling bugs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class GroupedNet(nn.Module):
    """Grouped (non-depthwise) conv, depthwise conv, SiLU/GELU, BatchNormAct2d and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=True)
        self.bn2 = BatchNormAct2d(12, act_layer=nn.SiLU)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.stem(x)))
        x = self.bn2(self.grouped(x))
        x = x + F.gelu(self.bn3(self.dw(x)))
        return self.fc(x.mean((2, 3)))


def build(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    model = GroupedNet() if name == "grouped" else create_model(name, num_classes=10)
    return randomize_bn(model).to(dtype).eval()


def check_exact(student: nn.Module, ratio: float, dtype: torch.dtype, rel_tol: float, dense: bool = True) -> None:
    """Outputs match the student; the DT is ~ratio^2 times larger (>= ratio^1 with grouped convs)."""
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    dt = expand(student, ratio, example_input=x).eval()
    with torch.no_grad():
        y = student(x)
        tol = rel_tol * max(1.0, y.abs().max().item())
        assert max_err(dt(x), y) <= tol
        assert max_err(dt.forward_student(x), y) <= tol
    n_student = sum(p.numel() for p in student.parameters())
    n_dt = sum(p.numel() for p in dt.parameters())
    low = 0.85 * (ratio**2 if dense else ratio)
    assert low <= n_dt / n_student <= 1.1 * ratio**2
    for _, layer in dt.wide_layers():
        if isinstance(layer, WideConv2d) and layer.student_in_channels != 3:
            assert layer.in_channels == wide_channels(layer.student_in_channels, ratio)


@pytest.mark.parametrize("ratio", [1.5, 2, 3])
@pytest.mark.parametrize("name", MODELS)
def test_dynamic_teacher_reproduces_student(name: str, ratio: float) -> None:
    torch.manual_seed(0)
    check_exact(build(name, torch.float32), ratio, torch.float32, rel_tol=1e-5)


@pytest.mark.parametrize(("name", "ratio"), [("resnet8", 1.5), ("resnet8", 3), ("grouped", 2), ("grouped", 3)])
def test_exact_up_to_summation_order_in_float64(name: str, ratio: float) -> None:
    torch.manual_seed(0)
    check_exact(build(name), ratio, torch.float64, rel_tol=1e-10, dense=name != "grouped")


def test_grouped_conv_non_integer_ratio_raises() -> None:
    with pytest.raises(UnsupportedLayerError, match="integer ratio"):
        expand(GroupedNet(), 1.5)


def test_ratio_one_is_the_student() -> None:
    student = build("resnet8")
    dt = expand(student, 1)
    assert sum(p.numel() for p in dt.parameters()) == sum(p.numel() for p in student.parameters())
    for key, value in dt.student_state_dict().items():
        assert torch.equal(value, student.state_dict()[key]), key


@pytest.mark.parametrize("name", ["resnet8", "grouped"])
def test_train_mode_matches_at_init(name: str) -> None:
    """Batch statistics of the copies equal the student's; running stats update alike.

    float64: train-mode BN on few samples per channel is ill-conditioned, float32
    rounding differences get amplified to ~1e-4 in deep nets.
    """
    torch.manual_seed(0)
    student = build(name)
    dt = expand(student, 1.5 if name == "resnet8" else 2)
    student.train()
    dt.train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = student(x)
    assert max_err(dt(x), y) <= 1e-10 * max(1.0, y.abs().max().item())
    assert max_err(dt.forward_student(x), y) <= 1e-10 * max(1.0, y.abs().max().item())
    bn_path = next(p for p, m in student.named_modules() if isinstance(m, nn.BatchNorm2d))
    bn, wide = student.get_submodule(bn_path), dt.model.get_submodule(bn_path)
    copies = torch.arange(wide.num_features) % bn.num_features
    assert torch.allclose(wide.running_mean, bn.running_mean[copies], atol=1e-12)
    assert torch.allclose(wide.running_var, bn.running_var[copies], atol=1e-12)
    assert torch.allclose(wide.student_running_mean, bn.running_mean, atol=1e-12)
    assert int(wide.num_batches_tracked) == int(wide.student_num_batches_tracked) == int(bn.num_batches_tracked)


@pytest.mark.parametrize("ratio", [2, 3])
def test_noise_leaves_student_view_exact(ratio: int) -> None:
    torch.manual_seed(0)
    student = build("resnet8")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    clean = expand(student, ratio).eval()
    noisy = expand(student, ratio, noise_std=1e-3).eval()
    clean_sd, noisy_sd = clean.student_state_dict(), noisy.student_state_dict()
    assert all(torch.equal(clean_sd[k], noisy_sd[k]) for k in clean_sd)
    with torch.no_grad():
        y = student(x)
        assert torch.equal(noisy.forward_student(x), clean.forward_student(x))
        assert 1e-6 < max_err(noisy(x), y) < 0.1 * max(1.0, y.abs().max().item())
    if ratio == 2:  # copy counts are powers of two: n * (W / n) is W bit for bit
        assert all(torch.equal(noisy_sd[k], v) for k, v in student.state_dict().items())
    else:
        assert all(torch.allclose(noisy_sd[k], v, rtol=1e-15, atol=0) for k, v in student.state_dict().items())


def test_student_mode_restored_after_error() -> None:
    dt = expand(build("resnet8"), 2)
    with pytest.raises(RuntimeError):
        dt.forward_student(torch.randn(1, 5, 32, 32, dtype=torch.float64))
    assert not any(layer.student_mode for _, layer in dt.wide_layers())


def test_student_is_left_untouched() -> None:
    student = build("resnet8").train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    expand(student, 2, noise_std=1e-3, branches=True)
    assert student.training
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert not any(isinstance(m, WideLayer) for m in student.modules())


class WithGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Sequential(nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class WithConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.flatten(2))


class WithConcat(nn.Module):
    """Channel concatenation of two branches does not commute with channel copying."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


class WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.unused = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    ("net", "match"),
    [(WithGroupNorm, r"head\.0.*GroupNorm"), (WithConv1d, r"'conv'.*Conv1d"), (WithUnusedLayer, "'unused'.*never ran")],
)
def test_unsupported_layers_raise_with_path(net: type[nn.Module], match: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=match):
        expand(net(), 2)


def test_non_commuting_op_fails_the_check() -> None:
    with pytest.raises(ExpansionCheckError, match="dynamic teacher"):
        expand(WithConcat(), 2)


@pytest.mark.parametrize("ratio", [0.5, float("nan")])
def test_ratio_below_one_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        expand(build("resnet8"), ratio)


def test_timm_input_size_64() -> None:
    torch.manual_seed(0)
    student = randomize_bn(timm.create_model("mobilenetv2_050", num_classes=5)).eval()
    x = torch.randn(1, 3, 64, 64)
    dt = expand(student, 1.5, example_input=x).eval()
    with torch.no_grad():
        assert max_err(dt(x), student(x)) <= 1e-5 * max(1.0, student(x).abs().max().item())
