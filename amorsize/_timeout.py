"""Per-item time limits and the worker limits of a run (``execute(..., timeout=...)``,
``max_tasks_per_worker=``, ``max_worker_memory=``).

How an item that runs too long is stopped depends on where it runs::

    serial, threads, dask      TimeLimited: the item runs on a helper thread of the calling
                               worker thread, which waits at most ``seconds`` and raises
                               ItemTimeoutError; the helper thread is abandoned (Python
                               cannot stop a thread) and a fresh one serves the next item
    async                      AsyncTimeLimited: the coroutine is cancelled at the deadline
    processes (a watched run)  TimeLimited finds this worker's Watchdog armed: the item runs
                               in the worker's main thread and each attempt marks its
                               deadline (a few stores); the watchdog thread sees a deadline
                               pass, sends what the chunk finished so far, and ends the
                               worker; the parent re-runs the rest, and kills a worker whose
                               watchdog cannot run (backends/processes.py)

``TimeLimited`` sits inside the retry wrapper, so the limit is per attempt and a timed-out
attempt is retried like any ``TimeoutError``.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from amorsize._format import format_bytes, format_seconds

__all__ = ["ItemTimeoutError", "TimeLimited", "Watchdog", "WorkerLimits", "rss_bytes"]


class ItemTimeoutError(TimeoutError):
    """An item ran longer than ``execute(..., timeout=seconds)``.

    ``index`` is the item's input index (``None`` until the executor knows it), ``seconds``
    the limit, ``attempts`` the attempts that timed out. A ``TimeoutError``, so a retry
    policy retries it like any other. Picklable with its attributes.

    >>> str(ItemTimeoutError(0.5, 7))
    'item 7 ran longer than its timeout of 500 ms and was stopped'
    """

    def __init__(self, seconds: float, index: int | None = None, attempts: int = 1) -> None:
        super().__init__()
        self.seconds = seconds
        self.index = index
        self.attempts = attempts

    def __str__(self) -> str:
        which = "an item" if self.index is None else f"item {self.index}"
        tries = f" ({self.attempts} attempts, each)" if self.attempts > 1 else ""
        return (
            f"{which} ran longer than its timeout of {format_seconds(self.seconds)}{tries} "
            "and was stopped"
        )

    def __repr__(self) -> str:
        return f"ItemTimeoutError(seconds={self.seconds!r}, index={self.index!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.seconds, self.index, self.attempts))


def name_index(exc: BaseException, index: int) -> None:
    """Tell an ``ItemTimeoutError`` (also one a retry gave up on) which item it stopped."""
    for err in (exc, getattr(exc, "original_exception", None), exc.__cause__):
        if isinstance(err, ItemTimeoutError) and err.index is None:
            err.index = index


# --------------------------------------------------------------------------- threads


# How often an idle helper checks that the thread it serves still exists.
_IDLE_CHECK_SECONDS = 5.0


class _Helper:
    """A thread that runs one call at a time for its caller thread (the owner); it ends
    once abandoned, or once idle after its owner ended (pool threads come and go)."""

    __slots__ = ("abandoned", "jobs", "owner", "results")

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[Any], Any], Any]] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self.abandoned = False
        self.owner = threading.current_thread()
        threading.Thread(target=self._serve, name="amorsize-timeout", daemon=True).start()

    def _serve(self) -> None:
        while not self.abandoned:
            try:
                func, item = self.jobs.get(timeout=_IDLE_CHECK_SECONDS)
            except queue.Empty:
                if self.owner.is_alive():
                    continue
                return
            try:
                out = (True, func(item))
            except BaseException as exc:  # handed to the caller, which raises it
                out = (False, exc)
            self.results.put(out)


_HELPERS = threading.local()


def _helper() -> _Helper:
    helper: _Helper | None = getattr(_HELPERS, "helper", None)
    if helper is None:
        helper = _HELPERS.helper = _Helper()
    return helper


def _on_helper(func: Callable[[Any], Any], item: Any, seconds: float) -> Any:
    """``func(item)`` on this thread's helper, waiting at most ``seconds``."""
    helper = _helper()
    helper.jobs.put((func, item))
    try:
        ok, value = helper.results.get(timeout=seconds)
    except queue.Empty:
        # The call cannot be stopped: leave its thread to finish alone, and serve the next
        # item on a fresh one.
        helper.abandoned = True
        _HELPERS.helper = None
        raise ItemTimeoutError(seconds) from None
    if ok:
        return value
    raise value


class TimeLimited:
    """``func`` with at most ``seconds`` per call (see the module docstring for how).

    >>> TimeLimited(abs, 1.0)(-2)
    2
    """

    def __init__(self, func: Callable[[Any], Any], seconds: float) -> None:
        self.func = func
        self.seconds = seconds
        # Instance attributes, not properties: what retry messages and backends name the
        # function after (a class body cannot define __qualname__ as a property).
        self.__name__ = str(getattr(func, "__name__", type(func).__name__))
        self.__qualname__ = str(getattr(func, "__qualname__", self.__name__))
        object.__setattr__(self, "__module__", getattr(func, "__module__", None))

    def __call__(self, item: Any) -> Any:
        guard = _ARMED
        if guard is None:
            return _on_helper(self.func, item, self.seconds)
        # Watchdog.attempt, inlined: this runs once per item attempt.
        if guard.firing:
            guard.halt()
        slot = guard.slot = (guard.clock() + self.seconds, len(guard.done))
        shared = guard.shared
        if shared is not None:
            shared[1] = slot[1]
            shared[0] = slot[0]
        try:
            return self.func(item)
        finally:
            guard.slot = None
            if shared is not None:
                shared[0] = 0.0

    def __repr__(self) -> str:
        return repr(self.func)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.func, self.seconds))


class AsyncTimeLimited(TimeLimited):
    """An ``async def`` ``func`` whose coroutine is cancelled after ``seconds``."""

    async def __call__(self, item: Any) -> Any:
        import asyncio  # only async runs pay for it

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        coro: Awaitable[Any] = self.func(item)
        try:
            return await asyncio.wait_for(coro, self.seconds)
        except (TimeoutError, asyncio.TimeoutError):
            if loop.time() - t0 < self.seconds:
                raise  # func's own TimeoutError, not our deadline
            raise ItemTimeoutError(self.seconds) from None


# --------------------------------------------------------------------------- processes


class Watchdog:
    """A process worker's guard: ends the worker when an attempt passes its deadline.

    The worker's main thread marks each attempt (``attempt``: its deadline and its item's
    position in the chunk, ``len(done)``, in one attribute); the watchdog thread sleeps until
    the nearest deadline and, if that attempt is still running, calls ``fire(position)``
    under ``lock`` (it reports and ends the process). The worker
    sends its own messages under ``lock`` too, so the two never interleave on the pipe.
    ``clock`` and ``sleep`` are injectable for tests (by default the watchdog sleeps on
    ``wake``, which ``retune`` sets: a worker kept for a run with a shorter timeout must not
    sleep on through the last run's longer one); ``fire`` normally never returns (the
    watchdog thread ends if it does).
    """

    def __init__(
        self,
        seconds: float,
        fire: Callable[[int], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        shared: Any = None,
    ) -> None:
        self.seconds = seconds
        self.fire = fire
        self.clock = clock
        self.wake = threading.Event()
        self.firing = False  # set (and never cleared) when an attempt is reported overdue
        # A two-double shared array: [deadline, position] of the running attempt (deadline
        # 0: none), which the parent reads when the watchdog itself cannot run (see
        # processes._Run._overdue); None: not shared.
        self.shared = shared
        self.sleep = sleep or self._nap
        self.lock = threading.Lock()
        self.busy = threading.Event()  # a chunk is running
        # The running attempt: (deadline, position of its item in the chunk).
        self.slot: tuple[float, int] | None = None
        self.done: list[Any] = []  # the running chunk's results (or outcomes) so far
        threading.Thread(target=self._watch, name="amorsize-watchdog", daemon=True).start()

    def _nap(self, seconds: float) -> None:
        self.wake.wait(seconds)
        self.wake.clear()

    def retune(self, seconds: float) -> None:
        """A new run's limit: the watchdog wakes and sleeps again by the new one."""
        self.seconds = seconds
        self.wake.set()

    def halt(self) -> None:
        """Block for good: the watchdog is reporting an overdue item and ending the process,
        so no later item may start (it would run again elsewhere)."""
        with self.lock:
            pass

    def attempt(self, func: Callable[[Any], Any], item: Any, seconds: float) -> Any:
        """``func(item)`` as one watched attempt (``TimeLimited`` inlines this, and also
        publishes the attempt in ``shared``)."""
        if self.firing:
            self.halt()
        self.slot = (self.clock() + seconds, len(self.done))
        try:
            return func(item)
        finally:
            self.slot = None

    def _watch(self) -> None:
        while True:
            slot = self.slot
            if slot is None:
                if self.busy.is_set():
                    self.sleep(self.seconds)  # between attempts: none can be overdue yet
                else:
                    self.busy.wait()
                continue
            left = slot[0] - self.clock()
            if left > 0:
                self.sleep(left)
                continue
            with self.lock:
                if self.slot is slot:
                    self.firing = True
                    self.fire(slot[1])
                    return


_ARMED: Watchdog | None = None


def arm(guard: Watchdog | None) -> None:
    """Make ``guard`` the one ``TimeLimited`` reports to in this process (``None``: none)."""
    global _ARMED
    _ARMED = guard


def _forget_helpers() -> None:
    # A forked child has none of its parent's threads: its helpers must be started afresh.
    global _HELPERS
    _HELPERS = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


# --------------------------------------------------------------------------- run limits


@dataclass
class WorkerLimits:
    """What a processes run limits per worker, and what the limits did (``recycled``).

    ``timeout``: seconds per attempt; ``timeout_retries``: times a timed-out item is re-run
    on a fresh worker before it fails; ``max_tasks``: items a worker runs in its life;
    ``max_memory``: bytes of RSS after which a worker is replaced.
    """

    timeout: float | None = None
    timeout_retries: int = 0
    max_tasks: int | None = None
    max_memory: int | None = None
    recycled: int = 0

    def __str__(self) -> str:
        parts = []
        if self.max_tasks is not None:
            parts.append(f"{self.max_tasks} items")
        if self.max_memory is not None:
            parts.append(f"{format_bytes(self.max_memory)} RSS")
        return " or ".join(parts)


_PROCESS: dict[int, Any] = {}  # pid -> its psutil.Process


def rss_bytes() -> int:
    """This process's resident memory: psutil when installed, else ``/proc/self/statm``
    (Linux), else the peak RSS from ``resource.getrusage`` (an upper bound: it never drops)."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        proc = _PROCESS.get(os.getpid())
        if proc is None:  # one per process: building it costs more than reading the RSS
            _PROCESS.clear()
            proc = _PROCESS[os.getpid()] = psutil.Process()
        return int(proc.memory_info().rss)
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
