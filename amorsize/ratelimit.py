"""Rate limiter: at most ``rate + burst`` calls start in any ``per`` seconds, across workers.

A token bucket in its GCRA form (the generic cell rate algorithm): one "theoretical arrival
time" updated by compare-and-swap in the compiled core (``amorsize/_core_limit.pxi``). Its
slot moves into shared memory when the limiter crosses a process boundary
(``amorsize/_shared.py``), so ``execute(..., rate_limit=limiter)`` bounds the calls of every
worker of the run, threads and processes alike::

    caller ──acquire()──▶ CAS: reserve the next start t  ──▶ sleep(t - now) ──▶ call func
                          (one slot, shared by all workers; callers served in order)

A caller that must wait reserves its turn first and then sleeps exactly until it: nobody
polls, and nobody waits longer than its own turn (``acquire_async`` awaits
``asyncio.sleep``, so the event loop runs other work meanwhile).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from amorsize._core import _RateLimiterCore
from amorsize._shared import Shareable
from amorsize._telemetry import record_rate_limit_wait
from amorsize._validate import check_callable, check_int, check_number, fail

__all__ = ["RateLimiter"]

F = TypeVar("F", bound=Callable[..., Any])
_WHERE = "RateLimiter: "
_MAX_NS = 100 * 365 * 86400 * 10**9


class RateLimiter(_RateLimiterCore, Shareable):
    """At most ``rate + burst`` calls start in any window of ``per`` seconds.

    Starts are spaced ``per / rate`` seconds apart, and up to ``burst`` of them may come
    early after a quiet spell (a token bucket of ``burst + 1`` tokens refilled at ``rate``
    per ``per``). Use it as ``limiter.acquire()`` before a call, ``await
    limiter.acquire_async()``, ``@limiter`` on a function (sync or ``async def``), or
    ``execute(func, data, rate_limit=limiter)``, which limits every call of ``func`` in
    every worker of the run, retries included. Thread-safe and process-safe without a lock.

    ``clock`` and ``sleep`` (tests): a callable giving seconds like ``time.monotonic``, and
    one sleeping like ``time.sleep`` (the defaults are the system-wide monotonic clock,
    ``time.sleep`` and, in ``acquire_async``, ``asyncio.sleep``).

    >>> now = [0.0]
    >>> lim = RateLimiter(2, per=1.0, burst=0, clock=lambda: now[0],
    ...                   sleep=lambda s: now.__setitem__(0, now[0] + s))
    >>> starts = []
    >>> for _ in range(3):
    ...     _ = lim.acquire(); starts.append(now[0])
    >>> starts
    [0.0, 0.5, 1.0]
    """

    def __init__(
        self,
        rate: float,
        per: float = 1.0,
        burst: int = 1,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.rate = check_number(_WHERE, "rate", rate, 0, 1e9, low_open=True, note=" (calls)")
        self.per = check_number(_WHERE, "per", per, 0, 86400.0, low_open=True, note=" (seconds)")
        self.burst = check_int(_WHERE, "burst", burst, 0, 1_000_000, note=" (extra calls)")
        check_callable(_WHERE, "clock", clock, "a callable returning seconds", none=True)
        check_callable(_WHERE, "sleep", sleep, "a callable sleeping for seconds", none=True)
        self.clock = clock
        self.sleep = sleep
        interval = max(1, round(self.per / self.rate * 1e9))
        if (self.burst + 1) * interval > _MAX_NS:  # the core's nanosecond slot would overflow
            fail(
                ValueError, _WHERE, "per / rate * (burst + 1)", "at most 100 years", per,
                fix=f"raise rate or lower per or burst (rate={rate!r}, burst={burst!r})",
            )  # fmt: skip
        self._lower(interval, self.burst * interval)
        self._local_slots(8)

    def acquire(self) -> float:
        """Wait for this call's turn; returns the seconds waited (``0.0``: none)."""
        wait: float = self._reserve()
        if wait > 0.0:
            record_rate_limit_wait(wait)
            (self.sleep or time.sleep)(wait)
        return wait

    async def acquire_async(self) -> float:
        """``acquire`` for coroutines: awaits ``asyncio.sleep`` for its turn (or the injected
        ``sleep``, awaited if it returns an awaitable)."""
        wait: float = self._reserve()
        if wait > 0.0:
            record_rate_limit_wait(wait)
            if self.sleep is not None:
                slept = self.sleep(wait)
                if inspect.isawaitable(slept):
                    await slept
            else:
                import asyncio

                await asyncio.sleep(wait)
        return wait

    def __call__(self, func: F) -> F:
        """Decorate ``func`` (sync or ``async def``): each call first waits for its turn."""
        check_callable(_WHERE, "the decorated object", func)
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def limited_async(*args: Any, **kwargs: Any) -> Any:
                await self.acquire_async()
                return await func(*args, **kwargs)

            return cast("F", limited_async)

        @functools.wraps(func)
        def limited(*args: Any, **kwargs: Any) -> Any:
            self.acquire()
            return func(*args, **kwargs)

        return cast("F", limited)

    def _params(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "per": self.per,
            "burst": self.burst,
            "clock": self.clock,
            "sleep": self.sleep,
        }

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate:g}, per={self.per:g}, burst={self.burst})"


class Limited:
    """``func`` whose every call waits for ``limiter``: what ``execute(rate_limit=...)`` runs.

    Picklable by value (``func`` and the limiter), so every worker rebuilds it, mapped to
    the same limiter state. Keeps ``func``'s name, so errors still name ``func``.
    """

    def __init__(self, func: Callable[..., Any], limiter: RateLimiter) -> None:
        self.func = func
        self.limiter = limiter
        functools.update_wrapper(self, func, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.limiter.acquire()
        return self.func(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.func, self.limiter))


class AsyncLimited(Limited):
    """``Limited`` for an ``async def`` function: awaits its turn, then the call."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        await self.limiter.acquire_async()
        return await self.func(*args, **kwargs)


def limited(func: Callable[..., Any], limiter: RateLimiter, is_async: bool) -> Limited:
    """``func`` limited by ``limiter`` (``is_async``: an ``async def`` function)."""
    return (AsyncLimited if is_async else Limited)(func, limiter)
