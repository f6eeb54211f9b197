"""Hard sharing (GPD Sec. 3.3) for vision transformers: the student is a view of the DT, and extracts exactly."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from test_transformers import build
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from timm.models.vision_transformer import VisionTransformer

from lightning_kd.reparam import DynamicTeacher, WideLayer, WideVisionTransformer, expand, extract_student


def train_both(dt: DynamicTeacher, steps: int = 3) -> None:
    """AdamW on the DT loss plus the student-view loss, one optimizer over dt.parameters()."""
    torch.manual_seed(1)
    opt = torch.optim.AdamW(dt.parameters(), lr=1e-2)
    dt.train()
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        loss = F.cross_entropy(dt(x), y) + F.cross_entropy(dt.forward_student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def copies(channels: int, wide: int) -> torch.Tensor:
    return torch.bincount(torch.arange(wide) % channels).float()


@pytest.mark.parametrize("ratio", [1.5, 2])
def test_vit_student_is_the_scaled_slice_after_training(ratio: float) -> None:
    student = build("vit", torch.float32)
    original = {k: v.clone() for k, v in student.state_dict().items()}
    dt = expand(student, ratio, noise_std=1e-3)
    train_both(dt)
    sd = dt.student_state_dict()
    assert list(sd) == list(student.state_dict())

    attn, dim, heads = dt.model.blocks[1].attn, 48, 3 * 16
    wide_dim, wide_heads = attn.qkv.in_features, attn.num_heads * 16
    qkv = attn.qkv.weight.detach().view(3, wide_heads, wide_dim)[:, :heads, :dim].reshape(3 * heads, dim)
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], qkv * copies(dim, wide_dim))
    bias = attn.qkv.bias.detach().view(3, wide_heads)[:, :heads].reshape(-1)
    assert torch.equal(sd["blocks.1.attn.qkv.bias"], bias)
    proj = attn.proj.weight.detach()[:dim, :heads] * copies(heads, wide_heads)
    assert torch.equal(sd["blocks.1.attn.proj.weight"], proj)
    assert torch.equal(sd["blocks.1.norm1.weight"], dt.model.blocks[1].norm1.weight.detach()[:dim])
    for name in ("cls_token", "pos_embed"):
        wide = getattr(dt.model, name).detach()  # DT mode: the wide parameter itself
        assert wide.shape[-1] == wide_dim and torch.equal(sd[name], wide[..., :dim])
        assert not torch.equal(sd[name], original[name])  # trained through the shared tensor

    extracted = extract_student(dt)
    assert type(extracted) is VisionTransformer
    fresh = build("vit", torch.float32)
    fresh.load_state_dict(sd, strict=True)
    for m in (dt, extracted, fresh):
        m.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = dt.forward_student(x)
        assert (extracted(x) - expected).abs().max().item() <= 1e-5
        assert (fresh(x) - expected).abs().max().item() <= 1e-5
        assert (dt(x) - expected).abs().max().item() > 1e-4  # the DT has moved away from the student
    assert all(torch.equal(original[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("name", ["pvt", "pvt_v2_b0"])
def test_pvt_extracts_the_student_view_after_training(name: str) -> None:
    student = build(name, torch.float32)
    dt = expand(student, 1.5)
    train_both(dt, steps=2)
    extracted = extract_student(dt).eval()
    assert type(extracted) is PyramidVisionTransformerV2
    dt.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (extracted(x) - dt.forward_student(x)).abs().max().item() <= 1e-5


def test_student_loss_gradient_reaches_only_the_shared_block() -> None:
    """dL/dW_DT = n_i dL/dW_S on the student block and 0 elsewhere; embeddings and LN affines: dL/de_S."""
    student = build("vit")
    dt = expand(student, 1.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    dt.forward_student(x).square().sum().backward()
    student(x).square().sum().backward()
    qkv = dt.model.blocks[0].attn.qkv.weight.grad.view(3, 5 * 16, 72)
    expected = student.blocks[0].attn.qkv.weight.grad.view(3, 48, 48) * copies(48, 72).double()
    assert torch.allclose(qkv[:, :48, :48], expected, atol=1e-12)
    assert qkv[:, 48:].abs().max() == 0 and qkv[:, :, 48:].abs().max() == 0
    cls = dt.model.cls_token.grad
    assert torch.allclose(cls[..., :48], student.cls_token.grad, atol=1e-12) and cls[..., 48:].abs().max() == 0
    norm = dt.model.blocks[0].norm1.weight.grad
    assert torch.allclose(norm[:48], student.blocks[0].norm1.weight.grad, atol=1e-12) and norm[48:].abs().max() == 0


def test_dynamic_teacher_state_dict_round_trips_and_pickles() -> None:
    """What StudentExtraction does: rebuild the DT and load the trained state strictly; pickling works too."""
    dt = expand(build("vit", torch.float32), 2)
    train_both(dt, steps=1)
    state = dt.state_dict()
    assert state["model.pos_embed"].shape[-1] == 96
    rebuilt = expand(build("vit", torch.float32), 2)
    rebuilt.load_state_dict(state, strict=True)
    dt.eval()
    rebuilt.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), dt(x)) and torch.equal(rebuilt.forward_student(x), dt.forward_student(x))
        unpickled = pickle.loads(pickle.dumps(dt))
        assert torch.equal(unpickled.forward_student(x), dt.forward_student(x))


def test_noise_perturbs_only_the_dynamic_teacher() -> None:
    student = build("vit")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    clean, noisy = expand(student, 2).eval(), expand(student, 2, noise_std=1e-3).eval()
    clean_sd, noisy_sd = clean.student_state_dict(), noisy.student_state_dict()
    assert all(torch.equal(clean_sd[k], noisy_sd[k]) for k in clean_sd)
    with torch.no_grad():
        y = student(x)
        assert torch.equal(noisy.forward_student(x), clean.forward_student(x))
        assert 1e-6 < (noisy(x) - y).abs().max().item() < 0.1


def test_only_wide_tensors_are_parameters() -> None:
    """Wide layers (the model itself for its embeddings) hold every parameter (~ratio^2 the student's)."""
    student = build("vit")
    dt = expand(student, 3)
    assert isinstance(dt.model, WideVisionTransformer) and dt.student_class is VisionTransformer
    for name, _ in dt.named_parameters():
        assert isinstance(dt.get_submodule(name.rpartition(".")[0]), WideLayer), name
    assert dt.model.cls_token.shape == (1, 1, 144) and dt.model.pos_embed.shape == (1, 17, 144)
    with dt.student_mode():
        assert dt.model.cls_token.shape == (1, 1, 48) and dt.model.pos_embed.shape == (1, 17, 48)
    wide = sum(p.numel() for p in dt.parameters())
    assert 7.5 <= wide / sum(p.numel() for p in student.parameters()) <= 9
    assert all(t.is_meta for t in dt.student_template.state_dict().values())
