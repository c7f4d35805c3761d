"""Retry budget: retries allowed in proportion to the calls made, across every worker.

Finagle's ``RetryBudget`` (``ttl``, ``minRetriesPerSec``, ``percentCanRetry``), gRPC's
``retryThrottling`` and Envoy's ``retry_budget`` share one idea: when a service fails, the
retries of many callers must not multiply its load. Every call deposits, every retry
withdraws, and a retry that the balance does not cover is refused::

    calls (all policies/workers using the budget) ──deposit ratio each──▶ ┌────────────┐
                                                                           │ window of  │
    retry wanted ──withdraw 1──▶ balance + min_per_second * ttl >= 0 ? ──▶ │ ttl seconds│
                         │ yes: sleep, retry    no: RetryExhaustedError(reason="budget")
                         └──────────────────────────────────────────────────────────────

The counters are C atomics on slots (``amorsize/_core_budget.pxi``) that move into shared
memory when the budget crosses a process boundary (``amorsize/_shared.py``), so a budget in a
``RetryPolicy`` given to ``execute`` is one budget for every worker of the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from amorsize._core import _RetryBudgetCore
from amorsize._shared import Shareable
from amorsize._validate import check_callable, check_number

__all__ = ["RetryBudget"]

_WHERE = "RetryBudget: "
_UNIT = 1000  # units one retry withdraws (the core's _BUDGET_UNIT)
_SLOTS = 32  # time slices the core keeps (its AMZ_BUDGET_SLOTS)
_SLICES = 10  # at least this many slices per ttl


class RetryBudget(_RetryBudgetCore, Shareable):
    """At most ``ratio`` retries per call made in the last ``ttl`` seconds, plus a reserve.

    Retries allowed in any ``ttl``-second window: ``ratio * calls + min_per_second * ttl``,
    counted over every function and worker using this budget (Finagle's ``RetryBudget``
    with ``percentCanRetry=ratio``, ``minRetriesPerSec=min_per_second``). Give it to
    ``RetryPolicy(budget=...)``; a refused retry ends the call with ``RetryExhaustedError``
    whose ``reason`` is ``"budget"``. Thread-safe and process-safe without a lock.

    Where it differs from Finagle: the window moves in slices of ``ttl/10`` to ``ttl/20``
    (a power of two of nanoseconds), so a call counts for ``ttl`` give or take one slice; ``ratio`` counts to 1/1000; and two workers racing for
    the last retry may both be refused (never both allowed).

    ``clock`` (tests): a callable giving seconds, like ``time.monotonic`` (the default is
    the system-wide monotonic clock, read coarsely: ~4 ms resolution on Linux).

    >>> b = RetryBudget(ratio=0.5, min_per_second=0.0, ttl=10.0, clock=lambda: 0.0)
    >>> for _ in range(4):
    ...     b._deposit()
    >>> b._withdraw(), b._withdraw(), b._withdraw()
    (True, True, False)
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        ttl: float = 10.0,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.ratio = check_number(_WHERE, "ratio", ratio, 0, 10, note=" (retries per call)")
        self.min_per_second = check_number(
            _WHERE, "min_per_second", min_per_second, 0, 1e6, note=" (retries per second)"
        )
        self.ttl = check_number(_WHERE, "ttl", ttl, 0.1, 86400.0, note=" (seconds)")
        check_callable(_WHERE, "clock", clock, "a callable returning seconds", none=True)
        self.clock = clock
        # Slices of 2**shift ns: the largest power of two with at least _SLICES per ttl.
        shift = math.floor(math.log2(self.ttl * 1e9 / _SLICES))
        live = min(_SLOTS - 1, math.ceil(self.ttl * 1e9 / 2**shift))
        self._lower(
            round(self.ratio * _UNIT), round(self.min_per_second * self.ttl * _UNIT), shift, live
        )
        self._local_slots(8 * _SLOTS)

    @property
    def available(self) -> float:
        """Retries the budget allows now (deposits are fractions of a retry)."""
        value: float = self._available()
        return value

    def _params(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "min_per_second": self.min_per_second,
            "ttl": self.ttl,
            "clock": self.clock,
        }

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio:g}, min_per_second={self.min_per_second:g}, "
            f"ttl={self.ttl:g})"
        )
