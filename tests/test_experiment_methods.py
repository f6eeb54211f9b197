"""The budget sweep's method registry (experiments/methods.py): every method builds its module, with batches (group
size) and cached teacher features consistent with its loss, and the original methods are built as before."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_kd.models import create_model
from lightning_kd.models.hooks import layer_shapes
from lightning_kd.modules import ComparativeDistillation, GapPreservingDistillation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import methods as M  # noqa: E402  (the sweep's registry, as sweep_budget.py imports it)

COMMON = dict(student="resnet8", lr=0.05, scheduler="cosine", channels_last=True)
# What the sweep built before the registry: stored runs of these methods stay comparable.
BEFORE = {
    "ce": ("Supervised", {}, 1),
    **{m: ("KnowledgeDistillation", {"method": m}, 1) for m in ("kd", "mixup", "cutmix", "rkd", "dist", "crd")},
    "ckd": ("ComparativeDistillation", {}, 2),
    "ckd_kl3": ("ComparativeDistillation", {"variant": "kl"}, 3),
}


@pytest.fixture(scope="module")
def teacher_shapes():
    """Per-sample shapes of the features cache's layers, from the teacher's architecture (no weights needed)."""
    teacher = create_model(M.FEATURE_TEACHER["model"], num_classes=M.FEATURE_TEACHER["num_classes"])
    return layer_shapes(teacher, M.TEACHER_FEATURES, (3, 32, 32))


def test_the_default_grid_and_the_original_methods_are_unchanged():
    assert M.GRID == ("ce", "kd", "mixup", "cutmix", "rkd", "dist", "ckd", "ckd_kl3")
    for name, (module, kwargs, group_size) in BEFORE.items():
        spec = M.METHODS[name]
        assert (spec.module, spec.kwargs, spec.group_size, spec.needs_features) == (module, kwargs, group_size, False)


@pytest.mark.parametrize("name", list(M.METHODS))
def test_every_method_builds_with_consistent_batches_and_features(name, teacher_shapes):
    spec = M.METHODS[name]
    model = spec.build(**COMMON)
    assert (model.hparams.student, model.hparams.channels_last) == ("resnet8", True)
    compares_tuples = isinstance(model, ComparativeDistillation) or (
        isinstance(model, GapPreservingDistillation) and model.hparams.distill == "ckd")
    assert (spec.group_size >= 2) == compares_tuples
    feature_loss = getattr(model, "feature_loss_name", None)
    assert spec.needs_features == (feature_loss is not None)
    if spec.needs_features:
        assert model.student_features == spec.student_features
        assert set(spec.student_features) <= set(M.TEACHER_FEATURES)  # all in the one shared features cache
        model.build_feature_head((3, 32, 32), teacher_shapes)  # the student layers exist and fit the teacher's
        assert model.feature_head is not None
    if name == "gpd_scratch":
        assert model.hparams.kd_weight == 0  # no teacher signal: the cached outputs are never read
    elif isinstance(model, GapPreservingDistillation):
        assert model.hparams.kd_weight == 1.0 and model.hparams.ratio == 2.0


TEACHER_VIEW = {"hint_teacher_view", "ckd_hint_teacher_view", "vid_teacher_view", "cc_teacher_view"}


def test_the_new_methods_are_registered():
    new = {"ckd_average", "ckd_mixup", "ckd_hint", "ckd_vid", "ckd_cc", "hint", "vid", "cc", "gpd", "gpd_ckd",
           "gpd_scratch", *TEACHER_VIEW}
    assert set(M.METHODS) == set(BEFORE) | new
    assert {m for m, s in M.METHODS.items() if s.needs_features} == {"hint", "vid", "cc", "ckd_hint", "ckd_vid",
                                                                      "ckd_cc", *TEACHER_VIEW}
    # only the teacher-view methods ask for the teacher's view; each is its student-view twin with feature_view set
    assert {m for m, s in M.METHODS.items() if s.serve_teacher_view} == TEACHER_VIEW
    for name in ("hint", "ckd_hint", "vid", "cc"):
        twin = M.METHODS[f"{name}_teacher_view"]
        assert twin.kwargs == {**M.METHODS[name].kwargs, "feature_view": "teacher"}
        assert twin.build(**COMMON).hparams.feature_view == "teacher"
