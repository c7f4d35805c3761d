"""Thread plans against their obvious alternatives, measured side by side in one run.

1. Waiting work: 200 items of ``time.sleep(0.01)``. ``execute`` (decision and sampling
   included) against ``multiprocessing.pool.ThreadPool(n).map`` for n in 8 ... 128: warm
   (every pool already started, as ``execute``'s stays between calls) and cold (a fresh
   interpreter: ``execute``'s first call against creating the pool and mapping).
2. Code that releases the GIL: zlib + sha256 of 16 KB blobs, crc32 of 200 KB blobs.
   ``execute`` against serial, ``ThreadPool(2).map`` and ``Pool(2).map`` (pools warm).

Each figure is the median of interleaved rounds; the ratio is ``execute`` over the best
peer of the same run (below 1: ``execute`` wins). Run::

    pytest benchmarks/bench_threads_plan.py -m benchmark -s     # pytest-benchmark + tables
    python benchmarks/bench_threads_plan.py [--rounds 7]         # the tables alone
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from multiprocessing.pool import ThreadPool
from typing import Any

import pytest

from amorsize import execute

THREAD_COUNTS = (8, 16, 32, 64, 128)
SLEEP_ITEMS = 200
_ROUNDS = 5


def sleep10(x: int) -> int:
    """10 ms of waiting, like an HTTP call."""
    time.sleep(0.01)
    return x


def zlib_sha(blob: bytes) -> bytes:
    """Compress and hash: both release the GIL on large buffers."""
    return hashlib.sha256(zlib.compress(blob)).digest()


def crc(blob: bytes) -> int:
    """crc32 of a large buffer (releases the GIL)."""
    return zlib.crc32(blob)


def _text(n: int, seed: int) -> bytes:
    """``n`` bytes of word-like, compressible text."""
    import random

    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randint(2, 9)))
             for _ in range(400)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def gil_workloads() -> dict[str, tuple[Callable[[Any], Any], list[bytes]]]:
    """The GIL-releasing workloads: name -> (func, items)."""
    text = _text(4 << 20, 1)
    blobs16 = [text[(i * 7919) % (len(text) - 16384):][:16384] for i in range(1500)]
    big = [os.urandom(200 * 1024) for _ in range(32)]
    return {
        "zlib+sha256 16 KB x1500": (zlib_sha, blobs16),
        "crc32 200 KB x3000": (crc, [big[i % len(big)] for i in range(3000)]),
    }


def _median(fn: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _table(title: str, rows: dict[str, float], ours: str) -> str:
    best_name = min((k for k in rows if k != ours), key=rows.__getitem__)
    lines = [f"{title} ({_load()})"]
    for name, secs in rows.items():
        lines.append(f"  {name:<28} {secs * 1e3:9.1f} ms  {secs / rows[best_name]:5.2f}x best peer")
    lines.append(f"  execute / best peer ({best_name}): {rows[ours] / rows[best_name]:.2f}")
    return "\n".join(lines)


def sleep_warm(rounds: int = _ROUNDS) -> str:
    """Waiting work, warm pools: execute vs ThreadPool(n).map, interleaved rounds."""
    data = list(range(SLEEP_ITEMS))
    pools = {n: ThreadPool(n) for n in THREAD_COUNTS}
    try:
        for pool in pools.values():
            pool.map(sleep10, data)
        execute(sleep10, data)
        samples: dict[str, list[float]] = {}
        for _ in range(rounds):
            for n, pool in pools.items():
                samples.setdefault(f"ThreadPool({n}).map", []).append(
                    _median(lambda p=pool: p.map(sleep10, data), 1))
            samples.setdefault("execute", []).append(
                _median(lambda: execute(sleep10, data), 1))
        _, plan = execute(sleep10, data, return_plan=True)
    finally:
        for pool in pools.values():
            pool.terminate()
    rows = {k: statistics.median(v) for k, v in samples.items()}
    title = (f"sleep 10 ms x{SLEEP_ITEMS}, warm pools, median of {rounds}; execute planned "
             f"{plan.backend} n_jobs={plan.n_jobs} chunksize={plan.chunksize}")
    return _table(title, rows, "execute")


_COLD = """
import time, sys
t0 = time.perf_counter()
def sleep10(x):
    time.sleep(0.01)
    return x
data = list(range({items}))
if {n} == 0:
    # Imported first: the first call's own cost (facts, sampling, thread start-up) is
    # measured, not module imports (a few ms with bytecode caches, ~70 ms without).
    import amorsize.backends.threads, amorsize.executor, amorsize.optimizer
    from amorsize import execute
    t1 = time.perf_counter()
    execute(sleep10, data)
else:
    from multiprocessing.pool import ThreadPool
    t1 = time.perf_counter()
    pool = ThreadPool({n})
    pool.map(sleep10, data)
print(time.perf_counter() - t1)
"""


def _cold(n: int) -> float:
    """Seconds of the first run in a fresh interpreter (imports excluded): n=0 execute,
    else creating ``ThreadPool(n)`` (its threads start) and mapping."""
    code = _COLD.format(items=SLEEP_ITEMS, n=n)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


def sleep_cold(rounds: int = 3) -> str:
    """Waiting work, first call in a fresh interpreter: pool start-up included."""
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for n in THREAD_COUNTS:
            samples.setdefault(f"ThreadPool({n}) new + map", []).append(_cold(n))
        samples.setdefault("execute", []).append(_cold(0))
    rows = {k: statistics.median(v) for k, v in samples.items()}
    return _table(f"sleep 10 ms x{SLEEP_ITEMS}, cold (fresh interpreter), median of {rounds}",
                  rows, "execute")


def gil(rounds: int = _ROUNDS) -> str:
    """GIL-releasing work: execute vs serial, ThreadPool(2), Pool(2), interleaved rounds."""
    out = []
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    with ThreadPool(2) as tp, ctx.Pool(2) as pp:
        for name, (func, items) in gil_workloads().items():
            tp.map(func, items[:10])
            pp.map(func, items[:10])
            execute(func, items)
            peers: dict[str, Callable[[], Any]] = {
                "serial": lambda f=func, d=items: [f(x) for x in d],
                "ThreadPool(2).map": lambda f=func, d=items: tp.map(f, d),
                "Pool(2).map": lambda f=func, d=items: pp.map(f, d),
                "execute": lambda f=func, d=items: execute(f, d),
            }
            samples: dict[str, list[float]] = {}
            for _ in range(rounds):
                for peer, fn in peers.items():
                    samples.setdefault(peer, []).append(_median(fn, 1))
            _, plan = execute(func, items, return_plan=True)
            rows = {k: statistics.median(v) for k, v in samples.items()}
            title = (f"{name}, median of {rounds}; execute planned {plan.backend} "
                     f"n_jobs={plan.n_jobs} chunksize={plan.chunksize}")
            out.append(_table(title, rows, "execute"))
    return "\n".join(out)


# --------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("n", [0, *THREAD_COUNTS], ids=lambda n: f"threadpool{n}" if n else "execute")
def test_sleep_bound(benchmark: Any, n: int) -> None:
    """200 x 10 ms sleeps: execute (n=0) or a warm ThreadPool(n)."""
    benchmark.group = f"sleep 10 ms x{SLEEP_ITEMS} (warm)"
    data = list(range(SLEEP_ITEMS))
    if n == 0:
        execute(sleep10, data)
        benchmark.pedantic(execute, (sleep10, data), rounds=_ROUNDS, iterations=1)
        return
    with ThreadPool(n) as pool:
        pool.map(sleep10, data)
        benchmark.pedantic(pool.map, (sleep10, data), rounds=_ROUNDS, iterations=1)


@pytest.mark.parametrize("peer", ["execute", "serial", "threadpool2", "pool2"])
@pytest.mark.parametrize("workload", list(gil_workloads()))
def test_gil_releasing(benchmark: Any, workload: str, peer: str) -> None:
    """zlib/hashlib/crc32 on 16-200 KB bytes: execute against its three alternatives."""
    benchmark.group = workload
    func, items = gil_workloads()[workload]
    if peer == "execute":
        execute(func, items)
        benchmark.pedantic(execute, (func, items), rounds=_ROUNDS, iterations=1)
    elif peer == "serial":
        benchmark.pedantic(lambda: [func(x) for x in items], rounds=_ROUNDS, iterations=1)
    else:
        pool_cls = ThreadPool if peer == "threadpool2" else multiprocessing.get_context().Pool
        with pool_cls(2) as pool:
            pool.map(func, items[:10])
            benchmark.pedantic(pool.map, (func, items), rounds=_ROUNDS, iterations=1)


def test_tables(capsys: Any) -> None:
    """The ratio tables (execute / best peer), printed."""
    text = "\n\n".join([sleep_warm(), sleep_cold(), gil()])
    with capsys.disabled():
        print("\n" + text)


def main() -> None:
    """Print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=_ROUNDS)
    ap.add_argument("--only", choices=("sleep", "cold", "gil"), default=None)
    args = ap.parse_args()
    parts = {"sleep": lambda: sleep_warm(args.rounds), "cold": lambda: sleep_cold(3),
             "gil": lambda: gil(args.rounds)}
    for name, fn in parts.items():
        if args.only in (None, name):
            print(fn(), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
