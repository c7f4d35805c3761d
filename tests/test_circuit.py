"""Circuit breaker: policy validation, state machine (injected clock), entry points, threads."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import multiprocessing
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amorsize
from amorsize.circuit import (
    CircuitBreaker,
    CircuitBreakerPolicy,
    CircuitOpenError,
    CircuitState,
    circuit_observer,
    with_circuit_breaker,
)
from amorsize.retry import with_retry


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Boom(Exception):
    """The failure the tests inject."""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **policy: Any) -> CircuitBreaker:
    return CircuitBreaker(CircuitBreakerPolicy(**policy), name="t", clock=clock)


def fail(x: object = None) -> None:
    raise Boom(f"failed on {x!r}")


def ok(x: object = None) -> object:
    return x


def trip(breaker: CircuitBreaker, n: int) -> None:
    for i in range(n):
        with pytest.raises(Boom):
            breaker.call(fail, i)


# Module-level guarded function: pickles by reference into worker processes.
_module_breaker = CircuitBreaker(CircuitBreakerPolicy(failure_threshold=2), name="module")


@_module_breaker
def guarded_double(x: int) -> int:
    """Double x."""
    return 2 * x


# --- policy validation ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"failure_threshold": 0}, ValueError, "failure_threshold"),
        ({"failure_threshold": 2.5}, TypeError, "failure_threshold"),
        ({"failure_threshold": True}, TypeError, "failure_threshold"),
        ({"success_threshold": 0}, ValueError, "success_threshold"),
        ({"half_open_max_calls": 0}, ValueError, "half_open_max_calls"),
        ({"timeout": -1.0}, ValueError, "timeout"),
        ({"timeout": float("inf")}, ValueError, "timeout"),
        ({"timeout": float("nan")}, ValueError, "timeout"),
        ({"timeout": "10"}, TypeError, "timeout"),
        ({"failure_rate": 0.0}, ValueError, "failure_rate"),
        ({"failure_rate": 1.5}, ValueError, "failure_rate"),
        ({"failure_rate": "half"}, TypeError, "failure_rate"),
        ({"failure_rate": 0.5, "window": 5, "minimum_calls": 6}, ValueError, "minimum_calls"),
        ({"window": 0}, ValueError, "window"),
        ({"minimum_calls": 0}, ValueError, "minimum_calls"),
        ({"expected_exceptions": ()}, TypeError, "expected_exceptions"),
        ({"expected_exceptions": (ValueError, int)}, TypeError, "expected_exceptions"),
        ({"expected_exceptions": "ValueError"}, TypeError, "expected_exceptions"),
        ({"on_open": 3}, TypeError, "on_open"),
        ({"on_close": "x"}, TypeError, "on_close"),
        ({"on_half_open": 1.0}, TypeError, "on_half_open"),
    ],
)
def test_policy_rejects_bad_values(kwargs: dict[str, Any], error: type, words: str) -> None:
    """A bad policy value raises at once, naming the parameter and the value."""
    with pytest.raises(error, match=words) as info:
        CircuitBreakerPolicy(**kwargs)
    assert repr(kwargs[words]) in str(info.value)


def test_policy_normalises_values() -> None:
    """A single exception class becomes a tuple; int timeouts become floats."""
    p = CircuitBreakerPolicy(expected_exceptions=OSError, timeout=3, failure_rate=1)
    assert p.expected_exceptions == (OSError,)
    assert p.timeout == 3.0 and isinstance(p.timeout, float)
    assert p.failure_rate == 1.0


def test_policy_rate_parameters_are_keyword_only() -> None:
    """failure_rate and later parameters cannot be passed by position."""
    with pytest.raises(TypeError):
        CircuitBreakerPolicy(5, 2, 60.0, (Exception,), 0.5)  # type: ignore[misc]


def test_breaker_rejects_bad_arguments() -> None:
    """A non-policy or a non-callable clock is a TypeError."""
    with pytest.raises(TypeError, match="policy"):
        CircuitBreaker({"failure_threshold": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock"):
        CircuitBreaker(clock=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        CircuitBreaker()(42)  # type: ignore[call-overload]


# --- the state machine ----------------------------------------------------------------------
def test_closed_breaker_passes_calls_and_results(clock: FakeClock) -> None:
    """Closed: positional and keyword arguments and results go through unchanged."""
    b = make(clock)
    f = b(lambda a, b=0, *rest, **kw: (a, b, rest, kw))
    assert f(1) == (1, 0, (), {})
    assert f(1, 2, 3, k=4) == (1, 2, (3,), {"k": 4})
    assert b.state is CircuitState.CLOSED
    assert b.success_count == 2


@pytest.mark.parametrize("threshold", [1, 2, 5])
def test_opens_after_consecutive_failures(clock: FakeClock, threshold: int) -> None:
    """Exactly `failure_threshold` consecutive failures open the breaker."""
    b = make(clock, failure_threshold=threshold)
    trip(b, threshold - 1)
    assert b.state is CircuitState.CLOSED
    assert b.consecutive_failures == threshold - 1
    trip(b, 1)
    assert b.state is CircuitState.OPEN


def test_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    """A success between failures restarts the count."""
    b = make(clock, failure_threshold=3)
    trip(b, 2)
    assert b.call(ok, 1) == 1
    assert b.consecutive_failures == 0
    trip(b, 2)
    assert b.state is CircuitState.CLOSED


def test_open_breaker_fails_fast_without_calling(clock: FakeClock) -> None:
    """Open: the function is not called and the error says when calls resume."""
    b = make(clock, failure_threshold=1, timeout=30.0)
    calls = []
    f = b(lambda: calls.append(1))
    trip(b, 1)
    clock.advance(10.0)
    with pytest.raises(CircuitOpenError) as info:
        f()
    assert calls == []
    err = info.value
    assert err.name == "t"
    assert err.retry_after == pytest.approx(20.0)
    assert "'t'" in str(err) and "20 s" in str(err) and "Boom" in str(err)
    assert b.retry_after == pytest.approx(20.0)


def test_half_open_after_timeout_then_closes_after_success_threshold(clock: FakeClock) -> None:
    """After `timeout` the breaker probes; `success_threshold` successes close it."""
    b = make(clock, failure_threshold=1, timeout=5.0, success_threshold=3)
    trip(b, 1)
    clock.advance(4.999)
    assert b.state is CircuitState.OPEN
    clock.advance(0.001)
    assert b.state is CircuitState.HALF_OPEN
    for _ in range(2):
        b.call(ok)
        assert b.state is CircuitState.HALF_OPEN
    b.call(ok)
    assert b.state is CircuitState.CLOSED
    assert b.consecutive_failures == 0


def test_failed_probe_reopens_for_a_full_timeout(clock: FakeClock) -> None:
    """A failed probe reopens the breaker and restarts the timeout."""
    b = make(clock, failure_threshold=1, timeout=5.0)
    trip(b, 1)
    clock.advance(6.0)
    with pytest.raises(Boom):
        b.call(fail)
    assert b.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError) as info:
        b.call(ok)
    assert info.value.retry_after == pytest.approx(5.0)
    assert "probe" in str(info.value)


@pytest.mark.parametrize("max_calls", [1, 2, 3])
def test_half_open_admits_at_most_max_calls_probes(clock: FakeClock, max_calls: int) -> None:
    """Half-open: only `half_open_max_calls` probes run at once; the next is refused."""
    b = make(clock, failure_threshold=1, timeout=1.0, half_open_max_calls=max_calls,
             success_threshold=10)
    trip(b, 1)
    clock.advance(1.0)
    entered = []
    for _ in range(max_calls):
        b.__enter__()
        entered.append(1)
    with pytest.raises(CircuitOpenError) as info:
        b.__enter__()
    assert info.value.retry_after == 0.0
    assert "probe" in str(info.value)
    for _ in entered:
        b.__exit__(None, None, None)
    # Slots are free again.
    b.call(ok)


def test_probe_slots_held_by_threads(clock: FakeClock) -> None:
    """Probes running in several threads at once are capped by `half_open_max_calls`."""
    b = make(clock, failure_threshold=1, timeout=1.0, half_open_max_calls=2, success_threshold=5)
    trip(b, 1)
    clock.advance(1.0)
    release = threading.Event()
    started = threading.Barrier(3)
    outcomes: list[str] = []
    lock = threading.Lock()

    def probe() -> None:
        started.wait()
        release.wait(5)

    def worker() -> None:
        try:
            b.call(probe)
            result = "ran"
        except CircuitOpenError:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    started.wait(5)  # the two admitted probes are inside `probe`
    # The three others were refused without waiting.
    for _ in range(200):
        with lock:
            if outcomes.count("refused") == 3:
                break
        threading.Event().wait(0.005)
    release.set()
    for t in threads:
        t.join(5)
    assert sorted(outcomes) == ["ran", "ran", "refused", "refused", "refused"]


def test_unexpected_exceptions_propagate_and_do_not_count(clock: FakeClock) -> None:
    """An exception outside `expected_exceptions` is neither a failure nor a success."""
    b = make(clock, failure_threshold=2, expected_exceptions=(ConnectionError,))

    def type_error() -> None:
        raise TypeError("bug")

    for _ in range(5):
        with pytest.raises(TypeError, match="bug"):
            b.call(type_error)
    assert b.state is CircuitState.CLOSED and b.failure_count == 0

    def conn() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        b.call(conn)
    with pytest.raises(TypeError):
        b.call(type_error)
    assert b.consecutive_failures == 1  # not reset by the unexpected error
    with pytest.raises(ConnectionError):
        b.call(conn)
    assert b.state is CircuitState.OPEN


def test_unexpected_exception_in_a_probe_frees_the_slot(clock: FakeClock) -> None:
    """A probe that raises an uncounted exception leaves the breaker half-open, slot freed."""
    b = make(clock, failure_threshold=1, timeout=1.0, expected_exceptions=Boom)
    trip(b, 1)
    clock.advance(1.0)
    with pytest.raises(KeyError):
        b.call(lambda: {}["x"])
    assert b.state is CircuitState.HALF_OPEN
    b.call(ok)  # the slot is free again


def test_keyboard_interrupt_is_not_a_failure(clock: FakeClock) -> None:
    """BaseExceptions such as KeyboardInterrupt pass through uncounted by default."""
    b = make(clock, failure_threshold=1)

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        b.call(interrupt)
    assert b.state is CircuitState.CLOSED


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        # rate 0.5 over a window of 4 with minimum_calls 4
        ("FFF", CircuitState.CLOSED),  # 3 calls < minimum_calls
        ("FFFF", CircuitState.OPEN),
        ("SSFF", CircuitState.OPEN),  # 2/4 = 0.5
        ("SSSF", CircuitState.CLOSED),  # 1/4
        ("SSSSSSFSF", CircuitState.OPEN),  # window S S F S F... last 4 = S F S F -> 0.5
        ("FSSSSF", CircuitState.CLOSED),  # the first F slid out: last 4 = S S S F
    ],
)
def test_failure_rate_over_sliding_window(
    clock: FakeClock, outcomes: str, expected: CircuitState
) -> None:
    """The rate rule counts the last `window` calls and waits for `minimum_calls`."""
    b = make(clock, failure_rate=0.5, window=4, minimum_calls=4, failure_threshold=1)
    for o in outcomes:
        if b.state is not CircuitState.CLOSED:
            break
        if o == "S":
            b.call(ok)
        else:
            with pytest.raises(Boom):
                b.call(fail)
    assert b.state is expected


def test_rate_rule_replaces_the_consecutive_rule(clock: FakeClock) -> None:
    """With failure_rate set, failure_threshold consecutive failures do not trip early."""
    b = make(clock, failure_threshold=2, failure_rate=0.9, window=10, minimum_calls=10)
    trip(b, 9)
    assert b.state is CircuitState.CLOSED
    trip(b, 1)
    assert b.state is CircuitState.OPEN
    assert "10 of the last 10 calls failed" in str(b.open_error())


# --- generations: stale outcomes never move a breaker that moved on ------------------------
def test_success_of_a_call_admitted_before_a_trip_is_ignored(clock: FakeClock) -> None:
    """A call in flight while the breaker opens cannot close or reset it."""
    b = make(clock, failure_threshold=2)
    b.__enter__()  # admitted while closed
    b.open("by test")
    b.__exit__(None, None, None)
    assert b.state is CircuitState.OPEN


def test_stale_probe_outcome_is_ignored(clock: FakeClock) -> None:
    """A probe that finishes after the breaker reopened does not close it."""
    b = make(clock, failure_threshold=1, timeout=1.0, success_threshold=1, half_open_max_calls=2)
    trip(b, 1)
    clock.advance(1.0)
    b.__enter__()  # probe 1
    with pytest.raises(Boom):
        b.call(fail)  # probe 2 fails: reopened
    b.__exit__(None, None, None)  # probe 1 succeeds late
    assert b.state is CircuitState.OPEN


# --- property: a random run never violates the state machine --------------------------------
class Model:
    """A direct transcription of the documented rules, to compare the breaker against."""

    def __init__(self, policy: CircuitBreakerPolicy) -> None:
        self.p = policy
        self.state = "closed"
        self.consecutive = 0
        self.window: list[bool] = []
        self.opened_at = 0.0
        self.probe_ok = 0

    def admit(self, now: float) -> bool:
        if self.state == "open":
            if now - self.opened_at < self.p.timeout:
                return False
            self.state, self.probe_ok = "half-open", 0
        return True

    def outcome(self, failed: bool, now: float) -> None:
        if self.state == "half-open":
            if failed:
                self.state, self.opened_at = "open", now
            else:
                self.probe_ok += 1
                if self.probe_ok >= self.p.success_threshold:
                    self.state, self.consecutive, self.window = "closed", 0, []
            return
        self.consecutive = self.consecutive + 1 if failed else 0
        if self.p.failure_rate is None:
            tripped = self.consecutive >= self.p.failure_threshold
        else:
            self.window = ([*self.window, failed])[-self.p.window :]
            n = len(self.window)
            tripped = failed and n >= self.p.minimum_calls and sum(self.window) >= self.p.failure_rate * n
        if tripped:
            self.state, self.opened_at, self.consecutive, self.window = "open", now, 0, []


@pytest.mark.parametrize("opened_at", [1014.56931502570535, 0.1, 1e6 + 0.3])
def test_state_and_admission_agree_at_the_timeout(opened_at: float) -> None:
    """At the float-rounded end of the timeout, a call is refused exactly while state is open."""
    clock = FakeClock()
    clock.now = opened_at
    b = CircuitBreaker(CircuitBreakerPolicy(failure_threshold=1, timeout=10.0), clock=clock)
    trip(b, 1)
    clock.advance(10.0)  # opened_at + 10.0 - opened_at may round below 10.0
    open_now = b.state is CircuitState.OPEN
    try:
        b.call(ok)
        refused = False
    except CircuitOpenError:
        refused = True
    assert refused == open_now


events = st.lists(
    st.one_of(st.just("S"), st.just("F"), st.floats(min_value=0.0, max_value=20.0)),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(
    events=events,
    threshold=st.integers(1, 4),
    success_threshold=st.integers(1, 3),
    rate=st.one_of(st.none(), st.sampled_from([0.25, 0.5, 1.0])),
    window=st.integers(1, 6),
)
def test_random_runs_follow_the_documented_rules(
    events: list[object], threshold: int, success_threshold: int, rate: float | None, window: int
) -> None:
    """For any sequence of outcomes and clock moves, the breaker matches the rule model."""
    clock = FakeClock()
    policy = CircuitBreakerPolicy(
        failure_threshold=threshold, success_threshold=success_threshold, timeout=10.0,
        failure_rate=rate, window=window, minimum_calls=max(1, window // 2),
    )
    b = CircuitBreaker(policy, clock=clock)
    model = Model(policy)
    for ev in events:
        if isinstance(ev, float):
            clock.advance(ev)
            continue
        admitted = model.admit(clock.now)
        try:
            b.call(fail if ev == "F" else ok)
            ran = True
        except Boom:
            ran = True
        except CircuitOpenError as err:
            ran = False
            assert 0.0 < err.retry_after <= policy.timeout
        assert ran == admitted
        if admitted:
            model.outcome(ev == "F", clock.now)
        assert str(b.state) == model.state
        if b.state is CircuitState.CLOSED and rate is None:
            assert b.consecutive_failures < threshold


# --- callbacks ------------------------------------------------------------------------------
def test_callbacks_fire_once_per_transition(clock: FakeClock) -> None:
    """on_open, on_half_open and on_close get the breaker, once per transition."""
    seen: list[tuple[str, CircuitState]] = []
    b = make(
        clock, failure_threshold=1, timeout=1.0, success_threshold=1,
        on_open=lambda br: seen.append(("open", br.state)),
        on_half_open=lambda br: seen.append(("half_open", CircuitState(br._core.state))),
        on_close=lambda br: seen.append(("close", br.state)),
    )
    trip(b, 1)
    clock.advance(1.0)
    b.call(ok)
    assert seen == [
        ("open", CircuitState.OPEN),
        ("half_open", CircuitState.HALF_OPEN),
        ("close", CircuitState.CLOSED),
    ]


def test_failing_callback_is_logged_not_raised(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback error is logged on the amorsize logger; the breaker still opens."""

    def bad(_: CircuitBreaker) -> None:
        raise RuntimeError("callback broke")

    b = make(clock, failure_threshold=1, on_open=bad)
    with caplog.at_level(logging.WARNING, logger="amorsize"), pytest.raises(Boom):
        b.call(fail)
    assert b.state is CircuitState.OPEN
    assert any("callback raised" in r.getMessage() and r.exc_info for r in caplog.records)


# --- entry points ---------------------------------------------------------------------------
def test_decorator_keeps_metadata_and_signature() -> None:
    """The guarded function keeps name, doc, module, wrapped and signature."""
    assert guarded_double.__name__ == "guarded_double"
    assert guarded_double.__doc__ == "Double x."
    assert guarded_double.__module__ == __name__
    assert str(inspect.signature(guarded_double)) == "(x: 'int') -> 'int'"
    assert guarded_double.__wrapped__(3) == 6  # type: ignore[attr-defined]
    assert guarded_double.circuit_breaker is _module_breaker  # type: ignore[attr-defined]
    assert "guarded_double" in repr(guarded_double)


def test_guarded_function_pickles_by_reference() -> None:
    """A module-level guarded function pickles by name, like the function it replaced."""
    assert pickle.loads(pickle.dumps(guarded_double)) is guarded_double


def test_guarded_function_runs_in_worker_processes() -> None:
    """Guarded functions run in a real process pool (each worker has its own breaker)."""
    # fork: the test module is importable only in this process (pytest's importlib mode).
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        assert list(pool.map(guarded_double, range(6))) == [0, 2, 4, 6, 8, 10]


def test_guarded_lambda_pickles_by_value_with_a_fresh_breaker() -> None:
    """A guarded lambda travels by value (cloudpickle): same policy and name, fresh state."""
    cloudpickle = pytest.importorskip("cloudpickle")
    b = CircuitBreaker(CircuitBreakerPolicy(failure_threshold=7, timeout=9.0), name="api")
    b.open("by test")
    g = b(lambda x: x * 3)
    back = pickle.loads(cloudpickle.dumps(g))
    assert back(2) == 6
    other = back.circuit_breaker
    assert other is not b and other.name == "api" and other.policy == b.policy
    assert other.state is CircuitState.CLOSED


def test_guarded_closure_runs_in_execute_worker_processes() -> None:
    """execute sends a guarded closure to real worker processes."""
    k = 5
    g = CircuitBreaker(name="closure")(lambda x: x + k)
    assert amorsize.execute(g, range(6), backend="processes", n_jobs=2) == [5, 6, 7, 8, 9, 10]


def test_breaker_pickles_policy_and_name_not_state() -> None:
    """Pickling a breaker gives a closed breaker with the same policy and name."""
    b = CircuitBreaker(CircuitBreakerPolicy(failure_threshold=2), name="db")
    b.open()
    back = pickle.loads(pickle.dumps(b))
    assert (back.name, back.policy, back.state) == ("db", b.policy, CircuitState.CLOSED)


def test_decorated_method_binds_self(clock: FakeClock) -> None:
    """A guarded method receives its instance."""
    b = make(clock)

    class Client:
        def __init__(self) -> None:
            self.base = 10

        @b
        def get(self, x: int) -> int:
            return self.base + x

    assert Client().get(1) == 11
    assert Client.get.__name__ == "get"


def test_one_breaker_shared_by_two_functions(clock: FakeClock) -> None:
    """Failures of one guarded function open the breaker for the other too."""
    b = make(clock, failure_threshold=2)
    f, g = b(fail), b(ok)
    for _ in range(2):
        with pytest.raises(Boom):
            f(0)
    with pytest.raises(CircuitOpenError):
        g(1)


def test_context_manager_counts_outcomes(clock: FakeClock) -> None:
    """`with breaker:` counts the block's exception as a failure and re-raises it."""
    b = make(clock, failure_threshold=2)
    for _ in range(2):
        with pytest.raises(Boom), b:
            raise Boom("in block")
    assert b.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError), b:
        pytest.fail("the block must not run")


def test_with_circuit_breaker_forms(clock: FakeClock) -> None:
    """Bare, with parameters, with a policy and with a shared breaker."""

    @with_circuit_breaker
    def a(x: int) -> int:
        return x

    @with_circuit_breaker(failure_threshold=1, name="b", clock=clock)
    def b(x: int) -> int:
        raise Boom

    shared = make(clock)

    @with_circuit_breaker(breaker=shared)
    def c(x: int) -> int:
        return x

    @with_circuit_breaker(policy=CircuitBreakerPolicy(timeout=1.0))
    def d(x: int) -> int:
        return x

    assert a(1) == c(1) == d(1) == 1
    assert c.circuit_breaker is shared  # type: ignore[attr-defined]
    assert d.circuit_breaker.policy.timeout == 1.0  # type: ignore[attr-defined]
    with pytest.raises(Boom):
        b(1)
    with pytest.raises(CircuitOpenError, match="'b'"):
        b(1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"breaker": CircuitBreaker(), "failure_threshold": 3},
        {"breaker": CircuitBreaker(), "name": "x"},
        {"policy": CircuitBreakerPolicy(), "timeout": 3.0},
        {"breaker": "not a breaker"},
    ],
)
def test_with_circuit_breaker_rejects_conflicting_arguments(kwargs: dict[str, Any]) -> None:
    """A shared breaker or a policy together with inline parameters is an error."""
    with pytest.raises(TypeError):
        with_circuit_breaker(**kwargs)


def test_async_function_outcome_counts_after_await(clock: FakeClock) -> None:
    """An `async def` is guarded around its awaited outcome, not its coroutine creation."""
    b = make(clock, failure_threshold=2)

    @b
    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        if x < 0:
            raise Boom("negative")
        return x

    async def main() -> None:
        assert await fetch(2) == 2
        for _ in range(2):
            with pytest.raises(Boom):
                await fetch(-1)
        with pytest.raises(CircuitOpenError):
            await fetch(1)

    asyncio.run(main())
    assert inspect.iscoroutinefunction(fetch)
    assert b.failure_count == 2


def test_manual_control(clock: FakeClock) -> None:
    """open(), close(), record_success() and record_failure() drive the breaker by hand."""
    b = make(clock, failure_threshold=2, timeout=5.0)
    b.open("maintenance")
    assert b.state is CircuitState.OPEN and not b.allows_calls()
    assert "maintenance" in str(b.open_error())
    b.close()
    assert b.state is CircuitState.CLOSED and b.allows_calls()
    b.record_failure()
    b.record_failure(ValueError("x"))
    assert b.state is CircuitState.OPEN
    clock.advance(5.0)
    assert b.allows_calls()
    b.record_success()
    b.record_success()
    assert b.state is CircuitState.CLOSED
    assert "closed" in repr(b)


# --- CircuitOpenError -----------------------------------------------------------------------
def test_open_error_pickles_with_attributes_and_message() -> None:
    """CircuitOpenError survives pickling (it crosses process boundaries)."""
    err = CircuitOpenError("db", 12.5, reason="3 consecutive failures").with_counts(7, 3, 90)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is CircuitOpenError
    assert (back.name, back.retry_after, back.reason) == ("db", 12.5, "3 consecutive failures")
    assert (back.completed, back.failed, back.not_attempted) == (7, 3, 90)
    assert back.retry_at == err.retry_at
    assert str(back) == str(err)
    assert "7 items completed, 3 failed, 90 not attempted" in str(back)


# --- threads --------------------------------------------------------------------------------
def test_concurrent_calls_lose_no_counts() -> None:
    """8 threads calling one breaker: every success and failure is counted."""
    b = CircuitBreaker(CircuitBreakerPolicy(failure_threshold=10**9))
    n = 2000
    f, g = b(ok), b(fail)

    def worker(k: int) -> None:
        for i in range(n):
            if (i + k) % 3 == 0:
                with pytest.raises(Boom):
                    g(i)
            else:
                f(i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.success_count + b.failure_count == 8 * n
    assert b.failure_count == sum(1 for k in range(8) for i in range(n) if (i + k) % 3 == 0)


def test_concurrent_failures_open_once() -> None:
    """Many threads failing at once open the breaker exactly once."""
    opened: list[int] = []
    b = CircuitBreaker(
        CircuitBreakerPolicy(failure_threshold=5, timeout=60.0, on_open=lambda _: opened.append(1))
    )
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for _ in range(50):
            with contextlib.suppress(Boom, CircuitOpenError):
                b.call(fail)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.state is CircuitState.OPEN
    assert opened == [1]


# --- composition with retry -----------------------------------------------------------------
def test_breaker_outside_retry_counts_one_failure_per_logical_call(clock: FakeClock) -> None:
    """with_circuit_breaker(with_retry(f)): retries happen inside, one failure counted."""
    calls: list[int] = []

    def flaky(x: int) -> int:
        calls.append(x)
        raise Boom

    b = make(clock, failure_threshold=2)
    f = b(with_retry(max_retries=2, initial_delay=0.0, reraise=True)(flaky))
    with pytest.raises(Boom):
        f(1)
    assert len(calls) == 3 and b.failure_count == 1 and b.state is CircuitState.CLOSED
    with pytest.raises(Boom):
        f(2)
    assert b.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        f(3)
    assert len(calls) == 6


def test_retry_outside_breaker_counts_each_attempt(clock: FakeClock) -> None:
    """with_retry(with_circuit_breaker(f)): each attempt is a breaker call."""
    calls: list[int] = []

    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise Boom
        return x

    b = make(clock, failure_threshold=5)
    f = with_retry(max_retries=5, initial_delay=0.0)(b(flaky))
    assert f(7) == 7
    assert b.failure_count == 2 and b.success_count == 1


def test_open_circuit_is_not_retried_by_default(clock: FakeClock) -> None:
    """with_retry(with_circuit_breaker(f)): once open, CircuitOpenError ends the retrying."""
    calls: list[int] = []

    def down(x: int) -> int:
        calls.append(x)
        raise Boom

    retries: list[BaseException | None] = []
    b = make(clock, failure_threshold=2)
    f = with_retry(
        max_retries=10, initial_delay=0.0, reraise=True,
        on_retry=lambda exc, attempt, delay: retries.append(exc),
    )(b(down))
    with pytest.raises(CircuitOpenError):
        f(1)
    assert len(calls) == 2
    assert [type(e) for e in retries] == [Boom, Boom]  # no retry after the circuit opened


def test_open_circuit_is_retried_when_asked(clock: FakeClock) -> None:
    """Naming CircuitOpenError in retry_on_exceptions retries through the open state."""
    calls: list[int] = []

    def down_then_up(x: int) -> int:
        calls.append(x)
        if len(calls) <= 1:
            raise Boom
        return x

    b = make(clock, failure_threshold=1, timeout=1.0, success_threshold=1)
    # on_retry moves the fake clock past the timeout, standing in for the backoff sleep.
    f = with_retry(
        max_retries=3, initial_delay=0.0, retry_on_exceptions=(Boom, CircuitOpenError),
        on_retry=lambda exc, attempt, delay: clock.advance(1.0),
    )(b(down_then_up))
    assert f(5) == 5
    assert b.state is CircuitState.CLOSED


# --- execute observer -----------------------------------------------------------------------
def test_circuit_observer_accepts_breaker_policy_or_true() -> None:
    """The factory takes a shared breaker, a policy or True; anything else is a TypeError."""
    shared = CircuitBreaker(name="shared")
    assert circuit_observer(shared).breaker is shared
    assert circuit_observer(CircuitBreakerPolicy(timeout=2.0)).breaker.policy.timeout == 2.0
    assert circuit_observer(True).breaker.name == "execute"
    with pytest.raises(TypeError, match="circuit_breaker"):
        circuit_observer("yes")  # type: ignore[arg-type]


def test_circuit_observer_stops_dispatch_when_open(clock: FakeClock) -> None:
    """The observer allows dispatch until failures open the breaker, then stops for good."""
    b = make(clock, failure_threshold=2, timeout=5.0)
    obs = circuit_observer(b)
    obs.begin(ok)
    assert obs.allow_dispatch()
    obs.on_success(0, 0, 0)
    assert obs.on_failure(1, 1, Boom("x"), 1) is False
    assert obs.allow_dispatch()
    obs.on_failure(2, 2, Boom("y"), 1)
    assert not obs.allow_dispatch()
    clock.advance(10.0)
    assert not obs.allow_dispatch()  # stopped for the rest of the run
    err = obs.stop_error({"completed": 1, "failed": 2, "not_attempted": None})
    assert isinstance(err, CircuitOpenError)
    assert "1 items completed, 2 failed, the rest not attempted" in str(err)
    obs.end(False)


def test_circuit_observer_block_of_successes(clock: FakeClock) -> None:
    """A block of successes counts each item and resets the consecutive failures."""
    b = make(clock, failure_threshold=3)
    obs = circuit_observer(b)
    obs.on_failure(0, 0, Boom("x"), 1)
    obs.on_failure(1, 1, Boom("x"), 1)
    obs.on_success_block(2, [2, 3, 4], [2, 3, 4])
    assert b.consecutive_failures == 0 and b.success_count == 3
    obs.on_failure(5, 5, Boom("x"), 1)
    assert obs.allow_dispatch()


def test_public_names_are_exported() -> None:
    """The circuit API is importable from the package."""
    for name in ("CircuitBreaker", "CircuitBreakerPolicy", "CircuitOpenError",
                 "CircuitState", "with_circuit_breaker"):
        assert getattr(amorsize, name) is getattr(amorsize.circuit, name)


# --- through execute ------------------------------------------------------------------------
def fails_from_10(x: int) -> int:
    if x >= 10:
        raise Boom(f"item {x}")
    return x


def test_execute_stops_dispatch_when_the_circuit_opens_collect(tmp_path: Any) -> None:
    """collect mode: items after the trip are reported not attempted with CircuitOpenError."""
    policy = CircuitBreakerPolicy(failure_threshold=3, timeout=60.0)
    out, plan = amorsize.execute(
        fails_from_10, range(40), circuit_breaker=policy, on_error="collect",
        backend="serial", chunksize=1, return_plan=True,
    )
    assert out[:10] == list(range(10))
    failures = [v for v in out if isinstance(v, amorsize.ItemFailure)]
    assert [f.index for f in failures] == list(range(10, 40))
    assert all(isinstance(f.exception, Boom) for f in failures[:3])
    rest = failures[3:]
    assert all(isinstance(f.exception, CircuitOpenError) and f.attempts == 0 for f in rest)
    err = rest[0].exception
    assert (err.completed, err.failed, err.not_attempted) == (10, 3, 27)
    assert (plan.completed, plan.failed, plan.not_attempted) == (10, 3, 27)


def test_execute_raises_circuit_open_with_counts(tmp_path: Any) -> None:
    """raise mode with a dead-letter queue: the run goes on until the circuit opens."""
    breaker = CircuitBreaker(CircuitBreakerPolicy(failure_threshold=3), name="upstream")
    with pytest.raises(CircuitOpenError) as info:
        amorsize.execute(
            fails_from_10, range(40), circuit_breaker=breaker,
            dead_letter=tmp_path / "failed.db", backend="serial", chunksize=1,
        )
    err = info.value
    assert err.name == "upstream"
    assert (err.completed, err.failed, err.not_attempted) == (10, 3, 27)
    assert "10 items completed, 3 failed, 27 not attempted" in str(err)
    assert len(amorsize.DeadLetterQueue(tmp_path / "failed.db")) == 3


def test_execute_with_an_open_breaker_runs_nothing() -> None:
    """A breaker already open refuses the whole run at once."""
    calls: list[int] = []
    breaker = CircuitBreaker(CircuitBreakerPolicy(timeout=60.0))
    breaker.open("maintenance")
    with pytest.raises(CircuitOpenError, match="maintenance") as info:
        amorsize.execute(calls.append, range(5), circuit_breaker=breaker, backend="serial",
                         chunksize=1)
    assert calls == [] and info.value.completed == 0


def test_execute_on_processes_accounts_for_every_item() -> None:
    """Real worker processes: in-flight items finish, every item is accounted for once."""
    policy = CircuitBreakerPolicy(failure_threshold=2)
    out, plan = amorsize.execute(
        fails_from_10, range(200), circuit_breaker=policy, on_error="collect",
        backend="processes", n_jobs=2, chunksize=1, return_plan=True,
    )
    assert len(out) == 200
    assert out[:10] == list(range(10))
    assert plan.completed + plan.failed + plan.not_attempted == 200
    assert plan.failed >= 2 and plan.not_attempted > 0
    assert all(v.index == i for i, v in enumerate(out) if isinstance(v, amorsize.ItemFailure))
    skipped = [v for v in out if isinstance(v, amorsize.ItemFailure) and v.attempts == 0]
    assert len(skipped) == plan.not_attempted
    assert all(isinstance(v.exception, CircuitOpenError) for v in skipped)
    # Dispatch stopped: everything not attempted comes after everything attempted.
    assert min(v.index for v in skipped) > max(
        i for i, v in enumerate(out) if not (isinstance(v, amorsize.ItemFailure) and v.attempts == 0)
    )
