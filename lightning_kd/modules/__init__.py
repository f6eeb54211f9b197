"""LightningModules: each ``training_step`` is one paper's loss, composed from :mod:`lightning_kd.losses`."""

from lightning_kd.modules.base import StudentModule
from lightning_kd.modules.ckd import ComparativeDistillation
from lightning_kd.modules.gpd import GapPreservingDistillation
from lightning_kd.modules.kd import KnowledgeDistillation
from lightning_kd.modules.supervised import Supervised

__all__ = [
    "ComparativeDistillation",
    "GapPreservingDistillation",
    "KnowledgeDistillation",
    "StudentModule",
    "Supervised",
]
