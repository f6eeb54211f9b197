"""lightning_kd: knowledge distillation for expensive teachers, on PyTorch Lightning.

A budgeted, persistent teacher-output cache (:class:`CachedTeacherDataModule`, :class:`TeacherCache`,
:class:`TeacherBudget`), Comparative KD (:class:`ComparativeDistillation`) and Gap Preserving Distillation
(:class:`GapPreservingDistillation`, :func:`lightning_kd.reparam.expand`).
"""

from lightning_kd.cache import (
    CacheCorruptedError,
    CacheMismatchError,
    CacheSpec,
    TeacherBudget,
    TeacherBudgetExceeded,
    TeacherCache,
)
from lightning_kd.callbacks import DynamicTeacherSharing, StudentExtraction, TeacherBudgetMonitor
from lightning_kd.data import CachedTeacherDataModule, CIFAR10DataModule
from lightning_kd.models import create_model
from lightning_kd.modules import (
    ComparativeDistillation,
    GapPreservingDistillation,
    KnowledgeDistillation,
    Supervised,
)
from lightning_kd.teachers import load_teacher

__version__ = "0.1.0"

__all__ = [
    "CIFAR10DataModule",
    "CacheCorruptedError",
    "CacheMismatchError",
    "CacheSpec",
    "CachedTeacherDataModule",
    "ComparativeDistillation",
    "DynamicTeacherSharing",
    "GapPreservingDistillation",
    "KnowledgeDistillation",
    "StudentExtraction",
    "Supervised",
    "TeacherBudget",
    "TeacherBudgetExceeded",
    "TeacherBudgetMonitor",
    "TeacherCache",
    "create_model",
    "load_teacher",
]
