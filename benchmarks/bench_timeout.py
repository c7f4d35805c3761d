"""What per-item timeouts and worker recycling cost on the happy path (no item times out,
no worker reaches a limit), each as a ratio to the same run without the option, measured in
interleaved rounds (best of N) in one process.

* processes: ``timeout=`` runs chunks item by item under the worker's watchdog (two
  attribute stores per item); ``max_worker_memory=`` reads the worker's RSS once per chunk;
  ``max_tasks_per_worker=`` counts items in the parent. Tiny items (the worst case).
* threads and serial: ``timeout=`` hands each item to a helper thread and waits for it,
  a fixed cost per item: ``items_us`` says how long the item itself takes.

Run: ``pytest benchmarks/bench_timeout.py -m benchmark -s`` or
``python benchmarks/bench_timeout.py [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import pytest

from amorsize import execute
from amorsize.backends import get_backend

_ROUNDS = 5


def ident(x: int) -> int:
    """The tiniest item: all the time measured is the machinery's."""
    return x


def spin_50us(x: int) -> int:
    """An item of ~50 us of CPU."""
    t = time.perf_counter() + 50e-6
    while time.perf_counter() < t:
        pass
    return x


def _best(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Best wall seconds of each run, the runs interleaved round after round."""
    best = dict.fromkeys(runs, math.inf)
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def cost_table(rounds: int = _ROUNDS) -> list[dict[str, Any]]:
    """One row per (backend, option): seconds without and with it, and the ratio."""
    rows: list[dict[str, Any]] = []
    procs = get_backend("processes", start_method="fork")
    data = list(range(200_000))
    execute(ident, range(100), backend=procs, n_jobs=2, chunksize=1)  # warm the pool
    base = {"backend": procs, "n_jobs": 2, "chunksize": 256}
    options: dict[str, dict[str, Any]] = {
        "timeout=60": {"timeout": 60.0},
        "max_worker_memory": {"max_worker_memory": 1 << 40},
        "max_tasks_per_worker": {"max_tasks_per_worker": 1 << 40},
    }
    runs: dict[str, Callable[[], Any]] = {"none": lambda: execute(ident, data, **base)}
    for name, extra in options.items():
        runs[name] = lambda extra=extra: execute(ident, data, **base, **extra)
    best = _best(runs, rounds)
    for name in options:
        rows.append(_row("processes", name, 0.0, len(data), best["none"], best[name]))
    small = list(range(2_000))
    for backend, jobs in (("threads", 2), ("serial", None)):
        for func, item_us in ((ident, 0.0), (spin_50us, 50.0)):
            kw = {"backend": backend, "n_jobs": jobs, "chunksize": 64}
            pair = _best(
                {
                    "none": lambda kw=kw, f=func: execute(f, small, **kw),
                    "timeout": lambda kw=kw, f=func: execute(f, small, timeout=60.0, **kw),
                },
                rounds,
            )
            rows.append(_row(backend, "timeout=60", item_us, len(small), *pair.values()))
    return rows


def _row(backend: str, option: str, item_us: float, n: int, off: float, on: float) -> dict[str, Any]:
    return {
        "backend": backend,
        "option": option,
        "item_us": item_us,
        "off_us_per_item": off / n * 1e6,
        "on_us_per_item": on / n * 1e6,
        "ratio": on / off,
    }


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"{'backend':10} {'option':22} {'item us':>8} {'off us':>8} {'on us':>8} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['backend']:10} {r['option']:22} {r['item_us']:8.1f} "
            f"{r['off_us_per_item']:8.2f} {r['on_us_per_item']:8.2f} {r['ratio']:6.2f}"
        )


@pytest.mark.benchmark
def test_happy_path_cost_of_timeouts_and_recycling() -> None:
    """Prints the table (the figures are for the docs, not a gate: no timing is asserted)."""
    rows = cost_table()
    _print(rows)
    assert all(r["ratio"] > 0 for r in rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=_ROUNDS)
    _print(cost_table(parser.parse_args().rounds))
