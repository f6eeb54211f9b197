"""load_teacher for every supported format, its errors, and teacher fingerprints.

The shared teacher tests read ``cifar10_resnet20_teacher.{pt2,ts.pt,state_dict.pt}`` from the shared data folder
(``$LKD_DATA_DIR`` or ``../shared/data``); a missing file fails them. ``LKD_SKIP_SHARED_TEACHER=1`` skips them
instead: set only by CI (.github/workflows/ci.yml), which has no shared folder. The slow test
(``pytest -m slow``) checks the shared teacher's published test accuracy on all 10,000 test images (~60 s).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_kd.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from lightning_kd.data.plan import resolve_teacher
from lightning_kd.models import create_model
from lightning_kd.models.hooks import capture
from lightning_kd.modules import Supervised
from lightning_kd.teachers import FrozenTeacher, load_teacher, teacher_fingerprint

TEACHER = "cifar10_resnet20_teacher"
SHARED_ACCURACY = 0.8779


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def shared(request) -> Path:
    """The shared data folder holding the exported teacher (skipped only with LKD_SKIP_SHARED_TEACHER=1)."""
    if os.environ.get("LKD_SKIP_SHARED_TEACHER") == "1":
        pytest.skip("LKD_SKIP_SHARED_TEACHER=1: no shared teacher files here (CI)")
    folder = request.getfixturevalue("data_dir")
    missing = [s for s in (".pt2", ".ts.pt", ".state_dict.pt") if not (folder / f"{TEACHER}{s}").is_file()]
    if missing:
        pytest.fail(f"shared teacher files missing in {folder}: {missing}", pytrace=False)
    return folder


@pytest.fixture(scope="module")
def exported(shared) -> tuple[FrozenTeacher, FrozenTeacher]:
    """The shared teacher loaded from its ``.pt2`` and its TorchScript file (loaded once: ~3 s for the .pt2)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
        return load_teacher(shared / f"{TEACHER}.pt2"), load_teacher(str(shared / f"{TEACHER}.ts.pt"))


@pytest.fixture(scope="module")
def test_batch(cifar) -> dict[str, torch.Tensor]:
    """100 real test images spread over all classes: normalized ``input`` plus ``raw`` RGB in [0, 1]."""
    ds = cifar.test_dataset()
    batch = ds.__getitems__(list(range(0, 10_000, 100)))
    batch["raw"] = _unnormalize(batch["input"]).clamp_(0, 1)
    return batch


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float((logits.argmax(1) == target).float().mean())


# -- exported files -------------------------------------------------------------------------------------------------


def test_exported_and_torchscript_teachers_agree(shared, exported, test_batch):
    pt2, ts = shared / f"{TEACHER}.pt2", shared / f"{TEACHER}.ts.pt"
    t_pt2, t_ts = exported
    assert isinstance(t_pt2, FrozenTeacher) and isinstance(t_ts, FrozenTeacher)
    assert t_pt2.fingerprint == "sha256:" + _sha256(pt2) and teacher_fingerprint(t_pt2) == t_pt2.fingerprint
    assert t_ts.fingerprint == "sha256:" + _sha256(ts) and t_ts.fingerprint != t_pt2.fingerprint
    assert t_pt2.source == str(pt2)
    x = test_batch["raw"]
    with torch.no_grad():
        out_pt2, out_ts = t_pt2(x), t_ts(x)
    assert out_pt2.shape == (len(x), 10) and out_pt2.dtype == torch.float32
    assert torch.allclose(out_pt2, out_ts, atol=1e-4, rtol=0)
    # the contract: RGB in [0, 1], normalization inside. A right input gives the published accuracy (~0.88)
    assert _accuracy(out_pt2, test_batch["target"]) > 0.75
    x, out_pt2, out_ts = x[:20], out_pt2[:20], out_ts[:20]
    for teacher, ref in ((t_pt2, out_pt2), (t_ts, out_ts)):
        # mode switches (a Trainer's, or a parent module's) neither raise nor leave eval mode
        teacher.train()
        assert teacher.training is False
        parent = nn.ModuleDict({"teacher": teacher, "head": nn.BatchNorm1d(3)})
        parent.train()
        parent.eval()
        parent.train(True)
        assert teacher.training is False
        assert all(not p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            assert torch.equal(teacher(x), ref), "outputs changed after .train(): BatchNorm left eval mode"
        teacher.eval()


def test_shared_state_dict_as_zoo_resnet20_spec(shared, exported, test_batch, tmp_path):
    """The shared plain state dict, renamed onto the zoo's resnet20, loads as a spec and matches the exported teacher
    when fed the DataModule's normalized inputs (the zoo nets normalize outside: ``teacher_normalize=True``)."""
    sd = torch.load(shared / f"{TEACHER}.state_dict.pt", map_location="cpu", weights_only=True)
    mean, std = sd["mean"].flatten().tolist(), sd["std"].flatten().tolist()
    assert np.allclose(mean, CIFAR10_MEAN, atol=1e-6) and np.allclose(std, CIFAR10_STD, atol=1e-6)
    zoo = create_model("resnet20").state_dict()
    net = [v for k, v in sd.items() if k.startswith("net.")]
    assert [tuple(v.shape) for v in net] == [tuple(v.shape) for v in zoo.values()]
    weights = tmp_path / "resnet20.pt"
    torch.save(dict(zip(zoo.keys(), net)), weights)
    teacher = load_teacher({"model": "resnet20", "num_classes": 10, "weights": str(weights)})
    assert teacher.fingerprint == "sha256:" + _sha256(weights)
    with torch.no_grad():
        assert torch.allclose(teacher(test_batch["input"]), exported[0](test_batch["raw"]), atol=1e-4, rtol=0)
    # the bare state dict file itself is refused with a pointer to the spec form
    with pytest.raises(ValueError, match="bare state dict"):
        load_teacher(shared / f"{TEACHER}.state_dict.pt")


def test_shared_state_dict_loads_by_name_as_a_module_whose_layers_can_be_hooked(shared, exported, test_batch):
    """``resnet20_rgb`` is the shared state dict's layout: it loads strictly (the file found in the data folder by
    name), gives the exported program's outputs on RGB in [0, 1], and its layers run as modules (hooks see them)."""
    teacher = resolve_teacher({"model": "resnet20_rgb", "num_classes": 10, "weights": f"{TEACHER}.state_dict.pt"})
    assert teacher.fingerprint == "sha256:" + _sha256(shared / f"{TEACHER}.state_dict.pt")
    x = test_batch["raw"]
    with torch.no_grad(), capture(teacher.module, {"stage2": "net.layer2", "pool": "net.avgpool"}) as found:
        out = teacher(x)
    assert torch.allclose(out, exported[0](x), atol=1e-5, rtol=0)
    assert found["stage2"].shape == (len(x), 32, 16, 16) and found["pool"].shape == (len(x), 64, 1, 1)


@pytest.mark.slow
def test_shared_teacher_accuracy(exported, cifar):
    teacher = exported[0]
    correct = total = 0
    with torch.no_grad():
        for batch in cifar.loader(cifar.test_dataset(), train=False, batch_size=1000):
            correct += int((teacher(_unnormalize(batch["input"])).argmax(1) == batch["target"]).sum())
            total += len(batch["target"])
    assert total == 10_000
    assert abs(correct / total - SHARED_ACCURACY) <= 0.005, correct / total


# -- checkpoints and specs of this package ---------------------------------------------------------------------------


def test_lightning_checkpoint_of_supervised(cifar, test_batch, tmp_path):
    torch.manual_seed(0)
    module = Supervised(student="resnet8", num_classes=10, lr=0.05, label_smoothing=0.1)
    initial = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=cifar)
    ckpt = tmp_path / "supervised.ckpt"
    trainer.save_checkpoint(ckpt)
    trained = module.student.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "training changed nothing"

    teacher = load_teacher(ckpt)
    assert teacher.fingerprint == "sha256:" + _sha256(ckpt) and teacher.training is False
    module.eval()
    with torch.no_grad():
        expected = module.student(test_batch["input"])
        got = teacher(test_batch["input"])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # the teacher is a copy: changing the student afterwards does not change it
    with torch.no_grad():
        next(module.student.parameters()).add_(1.0)
        assert torch.equal(teacher(test_batch["input"]), got)

    # a checkpoint of some other LightningModule is refused clearly
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"net.weight": torch.zeros(2)}, "hyper_parameters": {"hidden": 3}}, foreign)
    with pytest.raises(ValueError, match="not a lightning_kd checkpoint"):
        load_teacher(foreign)


def test_model_spec(test_batch, tmp_path):
    torch.manual_seed(1)
    model = create_model("resnet8", num_classes=10)
    with torch.no_grad():  # non-trivial BN statistics, so that eval vs train mode shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "resnet8.pt"
    torch.save(model.state_dict(), weights)
    teacher = load_teacher({"model": "resnet8", "num_classes": 10, "weights": weights})
    assert teacher.fingerprint == "sha256:" + _sha256(weights) and teacher.source == str(weights)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(teacher(test_batch["input"]), model(test_batch["input"]), atol=1e-5, rtol=0)
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(RuntimeError):  # weights of another shape
        load_teacher({"model": "resnet8", "num_classes": 100, "weights": weights})
    deeper = tmp_path / "resnet14.pt"
    torch.save(create_model("resnet14").state_dict(), deeper)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # strict loading: no silently ignored weights
        load_teacher({"model": "resnet8", "num_classes": 10, "weights": deeper})


def test_bare_state_dict_path_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(create_model("resnet8").state_dict(), path)
    with pytest.raises(ValueError, match="bare state dict") as info:
        load_teacher(path)
    assert "'model'" in str(info.value) and "'weights'" in str(info.value)  # says how to load it instead


@pytest.mark.parametrize("name", ["notes.txt", "teacher.ckpt", "teacher.pt"])
def test_non_torch_file_is_a_clear_error(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not a model\n")
    with pytest.raises(ValueError, match="not a torch.export") as info:
        load_teacher(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tmp_path / "missing.pt2")


# -- fingerprints ------------------------------------------------------------------------------------------------------


def test_module_fingerprint_tracks_parameters():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert teacher_fingerprint(a) != teacher_fingerprint(b)
    b.load_state_dict(a.state_dict())
    fp = teacher_fingerprint(a)
    assert fp == teacher_fingerprint(b) and fp.startswith("params:")
    with torch.no_grad():
        b[2].bias[1] += 1e-3
    assert teacher_fingerprint(b) != fp
    b.load_state_dict(a.state_dict())
    assert teacher_fingerprint(b) == fp
    assert load_teacher(a).fingerprint == fp  # a wrapped module keeps its parameter fingerprint


def test_module_fingerprint_with_batchnorm_buffers():
    """Real teachers have BatchNorm: buffers (incl. the 0-dim ``num_batches_tracked``) are part of the fingerprint."""
    torch.manual_seed(0)
    a = create_model("resnet8")
    b = create_model("resnet8")
    b.load_state_dict(a.state_dict())
    fp = teacher_fingerprint(a)
    assert fp == teacher_fingerprint(b) and fp.startswith("params:")
    with torch.no_grad():
        b.fc.bias[3] += 1e-3
    assert teacher_fingerprint(b) != fp
    b.load_state_dict(a.state_dict())
    assert teacher_fingerprint(b) == fp
    with torch.no_grad():
        b.bn1.running_mean[0] = 0.5  # a buffer changes the outputs too
    assert teacher_fingerprint(b) != fp
    # a wrapped module keeps the parameter fingerprint; an explicit fingerprint wins
    assert load_teacher(a).fingerprint == fp
    assert teacher_fingerprint(FrozenTeacher(a, "v2")) == "v2"


def test_plain_function_fingerprint():
    def remote_teacher(x):
        return x.flatten(1)[:, :10]

    with pytest.warns(UserWarning, match="fingerprint"):
        fp = teacher_fingerprint(remote_teacher)
    assert "remote_teacher" in fp
    remote_teacher.fingerprint = "api-model-2024-06"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert teacher_fingerprint(remote_teacher) == "api-model-2024-06"
