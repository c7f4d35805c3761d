"""Run-report overhead: ``execute(func, data, report="run.html")`` against the same call
without ``report=``, in the same benchmark run.

What the report costs: two clock reads and one span per chunk (in the worker or the parent),
the serial fast path given up for the chunked loop (its chunks are timed too), and writing
the HTML file at the end. Measured on ``workloads.small`` (~10 us items, 50,000 of them: a
medium run of about half a second), serial (every cost on the critical path: the worst case)
and on two threads and two worker processes with the chunk sizes ``execute`` picks. Each
round runs both, alternating which goes first, so that both see the same machine load; the
figure is the median over rounds of with/without.

Run, then print the table. On a shared machine, time the serial plan (all in this process)
in CPU time, which other processes' load barely disturbs; the others need wall time::

    pytest benchmarks/bench_report.py -m benchmark -k serial \
        --benchmark-timer=time.process_time --benchmark-json=/tmp/report-cpu.json
    pytest benchmarks/bench_report.py -m benchmark -k "not serial" \
        --benchmark-json=/tmp/report-wall.json
    python benchmarks/bench_report.py /tmp/report-cpu.json /tmp/report-wall.json
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from workloads import small

from amorsize import execute

N = 50_000
ROUNDS = 11
PLANS = {
    "serial": {"backend": "serial"},
    "threads": {"backend": "threads", "n_jobs": 2},
    "processes": {"backend": "processes", "n_jobs": 2},
}


@pytest.mark.parametrize("plan", list(PLANS))
def test_execute(benchmark: Any, plan: str) -> None:
    """execute over 50,000 items, once without and once with report= per round."""
    kwargs: dict[str, Any] = dict(PLANS[plan])
    data = list(range(N))
    execute(small, data[:2000], **kwargs)  # warm the pool and the machine facts
    timer = benchmark._timer
    times: dict[str, list[float]] = {"none": [], "report": []}
    order = itertools.cycle([("none", "report"), ("report", "none")])
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run.html")

        def pair() -> None:
            for kind in next(order):
                extra = {"report": out} if kind == "report" else {}
                t0 = timer()
                results = execute(small, data, **kwargs, **extra)
                times[kind].append(timer() - t0)
                assert len(results) == N

        benchmark.group = f"execute 50,000 x small, {plan}: a run without + a run with report="
        benchmark.pedantic(pair, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    ratios = sorted(r / n for n, r in zip(times["none"], times["report"], strict=True))
    benchmark.extra_info.update({kind: min(ts) for kind, ts in times.items()})
    benchmark.extra_info["median_ratio"] = ratios[len(ratios) // 2]


def _table(*paths: str) -> str:
    benchmarks = [b for p in paths for b in json.loads(Path(p).read_text())["benchmarks"]]
    lines = [
        "| plan | best run without | best run with report= | with / without, median pair |",
        "|---|---:|---:|---:|",
    ]
    for b in benchmarks:
        info = b.get("extra_info", {})
        if "median_ratio" not in info:
            continue
        plan = b["name"].removeprefix("test_execute[").removesuffix("]")
        lines.append(
            f"| {plan} | {info['none'] * 1e3:,.0f} ms | {info['report'] * 1e3:,.0f} ms | "
            f"{info['median_ratio']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table(*sys.argv[1:]))
