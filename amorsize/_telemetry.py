"""OpenTelemetry traces and metrics, when the application has set a provider up.

amorsize never configures OpenTelemetry: it uses the global tracer and meter providers
(``opentelemetry.trace.set_tracer_provider``, ``opentelemetry.metrics.set_meter_provider``)
once the application has set real ones (an SDK provider), and does nothing otherwise.
Without ``opentelemetry-api`` installed, nothing here imports it and the hooks stay unset.

Where the hooks sit, and what each costs::

    retry (compiled)   success: nothing (the hook is read only after a failed attempt)
                       after a failed attempt: retry_event ── amorsize.retry.attempts
                       after the last one:     retry_event ── amorsize.retry.exhausted
    circuit breaker    a transition:           amorsize.circuit.transitions
                       a refused call:         amorsize.circuit.refusals
    execute            a RunObserver (TelemetryObserver), added only when a provider is
                       set: one span per run, chunk spans with trace_chunks=True,
                       amorsize.items.completed / .failed per chunk, amorsize.run.duration
    rate limit, budget record_rate_limit_wait, record_budget_refusal

Instruments (OpenTelemetry semantic-convention style: dotted lower-case names, UCUM units,
``{...}`` annotations for counts) and their attributes:

=============================  =========  ============================================
``amorsize.items.completed``   ``{item}`` ``amorsize.backend``, ``code.function.name``
``amorsize.items.failed``      ``{item}`` ``amorsize.backend``, ``code.function.name``
``amorsize.run.duration``      ``s``      ``amorsize.backend``, ``code.function.name``,
                                          ``error.type`` (a run that raised)
``amorsize.retry.attempts``    ``{retry}`` ``code.function.name``, ``error.type``
``amorsize.retry.exhausted``   ``{call}`` ``code.function.name``, ``error.type``
``amorsize.circuit.transitions`` ``{transition}`` ``amorsize.circuit.name``,
                                          ``amorsize.circuit.state`` (the new state)
``amorsize.circuit.refusals``  ``{call}`` ``amorsize.circuit.name``
``amorsize.rate_limit.wait``   ``s``      ``amorsize.rate_limit.name``
``amorsize.retry_budget.refusals`` ``{call}`` ``code.function.name``
=============================  =========  ============================================
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from amorsize._core import callable_name
from amorsize._log import RUN_ID
from amorsize._observers import RunObserver
from amorsize._timeline import ChunkSpan

__all__ = [
    "TelemetryObserver",
    "api_installed",
    "record_budget_refusal",
    "record_circuit_refusal",
    "record_circuit_transition",
    "record_rate_limit_wait",
    "retry_event",
    "run_observer",
    "set_providers",
]

FUNCTION = "code.function.name"
ERROR_TYPE = "error.type"
BACKEND = "amorsize.backend"

_log = logging.getLogger("amorsize.telemetry")
_installed: bool | None = None
# Providers given by set_providers (tests, or an application keeping its own): they win
# over the global ones.
_tracer_override: Any = None
_meter_override: Any = None
# The instruments of the last meter provider used: (provider, _Meters).
_cache: tuple[Any, _Meters] | None = None
_tracer_cache: tuple[Any, Any] | None = None
# A real global provider, once seen (the API lets an application set it only once), and,
# while there is none, when to look again: the API's getter costs ~2 us (it reads
# os.environ), too much to pay on every failed attempt.
_found: dict[str, Any] = {}
_next_look: dict[str, float] = {}
_LOOK_EVERY_S = 1.0
_METRICS = "opentelemetry.metrics"


def api_installed() -> bool:
    """Whether ``opentelemetry-api`` can be imported (looked up once, never imported here)."""
    global _installed
    if _installed is None:
        try:
            # The namespace package's folders, without importing it (a submodule lookup
            # would): the API is the distribution that puts metrics/ and trace/ there.
            spec = importlib.util.find_spec("opentelemetry")
        except (ImportError, ValueError):
            spec = None
        places = () if spec is None else spec.submodule_search_locations or ()
        _installed = any(os.path.isdir(os.path.join(p, "metrics")) for p in places)
    return _installed


def set_providers(tracer_provider: Any = None, meter_provider: Any = None) -> tuple[Any, Any]:
    """Use these providers rather than the global ones (None: the global one again).

    Returns the previous ``(tracer_provider, meter_provider)`` overrides, so that a caller
    (a test) can restore them.
    """
    global _tracer_override, _meter_override
    previous = (_tracer_override, _meter_override)
    _tracer_override, _meter_override = tracer_provider, meter_provider
    _next_look.clear()  # and look at the global ones again at once
    return previous


def _placeholder(provider: Any) -> bool:
    """The API's stand-ins until a provider is set: proxies and no-op providers."""
    return type(provider).__name__.lstrip("_").startswith(("Proxy", "NoOp", "Default"))


def _provider(override: Any, module: str, getter: str) -> Any:
    """The override, else the global provider once the application has set a real one
    (looked for at most once a second until then)."""
    if override is not None:
        return override
    found = _found.get(module)
    if found is not None:
        return found
    now = time.monotonic()
    if now < _next_look.get(module, 0.0):
        return None
    _next_look[module] = now + _LOOK_EVERY_S
    # Nobody set a provider without importing the module that sets it: a dict lookup.
    mod = sys.modules.get(module)
    if mod is None:
        return None
    provider = getattr(mod, getter)()
    if _placeholder(provider):
        return None
    _found[module] = provider
    return provider


def _tracer() -> Any:
    """The ``amorsize`` tracer of the configured tracer provider, or None (one per provider:
    getting it costs more than the run's span)."""
    global _tracer_cache
    provider = _provider(_tracer_override, "opentelemetry.trace", "get_tracer_provider")
    if provider is None:
        return None
    cache = _tracer_cache
    if cache is not None and cache[0] is provider:
        return cache[1]
    tracer = provider.get_tracer("amorsize", _version())
    _tracer_cache = (provider, tracer)
    return tracer


def _version() -> str:
    from amorsize._version import read_version

    return read_version()


class _Meters:
    """amorsize's instruments on one meter provider (see the module docstring's table)."""

    def __init__(self, provider: Any) -> None:
        meter = provider.get_meter("amorsize", _version())
        counter = meter.create_counter
        self.items_completed = counter(
            "amorsize.items.completed", "{item}", "Items of execute runs that gave a result"
        )
        self.items_failed = counter(
            "amorsize.items.failed", "{item}", "Items of execute runs that failed for good"
        )
        self.run_duration = _histogram(
            meter, "amorsize.run.duration", "Wall time of execute runs, planning included",
            _RUN_BUCKETS,
        )  # fmt: skip
        self.retry_attempts = counter(
            "amorsize.retry.attempts", "{retry}", "Retries made after a failed attempt"
        )
        self.retry_exhausted = counter(
            "amorsize.retry.exhausted", "{call}", "Calls that gave up: attempts or time ran out"
        )
        self.circuit_transitions = counter(
            "amorsize.circuit.transitions", "{transition}", "Circuit breaker state changes"
        )
        self.circuit_refusals = counter(
            "amorsize.circuit.refusals", "{call}", "Calls refused by an open circuit breaker"
        )
        self.rate_limit_wait = _histogram(
            meter, "amorsize.rate_limit.wait", "Time calls waited for a rate limiter",
            _WAIT_BUCKETS,
        )  # fmt: skip
        self.budget_refusals = counter(
            "amorsize.retry_budget.refusals", "{call}", "Retries refused by a retry budget"
        )


# Bucket bounds in seconds (the SDK's default bounds suit milliseconds): runs last from
# milliseconds to hours, rate-limit waits from a millisecond to a minute.
_RUN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)


def _histogram(meter: Any, name: str, description: str, bounds: tuple[float, ...]) -> Any:
    """A histogram in seconds, with bucket bounds that suit it where the API takes them
    (``explicit_bucket_boundaries_advisory``, opentelemetry-api 1.23+)."""
    try:
        return meter.create_histogram(
            name, "s", description, explicit_bucket_boundaries_advisory=list(bounds)
        )
    except TypeError:
        return meter.create_histogram(name, "s", description)


def _meters() -> _Meters | None:
    """The instruments of the configured meter provider, or None. The hooks below call it
    after failures, even on an open breaker's every refusal: without a provider it costs a
    clock read."""
    if _meter_override is None:
        cache = _cache
        if cache is not None and cache[0] is _found.get(_METRICS):
            return cache[1]
        if time.monotonic() < _next_look.get(_METRICS, 0.0):
            return None
    return _meters_of(_provider(_meter_override, _METRICS, "get_meter_provider"))


def _meters_of(provider: Any) -> _Meters | None:
    """The instruments of ``provider``, built once per provider."""
    global _cache
    if provider is None:
        return None
    cache = _cache
    if cache is not None and cache[0] is provider:
        return cache[1]
    try:
        meters = _Meters(provider)
    except Exception:  # telemetry never fails the call it watches
        _log.debug("creating amorsize's instruments failed", exc_info=True)
        return None
    _cache = (provider, meters)
    return meters


def _name_of(func: Any) -> str:
    return str(callable_name(func))


def _add(instrument: Any, value: float, attrs: dict[str, str]) -> None:
    """Count on ``instrument``; telemetry never fails the call it watches (errors: DEBUG)."""
    try:
        instrument.add(value, attrs)
    except Exception:
        _log.debug("recording on %r failed", instrument, exc_info=True)


# The compiled retry loop's stop code when the policy's RetryBudget refused a retry
# (_RETRY_NO_BUDGET in _core_retry.pxi).
_BUDGET_REFUSED = -5.0


def retry_event(func: Any, exc: BaseException | None, attempt: int, delay: float) -> None:
    """The compiled retry loop's hook, after a failed attempt: a retry (``delay`` >= 0,
    seconds before the next attempt) or a call that gave up (``delay`` < 0, the stop code;
    a budget refusal is also counted as one)."""
    meters = _meters()
    if meters is not None:
        error = "retry_on_result" if exc is None else type(exc).__qualname__
        attrs = {FUNCTION: _name_of(func), ERROR_TYPE: error}
        _add(meters.retry_attempts if delay >= 0 else meters.retry_exhausted, 1, attrs)
        if delay == _BUDGET_REFUSED:
            _add(meters.budget_refusals, 1, {FUNCTION: attrs[FUNCTION]})


def record_circuit_transition(name: str, state: str) -> None:
    """Circuit breaker ``name`` entered ``state`` (``"open"``, ``"half-open"``, ``"closed"``)."""
    meters = _meters()
    if meters is not None:
        attrs = {"amorsize.circuit.name": name, "amorsize.circuit.state": state}
        _add(meters.circuit_transitions, 1, attrs)


def record_circuit_refusal(name: str) -> None:
    """Circuit breaker ``name`` refused a call (open, or half-open with its probes busy)."""
    meters = _meters()
    if meters is not None:
        _add(meters.circuit_refusals, 1, {"amorsize.circuit.name": name})


def record_rate_limit_wait(seconds: float, limiter: str | None = None) -> None:
    """A call waited ``seconds`` for rate limiter ``limiter`` (its name, if it has one)."""
    meters = _meters()
    if meters is not None:
        attrs = {} if limiter is None else {"amorsize.rate_limit.name": limiter}
        try:
            meters.rate_limit_wait.record(max(0.0, float(seconds)), attrs)
        except Exception:
            _log.debug("recording a rate-limit wait failed", exc_info=True)


def record_budget_refusal(func_name: str) -> None:
    """A retry budget refused a retry of ``func_name`` (its qualified name)."""
    meters = _meters()
    if meters is not None:
        _add(meters.budget_refusals, 1, {FUNCTION: func_name})


def run_observer(trace_chunks: bool = False) -> RunObserver | None:
    """The observer that reports an ``execute`` run, or None when no provider is set."""
    if not api_installed():
        return None
    tracer, meters = _tracer(), _meters()
    if tracer is None and meters is None:
        return None
    if trace_chunks and tracer is not None:
        return ChunkTracingObserver(tracer, meters)
    return TelemetryObserver(tracer, meters)


class TelemetryObserver(RunObserver):
    """One span per ``execute`` run and the run's metrics (see the module docstring).

    It watches no item: counts come per finished chunk and, at the end, from the run's
    report (items reused from sampling, and the serial plan's single loop, which has no
    chunks), so that a serial plan keeps its fast path.
    """

    def __init__(self, tracer: Any, meters: _Meters | None) -> None:
        self.tracer, self.meters = tracer, meters
        self.span: Any = None
        self.report: Any = None
        self.attrs: dict[str, str] = {}
        self.sent = [0, 0]  # completed, failed items counted so far
        self.t0 = 0.0

    def begin(self, func: Callable[[Any], Any]) -> None:
        """Start the run's span: planning and sampling are part of the run."""
        self.t0 = time.perf_counter()
        self.attrs = {FUNCTION: _name_of(func)}
        if self.tracer is not None:
            self.span = self.tracer.start_span("amorsize.execute", attributes=self.attrs)
            run_id = RUN_ID.get()
            if run_id is not None:
                self.span.set_attribute("amorsize.run.id", run_id)

    def planned(self, report: Any) -> None:
        """The plan is known: the span gets it, metrics get the backend."""
        self.report = report
        self.attrs[BACKEND] = report.backend
        if self.span is not None:
            plan = {
                "amorsize.plan.backend": report.backend,
                "amorsize.plan.n_jobs": report.n_jobs,
                "amorsize.plan.chunksize": report.chunksize,
                "amorsize.plan.reason": report.reason,
            }
            if report.predicted_seconds is not None:
                plan["amorsize.plan.predicted_seconds"] = float(report.predicted_seconds)
            self.span.set_attributes(plan)

    def chunk_finished(self, start: int, size: int, failed: int) -> None:
        """Count a chunk's items as it comes back (long runs show progress)."""
        self._count(size - failed, failed)

    def _count(self, completed: int, failed: int) -> None:
        meters = self.meters
        if meters is None:
            return
        if completed > 0:
            _add(meters.items_completed, completed, self.attrs)
        if failed > 0:
            _add(meters.items_failed, failed, self.attrs)
        self.sent[0] += completed
        self.sent[1] += failed

    def end(self, completed: bool) -> None:
        """Count what chunks did not, record the duration, close the span."""
        # Called in the executor's ``finally``: exc_info is the run's error, if any.
        error = sys.exc_info()[1]
        report = self.report
        # The report's wall time (final by now) is what predicted_seconds compares with.
        seconds = time.perf_counter() - self.t0 if report is None else report.wall_seconds
        if report is not None:
            self._count(report.completed - self.sent[0], report.failed - self.sent[1])
        if self.meters is not None:
            attrs = dict(self.attrs)
            if error is not None:
                attrs[ERROR_TYPE] = type(error).__qualname__
            try:
                self.meters.run_duration.record(seconds, attrs)
            except Exception:
                _log.debug("recording the run's duration failed", exc_info=True)
        if self.span is not None:
            self._close_span(report, seconds, error)

    def _close_span(self, report: Any, seconds: float, error: BaseException | None) -> None:
        span = self.span
        span.set_attribute("amorsize.run.measured_seconds", seconds)
        if report is not None:
            span.set_attributes({
                "amorsize.items": report.items,
                "amorsize.items.completed": report.completed,
                "amorsize.items.failed": report.failed,
                "amorsize.items.not_attempted": report.not_attempted,
                "amorsize.items.reused": report.reused,
                "amorsize.items.skipped": report.skipped,
            })  # fmt: skip
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            span.record_exception(error)
            span.set_attribute(ERROR_TYPE, type(error).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()


class ChunkTracingObserver(TelemetryObserver):
    """``trace_chunks=True``: also a child span per chunk, with the times measured where the
    chunk ran (``RunObserver.on_chunk``: in the worker for threads, processes and Dask; from
    dispatch to return for the others)."""

    def __init__(self, tracer: Any, meters: _Meters | None) -> None:
        super().__init__(tracer, meters)
        # Chunk times are time.monotonic(); spans want epoch ns. Both clocks are read once.
        self.epoch_offset_ns = time.time_ns() - time.monotonic_ns()

    def on_chunk(self, span: ChunkSpan) -> None:
        """Record the chunk's span under the run's."""
        if self.span is None:
            return
        from opentelemetry.trace import set_span_in_context

        attrs = {"amorsize.chunk.start": span.first, "amorsize.chunk.size": span.items,
                 "amorsize.chunk.failed": span.failed, "amorsize.chunk.worker": span.worker}  # fmt: skip
        child = self.tracer.start_span(
            "amorsize.chunk", context=set_span_in_context(self.span),
            start_time=self._epoch_ns(span.start), attributes=attrs,
        )  # fmt: skip
        child.end(end_time=self._epoch_ns(span.end))

    def _epoch_ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self.epoch_offset_ns
