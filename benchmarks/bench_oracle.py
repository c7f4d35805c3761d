"""Issue 14: ``execute`` against the obvious alternative, on the work people bring most often.

For each workload of ``workloads.ISSUE14`` (sleep-bound, tiny at 0.1 us, GIL-releasing,
``async def``, a generator, skewed and bimodal costs, and ``tiny_xx``: ``x * x``, 0.04 us
here, reported outside the targets' geometric mean and max):

* the oracle: the fastest of serial (``[f(x) for x in data]``),
  ``multiprocessing.Pool(n).map(f, data, c)`` for n in {2, 4} and a few chunk sizes, and
  ``ThreadPool(n).map(f, data, c)`` for n in {2, 8, 16, 32, 64, 128}; pool start-up and
  shutdown included. For ``async def`` work the contenders are ``ThreadPool(n)`` running
  ``asyncio.run(f(x))`` per item and one ``asyncio.gather`` of every item;
* amorsize: ``execute(f, data)`` end to end, sampling and the decision included, with its
  warm pools closed before every run (what a first call meets; machine facts come from the
  on-disk cache, measured before the clock starts).

All in one process (``fork`` pools start in milliseconds), each contender run ``--repeats``
times (median); a contender whose first run is slower than three times the best so far
(plus 0.2 s) is cut short and not repeated. Where the oracle takes under 50 ms, it and
execute then take turns 41 times, and those medians are compared. A generator workload
hands every contender a fresh generator expression. Prints the load average with the
table.

Targets (issue 14): geometric mean of execute/oracle <= 1.05, none above 1.20; tiny
<= 1.05x the list comprehension; sleep-bound <= 1.10x the best ThreadPool; async >= 10x
faster than ThreadPool(32).

Run: ``python benchmarks/bench_oracle.py [--only a,b] [--repeats 3] [--json out.json]``
(about three minutes on 2 cores) or ``pytest benchmarks/bench_oracle.py -m benchmark -s``.
``--adaptive-ab N`` instead times execute with adaptive chunk sizes (issue 14, item 5)
against the plan's fixed chunk size, interleaved N times in one process (medians): on a
shared machine only interleaved runs compare two versions fairly.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from multiprocessing import TimeoutError as MpTimeout
from multiprocessing.pool import Pool, ThreadPool
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import ISSUE14, Workload

import amorsize
from amorsize import backends

_REPEATS = 3
# Runs shorter than this are repeated _SHORT_REPEATS times (median), and the oracle and
# execute then take turns: three medians of an 11 ms run (200k items of x * x) moved
# 0.97-1.24 between runs of one build at load 1.4-3, and the same serial loop sped up from
# 13.5 to 6.6 ms over nine runs in a row, so runs taken one contender after the other
# compared execute's later runs with the oracle's earlier ones. Nine turns left the tiny
# rows' median moving 1.00-1.14 between runs of one build; 21 moved it 0.98-1.07 (a run's
# 200k-item loops vary +-5 % one to the next); 41 moved it 1.03-1.04 in four runs
# (tiny_0.1us; tiny_xx 1.08-1.12), for ~2 s more a row.
_SHORT_S = 0.05
_SHORT_REPEATS = 41
_GENERATOR_INPUT = {"generator_1ms"}
# Rows beyond the issue's seven workloads: shown, but outside the targets' aggregates.
_BEYOND_ISSUE = {"tiny_xx"}
Runner = Callable[[Callable[[Any], Any], Iterable[Any], float], Any]


# --------------------------------------------------------------------------- contenders
def _serial(f: Callable[[Any], Any], data: Iterable[Any], timeout: float) -> list[Any]:
    return [f(x) for x in data]


def _pool(kind: type[Pool], n: int, c: int) -> Runner:
    def run(f: Callable[[Any], Any], data: Iterable[Any], timeout: float) -> list[Any] | None:
        p = kind(n)
        try:
            return list(
                p.map_async(f, data, chunksize=c).get(None if math.isinf(timeout) else timeout)
            )
        except MpTimeout:
            return None
        finally:
            p.terminate()
            p.join()

    return run


def _run_async(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda x: asyncio.run(f(x))


def _async_threads(n: int) -> Runner:
    def run(f: Callable[[Any], Any], data: Iterable[Any], timeout: float) -> list[Any] | None:
        return _pool(ThreadPool, n, 1)(_run_async(f), data, timeout)

    return run


def _gather(f: Callable[[Any], Any], data: Iterable[Any], timeout: float) -> list[Any]:
    async def main() -> list[Any]:
        return list(await asyncio.gather(*(f(x) for x in data)))

    return asyncio.run(main())


def _execute(f: Callable[[Any], Any], data: Iterable[Any], timeout: float) -> Any:
    results, report = amorsize.execute(f, data, return_plan=True)
    return results, report


def contenders(w: Workload, n_items: int) -> dict[str, Runner]:
    """The oracle's search space for ``w`` (the issue's grid, kept small for 2 cores)."""
    if inspect.iscoroutinefunction(w.func):
        out: dict[str, Runner] = {
            f"threads {n}x1 (asyncio.run)": _async_threads(n) for n in (32, 128)
        }
        out["asyncio.gather"] = _gather
        return out
    out = {"serial": _serial}
    for n in (2, 4):
        for c in sorted({1, 16, max(1, n_items // (4 * n)), max(1, math.ceil(n_items / n))}):
            out[f"processes {n}x{c}"] = _pool(Pool, n, c)
    for n in (2, 8, 16, 32, 64, 128):
        for c in sorted({1, max(1, n_items // (4 * n))}):
            out[f"threads {n}x{c}"] = _pool(ThreadPool, n, c)
    return out


# --------------------------------------------------------------------------- timing
def _close_warm_pools() -> None:
    """Every run of execute starts cold, like the Pool(n) contenders."""
    for be in list(backends._SHARED.values()):
        be.close()


def _once(w: Workload, data: list[Any], runner: Runner, timeout: float) -> tuple[float, Any]:
    """Seconds for one run (``inf`` if cut short) and what the runner returned."""
    feed: Iterable[Any] = (x for x in data) if w.name in _GENERATOR_INPUT else data
    gc.collect()
    t = time.perf_counter()
    out = runner(w.func, feed, timeout)
    dt = time.perf_counter() - t
    if out is None:
        return math.inf, None
    results = out[0] if runner is _execute else out
    if len(results) != len(data) or results[-1] != _expected(w, data[-1]):
        msg = f"{w.name}: wrong results from {runner}"
        raise AssertionError(msg)
    return dt, out


def _expected(w: Workload, x: Any) -> Any:
    return asyncio.run(w.func(x)) if inspect.iscoroutinefunction(w.func) else w.func(x)


def _execute_supports_async(w: Workload) -> bool:
    """False where execute hands back un-awaited coroutines (before issue 14, item 4)."""
    try:
        results = amorsize.execute(w.func, [1, 2])
    except Exception:
        return False
    unawaited = [r for r in results if inspect.iscoroutine(r)]
    for r in unawaited:
        r.close()
    return not unawaited


def _plan(report: Any) -> str:
    text = f"{report.backend} {report.n_jobs}x{report.chunksize}"
    extra = getattr(report, "chunk_sizes", None)
    return f"{text} ({extra})" if extra else text


def measure(name: str, scale: float, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Median seconds of every contender and of execute, for one workload."""
    w = ISSUE14[name]
    data = w.make_data(scale)
    row: dict[str, Any] = {"workload": name, "description": w.description, "n_items": len(data)}
    if inspect.iscoroutinefunction(w.func) and not _execute_supports_async(w):
        row["skipped"] = "execute does not run async def functions yet (issue 14, item 4)"
        log(f"{name}: skipped: {row['skipped']}")
        return row
    times: dict[str, float] = {}
    runners = contenders(w, len(data))
    for label, runner in runners.items():
        best = min(times.values(), default=math.inf)
        runs = [_once(w, data, runner, 3 * best + 0.2)[0]]
        if not math.isinf(runs[0]):
            runs += [_once(w, data, runner, math.inf)[0] for _ in range(repeats - 1)]
        times[label] = statistics.median(runs)
    oracle = min(times, key=times.__getitem__)
    short = times[oracle] < _SHORT_S
    ours: list[float] = []
    theirs: list[float] = []
    plan = ""
    for _ in range(_SHORT_REPEATS if short else repeats):
        if short:  # taking turns with the oracle
            theirs.append(_once(w, data, runners[oracle], math.inf)[0])
        _close_warm_pools()
        dt, (_, report) = _once(w, data, _execute, math.inf)
        ours.append(dt)
        plan = _plan(report)
    if theirs:
        times[oracle] = statistics.median(theirs)
    row.update(
        execute_s=statistics.median(ours),
        execute_plan=plan,
        oracle=oracle,
        oracle_s=times[oracle],
        contenders_s=times,
    )
    row["ratio"] = row["execute_s"] / row["oracle_s"]
    log(
        f"{name}: oracle {oracle} {times[oracle]:.3f}s execute {row['execute_s']:.3f}s "
        f"[{plan}] ratio {row['ratio']:.2f}"
    )
    return row


# --------------------------------------------------------------------------- report
def _geo(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def _best_of(row: dict[str, Any], prefix: str, ns: Iterable[int]) -> float:
    want = {f"{prefix} {n}x" for n in ns}
    vals = [v for k, v in row["contenders_s"].items() if any(k.startswith(p) for p in want)]
    return min(vals, default=math.nan)


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, float, str]]:
    """(what, measured, target) for the issue's targets that these rows can check."""
    by = {r["workload"]: r for r in rows if "ratio" in r}
    done = [r for name, r in by.items() if name not in _BEYOND_ISSUE]
    out = []
    if done:
        out.append(("geometric mean execute/oracle", _geo([r["ratio"] for r in done]), "<= 1.05"))
        out.append(("max execute/oracle", max(r["ratio"] for r in done), "<= 1.20"))
    # The target is set at 0.1 us items; x*x, under half of that here, shows the same fixed
    # cost two and a half times as large (reported, outside the issue's workloads).
    for name, goal in (("tiny_0.1us", "<= 1.05"), ("tiny_xx", "none: 0.04 us items")):
        if name in by:
            r = by[name]
            ratio = r["execute_s"] / r["contenders_s"]["serial"]
            out.append((f"{name}: execute / list comprehension", ratio, goal))
    if "sleep_10ms" in by:
        r = by["sleep_10ms"]
        best = _best_of(r, "threads", (8, 16, 32, 64, 128))
        out.append(("sleep: execute / best ThreadPool(8-128)", r["execute_s"] / best, "<= 1.10"))
    if "async_20ms" in by:
        r = by["async_20ms"]
        t32 = r["contenders_s"]["threads 32x1 (asyncio.run)"]
        out.append(("async: ThreadPool(32) / execute", t32 / r["execute_s"], ">= 10"))
    return out


def table(rows: list[dict[str, Any]], load: tuple[float, ...]) -> str:
    """The markdown table, the targets and the load average."""
    lines = [
        "| workload | oracle | execute plan | execute / oracle |",
        "|---|---|---|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['workload']} | | skipped: {r['skipped']} | |")
            continue
        lines.append(
            f"| {r['workload']} | {r['oracle']} ({r['oracle_s']:.3f} s) | {r['execute_plan']} "
            f"({r['execute_s']:.3f} s) | {r['ratio']:.2f} |"
        )
    lines.append("")
    for what, value, goal in targets(rows):
        lines.append(f"- {what}: **{value:.2f}** (target {goal})")
    lines.append(
        f"\nLoad average (1, 5, 15 min) at the start / end: "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} / "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    return "\n".join(lines)


def adaptive_ab(names: list[str], repeats: int) -> None:
    """Interleaved execute runs with and without adaptive chunk sizes; median ratio."""
    from amorsize import executor

    adaptive = dict(executor._ADAPTIVE)
    print("| workload | fixed chunks | adaptive | adaptive / fixed | chunk sizes, re-plans |")
    print("|---|---:|---:|---:|---|")
    for name in names:
        w = ISSUE14[name]
        data = w.make_data()
        times: dict[bool, list[float]] = {False: [], True: []}
        sizes = ""
        for k in range(repeats):
            for on in (k % 2 == 0, k % 2 == 1):  # each goes first half the time
                executor._ADAPTIVE = adaptive if on else {}
                _close_warm_pools()
                dt, (_, report) = _once(w, data, _execute, math.inf)
                times[on].append(dt)
                if on:
                    sizes = f"{report.chunk_sizes}, {len(report.replans)}"
        executor._ADAPTIVE = adaptive
        fixed, ours = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {fixed:.3f} s | {ours:.3f} s | {ours / fixed:.2f} | {sizes} |")


def run(names: list[str], scale: float = 1.0, repeats: int = _REPEATS) -> list[dict[str, Any]]:
    """Measure the named workloads (machine facts measured first, outside the timing)."""
    amorsize.get_system_info()
    # amorsize's re-exports are lazy: load them before the clock starts, as importing a peer
    # does (multiprocessing is loaded already).
    for name in amorsize.__all__:
        getattr(amorsize, name)
    return [measure(n, scale, repeats, print) for n in names]


def test_oracle_table(capsys: Any) -> None:
    """Run the suite and print the table (see the module docstring)."""
    load = os.getloadavg()
    rows = run(list(ISSUE14))
    with capsys.disabled():
        print("\n" + table(rows, load))
    assert all(math.isfinite(r.get("execute_s", 0.0)) for r in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated workload names")
    ap.add_argument("--scale", type=float, default=1.0, help="item count multiplier")
    ap.add_argument("--repeats", type=int, default=_REPEATS)
    ap.add_argument("--json", default="", help="write the rows here")
    ap.add_argument("--adaptive-ab", type=int, default=0, metavar="N")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(ISSUE14)
    load = os.getloadavg()
    if a.adaptive_ab:
        amorsize.get_system_info()
        adaptive_ab(names, a.adaptive_ab)
        print(f"\nLoad average at the start / end: {load} / {os.getloadavg()}")
        return
    t = time.perf_counter()
    rows = run(names, a.scale, a.repeats)
    print(table(rows, load))
    print(f"\n(total {time.perf_counter() - t:.0f} s)")
    if a.json:
        doc = {
            "load_start": load,
            "load_end": os.getloadavg(),
            "rows": rows,
            "targets": [{"what": w, "value": v, "target": g} for w, v, g in targets(rows)],
        }
        Path(a.json).write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
