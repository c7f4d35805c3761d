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
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any, ClassVar, cast

from amorsize.backends.base import (
    Backend,
    OkValues,
    Outcome,
    RemoteTraceback,
    Task,
    WorkerCrashedError,
    error_payload,
    failure_outcome,
    portable_outcomes,
    reload_outcomes,
    run_chunk_fast,
)

# Message kinds, parent -> worker and worker -> parent.
_FUNC, _TASK, _STOP = 0, 1, 2
_OK, _MIXED, _FATAL, _NOLOAD = 0, 1, 2, 3
# A worker's first message: it is up and serving. A worker that dies before sending it
# never started anything (bootstrap failure), so its tasks are not suspects.
_READY = b"ready"
# Workers dying before READY this many times in a row (none getting up in between) means
# they cannot start at all: the run raises instead of starting workers forever.
_MAX_STARTUP_DEATHS = 3

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
# Modules whose presence means a BLAS/OpenMP pool may be loaded (threadpoolctl is then asked).
_THREADED_MODULES = ("numpy", "scipy", "torch", "sklearn", "numexpr", "numba", "cv2")


# --------------------------------------------------------------------------- worker side


class _ThreadLimiter:
    """Caps BLAS/OpenMP pools inside a worker; re-applied only when new modules appeared."""

    def __init__(self) -> None:
        self.threads = 0
        self.seen_modules = -1
        self.handle: Any = None

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
        self.handle = threadpool_limits(limits=threads)


def _safe_dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=5)


def _result_message(func: Callable[[Any], Any], start: int, items: list[Any]) -> bytes:
    result = run_chunk_fast(func, items)
    if type(result) is OkValues:
        try:
            return _safe_dumps((_OK, list(result)))
        except Exception:
            result = [Outcome(True, v) for v in result]
    outcomes = portable_outcomes(cast("list[Outcome]", result), _safe_dumps, _WHERE, start)
    return _safe_dumps((_MIXED, outcomes))


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
    tasks: Connection, conn: Connection, env: dict[str, str], lifeline: Connection
) -> None:
    """Serve tasks until the parent says stop or goes away (EOF on the pipe or lifeline)."""
    # Ctrl-C reaches the whole process group: the parent decides, workers do not die midway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_watch_parent, args=(lifeline,), name="amorsize-lifeline", daemon=True
    ).start()
    try:
        conn.send_bytes(_READY)
        _serve(tasks, conn, env)
    except OSError:
        return  # the parent closed our pipes (it stopped or died): nothing to report to


def _serve(tasks: Connection, conn: Connection, env: dict[str, str]) -> None:
    # The parent sends only the variables the user left unset: set them even over a value
    # a forkserver inherited from an earlier pool of another size.
    os.environ.update(env)
    limiter = _ThreadLimiter()
    loads = pickle.loads
    recv, send = tasks.recv_bytes, conn.send_bytes
    func: Callable[[Any], Any] | None = None
    fatal: bytes | None = None
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
            send(_safe_dumps((_NOLOAD, error_payload(exc))))
            continue
        if kind == _TASK:
            if fatal is not None or func is None:
                send(fatal or _safe_dumps((_FATAL, ("RuntimeError", "no function loaded", ""))))
                continue
            start, items = payload
            try:
                message = _result_message(func, start, items)
            except Exception as exc:
                # Belt and braces: whatever went wrong packing results fails the chunk's
                # items, never the worker (a dead worker's items would run again).
                msg = f"the results of items {start}.. could not be sent back: {exc!r:.300}"
                failed = failure_outcome(RuntimeError(msg))
                message = _safe_dumps((_MIXED, [failed] * len(items)))
            send(message)
        elif kind == _FUNC:
            try:
                func = loads(payload[0])
                fatal = None
                limiter.apply(payload[1])
            except BaseException as exc:
                func = None
                fatal = _safe_dumps((_FATAL, error_payload(exc)))
        else:
            return


# --------------------------------------------------------------------------- parent side


class _Worker:
    __slots__ = ("conn", "inflight", "out", "process", "ready", "run_id")

    def __init__(self, process: Any, out: Connection, conn: Connection) -> None:
        self.process = process
        self.out = out  # tasks to the worker
        self.conn = conn  # results from the worker
        # (run id, task, message size) for every task sent and not yet answered, in order.
        self.inflight: deque[tuple[int, Task, int]] = deque()
        self.run_id = 0  # the run whose function this worker holds
        self.ready = False  # READY received


def _dump_func(func: Callable[[Any], Any]) -> bytes:
    try:
        import cloudpickle
    except ImportError:
        cloudpickle = None
    try:
        if cloudpickle is not None:
            return cast(bytes, cloudpickle.dumps(func, protocol=5))
        return pickle.dumps(func, protocol=5)
    except Exception as exc:
        hint = (
            "define it at module level, or use backend='threads'"
            if cloudpickle is not None
            else "define it at module level, install cloudpickle (lambdas, closures and "
            "__main__ functions then work), or use backend='threads'"
        )
        msg = (
            f"func={func!r} cannot be sent to worker processes: pickling it failed "
            f"({type(exc).__name__}: {exc}); {hint}"
        )
        raise TypeError(msg) from exc


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
        self._startup_deaths = 0
        # During a run: the selector watching the active workers, and which ones it watches.
        self._watch: tuple[selectors.BaseSelector, set[_Worker]] | None = None
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
                    self._started += 1
                    proc = ctx.Process(  # type: ignore[attr-defined]
                        target=_worker_main,
                        args=(task_r, result_w, env, lifeline),
                        name=f"amorsize-worker-{self._started}",
                        daemon=True,
                    )
                    # In the pool before it starts: a forked worker then closes its copies of
                    # the parent's ends (_after_fork_in_child), its own included (else it
                    # would hold the write end of its own task pipe and never see EOF), and a
                    # Ctrl-C during start-up still stops it.
                    worker = _Worker(proc, task_w, result_r)
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
        if self._watch is not None and worker in self._watch[1]:
            sel, watched = self._watch
            watched.discard(worker)
            sel.unregister(worker.conn)
            sel.unregister(worker.process.sentinel)
        return _stop(worker, terminate=kill, timeout=2.0)

    def _reap_stale(self) -> None:
        """Workers still running a cancelled run's task are drained if done, else stopped."""
        for w in list(self._workers):
            if not w.process.is_alive():
                self._discard(w, kill=False)
                continue
            try:
                while w.inflight and w.conn.poll():
                    w.conn.recv_bytes()
                    if not w.ready:
                        w.ready = True
                        continue
                    w.inflight.popleft()
            except (EOFError, OSError):
                self._discard(w, kill=True)
                continue
            if w.inflight:
                w.inflight.clear()
                self._discard(w, kill=True)

    def close(self) -> None:
        """Stop every worker: idle ones are asked to exit, busy ones are terminated."""
        workers, self._workers = self._workers, []
        stop = _safe_dumps((_STOP, None))
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
        tasks: Iterator[Task],
        *,
        n_jobs: int,
        max_in_flight: int,
    ) -> Iterator[tuple[Task, list[Outcome] | OkValues]]:
        """Yield each task with its outcomes in completion order (see the module docstring)."""
        if multiprocessing.current_process().daemon:
            msg = (
                "backend='processes' cannot start workers from inside a daemonic worker "
                "process (nested parallelism); use backend='threads' or 'serial' inside func"
            )
            raise RuntimeError(msg)
        if not self._lock.acquire(blocking=False):
            private = ProcessesBackend(self.start_method, crash_retries=self.crash_retries)
            try:
                yield from private.run(func, tasks, n_jobs=n_jobs, max_in_flight=max_in_flight)
            finally:
                private.close()
            return
        try:
            yield from self._run(func, tasks, n_jobs, max_in_flight)
        finally:
            self._lock.release()

    def _run(
        self,
        func: Callable[[Any], Any],
        tasks: Iterator[Task],
        n_jobs: int,
        max_in_flight: int,
    ) -> Iterator[tuple[Task, list[Outcome] | OkValues]]:
        run_id = next(self._runs)
        self._startup_deaths = 0
        # Imported here: a spawned worker imports this module and needs no machine facts.
        from amorsize.system import available_cpus

        threads = max(1, available_cpus() // n_jobs)
        func_msg = _safe_dumps((_FUNC, (_dump_func(func), threads)))
        self._reap_stale()
        depth = 2 if max_in_flight >= 2 * n_jobs else 1
        max_in_flight = max(1, max_in_flight)
        # Tasks to send before pulling new ones: crash re-runs and prefetch refusals.
        front: deque[tuple[Task, bytes | None]] = deque()
        crashes: dict[int, int] = {}
        exhausted = False
        in_flight = 0
        dumps = pickle.dumps
        sel = selectors.DefaultSelector()
        watched: set[_Worker] = set()
        self._watch = (sel, watched)
        try:
            while True:
                if len(self._workers) < n_jobs:
                    self._start_workers(n_jobs - len(self._workers), threads)
                active = self._workers[:n_jobs]
                for w in active:
                    if w not in watched:
                        # A persistent epoll/poll set: connection.wait() would build a new
                        # selector on every call, a cost paid per chunk.
                        sel.register(w.conn, selectors.EVENT_READ, (w, False))
                        sel.register(w.process.sentinel, selectors.EVENT_READ, (w, True))
                        watched.add(w)
                # ---- dispatch: fill every idle worker first, then one prefetch each
                paused = False
                broken: _Worker | None = None
                for level in range(depth):
                    if paused or broken is not None:
                        break
                    for w in active:
                        if len(w.inflight) != level or in_flight >= max_in_flight:
                            continue
                        if front:
                            task, msg = front.popleft()
                        elif exhausted:
                            paused = True
                            break
                        else:
                            nxt = cast("Task | None", next(tasks, _END))
                            if nxt is _END:
                                exhausted = True
                                paused = True
                                break
                            if nxt is None:
                                paused = True
                                break
                            task, msg = nxt, None
                        if msg is None:
                            try:
                                msg = dumps((_TASK, (task.start, task.items)), protocol=5)
                            except Exception as exc:
                                bad = self._unpicklable(task, exc, front)
                                if bad is not None:
                                    yield bad
                                continue
                        if level > 0 and len(msg) > _PREFETCH_MAX_BYTES:
                            front.appendleft((task, msg))
                            paused = True
                            break
                        try:
                            if w.run_id != run_id:
                                w.out.send_bytes(func_msg)
                                w.run_id = run_id
                            w.out.send_bytes(msg)
                        except OSError:
                            # Died before taking it: the task never ran, resend it as is.
                            front.appendleft((task, msg))
                            broken = w
                            break
                        w.inflight.append((run_id, task, len(msg)))
                        in_flight += 1
                if broken is not None:
                    # Settle the dead worker's other tasks now, then dispatch afresh.
                    for rid, pair in self._collect(broken, run_id, True, crashes, front):
                        if rid is not None:
                            in_flight -= 1
                        if pair[1] is not _NOTHING:
                            yield pair
                    continue
                if in_flight == 0:
                    if exhausted and not front:
                        return
                    if not front:
                        err = "the task iterator paused (yielded None) with no task in flight"
                        raise RuntimeError(err)
                    continue
                # ---- wait for a result or a death
                ready: dict[_Worker, bool] = {}
                for key, _ in sel.select():
                    w, is_sentinel = key.data
                    ready[w] = ready.get(w, False) or is_sentinel
                for w, dead in ready.items():
                    if w not in watched:
                        continue  # discarded while handling another worker's event
                    for rid, pair in self._collect(w, run_id, dead, crashes, front):
                        if rid is not None:
                            in_flight -= 1
                        if pair[1] is not _NOTHING:
                            yield pair
        except Exception:
            # An error from the task iterator (an observer, the user's generator) or from a
            # worker's setup: tasks still running are left to finish and are drained (or
            # stopped) by the next run, so the pool stays warm.
            raise
        except GeneratorExit:
            raise
        except BaseException:
            # KeyboardInterrupt (or a bug): stop every worker now, leave no orphan behind.
            self._watch = None
            self.close()
            raise
        finally:
            self._watch = None
            sel.close()

    def _collect(
        self,
        w: _Worker,
        run_id: int,
        dead: bool,
        crashes: dict[int, int],
        front: deque[tuple[Task, bytes | None]],
    ) -> Iterator[tuple[int | None, tuple[Task, list[Outcome] | OkValues]]]:
        """Results that ``w`` sent (all of them if it died), then its dead tasks' fate.

        Yields ``(run id or None, (task, outcomes))``; ``None`` marks crash reports that do
        not correspond to a dispatched task.
        """
        if not dead:
            if not w.inflight and w.ready:
                if w.process.is_alive():
                    return
                dead = True  # EOF on an idle worker's pipe: it is exiting
            else:
                # The selector said readable: exactly one message is read per event (a level-
                # triggered selector reports the next one); Connection.poll() would build a
                # new selector per call.
                try:
                    data = w.conn.recv_bytes()
                except (EOFError, OSError):
                    dead = True
                else:
                    if not w.ready:
                        w.ready = True
                        self._startup_deaths = 0
                    else:
                        yield from self._result(w, run_id, data, front)
                    return
        # Dead: whatever it sent before dying is still in the pipe.
        while w.inflight:
            try:
                if not w.conn.poll():
                    break
                data = w.conn.recv_bytes()
            except (EOFError, OSError):
                break
            if not w.ready:
                w.ready = True
                self._startup_deaths = 0
                continue
            yield from self._result(w, run_id, data, front)
        if not dead:
            return
        lost = list(w.inflight)
        w.inflight.clear()
        # Not kill=True: a worker whose pipe just hit EOF may need a moment to finish exiting,
        # and terminating it would replace its real exit code with SIGTERM's.
        exitcode = self._discard(w, kill=False)
        if not w.ready:
            self._startup_deaths += 1
            if self._startup_deaths >= _MAX_STARTUP_DEATHS:
                msg = (
                    f"worker processes die while starting (start method {self.start_method!r},"
                    f" exit code {exitcode}), {self._startup_deaths} in a row: see their "
                    "stderr above. Under spawn and forkserver, the main module is imported in "
                    "each worker: guard the code that starts work with "
                    "`if __name__ == '__main__':`"
                )
                raise RuntimeError(msg)
        for k, (rid, task, _) in enumerate(lost):
            if rid != run_id:
                continue
            if k > 0 or not w.ready:
                # Queued behind the running task, or the worker never got up: the task never
                # started, so its items are not suspects.
                front.append((task, None))
                yield run_id, (task, _NOTHING)
                continue
            for i, item in enumerate(task.items):
                index = task.start + i
                count = crashes.get(index, 0) + 1
                crashes[index] = count
                if count > self.crash_retries:
                    err = WorkerCrashedError(exitcode, count)
                    yield None, (Task(index, [item]), [Outcome(False, err, count)])
                else:
                    front.append((Task(index, [item]), None))
            yield run_id, (task, _NOTHING)

    def _result(
        self, w: _Worker, run_id: int, data: bytes, front: deque[tuple[Task, bytes | None]]
    ) -> Iterator[tuple[int | None, tuple[Task, list[Outcome] | OkValues]]]:
        """Decode one message from ``w``: the outcome of its oldest task in flight."""
        rid, task, _ = w.inflight.popleft()
        if rid != run_id:
            return  # a cancelled run's task: its result is not wanted
        try:
            kind, payload = pickle.loads(data)
        except Exception as exc:
            # A result or exception that pickled in the worker but does not load here: it
            # fails alone. Only this path pays for finding it.
            outcomes = reload_outcomes(data, task, exc, _WHERE, _entries)
            yield run_id, (task, outcomes)
            return
        if kind == _OK:
            yield run_id, (task, OkValues(payload))
        elif kind == _MIXED:
            yield run_id, (task, payload)
        elif kind == _NOLOAD:
            yield run_id, self._unloadable_items(task, payload, front)
        else:
            self._discard(w, kill=True)
            name, text, tb = payload
            msg = (
                f"the function could not be loaded in a worker process (start method "
                f"{self.start_method!r}): {name}: {text}. Under spawn and forkserver the "
                f"function's module must be importable by the workers; cloudpickle sends "
                f"lambdas, closures and __main__ functions by value"
            )
            raise RuntimeError(msg) from RemoteTraceback(tb)

    def _unloadable_items(
        self, task: Task, error: tuple[str, str, str], front: deque[tuple[Task, bytes | None]]
    ) -> tuple[Task, list[Outcome] | OkValues]:
        """A task whose items the worker could not unpickle: none of them ran. Re-sent one
        item per task (at the front, in order) to find the culprit, which then fails alone."""
        if len(task.items) > 1:
            for i in reversed(range(len(task.items))):
                front.appendleft((Task(task.start + i, [task.items[i]]), None))
            return task, _NOTHING
        name, text, tb = error
        msg = (
            f"item {task.start} cannot be unpickled in the worker process ({name}: {text}); "
            f"its class must load there (importable under start method "
            f"{self.start_method!r}, or defined where cloudpickle sends it by value), or use "
            f"backend='threads'"
        )
        err = pickle.UnpicklingError(msg)
        err.__cause__ = RemoteTraceback(tb)
        return task, [Outcome(False, err, 0)]

    def _unpicklable(
        self, task: Task, exc: Exception, front: deque[tuple[Task, bytes | None]]
    ) -> tuple[Task, list[Outcome]] | None:
        """Split a chunk that cannot be pickled; a single bad item becomes its failure."""
        if len(task.items) > 1:
            for i in reversed(range(len(task.items))):
                front.appendleft((Task(task.start + i, [task.items[i]]), None))
            return None
        msg = (
            f"this item cannot be pickled to send it to a worker process "
            f"({type(exc).__name__}: {exc}); use backend='threads' for unpicklable items"
        )
        err = pickle.PicklingError(msg)
        err.__cause__ = exc
        return task, [Outcome(False, err, 0)]


def _entries(message: Any) -> list[tuple[Any, Outcome]]:
    """A reloaded message's items for ``reload_outcomes``: (what to check, its outcome)."""
    kind, payload = message
    if kind == _OK:
        return [(v, Outcome(True, v)) for v in payload]
    if kind == _MIXED:
        return [(o, o) for o in payload]
    return []


# A dead worker's task that is not reported itself (its items are re-queued or failed):
# ``_run`` only counts it out of flight and skips yielding it. A bare marker, never a value
# a task could have (an empty ``OkValues`` would be a valid outcome of an empty task).
_NOTHING: Any = object()
_END: Any = object()
_ENV_LOCK = threading.Lock()
_LIVE: Any = __import__("weakref").WeakSet()


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
