"""A serial plan against the obvious alternative, measured in the same run.

``execute(f, data)`` on 200,000 ints against ``[f(x) for x in data]``, and ``execute_iter``
against a generator expression, on a list and on a generator; sampling and the decision are
included, as a user sees them. Generators are drained with ``deque(maxlen=0)`` on both
sides. Two item functions (serial is the plan for both): ``mix``, a multiplicative hash of
~0.1 us, the item size issue 14 sets its target at, and ``square`` (``x * x``, ~0.04 us
here), where the same fixed cost weighs two and a half times as much.

Run (three times on a noisy machine), then print the ratios (min and median)::

    pytest benchmarks/bench_serial.py -m benchmark --benchmark-json=/tmp/serial1.json
    python benchmarks/bench_serial.py /tmp/serial1.json [/tmp/serial2.json ...]

pytest-benchmark runs each contender's rounds back to back, so load that changes between
contenders shows in the ratio; ``python benchmarks/bench_serial.py --interleaved [ROUNDS]``
times the contenders in interleaved rounds instead (each round runs every contender once).
``--item square`` (after ``--interleaved ROUNDS``) times ``x * x`` instead of ``mix``;
``--cpu`` reads this process's CPU time instead of the wall clock: on a shared machine the
time other processes take is then left out (a serial plan runs in this process, so
nothing of it is lost; a plan that started workers would be).

``--plan-cold [ROUNDS]`` times the fixed cost alone (see ``_plan_cold``).

To compare two builds on a shared machine, alternate them, e.g. three times each::

    for i in 1 2 3; do for py in /work/venv-main/bin/python venv/bin/python; do
        $py benchmarks/bench_serial.py --interleaved 30 --cpu; done; done
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from workloads import mix, square

from amorsize import execute, execute_iter

N = 200_000
DATA = list(range(N))


ITEMS: dict[str, Callable[[int], int]] = {"mix": mix, "square": square}


def contenders(f: Callable[[int], int]) -> dict[str, Callable[[], Any]]:
    """Every contender, each a call that runs ``f`` over ``DATA`` once."""
    return {
        "listcomp": lambda: [f(x) for x in DATA],
        "execute": lambda: execute(f, DATA),
        "genexp": lambda: deque((f(x) for x in DATA), maxlen=0),
        "execute_iter": lambda: deque(execute_iter(f, DATA), maxlen=0),
        "genexp_generator": lambda: deque((f(x) for x in iter(DATA)), maxlen=0),
        "execute_iter_generator": lambda: deque(execute_iter(f, iter(DATA)), maxlen=0),
    }


# Each amorsize contender and the reference it must stay within 5 % of.
PAIRS = {
    "execute": "listcomp",
    "execute_iter": "genexp",
    "execute_iter_generator": "genexp_generator",
}


@pytest.mark.parametrize("item", list(ITEMS))
@pytest.mark.parametrize("name", list(contenders(mix)))
def test_tiny_serial(benchmark: Any, name: str, item: str) -> None:
    """One contender on a tiny workload (the plan is serial)."""
    fn = contenders(ITEMS[item])[name]
    if name.startswith("execute"):
        _, plan = execute(ITEMS[item], DATA, return_plan=True)
        assert plan.backend == "serial", plan
    benchmark.group = f"serial plan: {item} over {N:,} ints"
    benchmark.pedantic(fn, rounds=30, iterations=1, warmup_rounds=2)


def _ratios(paths: list[str]) -> list[str]:
    """Per pair: min and median of amorsize's time over its reference's, per run."""
    lines = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            stats = {
                (b["params"]["item"], b["params"]["name"]): b["stats"]
                for b in json.load(f)["benchmarks"]
            }
        for item in ITEMS:
            for ours, ref in PAIRS.items():
                lo = stats[item, ours]["min"] / stats[item, ref]["min"]
                mid = stats[item, ours]["median"] / stats[item, ref]["median"]
                lines.append(f"{path}: {item} {ours}/{ref}: min {lo:.3f}, median {mid:.3f}")
    return lines


def _interleaved(
    rounds: int, clock: Callable[[], float] = time.perf_counter, f: Callable[[int], int] = mix
) -> list[str]:
    """The same ratios from interleaved rounds in this process (min and median).

    Each pair takes turns on its own, first one then the other ahead: what ran before a
    contender changes its time (a list comprehension that follows a generator contender
    allocates its 200,000 results from fresh memory and took ~15 % longer than one that
    follows ``execute``, which had freed a list of the same size just before).
    """
    runs = contenders(f)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm: machine facts read, functions pickled once
    for ours, ref in PAIRS.items():
        for k in range(rounds):
            for name in (ref, ours) if k % 2 == 0 else (ours, ref):
                t0 = clock()
                runs[name]()
                times[name].append(clock() - t0)
    return [
        f"{ours}/{ref}: min {min(times[ours]) / min(times[ref]):.3f}, median "
        f"{statistics.median(times[ours]) / statistics.median(times[ref]):.3f}"
        for ours, ref in PAIRS.items()
    ]


def _plan_cold(rounds: int, f: Callable[[int], int] = mix) -> str:
    """The fixed cost alone: ``execute``'s plan (sampling and the decision, on a plain
    call) timed right after a list comprehension over ``DATA``, as a user's loop leaves
    the caches; and the same plan when the caller fixes ``backend="serial"``.

    Steadier than the ratios (about +-0.03 ms between processes against +-0.2 ms), so it
    compares two builds' fixed cost (alternate them, as above); it reads private names.
    """
    from amorsize.executor import _Execution, _plain_options, _RunOptions

    fixed = _RunOptions.build(
        "execute", f, DATA, n_jobs=None, chunksize=None, backend="serial", retry=None,
        on_error="raise", progress=False, verbose=False, client=None, checkpoint=None,
        dead_letter=None, circuit_breaker=None, observers=None,
    )  # fmt: skip
    medians = []
    for opts in (_plain_options(False, False), fixed):
        _Execution(f, DATA, opts, one_block=True)._begin()  # machine facts read once
        times = []
        for _ in range(rounds):
            out = [f(x) for x in DATA]
            del out
            t0 = time.perf_counter()
            _Execution(f, DATA, opts, one_block=True)._begin()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times) * 1e3)
    return f"plan after a 200k-item loop: {medians[0]:.3f} ms, serial given: {medians[1]:.3f} ms"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plan-cold"]:
        print(_plan_cold(int(sys.argv[2]) if len(sys.argv) > 2 else 61))
        sys.exit(0)
    if sys.argv[1:2] == ["--interleaved"]:
        rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 30
        flags = sys.argv[3:]
        clock = time.process_time if "--cpu" in flags else time.perf_counter
        item = flags[flags.index("--item") + 1] if "--item" in flags else "mix"
        for line in _interleaved(rounds, clock, ITEMS[item]):
            print(f"{item} {line}")
        sys.exit(0)
    for line in _ratios(sys.argv[1:]):
        print(line)
    if len(sys.argv) > 2:
        print("(runs:", len(sys.argv) - 1, "; median of the medians per pair below)")
        for item in ITEMS:
            for ours, ref in PAIRS.items():
                meds = [float(x.split("median ")[1]) for x in _ratios(sys.argv[1:])
                        if f" {item} {ours}/{ref}:" in x]  # fmt: skip
                print(f"{item} {ours}/{ref}: {statistics.median(meds):.3f}")
