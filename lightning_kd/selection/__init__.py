"""Which pool samples the paid teacher is queried on next: active selection for the budgeted KD cache.

timm-style: one strategy per module, registered by name; ``create_strategy("kcenter", space="softmax")``
builds one, ``list_strategies()`` names them all. A strategy gets a :class:`SelectionContext` (the candidate
pool, what was bought in earlier rounds and, if ``needs_student``, the student's :class:`PoolScores`) and
returns the sorted indices to buy.
"""

from lightning_kd.selection.badge import BadgeSelection
from lightning_kd.selection.base import PoolScores, SelectionContext, SelectionStrategy
from lightning_kd.selection.class_balanced import ClassBalancedSelection
from lightning_kd.selection.entropy import EntropySelection
from lightning_kd.selection.kcenter import KCenterSelection
from lightning_kd.selection.margin import MarginSelection
from lightning_kd.selection.margin_kcenter import MarginKCenterSelection
from lightning_kd.selection.random import RandomSelection
from lightning_kd.selection.registry import create_strategy, list_strategies, register_strategy

__all__ = [
    "BadgeSelection",
    "ClassBalancedSelection",
    "EntropySelection",
    "KCenterSelection",
    "MarginKCenterSelection",
    "MarginSelection",
    "PoolScores",
    "RandomSelection",
    "SelectionContext",
    "SelectionStrategy",
    "create_strategy",
    "list_strategies",
    "register_strategy",
]
