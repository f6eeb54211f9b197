"""Callbacks: one responsibility each."""

from lightning_kd.callbacks.budget import TeacherBudgetMonitor

__all__ = ["TeacherBudgetMonitor"]
