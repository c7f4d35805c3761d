"""Circuit breaker overhead: amorsize against a bare call, a hand-written breaker and peers.

Every implementation guards the same function and is measured in the same run:

* ``closed``: ``def f(x): return x + 1`` through a closed breaker (the common case);
* ``open``: a call refused by an open breaker, the exception caught (the fail-fast cost).

The peers are pybreaker and circuitbreaker (the ``bench`` extra). Run, then print the
README table (ns per call, and overhead over the bare call)::

    pytest benchmarks/bench_circuit.py -m benchmark --benchmark-json=/tmp/circuit.json
    python benchmarks/bench_circuit.py /tmp/circuit.json
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from amorsize import CircuitBreaker, CircuitBreakerPolicy, CircuitOpenError

CALLS = 1000  # calls per measured round, made directly in a loop as user code makes them
IMPLEMENTATIONS = ["bare", "hand_written", "amorsize", "pybreaker", "circuitbreaker"]


def f(x: int) -> int:
    return x + 1


class Down(Exception):
    """Opens the breakers in the ``open`` scenario."""


def down(x: int) -> int:
    raise Down


class _HandWritten:
    """The least a correct breaker must do on the closed path: check, call, reset the count."""

    def __init__(self, func: Callable[[int], int], threshold: int = 5) -> None:
        self.func = func
        self.failures = 0
        self.threshold = threshold

    def __call__(self, x: int) -> int:
        if self.failures >= self.threshold:
            raise CircuitOpenError("hand", 60.0)
        try:
            result = self.func(x)
        except Exception:
            self.failures += 1
            raise
        self.failures = 0
        return result


def _guard(name: str, func: Callable[[int], int]) -> tuple[Callable[[int], int], type]:
    """``func`` guarded by implementation ``name`` (threshold 5, 60 s), and its open error."""
    if name == "bare":
        return func, CircuitOpenError
    if name == "hand_written":
        return _HandWritten(func), CircuitOpenError
    if name == "amorsize":
        breaker = CircuitBreaker(CircuitBreakerPolicy(failure_threshold=5, timeout=60.0))
        return breaker(func), CircuitOpenError
    if name == "pybreaker":
        import pybreaker

        pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
        return pb(func), pybreaker.CircuitBreakerError
    if name == "circuitbreaker":
        import circuitbreaker

        cb = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=60)
        return cb(func), circuitbreaker.CircuitBreakerError
    raise ValueError(name)


def _loop(g: Callable[[int], int], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            g(1)

    return run


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_closed(benchmark: Any, name: str) -> None:
    """A closed breaker around a function that succeeds: 1,000 calls per round."""
    g, _ = _guard(name, f)
    assert g(1) == 2
    benchmark.group = "circuit closed (1,000 calls)"
    benchmark.pedantic(_loop(g, CALLS), rounds=200, iterations=1, warmup_rounds=5)


@pytest.mark.parametrize("name", [n for n in IMPLEMENTATIONS if n != "bare"])
def test_open(benchmark: Any, name: str) -> None:
    """An open breaker refusing a call, the refusal caught: 1,000 calls per round."""
    g, open_error = _guard(name, down)
    for _ in range(5):
        with contextlib.suppress(Down, open_error):
            g(1)

    def run() -> None:
        for _ in range(CALLS):
            with contextlib.suppress(open_error):
                g(1)

    with pytest.raises(open_error):
        g(1)
    benchmark.group = "circuit open, call refused (1,000 calls)"
    benchmark.pedantic(run, rounds=100, iterations=1, warmup_rounds=3)


def _table(path: str) -> str:
    data = json.loads(Path(path).read_text())
    per: dict[str, dict[str, float]] = {}
    for b in data["benchmarks"]:
        scenario = "closed" if b["name"].startswith("test_closed") else "open"
        per.setdefault(scenario, {})[b["param"]] = b["stats"]["min"] / CALLS * 1e9
    lines = [
        "| implementation | closed, ns/call | overhead over bare | open (refused), ns/call |",
        "|---|---:|---:|---:|",
    ]
    bare = per["closed"]["bare"]
    for name in IMPLEMENTATIONS:
        closed = per["closed"].get(name, float("nan"))
        opened = per.get("open", {}).get(name)
        lines.append(
            f"| {name} | {closed:,.0f} | {closed - bare:+,.0f} ns |"
            f" {'-' if opened is None else f'{opened:,.0f}'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table(sys.argv[1]))
