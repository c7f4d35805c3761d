"""amorsize.retry: policy, delays and jitter, the decorator, retry_call, batch wrapper."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amorsize
from amorsize import (
    RetryExhaustedError,
    RetryFailure,
    RetryPolicy,
    create_batch_retry_wrapper,
    retry_call,
    set_testing,
    with_retry,
)
from amorsize.retry import BatchRetryWrapper, RetryStats, seed_jitter

# ---------------------------------------------------------------------------------- fixtures


class SleepRecorder:
    """Stands in for time.sleep: records each requested delay, never waits."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> SleepRecorder:
    """Patch `time.sleep` (the retry loop looks it up at sleep time)."""
    rec = SleepRecorder()
    monkeypatch.setattr(time, "sleep", rec)
    return rec


class Flaky:
    """A callable that raises `exc` for its first `failures` calls, then returns `x * 2`."""

    def __init__(self, failures: int, exc: BaseException | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.exc = exc if exc is not None else ConnectionError("transient")

    def __call__(self, x: int = 1) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return x * 2


# --------------------------------------------------------------------- policy: configuration


def test_policy_defaults_match_the_documented_contract() -> None:
    """Defaults: 3 retries, 0.1 s initial, 60 s cap, base 2, proportional jitter, Exception."""
    p = RetryPolicy()
    assert (p.max_retries, p.initial_delay, p.max_delay, p.exponential_base) == (3, 0.1, 60.0, 2.0)
    assert p.jitter is True
    assert p.retry_on_exceptions is None  # Exception, except CircuitOpenError
    assert p.on_retry is None and p.max_elapsed is None and p.retry_on_result is None
    assert p.reraise is False


def test_policy_custom_values_are_kept() -> None:
    """Every parameter given is stored as given (exception classes normalised to a tuple)."""

    def cb(e: BaseException | None, a: int, d: float) -> None:
        return None

    p = RetryPolicy(
        5, 0.5, 10.0, 3.0, "full", [KeyError], cb,
        max_elapsed=30.0, retry_on_result=bool, reraise=True,
    )  # fmt: skip
    assert (p.max_retries, p.initial_delay, p.max_delay, p.exponential_base) == (5, 0.5, 10.0, 3.0)
    assert p.jitter == "full" and p.retry_on_exceptions == (KeyError,) and p.on_retry is cb
    assert (p.max_elapsed, p.retry_on_result, p.reraise) == (30.0, bool, True)


def test_policy_single_exception_class_is_accepted() -> None:
    """A bare exception class means a one-element tuple."""
    assert RetryPolicy(retry_on_exceptions=OSError).retry_on_exceptions == (OSError,)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"max_retries": -2}, ValueError, ["max_retries", "-2", "[-1, "]),
        ({"max_retries": 1.5}, TypeError, ["max_retries", "1.5"]),
        ({"max_retries": True}, TypeError, ["max_retries", "True"]),
        ({"initial_delay": -0.1}, ValueError, ["initial_delay", "-0.1", "[0, 1e9]"]),
        ({"initial_delay": math.nan}, ValueError, ["initial_delay", "nan"]),
        ({"initial_delay": "1"}, TypeError, ["initial_delay", "'1'"]),
        ({"max_delay": -1.0}, ValueError, ["max_delay", "-1.0"]),
        ({"max_delay": math.inf}, ValueError, ["max_delay", "inf", "finite"]),
        (
            {"initial_delay": 2.0, "max_delay": 1.0},
            ValueError,
            ["max_delay", "initial_delay", "1.0", "2.0"],
        ),
        ({"exponential_base": 0.5}, ValueError, ["exponential_base", "0.5", ">= 1"]),
        ({"exponential_base": math.inf}, ValueError, ["exponential_base", "inf"]),
        ({"exponential_base": None}, TypeError, ["exponential_base", "None"]),
        ({"jitter": "sometimes"}, ValueError, ["jitter", "'sometimes'", "decorrelated"]),
        ({"jitter": 1}, ValueError, ["jitter", "1"]),
        ({"retry_on_exceptions": (ValueError, int)}, TypeError, ["retry_on_exceptions", "int"]),
        (
            {"retry_on_exceptions": ("ValueError",)},
            TypeError,
            ["retry_on_exceptions", "'ValueError'"],
        ),
        ({"retry_on_exceptions": ()}, TypeError, ["retry_on_exceptions", "()"]),
        ({"on_retry": "log"}, TypeError, ["on_retry", "'log'", "callable"]),
        ({"retry_on_result": 3}, TypeError, ["retry_on_result", "3"]),
        ({"max_elapsed": -5}, ValueError, ["max_elapsed", "-5"]),
        ({"max_elapsed": 0}, ValueError, ["max_elapsed", "0"]),
        ({"reraise": "yes"}, TypeError, ["reraise", "'yes'"]),
    ],
)
def test_policy_validation_names_parameter_rule_and_value(
    kwargs: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    """A bad value fails at construction; the message names the parameter and the value."""
    with pytest.raises(error) as info:
        RetryPolicy(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_policy_allows_unlimited_retries_and_zero_delays() -> None:
    """`max_retries=-1` (no limit), zero delays and base 1 are valid edge values."""
    p = RetryPolicy(max_retries=-1, initial_delay=0, max_delay=0, exponential_base=1)
    assert p.should_retry(ValueError(), 10**12)
    assert p.calculate_delay(5) == 0.0


def test_policy_is_immutable() -> None:
    """Attributes cannot be reassigned, and the C fields cannot be lowered twice."""
    p = RetryPolicy()
    with pytest.raises(FrozenInstanceError):
        p.max_retries = 10  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        p._lower(1, 0.0, 0.0, 1.0, 0, (Exception,), None, -1.0, None, False)
    assert p.max_retries == 3


def test_policy_equality_hash_and_pickle_roundtrip() -> None:
    """Equal policies hash equal; a pickled policy comes back equal and behaving the same."""
    p = RetryPolicy(max_retries=4, initial_delay=0.25, jitter=False, retry_on_exceptions=(OSError,))
    q = pickle.loads(pickle.dumps(p))
    assert q == p and hash(q) == hash(p)
    assert [q.calculate_delay(n) for n in range(1, 6)] == [
        p.calculate_delay(n) for n in range(1, 6)
    ]
    assert q.should_retry(OSError(), 4) and not q.should_retry(ValueError(), 1)
    assert RetryPolicy(max_retries=5) != p


# ----------------------------------------------------------------------------------- delays


def test_delay_without_jitter_follows_the_seed_progression() -> None:
    """0.1, 0.2, 0.4, 0.8, 1.6 for base 2, then capped at max_delay."""
    p = RetryPolicy(initial_delay=0.1, max_delay=1.0, jitter=False)
    got = [p.calculate_delay(n) for n in range(1, 8)]
    assert got == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("attempt", [10**6, 10**9, 10**18, 10**30])
@pytest.mark.parametrize("jitter", [False, True, "full", "equal", "decorrelated"])
def test_delay_for_huge_attempts_is_finite_and_capped(attempt: int, jitter: Any) -> None:
    """No OverflowError: huge attempts saturate at (at most) max_delay."""
    p = RetryPolicy(initial_delay=0.5, max_delay=7.0, exponential_base=10.0, jitter=jitter)
    d = p.calculate_delay(attempt)
    assert math.isfinite(d) and 0.0 <= d <= 7.0
    if jitter is False:
        assert d == 7.0


@pytest.mark.parametrize("attempt", [0, -1])
def test_delay_rejects_attempts_below_one(attempt: int) -> None:
    """Attempts are numbered from 1."""
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().calculate_delay(attempt)


def test_delay_rejects_non_int_attempt() -> None:
    """A float attempt is a TypeError naming the parameter."""
    with pytest.raises(TypeError, match="attempt"):
        RetryPolicy().calculate_delay(1.5)  # type: ignore[arg-type]


policies = st.builds(
    lambda initial, extra, base, jitter: RetryPolicy(
        initial_delay=initial, max_delay=initial + extra, exponential_base=base, jitter=jitter
    ),
    st.floats(0, 1e6, allow_nan=False),
    st.floats(0, 1e6, allow_nan=False),
    st.floats(1, 1e6, allow_nan=False),
    st.sampled_from([False, True, "full", "equal", "decorrelated"]),
)


@given(policies, st.integers(1, 10**30))
@settings(max_examples=300, deadline=None)
def test_property_delay_is_finite_and_within_cap(p: RetryPolicy, attempt: int) -> None:
    """For any valid policy and attempt, the delay is finite and within [0, max_delay]."""
    d = p.calculate_delay(attempt)
    assert math.isfinite(d)
    assert 0.0 <= d <= p.max_delay


@given(
    st.floats(0, 1e3, allow_nan=False),
    st.floats(0, 1e6, allow_nan=False),
    st.floats(1, 1e3, allow_nan=False),
    st.integers(1, 10**9),
    st.integers(0, 10**9),
)
@settings(max_examples=300, deadline=None)
def test_property_delay_without_jitter_never_decreases(
    initial: float, extra: float, base: float, attempt: int, step: int
) -> None:
    """Without jitter, a later attempt never waits less, and the formula holds."""
    p = RetryPolicy(
        initial_delay=initial, max_delay=initial + extra, exponential_base=base, jitter=False
    )
    a, b = p.calculate_delay(attempt), p.calculate_delay(attempt + step)
    assert a <= b
    if attempt < 60:
        assert a == pytest.approx(min(initial * base ** (attempt - 1), p.max_delay))


# ----------------------------------------------------------------------------------- jitter


def _ks_uniform(samples: list[float], lo: float, hi: float) -> float:
    """Kolmogorov-Smirnov statistic of `samples` against U(lo, hi)."""
    xs = sorted((s - lo) / (hi - lo) for s in samples)
    n = len(xs)
    return max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(xs))


N_SAMPLES = 20_000
# KS critical value at alpha = 0.001 is 1.95 / sqrt(n); with a fixed seed the test is exact.
KS_LIMIT = 1.95 / math.sqrt(N_SAMPLES)


@pytest.mark.parametrize(
    ("jitter", "lo_frac", "hi_frac"),
    [(True, 0.75, 1.25), ("full", 0.0, 1.0), ("equal", 0.5, 1.0)],
)
def test_jitter_distribution_matches_its_formula(
    jitter: Any, lo_frac: float, hi_frac: float
) -> None:
    """Proportional: d*U(0.75,1.25); full: U(0,d); equal: d/2+U(0,d/2) (KS test, fixed seed)."""
    p = RetryPolicy(initial_delay=1.0, max_delay=100.0, jitter=jitter)
    d = 4.0  # attempt 3
    seed_jitter(1234)
    xs = [p.calculate_delay(3) for _ in range(N_SAMPLES)]
    assert min(xs) >= lo_frac * d and max(xs) <= hi_frac * d
    assert _ks_uniform(xs, lo_frac * d, hi_frac * d) < KS_LIMIT
    assert sum(xs) / N_SAMPLES == pytest.approx(d * (lo_frac + hi_frac) / 2, rel=0.02)


def test_decorrelated_jitter_distribution_matches_its_formula() -> None:
    """Decorrelated: U(initial, 3 * previous), capped at max_delay."""
    p = RetryPolicy(initial_delay=0.5, max_delay=100.0, jitter="decorrelated")
    seed_jitter(99)
    xs = [p.calculate_delay(4, previous_delay=2.0) for _ in range(N_SAMPLES)]
    assert min(xs) >= 0.5 and max(xs) <= 6.0
    assert _ks_uniform(xs, 0.5, 6.0) < KS_LIMIT
    capped = RetryPolicy(initial_delay=0.5, max_delay=3.0, jitter="decorrelated")
    ys = [capped.calculate_delay(4, previous_delay=2.0) for _ in range(2000)]
    assert max(ys) == 3.0 and min(ys) >= 0.5


def test_proportional_jitter_never_exceeds_the_cap() -> None:
    """+25 % on a delay at the cap is clipped to max_delay."""
    p = RetryPolicy(initial_delay=1.0, max_delay=1.0, jitter=True)
    seed_jitter(5)
    xs = [p.calculate_delay(9) for _ in range(5000)]
    assert max(xs) == 1.0 and min(xs) >= 0.75


def test_seed_jitter_makes_draws_reproducible() -> None:
    """The same seed gives the same sequence; another seed another one."""
    p = RetryPolicy(jitter="full")
    seed_jitter(7)
    a = [p.calculate_delay(2) for _ in range(5)]
    seed_jitter(7)
    b = [p.calculate_delay(2) for _ in range(5)]
    seed_jitter(8)
    c = [p.calculate_delay(2) for _ in range(5)]
    assert a == b and a != c


def test_decorrelated_state_is_per_call(sleeps: SleepRecorder) -> None:
    """Each call starts from initial_delay; each sleep lies in [initial, 3 x previous]."""
    log: list[tuple[int, float]] = []
    p = RetryPolicy(
        max_retries=6, initial_delay=0.01, max_delay=10.0, jitter="decorrelated",
        on_retry=lambda e, a, d: log.append((a, d)),
    )  # fmt: skip
    for _ in range(20):
        log.clear()
        with pytest.raises(RetryExhaustedError):
            retry_call(Flaky(100), policy=p)
        prev = 0.01
        for attempt, d in log:
            assert 0.01 <= d <= min(10.0, 3 * prev) + 1e-12, (attempt, d, prev)
            prev = d
        assert [a for a, _ in log] == [1, 2, 3, 4, 5, 6]


def _draw_in_thread(out: list[float]) -> None:
    out.append(amorsize._core.jitter_uniform())


def test_threads_draw_from_independent_streams() -> None:
    """Two threads after the same seed do not replay the same numbers."""
    seed_jitter(3)
    a: list[float] = []
    b: list[float] = []
    for out in (a, b):
        t = threading.Thread(target=_draw_in_thread, args=(out,))
        t.start()
        t.join()
    assert a != b


# -------------------------------------------------------------------------- retry decision


@pytest.mark.parametrize(
    ("exc", "attempt", "expected"),
    [
        (ConnectionError(), 1, True),
        (ConnectionError(), 3, True),
        (ConnectionError(), 4, False),
        (TimeoutError(), 1, True),  # an OSError subclass
        (ValueError(), 1, False),
    ],
)
def test_should_retry_answers_for_the_attempt_that_failed(
    exc: BaseException, attempt: int, expected: bool
) -> None:
    """True while attempts remain and the exception is one of retry_on_exceptions."""
    p = RetryPolicy(max_retries=3, retry_on_exceptions=(OSError,))
    assert p.should_retry(exc, attempt) is expected


def test_open_circuit_is_not_retried_unless_named() -> None:
    """The default leaves CircuitOpenError out; naming it (or a base class) opts back in."""
    from amorsize import CircuitOpenError

    err = CircuitOpenError("db", 1.0)
    assert not RetryPolicy().should_retry(err, 1)
    assert RetryPolicy(retry_on_exceptions=(CircuitOpenError,)).should_retry(err, 1)
    assert RetryPolicy(retry_on_exceptions=(Exception,)).should_retry(err, 1)
    back = pickle.loads(pickle.dumps(RetryPolicy()))
    assert back.retry_on_exceptions is None and not back.should_retry(err, 1)


@pytest.mark.parametrize(
    "exc", [KeyboardInterrupt(), SystemExit(1), GeneratorExit(), asyncio.CancelledError()]
)
def test_stop_signals_are_never_retried(exc: BaseException) -> None:
    """KeyboardInterrupt, SystemExit, GeneratorExit, CancelledError: even with BaseException."""
    assert not RetryPolicy().should_retry(exc, 1)
    assert not RetryPolicy(retry_on_exceptions=(BaseException,)).should_retry(exc, 1)
    assert RetryPolicy(retry_on_exceptions=(BaseException,)).should_retry(ValueError(), 1)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_stop_signals_propagate_at_once(
    exc_type: type[BaseException], sleeps: SleepRecorder
) -> None:
    """A KeyboardInterrupt in the function escapes on the first attempt, unchanged."""
    f = Flaky(5, exc_type())
    g = with_retry(f, retry_on_exceptions=(BaseException,), initial_delay=0.0)
    with pytest.raises(exc_type) as info:
        g()
    assert info.value is f.exc and f.calls == 1 and sleeps.delays == []


# ------------------------------------------------------------------------------- decorator


def test_decorator_forms_all_work(sleeps: SleepRecorder) -> None:
    """@with_retry, @with_retry(), @with_retry(...) and @with_retry(policy=p)."""
    p = RetryPolicy(max_retries=1, initial_delay=0.0)

    @with_retry
    def a(x: int) -> int:
        return x + 1

    @with_retry()
    def b(x: int) -> int:
        return x + 2

    @with_retry(max_retries=5, initial_delay=0.0)
    def c(x: int) -> int:
        return x + 3

    @with_retry(policy=p)
    def d(x: int) -> int:
        return x + 4

    assert (a(0), b(0), c(0), d(0)) == (1, 2, 3, 4)
    assert a.retry_policy == RetryPolicy() and c.retry_policy.max_retries == 5
    assert d.retry_policy is p


def test_decorator_rejects_policy_with_inline_parameters() -> None:
    """policy= together with inline parameters is an error naming both."""
    with pytest.raises(TypeError, match="not both") as info:
        with_retry(policy=RetryPolicy(), max_retries=2)
    assert "max_retries" in str(info.value)


def test_decorator_validates_inline_parameters_at_decoration_time() -> None:
    """Bad inline parameters fail when decorating, not when calling."""
    with pytest.raises(ValueError, match="initial_delay"):
        with_retry(initial_delay=-1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        with_retry(max_retry=2)


@pytest.mark.parametrize("bad", [42, "f", None])
def test_decorator_rejects_non_callables(bad: Any) -> None:
    """Decorating a non-callable is a TypeError (None means "called with no arguments")."""
    if bad is None:
        assert callable(with_retry(bad))
        return
    with pytest.raises(TypeError, match="callable"):
        with_retry(bad)


def test_success_on_first_attempt_does_not_sleep(sleeps: SleepRecorder) -> None:
    """A call that succeeds returns its value, sleeps never, counts one call."""
    f = Flaky(0)
    g = with_retry(f)
    assert g(21) == 42
    assert f.calls == 1 and sleeps.delays == []
    assert g.retry_stats.as_dict() == {"calls": 1, "retries": 0, "exhausted": 0}


def test_failures_then_success_sleeps_the_backoff_delays(sleeps: SleepRecorder) -> None:
    """Two failures: two sleeps of initial and initial*base, then the result."""
    f = Flaky(2)
    g = with_retry(f, max_retries=3, initial_delay=0.1, jitter=False)
    assert g(5) == 10
    assert f.calls == 3
    assert sleeps.delays == pytest.approx([0.1, 0.2])
    assert g.retry_stats.as_dict() == {"calls": 1, "retries": 2, "exhausted": 0}


def test_exhaustion_raises_retry_exhausted_error_from_last_exception(sleeps: SleepRecorder) -> None:
    """max_retries + 1 attempts, then RetryExhaustedError(last exc, attempts) from it."""
    f = Flaky(100, TimeoutError("slow backend"))
    g = with_retry(f, max_retries=2, initial_delay=0.0)
    with pytest.raises(RetryExhaustedError) as info:
        g()
    err = info.value
    assert f.calls == 3 and err.attempts == 3
    assert err.original_exception is f.exc and err.__cause__ is f.exc
    msg = str(err)
    assert "3 attempts" in msg and "TimeoutError" in msg and "slow backend" in msg
    assert g.retry_stats.exhausted == 1 and g.retry_stats.retries == 2
    assert err.reason == "attempts"
    assert sleeps.delays == []  # zero delay: no sleep call at all


def test_reraise_raises_the_last_exception_itself(sleeps: SleepRecorder) -> None:
    """reraise=True: the last attempt's exception object propagates."""
    f = Flaky(100, KeyError("k"))
    g = with_retry(f, max_retries=1, initial_delay=0.0, reraise=True)
    with pytest.raises(KeyError) as info:
        g()
    assert info.value is f.exc and f.calls == 2


def test_zero_retries_makes_exactly_one_attempt(sleeps: SleepRecorder) -> None:
    """max_retries=0: one attempt; the failure is reported as exhaustion after 1 attempt."""
    f = Flaky(1)
    g = with_retry(f, max_retries=0)
    with pytest.raises(RetryExhaustedError, match="1 attempt;") as info:
        g()
    assert f.calls == 1 and info.value.attempts == 1 and sleeps.delays == []


def test_selective_exceptions_propagate_others_unchanged(sleeps: SleepRecorder) -> None:
    """Only listed exceptions are retried; another one escapes at once, the same object."""
    boom = ValueError("not transient")
    f = Flaky(1, boom)
    g = with_retry(f, retry_on_exceptions=(ConnectionError, TimeoutError), initial_delay=0.0)
    with pytest.raises(ValueError) as info:
        g()
    assert info.value is boom and f.calls == 1
    assert g.retry_stats.as_dict() == {"calls": 1, "retries": 0, "exhausted": 0}
    h = with_retry(Flaky(2, TimeoutError()), retry_on_exceptions=(ConnectionError, TimeoutError))
    assert h(1) == 2


def test_on_retry_runs_before_each_sleep_with_exception_attempt_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """on_retry(exc, attempt, delay) is called before the corresponding sleep."""
    events: list[tuple[Any, ...]] = []
    monkeypatch.setattr(time, "sleep", lambda s: events.append(("sleep", s)))
    f = Flaky(2)
    g = with_retry(
        f, max_retries=3, initial_delay=0.5, jitter=False,
        on_retry=lambda e, a, d: events.append(("cb", e, a, d)),
    )  # fmt: skip
    assert g(1) == 2
    assert events == [
        ("cb", f.exc, 1, 0.5), ("sleep", 0.5),
        ("cb", f.exc, 2, 1.0), ("sleep", 1.0),
    ]  # fmt: skip


def test_on_retry_exception_is_logged_and_retrying_goes_on(
    sleeps: SleepRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A raising callback does not stop retries; its error is logged with the traceback."""

    def bad_callback(e: BaseException | None, a: int, d: float) -> None:
        raise RuntimeError("callback bug")

    g = with_retry(Flaky(2), initial_delay=0.0, on_retry=bad_callback)
    with caplog.at_level(logging.WARNING, logger="amorsize"):
        assert g(3) == 6
    records = [r for r in caplog.records if "on_retry callback" in r.getMessage()]
    assert len(records) == 2
    assert records[0].exc_info is not None and records[0].exc_info[0] is RuntimeError


def test_every_retry_is_logged_at_debug(
    sleeps: SleepRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    """One DEBUG record per retry on the `amorsize.retry` logger, naming the attempt and error."""

    def fetch() -> int:
        return f()

    f = Flaky(2, ConnectionError("refused"))
    g = with_retry(fetch, initial_delay=0.0)
    with caplog.at_level(logging.DEBUG, logger="amorsize"):
        assert g() == 2
    msgs = [r.getMessage() for r in caplog.records if r.name == "amorsize.retry"]
    assert len(msgs) == 2 and all(r.levelno == logging.DEBUG for r in caplog.records)
    assert "fetch" in msgs[0] and "attempt 1" in msgs[0] and "ConnectionError: refused" in msgs[0]
    assert "attempt 2" in msgs[1]


def _documented(a: int, b: str = "x", *, c: float = 1.0) -> tuple[int, str, float]:
    """Docstring of the original."""
    return a, b, c


def test_metadata_and_signature_are_preserved() -> None:
    """__name__, __qualname__, __doc__, __module__, __wrapped__, __dict__, signature."""
    _documented.custom = "attr"  # type: ignore[attr-defined]
    g = with_retry(_documented)
    assert g.__name__ == "_documented" and g.__qualname__ == "_documented"
    assert g.__doc__ == "Docstring of the original."
    assert g.__module__ == __name__
    assert g.__wrapped__ is _documented
    assert g.custom == "attr"  # type: ignore[attr-defined]
    assert inspect.signature(g) == inspect.signature(_documented)
    assert g.__annotations__ == _documented.__annotations__
    assert g.__defaults__ == ("x",) and g.__kwdefaults__ == {"c": 1.0}
    assert callable(g) and not inspect.iscoroutinefunction(g)
    assert "_documented" in repr(g)


def test_arguments_and_keywords_reach_the_function(sleeps: SleepRecorder) -> None:
    """Positional, keyword, keyword-only and **kwargs calls all pass through, also on retry."""
    seen: list[tuple[Any, ...]] = []

    @with_retry(initial_delay=0.0)
    def f(a: int, b: int = 0, *args: int, c: int = 0, **kw: int) -> int:
        seen.append((a, b, args, c, kw))
        if len(seen) % 2:
            raise ConnectionError
        return a + b + sum(args) + c + sum(kw.values())

    assert f(1, 2, 3, c=4, d=5) == 15
    assert f(*[1, 1], **{"c": 1}) == 3
    assert seen[0] == seen[1] == (1, 2, (3,), 4, {"d": 5})


@pytest.mark.parametrize("value", [None, 0, "", (1, 2), [3], {"k": object()}])
def test_return_values_are_preserved(value: Any) -> None:
    """Whatever the function returns comes back as the same object."""
    g = with_retry(lambda: value)
    assert g() is value


def test_works_as_a_method_classmethod_and_staticmethod(sleeps: SleepRecorder) -> None:
    """Decorated methods bind to the instance; signatures drop `self`."""

    class Api:
        def __init__(self) -> None:
            self.n = 0

        @with_retry(initial_delay=0.0)
        def get(self, x: int) -> tuple[Api, int]:
            self.n += 1
            if self.n == 1:
                raise ConnectionError
            return self, x

        @classmethod
        @with_retry
        def make(cls, x: int) -> tuple[type, int]:
            return cls, x

        @staticmethod
        @with_retry
        def pure(x: int) -> int:
            return x

    api = Api()
    assert api.get(7) == (api, 7) and api.n == 2
    assert list(inspect.signature(api.get).parameters) == ["x"]
    assert Api.get.retry_stats.calls == 1  # the class attribute is the retrying function
    assert Api.make(1) == (Api, 1) and Api.pure(2) == 2


def test_delay_zero_calls_no_sleep_and_sleep_is_looked_up_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """time.sleep is resolved when sleeping (patchable after decoration); 0 s sleeps not at all."""
    g = with_retry(Flaky(2), initial_delay=0.0)
    h = with_retry(Flaky(1), initial_delay=0.25, jitter=False)
    calls: list[float] = []
    monkeypatch.setattr(time, "sleep", calls.append)  # patched after decorating
    assert g() == 2 and calls == []
    assert h() == 2 and calls == [0.25]


def test_max_elapsed_stops_before_a_sleep_that_would_end_past_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a fake clock: sleeps 1, 2, 4 fit in 10 s; the 8 s one would end at 15 > 10."""
    now = [100.0]
    sleeps: list[float] = []

    def fake_sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(time, "sleep", fake_sleep)
    f = Flaky(100)
    g = with_retry(f, max_retries=-1, initial_delay=1.0, jitter=False, max_elapsed=10.0)
    with pytest.raises(RetryExhaustedError) as info:
        g()
    assert sleeps == [1.0, 2.0, 4.0]
    assert f.calls == 4 and info.value.attempts == 4
    assert info.value.reason == "elapsed" and "max_elapsed" in str(info.value)
    assert g.retry_stats.exhausted == 1


def test_retry_on_result_retries_rejected_results(sleeps: SleepRecorder) -> None:
    """A result the predicate rejects is retried; the first accepted one is returned."""
    results = iter([None, None, 5])
    g = with_retry(lambda: next(results), initial_delay=0.0, retry_on_result=lambda r: r is None)
    assert g() == 5
    assert g.retry_stats.retries == 2


@pytest.mark.parametrize("reraise", [False, True])
def test_retry_on_result_exhaustion_reports_the_last_result(
    sleeps: SleepRecorder, reraise: bool
) -> None:
    """Out of attempts on rejected results: RetryExhaustedError with last_result, no cause."""
    g = with_retry(
        lambda: "busy", max_retries=2, initial_delay=0.0,
        retry_on_result=lambda r: r == "busy", reraise=reraise,
    )  # fmt: skip
    with pytest.raises(RetryExhaustedError, match="busy") as info:
        g()
    assert info.value.original_exception is None and info.value.last_result == "busy"
    assert info.value.attempts == 3


def test_exception_after_rejected_result_reports_the_exception(sleeps: SleepRecorder) -> None:
    """A rejected result, then an exception on the last attempt: the exception is reported."""
    outcomes: list[Any] = [None, ConnectionError("last")]

    def f() -> Any:
        o = outcomes.pop(0)
        if isinstance(o, Exception):
            raise o
        return o

    g = with_retry(f, max_retries=1, initial_delay=0.0, retry_on_result=lambda r: r is None)
    with pytest.raises(RetryExhaustedError) as info:
        g()
    assert isinstance(info.value.original_exception, ConnectionError)
    assert info.value.last_result is None and info.value.attempts == 2


def test_unlimited_retries_keep_going_until_success(sleeps: SleepRecorder) -> None:
    """max_retries=-1 retries as long as needed."""
    f = Flaky(500)
    assert with_retry(f, max_retries=-1, initial_delay=0.0)(2) == 4
    assert f.calls == 501


def test_retry_exhausted_error_pickles_with_attributes_and_message() -> None:
    """Pickling keeps original_exception, attempts, last_result, func_name and the message."""
    err = RetryExhaustedError(ConnectionError("refused"), 4, None, "fetch")
    err.extra = "kept"  # type: ignore[attr-defined]
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is RetryExhaustedError and str(back) == str(err)
    assert back.attempts == 4 and back.func_name == "fetch"
    assert isinstance(back.original_exception, ConnectionError)
    assert str(back.original_exception) == "refused"
    assert back.extra == "kept"  # type: ignore[attr-defined]
    res = pickle.loads(pickle.dumps(RetryExhaustedError(None, 2, [1, 2])))
    assert res.last_result == [1, 2] and "rejected" in str(res)


@pytest.mark.parametrize(
    ("reason", "note"),
    [("attempts", "gave up after 3 attempts; "), ("elapsed", "max_elapsed"),
     ("budget", "retry budget")],
)  # fmt: skip
def test_retry_exhausted_error_reason_pickles_with_message_and_cause(
    reason: Any, note: str
) -> None:
    """reason= (keyword) is kept, named in the message, and survives pickling with __cause__."""
    cause = ConnectionError("refused")
    try:
        raise RetryExhaustedError(cause, 3, reason=reason) from cause
    except RetryExhaustedError as caught:
        err = caught
    assert err.reason == reason and note in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert back.reason == reason and str(back) == str(err)
    assert isinstance(back.__cause__, ConnectionError) and back.__cause__ is back.original_exception


def test_retry_exhausted_error_defaults_to_attempts_and_rejects_unknown_reasons() -> None:
    """The default reason is "attempts"; anything else but the three values is refused."""
    assert RetryExhaustedError(None, 1).reason == "attempts"
    with pytest.raises(ValueError, match=r"reason must be 'attempts', 'elapsed' or 'budget'"):
        RetryExhaustedError(None, 1, reason="timeout")  # type: ignore[arg-type]


def _frames(tb: Any) -> list[str]:
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


def test_propagated_and_reraised_exceptions_keep_their_traceback(sleeps: SleepRecorder) -> None:
    """The function's own frame is still in the traceback of what the caller catches."""

    def deep_failure() -> None:
        raise KeyError("inner")

    g = with_retry(deep_failure, retry_on_exceptions=(OSError,))
    with pytest.raises(KeyError) as info:
        g()
    assert "deep_failure" in _frames(info.value.__traceback__)
    h = with_retry(deep_failure, max_retries=1, initial_delay=0.0, reraise=True)
    with pytest.raises(KeyError) as info2:
        h()
    assert "deep_failure" in _frames(info2.value.__traceback__)
    k = with_retry(deep_failure, max_retries=1, initial_delay=0.0)
    with pytest.raises(RetryExhaustedError) as info3:
        k()
    assert "deep_failure" in _frames(info3.value.__cause__.__traceback__)


def _gen() -> Iterator[int]:
    yield 1


async def _agen() -> Any:
    yield 1


@pytest.mark.parametrize("func", [_gen, _agen])
def test_generator_functions_are_rejected_with_a_reason(func: Any) -> None:
    """A generator runs after the call returns, so retrying the call would be a lie."""
    with pytest.raises(TypeError, match="generator function"):
        with_retry(func)


# ------------------------------------------------------------------------------- pickling


@with_retry(max_retries=2, initial_delay=0.0)
def module_level_double(x: int) -> int:
    """Doubles x."""
    return x * 2


def test_module_level_function_pickles_by_reference() -> None:
    """The pickle names the function; unpickling returns the very same object."""
    data = pickle.dumps(module_level_double)
    assert b"module_level_double" in data and len(data) < 200
    assert pickle.loads(data) is module_level_double


def test_local_function_pickles_by_value_with_cloudpickle_only() -> None:
    """A local function cannot be pickled by reference; cloudpickle ships it by value."""

    @with_retry(max_retries=1, initial_delay=0.0)
    def local(x: int) -> int:
        return x + 1

    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(local)
    cloudpickle = pytest.importorskip("cloudpickle")
    back = pickle.loads(cloudpickle.dumps(local))
    assert back(1) == 2 and back.retry_policy == local.retry_policy


WORKERS_SOURCE = '''
"""Worker functions for tests/test_retry.py's process-pool tests (written at test time)."""
import os
from amorsize import with_retry

_attempts = {}


@with_retry(max_retries=3, initial_delay=0.0)
def double_after_one_failure(x):
    n = _attempts.get(x, 0) + 1
    _attempts[x] = n
    if n == 1:
        raise ConnectionError(f"transient failure for {x}")
    return x * 2, n, os.getpid()


@with_retry(max_retries=2, initial_delay=0.0)
def always_down(x):
    raise TimeoutError(f"backend down for {x}")


def draw_delay(_):
    from amorsize import RetryPolicy
    return os.getpid(), RetryPolicy(jitter="full", initial_delay=1.0).calculate_delay(1)
'''


@pytest.fixture(scope="module")
def workers_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An importable module of decorated worker functions, on sys.path for children too."""
    import importlib

    d = tmp_path_factory.mktemp("retry_workers")
    name = "amz_retry_test_workers"
    (d / f"{name}.py").write_text(WORKERS_SOURCE)
    with pytest.MonkeyPatch.context() as mp:
        # spawn and forkserver children receive the parent's sys.path with their job.
        mp.syspath_prepend(str(d))
        mod = importlib.import_module(name)
        yield mod
        sys.modules.pop(name, None)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_decorated_function_runs_in_process_pools(workers_module: Any, method: str) -> None:
    """Pickled by reference, it retries inside fork, spawn and forkserver workers."""
    import multiprocessing as mp
    import warnings

    if method not in mp.get_all_start_methods():
        pytest.skip(f"{method} is not available on this platform")
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process that has threads; these workers
        # run only amorsize code, which does not hold locks across fork.
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        with mp.get_context(method).Pool(2) as pool:
            out = pool.map(workers_module.double_after_one_failure, range(6))
            with pytest.raises(RetryExhaustedError) as info:
                pool.apply(workers_module.always_down, (9,))
    assert [v for v, _, _ in out] == [0, 2, 4, 6, 8, 10]
    assert all(n == 2 for _, n, _ in out)  # one failure, one retry, in the worker
    err = info.value
    assert err.attempts == 3 and isinstance(err.original_exception, TimeoutError)
    assert "backend down for 9" in str(err)


def _fork_child_draw(q: Any) -> None:
    q.put(amorsize._core.jitter_uniform())


def test_forked_children_reseed_the_jitter_generator() -> None:
    """Children forked from one parent state draw different numbers (no lockstep sleeps)."""
    import multiprocessing as mp
    import warnings

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    ctx = mp.get_context("fork")
    seed_jitter(2024)
    q = ctx.Queue()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        procs = [ctx.Process(target=_fork_child_draw, args=(q,)) for _ in range(3)]
        for p in procs:
            p.start()
        draws = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    parent_next = amorsize._core.jitter_uniform()
    assert len(set([*draws, parent_next])) == 4


# -------------------------------------------------------------------------------- threads


def test_eight_threads_each_get_their_own_attempt_count(sleeps: SleepRecorder) -> None:
    """One decorated function, 8 threads, call k fails k times: every call's count is right."""
    local = threading.local()
    n_threads, calls_each, max_fail = 8, 25, 4

    def on_retry(exc: BaseException | None, attempt: int, delay: float) -> None:
        local.seen.append(attempt)

    @with_retry(max_retries=max_fail, initial_delay=0.0, on_retry=on_retry)
    def work(fail_times: int) -> int:
        local.attempts += 1
        if local.attempts <= fail_times:
            raise ConnectionError
        return local.attempts

    barrier = threading.Barrier(n_threads)
    results: dict[int, list[tuple[int, list[int]]]] = {}

    def run(k: int) -> None:
        out = []
        barrier.wait()
        for j in range(calls_each):
            local.attempts, local.seen = 0, []
            made = work((k + j) % (max_fail + 1))
            out.append((made, local.seen))
        results[k] = out

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    for k in range(n_threads):
        fails = [(k + j) % (max_fail + 1) for j in range(calls_each)]
        assert results[k] == [(f + 1, list(range(1, f + 1))) for f in fails]
    expected_retries = sum(
        (k + j) % (max_fail + 1) for k in range(n_threads) for j in range(calls_each)
    )
    stats = work.retry_stats
    assert (stats.calls, stats.retries, stats.exhausted) == (
        n_threads * calls_each,
        expected_retries,
        0,
    )


def test_stats_reset_and_repr() -> None:
    """RetryStats.reset() zeroes the counters; repr shows them."""
    g = with_retry(lambda: 1)
    g()
    g()
    assert isinstance(g.retry_stats, RetryStats)
    assert "calls=2" in repr(g.retry_stats)
    g.retry_stats.reset()
    assert g.retry_stats.as_dict() == {"calls": 0, "retries": 0, "exhausted": 0}


# ------------------------------------------------------------------------------ retry_call


def test_retry_call_basic_and_with_retries(sleeps: SleepRecorder) -> None:
    """retry_call runs once on success and retries failures."""
    assert retry_call(lambda: 3) == 3
    f = Flaky(2)
    assert retry_call(f, (4,), initial_delay=0.0) == 8 and f.calls == 3


def test_retry_call_with_args_kwargs_and_policy(sleeps: SleepRecorder) -> None:
    """args, kwargs and a policy reach their places."""
    p = RetryPolicy(max_retries=1, initial_delay=0.0)
    assert retry_call(_documented, args=[2], kwargs={"b": "y", "c": 3.0}, policy=p) == (2, "y", 3.0)
    with pytest.raises(RetryExhaustedError) as info:
        retry_call(Flaky(5), policy=p)
    assert info.value.attempts == 2


def test_retry_call_rejects_policy_with_inline_and_non_callables() -> None:
    """Both a policy and inline parameters, or a non-callable func: TypeError."""
    with pytest.raises(TypeError, match="not both"):
        retry_call(len, ([],), policy=RetryPolicy(), jitter=False)
    with pytest.raises(TypeError, match="callable"):
        retry_call(3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="RetryPolicy"):
        retry_call(len, ([],), policy="fast")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- batch wrapper


def parse_int(s: str) -> int:
    """Module-level worker for the batch wrapper tests."""
    return int(s)


def test_batch_wrapper_collects_failures_in_place(sleeps: SleepRecorder) -> None:
    """fail_fast=False: failures become RetryFailure records, listed in .failures."""
    w = create_batch_retry_wrapper(parse_int, RetryPolicy(max_retries=2, initial_delay=0.0))
    out = [w(s) for s in ["1", "x", "3", "y"]]
    assert out[0] == 1 and out[2] == 3
    assert isinstance(out[1], RetryFailure) and isinstance(out[3], RetryFailure)
    assert w.failures == [out[1], out[3]]
    f = w.failures[0]
    assert f.item == "x" and f.args == ("x",) and f.attempts == 3
    assert isinstance(f.exception, ValueError)
    assert w.retry_stats.calls == 4 and w.retry_stats.exhausted == 2


def test_batch_wrapper_records_non_retryable_failures_after_one_attempt() -> None:
    """An exception outside retry_on_exceptions is a permanent failure at attempt 1."""
    w = create_batch_retry_wrapper(
        parse_int, RetryPolicy(retry_on_exceptions=(OSError,)), fail_fast=False
    )
    rec = w("z")
    assert isinstance(rec, RetryFailure) and rec.attempts == 1
    assert isinstance(rec.exception, ValueError)


def test_batch_wrapper_keeps_keyword_arguments() -> None:
    """Keyword arguments are part of the record; `item` refuses to guess then."""
    w = create_batch_retry_wrapper(int, RetryPolicy(max_retries=0))
    rec = w("zz", base=10)
    assert isinstance(rec, RetryFailure) and rec.kwargs == {"base": 10}
    with pytest.raises(AttributeError, match="not one item"):
        _ = rec.item
    assert w("ff", base=16) == 255


def test_batch_wrapper_fail_fast_raises(sleeps: SleepRecorder) -> None:
    """fail_fast=True: the permanent failure raises RetryExhaustedError."""
    w = create_batch_retry_wrapper(
        parse_int, RetryPolicy(max_retries=1, initial_delay=0.0), fail_fast=True
    )
    assert w("5") == 5
    with pytest.raises(RetryExhaustedError) as info:
        w("x")
    assert info.value.attempts == 2 and w.failures == []


def test_batch_wrapper_pickles_and_runs_in_a_process_pool() -> None:
    """The wrapper is picklable (module-level class) and works in worker processes."""
    import multiprocessing as mp

    w = create_batch_retry_wrapper(parse_int, RetryPolicy(max_retries=1, initial_delay=0.0))
    back = pickle.loads(pickle.dumps(w))
    assert isinstance(back, BatchRetryWrapper) and back("7") == 7
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("the pool part needs fork (this module is not importable by spawn)")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        with mp.get_context("fork").Pool(2) as pool:
            out = pool.map(w, ["1", "2", "x"])
    assert out[:2] == [1, 2]
    assert isinstance(out[2], RetryFailure) and out[2].attempts == 2 and out[2].item == "x"


def test_retry_failure_is_frozen() -> None:
    """Failure records are immutable."""
    rec = RetryFailure((1,), ValueError(), 2)
    with pytest.raises(FrozenInstanceError):
        rec.attempts = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------ testing mode


def test_set_testing_skips_sleeps_and_caps_attempts(sleeps: SleepRecorder) -> None:
    """Testing mode: long delays do not sleep; max_retries caps every policy; restored on exit."""
    f = Flaky(100)
    g = with_retry(f, max_retries=10, initial_delay=30.0)
    with set_testing(True, max_retries=2):
        with pytest.raises(RetryExhaustedError) as info:
            g()
        assert info.value.attempts == 3
        assert with_retry(Flaky(1), initial_delay=5.0)() == 2
    assert sleeps.delays == [] and f.calls == 3
    h = with_retry(Flaky(1), initial_delay=0.5, jitter=False)
    assert h() == 2 and sleeps.delays == [0.5]


def test_set_testing_applies_at_once_and_nests() -> None:
    """set_testing(...) acts immediately; each context restores the previous state."""
    state = amorsize._core._set_testing_state
    mode = set_testing(True)
    try:
        with set_testing(True, max_retries=0):
            assert not RetryPolicy().should_retry(ValueError(), 1)
            with set_testing(False):
                assert RetryPolicy().should_retry(ValueError(), 1)
            assert not RetryPolicy().should_retry(ValueError(), 1)
        assert RetryPolicy().should_retry(ValueError(), 3)
    finally:
        mode.__exit__(None, None, None)
    assert state(False, -1) == (False, -1)


@pytest.mark.parametrize(("args", "error"), [(("yes",), TypeError), ((True, -1), ValueError)])
def test_set_testing_rejects_bad_arguments(args: tuple[Any, ...], error: type[Exception]) -> None:
    """enabled must be a bool, max_retries an int >= 0 or None."""
    with pytest.raises(error):
        set_testing(*args)


# ------------------------------------------------------------------------------------ async


_real_async_sleep = asyncio.sleep


class AsyncFlaky:
    """An async callable that raises `exc` for its first `failures` calls."""

    def __init__(self, failures: int, exc: BaseException | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.exc = exc if exc is not None else ConnectionError("transient")

    async def __call__(self, x: int = 1) -> int:
        self.calls += 1
        await _real_async_sleep(0)  # really suspend: the retry loop must pass values through
        if self.calls <= self.failures:
            raise self.exc
        return x * 2


@pytest.fixture
def async_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Patch `asyncio.sleep` for delays > 0 (the retry loop looks it up at sleep time)."""
    delays: list[float] = []

    async def fake_sleep(d: float) -> None:
        delays.append(d)
        await _real_async_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return delays


def _async_fn(flaky: AsyncFlaky) -> Callable[..., Any]:
    async def fn(x: int = 1) -> int:
        """Async docstring."""
        return await flaky(x)

    return fn


def test_async_function_becomes_a_coroutine_function(async_sleeps: list[float]) -> None:
    """with_retry on async def gives a coroutine function; the call gives a coroutine."""
    g = with_retry(_async_fn(AsyncFlaky(0)))
    assert inspect.iscoroutinefunction(g) and asyncio.iscoroutinefunction(g)
    assert g.__doc__ == "Async docstring." and list(inspect.signature(g).parameters) == ["x"]
    coro = g(4)
    assert asyncio.iscoroutine(coro)
    assert asyncio.run(coro) == 8


def test_async_retries_await_asyncio_sleep(async_sleeps: list[float]) -> None:
    """Failures are retried with asyncio.sleep(delay) between attempts."""
    f = AsyncFlaky(2)
    g = with_retry(_async_fn(f), max_retries=3, initial_delay=0.1, jitter=False)
    assert asyncio.run(g(5)) == 10
    assert f.calls == 3 and async_sleeps == pytest.approx([0.1, 0.2])
    assert g.retry_stats.as_dict() == {"calls": 1, "retries": 2, "exhausted": 0}


def test_async_zero_delay_does_not_sleep(async_sleeps: list[float]) -> None:
    """Delay 0: no asyncio.sleep call."""
    f = AsyncFlaky(2)
    assert asyncio.run(with_retry(_async_fn(f), initial_delay=0.0)()) == 2
    assert async_sleeps == [] and f.calls == 3


def test_async_exhaustion_and_selective_exceptions(async_sleeps: list[float]) -> None:
    """Exhaustion raises RetryExhaustedError from the last error; others propagate unchanged."""
    f = AsyncFlaky(10, TimeoutError("t"))
    g = with_retry(_async_fn(f), max_retries=2, initial_delay=0.0)
    with pytest.raises(RetryExhaustedError) as info:
        asyncio.run(g())
    assert info.value.attempts == 3 and info.value.__cause__ is f.exc
    boom = ValueError("no")
    h = with_retry(_async_fn(AsyncFlaky(1, boom)), retry_on_exceptions=(OSError,))
    with pytest.raises(ValueError) as info2:
        asyncio.run(h())
    assert info2.value is boom
    r = with_retry(_async_fn(AsyncFlaky(10, KeyError("k"))), max_retries=1, reraise=True,
                   initial_delay=0.0)  # fmt: skip
    with pytest.raises(KeyError):
        asyncio.run(r())


def test_async_cancellation_during_sleep_propagates() -> None:
    """Cancelling the task while it sleeps between attempts cancels it (no more attempts)."""
    f = AsyncFlaky(100)
    g = with_retry(_async_fn(f), max_retries=5, initial_delay=60.0, jitter=False)

    async def main() -> None:
        task = asyncio.ensure_future(g())
        for _ in range(10):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert f.calls == 1


def test_async_cancellation_during_an_attempt_is_not_retried() -> None:
    """CancelledError thrown into a running attempt propagates; no second attempt starts."""
    started: list[int] = []

    @with_retry(retry_on_exceptions=(BaseException,), initial_delay=0.0)
    async def hang() -> str:
        started.append(1)
        if len(started) == 1:
            await asyncio.get_running_loop().create_future()  # never resolves
        return "retried"  # reached only if the cancellation were retried

    async def main() -> None:
        task = asyncio.ensure_future(hang())
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert started == [1]


def test_async_max_elapsed_uses_the_same_budget_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fake clock and sleep: 1 + 2 s fit in a 5 s budget, the 4 s sleep does not."""
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(d: float) -> None:
        slept.append(d)
        now[0] += d

    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    f = AsyncFlaky(100)
    g = with_retry(_async_fn(f), max_retries=-1, initial_delay=1.0, jitter=False, max_elapsed=5.0)
    with pytest.raises(RetryExhaustedError) as info:
        asyncio.run(g())
    assert slept == [1.0, 2.0] and info.value.attempts == 3 and f.calls == 3
    assert info.value.reason == "elapsed"


def test_async_retry_on_result_and_gather(async_sleeps: list[float]) -> None:
    """retry_on_result works for coroutines; concurrent calls keep separate state."""
    counts: dict[int, int] = {}

    @with_retry(initial_delay=0.0, max_retries=5, retry_on_result=lambda r: r < 0)
    async def f(k: int) -> int:
        counts[k] = counts.get(k, 0) + 1
        await _real_async_sleep(0)
        return -1 if counts[k] <= k else k

    async def main() -> list[int]:
        return await asyncio.gather(*(f(k) for k in range(4)))

    assert asyncio.run(main()) == [0, 1, 2, 3]
    assert counts == {0: 1, 1: 2, 2: 3, 3: 4}


def test_async_coroutine_protocol_edges() -> None:
    """A never-awaited call runs nothing; close() stops it; it cannot be awaited twice."""
    f = AsyncFlaky(0)
    g = with_retry(_async_fn(f))
    g(1).close()  # never started: nothing ran, no "never awaited" warning
    assert f.calls == 0
    c = g(1)

    async def twice() -> None:
        assert await c == 2
        with pytest.raises(RuntimeError, match="reuse"):
            await c

    asyncio.run(twice())
    with pytest.raises(ValueError, match="thrown"):
        g(1).throw(ValueError("thrown"))


def test_async_method_and_testing_mode(async_sleeps: list[float]) -> None:
    """Async methods bind; testing mode skips asyncio sleeps too."""

    class Client:
        def __init__(self) -> None:
            self.flaky = AsyncFlaky(1)

        @with_retry(initial_delay=5.0)
        async def get(self, x: int) -> int:
            return await self.flaky(x)

    c = Client()
    with set_testing(True):
        assert asyncio.run(c.get(3)) == 6
    assert async_sleeps == [] and c.flaky.calls == 2


def test_async_callable_object_and_non_native_awaitables(async_sleeps: list[float]) -> None:
    """An object with `async def __call__` is async; a returned Future-like awaitable works."""
    flaky = AsyncFlaky(1)
    g = with_retry(flaky, initial_delay=0.0)
    assert asyncio.iscoroutinefunction(g)
    # inspect only knows objects without __code__ through 3.12's markcoroutinefunction.
    assert inspect.iscoroutinefunction(g) or sys.version_info < (3, 12)
    assert asyncio.run(g(2)) == 4 and flaky.calls == 2

    class Ready:
        """A minimal awaitable that is not a coroutine."""

        def __init__(self, value: int) -> None:
            self.value = value

        def __await__(self) -> Iterator[None]:
            yield None
            return self.value  # type: ignore[misc]

    tries = [0]

    def make(x: int) -> Ready:
        tries[0] += 1
        if tries[0] == 1:
            raise ConnectionError("before awaiting")
        return Ready(x)

    wrapped = amorsize.retry.AsyncRetryingFunction(make, RetryPolicy(initial_delay=0.0))
    coro = wrapped(5)
    assert coro.__name__ == "make" and "make" in repr(coro)
    assert asyncio.run(coro) == 5 and tries[0] == 2


def test_async_keyword_arguments_reach_the_function() -> None:
    """Keyword arguments pass through the async path, on every attempt."""
    seen: list[dict[str, int]] = []

    @with_retry(initial_delay=0.0)
    async def f(a: int, *, b: int = 0) -> int:
        seen.append({"a": a, "b": b})
        if len(seen) == 1:
            raise ConnectionError
        return a + b

    assert asyncio.run(f(1, b=2)) == 3
    assert seen == [{"a": 1, "b": 2}] * 2


# ---------------------------------------------------------------------------------- real wait


def test_real_backoff_waits_at_least_the_delays() -> None:
    """The one real-time test: 2 ms + 4 ms of backoff take at least 6 ms."""
    f = Flaky(2)
    g = with_retry(f, initial_delay=0.002, jitter=False)
    t0 = time.perf_counter()
    assert g() == 2
    assert time.perf_counter() - t0 >= 0.006


# ------------------------------------------------------------------ names in errors (item 11)


def test_exhausted_error_names_the_function_with_its_module() -> None:
    """issue 12 item 11: the exhaustion message names module.qualname of the function."""

    @with_retry(max_retries=1, initial_delay=0)
    def fetch(x: int) -> int:
        raise ConnectionError("refused")

    with pytest.raises(RetryExhaustedError) as info:
        fetch(1)
    name = f"{__name__}.test_exhausted_error_names_the_function_with_its_module.<locals>.fetch"
    assert str(info.value).startswith(f"{name}: gave up after 2 attempts")


def test_cli_retry_errors_name_the_users_function(tmp_path: Any) -> None:
    """issue 12 item 11: the CLI and the dead-letter listing name the user's function."""
    import os
    import subprocess

    (tmp_path / "jobs.py").write_text("def boom(x):\n    raise ValueError(f'bad {x}')\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "amorsize", *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
            env=os.environ.copy(),
        )

    dlq = str(tmp_path / "failed.db")
    common = ["--data-range", "2", "--retries", "1", "--retry-delay", "0", "--chunksize", "1"]
    for backend, extra in (("serial", []), ("processes", ["--dead-letter", dlq])):
        p = cli("execute", "jobs:boom", "--backend", backend, *common, *extra)
        assert "jobs.boom: gave up after 2 attempts; last error: ValueError: bad 0" in p.stderr
        assert "<locals>" not in p.stderr and "_RetryingFunc" not in p.stderr
    listing = cli("dead-letter", dlq).stdout
    assert "jobs.boom: gave up after 2 attempts" in listing and "<locals>" not in listing
