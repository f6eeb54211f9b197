"""The budget sweep's methods (``experiments/sweep_budget.py``): one registry entry per method name.

Each :class:`Method` says which LightningModule of :mod:`lightning_kd.modules` to build, with which arguments
beside the protocol's common ones (``student``, ``lr``, ``scheduler``, ``channels_last``), the CKD group size of
its batches (1: plain batches) and whether it learns from cached teacher *features* (then its
``student_features`` name layers of the features cache, :data:`TEACHER_FEATURES`). Existing entries build
exactly what the sweep built before this registry, so their stored runs stay comparable.

* Logit methods (the logits cache: the ``.pt2`` teacher): ce, kd, mixup, cutmix, rkd, dist, crd
  (:class:`KnowledgeDistillation` / :class:`Supervised`); ckd (pairs, MSE: the WACV release), ckd_kl3 (groups of 3,
  KL: the arXiv release), ckd_average and ckd_mixup (CKD's combine ablations, pairs, MSE).
* Feature methods (the features cache: the same teacher as a module, its stage outputs recorded in the same
  call): the white-box baselines hint (FitNet), vid, cc (CE + KD + the feature loss) and their CKD forms
  ckd_hint, ckd_vid, ckd_cc (the feature loss on the side differences of pairs); hint_teacher_view,
  ckd_hint_teacher_view, vid_teacher_view and cc_teacher_view take the student's feature from the teacher's own view
  (``feature_view="teacher"``, the logit terms still on the fresh augmentation) instead of the fresh augmentation,
  whose crop the teacher never saw.
* GPD (:class:`GapPreservingDistillation`, ratio 2, defaults): gpd (KD terms), gpd_ckd (CKD terms on pairs) and
  gpd_scratch (``kd_weight=0``: CE + SCE only, on the same budget's samples; the static teacher's outputs are
  never read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The shared ResNet-20 as a module whose layers can be named (weights looked up in LKD_DATA_DIR); the feature
# cache records all four layers once, so that every feature method shares it.
FEATURE_TEACHER = {"model": "resnet20_rgb", "num_classes": 10, "weights": "cifar10_resnet20_teacher.state_dict.pt"}
TEACHER_FEATURES = {"s1": "net.layer1", "l2": "net.layer2", "s3": "net.layer3", "pool": "net.avgpool"}
LOGITS_TEACHER = "cifar10_resnet20_teacher.pt2"
# The zoo ResNet-8 student's layers, named after the teacher feature each learns from.
STUDENT_LAYERS = {
    "hint": {"l2": "layer2"},
    "vid": {"s1": "layer1", "l2": "layer2", "s3": "layer3"},
    "cc": {"pool": "avgpool"},
}


@dataclass(frozen=True)
class Method:
    """A LightningModule of :mod:`lightning_kd.modules` (class name), its own arguments and its batches."""

    module: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    group_size: int = 1  # CKD tuples of this many samples; 1: plain batches

    @property
    def student_features(self) -> dict[str, str]:
        """``{teacher feature name: student layer}``; empty for logit methods."""
        return dict(self.kwargs.get("student_features") or {})

    @property
    def serve_teacher_view(self) -> bool:
        """Whether its batches must carry the teacher's own view (``feature_view="teacher"``)."""
        return self.kwargs.get("feature_view") == "teacher"

    @property
    def needs_features(self) -> bool:
        """Whether it trains on the features cache (the teacher's recorded layers) instead of the logits cache."""
        return bool(self.student_features)

    def build(self, **common: Any):
        """The module, from the protocol's common arguments (student, lr, scheduler, channels_last)."""
        import lightning_kd.modules as modules

        return getattr(modules, self.module)(**self.kwargs, **common)


def _kd(method: str) -> Method:
    return Method("KnowledgeDistillation", {"method": method})


def _view(feature_view: str) -> dict[str, str]:
    return {} if feature_view == "student" else {"feature_view": feature_view}  # the default: kwargs unchanged


def _white_box(loss: str, feature_view: str = "student") -> Method:
    return Method("KnowledgeDistillation",
                  {"method": loss, "student_features": STUDENT_LAYERS[loss], **_view(feature_view)})


def _ckd_features(loss: str, feature_view: str = "student") -> Method:
    return Method("ComparativeDistillation",
                  {"feature_loss": loss, "student_features": STUDENT_LAYERS[loss], **_view(feature_view)}, 2)


METHODS: dict[str, Method] = {
    "ce": Method("Supervised"),
    **{m: _kd(m) for m in ("kd", "mixup", "cutmix", "rkd", "dist")},
    "ckd": Method("ComparativeDistillation", {}, 2),
    "ckd_kl3": Method("ComparativeDistillation", {"variant": "kl"}, 3),
    "crd": _kd("crd"),  # CE + KD + 0.8·CRD on logits, the official CKD baseline
    "ckd_average": Method("ComparativeDistillation", {"combine": "average"}, 2),
    "ckd_mixup": Method("ComparativeDistillation", {"combine": "mixup"}, 2),
    **{m: _white_box(m) for m in ("hint", "vid", "cc")},
    **{f"ckd_{m}": _ckd_features(m) for m in ("hint", "vid", "cc")},
    "hint_teacher_view": _white_box("hint", "teacher"),
    "ckd_hint_teacher_view": _ckd_features("hint", "teacher"),
    "vid_teacher_view": _white_box("vid", "teacher"),
    "cc_teacher_view": _white_box("cc", "teacher"),
    "gpd": Method("GapPreservingDistillation", {"distill": "kd"}),
    "gpd_ckd": Method("GapPreservingDistillation", {"distill": "ckd"}, 2),
    "gpd_scratch": Method("GapPreservingDistillation", {"distill": "kd", "kd_weight": 0.0}),
}
# The budget sweep's default methods (unchanged); the others run on request (--methods).
GRID = ("ce", "kd", "mixup", "cutmix", "rkd", "dist", "ckd", "ckd_kl3")
