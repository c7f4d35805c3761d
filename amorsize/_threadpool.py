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

__all__ = ["Pool"]


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
        self.jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self.jobs = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads = 0  # started
        self.idle = 0  # waiting for a job and not yet promised one
        self.closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on a thread of the pool; its outcome arrives in the future."""
        fut: Future[Any] = Future()
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
        self.jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        if self.initializer is not None:
            self.initializer()
        get, lock = self.jobs.get, self.lock
        while (job := get()) is not None:
            fut, fn, args = job
            del job
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
                    del result
            del fut, fn, args
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
                    job[0].cancel()
        for _ in range(threads):
            self.jobs.put(None)
