"""Dask backend: run chunks on a ``dask.distributed`` cluster (its cost model: ``_dask_plan``).

Data flow (the client process runs ``execute``; the scheduler only routes small messages)::

    client process                              scheduler                  worker (any)
    --------------                              ---------                  ------------
    func ─ cloudpickle once per run ─▶ a task holding the bytes ─────────▶ fetched once per
                                       (recomputed if its worker dies)     worker, loaded once
    Task(start, items) ─ pickle ─▶ submit(_run_remote, token, func, blob, start)
        blob < 1 MB: inside the task message ─▶ routes it ───────────────▶ run_chunk_fast
        blob ≥ 1 MB: scatter(blob) straight to a worker; the task follows it
    (Task, outcomes) ◀─ as_completed(with_results) ◀───── pickled result (bytes) ◀─┘

* At most ``max_in_flight`` chunks are submitted at once (``as_completed`` + refill), so an
  infinite task iterator is consumed only as fast as the cluster works through it.
* Every chunk gets a unique key: identical chunks are never merged by dask.
* The worker pickles each chunk's results itself, so an unpicklable result fails only its
  item, and each failure keeps its remote traceback as ``__cause__``.
* A worker that dies: dask reruns its tasks elsewhere (``distributed.scheduler.allowed-
  failures`` times). A chunk that still fails with ``KilledWorker`` (the culprit, or a
  neighbour that shared its dying workers) becomes a suspect: it is rerun in 8 pieces, each
  alone on the cluster, so innocent pieces succeed and the guilty one is split again. An
  item that kills its workers alone is reported as a ``WorkerCrashedError`` outcome (its
  ``__cause__`` is dask's ``KilledWorker``). Nothing is lost; an item whose worker died may
  have run more than once (dask's execution is at-least-once when workers die).
"""

# distributed's public API is only partly annotated.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import pickle
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import cloudpickle  # a dependency of dask itself
import distributed

from amorsize import _dask_plan
from amorsize._dask_plan import ClusterCosts, DaskPlan, measure_costs
from amorsize.backends._wire import (
    NOLOAD,
    ErrorText,
    Refused,
    TaskFeed,
    dump_func,
    load_results,
    not_loaded,
    not_sent,
    pack_error,
    pack_results,
    run_and_pack,
    singles,
)
from amorsize.backends.base import (
    Backend,
    OkValues,
    Outcome,
    Pause,
    RemoteTraceback,
    Task,
    WorkerCrashedError,
    failure_outcome,
)

__all__ = [
    "CRASH_RETRIES",
    "ClusterCosts",
    "DaskBackend",
    "DaskPlan",
    "DaskRunReport",
    "current_client",
    "measure_costs",
    "plan",
]

log = logging.getLogger(__name__)

#: Times a single item may come back as ``KilledWorker`` and be resubmitted before it is
#: reported as ``WorkerCrashedError``. Suspects run alone on the cluster, so a single item
#: that still comes back as ``KilledWorker`` has itself killed ``allowed-failures + 1``
#: workers: no rerun by default.
CRASH_RETRIES = 0
# A chunk that came back as ``KilledWorker`` is rerun in this many pieces, one at a time: the
# culprit is found in log_8(chunksize) rounds, each costing ``allowed-failures + 1`` deaths.
_SPLIT = 8

# Chunks whose pickled items are larger than this are scattered straight to a worker instead
# of riding in the task message through the scheduler (dask warns about task messages of
# 10 MB and more; the scheduler is a single process that every message passes through).
SCATTER_BYTES = 1 << 20

_PROTOCOL = 5


# --------------------------------------------------------------------------- clients


def current_client() -> distributed.Client | None:
    """The running ``distributed.Client`` of this process (or task), or ``None``.

    ``execute(backend="auto")`` considers dask only when this returns a client or one is
    passed as ``client=``.

    Inside a dask task it returns ``None``: ``func`` running on a worker uses the local
    backends rather than submitting to the cluster it runs on.

    >>> current_client() is None or hasattr(current_client(), "submit")
    True
    """
    try:
        distributed.get_worker()
    except ValueError:
        pass  # not inside a dask task
    else:
        return None
    try:
        client = distributed.Client.current(allow_global=True)
    except ValueError:
        return None
    return client if client.status == "running" else None


_EMBEDDED: dict[str, Any] = {}
_EMBEDDED_LOCK = threading.Lock()


def _embedded_client() -> distributed.Client:
    """A LocalCluster started on first use and shared by this process (the default to try).

    One worker process per available core, one thread each (Python code holds the GIL), its
    HTTP server on a free port (never a collision with another cluster). It is not made the
    default dask client, so it never changes what the user's own dask code does; dask closes
    it at interpreter exit.
    """
    with _EMBEDDED_LOCK:
        client = _EMBEDDED.get("client")
        if client is not None and client.status == "running":
            return cast(distributed.Client, client)
        from amorsize.system import available_cpus

        cluster = distributed.LocalCluster(
            n_workers=available_cpus(),
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
        )
        client = distributed.Client(cluster, set_as_default=False)
        _EMBEDDED.update(client=client, cluster=cluster)
        return client


def _close_embedded() -> None:
    with _EMBEDDED_LOCK:
        client = _EMBEDDED.pop("client", None)
        cluster = _EMBEDDED.pop("cluster", None)
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


def _resolve(client: distributed.Client | None) -> distributed.Client:
    if client is not None:
        return client
    current = current_client()
    return current if current is not None else _embedded_client()


# --------------------------------------------------------------------------- worker side

# Loaded functions by run token: a worker unpickles each run's function once, not per task.
_FUNCS: OrderedDict[str, Callable[[Any], Any]] = OrderedDict()
_FUNCS_LOCK = threading.Lock()
_FUNCS_KEPT = 8

_WHERE = "the dask worker"


def _dumps(obj: Any) -> bytes:
    """Plain pickle (fast for data), else cloudpickle: classes and functions that exist only
    by value on this side (a lambda, a class from a cloudpickled module) travel too."""
    try:
        return pickle.dumps(obj, protocol=_PROTOCOL)
    except Exception:
        return cast(bytes, cloudpickle.dumps(obj, protocol=_PROTOCOL))


def _load_func(token: str, blob: bytes) -> Callable[[Any], Any]:
    with _FUNCS_LOCK:
        func = _FUNCS.get(token)
        if func is not None:
            _FUNCS.move_to_end(token)
            return func
    func = cast("Callable[[Any], Any]", pickle.loads(blob))
    with _FUNCS_LOCK:
        _FUNCS[token] = func
        while len(_FUNCS) > _FUNCS_KEPT:
            _FUNCS.popitem(last=False)
    return func


def _run_remote(token: str, func_blob: bytes, items_blob: bytes, start: int) -> bytes:
    """The dask task: load the run's function (once per worker), run the chunk, pickle it."""
    try:
        items = cast("list[Any]", pickle.loads(items_blob))
    except Exception as exc:
        # None of the items ran: the client re-sends them one per task to find the culprit.
        return pack_error(NOLOAD, exc, _dumps)
    try:
        func = _load_func(token, func_blob)
    except Exception as exc:
        msg = (
            f"the function could not be loaded on the dask worker ({type(exc).__name__}: "
            f"{exc}); its module and amorsize must be installed in the workers' environment "
            "(cloudpickle sends lambdas, closures and __main__ functions by value)"
        )
        err = RuntimeError(msg)
        err.__cause__ = exc
        return pack_results([failure_outcome(err)] * len(items), start, _WHERE, _dumps)
    return run_and_pack(func, start, items, _WHERE, _dumps)


def _noop(x: Any) -> Any:
    return x


# --------------------------------------------------------------------------- backend


@dataclass
class DaskRunReport:
    """What happened during the last ``DaskBackend.run``: what the cluster did to the work.

    ``workers_lost`` counts workers present at the start and gone at the end (dead or
    restarted); ``killed_chunks`` the chunks dask gave up on with ``KilledWorker`` (each is
    then split and rerun); ``crashed_items`` the items finally reported as
    ``WorkerCrashedError``.

    >>> str(DaskRunReport(chunks=2, items=10))
    'dask: 10 items in 2 tasks, 0.000 s'
    """

    chunks: int = 0
    items: int = 0
    scattered_chunks: int = 0
    killed_chunks: int = 0
    resubmitted: int = 0
    crashed_items: int = 0
    workers_lost: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        text = f"dask: {self.items} items in {self.chunks} tasks, {self.seconds:.3f} s"
        if self.workers_lost or self.killed_chunks or self.crashed_items:
            text += (
                f"; {self.workers_lost} worker(s) lost, {self.killed_chunks} task(s) failed "
                f"with KilledWorker and were rerun in pieces, {self.crashed_items} item(s) "
                "reported as WorkerCrashedError"
            )
        return text


class _Part:
    """A chunk to run: its task, how often it came back as ``KilledWorker`` and whether it is
    a suspect (rerun after its worker died: it might be what kills workers)."""

    __slots__ = ("crashes", "scattered", "suspect", "task")

    def __init__(self, task: Task, crashes: int = 0, *, suspect: bool = False) -> None:
        self.task = task
        self.crashes = crashes
        self.suspect = suspect
        self.scattered = False


class DaskBackend(Backend):
    """Run tasks on a Dask cluster: ``client`` if given, else the current client, else a
    LocalCluster started on first use (one process per core; the embedded default to try it).

    The cluster's size is the scheduler's business: ``n_jobs`` does not resize it, and
    ``max_in_flight`` bounds the chunks submitted at once. ``last_run`` reports what
    happened (workers lost, chunks rerun).

    >>> from distributed import Client, LocalCluster
    >>> from amorsize.backends.base import Task
    >>> with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, \\
    ...         Client(cluster) as client:
    ...     backend = DaskBackend(client)
    ...     sorted(v for _, out in backend.run(abs, iter([Task(0, [-1]), Task(1, [-2])]),
    ...                                        n_jobs=1, max_in_flight=4) for v in out)
    [1, 2]
    """

    name: ClassVar[str] = "dask"
    supports_pause: ClassVar[bool] = True

    def __init__(
        self, client: distributed.Client | None = None, *, crash_retries: int = CRASH_RETRIES
    ) -> None:
        if not (isinstance(crash_retries, int) and crash_retries >= 0):
            msg = f"crash_retries must be an int >= 0; got {crash_retries!r}"
            raise ValueError(msg)
        self._client = client
        self.crash_retries = crash_retries
        self.last_run = DaskRunReport()

    @property
    def client(self) -> distributed.Client:
        """The client this backend submits to (resolved, and a LocalCluster started, lazily)."""
        return _resolve(self._client)

    def warm_workers(self) -> int:
        """Worker threads already running on the cluster (no start-up to pay for them)."""
        client = self._client if self._client is not None else current_client()
        if client is None:
            client = _EMBEDDED.get("client")
        if client is None or client.status != "running":
            return 0
        return sum(client.nthreads().values())

    def close(self) -> None:
        """Shut the embedded LocalCluster down if this process started one.

        A client passed in or found current belongs to the user and is left running.
        """
        if self._client is None:
            _close_embedded()

    def run(
        self,
        func: Callable[[Any], Any],
        tasks: Iterator[Task | Pause],
        *,
        n_jobs: int,
        max_in_flight: int,
    ) -> Iterator[tuple[Task, list[Outcome] | OkValues]]:
        """Yield each task (or, after ``KilledWorker``, its pieces) with its outcomes, in
        completion order. Closing the generator cancels the pending tasks."""
        report = self.last_run = DaskRunReport()
        yield from _DaskRun(self, report, func, tasks, max_in_flight).results()


_Report = tuple[Task, list[Outcome] | OkValues]


class _DaskRun:
    """One ``DaskBackend.run``: its state, and the named steps of its loop (``results``)::

        ┌▶ _submit_ready  while fewer than max_in_flight are pending: _next_part (the
        │                 front first, a suspect alone, then TaskFeed.pull) and _submit
        └─ _receive       the next finished future: load_results, or _failed (the task
                          failed on the cluster: KilledWorker ─▶ pieces to the front)
        ... until nothing is pending or queued: TaskFeed.finish; then _finish (cancel,
        release the function, complete the report)

    ``inflight`` maps each pending future to its part; ``front`` holds the parts to submit
    before new tasks (popped from its end); ``suspects`` counts suspects pending (0 or 1).
    """

    def __init__(
        self,
        backend: DaskBackend,
        report: DaskRunReport,
        func: Callable[[Any], Any],
        tasks: Iterator[Task | Pause],
        max_in_flight: int,
    ) -> None:
        self.crash_retries = backend.crash_retries
        self.report = report
        self.started = time.perf_counter()
        self.client = client = backend.client
        self.workers_before = set(client.scheduler_info()["workers"])
        self.token = f"{_func_name(func)}-{uuid.uuid4().hex}"
        self.seq = itertools.count()
        self.func_blob = dump_func(func, "dask workers")
        self.func_future = _place_func(client, self.token, self.func_blob)
        self.limit = max(1, max_in_flight)
        self.inflight: dict[distributed.Future[bytes], _Part] = {}
        self.front: list[_Part] = []
        self.done = distributed.as_completed(
            loop=client.loop, with_results=True, raise_errors=False
        )
        self.feed = TaskFeed(tasks)
        self.suspects = 0

    def results(self) -> Iterator[_Report]:
        """The loop: submit while there is room, then receive the next finished task."""
        try:
            while True:
                yield from self._submit_ready()
                if not self.inflight:
                    if self.front:
                        continue
                    self.feed.finish()
                    return
                answered = self._receive(*next(self.done))
                if answered is not None:
                    yield answered
        finally:
            self._finish()

    def _submit_ready(self) -> Iterator[_Report]:
        """Submit parts while fewer than ``limit`` are pending; yields the tasks answered
        without the cluster (an empty task, an item that does not pickle)."""
        while len(self.inflight) < self.limit and (part := self._next_part()) is not None:
            answered = self._submit(part)
            if answered is not None:
                yield answered

    def _next_part(self) -> _Part | None:
        """The part to submit next, or ``None`` to wait for a completion first."""
        if self.front:
            # Isolation: a suspect runs alone, so an item that kills its worker takes no
            # innocent task down with it.
            if self.inflight and (self.front[-1].suspect or self.suspects):
                return None
            return self.front.pop()
        if self.suspects:
            return None
        task = self.feed.pull()
        if task is None:
            return None
        self.report.items += len(task.items)
        return _Part(task)

    def _submit(self, part: _Part) -> _Report | None:
        """Send ``part`` to the cluster; what answers it at once if it cannot go."""
        task = part.task
        if not task.items:
            return task, OkValues()
        try:
            blob = _dumps(task.items)
        except Exception as exc:
            return self._not_sent(task, exc)
        if self.func_future.status in _GONE:  # its data was lost with a worker: place it again
            self.func_future = _place_func(self.client, self.token, self.func_blob)
        payload: Any = blob
        if len(blob) >= SCATTER_BYTES:
            payload = self.client.scatter(blob, hash=False)
            part.scattered = True
            self.report.scattered_chunks += 1
        fut = self.client.submit(
            _run_remote,
            self.token,
            self.func_future,
            payload,
            task.start,
            key=f"amorsize-{self.token}-{next(self.seq)}",
            pure=False,
        )
        self.inflight[fut] = part
        self.done.add(fut)
        self.report.chunks += 1
        self.suspects += part.suspect
        return None

    def _receive(self, fut: distributed.Future[bytes], result: Any) -> _Report | None:
        """A finished future: its task's outcomes, or what its failure on the cluster means
        (``None``: its items were queued again)."""
        part = self.inflight.pop(fut)
        self.suspects -= part.suspect
        fut.release()  # drop the result on the cluster now (never recomputed)
        # Judge by the result, not fut.status: the worker holding a result already fetched
        # may die a moment later, turning the status to "lost".
        if type(result) is not bytes:
            return self._failed(part, result)
        got = load_results(result, part.task, _WHERE)
        if isinstance(got, Refused):
            return self._not_loaded(part.task, got.error)
        return part.task, got

    def _finish(self) -> None:
        """Cancel what is still pending, release the function, complete the report."""
        # Best effort: a client already closed (interpreter exit, Ctrl-C) must not hide the
        # exception that stopped the run.
        with contextlib.suppress(Exception):
            if self.inflight:
                self.client.cancel(list(self.inflight))
                self.inflight.clear()
            self.done.clear()
            self.func_future.release()
        report = self.report
        report.seconds = time.perf_counter() - self.started
        with contextlib.suppress(Exception):
            now = set(self.client.scheduler_info()["workers"])
            report.workers_lost = len(self.workers_before - now)
        if report.workers_lost or report.killed_chunks:
            log.warning("%s", report)

    def _failed(self, part: _Part, result: Any) -> _Report | None:
        """A task that dask reports as failed (not an item's exception: those are outcomes)."""
        task = part.task
        if isinstance(result, tuple) and len(result) == 3:
            exc = result[1]
        elif isinstance(result, BaseException):
            exc = result  # cancelled (e.g. client.restart())
        else:
            exc = RuntimeError(f"dask reported task failure without an exception: {result!r}")
        # Worth rerunning from the items the client still holds: the worker died, the task
        # was cancelled by someone else (client.restart()), or a scattered input was lost.
        killed = isinstance(exc, distributed.scheduler.KilledWorker)
        rerun = (
            killed or part.scattered or isinstance(exc, (CancelledError, asyncio.CancelledError))
        )
        report, front = self.report, self.front
        if rerun:
            report.killed_chunks += killed
            if len(task.items) > 1:
                # Rerun in pieces, each alone on the cluster: innocent pieces succeed, the
                # piece that kills its worker again is split again, down to the item.
                size = math.ceil(len(task.items) / _SPLIT)
                for i in reversed(range(0, len(task.items), size)):
                    piece = Task(task.start + i, task.items[i : i + size])
                    front.append(_Part(piece, part.crashes, suspect=True))
                report.resubmitted += len(task.items)
                return None
            if part.crashes < self.crash_retries:
                front.append(_Part(task, part.crashes + 1, suspect=True))
                report.resubmitted += 1
                return None
        if killed:
            report.crashed_items += 1
            allowed = getattr(exc, "allowed_failures", 0)
            attempts = (part.crashes + 1) * (allowed + 1)
            err = WorkerCrashedError(None, attempts)
            err.__cause__ = exc
            return task, [Outcome(False, err, attempts)]
        # Any other task-level error (the worker ran out of memory, a dask error...): every
        # item of the task failed with it.
        tb = result[2] if isinstance(result, tuple) and len(result) == 3 else None
        if tb is not None:
            exc.__cause__ = RemoteTraceback("".join(traceback.format_tb(tb)))
        return task, [Outcome(False, exc, 1) for _ in task.items]

    def _not_loaded(self, task: Task, error: ErrorText) -> _Report | None:
        """A chunk whose items the worker could not unpickle (none ran): re-sent one item per
        task to find the culprit, which then fails alone."""
        if len(task.items) > 1:
            self.front.extend(reversed([_Part(t) for t in singles(task)]))
            return None
        fix = "the modules that define its class must be installed on the workers"
        return task, not_loaded(task, error, "on the dask worker", fix)

    def _not_sent(self, task: Task, exc: Exception) -> _Report | None:
        """A chunk that cannot be pickled: re-sent one item per task; a single item that
        cannot be pickled becomes its failure."""
        if len(task.items) > 1:
            self.front.extend(reversed([_Part(t) for t in singles(task)]))
            return None
        return task, not_sent(task, exc, "a dask worker")


# --------------------------------------------------------------------------- planning


def plan(profile: Any, n_items: int | None, client: distributed.Client | None = None) -> DaskPlan:
    """The dask backend's planning hook (``BackendSpec.plan``): size the work for the
    cluster behind ``client`` (else the current one, else the embedded LocalCluster) from the
    sampled ``profile``; the cost model is ``amorsize._dask_plan.plan``.

    >>> from amorsize.sampling import sample
    >>> from distributed import Client, LocalCluster
    >>> with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, \\
    ...         Client(cluster) as client:
    ...     p = plan(sample(abs, range(-5000, 5000)).profile, 10_000, client)
    >>> p.chunksize > 100
    True
    """
    return _dask_plan.plan(profile, n_items, _resolve(client))


# Future states after which a future's data is no longer on the cluster.
_GONE = frozenset({"lost", "cancelled", "error"})


def _place_func(client: distributed.Client, token: str, blob: bytes) -> distributed.Future[bytes]:
    """Put the run's pickled function on the cluster once, for every task to depend on.

    A small function becomes the result of a task that holds it: if the worker keeping it
    dies, dask recomputes it from the task (scattered data would be lost for good). A large
    one is scattered to every worker, so that the scheduler never carries it.
    """
    if len(blob) < SCATTER_BYTES:
        return cast(
            "distributed.Future[bytes]",
            client.submit(_noop, blob, key=f"amorsize-func-{token}", pure=False),
        )
    return cast("distributed.Future[bytes]", client.scatter(blob, broadcast=True, hash=False))


def _func_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", type(func).__name__)
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)[:40] or "func"
