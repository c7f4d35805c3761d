"""Retry budget and rate limiter costs, as ratios against peers measured in the same run.

* ``success``: ``with_retry(f)`` against ``with_retry(f, budget=RetryBudget())`` on a call
  that succeeds (the budget's deposit: a coarse clock read and one compare-and-swap), and
  the bare call;
* ``acquire``: ``RateLimiter.acquire()`` that never waits, in one process, against a
  ``threading.Lock`` acquire/release (the cheapest in-process peer);
* ``acquire_2proc``: two processes acquiring from one limiter at once, through the shared
  memory segment, against a parent-side broker (one round trip over a pipe per acquire),
  the design that shared memory replaced.

Rounds are interleaved (A, B, A, B, ...) and the best round counts, so a busy machine slows
both sides alike::

    python benchmarks/bench_budget.py            # ~10 s, prints ns per call and ratios
    pytest benchmarks/bench_budget.py -m benchmark
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import pytest

from amorsize import RateLimiter, RetryBudget, with_retry

CALLS = 20_000  # calls per round (short: a busy machine leaves quiet slices)
ROUNDS = 41
OPEN = {"rate": 1e9, "per": 1.0, "burst": 1_000_000}  # a limiter that never makes one wait


def _f(x: int) -> int:
    return x + 1


def _loop(f: Callable[[int], int], n: int) -> Callable[[], float]:
    def run() -> float:
        t = time.perf_counter()
        for _ in range(n):
            f(1)
        return (time.perf_counter() - t) / n

    return run


def _loop0(f: Callable[[], object], n: int) -> Callable[[], float]:
    def run() -> float:
        t = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t) / n

    return run


def _best(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(rounds):
        for name, run in contenders.items():
            best[name] = min(best[name], run())
    return best


def success_path(rounds: int = ROUNDS) -> dict[str, float]:
    """Seconds per successful call: bare, with_retry, with_retry + budget."""
    return _best(
        {
            "bare": _loop(_f, CALLS),
            "with_retry": _loop(with_retry(_f), CALLS),
            "with_retry+budget": _loop(with_retry(_f, budget=RetryBudget()), CALLS),
        },
        rounds,
    )


def acquire_in_process(rounds: int = ROUNDS) -> dict[str, float]:
    """Seconds per acquire in one process: the limiter against a lock."""
    lim = RateLimiter(**OPEN)
    lock = threading.Lock()

    def locked() -> None:
        with lock:
            pass

    return _best(
        {
            "RateLimiter.acquire": _loop0(lim.acquire, CALLS),
            "RateLimiter.try_acquire": _loop0(lim.try_acquire, CALLS),
            "threading.Lock": _loop0(locked, CALLS),
        },
        rounds,
    )


def _shared_worker(lim: RateLimiter, n: int, go: Any, out: Connection) -> None:
    go.wait()
    t = time.perf_counter()
    for _ in range(n):
        lim.acquire()
    out.send((time.perf_counter() - t) / n)


def _broker_worker(conn: Connection, n: int, go: Any, out: Connection) -> None:
    go.wait()
    t = time.perf_counter()
    for _ in range(n):
        conn.send_bytes(b"a")
        conn.recv_bytes()
    out.send((time.perf_counter() - t) / n)


def _serve(conn: Connection, lim: RateLimiter, n: int) -> None:
    for _ in range(n):
        conn.recv_bytes()
        lim.try_acquire()
        conn.send_bytes(b"k")


def _two_processes(target: Callable[..., None], args: list[tuple[Any, ...]]) -> float:
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    go = ctx.Event()
    pipes = [ctx.Pipe(duplex=False) for _ in args]
    procs = [
        ctx.Process(target=target, args=(*a, go, w)) for a, (_, w) in zip(args, pipes, strict=True)
    ]
    for p in procs:
        p.start()
    go.set()
    per_call = max(r.recv() for r, _ in pipes)
    for p in procs:
        p.join()
    return float(per_call)


def acquire_two_processes(rounds: int = 3, n: int = 20_000) -> dict[str, float]:
    """Seconds per acquire while two processes acquire at once: shared memory vs a broker."""

    def shared() -> float:
        lim = RateLimiter(**OPEN)
        try:
            return _two_processes(_shared_worker, [(lim, n), (lim, n)])
        finally:
            lim.close()

    def broker() -> float:
        lim = RateLimiter(**OPEN)
        ends = [multiprocessing.Pipe() for _ in range(2)]
        servers = [threading.Thread(target=_serve, args=(a, lim, n // 10)) for a, _ in ends]
        for s in servers:
            s.start()
        try:
            return _two_processes(_broker_worker, [(b, n // 10) for _, b in ends])
        finally:
            for s in servers:
                s.join()

    return _best({"shared memory": shared, "parent broker": broker}, rounds)


def _table(title: str, best: dict[str, float], base: str) -> None:
    print(f"\n{title}")
    for name, s in best.items():
        print(f"  {name:<26} {s * 1e9:10.1f} ns   {s / best[base]:6.2f}x {base}")


def main() -> None:
    """Print the three tables."""
    if hasattr(os, "getloadavg"):
        print("load average: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    _table("success path of a retrying call", success_path(), "with_retry")
    _table("acquire that does not wait, one process", acquire_in_process(), "threading.Lock")
    _table("acquire, two processes at once", acquire_two_processes(), "shared memory")


@pytest.mark.parametrize("name", ["with_retry", "with_retry+budget"])
def test_success_path(benchmark: Any, name: str) -> None:
    """A successful call of a retrying function, with and without a budget."""
    f = with_retry(_f) if name == "with_retry" else with_retry(_f, budget=RetryBudget())
    benchmark(_loop(f, 1000))


def test_acquire(benchmark: Any) -> None:
    """One RateLimiter.acquire() that does not wait."""
    lim = RateLimiter(**OPEN)
    benchmark(_loop0(lim.acquire, 1000))


if __name__ == "__main__":
    main()
