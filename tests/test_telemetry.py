"""OpenTelemetry spans and metrics (issue 16 item 1), read with the real SDK's in-memory
span exporter and metric reader: no mocks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

from amorsize import (
    CircuitBreaker,
    CircuitBreakerPolicy,
    CircuitOpenError,
    RateLimiter,
    RetryBudget,
    RetryExhaustedError,
    RetryPolicy,
    _core,
    _telemetry,
    execute,
    execute_iter,
    retry_call,
    set_testing,
    with_retry,
)

FUNCTION = "code.function.name"


class Otel:
    """An SDK tracer and meter provider, in memory, handed to amorsize for one test."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def metric(self, name: str) -> Any:
        """The metric ``name`` (None if nothing was recorded)."""
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        return m
        return None

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """``(attributes, value)`` of each data point (a histogram's value: its count)."""
        m = self.metric(name)
        if m is None:
            return []
        return [
            (dict(p.attributes or {}), getattr(p, "value", None) or getattr(p, "count", None))
            for p in m.data.data_points
        ]

    def total(self, name: str) -> int:
        return sum(v for _, v in self.points(name))


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    previous = _telemetry.set_providers(o.tracer_provider, o.meter_provider)
    try:
        yield o
    finally:
        _telemetry.set_providers(*previous)


def fail_on_three(x: int) -> int:
    if x % 10 == 3:
        raise ValueError(f"bad {x}")
    return x


class Flaky:
    """Raises ConnectionError for its first ``failures`` calls, then returns ``x``."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def __call__(self, x: int = 1) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("transient")
        return x


# --- execute: the run span and the run's metrics ----------------------------------------------
@pytest.mark.parametrize("backend", ["serial", "threads"])
def test_run_span_carries_plan_counts_and_times(otel: Otel, backend: str) -> None:
    """One span per run: plan, item counts, measured seconds; metrics agree with the report."""
    jobs = 1 if backend == "serial" else 2
    _, report = execute(
        fail_on_three, range(40), backend=backend, n_jobs=jobs, chunksize=5,
        on_error="collect", return_plan=True,
    )  # fmt: skip
    (span,) = otel.spans("amorsize.execute")
    a = span.attributes or {}
    assert a["amorsize.plan.backend"] == backend and a["amorsize.plan.n_jobs"] == jobs
    assert a["amorsize.plan.chunksize"] == 5 and a["amorsize.plan.reason"] == report.reason
    assert (a["amorsize.items"], a["amorsize.items.completed"], a["amorsize.items.failed"]) == (
        40, 36, 4,
    )  # fmt: skip
    assert a["amorsize.run.measured_seconds"] == report.wall_seconds > 0
    assert a[FUNCTION] == f"{__name__}.fail_on_three" and a["amorsize.run.id"]
    attrs = {FUNCTION: f"{__name__}.fail_on_three", "amorsize.backend": backend}
    assert otel.points("amorsize.items.completed") == [(attrs, 36)]
    assert otel.points("amorsize.items.failed") == [(attrs, 4)]
    duration = otel.metric("amorsize.run.duration")
    assert duration.unit == "s" and otel.points("amorsize.run.duration") == [(attrs, 1)]
    assert otel.metric("amorsize.items.completed").unit == "{item}"


def test_predicted_seconds_when_the_optimizer_plans(otel: Otel) -> None:
    """A planned run's span holds the prediction beside the measurement."""
    _, report = execute(abs, range(200), return_plan=True)
    (span,) = otel.spans("amorsize.execute")
    a = span.attributes or {}
    assert report.predicted_seconds is not None
    assert a["amorsize.plan.predicted_seconds"] == pytest.approx(report.predicted_seconds)


@pytest.mark.parametrize("trace_chunks", [False, True])
def test_chunk_spans_only_when_asked(otel: Otel, trace_chunks: bool) -> None:
    """trace_chunks=True: one child span per chunk, under the run's span; else none."""
    execute(
        fail_on_three, range(30), backend="threads", n_jobs=2, chunksize=10,
        on_error="collect", trace_chunks=trace_chunks,
    )  # fmt: skip
    (run,) = otel.spans("amorsize.execute")
    chunks = otel.spans("amorsize.chunk")
    if not trace_chunks:
        assert chunks == []
        return
    got = sorted(
        (c.attributes["amorsize.chunk.start"], c.attributes["amorsize.chunk.size"],
         c.attributes["amorsize.chunk.failed"])
        for c in chunks if c.attributes is not None
    )  # fmt: skip
    assert got == [(0, 10, 1), (10, 10, 1), (20, 10, 1)]
    assert all(c.parent is not None and c.parent.span_id == run.context.span_id for c in chunks)
    assert all(c.end_time >= c.start_time >= run.start_time for c in chunks)  # type: ignore[operator]


def test_execute_iter_counts_every_item(otel: Otel) -> None:
    """execute_iter reports like execute; per-chunk counts add up to the items."""
    assert list(execute_iter(abs, iter(range(50)), backend="threads", n_jobs=2, chunksize=7)) == (
        list(range(50))
    )
    assert otel.total("amorsize.items.completed") == 50
    assert len(otel.spans("amorsize.execute")) == 1


def test_a_run_that_raises_is_an_error_span(otel: Otel) -> None:
    """The run's error: span status ERROR with the exception; duration tagged error.type."""
    with pytest.raises(ValueError, match="bad 3"):
        execute(fail_on_three, range(10), backend="serial")
    (span,) = otel.spans("amorsize.execute")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "ValueError"
    assert any(e.name == "exception" for e in span.events)
    ((attrs, count),) = otel.points("amorsize.run.duration")
    assert attrs["error.type"] == "ValueError" and count == 1


def test_retried_items_of_a_serial_run_are_counted(otel: Otel) -> None:
    """execute(retry=...) in the calling process: its retries reach the retry metrics."""
    flaky = Flaky(2)
    with set_testing(True):
        assert execute(flaky, [5], backend="serial", retry=RetryPolicy(max_retries=3)) == [5]
    assert otel.total("amorsize.retry.attempts") == 2


# --- retry, circuit breaker and the service-job hooks ----------------------------------------
def test_retries_and_exhausted_calls_per_function(otel: Otel) -> None:
    """amorsize.retry.attempts / .exhausted, tagged with the function's qualified name."""
    flaky = with_retry(Flaky(2), max_retries=3, initial_delay=0.0)
    hopeless = with_retry(Flaky(100), max_retries=1, initial_delay=0.0)
    assert flaky(7) == 7
    with pytest.raises(Exception, match="gave up after 2 attempts"):
        hopeless()
    name = _core.callable_name(flaky.__wrapped__)
    error = {"error.type": "ConnectionError"}
    assert otel.points("amorsize.retry.attempts") == [({FUNCTION: name, **error}, 3)]
    assert otel.points("amorsize.retry.exhausted") == [({FUNCTION: name, **error}, 1)]
    assert otel.metric("amorsize.retry.attempts").unit == "{retry}"


def test_successful_calls_record_nothing(otel: Otel) -> None:
    """The success path never reaches telemetry: no retry metric at all."""
    ok = with_retry(abs, max_retries=3)
    assert [ok(-i) for i in range(100)] == list(range(100))
    assert otel.metric("amorsize.retry.attempts") is None
    assert otel.metric("amorsize.retry.exhausted") is None


def test_circuit_transitions_and_refusals(otel: Otel) -> None:
    """State changes tagged with the new state; calls refused while open are counted."""
    now = [100.0]
    breaker = CircuitBreaker(
        CircuitBreakerPolicy(failure_threshold=2, success_threshold=1, timeout=10.0),
        name="db", clock=lambda: now[0],
    )  # fmt: skip
    guarded = breaker(Flaky(2))
    for _ in range(2):
        with pytest.raises(ConnectionError):
            guarded()
    for _ in range(3):
        with pytest.raises(CircuitOpenError):
            guarded()
    now[0] += 10.0
    assert guarded(1) == 1  # the probe closes it again
    states = {a["amorsize.circuit.state"]: v for a, v in otel.points("amorsize.circuit.transitions")}
    assert states == {"open": 1, "half-open": 1, "closed": 1}
    assert otel.points("amorsize.circuit.refusals") == [({"amorsize.circuit.name": "db"}, 3)]


def test_rate_limit_wait_and_budget_refusal_helpers(otel: Otel) -> None:
    """The hooks the rate limiter and the retry budget call: a histogram in s, a counter."""
    _telemetry.record_rate_limit_wait(0.25, "api")
    _telemetry.record_rate_limit_wait(0.5, "api")
    _telemetry.record_budget_refusal("jobs.fetch")
    wait = otel.metric("amorsize.rate_limit.wait")
    assert wait.unit == "s"
    (point,) = wait.data.data_points
    assert (dict(point.attributes), point.count, point.sum) == (
        {"amorsize.rate_limit.name": "api"}, 2, 0.75,
    )  # fmt: skip
    assert point.explicit_bounds[0] == 0.001  # seconds-scale buckets, not the SDK's ms ones
    assert otel.points("amorsize.retry_budget.refusals") == [({FUNCTION: "jobs.fetch"}, 1)]


def test_limiter_waits_and_budget_refusals_reach_the_meters(otel: Otel) -> None:
    """A RateLimiter's waits and a RetryBudget's refusals are recorded by the real objects."""
    now = [0.0]
    limiter = RateLimiter(
        10, burst=1, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    for _ in range(4):
        limiter.acquire()
    (point,) = otel.metric("amorsize.rate_limit.wait").data.data_points
    assert point.count == 2 and point.sum == pytest.approx(0.2)

    budget = RetryBudget(ratio=0.0, min_per_second=0.0, ttl=1.0)
    policy = RetryPolicy(max_retries=3, initial_delay=0.0, budget=budget)

    def fetch() -> None:
        raise ConnectionError("down")

    with pytest.raises(RetryExhaustedError) as info:
        retry_call(fetch, policy=policy)
    assert info.value.reason == "budget"
    assert [n for _, n in otel.points("amorsize.retry_budget.refusals")] == [1]
    assert [n for _, n in otel.points("amorsize.retry.exhausted")] == [1]


# --- off when nobody asked ---------------------------------------------------------------------
def test_no_provider_no_observer() -> None:
    """Without a configured provider (the API's proxies), execute gets no telemetry observer."""
    previous = _telemetry.set_providers(None, None)
    try:
        assert _telemetry.run_observer(trace_chunks=True) is None
        assert execute(abs, [-1, -2], backend="serial") == [1, 2]
    finally:
        _telemetry.set_providers(*previous)


def test_without_the_api_nothing_is_hooked() -> None:
    """opentelemetry not importable: no retry hook installed, no observer, runs as before."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = None  # what an environment without the API sees
        import amorsize
        from amorsize import _core, _telemetry
        assert amorsize.with_retry(abs)(-3) == 3
        assert not _telemetry.api_installed()
        assert _core._set_retry_event_hook(None) is None
        assert _telemetry.run_observer(True) is None
        assert amorsize.execute(abs, [-1], backend="serial", trace_chunks=True) == [1]
        assert not any(m.startswith("opentelemetry") for m in sys.modules if sys.modules[m])
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_trace_chunks_must_be_a_bool(bad: object) -> None:
    """trace_chunks is checked once, with a message naming it."""
    with pytest.raises(TypeError, match="trace_chunks"):
        execute(abs, [1], backend="serial", trace_chunks=bad)  # type: ignore[arg-type]


def test_importing_amorsize_does_not_import_opentelemetry() -> None:
    """With the API installed, retry and the executor load no opentelemetry module until a
    provider exists (the lookup reads the namespace package's folders)."""
    code = textwrap.dedent(
        """
        import sys
        import amorsize
        from amorsize import _telemetry
        assert amorsize.with_retry(abs)(-3) == 3
        assert amorsize.execute(abs, [-1], backend="serial") == [1]
        assert _telemetry.api_installed()
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
