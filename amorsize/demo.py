"""The built-in demonstrations behind ``amorsize demo`` and ``amorsize bench``.

``run_demo`` runs three contrasting workloads through ``execute`` (which asks ``optimize``
first, then runs the plan) and prints, for each, the decision, the predicted time, the
measured time and, for comparison, the measured time of a plain serial run. Both are timed
in a few rounds, interleaved (alternating which goes first) so that both see the same
background load, and their medians are compared; a serial plan runs the same loop as the
baseline, so its row says it ties serial instead of printing a ratio of noise:

* tiny items (``x * x``): no parallel plan can pay its overhead, serial wins;
* CPU-bound pure-Python items of ~2 ms: processes run them on every usable core;
* sleeping items (~10 ms of waiting, as I/O would): many threads overlap the waits.

Its workload functions live at module level so that process workers import them by name.
The whole demo takes about 10 s on a 2-core machine (3 s with ``baseline=False``).

``run_bench`` times a retry-decorated function that succeeds, for amorsize and each
installed peer (tenacity, backoff, stamina, opnieuw), side by side in one process.

>>> run_demo()   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from amorsize._format import format_seconds

__all__ = ["DemoResult", "Workload", "cpu_item", "run_bench", "run_demo", "sleep_item",
           "tiny_item", "workloads"]

# ~2 ms of pure-Python work per item on a 2.5 GHz core (CPython 3.11): slow enough that
# two process workers pay off, fast enough that the demo stays short.
_CPU_LOOPS = 30_000
# Sleep per I/O-like item: long beside thread overheads (tens of microseconds).
_SLEEP_S = 0.01
# Rounds of (execute, serial loop) per workload when comparing: the median of three
# interleaved runs is robust to one disturbed run on a busy machine.
_ROUNDS = 3
# ... but a row whose first round takes under _SHORT_ROUND_S gets _SHORT_ROUNDS: on a busy
# machine one preemption is a large share of a 20 ms run, and two of three such runs hit
# made the tiny row read 228 ms against 124 ms serial (two CPU hogs beside it, load 6).
_SHORT_ROUND_S = 0.5
_SHORT_ROUNDS = 7
# One timed block in ``run_bench``: long beside the timer's resolution, short enough that
# many blocks interleave within the time budget.
_BLOCK_S = 0.02


def tiny_item(x: int) -> int:
    """A microsecond-scale item: far cheaper than sending it to any worker.

    >>> tiny_item(3)
    9
    """
    return x * x


def cpu_item(seed: int) -> int:
    """About 2 ms of pure-Python arithmetic (holds the GIL throughout).

    >>> 0 <= cpu_item(1) < 1_000_003
    True
    """
    total = seed
    for i in range(_CPU_LOOPS):
        total = (total * 31 + i) % 1_000_003
    return total


def sleep_item(x: int) -> int:
    """Waits ~10 ms without using the CPU, like a network or disk call.

    >>> sleep_item(4)
    4
    """
    time.sleep(_SLEEP_S)
    return x


@dataclass(frozen=True)
class Workload:
    """One demo workload: a name, a function, its items and what to expect.

    >>> Workload("squares", tiny_item, range(3), "serial").func(2)
    4
    """

    name: str
    func: Callable[[int], int]
    data: Sequence[int]
    expect: str


def workloads() -> list[Workload]:
    """The three demo workloads, sized so that each runs in about a second or less.

    >>> [w.func.__name__ for w in workloads()]
    ['tiny_item', 'cpu_item', 'sleep_item']
    """
    return [
        Workload("tiny items (x * x)", tiny_item, range(200_000),
                 "serial: no worker can be fed faster than the parent computes"),
        Workload("CPU-bound (~2 ms of Python)", cpu_item, range(300),
                 "processes: Python bytecode runs in parallel only in separate processes"),
        Workload("I/O-bound (~10 ms waits)", sleep_item, range(200),
                 "many workers, far more than cores (threads): waits overlap"),
    ]


@dataclass(frozen=True)
class DemoResult:
    """What one workload's run decided and measured (times in seconds).

    >>> DemoResult("tiny", "serial", "too small", 0.01, 0.012, 0.011, True).plan
    'serial'
    """

    name: str
    plan: str
    reason: str
    predicted: float | None
    measured: float
    serial: float | None
    correct: bool
    rounds: int = 1

    @property
    def versus_serial(self) -> str:
        """How the run compares with the serial loop: ``"ties"`` for a serial plan (it runs
        the same loop), else the speedup (median serial time / median measured time)."""
        if self.plan == "serial":
            return "ties"
        if self.serial is None or self.measured <= 0:
            return ""
        return _ratio(self.serial / self.measured)


_TIES = (
    "ties serial (the plan is serial: execute runs the same loop as the baseline, plus "
    "the sampling and the decision, whose sampled results are reused)"
)


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 1 else f"{x:.1f}x"


#: The plan name of a run whose every item ran while sampling (waiting items start the next
#: ones on threads at once): nothing was left to plan, so it does not tie serial.
ALL_SAMPLED = "all ran in the sample"


def _plan_name(report: Any) -> str:
    if report.items and report.reused >= report.items:
        return ALL_SAMPLED
    if report.backend == "serial":
        return "serial"
    return f"{report.backend} x{report.n_jobs}, chunks of {report.chunksize}"


def run_demo(*, baseline: bool = True, out: Any = None) -> list[DemoResult]:
    """Optimize and execute each workload; print the decisions and the timings.

    ``baseline=False`` skips the serial comparison runs (faster). Returns one
    ``DemoResult`` per workload; ``correct`` checks the results against serial ones.

    >>> [r.plan for r in run_demo(baseline=False)]   # doctest: +SKIP
    ['serial', 'processes x2, chunks of 4', 'threads x64, chunks of 1']
    """
    from amorsize.system import get_system_info

    out = sys.stdout if out is None else out

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say("amorsize demo: the same call, execute(func, data), on three contrasting workloads.")
    say("Each run samples a few items, predicts every plan's wall time on this machine,")
    say("picks the fastest (parallel only if clearly faster than serial) and runs it.")
    # Read (or, the first time on this machine, measure) the machine facts up front, so
    # that the one-off measurement does not count in the first workload's time.
    info = get_system_info()
    how = "read from the cache" if info.from_cache else (
        f"measured now in {format_seconds(info.measured_seconds)}, once per machine")
    say(f"Machine: {info.usable_cores:g} usable cores, start method {info.start_method} ({how}).")
    rows = [_run_workload(number, w, baseline, say) for number, w in enumerate(workloads(), 1)]
    say()
    for line in _table(rows, baseline):
        say(line)
    say()
    say("Times include the sampling and the decision. Try it on your own function:")
    say("  amorsize optimize mymodule:work --data-range 1000")
    say("  amorsize execute mymodule:work --data-file items.jsonl --progress -o results.jsonl")
    return rows


def _run_workload(
    number: int, w: Workload, baseline: bool, say: Callable[[str], None]
) -> DemoResult:
    """Execute one workload as planned, time a serial loop too, and say what happened."""
    say("")
    say(f"{number}. {w.name}: {len(w.data):,} items; expected: {w.expect}")
    runs, serial_times, expected = _timed_rounds(w, _ROUNDS if baseline else 1, baseline)
    rounds = len(runs)
    plan = runs[0][1]
    names = [_plan_name(p) for _, p, _ in runs]
    name = names[0]
    say(f"   plan: {name}")
    say(f"   why: {plan.reason}")
    if len(set(names)) > 1:
        say(f"   (the plan changed with the machine's load between rounds: {', '.join(names)})")
    if expected is None:
        expected = [w.func(x) for x in w.data[:10]]  # a spot check, ~0.1 s at most
    correct = all(r[: len(expected)] == expected and len(r) == len(w.data) for r, _, _ in runs)
    measured = statistics.median(t for _, _, t in runs)
    serial_s = statistics.median(serial_times) if serial_times else None
    row = DemoResult(
        w.name, name, plan.reason, plan.predicted_seconds, measured, serial_s, correct, rounds
    )
    line = f"   predicted {format_seconds(plan.predicted_seconds)}, measured {format_seconds(measured)}"
    if serial_s is not None:
        line += f"; plain serial loop measured {format_seconds(serial_s)}"
        line += f" (medians of {rounds} interleaved rounds): "
        line += _TIES if row.versus_serial == "ties" else f"speedup {row.versus_serial}"
    say(line + ("" if correct else "  RESULTS DIFFER FROM SERIAL"))
    return row


def _timed_rounds(
    w: Workload, rounds: int, baseline: bool
) -> tuple[list[tuple[list[Any], Any, float]], list[float], list[int] | None]:
    """``rounds`` runs of ``execute`` (results, report, seconds) and, with ``baseline``, of
    the serial loop, interleaved and alternating which goes first: both see the same load;
    ``_SHORT_ROUNDS`` when the first round is short (see ``_SHORT_ROUND_S``).

    Every execute run counts its sampling and decision (timed around the whole call).
    """
    from amorsize.executor import execute

    runs: list[tuple[list[Any], Any, float]] = []
    serial_times: list[float] = []
    expected: list[int] | None = None
    k = 0
    while k < rounds:
        for contender in ("execute", "serial") if k % 2 == 0 else ("serial", "execute"):
            t0 = time.perf_counter()
            if contender == "execute":
                results, plan = execute(w.func, w.data, return_plan=True)
                runs.append((results, plan, time.perf_counter() - t0))
            elif baseline:
                expected = [w.func(x) for x in w.data]
                serial_times.append(time.perf_counter() - t0)
        if k == 0 and baseline and runs[0][2] + serial_times[0] < _SHORT_ROUND_S:
            rounds = max(rounds, _SHORT_ROUNDS)
        k += 1
    return runs, serial_times, expected


def _table(rows: list[DemoResult], baseline: bool) -> list[str]:
    """The closing summary table, one line per workload under a header."""
    head = f"{'workload':<30} {'plan':<32} {'predicted':>10} {'measured':>10}"
    if baseline:
        head += f" {'serial':>10} {'speedup':>8}"
    lines = [head]
    for r in rows:
        line = (
            f"{r.name:<30} {r.plan:<32} {format_seconds(r.predicted):>10}"
            f" {format_seconds(r.measured):>10}"
        )
        if r.serial is not None:
            line += f" {format_seconds(r.serial):>10} {r.versus_serial:>8}"
        lines.append(line)
    if baseline:
        lines.append(
            f"(medians of {_ROUNDS} interleaved rounds, {_SHORT_ROUNDS} for rows under"
            f" {_SHORT_ROUND_S:g} s; 'ties': the plan is serial, so execute runs the same loop"
            " as the serial baseline)"
        )
    return lines


# --------------------------------------------------------------------------- bench
def _bare(x: int) -> int:
    return x + 1


def _handwritten(x: int) -> int:
    # The cheapest retry a user could write by hand: a loop around try/except.
    for attempt in range(4):
        try:
            return _bare(x)
        except Exception:
            if attempt == 3:
                raise
    raise AssertionError("unreachable")


def _contenders() -> tuple[list[tuple[str, str, Callable[[int], int]]], list[str]]:
    """(name, version, decorated function) for each available contender; notes on absent ones."""
    from amorsize import _version
    from amorsize.retry import with_retry

    found: list[tuple[str, str, Callable[[int], int]]] = [
        ("bare call", "", _bare),
        ("hand-written try/except", "", _handwritten),
        ("amorsize with_retry", _version.read_version(), with_retry(max_retries=3)(_bare)),
    ]
    notes: list[str] = []

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    def add(name: str, build: Callable[[Any], Callable[[int], int]]) -> None:
        # Imported by name: the peers are optional (the ``bench`` extra), untyped for us.
        try:
            module = importlib.import_module(name)
        except ImportError:
            notes.append(f"{name} is not installed: skipped (pip install {name})")
            return
        found.append((name, version(name), build(module)))

    # Each peer set up the way its documentation shows, retrying any Exception up to
    # 4 attempts in all, like with_retry(max_retries=3).
    add("tenacity", lambda m: m.retry(stop=m.stop_after_attempt(4), reraise=True)(_bare))
    add("backoff", lambda m: m.on_exception(m.expo, Exception, max_tries=4)(_bare))
    add("stamina", lambda m: m.retry(on=Exception, attempts=4)(_bare))
    add("opnieuw", lambda m: m.retry(
        retry_on_exceptions=Exception,
        max_calls_total=4,
        retry_window_after_first_call_in_seconds=60,
    )(_bare))
    return found, notes


def _calibrate(timer: timeit.Timer, target: float) -> int:
    """The call count that takes about ``target`` seconds."""
    number = 1
    while True:
        took = timer.timeit(number)
        if took >= target / 4 or number >= 1 << 24:
            return max(1, round(number * target / max(took, 1e-9)))
        number *= 4


def run_bench(*, seconds: float = 1.0, as_json: bool = False, out: Any = None) -> list[dict[str, Any]]:
    """Per-call cost of a retry-decorated ``f(x) = x + 1`` that succeeds, per contender.

    Each contender is timed in short blocks interleaved with the others, for about
    ``seconds`` each; its best block counts.

    >>> rows = run_bench(seconds=0.05)   # doctest: +SKIP
    >>> rows[2]["contender"], rows[2]["x_amorsize"]   # doctest: +SKIP
    ('amorsize with_retry', 1.0)
    """
    out = sys.stdout if out is None else out
    contenders, notes = _contenders()
    timers = [timeit.Timer("f(1)", globals={"f": f}) for _, _, f in contenders]
    # Short blocks, interleaved: every contender sees the same background load, and the
    # best block per contender is the one least disturbed by other processes.
    block = min(_BLOCK_S, max(seconds / 5, 1e-4))
    numbers = [_calibrate(t, block) for t in timers]
    best = [float("inf")] * len(timers)
    spent = 0.0
    while True:
        for i, (t, n) in enumerate(zip(timers, numbers, strict=True)):
            best[i] = min(best[i], t.timeit(n) / n)
        spent += block
        if spent >= seconds:
            break
    ours = best[2]
    bare = best[0]
    rows = [
        {"contender": name, "version": ver, "ns_per_call": b * 1e9,
         "overhead_ns": (b - bare) * 1e9, "x_amorsize": b / ours if ours > 0 else None}
        for (name, ver, _), b in zip(contenders, best, strict=True)
    ]
    if as_json:
        print(json.dumps({"rows": rows, "notes": notes}, indent=2), file=out)
        return rows
    print(
        f"Retry decorator overhead, success path (f(x) = x + 1), CPython "
        f"{sys.version.split()[0]}; best of interleaved timeit rounds:",
        file=out,
    )
    print(f"{'contender':<26} {'version':<10} {'ns/call':>10} {'overhead':>10} "
          f"{'x amorsize':>11}", file=out)
    for r in rows:
        print(
            f"{r['contender']:<26} {r['version']:<10} {r['ns_per_call']:>10,.0f} "
            f"{r['overhead_ns']:>10,.0f} {r['x_amorsize']:>10.1f}x",
            file=out,
        )
    for note in notes:
        print(f"note: {note}", file=out)
    print(
        "The failure path, async calls and delay computation are compared in the source tree:"
        " pytest benchmarks/bench_retry.py -m benchmark",
        file=out,
    )
    return rows
