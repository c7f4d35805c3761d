"""Dask: amorsize's batching vs one task per item vs ``dask.bag`` defaults, on a LocalCluster.

All run the same workloads (``workloads.py``) on one ``LocalCluster`` of 2 worker processes
with 1 thread each, in interleaved rounds (best of N), so they see the same load:

* ``plan``: ``execute(func, data, backend="dask", client=client, n_jobs=..., chunksize=...)``
  with the chunk size that ``plan()`` chose for this cluster (decided once, before the
  rounds): every item runs on the cluster, the batching alone is measured. The scheduler's
  per-task overhead is measured once per cluster before the rounds (~0.2-0.4 s).
* ``one task per item``: ``client.gather(client.map(func, data, pure=False))``
  (``pure=False``: equal items are not merged into one task).
* ``dask.bag defaults``: ``dask.bag.from_sequence(data).map(func).compute()`` with its
  default partitions (about 100).
* ``amorsize end to end``: ``execute(func, data, backend="dask", client=client)``: sampling
  (the sampled items run in the client and are reused), the plan and the run.

Item counts are scaled down from the suite so that one task per item finishes in seconds.

Run: ``pytest benchmarks/bench_dask.py -m benchmark -s`` (the table is printed), or
``python benchmarks/bench_dask.py [--rounds 3] [--scale 1.0]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import WORKLOADS

distributed = pytest.importorskip("distributed", reason="needs dask.distributed")
import dask.bag as db  # noqa: E402

from amorsize import execute  # noqa: E402

# Fraction of each suite workload's items: one task per item costs ~1-3 ms of scheduler
# time, so the 600k-item workloads are cut to a few thousand items.
SCALES = {
    "tiny_1us": 0.005,
    "small_10us": 0.05,
    "medium_1ms": 1.0,
    "slow_50ms": 1.0,
    "skewed": 1.0,
    "big_output_1mb": 0.25,
    "big_input_200kb": 0.4,
    "sleep_5ms": 1.0,
}
_ROUNDS = 3


def _best_of(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Interleaved rounds: each configuration once per round, keep each one's best time."""
    best = dict.fromkeys(runs, math.inf)
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _runs(
    client: Any, func: Callable[[Any], Any], data: list[Any], n_jobs: int, chunksize: int
) -> dict[str, Callable[[], Any]]:
    """The configurations on one workload, each checking its first results."""
    expected = [func(x) for x in data[:3]]

    def planned() -> None:
        out = execute(func, data, backend="dask", client=client, n_jobs=n_jobs, chunksize=chunksize)
        assert out[:3] == expected

    def end_to_end() -> None:
        assert execute(func, data, backend="dask", client=client)[:3] == expected

    def per_item() -> None:
        with _peer_warnings():
            # pure=False: dask would otherwise merge equal items (skewed has two values).
            assert client.gather(client.map(func, data, pure=False))[:3] == expected

    def bag() -> None:
        with _peer_warnings():
            assert db.from_sequence(data).map(func).compute(scheduler=client)[:3] == expected

    return {"planned": planned, "end_to_end": end_to_end, "per_item": per_item, "bag": bag}


@contextlib.contextmanager
def _peer_warnings() -> Iterator[None]:
    """The peers put every input in the task graph, and dask warns when that graph is large
    (the 200 KB-input workload). amorsize scatters big chunks and runs with warnings as
    errors under pytest; this filter covers the peers' calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sending large graph", UserWarning)
        yield


def table(client: Any, rounds: int = _ROUNDS, scale: float = 1.0) -> list[dict[str, Any]]:
    """One row per workload: seconds for each configuration, and the planned chunk size."""
    # Pay the one-off overhead probe (and worker imports) before timing anything.
    execute(abs, range(-2000, 2000), backend="dask", client=client)
    rows = []
    for name, w in WORKLOADS.items():
        data = w.make_data(SCALES[name] * scale)
        _, plan = execute(w.func, data, backend="dask", client=client, return_plan=True)
        times = _best_of(_runs(client, w.func, data, plan.n_jobs, plan.chunksize), rounds)
        row = {"workload": name, "items": len(data), "chunksize": plan.chunksize}
        rows.append({**row, "backend": plan.backend, **times})
    return rows


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def render(rows: list[dict[str, Any]]) -> str:
    """Markdown: seconds of amorsize's plan, and every other configuration as a multiple."""
    lines = [
        "| workload | items | planned chunksize | plan, s | one task per item | dask.bag defaults "
        "| amorsize end to end |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = r["planned"]
        lines.append(
            f"| {r['workload']} | {r['items']:,} | {r['chunksize']:,} | {base:.3f} "
            f"| {r['per_item'] / base:.2f}x | {r['bag'] / base:.2f}x "
            f"| {r['end_to_end'] / base:.2f}x |"
        )
    means = [
        _geomean([r[k] / r["planned"] for r in rows]) for k in ("per_item", "bag", "end_to_end")
    ]
    lines.append(
        f"| **geometric mean** | | | | **{means[0]:.2f}x** | **{means[1]:.2f}x** "
        f"| **{means[2]:.2f}x** |"
    )
    return "\n".join(lines)


def _cluster() -> tuple[Any, Any]:
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    return cluster, distributed.Client(cluster, set_as_default=False)


def test_dask_batching_table() -> None:
    """Every configuration returns the right results; the table is printed (-s)."""
    cluster, client = _cluster()
    try:
        rows = table(client, rounds=1, scale=0.5)
    finally:
        client.close()
        cluster.close()
    print("\n" + render(rows))
    assert len(rows) == len(WORKLOADS)
    assert all(r["backend"] == "dask" and r["chunksize"] >= 1 for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=_ROUNDS)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    cluster, client = _cluster()
    try:
        print(render(table(client, args.rounds, args.scale)))
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
