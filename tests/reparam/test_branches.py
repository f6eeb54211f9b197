"""CBR branches (GPD Sec. 3.3): merged into one 3x3 kernel, zero at init, shared by slicing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.models import create_model
from lightning_kd.reparam import ConvBranches, WideConv2d, expand, extract_student


class BranchNet(nn.Module):
    """Two 3x3 stride-1 convs get branches; the stride-2 and 1x1 convs do not."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 10, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.down = nn.Conv2d(10, 10, 3, stride=2, padding=1)
        self.pw = nn.Conv2d(10, 10, 1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.stem(x)))
        x = F.silu(self.bn2(self.conv(x)))
        return self.fc(self.pw(F.relu(self.down(x))).mean((2, 3)))


def test_branches_only_on_3x3_stride1_dense_convs() -> None:
    dt = expand(BranchNet(), 1.5, branches=True)
    with_branches = {path for path, layer in dt.wide_layers() if getattr(layer, "branches", None) is not None}
    assert with_branches == {"stem", "conv"}
    assert dt.model.conv.branches.pointwise.shape == (15, 9)


def test_merged_kernel_equals_running_the_branches() -> None:
    """pad(W_1x1) + W_avg * U_3x3 is a 1x1 conv plus 1x1 conv -> 3x3 average pooling."""
    torch.manual_seed(0)
    branches = ConvBranches(4, 3, dtype=torch.float64)
    with torch.no_grad():
        branches.pointwise.normal_()
        branches.avg.normal_()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    merged = F.conv2d(x, branches.delta(), padding=1)
    pointwise = F.conv2d(x, branches.pointwise[:, :, None, None])
    pooled = F.avg_pool2d(F.conv2d(x, branches.avg[:, :, None, None]), 3, stride=1, padding=1, count_include_pad=True)
    assert torch.allclose(merged, pointwise + pooled, atol=1e-12)


@pytest.mark.parametrize(("name", "ratio"), [("branchnet", 1.5), ("resnet8", 2)])
def test_branches_preserve_function_at_init(name: str, ratio: float) -> None:
    torch.manual_seed(0)
    student = (BranchNet() if name == "branchnet" else create_model(name, num_classes=5)).eval()
    dt = expand(student, ratio, branches=True).eval()
    assert any(isinstance(m, ConvBranches) for m in dt.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = student(x)
        assert (dt(x) - y).abs().max().item() <= 1e-5
        assert (dt.forward_student(x) - y).abs().max().item() <= 1e-5


def test_trained_branches_merge_into_the_extracted_student() -> None:
    torch.manual_seed(0)
    dt = expand(BranchNet(), 1.5, branches=True)
    opt = torch.optim.SGD(dt.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))
        loss = F.cross_entropy(dt(x), y) + F.cross_entropy(dt.forward_student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    conv: WideConv2d = dt.model.conv
    assert conv.branches.pointwise.abs().max() > 0 and conv.branches.avg.abs().max() > 0
    # Student kernel by hand: n_i * (W + pad(P) + A * U)[:C_o, :C_i], n = copies of 6 channels in 9.
    w, p, a = conv.weight.detach(), conv.branches.pointwise.detach(), conv.branches.avg.detach()
    merged = w + F.pad(p[:, :, None, None], (1, 1, 1, 1)) + a[:, :, None, None] / 9.0
    copies = torch.tensor([2.0, 2, 2, 1, 1, 1]).view(1, -1, 1, 1)
    expected = merged[:10, :6] * copies
    assert torch.allclose(dt.student_state_dict()["conv.weight"], expected, atol=1e-7)

    extracted = extract_student(dt)
    assert type(extracted.conv) is nn.Conv2d
    dt.eval()
    extracted.eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert (extracted(x) - dt.forward_student(x)).abs().max().item() <= 1e-5
