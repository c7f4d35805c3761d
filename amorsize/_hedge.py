"""Hedged attempts (``RetryPolicy(hedge_after=...)``): a second try when the first is slow.

For idempotent ``async def`` calls whose latency has a long tail: if an attempt has not
finished ``after`` seconds in, a second copy starts; the first to *succeed* wins, the other
is cancelled. Both failing is one failed attempt (the first failure is raised), which the
retry loop then handles like any other. The compiled retry coroutine
(``_core_retry.pxi``) awaits ``attempt(...)`` in place of ``func(*args, **kwargs)``.

Threads are not hedged: a thread cannot be cancelled, so the loser would run on, holding
a worker, and a sync call would need a pool of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["attempt"]


async def attempt(
    func: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    after: float,
) -> Any:
    """Await ``func(*args, **kwargs)``, hedged by a second call after ``after`` seconds."""
    kw = kwargs or {}
    first = asyncio.ensure_future(func(*args, **kw))
    tasks = {first}
    try:
        done, _ = await asyncio.wait(tasks, timeout=after)
        if done:
            return first.result()
        tasks.add(asyncio.ensure_future(func(*args, **kw)))
        return await _first_success(tasks)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()  # the loser (both, if the caller was cancelled)
            elif not task.cancelled():
                task.exception()  # seen: no "exception was never retrieved" warning


async def _first_success(tasks: set[asyncio.Task[Any]]) -> Any:
    """The result of the first task to succeed; if all fail, the first failure."""
    error: BaseException | None = None
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.cancelled():
                error = error or asyncio.CancelledError()
                continue
            exc = task.exception()
            if exc is None:
                return task.result()
            error = error or exc
    assert error is not None  # every task failed, so one error was kept
    raise error
