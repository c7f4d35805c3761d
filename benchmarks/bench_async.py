"""``async def`` waiting work: ``execute`` on one event loop vs a pool of 32 threads.

1,000 items that each wait 20 ms: ``execute(fetch, data)`` with ``fetch`` awaiting
``asyncio.sleep(0.02)`` (sampling and planning included), against what people write
without amorsize, ``ThreadPool(32).map`` of ``time.sleep(0.02)``. The target (issue 14) is
``execute`` at least 10x faster: 32 threads need ~32 rounds of 20 ms, one loop a few.

Run: ``pytest benchmarks/bench_async.py -m benchmark`` (pytest-benchmark's table), or
``python benchmarks/bench_async.py [--rounds 5]`` for the ratio, best of N interleaved
rounds of each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable
from multiprocessing.pool import ThreadPool
from typing import Any

import pytest

from amorsize import execute

ITEMS = 1000
WAIT_S = 0.02
THREADS = 32


async def fetch(x: int) -> int:
    """An HTTP-like call written with async def: it waits 20 ms."""
    await asyncio.sleep(WAIT_S)
    return x


def fetch_blocking(x: int) -> int:
    """The same call written for threads."""
    time.sleep(WAIT_S)
    return x


def run_execute() -> list[int]:
    return execute(fetch, range(ITEMS))


def run_thread_pool() -> list[int]:
    with ThreadPool(THREADS) as pool:
        return pool.map(fetch_blocking, range(ITEMS))


PEERS: dict[str, Callable[[], list[int]]] = {
    "execute (async def, planned)": run_execute,
    f"ThreadPool({THREADS}).map (time.sleep)": run_thread_pool,
}


@pytest.mark.benchmark(group=f"async: {ITEMS} x {WAIT_S * 1e3:g} ms waits")
@pytest.mark.parametrize("peer", list(PEERS))
def test_async_waits(benchmark: Any, peer: str) -> None:
    run = PEERS[peer]
    run()  # warm: imports, the machine facts cache
    result = benchmark.pedantic(run, rounds=3, iterations=1)
    assert result == list(range(ITEMS))


def ratio(rounds: int) -> tuple[float, float]:
    """Best seconds of ``rounds`` interleaved rounds: (execute, thread pool)."""
    best = {name: float("inf") for name in PEERS}
    for run in PEERS.values():
        run()  # warm
    for _ in range(rounds):
        for name, run in PEERS.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    ours, peer = best.values()
    return ours, peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ours, peer = ratio(args.rounds)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"execute (async def): {ours * 1e3:8.1f} ms")
    print(f"ThreadPool({THREADS}).map:   {peer * 1e3:8.1f} ms")
    print(f"execute is {peer / ours:.1f}x faster (target: >= 10x)")


if __name__ == "__main__":
    main()
