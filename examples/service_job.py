"""A batch job against a throttling, flaky service, every worker of the run sharing its limits.

Run it with ``python examples/service_job.py`` (about two seconds).

The "service" is a local function, so the example needs no network: it answers some first
calls with a 429 carrying ``Retry-After``, and one item hangs. The run

* sleeps what the server asks (``wait_from=retry_after``) instead of the backoff,
* stops retrying when retries pass a fifth of the calls (``RetryBudget``),
* starts at most 200 calls a second across all workers (``RateLimiter``),
* fails the hanging item after 0.5 s (``timeout=``) and keeps going,

and a second run replaces each worker process after 10 items (``max_tasks_per_worker``).
"""

from __future__ import annotations

import os
import threading
import time

from amorsize import (
    ItemFailure,
    RateLimiter,
    RetryBudget,
    RetryPolicy,
    execute,
    retry_after,
)

_lock = threading.Lock()
_calls: dict[int, int] = {}  # item -> calls the "server" saw


class Throttled(Exception):
    """A 429: the server says when to come back, as ``exc.retry_after`` (seconds)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"429 Too Many Requests, retry after {seconds} s")
        self.retry_after = seconds


def call_service(item: int) -> int:
    """Throttles the first call of every 7th item; item 13 hangs."""
    with _lock:
        _calls[item] = _calls.get(item, 0) + 1
        first = _calls[item] == 1
    if item == 13:
        time.sleep(5.0)  # stands for a request that never answers
    if item % 7 == 0 and first:
        raise Throttled(0.05)
    return item * 2


def worker_pid(item: int) -> int:
    return os.getpid()


def main() -> None:
    policy = RetryPolicy(
        max_retries=3, retry_on_exceptions=(Throttled,), wait_from=retry_after,
        budget=RetryBudget(ratio=0.2, min_per_second=5.0),
    )  # fmt: skip
    results = execute(
        call_service, range(40), backend="threads", n_jobs=8, retry=policy,
        rate_limit=RateLimiter(200), timeout=0.5, on_error="collect",
    )  # fmt: skip
    failed = [r for r in results if isinstance(r, ItemFailure)]
    retried = sorted(item for item, n in _calls.items() if n > 1)
    print(f"{len(results) - len(failed)} items ok; retried after a 429: {retried}")
    for f in failed:
        print(f"failed: item {f.index}: {type(f.exception).__name__}: {f.exception}")

    pids, report = execute(
        worker_pid, range(40), backend="processes", n_jobs=2, chunksize=5,
        max_tasks_per_worker=10, return_plan=True,
    )  # fmt: skip
    print(f"{len(set(pids))} worker processes ran 40 items; {report.workers_recycled} recycled")


if __name__ == "__main__":
    main()
