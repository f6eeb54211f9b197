"""Callbacks: one responsibility each."""

from lightning_kd.callbacks.budget import TeacherBudgetMonitor
from lightning_kd.callbacks.extraction import StudentExtraction
from lightning_kd.callbacks.sharing import DynamicTeacherSharing, SharingViolation

__all__ = ["DynamicTeacherSharing", "SharingViolation", "StudentExtraction", "TeacherBudgetMonitor"]
