"""What OpenTelemetry costs: the retry success path, a failed attempt, an ``execute`` run.

Three telemetry modes, measured in the same run:

* ``sdk``: an OpenTelemetry SDK tracer and meter provider is set (in-memory reader and
  exporter, so that no I/O is measured);
* ``no-provider``: the API is installed but no provider is set (its proxies);
* ``api-absent``: what an environment without ``opentelemetry-api`` runs: no retry hook
  installed, no run observer.

Groups: ``with_retry`` success path (1,000 calls per round: must not differ between modes,
the hook is only read after a failure), a call failing once then succeeding (the hook runs),
and ``execute`` of 1,000 cheap items, serial and on two threads (per-run cost).

Run with pytest-benchmark::

    pytest benchmarks/bench_telemetry.py -m benchmark --benchmark-json=/tmp/tel.json
    python benchmarks/bench_telemetry.py /tmp/tel.json

or interleaved (each round measures every mode in turn, so load drifts hit all alike;
medians and ratios to ``api-absent``)::

    python benchmarks/bench_telemetry.py
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from amorsize import _core, _telemetry, execute, set_testing, with_retry

MODES = ("api-absent", "no-provider", "sdk")
CALLS = 1000
ITEMS = 1000


@functools.cache
def _providers() -> tuple[Any, Any]:
    # One pair for the whole benchmark, as an application has: instruments are built once.
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return tracer, MeterProvider(metric_readers=[InMemoryMetricReader()])


@contextlib.contextmanager
def telemetry(mode: str) -> Iterator[None]:
    """Run the body in ``mode`` (see the module docstring), then restore."""
    hook = _core._set_retry_event_hook(None if mode == "api-absent" else _telemetry.retry_event)
    installed = _telemetry._installed
    if mode == "api-absent":
        _telemetry._installed = False  # run_observer: no observer, as without the API
    overrides = _telemetry.set_providers(*(_providers() if mode == "sdk" else (None, None)))
    try:
        yield
    finally:
        _telemetry.set_providers(*overrides)
        _telemetry._installed = installed
        _core._set_retry_event_hook(hook)


def plus_one(x: int) -> int:
    return x + 1


class FailsEveryOther:
    """Fails every second call: each logical call fails once, then succeeds on the retry."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, x: int) -> int:
        self.n += 1
        if self.n % 2:
            raise ConnectionError("transient")
        return x + 1


def _calls(f: Callable[[int], int]) -> Callable[[], None]:
    def run() -> None:
        for _ in range(CALLS):
            f(1)

    return run


def workloads() -> dict[str, Callable[[], Any]]:
    """The measured bodies, by group name."""
    ok = with_retry(plus_one, max_retries=3, initial_delay=0.0)
    once = with_retry(FailsEveryOther(), max_retries=3, initial_delay=0.0)
    return {
        "retry success path (1,000 calls)": _calls(ok),
        "retry fail once (1,000 calls)": _calls(once),
        "execute serial (1,000 items)": lambda: execute(
            plus_one, range(ITEMS), backend="serial"
        ),
        "execute threads x2 (1,000 items)": lambda: execute(
            plus_one, range(ITEMS), backend="threads", n_jobs=2, chunksize=100
        ),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group", list(workloads()))
def test_telemetry_cost(benchmark: Any, group: str, mode: str) -> None:
    """One group in one mode (pytest-benchmark groups them for the comparison)."""
    benchmark.group = group
    body = workloads()[group]
    with telemetry(mode), set_testing(True):
        benchmark(body)


def interleaved(rounds: int = 30) -> dict[str, dict[str, float]]:
    """Median seconds per body, each round timing every mode in turn."""
    bodies = workloads()
    times: dict[str, dict[str, list[float]]] = {g: {m: [] for m in MODES} for g in bodies}
    with set_testing(True):
        for r in range(rounds):
            # Each mode goes first in turn; no collection inside a timing (the SDK's
            # garbage must not be charged to whichever mode runs next).
            modes = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
            for group, body in bodies.items():
                for mode in modes:
                    with telemetry(mode):
                        gc.collect()
                        gc.disable()
                        t0 = time.perf_counter()
                        body()
                        times[group][mode].append(time.perf_counter() - t0)
                        gc.enable()
    return {g: {m: statistics.median(v) for m, v in ms.items()} for g, ms in times.items()}


def _print(medians: dict[str, dict[str, float]]) -> None:
    print(f"{'group':36} " + " ".join(f"{m:>22}" for m in MODES))
    for group, by_mode in medians.items():
        base = by_mode["api-absent"]
        cells = [f"{by_mode[m] * 1e6:9.1f} us ({by_mode[m] / base:5.3f}x)" for m in MODES]
        print(f"{group:36} " + " ".join(f"{c:>22}" for c in cells))


def _from_json(path: Path) -> dict[str, dict[str, float]]:
    data = json.loads(path.read_text())
    out: dict[str, dict[str, float]] = {}
    for b in data["benchmarks"]:
        out.setdefault(b["group"], {})[b["params"]["mode"]] = b["stats"]["median"]
    return out


if __name__ == "__main__":
    _print(_from_json(Path(sys.argv[1])) if len(sys.argv) > 1 else interleaved())
