"""Teacher features in the cache: recorded in the one budgeted call per sample, served within float16, part of the
cache's identity, and refused for teachers that cannot give them (before any call)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_kd.cache import CacheMismatchError, TeacherCache
from lightning_kd.models import create_model
from lightning_kd.models.hooks import capture
from lightning_kd.teachers import RemoteTeacher

sys.path.insert(0, str(Path(__file__).parents[1]))
from features_for_tests import LAYERS, CountingNet, feature_datamodule  # noqa: E402
from teachers_for_tests import CountingTeacher  # noqa: E402


@pytest.mark.parametrize("group_size", [1, 2])
def test_served_features_equal_a_direct_forward_with_hooks_on_the_teachers_view(tmp_path, group_size):
    teacher = CountingNet()
    dm = feature_datamodule(teacher, tmp_path / "cache", group_size=group_size, serve_teacher_view=True)
    batch = next(iter(dm.train_dataloader()))
    assert teacher.samples == 48  # one call per selected sample gave the logits and the features
    assert [(f.name, f.layer, f.shape) for f in dm.cache.spec.features] == [
        ("l2", "net.layer2", (32, 16, 16)), ("pool", "net.avgpool", (64, 1, 1))]
    assert dm.cache.spec.feature_dtype == "float16"
    index = batch["index"].flatten()
    view = dm.datamodule.teacher_dataset(index.numpy(), "fixed", normalize=False, seed=0).__getitems__(
        list(range(len(index))))
    with torch.no_grad(), capture(teacher, LAYERS) as direct:
        logits = teacher(view["input"])
    lead = tuple(batch["index"].shape)
    for name, feature in batch["teacher_features"].items():
        assert feature.dtype == torch.float32 and feature.shape == lead + direct[name].shape[1:]
        torch.testing.assert_close(feature.flatten(0, len(lead) - 1), direct[name], rtol=2**-10, atol=1e-5)
        assert not torch.equal(feature.flatten(0, len(lead) - 1), direct[name])  # stored in float16, not float32
    torch.testing.assert_close(batch["teacher_logits"].flatten(0, len(lead) - 1), logits, rtol=1e-5, atol=1e-5)
    # the student's view of the teacher's input: the same pixels, in the student's normalization
    student_view = dm.datamodule.make_dataset(index.numpy(), "fixed", seed=0).__getitems__(list(range(len(index))))
    assert torch.equal(batch["teacher_view"].flatten(0, len(lead) - 1), student_view["input"])
    assert not torch.equal(batch["teacher_view"], batch["input"])  # the student's input is a fresh augmentation


def test_a_cache_made_with_other_features_is_refused_naming_them(tmp_path):
    teacher = CountingNet()
    feature_datamodule(teacher, tmp_path / "cache", budget=16).fill()
    assert teacher.samples == 16
    others = [{"teacher_features": {"l3": "net.layer3"}}, {"teacher_features": {}},
              {"teacher_features": LAYERS, "feature_dtype": "float32"}]
    for kw, named in zip(others, ["l3", "features", "feature_dtype: cache has 'float16', requested 'float32'"]):
        with pytest.raises(CacheMismatchError, match=named) as err:
            feature_datamodule(teacher, tmp_path / "cache", budget=16, **kw).fill()
        if not named.startswith("feature_dtype"):  # what the cache holds is named too
            assert "name='l2', layer='net.layer2', shape=(32, 16, 16)" in str(err.value)
    assert teacher.samples == 16  # nothing was bought


def _exported(tmp_path) -> Path:
    path = tmp_path / "resnet8.pt2"
    torch.export.save(torch.export.export(CountingNet().eval(), (torch.rand(2, 3, 32, 32),)), path)
    return path


def _scripted(tmp_path) -> Path:
    path = tmp_path / "resnet8.ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(create_model("resnet8").eval()), path)
    return path


@pytest.mark.parametrize("kind, why", [
    ("remote", "not a local nn.Module"),
    ("callable", "not a local nn.Module"),
    ("exported", "exported program"),
    ("torchscript", "TorchScript"),
    ("no_such_layer", "has no layer"),
])
def test_a_teacher_that_cannot_give_features_is_refused_naming_it_and_the_layer(tmp_path, kind, why):
    teacher, name = {
        "remote": lambda: (RemoteTeacher("http://127.0.0.1:9/predict", model_version="v1"), "127.0.0.1:9"),
        "callable": lambda: (CountingTeacher(), "CountingTeacher"),
        "exported": lambda: (str(_exported(tmp_path)), "resnet8.pt2"),
        "torchscript": lambda: (str(_scripted(tmp_path)), "resnet8.ts.pt"),
        "no_such_layer": lambda: (CountingNet(), "CountingNet"),
    }[kind]()
    layers = {"l2": "net.layer2"} if kind != "no_such_layer" else {"l2": "net.layer9"}
    dm = feature_datamodule(teacher, tmp_path / "cache", teacher_features=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation
        with pytest.raises(ValueError, match=why) as err:
            dm.fill()
    assert name in str(err.value) and layers["l2"] in str(err.value)
    assert not (tmp_path / "cache").exists()  # refused before a cache was made or a call was paid
    if kind == "callable":
        assert teacher.calls == 0


def test_features_that_float16_cannot_hold_are_never_stored(tmp_path):
    teacher = CountingNet()
    with torch.no_grad():
        teacher.net.fc.weight.mul_(0)  # keep the logits finite while layer 2 overflows float16
        teacher.net.layer2[0].bn2.bias.fill_(1e5)
    dm = feature_datamodule(teacher, tmp_path / "cache", budget=16, teacher_features={"l2": "net.layer2"})
    with pytest.raises(ValueError, match="beyond float16's range.*feature_dtype='float32'"):
        dm.fill()
    assert len(TeacherCache(tmp_path / "cache")) == 0 and dm.budget_state.summary().lost == 16  # paid, not stored
    dm32 = feature_datamodule(CountingNet(), tmp_path / "cache32", budget=16, teacher_features={"l2": "net.layer2"},
                              feature_dtype="float32")
    dm32.fill()
    assert np.isfinite(dm32.cache.get_features(dm32.train_indices)["l2"].numpy()).all()
