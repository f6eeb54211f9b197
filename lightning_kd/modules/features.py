"""Feature distillation from cached teacher features: the trainable heads (FitNet, VID, CC) and the plumbing that
takes student features with forward hooks, as the official CKD code's white-box methods (alextxu/ckd
``train_student.py``, ``models/util.py``, ``distiller_zoo``).

Features are paired by name: ``student_features={name: student layer}`` against the cached
``batch["teacher_features"][name]`` (``CachedTeacherDataModule(teacher_features={name: teacher layer})``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lightning_kd.losses import cc_loss, hint_loss, match_spatial, vid_loss
from lightning_kd.models.hooks import capture, layer_shapes

FeatureLoss = Literal["hint", "vid", "cc"]
FEATURE_WEIGHTS = {"hint": 100.0, "vid": 1.0, "cc": 0.02}  # the official ``w_inter_defaults``
FEATURE_LOSSES = tuple(FEATURE_WEIGHTS)


def hint_connector(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Sequential:
    """FitNet's ``ConvReg``: conv + BN + ReLU from a (C, H, W) student map to the teacher's; the conv is 1x1 when
    the sizes match, k x k (k = 1 + H_s − H_t) when the student's is larger, 3x3 stride 2 when it is twice the
    teacher's, a 4x4 stride-2 transposed conv when it is half."""
    (sc, sh, sw), (tc, th, tw) = student, teacher
    if sh == 2 * th:
        conv = nn.Conv2d(sc, tc, 3, stride=2, padding=1)
    elif 2 * sh == th:
        conv = nn.ConvTranspose2d(sc, tc, 4, stride=2, padding=1)
    elif sh >= th:
        conv = nn.Conv2d(sc, tc, (1 + sh - th, 1 + sw - tw))
    else:
        raise ValueError(f"hint: no connector from a {sh}x{sw} student map to a {th}x{tw} teacher map (the student's "
                         "must be as large, twice as large, or half as large)")
    return nn.Sequential(conv, nn.BatchNorm2d(tc), nn.ReLU())


class FeatureHead(nn.Module):
    """The trainable part of a feature loss, built from per-sample shapes ``{name: shape}`` of student and teacher.

    - ``"hint"`` (weight 100 in the official runs): one pair; MSE(connector(f_S), f_T), :func:`hint_connector`.
    - ``"vid"`` (weight 1): each pair, pooled to one size (:func:`~lightning_kd.losses.match_spatial`), a 1x1-conv
      regressor s → t → t → t with ReLUs between, and per-channel variances softplus(·) + 1e-5 starting at
      ``init_var`` (5); the losses are summed over pairs.
    - ``"cc"`` (weight 0.02): one pair of flattened (pooled) features, linear embeddings of both to ``dim`` (128).
    """

    def __init__(self, loss: FeatureLoss, student: Mapping[str, tuple[int, ...]],
                 teacher: Mapping[str, tuple[int, ...]], dim: int = 128, init_var: float = 5.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        if loss not in FEATURE_LOSSES:
            raise ValueError(f"feature loss must be one of {', '.join(FEATURE_LOSSES)}; got {loss!r}")
        if sorted(student) != sorted(teacher) or not student or (loss != "vid" and len(student) != 1):
            raise ValueError(f"feature loss {loss!r} pairs {'one feature' if loss != 'vid' else 'features'} by name; "
                             f"got student {sorted(student)} and teacher {sorted(teacher)}")
        self.loss, self.eps = loss, eps
        name = next(iter(student))
        if loss == "hint":
            s, t = student[name], teacher[name]
            if len(s) != 3 or len(t) != 3:
                raise ValueError(f"hint: feature {name!r} must be a (C, H, W) map, got student {s}, teacher {t}")
            self.connector = hint_connector(s, t)
        elif loss == "vid":
            for n in student:
                if len(student[n]) != 3 or len(teacher[n]) != 3:
                    raise ValueError(f"vid: feature {n!r} must be a (C, H, W) map, got {student[n]}, {teacher[n]}")
            self.regressors = nn.ModuleDict({n: nn.Sequential(
                nn.Conv2d(student[n][0], teacher[n][0], 1, bias=False), nn.ReLU(),
                nn.Conv2d(teacher[n][0], teacher[n][0], 1, bias=False), nn.ReLU(),
                nn.Conv2d(teacher[n][0], teacher[n][0], 1, bias=False)) for n in student})
            start = math.log(math.expm1(init_var - eps))  # softplus(start) + eps = init_var
            self.log_scales = nn.ParameterDict({n: nn.Parameter(torch.full((teacher[n][0],), start)) for n in student})
        else:
            self.embed_s = nn.Linear(int(np.prod(student[name])), dim)
            self.embed_t = nn.Linear(int(np.prod(teacher[name])), dim)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.loss == "hint":
            (name, f_s), = student.items()
            return hint_loss(self.connector(f_s), teacher[name])
        if self.loss == "cc":
            (name, f_s), = student.items()
            return cc_loss(self.embed_s(f_s.flatten(1)), self.embed_t(teacher[name].flatten(1)))
        total = 0
        for name, f_s in student.items():
            f_s, f_t = match_spatial(f_s, teacher[name])
            total = total + vid_loss(self.regressors[name](f_s), f_t, self.log_scales[name], self.eps)
        return total


class FeatureDistillationMixin:
    """For :class:`~lightning_kd.modules.base.StudentModule` subclasses: a feature loss between named student
    layers (forward hooks) and the cached teacher features of the batch.

    The head is built in ``setup`` from the shapes: the student's from a meta-device forward on one training
    sample's shape, the teacher's from the DataModule's ``feature_specs`` (before ``configure_optimizers``, so the
    module's optimizer trains it); or call :meth:`build_feature_head` yourself. ``feature_view="student"`` (the
    official code): student features come from the student's fresh augmentation, so the two crops differ;
    ``"teacher"``: from a second student forward on ``batch["teacher_view"]``, the teacher's own view
    (``CachedTeacherDataModule(serve_teacher_view=True)``), the logit terms still on the fresh augmentation.
    """

    def _init_features(self, loss: FeatureLoss | None, student_features: Mapping[str, str] | None,
                       feature_view: str, w_feat: float | None) -> None:
        if loss is not None and not student_features:
            raise ValueError(f"feature loss {loss!r} needs student_features={{name: student layer}}, one per cached "
                             "teacher feature it learns from")
        if feature_view not in ("student", "teacher"):
            raise ValueError(f"feature_view must be 'student' or 'teacher', got {feature_view!r}")
        self.feature_loss_name = loss
        self.w_feat = w_feat if w_feat is not None else FEATURE_WEIGHTS.get(loss)  # default: the official weight
        self.student_features = dict(student_features or {})
        self.feature_head: FeatureHead | None = None
        self._head_shapes: dict[str, Any] | None = None

    def build_feature_head(self, input_shape: tuple[int, ...], teacher_shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Create the head for student inputs of ``input_shape`` (C, H, W) and teacher features of
        ``teacher_shapes`` ({name: per-sample shape})."""
        missing = sorted(set(self.student_features) - set(teacher_shapes))
        if missing:
            raise ValueError(f"student_features names {missing}, but the cached teacher features are "
                             f"{sorted(teacher_shapes)}: name each student layer after the teacher feature it learns")
        student = layer_shapes(self.student, self.student_features, tuple(input_shape))
        teacher = {n: tuple(teacher_shapes[n]) for n in self.student_features}
        self.feature_head = FeatureHead(self.feature_loss_name, student, teacher, self.hparams.feature_dim)
        self._head_shapes = {"input": list(input_shape), "teacher": {n: list(s) for n, s in teacher.items()}}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.feature_loss_name is None or self.feature_head is not None:
            return
        dm = self.trainer.datamodule
        specs = getattr(dm, "feature_specs", ())
        if not specs:
            raise ValueError(f"feature loss {self.feature_loss_name!r} learns from cached teacher features: train with "
                             "CachedTeacherDataModule(teacher_features={name: teacher layer}), or call "
                             "build_feature_head(input_shape, teacher_shapes) first")
        x = dm.make_dataset(np.asarray(dm.selected[:1]), "eval").__getitems__([0])["input"]
        self.build_feature_head(tuple(x.shape[1:]), {f.name: f.shape for f in specs})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._head_shapes is not None:
            checkpoint["feature_head_shapes"] = self._head_shapes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``load_from_checkpoint`` builds the head from the shapes saved with it before loading its weights."""
        shapes = checkpoint.get("feature_head_shapes")
        if self.feature_head is None and shapes:
            self.build_feature_head(tuple(shapes["input"]), shapes["teacher"])

    def student_pass(self, x: torch.Tensor, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's logits on ``x`` (B, C, H, W) and its features (``feature_view``: from that forward, or from
        a forward on the teacher's views of the same samples, ``batch["teacher_view"]`` flattened alike)."""
        if self.hparams.feature_view == "student":
            with capture(self.student, self.student_features) as found:
                logits = self.student(x)
            return logits, found
        if "teacher_view" not in batch:
            raise ValueError("feature_view='teacher' needs batch['teacher_view']: set "
                             "CachedTeacherDataModule(serve_teacher_view=True)")
        view = batch["teacher_view"]
        with capture(self.student, self.student_features) as found:
            self.student(view.reshape(-1, *view.shape[-3:]))
        return self.student(x), found

    def feature_term(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The head's loss on paired student and teacher features (``teacher`` may hold more than it uses)."""
        if self.feature_head is None:
            raise RuntimeError("the feature head is built in setup() (or by build_feature_head) before training")
        return self.feature_head(student, {n: teacher[n] for n in student})
