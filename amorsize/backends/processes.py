"""Processes backend: a warm pool of worker processes, each with its own pipe.

Data flow (the parent always knows which task is running on which worker)::

    parent (thread running execute)                           worker i (Process)
    -------------------------------                           ------------------
    _Worker i: out, conn, sentinel, in-flight FIFO
      FUNC (func, threads)  once per run ──── out_i ─────▶ loads func, limits BLAS threads
      TASK items (pickle protocol 5)   ──── out_i ─────▶ values = [func(x) for x in items]
      ◀─── conn_i ─── READY once | OK values | MIXED outcomes | FATAL (func not loadable)
                      | NOLOAD (the task's items did not unpickle: re-sent one item per task)
    epoll([conn_i..., sentinel_i...]) → a result, or a death
    death → read what the pipe still holds; the running task's items are re-queued one item
            per task (crash count + 1); an item that crashed more than ``crash_retries``
            times becomes a ``WorkerCrashedError`` outcome; tasks queued behind it re-run as is

One run is a ``_Run``; its loop (``_Run.results``) calls one named step at a time, after
loky's ``process_executor``::

    ┌▶ _grow      start missing workers, watch their pipe and sentinel
    │  _dispatch  idle workers first, then one prefetch each: _next_message (the front
    │             first, then TaskFeed.pull) and _send; a worker dead on send ─▶ _collect;
    │             an item that does not pickle ─▶ its failure (not_sent), reported first
    │  _wait      epoll until a worker sends or dies
    └─ _collect   a message ─▶ _receive (READY, or load_results of its oldest task)
                  a death   ─▶ _drain its pipe, then _bury its tasks (_crashed)
    ... until nothing is in flight or queued: TaskFeed.finish (end, or a paused iterator)

Limits of a run (``limits=``, a ``_timeout.WorkerLimits``; none: the paths above, unchanged)::

    timeout     FUNC tells the worker to arm its Watchdog; an attempt past its deadline ─▶
                the watchdog sends TIMEOUT (the item's position, the chunk's outcomes before
                it) and ends the worker ─▶ _timed_out: those outcomes are reported, the
                items after it go to the front, the item re-runs alone (timeout_retries) or
                fails with ItemTimeoutError; _expire: the worker's queued tasks go to the front.
                Backstop (a function holding the GIL keeps the watchdog from running): each
                attempt's [deadline, position] is also in a shared array; _wait wakes by it
                and _overdue kills a worker BACKSTOP_GRACE past it (its chunk's finished
                items are lost with it and re-run)
    max_tasks   _fit cuts a task to the items the worker may still run; at its limit it is
                sent nothing more and, once its tasks are answered, _retire stops it and
                _grow starts another
    max_memory  the worker measures its RSS after each chunk and, over the limit, sends
                RETIRE before the chunk's results: retired as above

Pickling the function, packing and loading results, and items that do not travel are
``amorsize.backends._wire``'s, shared with the dask backend.

Parent death: every worker holds the read end of one lifeline pipe whose only write end the
parent holds (a forked worker closes the parent's ends it inherited, see
``_after_fork_in_child``); a watchdog thread in the worker sees EOF the moment the parent is
gone, however it died (SIGKILL, SIGTERM, ``os._exit``), and ends the worker, even mid-item.
A pipe rather than ``prctl(PR_SET_PDEATHSIG)``: that signal fires when the *thread* that
started the worker exits, and the warm pool outlives the thread that created it.

Each direction is its own OS pipe: a small message costs about a third less CPU than
through a socketpair (``Pipe(duplex=True)``), measured by a round-trip loop here.

A worker holds at most two tasks: the one it runs and one small prefetched task, so it never
waits for the parent between chunks. Only messages under ``_PREFETCH_MAX_BYTES`` are
prefetched: a send to a busy worker must fit in the socket buffer, or parent and worker
could block on each other's full pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing
import os
import pickle
import selectors
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, ClassVar, cast

from amorsize._log import log_worker_crashed, log_worker_recycled
from amorsize._timeout import ItemTimeoutError, Watchdog, WorkerLimits, arm, rss_bytes
from amorsize.backends._wire import (
    FATAL,
    MIXED,
    NOLOAD,
    PROTOCOL,
    TIMEOUT,
    ErrorText,
    TaskFeed,
    TimedOut,
    dump_func,
    load_message,
    not_loaded,
    not_sent,
    pack_error,
    pack_results,
    portable_outcomes,
    run_and_pack,
    singles,
)
from amorsize.backends.base import (
    _NOT_RUN,
    Backend,
    OkValues,
    Outcome,
    Pause,
    RemoteTraceback,
    StopOnFailure,
    Task,
    WorkerCrashedError,
    failure_outcome,
)

# Message kinds, parent -> worker (worker -> parent: ``_wire.OK``, ``MIXED``, ...).
_FUNC, _TASK, _STOP = 0, 1, 2
# A worker's first message: it is up and serving. A worker that dies before sending it
# never started anything (bootstrap failure), so its tasks are not suspects.
_READY = b"ready"
# Workers dying before READY this many times in a row (none getting up in between) means
# they cannot start at all: the run raises instead of starting workers forever.
_MAX_STARTUP_DEATHS = 3

#: Seconds past an attempt's deadline (at least the timeout itself) after which the parent
#: kills a worker whose watchdog did not report it: the watchdog thread needs the GIL, which
#: a function stuck in C code may hold.
BACKSTOP_GRACE = 2.0

#: Times an item may crash its worker before it is reported as ``WorkerCrashedError``.
#: One re-run (alone on a fresh worker) separates the culprit from its chunk neighbours.
CRASH_RETRIES = 1

# Linux AF_UNIX socket buffers hold ~200 KB; staying far below keeps a prefetch send from
# ever blocking on a busy worker.
_PREFETCH_MAX_BYTES = 32 * 1024

# Thread-pool variables read by OpenMP, OpenBLAS, MKL, BLIS, numexpr and Accelerate at load.
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
_WHERE = "the worker process"
# Exit code of a worker that ended because its parent died (no one reads it; for ps/strace).
_ORPHANED_EXIT = 70
# Exit code of a worker ended by its watchdog: an item ran past its timeout.
_TIMED_OUT_EXIT = 71
# Sent by a worker just before a chunk's results when its RSS is over the run's limit: the
# parent sends it no more tasks and replaces it once its tasks are answered.
_RETIRE = b"retire"
# Modules whose presence means a BLAS/OpenMP pool may be loaded (threadpoolctl is then asked).
_THREADED_MODULES = ("numpy", "scipy", "torch", "sklearn", "numexpr", "numba", "cv2")


# --------------------------------------------------------------------------- worker side


class _ThreadLimiter:
    """Caps BLAS/OpenMP pools inside a worker; re-applied only when new modules appeared."""

    def __init__(self) -> None:
        self.threads = 0
        self.seen_modules = -1

    def apply(self, threads: int) -> None:
        if threads == self.threads and len(sys.modules) == self.seen_modules:
            return
        self.threads = threads
        self.seen_modules = len(sys.modules)
        if not any(m in sys.modules for m in _THREADED_MODULES):
            return
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional dependency: the environment variables still apply
            return
        # Applied for the rest of the worker's life: the returned handle is never restored.
        threadpool_limits(limits=threads)


_dumps = partial(pickle.dumps, protocol=PROTOCOL)


def _watch_parent(lifeline: Connection) -> None:
    """Block until the parent is gone (EOF on the lifeline), then end this worker at once."""
    try:
        while True:
            lifeline.recv_bytes()  # nothing is ever sent: this returns only by raising
    except (EOFError, OSError):
        pass
    # Nobody is left to read a result: skip cleanup (atexit, flushing) that could block.
    os._exit(_ORPHANED_EXIT)


def _worker_main(
    tasks: Connection,
    conn: Connection,
    env: dict[str, str],
    lifeline: Connection,
    shared: Any = None,
) -> None:
    """Serve tasks until the parent says stop or goes away (EOF on the pipe or lifeline)."""
    # Ctrl-C reaches the whole process group: the parent decides, workers do not die midway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_watch_parent, args=(lifeline,), name="amorsize-lifeline", daemon=True
    ).start()
    try:
        conn.send_bytes(_READY)
        _serve(tasks, conn, env, shared)
    except OSError:
        return  # the parent closed our pipes (it stopped or died): nothing to report to


class _Watched:
    """A worker's side of a run's limits: with a timeout, chunks run under a ``Watchdog``,
    which reports the overdue item and ends the worker (see ``_timeout``); with
    ``max_memory`` (0: none), the RSS is read after each chunk.
    """

    def __init__(self, send: Callable[[bytes], None], shared: Any = None) -> None:
        self.send = send
        # The running attempt's [deadline, position], for the parent; written through a
        # memoryview (faster than the ctypes array's own item assignment).
        self.shared = None if shared is None else memoryview(shared).cast("B").cast("d")
        self.guard: Watchdog | None = None
        self.watching = False
        self.start = 0  # the running chunk's first input index
        self.max_memory = 0
        self.plain = True  # neither limit: chunks take the usual path, at no cost

    def configure(self, seconds: float | None, max_memory: int | None) -> None:
        """A new run's limits (from its FUNC message)."""
        self.max_memory = max_memory or 0
        self.watching = seconds is not None
        self.plain = not self.watching and not self.max_memory
        if seconds is not None:
            if self.guard is None:
                self.guard = Watchdog(seconds, self._fire, shared=self.shared)
            self.guard.retune(seconds)
        arm(self.guard if self.watching else None)

    def run(self, func: Callable[[Any], Any], start: int, items: list[Any]) -> None:
        """Run a chunk and send its message (preceded by ``_RETIRE`` when over memory)."""
        guard = self.guard
        if not self.watching or guard is None:  # a memory limit only
            msg = run_and_pack(func, start, items, _WHERE, _dumps)
            if self.max_memory and rss_bytes() > self.max_memory:
                self.send(_RETIRE)
            self.send(msg)
            return
        self.start = start
        guard.busy.set()
        try:
            result = _run_each(func, items, guard)
        finally:
            guard.busy.clear()
        try:
            msg = pack_results(result, start, _WHERE, _dumps)
        except Exception as exc:  # as run_and_pack: a packing error fails the items only
            note = f"the results of items {start}.. could not be sent back: {exc!r:.300}"
            msg = _dumps((MIXED, [failure_outcome(RuntimeError(note))] * len(items)))
        retire = bool(self.max_memory) and rss_bytes() > self.max_memory
        with guard.lock:  # never interleaved with the watchdog's message
            if retire:
                self.send(_RETIRE)
            self.send(msg)

    def _fire(self, k: int) -> None:
        """The watchdog's report (called under its lock) that item ``k`` of the chunk ran
        past its deadline: the outcomes before it, then exit."""
        try:
            got = self.guard.done if self.guard is not None else []
            done = [Outcome(True, v) for v in got[:k]] if type(got) is OkValues else got[:k]
            safe = portable_outcomes(done, _dumps, _WHERE, self.start)
            self.send(_dumps((TIMEOUT, (k, safe))))
        finally:
            os._exit(_TIMED_OUT_EXIT)


def _run_each(func: Callable[[Any], Any], items: list[Any], guard: Watchdog) -> Any:
    """``run_chunk_fast`` with the chunk's results so far in ``guard.done`` (plain values,
    then ``Outcome``s after a failure), what the watchdog reports if an item runs too long.

    ``list.extend`` grows the list item by item, so another thread sees each result as
    soon as it is in.
    """
    stop = func if type(func) is StopOnFailure else None
    if stop is not None:
        if stop.failed:
            return [_NOT_RUN] * len(items)
        func = stop.func
    values = OkValues()
    guard.done = values
    try:
        values.extend(map(func, items))
        return values
    except Exception as exc:
        first = exc
    out = [Outcome(True, v) for v in values]
    out.append(failure_outcome(first))
    guard.done = out  # no attempt runs now: the watchdog is not reading it
    if stop is not None:
        stop.failed = True
        out.extend([_NOT_RUN] * (len(items) - len(out)))
        return out
    for item in items[len(out) :]:
        try:
            out.append(Outcome(True, func(item)))
        except Exception as exc:
            out.append(failure_outcome(exc))
    return out


def _serve(tasks: Connection, conn: Connection, env: dict[str, str], shared: Any) -> None:
    # The parent sends only the variables the user left unset: set them even over a value
    # a forkserver inherited from an earlier pool of another size.
    os.environ.update(env)
    limiter = _ThreadLimiter()
    loads = pickle.loads
    recv, send = tasks.recv_bytes, conn.send_bytes
    func: Callable[[Any], Any] | None = None
    fatal: bytes | None = None
    watched = _Watched(send, shared)
    while True:
        try:
            data = recv()
        except EOFError:
            return
        try:
            kind, payload = loads(data)
        except Exception as exc:
            # Only a TASK can fail to load (FUNC carries bytes, loaded below): none of its
            # items ran; the parent re-sends them one per task to find the culprit.
            send(pack_error(NOLOAD, exc, _dumps))
            continue
        if kind == _TASK:
            if fatal is not None or func is None:
                send(fatal or pack_error(FATAL, RuntimeError("no function loaded"), _dumps))
                continue
            start, items = payload
            if watched.plain:
                send(run_and_pack(func, start, items, _WHERE, _dumps))
            else:
                watched.run(func, start, items)
        elif kind == _FUNC:
            watched.configure(payload[2], payload[3])
            try:
                func = loads(payload[0])
                fatal = None
                limiter.apply(payload[1])
            except BaseException as exc:
                func = None
                fatal = pack_error(FATAL, exc, _dumps)
        else:
            return


# --------------------------------------------------------------------------- parent side


class _Worker:
    __slots__ = ("conn", "expired", "inflight", "items", "out", "process", "ready", "retiring",
                 "run_id", "shared")  # fmt: skip

    def __init__(self, process: Any, out: Connection, conn: Connection, shared: Any) -> None:
        self.process = process
        # [deadline, position] of the attempt the worker runs under a timeout (0: none),
        # written by the worker: what the parent's backstop reads (``_Run._overdue``).
        self.shared = shared
        self.out = out  # tasks to the worker
        self.conn = conn  # results from the worker
        # (run id, task, message size) for every task sent and not yet answered, in order.
        self.inflight: deque[tuple[int, Task, int]] = deque()
        self.run_id = 0  # the run whose function this worker holds
        self.ready = False  # READY received
        self.items = 0  # items sent to it in its life (max_tasks_per_worker counts them)
        self.retiring = False  # at a limit: no more tasks; replaced once they are answered
        self.expired = False  # its watchdog ended it (timeout): its queued tasks never ran


def _stop(worker: _Worker, *, terminate: bool, timeout: float) -> int | None:
    """End ``worker``'s process and close its pipes; return its exit code.

    ``terminate`` interrupts a busy worker; one that has not exited after ``timeout``
    seconds is killed, so stopping never hangs on a wedged worker.
    """
    proc = worker.process
    if terminate and proc.is_alive():
        proc.terminate()
    proc.join(timeout=timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
    worker.conn.close()
    worker.out.close()
    return cast("int | None", proc.exitcode)


class ProcessesBackend(Backend):
    """A warm pool of worker processes reused across ``execute`` calls.

    ``start_method`` is ``"fork"``, ``"spawn"``, ``"forkserver"`` or ``None`` (the platform
    default, as ``multiprocessing`` itself uses). Workers start on first use, grow to the largest ``n_jobs`` asked for, and stop
    at interpreter exit (``close``). A run that finds the pool busy (another thread, or a
    nested call) gets a private pool closed after it.

    >>> from amorsize.backends.base import Task
    >>> b = ProcessesBackend()
    >>> [list(o) for _, o in b.run(abs, iter([Task(0, [-3])]), n_jobs=1, max_in_flight=2)]
    [[3]]
    >>> b.close()
    """

    name: ClassVar[str] = "processes"
    supports_pause: ClassVar[bool] = True
    #: ``run`` takes ``limits=`` (a ``WorkerLimits``: per-item timeout, worker recycling).
    supports_limits: ClassVar[bool] = True

    def __init__(self, start_method: str | None = None, *, crash_retries: int = CRASH_RETRIES):
        if start_method is not None and start_method not in multiprocessing.get_all_start_methods():
            msg = (
                f"start_method must be one of {multiprocessing.get_all_start_methods()} or None "
                f"(the platform default); got {start_method!r}"
            )
            raise ValueError(msg)
        if not isinstance(crash_retries, int) or crash_retries < 0:
            msg = f"crash_retries must be an int >= 0; got {crash_retries!r}"
            raise ValueError(msg)
        self._ctx = multiprocessing.get_context(start_method)
        self.start_method: str = self._ctx.get_start_method()
        if self.start_method == "forkserver":
            _preload(self._ctx)
        self.crash_retries = crash_retries
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._runs = itertools.count(1)
        self._started = 0
        _LIVE.add(self)

    # -- pool management -------------------------------------------------------------------

    def warm_workers(self) -> int:
        """Workers alive in the pool right now."""
        return sum(1 for w in self._workers if w.process.is_alive())

    def _start_workers(self, count: int, threads: int) -> None:
        env = {k: str(threads) for k in _THREAD_ENV if k not in os.environ}
        ctx = self._ctx
        with _ENV_LOCK:
            # spawn/forkserver children read the environment when they start, before they
            # import the function's modules (and with them, numpy's BLAS).
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                lifeline = _lifeline()
                for _ in range(count):
                    task_r, task_w = ctx.Pipe(duplex=False)
                    result_r, result_w = ctx.Pipe(duplex=False)
                    shared = ctx.RawArray("d", 2)
                    self._started += 1
                    proc = ctx.Process(  # type: ignore[attr-defined]
                        target=_worker_main,
                        args=(task_r, result_w, env, lifeline, shared),
                        name=f"amorsize-worker-{self._started}",
                        daemon=True,
                    )
                    # In the pool before it starts: a forked worker then closes its copies of
                    # the parent's ends (_after_fork_in_child), its own included (else it
                    # would hold the write end of its own task pipe and never see EOF), and a
                    # Ctrl-C during start-up still stops it.
                    worker = _Worker(proc, task_w, result_r, shared)
                    self._workers.append(worker)
                    try:
                        proc.start()
                    except BaseException:
                        self._workers.remove(worker)
                        for end in (task_r, task_w, result_r, result_w):
                            end.close()
                        raise
                    task_r.close()
                    result_w.close()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def _discard(self, worker: _Worker, *, kill: bool) -> int | None:
        """Remove ``worker`` from the pool; return its exit code."""
        if worker in self._workers:
            self._workers.remove(worker)
        return _stop(worker, terminate=kill, timeout=2.0)

    def _reap_stale(self) -> None:
        """Workers still running a cancelled run's task are drained if done, else stopped."""
        for w in list(self._workers):
            if not w.process.is_alive():
                self._discard(w, kill=False)
                continue
            try:
                while w.inflight and w.conn.poll():
                    data = w.conn.recv_bytes()
                    if not w.ready or data == _RETIRE:
                        w.ready = True
                        w.retiring = w.retiring or data == _RETIRE
                        continue
                    w.inflight.popleft()
            except (EOFError, OSError):
                self._discard(w, kill=True)
                continue
            if w.inflight or w.retiring:
                w.inflight.clear()
                self._discard(w, kill=True)

    def close(self) -> None:
        """Stop every worker: idle ones are asked to exit, busy ones are terminated."""
        workers, self._workers = self._workers, []
        stop = _dumps((_STOP, None))
        for w in workers:
            if not w.inflight:
                with contextlib.suppress(OSError):
                    w.out.send_bytes(stop)
        for w in workers:
            _stop(w, terminate=bool(w.inflight), timeout=1.0)

    def _forget_after_fork(self) -> None:
        # In a forked child the workers belong to the parent: close our copies of their pipes
        # so their EOF (parent gone) is not delayed by us, and start afresh.
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.conn.close()
                w.out.close()
        self._workers = []
        self._lock = threading.Lock()

    # -- running ---------------------------------------------------------------------------

    def run(
        self,
        func: Callable[[Any], Any],
        tasks: Iterator[Task | Pause],
        *,
        n_jobs: int,
        max_in_flight: int,
        limits: WorkerLimits | None = None,
    ) -> Iterator[tuple[Task, list[Outcome] | OkValues]]:
        """Yield each task with its outcomes in completion order (see the module docstring).

        ``limits``: a per-item timeout (the worker is ended and replaced, the rest of its
        chunk re-run) and worker recycling (``max_tasks``, ``max_memory``); ``limits.recycled``
        counts the workers replaced for reaching a limit.
        """
        if multiprocessing.current_process().daemon:
            msg = (
                "backend='processes' cannot start workers from inside a daemonic worker "
                "process (nested parallelism); use backend='threads' or 'serial' inside func"
            )
            raise RuntimeError(msg)
        if not self._lock.acquire(blocking=False):
            private = ProcessesBackend(self.start_method, crash_retries=self.crash_retries)
            try:
                yield from private.run(
                    func, tasks, n_jobs=n_jobs, max_in_flight=max_in_flight, limits=limits
                )
            finally:
                private.close()
            return
        try:
            yield from self._run(func, tasks, n_jobs, max_in_flight, limits)
        finally:
            self._lock.release()

    def _run(
        self,
        func: Callable[[Any], Any],
        tasks: Iterator[Task | Pause],
        n_jobs: int,
        max_in_flight: int,
        limits: WorkerLimits | None,
    ) -> Iterator[tuple[Task, list[Outcome] | OkValues]]:
        run = _Run(self, func, tasks, n_jobs, max_in_flight, limits)
        self._reap_stale()
        try:
            yield from run.results()
        except BaseException as exc:
            # After an error from the task iterator (an observer, the user's generator) or
            # from a worker's setup, or a closed generator, tasks still running are left to
            # finish and are drained (or stopped) by the next run: the pool stays warm.
            if not isinstance(exc, (Exception, GeneratorExit)):
                # KeyboardInterrupt (or a bug): stop every worker now, leave no orphan.
                self.close()
            raise
        finally:
            run.sel.close()


# A task to send before pulling new ones (a crash re-run, a prefetch refusal, one item of a
# chunk that did not travel), with its message once pickled.
_Unsent = tuple[Task, bytes | None]
_Report = tuple[Task, list[Outcome] | OkValues]


class _Run:
    """One ``ProcessesBackend.run``: its state, and the named steps of its loop (``results``).

    ``in_flight`` counts this run's tasks sent and not yet settled; ``front`` holds the tasks
    to send before pulling new ones; ``crashes`` counts, per input index, the worker deaths
    it was running in.
    """

    def __init__(
        self,
        pool: ProcessesBackend,
        func: Callable[[Any], Any],
        tasks: Iterator[Task | Pause],
        n_jobs: int,
        max_in_flight: int,
        limits: WorkerLimits | None = None,
    ) -> None:
        self.pool = pool
        self.run_id = next(pool._runs)
        self.n_jobs = n_jobs
        # Imported here: a spawned worker imports this module and needs no machine facts.
        from amorsize.system import available_cpus

        self.threads = max(1, available_cpus() // n_jobs)
        self.limits = limits = limits or WorkerLimits()
        func_bytes = dump_func(func, "worker processes")
        self.func_msg = _dumps(
            (_FUNC, (func_bytes, self.threads, limits.timeout, limits.max_memory))
        )
        self.timeouts: dict[int, int] = {}  # input index -> its attempts that timed out
        self.later: list[_Report] = []  # a timeout's reports, yielded after its message
        self.feed = TaskFeed(tasks)
        # A prefetched task per worker only when the executor allows two per worker.
        self.depth = 2 if max_in_flight >= 2 * n_jobs else 1
        self.max_in_flight = max(1, max_in_flight)
        self.in_flight = 0
        self.front: deque[_Unsent] = deque()
        self.crashes: dict[int, int] = {}
        self.startup_deaths = 0  # workers dead before READY, in a row
        self.not_sent: _Report | None = None  # the failure of an item that does not pickle
        self.active: list[_Worker] = []
        # A persistent epoll/poll set: connection.wait() would build a new selector on every
        # call, a cost paid per chunk.
        self.sel = selectors.DefaultSelector()
        self.watched: set[_Worker] = set()

    def results(self) -> Iterator[_Report]:
        """The loop: grow the pool, dispatch, then settle what comes back, until done."""
        while True:
            self._grow()
            broken = self._dispatch()
            if self.not_sent is not None:
                # It never ran: its failure goes back before anything waits.
                report, self.not_sent = self.not_sent, None
                yield report
            elif broken is not None:
                # Settle the dead worker's other tasks now, then dispatch afresh.
                yield from self._collect(broken, dead=True)
            elif self.in_flight:
                ready = self._wait()
                for w, dead in ready.items():
                    yield from self._collect(w, dead)
                if not ready:
                    yield from self._overdue()
            elif not self.front:
                self.feed.finish()
                return

    # -- dispatch --------------------------------------------------------------------------

    def _grow(self) -> None:
        """Start the workers missing (first run, or after deaths); watch the active ones."""
        if len(self.watched) == self.n_jobs:
            return  # the usual case: the active workers are all watched, none died
        pool = self.pool
        cap = self.limits.max_tasks
        while True:
            if len(pool._workers) < self.n_jobs:
                pool._start_workers(self.n_jobs - len(pool._workers), self.threads)
            self.active = pool._workers[: self.n_jobs]
            if cap is None:
                break
            # Warm workers that reached the limit in earlier runs are replaced first.
            spent = [w for w in self.active if w.items >= cap and not w.inflight]
            if not spent:
                break
            for w in spent:
                self._retire(w)
        for w in self.active:
            if w not in self.watched:
                self.sel.register(w.conn, selectors.EVENT_READ, (w, False))
                self.sel.register(w.process.sentinel, selectors.EVENT_READ, (w, True))
                self.watched.add(w)

    def _dispatch(self) -> _Worker | None:
        """Give every idle worker a task first, then each one a prefetched task.

        Returns a worker found dead when sending to it (the task is back at the front: it
        never ran), else ``None``.
        """
        for level in range(self.depth):
            for w in self.active:
                if len(w.inflight) != level or w.retiring:
                    continue
                if self.in_flight >= self.max_in_flight:
                    return None
                nxt = self._next_message()
                if nxt is None:
                    return None  # paused, nothing left to send, or an item not sent
                task, msg = nxt
                if level > 0 and len(msg) > _PREFETCH_MAX_BYTES:
                    self.front.appendleft(nxt)  # sent when a worker is idle instead
                    return None
                if self.limits.max_tasks is not None:
                    task, msg = self._fit(w, task, msg)
                if not self._send(w, task, msg):
                    return w
        return None

    def _fit(self, w: _Worker, task: Task, msg: bytes) -> tuple[Task, bytes]:
        """``task``, cut to the items ``w`` may still run (the rest goes back to the front);
        ``w`` retires once it has been sent its last item."""
        cap = self.limits.max_tasks
        assert cap is not None
        room = max(1, cap - w.items)  # a worker at its limit already retired
        if len(task.items) > room:
            self.front.appendleft((Task(task.start + room, task.items[room:]), None))
            task = Task(task.start, task.items[:room])
            msg = _dumps((_TASK, (task.start, task.items)))
        if w.items + len(task.items) >= cap:
            w.retiring = True
        return task, msg

    def _next_message(self) -> tuple[Task, bytes] | None:
        """The next task to send, with its message: the front first, then the executor's.

        A chunk that does not pickle goes back to the front one item per task; a single
        item that does not pickle becomes ``not_sent``, its failure, and ends the round.
        """
        while True:
            task: Task | None
            if self.front:
                task, msg = self.front.popleft()
                if msg is not None:
                    return task, msg
            else:
                task = self.feed.pull()
                if task is None:
                    return None
            try:
                return task, _dumps((_TASK, (task.start, task.items)))
            except Exception as exc:
                if len(task.items) > 1:
                    self.front.extendleft(reversed([(t, None) for t in singles(task)]))
                else:
                    self.not_sent = task, not_sent(task, exc, "a worker process")
                    return None

    def _send(self, w: _Worker, task: Task, msg: bytes) -> bool:
        """Send ``task`` to ``w``, after the run's function if ``w`` lacks it; ``False`` if
        ``w`` died before taking it (the task goes back to the front)."""
        try:
            if w.run_id != self.run_id:
                w.out.send_bytes(self.func_msg)
                w.run_id = self.run_id
            w.out.send_bytes(msg)
        except OSError:
            self.front.appendleft((task, msg))
            return False
        w.inflight.append((self.run_id, task, len(msg)))
        w.items += len(task.items)
        self.in_flight += 1
        return True

    # -- results and deaths ----------------------------------------------------------------

    def _wait(self) -> dict[_Worker, bool]:
        """Block until workers send or die: each such worker, ``True`` if it died. With a
        timeout, wake by the backstop's next deadline too (then nothing may be ready)."""
        ready: dict[_Worker, bool] = {}
        wait = None if self.limits.timeout is None else self._backstop_wait()
        for key, _ in self.sel.select(wait):
            w, is_sentinel = key.data
            ready[w] = ready.get(w, False) or is_sentinel
        return ready

    def _backstop_wait(self) -> float | None:
        """Seconds until the earliest backstop deadline (a run with a timeout)."""
        seconds = self.limits.timeout or 0.0
        grace = max(BACKSTOP_GRACE, seconds)
        now = time.monotonic()
        # An attempt that starts while we sleep can only be overdue a full period later.
        wait = seconds + grace
        for w in self.watched:
            deadline = w.shared[0] if w.inflight else 0.0
            if deadline:
                wait = min(wait, deadline + grace - now)
        return max(0.0, wait)

    def _overdue(self) -> Iterator[_Report]:
        """The backstop: a worker whose attempt is ``BACKSTOP_GRACE`` past its deadline and
        whose watchdog has not reported it holds the GIL in C code (a regex, an extension):
        it is killed. The items its chunk finished are lost with it and run again."""
        seconds = self.limits.timeout
        if seconds is None:
            return
        grace = max(BACKSTOP_GRACE, seconds)
        now = time.monotonic()
        for w in [w for w in self.watched if w.inflight and not w.expired]:
            deadline, position = w.shared[0], int(w.shared[1])
            if not deadline or now < deadline + grace:
                continue
            w.process.kill()
            rid, task, _ = w.inflight.popleft()
            if rid == self.run_id:
                self.in_flight -= 1
                yield from self._timed_out(w, task, TimedOut(position, []), kept=False)
            self._expire(w)

    def _collect(self, w: _Worker, dead: bool) -> Iterator[_Report]:
        """What ``w`` sent (all of it if it died), then, if it died, its tasks' fate."""
        if w not in self.watched:
            return  # discarded while handling another worker's event
        if not dead:
            if w.inflight or not w.ready:
                # Readable: exactly one message per event (a level-triggered selector reports
                # the next one); Connection.poll() would build a new selector per call.
                try:
                    data = w.conn.recv_bytes()
                except (EOFError, OSError):
                    pass  # its pipe closed: it is dying
                else:
                    report = self._receive(w, data)
                    if report is not None:
                        yield report
                    if w.retiring:
                        yield from self._settle(w)
                    return
            elif w.process.is_alive():
                return
            # else EOF on an idle worker's pipe: it is exiting
        yield from self._drain(w)
        yield from self._bury(w)

    def _receive(self, w: _Worker, data: bytes) -> _Report | None:
        """A message from ``w``: the first says it is up (READY), ``_RETIRE`` that it is over
        its memory limit, each other one answers its oldest task in flight (``None``: nothing
        to report for it now; a timeout's reports wait in ``later``)."""
        if not w.ready:
            w.ready = True
            self.startup_deaths = 0
            return None
        if data == _RETIRE:  # a bytes compare fails on the length first: ~free
            w.retiring = True
            return None
        rid, task, _ = w.inflight.popleft()
        if rid != self.run_id:
            return None  # a cancelled run's task: its result is not wanted
        self.in_flight -= 1
        got = load_message(data, task, _WHERE)
        if not isinstance(got, tuple):  # OkValues or outcomes (the others are NamedTuples)
            return task, got
        if isinstance(got, TimedOut):
            self.later.extend(self._timed_out(w, task, got))
            return None
        if got.kind == NOLOAD:
            return self._not_loaded(task, got.error)
        self._drop(w, kill=True)
        raise self._function_not_loaded(got.error)

    def _settle(self, w: _Worker) -> Iterator[_Report]:
        """After a message from a worker at a limit: a timeout's reports, then the worker
        replaced (ended by its watchdog, or retired once its tasks are answered)."""
        later, self.later = self.later, []
        yield from later
        if w.expired:
            self._expire(w)
        elif not w.inflight and w in self.watched:
            self._retire(w)

    def _timed_out(
        self, w: _Worker, task: Task, got: TimedOut, *, kept: bool = True
    ) -> Iterator[_Report]:
        """Item ``got.offset`` of ``task`` ran past the timeout and its worker is ending: the
        items before it are done (``kept``; else their results are lost: they re-run), those
        after it re-run on another worker, and it re-runs alone on a fresh one while the
        retry policy allows, else fails."""
        w.expired = w.retiring = True
        k, items = got.offset, task.items
        if k >= len(items):  # the watchdog saw the chunk end as it fired: nothing overdue
            yield task, got.done
            return
        if k and kept:
            yield Task(task.start, items[:k]), got.done
        if k + 1 < len(items):
            self.front.appendleft((Task(task.start + k + 1, items[k + 1 :]), None))
        if k and not kept:
            self.front.appendleft((Task(task.start, items[:k]), None))
        index = task.start + k
        count = self.timeouts.get(index, 0) + 1
        self.timeouts[index] = count
        limits = self.limits
        if count > limits.timeout_retries:
            err = ItemTimeoutError(limits.timeout or 0.0, index, count)
            yield Task(index, [items[k]]), [Outcome(False, err, count)]
        else:
            self.front.appendleft((Task(index, [items[k]]), None))

    def _expire(self, w: _Worker) -> None:
        """``w`` reported a timeout and is ending itself: the tasks queued behind the item
        never started, so they go back to the front as they are."""
        for rid, task, _ in w.inflight:
            if rid == self.run_id:
                self.in_flight -= 1
                self.front.append((task, None))
        w.inflight.clear()
        self._drop(w, kill=True)

    def _retire(self, w: _Worker) -> None:
        """Replace ``w``, at a limit and with nothing in flight (``_grow`` starts another)."""
        cap = self.limits.max_tasks
        why = "max_tasks_per_worker" if cap is not None and w.items >= cap else "max_worker_memory"
        pid = w.process.pid
        with contextlib.suppress(OSError):
            w.out.send_bytes(_dumps((_STOP, None)))
        self._drop(w, kill=False)
        self.limits.recycled += 1
        log_worker_recycled(pid, why, w.items)

    def _drain(self, w: _Worker) -> Iterator[_Report]:
        """The messages a dead worker sent before it died: still in its pipe."""
        while w.inflight:
            try:
                if not w.conn.poll():
                    return
                data = w.conn.recv_bytes()
            except (EOFError, OSError):
                return
            report = self._receive(w, data)
            if report is not None:
                yield report
            if self.later:
                later, self.later = self.later, []
                yield from later

    def _bury(self, w: _Worker) -> Iterator[_Report]:
        """A dead worker's tasks: those that never started re-run as they are; the items of
        the one it was running re-run one per task, or fail once they crashed too often."""
        lost = list(w.inflight)
        w.inflight.clear()
        # Not kill=True: a worker whose pipe just hit EOF may need a moment to finish exiting,
        # and terminating it would replace its real exit code with SIGTERM's.
        exitcode = self._drop(w, kill=False)
        if not w.ready:
            self._count_startup_death(exitcode)
        for k, (rid, task, _) in enumerate(lost):
            if rid != self.run_id:
                continue
            self.in_flight -= 1
            if k > 0 or not w.ready or w.expired:
                # Queued behind the running task, or the worker never got up, or its
                # watchdog ended it after reporting: the task never started, so its items
                # are not suspects.
                self.front.append((task, None))
            else:
                log_worker_crashed(w.process.pid, exitcode, task.start, len(task.items))
                yield from self._crashed(task, exitcode)

    def _crashed(self, task: Task, exitcode: int | None) -> Iterator[_Report]:
        """The items of the task a worker died running: each re-runs alone on a fresh worker,
        or, past ``crash_retries``, is reported as a ``WorkerCrashedError``."""
        for i, item in enumerate(task.items):
            index = task.start + i
            count = self.crashes.get(index, 0) + 1
            self.crashes[index] = count
            if count > self.pool.crash_retries:
                err = WorkerCrashedError(exitcode, count)
                yield Task(index, [item]), [Outcome(False, err, count)]
            else:
                self.front.append((Task(index, [item]), None))

    def _count_startup_death(self, exitcode: int | None) -> None:
        """Workers that keep dying before READY cannot start at all: raise, never loop."""
        self.startup_deaths += 1
        if self.startup_deaths >= _MAX_STARTUP_DEATHS:
            msg = (
                f"worker processes die while starting (start method {self.pool.start_method!r},"
                f" exit code {exitcode}), {self.startup_deaths} in a row: see their "
                "stderr above. Under spawn and forkserver, the main module is imported in "
                "each worker: guard the code that starts work with "
                "`if __name__ == '__main__':`"
            )
            raise RuntimeError(msg)

    def _not_loaded(self, task: Task, error: ErrorText) -> _Report | None:
        """A task whose items the worker could not unpickle (none ran): re-sent one item per
        task, at the front and in order, to find the culprit, which then fails alone."""
        if len(task.items) > 1:
            self.front.extendleft(reversed([(t, None) for t in singles(task)]))
            return None
        fix = (
            f"its class must load there (importable under start method "
            f"{self.pool.start_method!r}, or defined where cloudpickle sends it by value), "
            "or use backend='threads'"
        )
        return task, not_loaded(task, error, "in the worker process", fix)

    def _function_not_loaded(self, error: ErrorText) -> RuntimeError:
        name, text, tb = error
        msg = (
            f"the function could not be loaded in a worker process (start method "
            f"{self.pool.start_method!r}): {name}: {text}. Under spawn and forkserver the "
            f"function's module must be importable by the workers; cloudpickle sends "
            f"lambdas, closures and __main__ functions by value"
        )
        err = RuntimeError(msg)
        err.__cause__ = RemoteTraceback(tb)
        return err

    def _drop(self, w: _Worker, *, kill: bool) -> int | None:
        """Stop watching ``w`` and remove it from the pool; its exit code."""
        if w in self.watched:
            self.watched.discard(w)
            self.sel.unregister(w.conn)
            self.sel.unregister(w.process.sentinel)
        return self.pool._discard(w, kill=kill)


_ENV_LOCK = threading.Lock()
_LIVE: weakref.WeakSet[ProcessesBackend] = weakref.WeakSet()


def _preload(ctx: Any) -> None:
    # Workers forked by the server then start with amorsize already imported.
    ctx.set_forkserver_preload([__name__])


def _close_all() -> None:
    for backend in list(_LIVE):
        backend.close()


_LIFELINE: list[Connection] = []  # [read end, write end] once a pool has started
_LIFELINE_LOCK = threading.Lock()


def _lifeline() -> Connection:
    """The read end of this process's lifeline pipe (see the module docstring)."""
    with _LIFELINE_LOCK:
        if not _LIFELINE:
            _LIFELINE.extend(multiprocessing.Pipe(duplex=False))
        return _LIFELINE[0]


def _after_fork_in_child() -> None:
    # Any forked child (a worker, or the user's own fork) must not hold the parent's ends:
    # the lifeline's write end would keep every worker alive after the parent dies, and a
    # task pipe's write end would keep its worker from ever seeing EOF.
    if _LIFELINE:
        with contextlib.suppress(OSError):
            _LIFELINE[1].close()
        # The read end stays open: a forked worker watches it (it is that worker's argument).
        _LIFELINE.clear()
    global _LIFELINE_LOCK
    _LIFELINE_LOCK = threading.Lock()  # another thread may have held it at fork time
    for backend in list(_LIVE):
        backend._forget_after_fork()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
