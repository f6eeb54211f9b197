"""Hard sharing (GPD Sec. 3.3) survives training, and the student extracts exactly."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from lightning_kd.models import create_model
from lightning_kd.reparam import DynamicTeacher, expand, extract_student


class TinyNet(nn.Module):
    """Biased stem, ReLU6/GELU as functions, 1x1 projection add, depthwise + BatchNormAct2d(SiLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 10, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.proj = nn.Conv2d(6, 10, 1)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10, bias=False)
        self.bn3 = BatchNormAct2d(10, act_layer=nn.SiLU)
        self.fc = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.stem(x)))
        x = F.gelu(self.bn2(self.conv(x))) + self.proj(x)
        return self.fc(self.bn3(self.dw(x)).mean((2, 3)))


def train_both(dt: DynamicTeacher, steps: int = 4, classes: int = 5) -> None:
    """SGD on the DT loss plus the student-view loss, one optimizer over dt.parameters()."""
    torch.manual_seed(1)
    opt = torch.optim.SGD(dt.parameters(), lr=0.1, momentum=0.9)
    dt.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, classes, (8,))
        loss = F.cross_entropy(dt(x), y) + F.cross_entropy(dt.forward_student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize(("name", "ratio"), [("tiny", 1.5), ("resnet8", 2)])
def test_sharing_invariant_and_extraction_after_training(name: str, ratio: float) -> None:
    torch.manual_seed(0)
    student = TinyNet() if name == "tiny" else create_model(name, num_classes=5)
    original = {k: v.clone() for k, v in student.state_dict().items()}
    dt = expand(student, ratio)
    train_both(dt)

    sd = dt.student_state_dict()
    assert list(sd) == list(student.state_dict())
    # One conv by hand: W_S[o, i] = n_i * W_DT[o, i], n_i = copies of input channel i.
    path = "conv" if name == "tiny" else "layer1.0.conv2"
    ref = student.get_submodule(path)
    wide = dt.model.get_submodule(path).weight.detach()
    copies = torch.bincount(torch.arange(wide.shape[1]) % ref.in_channels).float()
    assert not torch.equal(wide[: ref.out_channels, : ref.in_channels] * copies.view(1, -1, 1, 1),
                           original[f"{path}.weight"])
    assert torch.equal(sd[f"{path}.weight"], wide[: ref.out_channels, : ref.in_channels] * copies.view(1, -1, 1, 1))
    bn_path = "bn2" if name == "tiny" else "layer1.0.bn2"
    wide_bn = dt.model.get_submodule(bn_path)
    c = student.get_submodule(bn_path).num_features
    assert torch.equal(sd[f"{bn_path}.weight"], wide_bn.weight.detach()[:c])
    assert torch.equal(sd[f"{bn_path}.running_mean"], wide_bn.student_running_mean)
    assert int(sd[f"{bn_path}.num_batches_tracked"]) == 4

    extracted = extract_student(dt)
    assert type(extracted) is type(student)
    fresh = TinyNet() if name == "tiny" else create_model(name, num_classes=5)
    fresh.load_state_dict(sd, strict=True)
    dt.eval()
    extracted.eval()
    fresh.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = dt.forward_student(x)
        assert (extracted(x) - expected).abs().max().item() <= 1e-5
        assert (fresh(x) - expected).abs().max().item() <= 1e-5
        assert (dt(x) - expected).abs().max().item() > 1e-4  # the DT has moved away from the student
    assert all(torch.equal(original[k], v) for k, v in student.state_dict().items())


def test_student_loss_gradient_reaches_only_the_shared_block() -> None:
    """dL/dW_DT = n_i * dL/dW_S inside the student block and 0 outside (CBR hard sharing)."""
    torch.manual_seed(0)
    student = TinyNet()
    dt = expand(student, 1.5)
    x = torch.randn(2, 3, 8, 8)
    dt.forward_student(x).square().sum().backward()
    student(x).square().sum().backward()
    grad = dt.model.conv.weight.grad
    copies = torch.tensor([2.0, 2, 2, 1, 1, 1]).view(1, -1, 1, 1)
    assert torch.allclose(grad[:10, :6], copies * student.conv.weight.grad, rtol=1e-4, atol=1e-6)
    assert grad[10:].abs().max() == 0 and grad[:, 6:].abs().max() == 0
    assert torch.allclose(dt.model.bn3.weight.grad[:10], student.bn3.weight.grad, rtol=1e-4, atol=1e-6)
    assert dt.model.bn3.weight.grad[10:].abs().max() == 0


def test_template_adds_no_parameters_or_state() -> None:
    student = TinyNet()
    dt = expand(student, 2)
    wide_params = sum(p.numel() for _, layer in dt.wide_layers() for p in layer.parameters())
    assert sum(p.numel() for p in dt.parameters()) == wide_params
    assert all(key.startswith("model.") for key in dt.state_dict())
    assert all(t.is_meta for t in dt.student_template.state_dict().values())
    assert dt.student_class is TinyNet and dt.ratio == 2.0


def test_extraction_keeps_layer_types_and_modes() -> None:
    dt = expand(TinyNet(), 1.5)
    dt.eval()
    extracted = extract_student(dt)
    assert not extracted.training
    assert type(extracted.conv) is nn.Conv2d and extracted.conv.in_channels == 6
    assert type(extracted.bn3) is BatchNormAct2d and isinstance(extracted.bn3.act, nn.SiLU)
    assert extracted.dw.groups == 10
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in extracted.parameters())
    dt.train()
    assert extract_student(dt).training
    assert not any(t.is_meta for t in extracted.state_dict().values())


def test_extracted_student_owns_its_tensors() -> None:
    dt = expand(TinyNet(), 1.5)
    before = {k: v.clone() for k, v in dt.state_dict().items()}
    extracted = extract_student(dt)
    with torch.no_grad():
        for t in [*extracted.parameters(), *extracted.buffers()]:
            t.add_(1)
    assert all(torch.equal(before[k], v) for k, v in dt.state_dict().items())


def test_running_stats_are_per_mode() -> None:
    dt = expand(TinyNet(), 2).train()
    bn = dt.model.bn2
    student_mean, wide_mean = bn.student_running_mean.clone(), bn.running_mean.clone()
    with torch.no_grad():
        dt(torch.randn(4, 3, 8, 8))
    assert torch.equal(bn.student_running_mean, student_mean)
    assert not torch.equal(bn.running_mean, wide_mean)
    wide_mean = bn.running_mean.clone()
    with torch.no_grad():
        dt.forward_student(torch.randn(4, 3, 8, 8))
    assert torch.equal(bn.running_mean, wide_mean)
    assert not torch.equal(bn.student_running_mean, student_mean)


def test_extract_timm_resnet18_is_fast_and_exact() -> None:
    torch.manual_seed(0)
    dt = expand(create_model("resnet18", num_classes=10), 2).eval()
    start = time.perf_counter()
    extracted = extract_student(dt)
    assert time.perf_counter() - start < 5.0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (extracted(x) - dt.forward_student(x)).abs().max().item() <= 1e-5
