"""Async backend: ``async def`` functions run as coroutines on one event loop.

Waiting work written with ``async def`` needs no thread per item: ``n_jobs`` worker
coroutines (often hundreds) wait at once on a single loop, in a single thread. Each task
(a chunk of items) runs as one coroutine that awaits its items one after another; at most
``n_jobs`` tasks are in flight, pulled lazily from the executor's task feed in the calling
thread (observers, gates and the reorder window never run on the loop).

Where the loop runs:

* no loop runs in the calling thread: a fresh loop, driven from the calling thread
  between completions (``_HereLoop``);
* ``execute`` called from inside a coroutine (a loop already runs in this thread, blocked
  while ``execute`` runs): a fresh loop in one helper thread (``_ThreadLoop``);
* ``AsyncBackend(loop=...)`` (what ``execute_async`` uses): the caller's own loop, running
  in another thread; coroutines go to it with ``asyncio.run_coroutine_threadsafe``, so
  they may use what belongs to that loop (sessions, locks, queues).

Imported only when an ``async def`` function runs: ``import amorsize`` never loads asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

from amorsize._format import format_seconds
from amorsize.backends._wire import TaskFeed
from amorsize.backends.base import (
    _NOT_RUN,
    Backend,
    OkValues,
    Outcome,
    Pause,
    StopOnFailure,
    Task,
)

__all__ = [
    "MAX_CONCURRENCY",
    "SPILL_ITEMS",
    "AsyncBackend",
    "AsyncPlan",
    "Sampled",
    "concurrency",
    "plan",
    "spill_count",
]

#: The most coroutines a planned run keeps in flight (the caller may ask for more with
#: ``n_jobs``): beyond this, a waiting workload gains little and the services it calls
#: start to see a flood of connections.
MAX_CONCURRENCY = 1000
# Items awaited (concurrently) to measure the wait before the run is sized.
SAMPLE_ITEMS = 16
#: Items the caller may offer a sample beyond its first ones (``AsyncBackend.sample``'s
#: ``more``): once those leave the loop idle, the next ones start at once, so that waiting
#: work does not spend a whole wave on its sample.
SPILL_ITEMS = MAX_CONCURRENCY - SAMPLE_ITEMS
# How long the sample's first items run before the loop's load is read.
_SPILL_CHECK_S = 1e-3
# Looks at most: a loop found busy is looked at once more, since a garbage collection or a
# first call's imports can fill one 1 ms window (the full test suite on CPython 3.13 read
# 0.68 busy for items that only waited, and they then spent a whole wave waiting).
_SPILL_LOOKS = 2
# The loop busy less than this share of that time: the sampled items wait.
_SPILL_IDLE = 0.5
# Coroutines in flight per coroutine's worth of loop CPU: with in_flight = wait / cpu the
# loop would just be kept busy; the headroom absorbs a noisy sample.
_HEADROOM = 4.0
# A CPU time too small to measure (process_time ticks in microseconds on Linux).
_MIN_CPU = 1e-6
# How long closing waits for cancelled coroutines to unwind on a loop that is not ours.
_SETTLE_SECONDS = 5.0


# --------------------------------------------------------------------------- one task


@dataclass(frozen=True)
class _Fatal:
    """``KeyboardInterrupt`` or ``SystemExit`` raised by a coroutine: returned to the calling
    thread, which raises it (raised on the loop, it would stop a loop thread and leave the
    caller waiting for ever)."""

    exc: BaseException

    def reraise(self) -> None:
        raise self.exc


async def _run_task(
    func: Callable[[Any], Awaitable[Any]], items: list[Any], stop: StopOnFailure | None
) -> list[Outcome] | OkValues | _Fatal:
    """The items of one task awaited in order: ``OkValues``, or one ``Outcome`` per item.

    Each item's ``Exception`` is caught (``CancelledError`` is not one: cancellation ends
    the task). After a failure under ``StopOnFailure`` the rest answer ``NotRunError``.
    """
    if stop is not None and stop.failed:
        return [_NOT_RUN] * len(items)
    values = OkValues()
    out: list[Outcome] | None = None
    for i, item in enumerate(items):
        try:
            value = await func(item)
        except (KeyboardInterrupt, SystemExit) as exc:
            return _Fatal(exc)
        except Exception as exc:
            if out is None:
                out = [Outcome(True, v) for v in values]
            out.append(Outcome(False, exc, getattr(exc, "attempts", 1)))
            if stop is not None:
                stop.failed = True
                out.extend([_NOT_RUN] * (len(items) - i - 1))
                return out
            continue
        if out is None:
            values.append(value)
        else:
            out.append(Outcome(True, value))
    return values if out is None else out


# --------------------------------------------------------------------------- where the loop runs


class _Handle(Protocol):
    def result(self) -> Any: ...
    def cancel(self) -> bool: ...


class _Runner(Protocol):
    def submit(self, coro: Coroutine[Any, Any, Any]) -> _Handle: ...
    def wait(self) -> list[_Handle]: ...
    def close(self, pending: list[_Handle]) -> None: ...


class _HereLoop:
    """A fresh loop in the calling thread, run only while the caller waits for a completion."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.done: deque[asyncio.Task[Any]] = deque()
        self.wake: asyncio.Future[None] | None = None

    def submit(self, coro: Coroutine[Any, Any, Any]) -> _Handle:
        task = self.loop.create_task(coro)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.done.append(task)
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    def wait(self) -> list[_Handle]:
        """At least one finished task (runs the loop until there is one)."""
        if not self.done:
            self.wake = self.loop.create_future()
            self.loop.run_until_complete(self.wake)
        out: list[_Handle] = list(self.done)
        self.done.clear()
        return out

    def close(self, pending: list[_Handle]) -> None:
        """Cancel what is pending, let it unwind (its ``finally`` blocks run), close the loop."""
        loop = self.loop
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


class _ThreadLoop:
    """Coroutines sent to a loop running in another thread: the caller's (``owned=False``)
    or a fresh one in a helper thread of ours."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.done: queue.SimpleQueue[_Handle] = queue.SimpleQueue()
        self.live: set[_Handle] = set()  # submitted, not yet finished: what cancel() stops
        self.thread: threading.Thread | None = None
        if loop is None:
            loop = asyncio.new_event_loop()
            self.thread = threading.Thread(
                target=loop.run_forever, name="amorsize-async-loop", daemon=True
            )
            self.thread.start()
        self.loop = loop

    def submit(self, coro: Coroutine[Any, Any, Any]) -> _Handle:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self.live.add(fut)
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, fut: _Handle) -> None:
        self.live.discard(fut)
        self.done.put(fut)

    def cancel(self) -> None:
        """Cancel every coroutine in flight (from any thread): their results raise
        ``CancelledError`` in the run."""
        for fut in list(self.live):
            fut.cancel()

    def wait(self) -> list[_Handle]:
        """At least one finished task (blocks until there is one)."""
        out = [self.done.get()]
        while True:
            try:
                out.append(self.done.get_nowait())
            except queue.Empty:
                return out

    def close(self, pending: list[_Handle]) -> None:
        """Cancel what is pending and wait (boundedly) until it has unwound; stop our loop."""
        for fut in pending:
            fut.cancel()  # cancels the coroutine's task on its loop too
        if self.thread is None:
            if pending:
                # The caller's loop runs the cancellations in order: once this callback ran,
                # they have been delivered. (A loop that closed meanwhile has none to run.)
                delivered = threading.Event()
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(delivered.set)
                    delivered.wait(_SETTLE_SECONDS)
            return
        settle = asyncio.run_coroutine_threadsafe(_settle(), self.loop)
        concurrent.futures.wait([settle], timeout=_SETTLE_SECONDS)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _settle() -> None:
    """Cancel every other task of this loop and wait until they have unwound."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# --------------------------------------------------------------------------- the backend


class AsyncBackend(Backend):
    """Run an ``async def`` function's coroutines on one event loop, ``n_jobs`` at a time.

    ``loop``: an event loop running in another thread to send the coroutines to (what
    ``execute_async`` passes); by default each run has a fresh loop of its own.

    >>> import asyncio
    >>> async def double(x):
    ...     await asyncio.sleep(0)
    ...     return 2 * x
    >>> b = AsyncBackend()
    >>> sorted(v for _, out in b.run(double, iter([Task(0, [1]), Task(1, [2, 3])]),
    ...                              n_jobs=2, max_in_flight=4) for v in out)
    [2, 4, 6]
    """

    name: ClassVar[str] = "async"
    supports_pause: ClassVar[bool] = True

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.cancelled = False
        self._runners: set[_ThreadLoop] = set()  # on the caller's loop: what cancel() stops

    def cancel(self) -> None:
        """Cancel the coroutines of every run on the caller's loop and refuse new ones
        (``execute_async`` calls it when its awaiting task is cancelled)."""
        self.cancelled = True
        for runner in list(self._runners):
            runner.cancel()

    @contextlib.contextmanager
    def _runner(self) -> Iterator[_Runner]:
        if self.loop is None:
            # A loop already running in this thread is blocked by us: ours runs beside it.
            yield _ThreadLoop() if _in_running_loop() else _HereLoop()
            return
        runner = _ThreadLoop(self.loop)
        self._runners.add(runner)
        try:
            yield runner
        finally:
            self._runners.discard(runner)

    def _check_cancelled(self) -> None:
        if self.cancelled:
            msg = "the run was cancelled (the task awaiting execute_async was cancelled)"
            raise concurrent.futures.CancelledError(msg)

    def run(
        self,
        func: Callable[[Any], Any],
        tasks: Iterator[Task | Pause],
        *,
        n_jobs: int,
        max_in_flight: int,
    ) -> Iterator[tuple[Task, list[Outcome] | OkValues]]:
        """Yield each task with its outcomes in completion order.

        At most ``min(n_jobs, max_in_flight)`` tasks are in flight: a coroutine costs no
        thread, so there is no queue of tasks behind the running ones.
        """
        stop = func if type(func) is StopOnFailure else None
        call = stop.func if stop is not None else func
        limit = max(1, min(n_jobs, max_in_flight))
        feed = TaskFeed(tasks)
        pending: dict[_Handle, Task] = {}
        with self._runner() as runner:
            try:
                while True:
                    self._check_cancelled()
                    while len(pending) < limit and (task := feed.pull()) is not None:
                        pending[runner.submit(_run_task(call, task.items, stop))] = task
                    if not pending:
                        feed.finish()
                        return
                    for handle in runner.wait():
                        outcomes = handle.result()
                        if type(outcomes) is _Fatal:
                            outcomes.reraise()
                        yield pending.pop(handle), outcomes
            finally:
                runner.close(list(pending))

    def sample(
        self, func: Callable[[Any], Any], items: list[Any], more: Sequence[Any] = (), limit: int = 0
    ) -> Sampled:
        """Await ``items`` concurrently, each timed: what ``plan`` sizes the run with.

        If they leave the loop idle for ``_SPILL_CHECK_S`` (they wait; a busy window is
        looked at again, up to ``_SPILL_LOOKS``) and none has finished, the first of ``more``
        join them at once, as many as the run would keep in flight (at most ``limit`` in
        all): ``len(runs)`` says how many ran.
        """
        handles: list[_Handle] = []
        with self._runner() as runner:
            t0 = time.perf_counter()
            try:
                self._check_cancelled()
                start = runner.submit(_loop_clock(0.0))
                handles = [runner.submit(_timed(func, item)) for item in items]
                pending = set(handles)
                if more:
                    room = min(len(more), limit - len(handles))
                    k, seen = self._spill(runner, start, len(handles), room)
                    pending.difference_update(seen)
                    spilled = [runner.submit(_timed(func, item)) for item in more[:k]]
                    handles += spilled
                    pending.update(spilled)
                while pending:
                    pending.difference_update(runner.wait())
            finally:
                runner.close([h for h in handles if not _done(h)])
        wall = time.perf_counter() - t0
        runs = [h.result() for h in handles]
        for run in runs:
            if type(run) is _Fatal:
                run.reraise()
        # Every item ran on the loop's thread, so its thread CPU clock spans them all (the
        # process clock would also count other threads, e.g. a pool still winding down).
        cpu = max((r.cpu_end for r in runs), default=0.0) - min(
            (r.cpu_start for r in runs), default=0.0
        )
        return Sampled([(r.ok, r.value, r.wall) for r in runs], wall, cpu)


    @staticmethod
    def _spill(runner: _Runner, start: _Handle, n: int, room: int) -> tuple[int, list[_Handle]]:
        """How many more items to start beside the ``n`` in flight (at most ``room``), and
        the handles that finished while the loop's load was read."""
        if room <= 0:
            return 0, []
        clocks = [start]
        seen: list[_Handle] = []
        for _ in range(_SPILL_LOOKS):
            check = runner.submit(_loop_clock(_SPILL_CHECK_S))
            clocks.append(check)
            while not _done(check):
                seen.extend(runner.wait())
            if any(all(h is not c for c in clocks) for h in seen):
                return 0, seen  # an item already finished: the sample sizes a run as it is
            (c0, w0), (c1, w1) = clocks[-2].result(), check.result()
            k = spill_count((c1 - c0) / max(w1 - w0, 1e-9), n, room)
            if k:
                return k, seen
        return 0, seen


def spill_count(busy: float, n: int, room: int) -> int:
    """Items to start beside ``n`` sampled ones that kept the loop ``busy`` (a share of its
    time): none when the loop is busy, else all that are offered, up to ``MAX_CONCURRENCY``
    in flight. An idle loop after ``_SPILL_CHECK_S`` cannot tell 2 ms items from 20 ms
    ones, which ``concurrency`` would keep 10x apart; the run after the sample does.

    >>> spill_count(0.9, 16, 984), spill_count(0.2, 16, 984), spill_count(0.2, 16, 4000)
    (0, 984, 984)
    """
    if busy >= _SPILL_IDLE:
        return 0
    return max(0, min(room, MAX_CONCURRENCY - n))


async def _loop_clock(after: float) -> tuple[float, float]:
    """The loop thread's CPU clock and the wall clock, read ``after`` seconds from now."""
    if after > 0:
        await asyncio.sleep(after)
    return time.thread_time(), time.perf_counter()


def _done(handle: _Handle) -> bool:
    return bool(getattr(handle, "done", lambda: True)())


class _Timed(NamedTuple):
    ok: bool
    value: Any  # the result, or the exception
    wall: float
    cpu_start: float  # the loop thread's CPU clock when the item started and ended
    cpu_end: float


async def _timed(func: Callable[[Any], Any], item: Any) -> _Timed | _Fatal:
    """One awaited item, timed."""
    c0 = time.thread_time()
    t0 = time.perf_counter()
    try:
        value = await func(item)
    except (KeyboardInterrupt, SystemExit) as exc:
        return _Fatal(exc)
    except Exception as exc:
        return _Timed(False, exc, time.perf_counter() - t0, c0, time.thread_time())
    return _Timed(True, value, time.perf_counter() - t0, c0, time.thread_time())


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Sampled:
    """Sampled items' ``(ok, value, wall seconds)`` and the batch's wall and CPU seconds."""

    runs: list[tuple[bool, Any, float]]
    wall: float
    cpu: float


@dataclass(frozen=True)
class AsyncPlan:
    """Coroutines in flight (``n_jobs``), items per task and why."""

    n_jobs: int
    chunksize: int
    reason: str


def concurrency(wait_s: float, cpu_s: float, n_left: int | None) -> tuple[int, str]:
    """Coroutines in flight for items that each take ``wait_s`` wall and ``cpu_s`` loop CPU.

    The loop is one thread: ``wait_s / cpu_s`` coroutines in flight keep it just busy (the
    wait fraction ``f = 1 - cpu/wait`` gives ``1 / (1 - f)``); ``_HEADROOM`` times that
    absorbs a noisy sample, capped by the items left and ``MAX_CONCURRENCY``.

    >>> concurrency(0.02, 20e-6, 10_000)[0], concurrency(1e-3, 1e-3, 10_000)[0]
    (1000, 4)
    >>> concurrency(0.02, 20e-6, 50)[0]
    50
    """
    ratio = wait_s / max(cpu_s, _MIN_CPU)
    wanted = max(1, math.ceil(_HEADROOM * max(1.0, ratio)))
    cap = MAX_CONCURRENCY if n_left is None else max(1, min(MAX_CONCURRENCY, n_left))
    fraction = max(0.0, 1.0 - cpu_s / wait_s) if wait_s > 0 else 0.0
    why = (
        f"items wait {fraction:.0%} of their {format_seconds(wait_s)} "
        f"({format_seconds(cpu_s)} of loop CPU each): {_HEADROOM:g} x wait/CPU = {wanted} "
        f"in flight, capped at {cap}"
    )
    return min(wanted, cap), why


def plan(sampled: Sampled, n_left: int | None, n_jobs: int | None, chunksize: int | None) -> AsyncPlan:
    """The async run's sizes from a sample; what the caller fixed takes precedence.

    Chunks of one item: an item that waits gains nothing from sharing a coroutine.
    """
    runs = sampled.runs
    wait_s = sum(r[2] for r in runs) / len(runs) if runs else 0.0
    cpu_s = sampled.cpu / len(runs) if runs else 0.0
    jobs, why = concurrency(wait_s, cpu_s, n_left)
    reason = f"async def function on one event loop: {why}"
    if n_jobs is not None or chunksize is not None:
        given = [f"{k}={v}" for k, v in (("n_jobs", n_jobs), ("chunksize", chunksize)) if v]
        reason += f" (overridden by the caller: {', '.join(given)})"
    return AsyncPlan(n_jobs or jobs, chunksize or 1, reason)
