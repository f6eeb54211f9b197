"""What the budgeted fill needs from a teacher, beyond ``inputs -> logits``.

A teacher is any callable ``inputs -> logits``. It may also carry:

- ``fingerprint`` (str): the identity recorded in the cache manifest (a model's hash, a remote model's version);
- ``max_in_flight`` (int, default 1): how many batches the fill may have in the teacher at once (threads); a
  remote teacher hides network latency with several;
- ``retry`` (:class:`RetryPolicy`, default none): how the fill retries a failed call;
- ``query(inputs, *, key)``: called instead of ``__call__`` when present, with an idempotency ``key`` that is the
  same for every attempt at the same batch (a server that honours it bills a retried request once).

A call that fails raises; :class:`TeacherCallError` tells the budget whether the teacher may have processed (and
billed) the batch. The budget rule: only a failure *known* to have happened before the teacher processed anything
(``processed=False``) gives its reservation back; any other failure keeps it counted, as paid and lost.
Exceptions from a local ``nn.Module`` teacher are known to cost nothing; exceptions of any other type from any
other callable are treated as possibly paid.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

Teacher = Callable[[torch.Tensor], torch.Tensor]


class TeacherCallError(RuntimeError):
    """A teacher call failed.

    Args:
        processed: ``False`` when the failure is known to have happened before the teacher processed anything
            (connection refused, a rejection documented as unprocessed): the call is free. ``True`` or ``None``
            (unknown: a timeout, a connection dropped after sending, a 5xx): the call may have been paid.
        retryable: whether trying again may succeed (5xx, 429, timeouts, connection errors).
        retry_after: seconds the server asked the client to wait (``Retry-After``), if it said.
    """

    def __init__(
        self, message: str, *, processed: bool | None = None, retryable: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.processed, self.retryable, self.retry_after = processed, retryable, retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of failed teacher calls: at most ``attempts`` tries per batch, exponential backoff with full jitter.

    The delay before try ``n + 1`` (n >= 1) is ``uniform(0, min(max_backoff, backoff * 2 ** (n - 1)))``, or the
    server's ``Retry-After`` when it gave one (never less). A retry of a call that may have been paid needs budget
    of its own; see :mod:`lightning_kd.teachers.base`.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("RetryPolicy.backoff and max_backoff must be >= 0")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        cap = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        wait = random.uniform(0, cap) if self.jitter else cap
        return max(wait, retry_after or 0.0)
