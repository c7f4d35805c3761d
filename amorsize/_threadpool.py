"""A thread pool that starts its threads cheaply: what the threads backend runs tasks on.

``system`` measures its costs (thread start-up, the parent's time per task) exactly as the
threads backend pays them, so it sits below both.
"""

from __future__ import annotations

import _thread
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["Batch", "Pool"]


class Pool:
    """Up to ``n`` threads running jobs from one queue: the part of ``ThreadPoolExecutor``
    the backend uses (``submit``, ``shutdown``), with a cheaper start.

    A job that finds no idle thread starts one (while fewer than ``n`` run), without
    waiting for it to run: ``Thread.start()`` waits for each new thread to take the GIL,
    two context switches per thread, and on a busy machine a cold pool of 200 threads
    took ~50 ms that way. Threads are started with ``_thread`` (like daemon threads: not
    joined at exit; the threads backend shuts its pools at exit) and take the GIL as they can.
    """

    def __init__(self, n: int, initializer: Callable[[], None] | None = None) -> None:
        self.n = n
        self.initializer = initializer  # run first in each new thread
        # A job is ``(run, a, b)``: a thread calls ``run(a, b)``, a cancelled one is
        # ``run(a, b, True)`` (it only reports that it will never run).
        self.jobs: queue.SimpleQueue[tuple[Callable[..., None], Any, Any] | None]
        self.jobs = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads = 0  # started
        self.idle = 0  # waiting for a job and not yet promised one
        self.closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on a thread of the pool; its outcome arrives in the future."""
        fut: Future[Any] = Future()
        self._dispatch((_run_future, fut, (fn, args)))
        return fut

    def map_batch(self, call: Callable[[Any], Any], items: list[Any]) -> Batch:
        """Run ``call`` on each item, one job each, without a future per item."""
        batch = Batch(call, items)
        for k in range(len(items)):
            try:
                self._dispatch((batch.run_one, k, None))
            except BaseException:
                batch.cancel()  # those queued already skip their item
                batch.abandon(len(items) - k)
                raise
        return batch

    def _dispatch(self, job: tuple[Callable[..., None], Any, Any]) -> None:
        with self.lock:
            if self.closed:
                msg = "cannot schedule new futures after shutdown"
                raise RuntimeError(msg)
            start = not self.idle and self.threads < self.n
            if start:
                self.threads += 1
            elif self.idle:
                self.idle -= 1
        if start:
            try:
                _thread.start_new_thread(self._work, ())
            except BaseException:  # no thread can start (a resource limit): nothing queued
                with self.lock:
                    self.threads -= 1
                raise
        self.jobs.put(job)

    def _work(self) -> None:
        if self.initializer is not None:
            self.initializer()
        get, lock = self.jobs.get, self.lock
        while (job := get()) is not None:
            run, a, b = job
            del job
            run(a, b)
            del run, a, b
            with lock:
                self.idle += 1

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        """No new jobs; threads end once the queue is empty (``cancel_futures``: emptied
        now). ``wait`` is accepted for ``ThreadPoolExecutor``'s signature: threads are
        never waited for."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            threads = self.threads
        if cancel_futures:
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0](job[1], job[2], True)
        for _ in range(threads):
            self.jobs.put(None)


def _run_future(
    fut: Future[Any], call: tuple[Callable[..., Any], tuple[Any, ...]], cancel: bool = False
) -> None:
    if cancel:
        fut.cancel()
        return
    if not fut.set_running_or_notify_cancel():
        return
    fn, args = call
    try:
        result = fn(*args)
    except BaseException as exc:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class Batch:
    """``call`` on each item on a pool's threads: each result lands in its slot, and one
    event tells that all are done. (With a future each, ~200 items finishing at once
    cost their threads a lock, a condition and a callback apiece, all under the GIL.)"""

    def __init__(self, call: Callable[[Any], Any], items: list[Any]) -> None:
        self.call, self.items = call, items
        self.slots: list[Any] = [None] * len(items)
        self.left = len(items)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.cancelled = False
        self.error: BaseException | None = None
        if not items:
            self.done.set()

    def run_one(self, k: int, _: Any = None, cancel: bool = False) -> None:
        """Item ``k`` (a pool thread), or only its count when cancelled."""
        try:
            if not (cancel or self.cancelled):
                self.slots[k] = self.call(self.items[k])
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: the waiter raises it
            self.error = self.error or exc
        finally:
            self.abandon(1)

    def abandon(self, count: int) -> None:
        """``count`` items are over (run, or never to run)."""
        with self.lock:
            self.left -= count
            last = self.left <= 0
        if last:
            self.done.set()

    def results(self) -> list[Any]:
        """Every item's result, in item order, once all ran."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.slots

    def cancel(self) -> None:
        """Items not started yet will not run."""
        self.cancelled = True
