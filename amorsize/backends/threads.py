"""Threads backend: a warm thread pool per worker count, with bounded in-flight tasks.

Threads share the interpreter: nothing is pickled, exceptions keep their own traceback, and
the GIL means this helps only when ``func`` waits (I/O, sleeps) or releases the GIL.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from threading import get_native_id
from time import monotonic
from typing import Any, ClassVar

from amorsize._threadpool import Pool
from amorsize._timeline import stamp
from amorsize.backends._wire import TaskFeed
from amorsize.backends.base import Backend, OkValues, Outcome, Pause, Task, run_chunk_fast

# Pools of different sizes kept warm at once; the least recently used beyond this is shut.
_MAX_WARM_POOLS = 4


def _run_local(func: Callable[[Any], Any], task: Task) -> list[Outcome] | OkValues:
    t0 = monotonic()
    out = run_chunk_fast(func, task.items, remote=False)
    stamp(task, t0, monotonic(), get_native_id())  # the run's timeline (two clock reads)
    return out


class ThreadsBackend(Backend):
    """Run tasks on a pool of ``n_jobs`` threads kept across calls.

    At most ``min(max_in_flight, 2 * n_jobs)`` tasks are submitted at once, so an infinite
    task iterator is consumed only as fast as the threads work through it.

    >>> from amorsize.backends.base import Task
    >>> b = ThreadsBackend()
    >>> sorted(t.start for t, _ in b.run(abs, iter([Task(0, [-1]), Task(1, [-2])]),
    ...                                  n_jobs=2, max_in_flight=4))
    [0, 1]
    >>> b.close()
    """

    name: ClassVar[str] = "threads"
    supports_pause: ClassVar[bool] = True

    def __init__(self) -> None:
        # Warm pools by size, least recently used first; ``_users`` counts the runs using
        # each pool (warm or retired). A pool is shut down only once nobody uses it: an
        # evicted or closed pool still in use is shut by its last user (``_release``).
        self._pools: OrderedDict[int, Pool] = OrderedDict()
        self._users: dict[Pool, int] = {}
        self._lock = threading.Lock()

    def _acquire(self, n_jobs: int, nested: bool | None = None) -> Pool:
        """The warm pool of ``n_jobs`` threads, counted as used until ``_release``;
        ``nested``: for a run started from one of our threads (None: this thread's)."""
        if nested is None:
            nested = getattr(_IN_POOL, "inside", False)
        if nested:
            # Nested run from one of our own threads: waiting on a shared pool whose
            # threads all wait on us would deadlock, so it gets a private pool.
            pool = _new_pool(n_jobs)
            with self._lock:
                self._users[pool] = 1
            return pool
        idle: list[Pool] = []
        with self._lock:
            warm = self._pools.pop(n_jobs, None)
            pool = _new_pool(n_jobs) if warm is None else warm
            self._pools[n_jobs] = pool
            self._users[pool] = self._users.get(pool, 0) + 1
            while len(self._pools) > _MAX_WARM_POOLS:
                _, old = self._pools.popitem(last=False)
                if not self._users.get(old):
                    idle.append(old)
        for old in idle:
            old.shutdown(wait=False)
        return pool

    def _release(self, pool: Pool) -> None:
        """One run is done with ``pool``; shut it if it is no longer warm and now unused."""
        with self._lock:
            left = self._users[pool] - 1
            if left:
                self._users[pool] = left
                return
            del self._users[pool]
            if pool in self._pools.values():
                return  # warm: kept for the next run
        pool.shutdown(wait=False)

    def warm_workers(self) -> int:
        """The size of the largest warm thread pool (threads start in microseconds anyway)."""
        with self._lock:
            return max(self._pools, default=0)

    def run(
        self,
        func: Callable[[Any], Any],
        tasks: Iterator[Task | Pause],
        *,
        n_jobs: int,
        max_in_flight: int,
    ) -> Iterator[tuple[Task, list[Outcome] | OkValues]]:
        """Yield each task with its outcomes in completion order."""
        pool = self._acquire(n_jobs)
        limit = max(1, min(max_in_flight, 2 * n_jobs))
        pending: dict[Future[list[Outcome] | OkValues], Task] = {}
        # Finished futures arrive here from their threads: waiting on one queue costs the
        # same with 2 or 200 tasks in flight (``concurrent.futures.wait`` hooks a waiter
        # onto every pending future on every call: ~50 us a task with 200 in flight).
        finished: queue.SimpleQueue[Future[list[Outcome] | OkValues]] = queue.SimpleQueue()
        feed = TaskFeed(tasks)
        try:
            while True:
                while len(pending) < limit and (task := feed.pull()) is not None:
                    fut = pool.submit(_run_local, func, task)
                    pending[fut] = task
                    fut.add_done_callback(finished.put)
                if not pending:
                    feed.finish()
                    return
                fut = finished.get()
                yield pending.pop(fut), fut.result()
        finally:
            for fut in pending:
                fut.cancel()
            self._release(pool)

    def spill_runner(self) -> Callable[[Callable[[Any], Any], list[Any]], Callable[[bool], list[Any]]]:
        """``start_map`` for a sample taken in this thread (``sampling.SpillRunner``): it is
        called from another thread, which must not decide whether the run is nested."""
        return functools.partial(self.start_map, nested=getattr(_IN_POOL, "inside", False))

    def start_map(
        self, call: Callable[[Any], Any], items: list[Any], *, nested: bool | None = None
    ) -> Callable[[bool], list[Any]]:
        """Start ``call`` on every item now, one thread each (the warm pool of that size),
        and return what waits for the results, in item order; ``call`` must not raise.
        Called with ``True`` it cancels the items not started and returns ``[]`` at once.
        ``nested`` as in ``_acquire``.

        >>> b = ThreadsBackend()
        >>> b.start_map(abs, [-1, -2])(False)
        [1, 2]
        >>> b.close()
        """
        pool = self._acquire(len(items), nested)
        try:
            batch = pool.map_batch(call, items)
        except BaseException:
            self._release(pool)
            raise

        def collect(cancel: bool) -> list[Any]:
            try:
                if cancel:
                    batch.cancel()
                    return []
                return batch.results()
            finally:
                self._release(pool)

        return collect

    def close(self) -> None:
        """Forget every warm pool: idle ones shut now, those in use when their run ends.

        A run's own queued tasks are cancelled when its ``run`` generator closes; another
        caller's run on the same pool is never broken by it.
        """
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
            idle = [p for p in pools if not self._users.get(p)]
        for pool in idle:
            pool.shutdown(wait=False, cancel_futures=True)


# Set in every thread of an amorsize pool: a run started from one gets a private pool.
_IN_POOL = threading.local()


def _mark_pool_thread() -> None:
    _IN_POOL.inside = True


def _new_pool(n_jobs: int) -> Pool:
    return Pool(n_jobs, initializer=_mark_pool_thread)

