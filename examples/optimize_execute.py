"""Decide, then run: ``optimize`` explains the plan, ``execute`` runs it.

Run it with ``python examples/optimize_execute.py`` (about 2 seconds on 2 cores).

1. ``optimize`` on CPU-bound work: the plan, the reason, the ranked alternatives.
2. ``execute`` the same work: results in input order, predicted vs measured time.
3. The plan used by hand with ``multiprocessing.Pool`` (as code written for Pool.map can).
4. ``execute_iter`` on a generator of waiting (I/O-like) items: results stream in order.
5. ``on_error="collect"``: a failing item does not stop the run; it is reported.
"""

from __future__ import annotations

import multiprocessing
import time

from amorsize import ItemFailure, execute, execute_iter, optimize


def crunch(n: int) -> int:
    """About 1 ms of pure-Python arithmetic: CPU-bound, holds the GIL."""
    total = n
    for i in range(15_000):
        total = (total * 31 + i) % 1_000_003
    return total


def wait_and_double(x: int) -> int:
    """Waits 5 ms like a network call would, then answers."""
    time.sleep(0.005)
    return 2 * x


def parse(text: str) -> int:
    """Fails on malformed input, as real parsers do."""
    return int(text)


def main() -> None:
    data = list(range(400))

    print("1. optimize(crunch, 400 items)")
    plan = optimize(crunch, data)
    print(plan.report(alternatives=3))
    print()

    print("2. execute(crunch, 400 items)")
    results, report = execute(crunch, data, return_plan=True)
    assert results == [crunch(x) for x in data]
    print(report)
    print()

    print("3. the same plan handed to multiprocessing.Pool")
    if plan.backend == "processes":
        with multiprocessing.Pool(plan.n_jobs) as pool:
            pooled = pool.map(crunch, plan.data, chunksize=plan.chunksize)
    else:
        pooled = [crunch(x) for x in plan.data]
    assert pooled == results
    print(f"   Pool({plan.n_jobs}).map(crunch, plan.data, chunksize={plan.chunksize}): same results")
    print()

    print("4. execute_iter(wait_and_double, a generator of 200 items)")
    t0 = time.perf_counter()
    first = []
    for i, value in enumerate(execute_iter(wait_and_double, (x for x in range(200)))):
        assert value == 2 * i
        if i < 5:
            first.append(value)
    elapsed = time.perf_counter() - t0
    print(f"   first results {first}, all 200 in {elapsed:.2f} s (serially: about 1.0 s)")
    print()

    print("5. on_error='collect' with a malformed item")
    texts = ["1", "2", "three", "4"]
    parsed, report = execute(parse, texts, on_error="collect", return_plan=True)
    for failure in report.failures:
        print(f"   item {failure.index} ({failure.item!r}) failed: {failure.exception!r}")
    print(f"   results: {[None if isinstance(v, ItemFailure) else v for v in parsed]}")
    print()
    print("done")


if __name__ == "__main__":  # required: process workers re-import this module under spawn
    main()
