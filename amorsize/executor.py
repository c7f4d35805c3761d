"""``execute(func, data)``: run the optimizer's plan (or yours) on a backend.

Data flow::

    data ──▶ optimizer (auto) ──▶ plan: backend, n_jobs, chunksize, data', sample results
              │                      (sampled items are never run again)
              ▼
    data' ──▶ _UnknownItems: known()/sample results ──▶ ready queue ──────────┐
              │ consecutive unknown items ─▶ Task(start, items)                │
              │ allow_dispatch() / reorder window gate each Task (_tasks)      │
              ▼                                                                ▼
    backend.run(func or retry wrapper, tasks) ─▶ (task, outcomes) ─▶ _Execution.result_blocks():
              on_success / on_failure, failure policy, progress  ─▶ (start, values)
                                                                      │
        execute: one list in input order ◀────────────────────────────┤
        execute_iter: values in input order (reorder buffer) or as completed

A run is a sequence of named steps (``_Execution``): begin (observers, sampling and the
plan), reuse the samples, run the tasks (the dispatch loop), finish (the report, closing
everything). The options are checked once into a frozen ``_RunOptions``.

The loop, the observers and the ordering all run in the calling thread; only the backend
moves chunks to workers and outcomes back (see ``amorsize.backends.base``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import multiprocessing
import operator
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import length_hint
from types import FunctionType
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from amorsize import _telemetry
from amorsize._core import SerialMap, SerialStream, serial_extend
from amorsize._log import RUN_ID, log_item_failed, new_run_id
from amorsize._observers import DispatchStoppedError, ItemFailure, RunObserver
from amorsize._schedule import ChunkSizer
from amorsize._timeline import ChunkSpan, Timeline, forget, take
from amorsize._validate import (
    MAX_SECONDS,
    MAX_WORKERS,
    check_bool,
    check_int,
    check_number,
    fail,
)
from amorsize.backends import BACKEND_NAMES, REGISTRY, auto_backends, get_backend, warm_workers
from amorsize.backends.base import (
    PAUSE,
    Backend,
    NotRunError,
    OkValues,
    Outcome,
    Pause,
    RemoteTraceback,
    StopOnFailure,
    Task,
    WorkerCrashedError,
)
from amorsize.backends.serial import SerialBackend
from amorsize.sampling import ItemRun, SampledFailure, SpillRunner, TimedCall
from amorsize.system import available_cpus, get_system_info

if TYPE_CHECKING:
    from amorsize.ratelimit import RateLimiter

__all__ = [
    "ChunkSpan",
    "DispatchStoppedError",
    "ExecutionPlan",
    "ItemFailure",
    "RunObserver",
    "RunReport",
    "execute",
    "execute_async",
    "execute_iter",
]

# Tasks in flight per worker: one running, one queued, so no worker waits for the parent.
_IN_FLIGHT_PER_WORKER = 2
# ordered execute_iter keeps at most this many tasks' worth of finished-but-unemitted items
# beyond those in flight before it pauses dispatch (bounded memory on infinite input).
_REORDER_TASKS = 4
# Chunk size for the serial backend when none is planned: big enough that the loop costs
# nothing per item, small enough that progress and checkpoints advance often.
_SERIAL_CHUNK = 64
# With a measured item time, serial chunks hold ~1 ms of work (per-chunk bookkeeping of ~3 us,
# measured with /tmp-style loops of execute(tiny, range(200_000), backend="serial"), is then
# under 1%), capped so that a chunk of nanosecond items stays a modest list.
_SERIAL_CHUNK_SECONDS = 1e-3
_SERIAL_CHUNK_MAX = 4096
# Items read at once from the input to ask observers which results they already hold, before
# the plan (and its chunk size) is known.
_SCAN_BLOCK = 256
# Sizes when the optimizer has no plan for the backend asked for: four chunks per worker
# balance the load.
_CHUNKS_PER_WORKER = 4
_FALLBACK_CHUNK = 16
# Workers a sample's batch may spread over once it leaves the caller: the batch is ~15
# items (a few percent of the run), so more would start processes for a handful of items
# each, for a plan that may yet be serial.
_SAMPLE_WORKERS = 4

_ON_ERROR = ("raise", "collect")
# Backends whose chunk sizes adapt during a run (``_schedule``), with the machine fact that
# prices one task on them. Others (dask batches its own tasks) keep the plan's size.
_ADAPTIVE = {"threads": "thread_roundtrip_s", "processes": "process_roundtrip_s"}


@dataclass
class RunReport:
    """What ``execute`` decided and what happened (``return_plan=True`` returns it).

    ``optimization`` is the optimizer's result when it was consulted (None when
    ``backend``, ``n_jobs`` and ``chunksize`` were all given). Times are seconds.

    >>> from amorsize import execute
    >>> results, plan = execute(abs, [-1, -2], backend="serial", return_plan=True)
    >>> plan.backend, plan.items, plan.failed
    ('serial', 2, 0)
    """

    backend: str
    n_jobs: int
    chunksize: int
    reason: str
    optimization: Any = None
    predicted_seconds: float | None = None
    wall_seconds: float = 0.0
    items: int = 0
    completed: int = 0
    failed: int = 0
    reused: int = 0
    skipped: int = 0
    not_attempted: int = 0
    failures: list[ItemFailure] = field(default_factory=list)
    # Smallest and largest chunk of a parallel run whose chunk sizes adapted as chunks
    # completed (None: every chunk had the plan's size), and each change of size with why.
    chunk_sizes: tuple[int, int] | None = None
    replans: list[str] = field(default_factory=list)
    # Input indices of failures a dead-letter queue (an observer) recorded: the run went on.
    dead_lettered: list[int] = field(default_factory=list)
    # Retries counted by the retry policy, when its wrapper ran in this process (serial,
    # threads, async); None when the workers counted them (processes, dask) or no retry.
    retries: int | None = None
    # The chunks' timeline (``amorsize._timeline.Timeline``), recorded when ``report=`` was
    # given or an observer watches chunks (``RunObserver.on_chunk``); else None.
    timeline: Timeline | None = None
    # Worker processes replaced for reaching max_tasks_per_worker or max_worker_memory.
    workers_recycled: int = 0

    @property
    def items_per_second(self) -> float:
        """Items accounted for per second of wall time."""
        return self.items / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def predicted_over_measured(self) -> float | None:
        """Predicted / measured wall time (1.0 = spot on; < 1: the run took longer)."""
        if self.predicted_seconds is None or self.wall_seconds <= 0:
            return None
        return self.predicted_seconds / self.wall_seconds

    def __str__(self) -> str:
        lines = [
            f"execute: {self.backend} with n_jobs={self.n_jobs}, chunksize={self.chunksize}",
            f"  why: {self.reason}",
            f"  items: {self.items} ({self.completed} ok, {self.failed} failed, "
            f"{self.not_attempted} not attempted; {self.reused} reused from sampling, "
            f"{self.skipped} from a checkpoint)",
            f"  measured: {self.wall_seconds:.4g} s, {self.items_per_second:,.0f} items/s",
        ]
        if self.chunk_sizes is not None:
            lo, hi = self.chunk_sizes
            lines.append(
                f"  chunks: {lo}-{hi} items (smaller toward the end, so the last finish "
                f"together; re-planned {len(self.replans)} times"
                + (f", last {self.replans[-1]})" if self.replans else ")")
            )
        if self.workers_recycled:
            lines.append(f"  workers recycled: {self.workers_recycled}")
        if self.predicted_seconds is not None:
            ratio = self.predicted_over_measured
            lines.append(
                f"  predicted: {self.predicted_seconds:.4g} s"
                + (f" (predicted/measured = {ratio:.2f})" if ratio is not None else "")
            )
        return "\n".join(lines)


ExecutionPlan = RunReport
"""Deprecated alias of :class:`RunReport`, its former name (the object reports a run; it is
not the plan): kept until 1.0, without a warning for now. New code uses ``RunReport``."""


# --------------------------------------------------------------------------- options


def _check_call(func: Any, data: Any) -> None:
    if not callable(func):
        msg = f"func must be callable (it is applied to each item); got {func!r}"
        raise TypeError(msg)
    try:
        iter(data)
    except TypeError:
        msg = f"data must be an iterable (list, range, generator...); got {type(data).__name__}"
        raise TypeError(msg) from None


def _check_sizes(api: str, n_jobs: Any, chunksize: Any) -> tuple[int | None, int | None]:
    """``n_jobs`` (-1: every available CPU) and ``chunksize``, checked and normalised."""
    where = f"{api}(): "
    if type(n_jobs) is int and n_jobs == -1:
        jobs: int | None = available_cpus()
    else:
        jobs = check_int(
            where, "n_jobs", n_jobs, 1, MAX_WORKERS, none=True, note=" (-1: every CPU)"
        )
    return jobs, check_int(where, "chunksize", chunksize, 1, none=True)


def _check_backend(value: Any) -> str | Backend:
    if isinstance(value, Backend):
        return value
    if value == "auto" or (isinstance(value, str) and value in BACKEND_NAMES):
        return cast(str, value)
    msg = (
        f"backend must be 'auto', one of {list(BACKEND_NAMES)}, or a Backend instance "
        f"(amorsize.backends.get_backend(...)); got {value!r}"
    )
    raise ValueError(msg)


def _is_async(func: Any) -> bool:
    """Whether calling ``func`` gives a coroutine: ``async def``, also through
    ``functools.partial``, a bound method, ``with_retry`` or an ``async def __call__``."""
    if type(func) is FunctionType and not hasattr(func, "_is_coroutine_marker"):
        # A plain function (most calls): its code says it all. (Python 3.12's
        # inspect.markcoroutinefunction sets that attribute on functions it marks.)
        return bool(func.__code__.co_flags & inspect.CO_COROUTINE)
    if inspect.iscoroutinefunction(func):
        return True
    core = sys.modules.get("amorsize._core")  # not loaded: func cannot be with_retry's
    inner = func
    while isinstance(inner, functools.partial):
        inner = inner.func
    if core is not None and isinstance(inner, core.AsyncRetryingFunction):
        return True  # whatever this Python's inspect makes of it
    call = getattr(func, "__call__", None)  # noqa: B004 - the method itself is inspected
    return not inspect.isroutine(func) and inspect.iscoroutinefunction(call)


def _check_async(func: Any, backend: str | Backend, is_async: bool) -> None:
    """``async def`` functions run on the async backend, and only they do."""
    name = backend.name if isinstance(backend, Backend) else backend
    if is_async and name not in ("auto", "async"):
        msg = (
            f"func {func!r} is an async def function (calling it gives a coroutine), which "
            f"backend={name!r} would not await: use backend='async' or 'auto'"
        )
        raise ValueError(msg)
    if not is_async and name == "async":
        msg = (
            f"backend='async' awaits coroutines, but func {func!r} is not an async def "
            f"function; define it with async def, or use backend='auto' for a plain function"
        )
        raise TypeError(msg)


def _retry_policy(retry: Any) -> Any:
    if retry is None or retry is False:
        return None
    from amorsize.retry import RetryPolicy

    if retry is True:
        return RetryPolicy()
    if isinstance(retry, RetryPolicy):
        return retry
    msg = f"retry must be None, True, False or an amorsize.RetryPolicy; got {retry!r}"
    raise TypeError(msg)


def _retrying(
    func: Callable[[Any], Any], policy: Any, is_async: bool = False
) -> Callable[[Any], Any]:
    """``func`` retried per item under ``policy``, compiled; picklable when both are.

    A final failure names ``func`` itself and carries ``attempts`` (the calls made), which
    the worker reports with it. An ``async def`` function is retried by ``with_retry``'s
    coroutine, which awaits ``asyncio.sleep`` between attempts.
    """
    # policy is a RetryPolicy: retry.py, and so the core, is loaded already.
    from amorsize._core import AsyncRetryingFunction, RetryingItemFunction

    cls = AsyncRetryingFunction if is_async else RetryingItemFunction
    return cast("Callable[[Any], Any]", cls(func, policy))


def _rate_limit(api: str, rate_limit: Any) -> Any:
    if rate_limit is None:
        return None
    from amorsize.ratelimit import RateLimiter

    if not isinstance(rate_limit, RateLimiter):
        fail(TypeError, f"{api}(): ", "rate_limit", "an amorsize.RateLimiter or None", rate_limit)
    return rate_limit


def _shared_state(api: str, be: str | Backend, client: Any, objs: tuple[Any, ...]) -> bool:
    """Whether the run must move ``objs`` (a limiter, a budget) into shared memory.

    Raises, before anything runs, for a backend whose workers may be on other machines.
    """
    if not objs:
        return False
    name = be.name if isinstance(be, Backend) else be
    spec = REGISTRY.get(name)
    if (spec is not None and spec.cluster) or (name == "auto" and client is not None):
        what = " and ".join(type(o).__name__ for o in objs)
        msg = (
            f"{api}(): the {what} cannot be shared with backend={name!r}: its workers may "
            f"run on other machines, which the {what}'s shared memory does not reach; run "
            f"with backend='processes' or 'threads', or limit the calls inside func instead"
        )
        raise ValueError(msg)
    # Shared for every run, in-process ones too: sampling pickles func to size it, and a
    # pickled limiter or budget would otherwise stay shared after the run.
    return True
def _check_limits(
    api: str, be: str | Backend, timeout: Any, max_tasks: Any, max_memory: Any
) -> tuple[float | None, int | None, int | None]:
    """``timeout`` (seconds per attempt) and the worker recycling limits, checked."""
    where = f"{api}(): "
    seconds = check_number(
        where, "timeout", timeout, 0, MAX_SECONDS, low_open=True, none=True,
        note=" (seconds per item attempt; None: no limit)",
    )  # fmt: skip
    tasks = check_int(where, "max_tasks_per_worker", max_tasks, 1, none=True)
    memory = check_int(
        where, "max_worker_memory", max_memory, 1, none=True, note=" (bytes of RSS)"
    )
    name = be.name if isinstance(be, Backend) else be
    recycles = getattr(be, "supports_limits", False) or be == "processes"
    for param, value in (("max_tasks_per_worker", tasks), ("max_worker_memory", memory)):
        if value is not None and not recycles:
            fail(
                ValueError, where, param, "None unless backend='processes' (only worker "
                f"processes are recycled; the backend here is {name!r})", value,
                fix="pass backend='processes', or drop the option",
            )  # fmt: skip
    return seconds, tasks, memory


def _timeout_retries(policy: Any) -> int:
    """Times the retry policy re-runs an item whose attempt timed out (processes backend)."""
    if policy is None:
        return 0
    from amorsize._timeout import ItemTimeoutError

    if not issubclass(ItemTimeoutError, policy.retry_on_exceptions or (Exception,)):
        return 0
    return sys.maxsize if policy.max_retries < 0 else int(policy.max_retries)


def _build_observers(
    func: Callable[[Any], Any],
    data: Any,
    checkpoint: Any,
    dead_letter: Any,
    circuit_breaker: Any,
    observers: Sequence[RunObserver] | None,
) -> tuple[RunObserver, ...]:
    # Imported on demand: a run without them loads no SQLite and no breaker.
    out: list[RunObserver] = []
    if checkpoint is not None:
        from amorsize.checkpoint import checkpoint_observer

        out.append(checkpoint_observer(checkpoint, func, data))
    if dead_letter is not None:
        from amorsize.dlq import dead_letter_observer

        out.append(dead_letter_observer(dead_letter))
    if circuit_breaker is not None:
        from amorsize.circuit import circuit_observer

        out.append(circuit_observer(circuit_breaker))
    if observers is not None:
        if isinstance(observers, RunObserver) or not isinstance(observers, Sequence):
            msg = f"observers must be a list of RunObserver; got {observers!r}"
            raise TypeError(msg)
        for obs in cast("Sequence[object]", observers):
            if not isinstance(obs, RunObserver):
                msg = f"observers must hold RunObserver instances; got {obs!r}"
                raise TypeError(msg)
        out.extend(observers)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _RunOptions:
    """``execute``'s options, checked and normalised once (:meth:`build`).

    ``absorbs_failures``: an observer may record a failure so that the run goes on (a
    dead-letter queue, or a user observer overriding ``on_failure``). ``ordered_window``:
    ``execute_iter(ordered=True)`` bounds its reorder buffer by pausing dispatch.
    """

    n_jobs: int | None
    chunksize: int | None
    backend: str | Backend
    retry: Any  # a RetryPolicy, or None
    collect: bool
    progress: bool
    verbose: bool
    client: Any
    observers: tuple[RunObserver, ...]
    absorbs_failures: bool
    ordered_window: bool = False
    is_async: bool = False  # func is an async def function: the async backend runs it
    rate_limit: Any = None  # a RateLimiter, or None
    shared: tuple[Any, ...] = ()  # limiter / budget moved to shared memory for the run
    report: str | None = None  # the run report's path (.html or .png), checked
    timeout: float | None = None  # seconds per item attempt
    max_tasks: int | None = None  # items a worker process runs before it is replaced
    max_memory: int | None = None  # bytes of RSS past which a worker process is replaced

    @property
    def keep_going(self) -> bool:
        """A failure does not end the run (a failed sample is then a data point)."""
        return self.collect or self.absorbs_failures

    @classmethod
    def build(
        cls,
        api: str,
        func: Any,
        data: Any,
        *,
        n_jobs: Any,
        chunksize: Any,
        backend: Any,
        retry: Any,
        on_error: Any,
        progress: Any,
        verbose: Any,
        client: Any,
        checkpoint: Any,
        dead_letter: Any,
        circuit_breaker: Any,
        observers: Any,
        ordered_window: bool = False,
        trace_chunks: Any = False,
        rate_limit: Any = None,
        report: Any = None,
        timeout: Any = None,
        max_tasks_per_worker: Any = None,
        max_worker_memory: Any = None,
    ) -> _RunOptions:
        """The options of ``api`` (``execute`` or ``execute_iter``), as the user gave them."""
        _check_call(func, data)
        given = (
            n_jobs, chunksize, retry, client, checkpoint, dead_letter, circuit_breaker,
            observers, rate_limit, report, timeout, max_tasks_per_worker, max_worker_memory,
        )  # fmt: skip
        if (
            given == _NOTHING_GIVEN and backend == "auto" and on_error == "raise"
            and progress is False and verbose is False and trace_chunks is False
            and not _telemetry_observers(False)
        ):  # fmt: skip
            # The plain call (execute(func, data)): nothing to check, and the checks cost
            # ~1 % of a 10 ms run of x * x items (bench_oracle.py tiny_xx, cold).
            return _plain_options(_is_async(func), ordered_window)
        jobs, chunk = _check_sizes(api, n_jobs, chunksize)
        be = _check_backend(backend)
        if on_error not in _ON_ERROR:
            msg = f"on_error must be 'raise' or 'collect'; got {on_error!r}"
            raise ValueError(msg)
        check_bool(f"{api}(): ", "progress", progress)
        check_bool(f"{api}(): ", "verbose", verbose)
        if be == "serial" and jobs not in (None, 1):
            msg = f"n_jobs must be 1 (or None) with backend='serial'; got {n_jobs!r}"
            raise ValueError(msg)
        if client is not None and be not in ("auto", "dask") and not isinstance(be, Backend):
            msg = f"client= only applies to backend='dask' or 'auto'; got backend={backend!r}"
            raise ValueError(msg)
        seconds, max_tasks, max_memory = _check_limits(
            api, be, timeout, max_tasks_per_worker, max_worker_memory
        )
        is_async = _is_async(func)
        _check_async(func, be, is_async)
        policy = _retry_policy(retry)
        check_bool(f"{api}(): ", "trace_chunks", trace_chunks)
        limiter = _rate_limit(api, rate_limit)
        objs = tuple(o for o in (limiter, getattr(policy, "budget", None)) if o is not None)
        shared = objs if _shared_state(api, be, client, objs) else ()
        obs = _build_observers(func, data, checkpoint, dead_letter, circuit_breaker, observers)
        obs += _telemetry_observers(trace_chunks)
        absorbs = dead_letter is not None or any(
            _overrides(o, "on_failure") for o in observers or ()
        )
        target = None
        if report is not None:
            from amorsize.report import check_target

            target = check_target(f"{api}(): ", report)
        return cls(
            n_jobs=jobs, chunksize=chunk, backend=be, retry=policy,
            collect=on_error == "collect", progress=progress, verbose=verbose, client=client,
            observers=obs, absorbs_failures=absorbs, ordered_window=ordered_window,
            is_async=is_async, rate_limit=limiter, shared=shared, report=target,
            timeout=seconds, max_tasks=max_tasks, max_memory=max_memory,
        )  # fmt: skip


_NOTHING_GIVEN = (None,) * 13  # _RunOptions.build's ``given``: every option at its default


@functools.cache
def _plain_options(is_async: bool, ordered_window: bool) -> _RunOptions:
    """The options of a call that gives none (one shared, immutable instance each)."""
    return _RunOptions(
        n_jobs=None, chunksize=None, backend="auto", retry=None, collect=False,
        progress=False, verbose=False, client=None, observers=(), absorbs_failures=False,
        ordered_window=ordered_window, is_async=is_async,
    )  # fmt: skip


def _telemetry_observers(trace_chunks: bool) -> tuple[RunObserver, ...]:
    """The OpenTelemetry observer when a provider is set (none without opentelemetry)."""
    obs = _telemetry.run_observer(trace_chunks)
    return () if obs is None else (obs,)


# Hooks that see items or chunks: an observer overriding none of them watches the run only
# as a whole (begin, planned, end), so a serial plan may still take the fast path.
_ITEM_HOOKS = (
    "known", "known_block", "allow_dispatch", "on_success", "on_success_block", "on_failure",
)  # fmt: skip


def _not_run_message(count: int) -> str:
    return (
        f"{count} item(s) were not run: a worker skipped them after an item failed "
        "(on_error='raise' stops at the first failure), but that failure was lost with its "
        "worker; run again to see it"
    )


def _overrides(obs: RunObserver, *names: str) -> bool:
    """Whether ``obs`` implements any of these hooks (the base class's are no-ops)."""
    return any(getattr(type(obs), n) is not getattr(RunObserver, n) for n in names)


def _length(data: Any) -> int | None:
    if iter(data) is data:
        return None
    try:
        return len(data)
    except TypeError:
        return None


# --------------------------------------------------------------------------- planning


def _predicted(opt: Any) -> float | None:
    """The optimizer's predicted wall seconds for its chosen plan (``Estimate.chosen``)."""
    chosen = getattr(getattr(opt, "estimated_seconds", None), "chosen", None)
    return float(chosen) if isinstance(chosen, (int, float)) else None


@dataclass
class _Plan:
    backend: Backend
    n_jobs: int
    chunksize: int
    reason: str
    data: Iterable[Any]
    sample_results: Sequence[Any]
    optimization: Any
    predicted: float | None
    # The sampled failure that stopped sampling (raise mode): delivered, never run again.
    stopped: SampledFailure | None = None


@dataclass(frozen=True)
class _SampleRules:
    """How the optimizer samples for a run (see ``execute``'s docstring on where items run).

    ``keep_going``: a failed sample is a data point (collect mode, dead-letter queue).
    ``index_of``: the input index of the k-th item sampled (a stream skipping known items).
    """

    keep_going: bool
    index_of: Callable[[int], int] | None


def _remote_sampler(
    be: Backend | Callable[[], Backend],
    func: Callable[[Any], Any],
    stop: bool,
    *,
    optional: bool = False,
    workers: int | None = 1,
) -> Callable[[int, list[Any], float], list[ItemRun | None]]:
    """Run batches of sampled items in ``be``'s workers: a crash is reported, not fatal.
    (``be`` may be a function giving the backend when first needed: importing the
    processes backend cost ~10 ms of a first call that never samples remotely.)

    ``be`` may be a function giving the backend on first use (most samples never leave
    the caller). ``optional`` (backend="auto"): a function that cannot reach the workers
    (not picklable, not importable there) leaves the items to the caller instead of
    failing the run. A batch is shared by up to ``workers`` workers (None: the usable
    cores, at most ``_SAMPLE_WORKERS``, read when a batch first leaves the caller), in
    consecutive runs of items: the plan that follows would start them anyway.
    """

    def run(first: int, items: list[Any], budget_s: float) -> list[ItemRun | None]:
        nonlocal be, workers
        if not isinstance(be, Backend):
            be = be()
        if workers is None:
            workers = max(1, min(math.floor(get_system_info().usable_cores), _SAMPLE_WORKERS))
        got: dict[int, ItemRun | None] = {}
        call = TimedCall(func, stop=stop, budget_s=budget_s)
        try:
            tasks = _sample_tasks(first, items, workers)
            for task, outcomes in be.run(
                call, iter(tasks), n_jobs=len(tasks), max_in_flight=len(tasks)
            ):
                all_ok = type(outcomes) is OkValues
                for k, out in enumerate(outcomes):
                    got[task.start + k - first] = _item_run(Outcome(True, out) if all_ok else out)
        except (TypeError, RuntimeError) as exc:
            if not optional or got:
                raise
            return [ItemRun(False, exc, math.nan, travelled=False)] * len(items)
        return [got.get(k) for k in range(len(items))]

    return run


def _sample_tasks(first: int, items: list[Any], workers: int) -> list[Task]:
    """``items`` (from input position ``first``) as up to ``workers`` consecutive tasks of
    near-equal size.

    >>> [(t.start, t.items) for t in _sample_tasks(10, [1, 2, 3], 2)]
    [(10, [1]), (11, [2, 3])]
    """
    n = max(1, min(workers, len(items)))
    cuts = [len(items) * k // n for k in range(n + 1)]
    return [Task(first + a, items[a:b]) for a, b in itertools.pairwise(cuts)]


def _item_run(out: Outcome) -> ItemRun | None:
    """A worker's outcome for a ``TimedCall`` as the sample's measurement."""
    if not out.ok:
        # The worker died on it, or the item or its outcome could not cross the boundary.
        exc = out.value
        crashed = isinstance(exc, WorkerCrashedError)
        return ItemRun(False, exc, math.nan, attempts=out.attempts, crashed=crashed,
                       travelled=crashed)
    if out.value is None:
        return None  # not run: an earlier item of its batch failed
    ok, value, tb, seconds, cpu, waits, mem = out.value
    attempts = 1
    if not ok:
        value.__cause__ = RemoteTraceback(tb)
        attempts = getattr(value, "attempts", 1)
    return ItemRun(ok, value, seconds, cpu, waits, mem, attempts if isinstance(attempts, int) else 1)


def _sample_where(
    backend: str | Backend,
    names: tuple[str, ...],
    func: Callable[[Any], Any],
    keep_going: bool,
    n_jobs: int | None = None,
) -> dict[str, Any]:
    """The optimizer's options saying where sampled items run (a worker or the caller),
    and in how many workers (``n_jobs`` at most ``_SAMPLE_WORKERS``; None: see
    ``_remote_sampler``)."""
    if isinstance(backend, Backend) and backend.name == "processes":
        be: Backend | Callable[[], Backend] = backend
    elif backend in ("auto", "processes") and "processes" in names:
        be = functools.partial(get_backend, "processes")
    else:
        return {}
    auto = backend == "auto"
    workers = None if n_jobs is None else max(1, min(n_jobs, _SAMPLE_WORKERS))
    runner = _remote_sampler(be, func, not keep_going, optional=auto, workers=workers)
    return {"remote": runner, "offload": auto}


def _make_plan(
    func: Callable[[Any], Any], data: Iterable[Any], opts: _RunOptions, rules: _SampleRules
) -> _Plan:
    """The run's plan: what the caller fixed, the optimizer's choice for the rest."""
    backend, client = opts.backend, opts.client
    if opts.is_async:
        return _async_plan(func, data, opts, rules)
    if backend != "auto" and opts.n_jobs is not None and opts.chunksize is not None:
        # Everything is decided already: no sampling.
        be = backend if isinstance(backend, Backend) else _get(backend, client)
        jobs = 1 if be.name == "serial" else opts.n_jobs
        return _Plan(be, jobs, opts.chunksize, "given by the caller", data, (), None, None)
    if backend == "auto":
        names = _auto_candidates(client)
    else:
        be = backend if isinstance(backend, Backend) else _get(backend, client)
        if be.name == "serial":
            chunk = opts.chunksize or _SERIAL_CHUNK
            return _Plan(be, 1, chunk, "serial run", data, (), None, None)
        # Serial stays in so that the optimizer always has a plan; the sizes used are those
        # of its best plan on the requested backend.
        names = (be.name, "serial")
    opt = _ask_optimizer(func, data, opts, names, rules)
    _refuse_coroutines(func, opt.sample_results)
    if backend == "auto":
        be = _get(opt.backend, client)
        sizes = _Sizes(int(opt.n_jobs), int(opt.chunksize), _predicted(opt), str(opt.reason))
    else:
        sizes = _sizes_on(be, opt, opts)
    return _with_overrides(be, sizes, opt, opts)


def _async_plan(
    func: Callable[[Any], Any], data: Iterable[Any], opts: _RunOptions, rules: _SampleRules
) -> _Plan:
    """An ``async def`` function's plan: the first items awaited together (more of them at
    once when they wait: ``AsyncBackend.sample``), timed, and reused; coroutines in flight
    from their wait (``backends.aio.concurrency``)."""
    from amorsize.backends import aio

    backend = opts.backend
    be = backend if isinstance(backend, aio.AsyncBackend) else get_backend("async")
    assert isinstance(be, aio.AsyncBackend)  # the registry's "async"
    if opts.n_jobs is not None and opts.chunksize is not None:
        return _Plan(be, opts.n_jobs, opts.chunksize, "given by the caller", data, (), None, None)
    n_items = operator.length_hint(data, -1) if rules.index_of is not None else _length(data)
    it = iter(data)
    items = list(islice(it, aio.SAMPLE_ITEMS))
    # Items that may join a sample that waits (not from a checkpoint's stream: what it
    # hands out counts as run). They go back in front of the rest if they did not.
    limit = opts.n_jobs or aio.MAX_CONCURRENCY
    room = 0 if rules.index_of is not None else min(aio.SPILL_ITEMS, limit - len(items))
    more = list(islice(it, max(0, room)))  # never more than the sample may start
    sampled = be.sample(func, items, more, limit)
    results: list[Any] = []
    stopped: SampledFailure | None = None
    for ok, value, _ in sampled.runs:
        if ok:
            results.append(value)
            continue
        failure = SampledFailure(value, getattr(value, "attempts", 1))
        if not opts.keep_going:
            stopped = failure  # the run raises it; the items after it are not delivered
            break
        results.append(failure)
    left = None if n_items is None or n_items < 0 else max(0, n_items - len(sampled.runs))
    sizes = aio.plan(sampled, left, opts.n_jobs, opts.chunksize)
    # With a stream (checkpoint), the stream recorded what it handed out; else the sampled
    # items go back in front of the rest.
    rest = data if rules.index_of is not None else itertools.chain(items, more, it)
    return _Plan(be, sizes.n_jobs, sizes.chunksize, sizes.reason, rest, results, None, None,
                 stopped)


def _refuse_coroutines(func: Callable[[Any], Any], sampled: Sequence[Any] | None) -> None:
    """A plain function that returns coroutines (``lambda x: fetch(x)``) would give a list
    of un-awaited coroutines: say how to have them awaited instead."""
    if not sampled or not inspect.iscoroutine(sampled[0]):
        return
    for value in sampled:
        if inspect.iscoroutine(value):
            value.close()  # never awaited, on purpose: no warning
    msg = (
        f"func {func!r} returned a coroutine, but it is not an async def function, so "
        f"execute would not await it; make it one (async def, or functools.partial of one) "
        f"and execute awaits each item on an event loop"
    )
    raise TypeError(msg)


def _auto_candidates(client: Any) -> tuple[str, ...]:
    """The backends ``backend="auto"`` chooses from."""
    # A daemon process (a worker of a pool) cannot have children of its own.
    return auto_backends(
        in_daemon=multiprocessing.current_process().daemon,
        cluster=client is not None or _current_dask_client() is not None,
    )


def _ask_optimizer(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    opts: _RunOptions,
    names: tuple[str, ...],
    rules: _SampleRules,
) -> Any:
    """The optimizer's result for ``names`` (it samples ``func`` on the first items)."""
    from amorsize.optimizer import _optimize

    backend = opts.backend
    # Warm workers cost no start-up, which can tip a small job towards processes (asked
    # after sampling, which may have started one).
    warm: Callable[[], int] = (
        backend.warm_workers if isinstance(backend, Backend)
        else lambda: warm_workers("processes")
    )
    return _optimize(
        func,
        data,
        n_jobs=opts.n_jobs,
        sample_size=None,
        backends=names,
        warm_workers=warm,
        client=opts.client,
        keep_going=rules.keep_going,
        index_of=rules.index_of,
        spill=_spill_on(backend, names),
        **_sample_where(backend, names, func, rules.keep_going, opts.n_jobs),
    )


def _spill_on(backend: str | Backend, names: tuple[str, ...]) -> SpillRunner | None:
    """Where sampling starts waiting items on threads at once (``sampling.SpillRunner``):
    the threads backend's pools, when threads are a candidate."""
    if "threads" not in names:
        return None
    be = backend if isinstance(backend, Backend) and backend.name == "threads" else None
    runner = getattr(be or get_backend("threads"), "spill_runner", None)
    if runner is None:
        return None
    spill: SpillRunner = runner()
    return spill


@dataclass(frozen=True)
class _Sizes:
    """A plan's sizes, its predicted seconds and why."""

    n_jobs: int
    chunksize: int
    predicted: float | None
    reason: str


def _sizes_on(be: Backend, opt: Any, opts: _RunOptions) -> _Sizes:
    """The sizes for the backend the caller asked for: the optimizer's best plan on it."""
    if opt.backend == be.name:
        return _Sizes(int(opt.n_jobs), int(opt.chunksize), _predicted(opt), str(opt.reason))
    best = next((c for c in opt.alternatives if c.backend == be.name), None)
    if best is not None:
        reason = (
            f"backend={be.name!r} as asked, with the optimizer's best plan for it "
            f"(it would have chosen {opt.backend}: {opt.reason})"
        )
        return _Sizes(int(best.n_jobs), int(best.chunksize), float(best.seconds), reason)
    jobs, chunk = _default_sizes(opt.data, opts.n_jobs, opts.chunksize, be.name)
    reason = f"backend={be.name!r} as asked, default sizes ({opt.reason})"
    return _Sizes(jobs, chunk, None, reason)


def _with_overrides(be: Backend, sizes: _Sizes, opt: Any, opts: _RunOptions) -> _Plan:
    """The plan, with the sizes the caller fixed taking precedence over the optimizer's."""
    jobs, chunk, reason = sizes.n_jobs, sizes.chunksize, sizes.reason
    if be.name == "serial":
        # Chunks only batch the executor's bookkeeping here: the optimizer's chunk size is
        # for dispatch to workers, and one item per chunk made tiny items ~18x slower.
        jobs, chunk = 1, _serial_chunk(opt.profile)
    elif opts.n_jobs is not None:
        jobs = opts.n_jobs
    overrides = [f"n_jobs={opts.n_jobs}"] if opts.n_jobs is not None and be.name != "serial" else []
    if opts.chunksize is not None:
        chunk = opts.chunksize
        overrides.append(f"chunksize={opts.chunksize}")
    if overrides:
        reason += f" (overridden by the caller: {', '.join(overrides)})"
    samples = tuple(opt.sample_results or ())
    return _Plan(
        be, max(1, jobs), max(1, chunk), reason, opt.data, samples, opt, sizes.predicted,
        _stopped_failure(opt.profile),
    )  # fmt: skip


def _stopped_failure(profile: Any) -> SampledFailure | None:
    """The failure that stopped sampling (raise mode), to deliver in its slot."""
    if not profile.stopped_on_error or profile.error is None:
        return None
    attempts = getattr(profile.error, "attempts", 1)
    return SampledFailure(profile.error, attempts if isinstance(attempts, int) else 1)


def _serial_chunk(profile: Any) -> int:
    """Items per chunk on the serial backend: about ``_SERIAL_CHUNK_SECONDS`` of work.

    Chunks only batch the executor's bookkeeping (~3 us a chunk) there; the optimizer's chunk
    size is for dispatch to workers, and one item per chunk made tiny items ~18x slower.
    Slow items keep small chunks, so that results (and checkpoints) still come out promptly.
    """
    mean = float(getattr(profile, "mean_seconds", 0.0) or 0.0)
    if mean <= 0.0:
        return _SERIAL_CHUNK
    return max(1, min(_SERIAL_CHUNK_MAX, int(_SERIAL_CHUNK_SECONDS / mean)))


def _default_sizes(
    data: Iterable[Any], n_jobs: int | None, chunksize: int | None, name: str
) -> tuple[int, int]:
    """Simple, safe ``(n_jobs, chunksize)`` when the optimizer has no plan for a backend."""
    cpus = available_cpus()
    jobs = n_jobs or (min(32, cpus + 4) if name == "threads" else cpus)
    if chunksize is None:
        n = _length(data)
        chunksize = (
            _FALLBACK_CHUNK if n is None else max(1, math.ceil(n / (_CHUNKS_PER_WORKER * jobs)))
        )
    return jobs, chunksize


def _current_dask_client() -> Any:
    # Without distributed imported there can be no current client: never import it here.
    if "distributed" not in sys.modules:
        return None
    try:
        from amorsize.backends.dask import current_client
    except ImportError:
        return None
    return current_client()


def _get(name: str, client: Any) -> Backend:
    if name == "dask":
        return get_backend("dask", client=client)
    return get_backend(name)


# --------------------------------------------------------------------------- the run


class _UnknownItems:
    """The input minus the items an observer already knows, read in blocks.

    Each block is checked with one ``known_block`` call per observer; known items go
    straight to ``ready``. The optimizer samples through the item iterator (``__next__``),
    which records what it handed out; the executor then takes the sampled items back with
    ``take_sampled`` and runs the rest as ``segments``: runs of consecutive unknown items,
    never spanning two blocks (the observer sees the same blocks in ``on_success_block``).
    """

    __slots__ = ("block_size", "buffer", "handed", "it", "knowers", "next_index", "ready", "run")

    def __init__(
        self,
        data: Iterable[Any],
        knowers: Sequence[RunObserver],
        ready: deque[tuple[int, list[Any]]],
        run: _Execution,
    ) -> None:
        self.it = iter(data)
        self.knowers = knowers
        self.ready = ready
        self.run = run
        # (input index, block start, item): scanned, not handed out / handed out, not taken.
        self.buffer: deque[tuple[int, int, Any]] = deque()
        self.handed: deque[tuple[int, int, Any]] = deque()
        self.next_index = 0
        # Until the plan is known; then the plan's chunk size (see ``_Execution._begin``).
        self.block_size = _SCAN_BLOCK

    def _block(self) -> tuple[int, list[Any], dict[int, Any]] | None:
        """The next block of input, with the results observers already know for it."""
        items = list(islice(self.it, self.block_size))
        if not items:
            return None
        start = self.next_index
        self.next_index += len(items)
        found: dict[int, Any] = {}
        for obs in self.knowers:
            for k, value in obs.known_block(start, items).items():
                found.setdefault(k, value)
        for k, value in found.items():
            self.ready.append((start + k, [value]))
        self.run.skipped += len(found)
        return start, items, found

    def __iter__(self) -> _UnknownItems:
        return self

    def __next__(self) -> Any:
        while not self.buffer:
            block = self._block()
            if block is None:
                raise StopIteration
            start, items, found = block
            self.buffer.extend((start + k, start, x) for k, x in enumerate(items) if k not in found)
        entry = self.buffer.popleft()
        self.handed.append(entry)
        return entry[2]

    def __length_hint__(self) -> Any:
        # Items not yet handed out that no observer knows: what sampling plans with.
        total = self.run.n_items
        if total is None:
            return NotImplemented  # unknown: length_hint() gives its default
        ahead = max((o.known_ahead(self.next_index) for o in self.knowers), default=0)
        return max(0, total - self.next_index - ahead + len(self.buffer))

    def index_of(self, k: int) -> int:
        """The input index of the ``k``-th item handed out (sampling's position ``k``)."""
        return int(self.handed[k][0])

    def take_sampled(self, n: int) -> list[tuple[int, Any]]:
        """``(index, item)`` of the first ``n`` items handed out (the sampled ones)."""
        return [self.handed.popleft()[::2] for _ in range(n)]

    def segments(self) -> Iterator[tuple[int, list[Any]]]:
        """``(start, items)`` runs of consecutive unknown items, in input order."""
        # First what sampling handed out but did not run, and what a scan left over.
        pending = list(self.handed) + list(self.buffer)
        self.handed.clear()
        self.buffer.clear()
        run: list[Any] = []
        run_start = block = -1
        for index, b, item in pending:
            if run and (index != run_start + len(run) or b != block):
                yield run_start, run
                run = []
            if not run:
                run_start, block = index, b
            run.append(item)
        if run:
            yield run_start, run
        while (scanned := self._block()) is not None:
            start, items, found = scanned
            if not found:
                yield start, items
                continue
            k0 = None
            for k in range(len(items) + 1):
                if k < len(items) and k not in found:
                    if k0 is None:
                        k0 = k
                elif k0 is not None:
                    yield start + k0, items[k0:k]
                    k0 = None


def _worker_limits(opts: _RunOptions) -> Any:
    """The run's ``WorkerLimits`` (timeout, recycling), or ``None`` without any."""
    if opts.timeout is None and opts.max_tasks is None and opts.max_memory is None:
        return None
    from amorsize._timeout import WorkerLimits

    return WorkerLimits(
        opts.timeout, _timeout_retries(opts.retry), opts.max_tasks, opts.max_memory
    )


def _name_index(exc: BaseException, index: int) -> None:
    from amorsize._timeout import name_index

    name_index(exc, index)


def _timeout_failure(exc: BaseException, index: int, policy: Any, func: Any) -> BaseException:
    """``exc`` naming its item if it is a timeout; a worker process's timeouts that the retry
    policy gave up on become the ``RetryExhaustedError`` the policy raises elsewhere."""
    _name_index(exc, index)
    from amorsize._timeout import ItemTimeoutError

    if type(exc) is not ItemTimeoutError or policy is None or policy.reraise:
        return exc
    if not issubclass(ItemTimeoutError, policy.retry_on_exceptions or (Exception,)):
        return exc
    from amorsize._core import callable_name
    from amorsize.retry import RetryExhaustedError

    err = RetryExhaustedError(exc, exc.attempts, None, callable_name(func))
    err.__cause__ = exc
    return err


class _Execution:
    """One run, in named steps: begin (observers, sampling and the plan), reuse the samples,
    run the tasks (the dispatch loop) or, for a serial plan nobody watches item by item, the
    serial fast path; finish (the report; close the backend's generator, the progress bar
    and the observers). :meth:`result_blocks` drives them.

    ``one_block``: the caller wants the whole list (``execute``), so the serial fast path
    delivers it as one block; else (``execute_iter``) that path leaves the rest of the input
    in :attr:`rest` for the caller's own loop (``_ordered``, ``_unordered``).
    """

    def __init__(
        self,
        func: Callable[[Any], Any],
        data: Iterable[Any],
        opts: _RunOptions,
        *,
        one_block: bool = False,
    ) -> None:
        self.func = func
        self.data = data
        self.opts = opts
        self.one_block = one_block
        self.n_items = _length(data)
        self._sort_observers(opts.observers)
        self.run_id = new_run_id()  # names the run in logs and traces
        # Chunk times, only when someone looks at them (report=, an on_chunk observer); then
        # the dispatch time of each task in flight, for backends that measure nothing.
        self.timeline: Timeline | None = None
        if opts.report is not None or self.chunk_watchers:
            self.timeline = Timeline()
        self.sent: dict[int, float] = {}
        self.item_funcs: list[Callable[[Any], Any]] = []  # retry wrappers made for this run
        # Known results (sampled, checkpointed) waiting to be handed out, in blocks.
        self.ready: deque[tuple[int, list[Any]]] = deque()
        self.stream: _UnknownItems | None = None
        self.report: RunReport | None = None
        self.bar: Any = None
        # The backend's generator while tasks run: closed on an error or when abandoned.
        self.outcomes: Iterator[tuple[Task, list[Outcome] | OkValues]] | None = None
        self.backend: Backend | None = None
        self.completed = False  # every item ran to a result or a failure (observers' end)
        self.not_run = 0  # items a worker skipped after a failure still on its way
        self.emitted = 0  # execute_iter(ordered=True) advances this: the reorder window
        self.chunksize = 1  # the plan's, once known
        self.skipped = 0  # items a checkpoint already had
        self.dispatched = 0  # items handed to the backend ...
        self.finished = 0  # ... and items it gave back: the difference is in flight
        self.stopped_by: RunObserver | None = None
        self.leftover: tuple[int, list[Any]] | None = None
        self.pending_chunks: Iterator[tuple[int, list[Any]]] = iter(())
        # The serial fast path's rest of the input, left for execute_iter's stream (see
        # ``_run_serial_fast``), and the failures before it was handed out.
        self.rest: SerialMap | None = None
        self.rest_failed = 0
        # Parallel runs: chunk sizes corrected by measured chunk times (None: fixed size).
        self.sizer: ChunkSizer | None = None
        self.jobs = 1  # workers the backend runs
        self.tasks_out = 0  # tasks dispatched and not yet back
        self.sharing: list[Any] = []  # limiter / budget in shared memory until _finish
        self.limits = _worker_limits(opts)

    def _sort_observers(self, observers: tuple[RunObserver, ...]) -> None:
        """Who is told what: the observers overriding each kind of hook."""
        if not observers:  # the plain call (sorting nothing cost ~10 us of a cold one)
            none: tuple[RunObserver, ...] = ()
            self.on_success = self.knowers = self.gates = self.watchers = none
            self.chunk_ends = self.chunk_watchers = self.reporters = none
            return

        def overriding(*hooks: str) -> tuple[RunObserver, ...]:
            return tuple(o for o in observers if _overrides(o, *hooks))

        self.on_success = overriding("on_success", "on_success_block")
        self.knowers = overriding("known", "known_block")
        self.gates = overriding("allow_dispatch")
        self.watchers = overriding(*_ITEM_HOOKS)
        self.chunk_ends = overriding("chunk_finished")
        self.chunk_watchers = overriding("on_chunk")
        self.reporters = overriding("on_report")

    def result_blocks(self) -> Iterator[tuple[int, list[Any]]]:
        """The run: ``(start, values)`` blocks of consecutive results, in completion order."""
        t0 = time.perf_counter()
        outer_run = RUN_ID.get()
        RUN_ID.set(self.run_id)
        if self.timeline is not None:
            self.timeline.origin = time.monotonic()
        try:
            plan = self._begin()
            if self._unwatched_serial(plan):
                yield from self._run_serial_fast(plan)
            else:
                it, n_sampled = self._reuse_samples(plan)
                self.outcomes = self._start_tasks(plan, it, n_sampled)
                yield from self._run_tasks(self.outcomes)
                self.outcomes = None
                yield from self._after_tasks()
            # Items left unattempted mean the work is not done, even if all were reported.
            self.completed = self.stopped_by is None
        except BaseException as exc:
            self._cancel(exc)
            raise
        finally:
            try:
                self._finish(time.perf_counter() - t0)
            finally:
                RUN_ID.set(outer_run)

    # -- begin -----------------------------------------------------------------------------

    def _begin(self) -> _Plan:
        """Tell the observers, plan the run (sampling on the way), open the report."""
        opts = self.opts
        for obj in opts.shared:
            obj._share()  # every worker then maps the same state (amorsize/_shared.py)
            self.sharing.append(obj)
        for obs in opts.observers:
            obs.begin(self.func)
        # With known results (a checkpoint), the optimizer and the backend only ever see
        # the items still to run: a resumed run samples nothing it already has.
        if self.knowers:
            self.stream = _UnknownItems(self.data, self.knowers, self.ready, self)
        stream = self.stream
        rules = _SampleRules(opts.keep_going, None if stream is None else stream.index_of)
        data = self.data if stream is None else stream
        # Sampling runs what the run runs (retries included): no sampled item runs again.
        plan = _make_plan(self._item_func(), data, opts, rules)
        self.report = RunReport(
            backend=plan.backend.name,
            n_jobs=plan.n_jobs,
            chunksize=plan.chunksize,
            reason=plan.reason,
            optimization=plan.optimization,
            predicted_seconds=plan.predicted,
        )
        for obs in opts.observers:
            obs.planned(self.report)
        if opts.verbose:
            print(plan.optimization if plan.optimization is not None else self.report, flush=True)
        self.chunksize = plan.chunksize
        if stream is not None:
            stream.block_size = plan.chunksize
        self.bar = self._progress_bar()
        return plan

    def _item_func(self) -> Callable[[Any], Any]:
        """What runs on each item: ``func``, time-limited per attempt, rate-limited (the wait
        for a turn is not part of the time limit), wrapped by the retry policy: when asked,
        in that order, so that every attempt waits for the limiter and has its own limit."""
        opts = self.opts
        func = self.func
        if opts.timeout is not None:
            from amorsize._timeout import AsyncTimeLimited, TimeLimited

            func = (AsyncTimeLimited if opts.is_async else TimeLimited)(func, opts.timeout)
        if opts.rate_limit is not None:
            from amorsize.ratelimit import limited

            func = limited(func, opts.rate_limit, opts.is_async)
        if opts.retry is None:
            return func
        wrapped = _retrying(func, opts.retry, opts.is_async)
        self.item_funcs.append(wrapped)
        return wrapped

    def _progress_bar(self) -> Any:
        if not self.opts.progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            warnings.warn(
                "progress=True needs tqdm, which is not installed: running without a "
                "progress bar (pip install tqdm, or amorsize[full])",
                RuntimeWarning,
                stacklevel=5,  # _progress_bar, _begin, result_blocks, execute or _iterate: caller
            )
            return None
        return tqdm(total=self.n_items, unit="item", desc="execute", file=sys.stderr)

    # -- reuse samples ---------------------------------------------------------------------

    def _reuse_samples(self, plan: _Plan) -> tuple[Iterator[Any], int]:
        """Hand out what sampling found, in its slots: the rest of the input, and how many
        items sampling used up.

        Results are reused and failures go through the error policy like any other
        (observers, ``on_error``): no sampled item is run again. (With a stream, the stream
        itself is the data: it recorded what it handed out.)
        """
        report = self.report
        assert report is not None
        it = iter(plan.data)
        found: list[Any] = list(plan.sample_results)
        if plan.stopped is not None:
            found.append(plan.stopped)
        sampled = (
            [(k, next(it)) for k in range(len(found))]
            if self.stream is None
            else self.stream.take_sampled(len(found))
        )
        for (index, item), result in zip(sampled, found, strict=True):
            if type(result) is SampledFailure:
                failed = Outcome(False, result.exception, result.attempts)
                self.ready.append((index, self._apply_policy(Task(index, [item]), [failed])))
                continue
            report.reused += 1
            for obs in self.on_success:
                obs.on_success(index, item, result)
            self.ready.append((index, [result]))
        return it, len(found)

    # -- run tasks -------------------------------------------------------------------------

    def _start_tasks(
        self, plan: _Plan, it: Iterator[Any], n_sampled: int
    ) -> Iterator[tuple[Task, list[Outcome] | OkValues]]:
        """The backend's generator of ``(task, outcomes)``, pulling tasks lazily."""
        func = self._item_func()
        if not self.opts.keep_going:
            # The first failure ends the run, so workers stop at it too instead of finishing
            # their chunks.
            func = StopOnFailure(func)
        be = self.backend = plan.backend
        jobs = self.jobs = self._workers(plan.n_jobs, n_sampled)
        n_in_flight = _IN_FLIGHT_PER_WORKER * jobs
        window = None
        if self.opts.ordered_window and be.supports_pause:
            window = (n_in_flight + _REORDER_TASKS * jobs) * plan.chunksize
        self.sizer = self._sizer(plan, jobs, grow=window is None)
        if self.stream is None:
            chunks = self._input_chunks(it, n_sampled)
        else:
            chunks = self._segment_chunks(self.stream.segments())
        tasks = self._tasks(chunks, window)
        if self.limits is not None and getattr(be, "supports_limits", False):
            # Only then: other backends' run() takes no limits (threads and serial time
            # items out through the TimeLimited wrapper instead).
            run = cast(Any, be.run)
            return cast(
                "Iterator[tuple[Task, list[Outcome] | OkValues]]",
                run(func, tasks, n_jobs=jobs, max_in_flight=n_in_flight, limits=self.limits),
            )
        return be.run(func, tasks, n_jobs=jobs, max_in_flight=n_in_flight)

    def _workers(self, planned: int, n_sampled: int) -> int:
        """Never more workers than chunks left to run (no idle process to start)."""
        if self.n_items is None:
            return planned
        left = self.n_items - n_sampled
        if self.stream is not None:
            left = operator.length_hint(self.stream, left) + len(self.stream.handed)
        return max(1, min(planned, math.ceil(left / self.chunksize)))

    def _sizer(self, plan: _Plan, jobs: int, *, grow: bool) -> ChunkSizer | None:
        """Adaptive chunk sizes for a parallel plan whose chunk size the caller left open
        (``grow=False``: never above the plan's, which bounds the reorder window)."""
        fact = _ADAPTIVE.get(plan.backend.name)
        if fact is None or self.opts.chunksize is not None:
            return None
        profile = getattr(plan.optimization, "profile", None)
        item_s = float(getattr(profile, "mean_seconds", 0.0) or 0.0)
        task_s = float(getattr(get_system_info(), fact))
        return ChunkSizer(plan.chunksize, jobs, item_seconds=item_s, task_seconds=task_s, grow=grow)

    def _input_chunks(self, it: Iterator[Any], first: int) -> Iterator[tuple[int, list[Any]]]:
        """``(start, items)`` chunks read from ``it`` (index ``first`` on): the plan's size,
        or the sizer's (smaller toward the end of a known length, re-planned as they run)."""
        sizer, total, chunksize = self.sizer, self.n_items, self.chunksize
        if sizer is not None and total is None and self.one_block:
            # execute() waits for the whole input anyway; execute_iter reads as workers
            # take items, so that a live stream's results come out as soon as they can.
            yield from _read_ahead_chunks(it, first, sizer)
            return
        index = first
        while True:
            if sizer is not None:
                chunksize = sizer.next_size(None if total is None else total - index)
            if not (items := list(islice(it, chunksize))):
                return
            yield index, items
            index += len(items)

    def _segment_chunks(
        self, segments: Iterator[tuple[int, list[Any]]]
    ) -> Iterator[tuple[int, list[Any]]]:
        """Runs of consecutive unknown items, cut into chunks of at most the plan's size (or
        the sizer's: the run's length is not known ahead here, so measured times only)."""
        sizer, chunksize = self.sizer, self.chunksize
        for start, run in segments:
            off = 0
            while off < len(run):
                size = chunksize if sizer is None else sizer.next_size(None)
                yield start + off, run[off : off + size]
                off += size

    def _tasks(
        self, chunks: Iterator[tuple[int, list[Any]]], window: int | None
    ) -> Iterator[Task | Pause]:
        """The chunks as tasks, gated by observers and the reorder window (``PAUSE``: nothing
        to dispatch until the next completion)."""
        self.pending_chunks = chunks
        gates = self.gates
        for start, items in chunks:
            for gate in gates:
                if not gate.allow_dispatch():
                    self.stopped_by = gate
                    self.leftover = (start, items)
                    return
            if window is not None:
                while (
                    start + len(items) - self.emitted > window and self.dispatched > self.finished
                ):
                    yield PAUSE
            self.dispatched += len(items)
            self.tasks_out += 1
            task = Task(start, items)
            if self.timeline is not None:
                self._sending(task)
            yield task

    def _sending(self, task: Task) -> None:
        """Note when ``task`` is dispatched (its span, if its backend measures none)."""
        timeline = self.timeline
        assert timeline is not None
        forget(task)  # a stamp left under this id by an earlier task is not this one's
        now = self.sent[id(task)] = time.monotonic()
        if timeline.dispatch_started is None:
            timeline.dispatch_started = now

    def _run_tasks(
        self, outcomes: Iterator[tuple[Task, list[Outcome] | OkValues]]
    ) -> Iterator[tuple[int, list[Any]]]:
        """The dispatch loop: each finished task's values, and known results between them."""
        report = self.report
        assert report is not None
        ready, bar, on_success, sizer = self.ready, self.bar, self.on_success, self.sizer
        chunk_ends = self.chunk_ends
        yield from self._drain()
        last = None  # the previous completion: the first one only starts the clock
        for task, outs in outcomes:
            if ready:
                yield from self._drain()
            n = len(task.items)
            self.finished += n
            if sizer is not None:
                last = self._observe(sizer, n, last)
            if self.timeline is not None:
                self._record(task, outs)
            if type(outs) is OkValues:
                report.completed += n
                for obs in on_success:
                    obs.on_success_block(task.start, task.items, outs)
                for obs in chunk_ends:
                    obs.chunk_finished(task.start, n, 0)
                if bar is not None:
                    bar.update(n)
                yield task.start, outs
            else:
                failed = report.failed
                values = self._apply_policy(task, outs)
                for obs in chunk_ends:
                    obs.chunk_finished(task.start, n, report.failed - failed)
                if bar is not None:
                    bar.update(n)
                if values:
                    yield task.start, values

    def _record(self, task: Task, outs: list[Outcome] | OkValues) -> None:
        """Add a finished chunk to the timeline, measured where it ran if the backend said
        (``_timeline.take``), else from its dispatch to now; tell the chunk watchers."""
        timeline = self.timeline
        assert timeline is not None
        now = time.monotonic()
        sent = self.sent.pop(id(task), now)
        failed = 0
        if type(outs) is not OkValues:
            failed = sum(1 for o in outs if not o.ok and type(o.value) is not NotRunError)
        n = len(task.items)
        ran = take(task)
        if ran is None:
            span = timeline.add_unplaced(sent, now, n, failed, task.start)
        else:
            span = ChunkSpan(ran[2], ran[0], ran[1], n, failed, task.start)
            timeline.add(span)
        for obs in self.chunk_watchers:
            obs.on_chunk(span)

    def _observe(self, sizer: ChunkSizer, n: int, last: float | None) -> float:
        """Tell the sizer what a completed chunk cost: the time since the previous completion
        times the workers busy meanwhile is the worker time spent per completion."""
        now = time.perf_counter()
        busy = max(1, min(self.jobs, self.tasks_out))
        self.tasks_out -= 1
        if last is not None:
            sizer.observe(n, (now - last) * busy)
        return now

    def _after_tasks(self) -> Iterator[tuple[int, list[Any]]]:
        """What is left once the backend is done: known results, items never dispatched."""
        if self.not_run:
            # The failure that made a worker skip them never arrived (its worker died).
            raise NotRunError(_not_run_message(self.not_run))
        yield from self._drain()
        if self.stopped_by is not None:
            yield from self._not_attempted()
            yield from self._drain()

    def _drain(self) -> Iterator[tuple[int, list[Any]]]:
        """Known results (sampled, checkpointed) waiting to be handed out."""
        report, ready, bar = self.report, self.ready, self.bar
        assert report is not None
        while ready:
            block = ready.popleft()
            if type(block[1][0]) is not ItemFailure:  # a sampled failure is counted already
                report.completed += 1
            if bar is not None:
                bar.update(1)
            yield block

    def _apply_policy(self, task: Task, outcomes: list[Outcome]) -> list[Any]:
        """Values for a task with failures: tell the observers, apply the error policy."""
        report = self.report
        assert report is not None
        values: list[Any] = []
        for i, out in enumerate(outcomes):
            index = task.start + i
            item = task.items[i]
            if not out.ok and type(out.value) is NotRunError:
                # Skipped by a worker after a failure (StopOnFailure): that failure reaches
                # us too and ends the run, so only the results before it are handed out.
                self.not_run += len(outcomes) - i
                return values
            if out.ok:
                report.completed += 1
                for obs in self.on_success:
                    obs.on_success(index, item, out.value)
                values.append(out.value)
                continue
            exc = cast(BaseException, out.value)
            if self.limits is not None:
                exc = _timeout_failure(exc, index, self.opts.retry, self.func)
            recorded = False
            for obs in self.opts.observers:
                # Every observer hears of it (no short-circuit): the circuit breaker counts
                # a failure even when the dead-letter queue records it.
                recorded = obs.on_failure(index, item, exc, out.attempts) or recorded
            failure = ItemFailure(index, item, exc, out.attempts)
            log_item_failed(self.run_id, index, out.attempts, exc, self.func)
            report.failed += 1
            report.failures.append(failure)
            if recorded:
                report.dead_lettered.append(index)
            if not self.opts.collect and not recorded:
                raise exc
            values.append(failure)
        return values

    def _not_attempted(self) -> Iterator[tuple[int, list[Any]]]:
        """Items never dispatched because an observer stopped dispatch."""
        report, gate, stream = self.report, self.stopped_by, self.stream
        assert report is not None and gate is not None and self.leftover is not None
        rest: Iterator[tuple[int, list[Any]]] = self.pending_chunks
        count: int | None = None
        if self.n_items is not None:
            if stream is None:
                count = self.n_items - self.leftover[0]
            else:
                # Known items among the rest are results, not "not attempted": sort them out
                # now (a finite input) so that the counts in the stop error are exact.
                later = list(rest)
                rest = iter(later)
                count = len(self.leftover[1]) + sum(len(xs) for _, xs in later)
        counts = {
            "completed": report.completed + len(stream.ready if stream else ()),
            "failed": report.failed,
            "not_attempted": count,
        }
        error = gate.stop_error(counts)
        if not self.opts.collect:
            raise error
        for first, xs in itertools.chain([self.leftover], rest):
            report.not_attempted += len(xs)
            yield first, [ItemFailure(first + i, x, error, 0) for i, x in enumerate(xs)]

    # -- the serial fast path --------------------------------------------------------------

    def _unwatched_serial(self, plan: _Plan) -> bool:
        """Whether the serial fast path may run the plan: the plain serial backend, and no
        observer watching items, progress bar or sampled failure needing the per-chunk
        bookkeeping."""
        profile = getattr(plan.optimization, "profile", None)
        return (
            type(plan.backend) is SerialBackend
            and not self.watchers
            and self.bar is None
            and self.stream is None
            and plan.stopped is None
            and not getattr(profile, "n_failed", 0)
            and self.timeline is None
        )

    def _run_serial_fast(self, plan: _Plan) -> Iterator[tuple[int, list[Any]]]:
        """The serial plan with nobody watching: one tight loop over the rest of the input.

        Per-chunk bookkeeping (tasks, outcomes, observers, progress) costs as much as a
        0.1 us item, so here the sampled results come first, then the rest runs in the
        compiled core's loop (``_core_serial.pxi``): into one list (``execute``) or item by
        item as the caller pulls them (``execute_iter``: results stream, memory stays
        bounded). A failure is handled where it happened (``item_failed``) and the loop
        resumes after it: no item runs twice, and ``on_error="raise"`` stops at the first.
        """
        report = self.report
        assert report is not None
        self.backend = plan.backend
        func = self._item_func()
        first = len(plan.sample_results)
        report.reused = first
        report.completed += first
        it = iter(plan.data)
        if first:
            next(islice(it, first, first), None)  # the sampled items: their results are here
        if self.one_block:
            yield 0, self._run_rest(func, plan, it)
            return
        if first:
            yield 0, list(plan.sample_results)
        # execute_iter's stream runs the rest at C speed, between the caller and func as a
        # generator expression would be (a generator here cost ~15% on 0.1 us items).
        # The empty block at ``first`` tells it so.
        self.rest_failed = report.failed
        pairs = not self.opts.ordered_window
        self.rest = SerialMap(func, it, first, self.item_failed, pairs)
        yield first, []

    def _run_rest(self, func: Callable[[Any], Any], plan: _Plan, it: Iterator[Any]) -> list[Any]:
        """``execute``'s whole result: the sampled results, then ``func`` of each item left
        in ``it``: a list comprehension when the first failure ends the run and the input
        can name the failed item (see ``_listed``), else the core's guarded loop."""
        report = self.report
        assert report is not None
        failed = report.failed
        if not self.opts.collect and type(plan.data) in (list, tuple, range):
            values = _listed(func, cast("Sequence[Any]", plan.data), it, self.item_failed)
            done = len(values)
            # The sampled results go in front: moving pointers is cheap, while
            # ``sampled += values`` would touch each result twice (~10 % on 0.1 us items).
            values[:0] = plan.sample_results
        else:
            values = list(plan.sample_results)
            serial_extend(func, it, values, 0, self.item_failed)
            done = len(values) - len(plan.sample_results)
        report.completed += done - (report.failed - failed)
        return values

    def rest_ran(self, rest: SerialMap) -> None:
        """Count the items of the rest once execute_iter's stream ran them all."""
        report = self.report
        assert report is not None
        report.completed += rest.count - (report.failed - self.rest_failed)

    def item_failed(self, index: int, item: Any, exc: Exception) -> ItemFailure:
        """The error policy for a failure on the serial fast path (no observers there):
        the failure for its slot, or raised (``on_error="raise"``)."""
        report = self.report
        assert report is not None
        if self.limits is not None:
            _name_index(exc, index)
        failure = ItemFailure(index, item, exc, getattr(exc, "attempts", 1))
        log_item_failed(self.run_id, index, failure.attempts, exc, self.func)
        report.failed += 1
        report.failures.append(failure)
        if not self.opts.collect:
            raise exc
        return failure

    # -- finish ----------------------------------------------------------------------------

    def _cancel(self, exc: BaseException) -> None:
        """Cancel pending work; on Ctrl-C also stop the workers at once (a warm pool is
        simply restarted by the next call)."""
        outcomes, self.outcomes = self.outcomes, None
        if outcomes is None:
            return
        getattr(outcomes, "close", lambda: None)()
        if not isinstance(exc, (Exception, GeneratorExit)) and self.backend is not None:
            self.backend.close()

    def _finish(self, wall_seconds: float) -> None:
        """Complete the report, close the progress bar, tell the observers the run ended."""
        report = self.report
        if report is not None:
            report.skipped = self.skipped
            report.items = report.completed + report.failed + report.not_attempted
            report.wall_seconds = wall_seconds
            if self.sizer is not None and self.sizer.chunks:
                report.chunk_sizes = (self.sizer.smallest, self.sizer.largest)
                report.replans = [str(r) for r in self.sizer.replans]
            report.timeline = self.timeline
            report.retries = self._retries()
            if self.limits is not None:
                report.workers_recycled = self.limits.recycled
        if self.bar is not None:
            self.bar.close()
        while self.sharing:  # Ctrl-C and errors included: no segment outlives the run
            self.sharing.pop()._unshare()
        try:
            if report is not None:
                for obs in self.reporters:
                    obs.on_report(report)
            for obs in self.opts.observers:
                obs.end(self.completed)
        finally:
            # Called from ``result_blocks``'s ``finally``: exc_info is the run's error, if any.
            if self.opts.verbose and report is not None and sys.exc_info()[0] is None:
                print(report, flush=True)
            if self.opts.report is not None and report is not None:
                self._write_report(report)

    def _retries(self) -> int | None:
        """Retries the policy counted in this process (None: counted in worker processes)."""
        if not self.item_funcs or self.backend is None:
            return None
        if self.backend.name not in ("serial", "threads", "async"):
            return None
        wrappers = cast("list[Any]", self.item_funcs)  # the core's retry wrappers
        return sum(int(f.retry_stats.retries) for f in wrappers)

    def _write_report(self, report: RunReport) -> None:
        """Write ``report=``'s file; after a failed run, a failure to write only warns (the
        run's own error is the one to see)."""
        from amorsize.report import write_run_report

        assert self.opts.report is not None
        running_error = sys.exc_info()[1]
        try:
            write_run_report(self.opts.report, report, self.func)
        except Exception as exc:
            if running_error is None:
                raise
            warnings.warn(f"{exc} (after the run failed)", RuntimeWarning, stacklevel=2)


def _read_ahead_chunks(
    it: Iterator[Any], first: int, sizer: ChunkSizer
) -> Iterator[tuple[int, list[Any]]]:
    """Chunks of an input of unknown length (a generator), read a tail's worth ahead: once
    the input ends within what was read, the sizer knows what is left and cuts the last
    chunks to finish together, as for a known length. An input that raises has the items
    it gave before the error run first; then the error ends the run, as it always did."""
    ahead: list[Any] = []
    ended = False
    broke: Exception | None = None
    index = first
    while True:
        if not ended:
            want = sizer.read_ahead - len(ahead)
            if want > 0:
                had = len(ahead)
                try:
                    ahead.extend(islice(it, want))  # keeps what came before an error
                except Exception as exc:
                    broke = exc
                ended = broke is not None or len(ahead) - had < want
        if not ahead:
            if broke is not None:
                raise broke
            return
        size = sizer.next_size(len(ahead) if ended else None)
        items, ahead = ahead[:size], ahead[size:]
        yield index, items
        index += len(items)


def _listed(
    func: Callable[[Any], Any],
    seq: Sequence[Any],
    it: Iterator[Any],
    failed: Callable[[int, Any, Exception], Any],
) -> list[Any]:
    """``func`` of each item left in ``it``, an iterator over ``seq`` (a list, tuple or
    range), when the first failure ends the run: ``failed(index, item, exc)`` raises it.

    A list comprehension, because it is the cheapest loop there is: it calls a Python
    ``func`` from Python code (no C frame between, unlike ``map`` or the core's loop: ~6 %
    on 0.1 us items) and appends with one opcode. A failure loses the results before it,
    which this mode does not deliver anyway; the iterator's position names the item.
    """
    try:
        return [func(x) for x in it]
    except Exception as exc:
        index = len(seq) - length_hint(it) - 1
        # (func may have shrunk a list it was handed: its failure is still what is raised)
        failed(index, seq[index] if 0 <= index < len(seq) else None, exc)
        raise


# --------------------------------------------------------------------------- public API


@overload
def execute(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    n_jobs: int | None = ...,
    chunksize: int | None = ...,
    backend: str | Backend = ...,
    retry: Any = ...,
    on_error: Literal["raise", "collect"] = ...,
    progress: bool = ...,
    return_plan: Literal[False] = ...,
    verbose: bool = ...,
    client: Any = ...,
    checkpoint: Any = ...,
    dead_letter: Any = ...,
    circuit_breaker: Any = ...,
    observers: Sequence[RunObserver] | None = ...,
    trace_chunks: bool = ...,
    rate_limit: RateLimiter | None = ...,
    report: str | os.PathLike[str] | None = ...,
    timeout: float | None = ...,
    max_tasks_per_worker: int | None = ...,
    max_worker_memory: int | None = ...,
) -> list[Any]: ...


@overload
def execute(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    n_jobs: int | None = ...,
    chunksize: int | None = ...,
    backend: str | Backend = ...,
    retry: Any = ...,
    on_error: Literal["raise", "collect"] = ...,
    progress: bool = ...,
    return_plan: Literal[True],
    verbose: bool = ...,
    client: Any = ...,
    checkpoint: Any = ...,
    dead_letter: Any = ...,
    circuit_breaker: Any = ...,
    observers: Sequence[RunObserver] | None = ...,
    trace_chunks: bool = ...,
    rate_limit: RateLimiter | None = ...,
    report: str | os.PathLike[str] | None = ...,
    timeout: float | None = ...,
    max_tasks_per_worker: int | None = ...,
    max_worker_memory: int | None = ...,
) -> tuple[list[Any], RunReport]: ...


def execute(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    n_jobs: int | None = None,
    chunksize: int | None = None,
    backend: str | Backend = "auto",
    retry: Any = None,
    on_error: Literal["raise", "collect"] = "raise",
    progress: bool = False,
    return_plan: bool = False,
    verbose: bool = False,
    client: Any = None,
    checkpoint: Any = None,
    dead_letter: Any = None,
    circuit_breaker: Any = None,
    observers: Sequence[RunObserver] | None = None,
    trace_chunks: bool = False,
    rate_limit: RateLimiter | None = None,
    report: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    max_tasks_per_worker: int | None = None,
    max_worker_memory: int | None = None,
) -> list[Any] | tuple[list[Any], RunReport]:
    """``[func(x) for x in data]``, run serially, on processes or on threads as planned.

    ``backend="auto"`` asks the optimizer (sampled items are reused, never run twice);
    explicit ``n_jobs`` (``-1``: every CPU), ``chunksize`` or ``backend`` (a name or a
    ``Backend`` from ``amorsize.backends.get_backend``) override its choice.
    ``retry=True`` or a ``RetryPolicy`` retries each item inside the worker.
    ``on_error="raise"`` raises the first failure observed (in completion order, which is
    input order on the serial backend) after cancelling pending work, with a worker's
    traceback as ``__cause__``; ``"collect"`` puts an ``ItemFailure`` in each failed slot
    and lists them in ``report.failures``. ``return_plan=True`` returns
    ``(results, RunReport)``. ``checkpoint=``, ``dead_letter=`` and ``circuit_breaker=``
    plug in the reliability layer; ``observers=`` takes extra ``RunObserver`` hooks.
    With OpenTelemetry set up (a tracer or meter provider), each run is a span with
    metrics; ``trace_chunks=True`` adds a child span per chunk (docs/observability.md).
    ``rate_limit=`` (an ``amorsize.RateLimiter``) bounds the calls of ``func``, retries
    included, across every worker of the run, processes too (as does a policy's
    ``RetryBudget``); a cluster backend, which shared memory does not reach, is refused.
    ``report="run.html"`` (or ``.png``, with the ``report`` extra) writes a picture of the run
    when it ends: each worker's chunks over time, throughput, the plan's predicted vs
    measured time, retries and failures (see ``amorsize.report``).
    ``timeout=seconds`` fails an item attempt that runs longer with ``ItemTimeoutError``
    (processes: its worker is ended and replaced; threads and serial: its thread is
    abandoned; async: its coroutine is cancelled). ``max_tasks_per_worker`` and
    ``max_worker_memory`` (bytes of RSS) replace a worker process at a limit, between
    chunks (``backend="processes"`` only; ``RunReport.workers_recycled`` counts them).
    An ``async def`` function runs on the ``"async"`` backend: its coroutines are awaited on
    one event loop, as many in flight as the sampled wait calls for (``execute_async``
    from inside a coroutine).

    Sampling (when the optimizer sizes the run) calls ``func`` with its retry policy, and no
    sampled item runs twice. With ``backend="processes"`` every item, sampled ones included,
    runs in worker processes (a crash is that item's ``WorkerCrashedError``); with
    ``"auto"`` the first items run in the caller, the rest of the sample in workers once
    a process plan could pay off (docs/execute.md says when). A sampled item that fails
    raises at once with ``on_error="raise"``; with ``"collect"`` or a dead-letter queue it
    is a data point and sampling goes on. With a checkpoint, only items it does not hold
    are sampled, and messages name input indices.

    >>> execute(abs, [-1, -2, 3], backend="serial")
    [1, 2, 3]
    """
    check_bool("execute(): ", "return_plan", return_plan)
    opts = _RunOptions.build(
        "execute", func, data, n_jobs=n_jobs, chunksize=chunksize, backend=backend,
        retry=retry, on_error=on_error, progress=progress, verbose=verbose, client=client,
        checkpoint=checkpoint, dead_letter=dead_letter, circuit_breaker=circuit_breaker,
        observers=observers, trace_chunks=trace_chunks, rate_limit=rate_limit,
        report=report, timeout=timeout, max_tasks_per_worker=max_tasks_per_worker,
        max_worker_memory=max_worker_memory,
    )  # fmt: skip
    run = _Execution(func, data, opts, one_block=True)
    results = _collected(run)
    if return_plan:
        assert run.report is not None
        return results, run.report
    return results


def _collected(run: _Execution) -> list[Any]:
    """Every result of ``run``, in input order: its blocks come in completion order."""
    results: list[Any] = []
    extend = results.extend
    for start, values in run.result_blocks():
        if not results and start == 0 and type(values) is list:
            # A fresh list nobody else holds: the first block becomes the result (on the
            # serial fast path the whole run is one block, and copying it would cost ~3%).
            results = values
            extend = results.extend
        elif start == len(results):
            extend(values)
        else:
            end = start + len(values)
            if end > len(results):
                extend([None] * (end - len(results)))
            results[start:end] = values
    return results


def execute_iter(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    ordered: bool = True,
    n_jobs: int | None = None,
    chunksize: int | None = None,
    backend: str | Backend = "auto",
    retry: Any = None,
    on_error: Literal["raise", "collect"] = "raise",
    progress: bool = False,
    verbose: bool = False,
    client: Any = None,
    checkpoint: Any = None,
    dead_letter: Any = None,
    circuit_breaker: Any = None,
    observers: Sequence[RunObserver] | None = None,
    trace_chunks: bool = False,
    rate_limit: RateLimiter | None = None,
    report: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    max_tasks_per_worker: int | None = None,
    max_worker_memory: int | None = None,
) -> Iterator[Any]:
    """Yield ``func(x)`` for each item as results complete, with bounded memory.

    ``ordered=True`` yields in input order (a bounded reorder buffer pauses dispatch when
    one slow item holds the others back); ``ordered=False`` yields ``(index, result)``
    pairs in completion order. Works on generators of unknown or infinite length: input is
    read only as fast as workers take it. Other options are those of ``execute``; in
    collect mode a failed item yields its ``ItemFailure``.

    >>> list(execute_iter(abs, iter([-1, -2]), backend="serial"))
    [1, 2]
    """
    check_bool("execute_iter(): ", "ordered", ordered)
    opts = _RunOptions.build(
        "execute_iter", func, data, n_jobs=n_jobs, chunksize=chunksize, backend=backend,
        retry=retry, on_error=on_error, progress=progress, verbose=verbose, client=client,
        checkpoint=checkpoint, dead_letter=dead_letter, circuit_breaker=circuit_breaker,
        observers=observers, ordered_window=ordered, trace_chunks=trace_chunks,
        rate_limit=rate_limit, report=report, timeout=timeout,
        max_tasks_per_worker=max_tasks_per_worker, max_worker_memory=max_worker_memory,
    )  # fmt: skip
    return _iterate(_Execution(func, data, opts), ordered)


async def execute_async(func: Callable[[Any], Any], data: Iterable[Any], **options: Any) -> Any:
    """``execute`` for a caller inside an event loop: ``await execute_async(func, data)``.

    Options and result are ``execute``'s. The run's bookkeeping (sampling, observers,
    checkpoint writes) happens in a helper thread, so the loop stays responsive, and an
    ``async def`` function's coroutines run on this very loop (they may use its sessions,
    locks and queues). Cancelling the awaiting task cancels the coroutines in flight and
    ends the run; a plain function's run finishes in its thread.

    >>> import asyncio
    >>> async def double(x):
    ...     return 2 * x
    >>> asyncio.run(execute_async(double, [1, 2, 3]))
    [2, 4, 6]
    """
    import asyncio

    from amorsize.backends.aio import AsyncBackend

    loop = asyncio.get_running_loop()
    own: AsyncBackend | None = None
    if options.get("backend", "auto") in ("auto", "async") and _is_async(func):
        own = options["backend"] = AsyncBackend(loop=loop)
    done: asyncio.Future[Any] = loop.create_future()

    def work() -> None:
        try:
            result = execute(func, data, **options)
        except BaseException as exc:  # delivered to the awaiting task, whatever it is
            _deliver(loop, done, None, exc)
        else:
            _deliver(loop, done, result, None)

    threading.Thread(target=work, name="amorsize-execute-async", daemon=True).start()
    try:
        return await done
    except asyncio.CancelledError:
        if own is not None:
            own.cancel()
        raise


def _deliver(loop: Any, done: Any, result: Any, exc: BaseException | None) -> None:
    """Hand ``execute_async``'s outcome to its loop (unless the awaiting task is gone)."""

    def resolve() -> None:
        if done.cancelled():
            return
        if exc is None:
            done.set_result(result)
        else:
            done.set_exception(exc)

    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
        loop.call_soon_threadsafe(resolve)


def _iterate(run: _Execution, ordered: bool) -> Iterator[Any]:
    """``execute_iter``'s results: in input order, or ``(index, result)`` as completed.

    The blocks of results come out through the core's ``SerialStream``, which hands out a
    block's items (and the serial fast path's rest, item by item) at C speed.
    """
    return cast("Iterator[Any]", SerialStream(_ordered(run) if ordered else _unordered(run)))


def _unordered(run: _Execution) -> Iterator[Iterable[tuple[int, Any]]]:
    for start, values in run.result_blocks():
        if run.rest is not None:
            rest, run.rest = run.rest, None
            yield rest
            run.rest_ran(rest)
        else:
            yield enumerate(values, start)


def _ordered(run: _Execution) -> Iterator[Iterable[Any]]:
    pending: dict[int, list[Any]] = {}
    for start, values in run.result_blocks():
        if run.rest is not None:
            # The serial fast path: the stream runs the rest, one item per pull.
            rest, run.rest = run.rest, None
            yield rest
            run.rest_ran(rest)
            continue
        if start != run.emitted:
            pending[start] = values
            continue
        yield values
        run.emitted += len(values)
        while run.emitted in pending:
            values = pending.pop(run.emitted)
            yield values
            run.emitted += len(values)
