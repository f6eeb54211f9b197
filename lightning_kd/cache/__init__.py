"""The teacher-output cache and its budget: one mechanism.

:class:`TeacherCache` (``store``) holds the outputs, :class:`TeacherBudget` (``ledger``) the record of what was
paid; both live in one directory, guarded by one lock (``lock``), written in a checksummed format (``format``),
compacted (``compact``), and checked or salvaged by ``verify`` (``lkd cache verify|repair DIR``).
"""

from lightning_kd.cache.budget import LedgerSummary, TeacherBudget
from lightning_kd.cache.errors import CacheCorruptedError, CacheMismatchError, TeacherBudgetExceeded
from lightning_kd.cache.spec import CacheSpec, as_logits, decode_topk, encode_topk
from lightning_kd.cache.store import TeacherCache

__all__ = [
    "CacheCorruptedError",
    "CacheMismatchError",
    "CacheSpec",
    "LedgerSummary",
    "TeacherBudget",
    "TeacherBudgetExceeded",
    "TeacherCache",
    "as_logits",
    "decode_topk",
    "encode_topk",
]
