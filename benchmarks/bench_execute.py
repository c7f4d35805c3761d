"""execute's own costs, each measured side by side with its reference in the same run.

1. Per-item overhead for tiny items vs ``multiprocessing.Pool.map`` at the same chunksize,
   both on warm pools of 2 workers (fork), interleaved rounds, best of N each.
2. Warm pool: the second ``execute`` on a workload vs the first (which starts the pool),
   in a fresh interpreter per workload, for the optimizer's workload suite.
3. The workload suite end to end through ``execute`` (decision and sampling included) vs
   serial; ``bench_quality.py`` compares it with the exhaustive-search oracle.

Run: ``pytest benchmarks/bench_execute.py -m benchmark -s`` (tables are printed), or
``python benchmarks/bench_execute.py [--scale 0.25]``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import WORKLOADS

from amorsize import execute
from amorsize.backends import get_backend

CHUNKSIZES = (1, 16, 64, 256, 1024)
_ROUNDS = 7
_TINY_ITEMS = 200_000


def ident(x: int) -> int:
    """The tiniest item: all the time measured is the machinery's."""
    return x


def _cpu(pids: list[int]) -> float:
    """CPU seconds used so far by this process (all threads) and the given workers."""
    import psutil

    total = time.process_time()
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def _timed(fn: Callable[[], Any], pids: Callable[[], list[int]]) -> tuple[float, float]:
    c0 = _cpu(pids())
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return wall, _cpu(pids()) - c0


def overhead_table(rounds: int = _ROUNDS) -> list[dict[str, float]]:
    """Per-item wall and CPU microseconds of Pool.map and execute at each chunksize.

    Warm pools of 2 fork workers each; rounds interleave the two so both see the same load.
    CPU time (parent with its threads, plus the workers) is the steadier figure on a shared
    machine: it is the work each design spends per item, whatever else runs.
    """
    ctx = multiprocessing.get_context("fork")
    backend = get_backend("processes", start_method="fork")
    rows = []
    with ctx.Pool(2) as pool:
        pool.map(ident, range(100), chunksize=1)  # warm both
        execute(ident, range(100), backend=backend, n_jobs=2, chunksize=1)
        pool_pids = [p.pid for p in pool._pool]  # type: ignore[attr-defined]

        def exec_pids() -> list[int]:
            return [w.process.pid for w in backend._workers]  # type: ignore[attr-defined]

        for c in CHUNKSIZES:
            n = _TINY_ITEMS if c > 1 else _TINY_ITEMS // 10
            data = list(range(n))
            assert execute(ident, data, backend=backend, n_jobs=2, chunksize=c) == data

            def run_pool(data: list[int] = data, c: int = c) -> Any:
                return pool.map(ident, data, chunksize=c)

            def run_execute(data: list[int] = data, c: int = c) -> Any:
                return execute(ident, data, backend=backend, n_jobs=2, chunksize=c)

            best = {"pool": (math.inf, math.inf), "execute": (math.inf, math.inf)}
            for _ in range(rounds):
                for name, fn, pids in (
                    ("pool", run_pool, lambda: pool_pids),
                    ("execute", run_execute, exec_pids),
                ):
                    wall, cpu = _timed(fn, pids)
                    best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
            (pw, pc), (ew, ec) = best["pool"], best["execute"]
            rows.append(
                {
                    "chunksize": c,
                    "pool_us": pw / n * 1e6,
                    "execute_us": ew / n * 1e6,
                    "ratio": ew / pw,
                    "pool_cpu_us": pc / n * 1e6,
                    "execute_cpu_us": ec / n * 1e6,
                    "cpu_ratio": ec / pc,
                }
            )
    return rows


_WARM_SCRIPT = """
import json, sys, time
sys.path.insert(0, {here!r})
from workloads import WORKLOADS
from amorsize import execute
from amorsize.backends.processes import ProcessesBackend
w = WORKLOADS[{name!r}]
data = w.make_data({scale!r})

def timed(**kw):
    t0 = time.perf_counter()
    out, plan = execute(w.func, data, return_plan=True, **kw)
    t = time.perf_counter() - t0
    assert out == serial
    return t, plan

t0 = time.perf_counter(); serial = [w.func(x) for x in data]; t_serial = time.perf_counter() - t0
row = {{"serial": t_serial}}
row["first"], plan = timed()
row["second"], plan2 = timed()
row["plan"] = f"{{plan.backend}}/{{plan.n_jobs}}/{{plan.chunksize}}"
row["plan2"] = f"{{plan2.backend}}/{{plan2.n_jobs}}/{{plan2.chunksize}}"
row["predicted"] = plan.predicted_seconds
# The same fixed plan on a private pool, cold then warm, for each start method.
chunk = max(1, len(data) // 8)
for method in ("fork", "spawn"):
    backend = ProcessesBackend(method)
    row[method + "_cold"], _ = timed(backend=backend, n_jobs=2, chunksize=chunk)
    row[method + "_warm"], _ = timed(backend=backend, n_jobs=2, chunksize=chunk)
    backend.close()
print(json.dumps(row))
"""


def warm_table(scale: float) -> list[dict[str, Any]]:
    """First and second execute per workload, each workload in a fresh interpreter."""
    here = str(Path(__file__).resolve().parent)
    rows = []
    for name in WORKLOADS:
        script = _WARM_SCRIPT.format(here=here, name=name, scale=scale)
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["workload"] = name
        rows.append(row)
    return rows


def print_overhead(rows: list[dict[str, float]]) -> None:
    print(
        "\n| chunksize | Pool.map wall µs/item | execute wall µs/item | wall ratio "
        "| Pool.map CPU µs/item | execute CPU µs/item | CPU ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['chunksize']} | {r['pool_us']:.3f} | {r['execute_us']:.3f} | "
            f"{r['ratio']:.2f} | {r['pool_cpu_us']:.3f} | {r['execute_cpu_us']:.3f} | "
            f"{r['cpu_ratio']:.2f} |"
        )


def print_warm(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| workload | auto plan (1st / 2nd) | serial s | 1st execute s | 2nd execute s "
        "| 2nd / 1st | 1st / serial | predicted / measured |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for r in rows:
        ratios.append(r["first"] / r["serial"])
        pred = f"{r['predicted'] / r['first']:.2f}" if r["predicted"] else "-"
        print(
            f"| {r['workload']} | {r['plan']} / {r['plan2']} | {r['serial']:.3f} | "
            f"{r['first']:.3f} | {r['second']:.3f} | {r['second'] / r['first']:.2f} | "
            f"{r['first'] / r['serial']:.2f} | {pred} |"
        )
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"\ngeometric mean of 1st execute / serial: {geo:.2f}")
    print("\nSame plan (processes, n_jobs=2, chunksize=len/8), private pool: cold call, then warm")
    print(
        "\n| workload | fork cold s | fork warm s | warm / cold | spawn cold s | spawn warm s "
        "| warm / cold |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['workload']} | {r['fork_cold']:.3f} | {r['fork_warm']:.3f} | "
            f"{r['fork_warm'] / r['fork_cold']:.2f} | {r['spawn_cold']:.3f} | "
            f"{r['spawn_warm']:.3f} | {r['spawn_warm'] / r['spawn_cold']:.2f} |"
        )


# --------------------------------------------------------------------------- pytest entry


@pytest.mark.parametrize("chunksize", [16, 256])
def test_pool_map_tiny_items(benchmark: Any, chunksize: int) -> None:
    """Reference: Pool.map on tiny items at this chunksize (warm pool)."""
    data = list(range(_TINY_ITEMS))
    benchmark.group = f"tiny items, chunksize={chunksize}"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(ident, range(10))
        result = benchmark.pedantic(lambda: pool.map(ident, data, chunksize=chunksize), rounds=5)
    assert result == data


@pytest.mark.parametrize("chunksize", [16, 256])
def test_execute_tiny_items(benchmark: Any, chunksize: int) -> None:
    """execute on tiny items at this chunksize (warm pool)."""
    data = list(range(_TINY_ITEMS))
    benchmark.group = f"tiny items, chunksize={chunksize}"
    backend = get_backend("processes", start_method="fork")
    execute(ident, range(10), backend=backend, n_jobs=2, chunksize=1)
    result = benchmark.pedantic(
        lambda: execute(ident, data, backend=backend, n_jobs=2, chunksize=chunksize), rounds=5
    )
    assert result == data


def test_overhead_table() -> None:
    """Interleaved per-item overhead table (printed with -s)."""
    rows = overhead_table()
    print_overhead(rows)
    assert [r["chunksize"] for r in rows] == list(CHUNKSIZES)


def test_warm_pool_table() -> None:
    """Warm second call vs first, and execute vs serial, on the workload suite."""
    rows = warm_table(scale=0.25)
    print_warm(rows)
    assert len(rows) == len(WORKLOADS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-warm", action="store_true")
    args = parser.parse_args()
    if not args.skip_overhead:
        print_overhead(overhead_table())
    if not args.skip_warm:
        print_warm(warm_table(args.scale))
