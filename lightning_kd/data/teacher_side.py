"""What CachedTeacherDataModule knows of its teacher: the teacher itself (loaded once), the features it records
with its logits, and its own views of the training samples."""

from __future__ import annotations

from torch.utils.data import Dataset

from lightning_kd.cache.spec import FeatureSpec
from lightning_kd.data.multiview import KeyedViews
from lightning_kd.data.plan import resolve_teacher
from lightning_kd.teachers import Teacher
from lightning_kd.teachers.features import FeatureTeacher


class TeacherSideMixin:
    """For :class:`~lightning_kd.data.CachedTeacherDataModule` (its ``h``, ``datamodule``, views and keys)."""

    def _resolve_teacher(self) -> Teacher:
        """The teacher, loaded once; with ``teacher_features`` a FeatureTeacher (refused here if it cannot be)."""
        if self.teacher is None:
            teacher = resolve_teacher(self.teacher_spec)
            self.teacher = FeatureTeacher(teacher, self.h.teacher_features) if self.h.teacher_features else teacher
        return self.teacher

    @property
    def feature_specs(self) -> tuple[FeatureSpec, ...]:
        """The teacher features the cache stores, with per-sample shapes from a meta-device forward of the teacher
        on one sample's view (no teacher call); () without ``teacher_features``."""
        if self._features is None:
            self._features = ()
            if self.h.teacher_features:
                dm, h = self.datamodule, self.h
                dm.setup("fit")
                x = dm.teacher_dataset(dm.train_indices[:1], self.teacher_view, normalize=h.teacher_normalize,
                                       seed=h.seed).__getitems__([0])["input"]
                shapes = self._resolve_teacher().feature_shapes(tuple(x.shape[1:]))
                self._features = tuple(FeatureSpec(n, layer, shapes[n]) for n, layer in h.teacher_features.items())
        return self._features

    def teacher_views(self) -> Dataset:
        """The teacher's own view of each training key (the input it was run on), in the student's normalization."""
        dm, h = self.datamodule, self.h
        if self.stride == 1:
            return dm.make_dataset(self.train_indices, self.teacher_view, seed=h.seed)
        return KeyedViews(self.train_keys, self.stride, seed=h.seed,
                          make=lambda idx, seed: dm.make_dataset(idx, self.teacher_view, seed=seed))
