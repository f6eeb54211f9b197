"""The cache's errors: each names the file (and line or block) at fault and the command that recovers."""

from __future__ import annotations


class TeacherBudgetExceeded(RuntimeError):
    """Raised *before* a teacher call that would exceed the budget."""


class CacheMismatchError(ValueError):
    """The cache directory holds outputs of another teacher, dataset, view protocol or format."""


class CacheCorruptedError(RuntimeError):
    """A file of the cache is missing, truncated, unreadable or fails its checksum.

    Raised instead of reading damaged bookkeeping as "less spent" or serving damaged outputs; the message says
    which ``lkd cache`` command reports and repairs the damage.
    """


def recovery_hint(directory: object) -> str:
    return f" Run `lkd cache verify {directory}` to see what is intact, and `lkd cache repair {directory}` to keep it."
