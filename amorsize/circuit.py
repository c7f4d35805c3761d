"""Circuit breaker: stop calling a dependency that keeps failing, probe it again later.

A breaker is CLOSED while calls succeed. When the trip rule is met (``failure_threshold``
consecutive failures, or, when ``failure_rate`` is set, that failure ratio over the last
``window`` calls once at least ``minimum_calls`` were made) it turns OPEN: calls fail at once
with :class:`CircuitOpenError` for ``timeout`` seconds. Then it is HALF_OPEN: up to
``half_open_max_calls`` probe calls go through at a time; ``success_threshold`` successful
probes close it, one failed probe opens it again for another ``timeout``.

Where the work happens::

    guarded(x) ──▶ _core.CircuitGuarded (compiled, vectorcall)
                     │ state == CLOSED ─▶ func(x) ─▶ success: C counters, no lock
                     │                          └─▶ failure: CircuitBreaker._settle (lock)
                     └ OPEN / HALF_OPEN ─▶ CircuitBreaker._admit (lock) ─▶ probe or
                                           CircuitOpenError

The closed success path runs without a lock; ``_core_circuit.pxi`` explains why that is safe
under the GIL. Breaker state lives in one process: a guarded module-level function pickled
into a worker process refers to that process's own breaker; a guarded lambda or closure is
pickled by value with a fresh breaker (same policy and name). To guard a whole ``execute`` run from the
parent, pass ``circuit_breaker=`` to ``execute``.

Composing with :func:`amorsize.with_retry`:

* ``with_retry(with_circuit_breaker(f))``: each attempt goes through the breaker, so each
  failed attempt counts; once the breaker opens, the ``CircuitOpenError`` ends the retrying
  (it is not retried unless ``retry_on_exceptions`` names it).
* ``with_circuit_breaker(with_retry(f))``: the breaker sees one call per logical call and
  counts a failure only when the retries are exhausted.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from enum import IntEnum
from types import TracebackType
from typing import Any, TypeVar, cast, overload

from amorsize._core import (
    CIRCUIT_CLOSED,
    CIRCUIT_HALF_OPEN,
    CIRCUIT_OPEN,
    CircuitCore,
    CircuitGuarded,
)
from amorsize._format import describe_error
from amorsize._log import log_breaker_transition
from amorsize._observers import RunObserver
from amorsize._telemetry import record_circuit_refusal, record_circuit_transition
from amorsize._validate import (
    MAX_SECONDS,
    check_callable,
    check_exception_types,
    check_int,
    check_number,
    fail,
)

__all__ = [
    "CircuitBreaker",
    "CircuitBreakerPolicy",
    "CircuitOpenError",
    "CircuitState",
    "circuit_observer",
    "with_circuit_breaker",
]

logger = logging.getLogger("amorsize.circuit")

F = TypeVar("F", bound=Callable[..., Any])

#: Default length of the sliding window for the failure-rate rule, in calls (the common
#: choice in resilience libraries: long enough that one failure is not a 10% swing).
DEFAULT_WINDOW = 100
#: Default number of calls the window must hold before the failure-rate rule may trip.
DEFAULT_MINIMUM_CALLS = 10


class CircuitState(IntEnum):
    """The three states of a breaker (values shared with the compiled core)."""

    CLOSED = CIRCUIT_CLOSED
    OPEN = CIRCUIT_OPEN
    HALF_OPEN = CIRCUIT_HALF_OPEN

    def __str__(self) -> str:
        return self.name.lower().replace("_", "-")


class CircuitOpenError(Exception):
    """Raised instead of calling through an open breaker.

    ``retry_after`` is how many seconds after the error was raised the breaker lets a call
    through again (0.0 when it is half-open and its probe slots are busy: a slot frees when a
    probe finishes). ``retry_at`` is the same moment as a wall-clock ``time.time()`` value,
    meaningful in other processes too. When raised by ``execute``, ``completed``,
    ``failed`` and ``not_attempted`` count the run's items.

    >>> err = CircuitOpenError("db", 2.5, reason="5 consecutive failures")
    >>> err.retry_after, "db" in str(err)
    (2.5, True)
    """

    def __init__(
        self,
        name: str,
        retry_after: float,
        *,
        reason: str = "",
        retry_at: float | None = None,
        completed: int | None = None,
        failed: int | None = None,
        not_attempted: int | None = None,
    ) -> None:
        self.name = name
        self.retry_after = retry_after
        self.reason = reason
        self.retry_at = time.time() + retry_after if retry_at is None else retry_at
        self.completed = completed
        self.failed = failed
        self.not_attempted = not_attempted
        # The message is built when shown, not when raised: an open breaker refuses calls
        # in a tight loop, and formatting times costs more than the refusal itself.
        super().__init__(name, retry_after)

    def __str__(self) -> str:
        return self._message()

    def _message(self) -> str:
        what = f"circuit breaker {self.name!r} is open"
        if self.reason:
            what += f" ({self.reason})"
        if self.retry_after > 0:
            when = time.strftime("%H:%M:%S", time.gmtime(self.retry_at))
            what += f"; it lets a call through again in {self.retry_after:.3g} s ({when} UTC)"
        else:
            what += "; it lets a call through again when a running probe call finishes"
        if self.completed is not None:
            what += (
                f"; execute stopped dispatching: {self.completed} items completed,"
                f" {self.failed or 0} failed, "
                + (
                    "the rest not attempted"
                    if self.not_attempted is None
                    else f"{self.not_attempted} not attempted"
                )
            )
        return what

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {
            "reason": self.reason,
            "retry_at": self.retry_at,
            "completed": self.completed,
            "failed": self.failed,
            "not_attempted": self.not_attempted,
        }
        return (_rebuild_open_error, (self.name, self.retry_after, kwargs))

    def with_counts(
        self, completed: int, failed: int, not_attempted: int | None
    ) -> CircuitOpenError:
        """A copy of this error that also reports how far an ``execute`` run got."""
        return CircuitOpenError(
            self.name,
            self.retry_after,
            reason=self.reason,
            retry_at=self.retry_at,
            completed=completed,
            failed=failed,
            not_attempted=not_attempted,
        )


def _rebuild_open_error(name: str, retry_after: float, kwargs: dict[str, Any]) -> CircuitOpenError:
    return CircuitOpenError(name, retry_after, **kwargs)


_WHERE = "CircuitBreakerPolicy: "
# The breaker keeps one byte per call of its window.
_MAX_WINDOW = 1_000_000


@dataclass(frozen=True)
class CircuitBreakerPolicy:
    """When a breaker opens, how long it stays open, and how it closes again; validated once.

    * ``failure_threshold``: consecutive failures that open a closed breaker (the rule used
      when ``failure_rate`` is None).
    * ``failure_rate``: if set (0 < rate <= 1), replaces the consecutive rule: the breaker
      opens when, over the last ``window`` calls, ``failures / calls >= failure_rate`` and
      ``calls >= minimum_calls``.
    * ``timeout``: seconds a breaker stays open before letting probes through.
    * ``half_open_max_calls``: probe calls allowed at the same time while half-open.
    * ``success_threshold``: successful probes that close a half-open breaker.
    * ``expected_exceptions``: exceptions that count as failures; others propagate and
      count as neither success nor failure.
    * ``on_open``, ``on_close``, ``on_half_open``: called with the breaker after each
      transition, outside its lock; an error they raise is logged on the ``amorsize`` logger.

    >>> CircuitBreakerPolicy(failure_threshold=3, timeout=30.0).failure_threshold
    3
    >>> CircuitBreakerPolicy(failure_rate=0.5, window=20, minimum_calls=10).failure_rate
    0.5
    """

    failure_threshold: int = 5
    success_threshold: int = 2
    timeout: float = 60.0
    expected_exceptions: tuple[type[BaseException], ...] = (Exception,)
    _: KW_ONLY
    failure_rate: float | None = None
    window: int = DEFAULT_WINDOW
    minimum_calls: int = DEFAULT_MINIMUM_CALLS
    half_open_max_calls: int = 1
    on_open: Callable[[CircuitBreaker], object] | None = None
    on_close: Callable[[CircuitBreaker], object] | None = None
    on_half_open: Callable[[CircuitBreaker], object] | None = None

    def __post_init__(self) -> None:
        for name in ("failure_threshold", "success_threshold", "half_open_max_calls"):
            object.__setattr__(self, name, check_int(_WHERE, name, getattr(self, name), 1))
        for name, high in (("window", _MAX_WINDOW), ("minimum_calls", _MAX_WINDOW)):
            object.__setattr__(self, name, check_int(_WHERE, name, getattr(self, name), 1, high))
        timeout = check_number(_WHERE, "timeout", self.timeout, 0, MAX_SECONDS, note=" (seconds)")
        object.__setattr__(self, "timeout", timeout)
        rate = check_number(
            _WHERE, "failure_rate", self.failure_rate, 0, 1, low_open=True, none=True,
            note=" (e.g. 0.5: half the calls)",
        )
        if rate is not None:
            if self.minimum_calls > self.window:
                # The window never holds more calls than its length: the breaker could
                # never open.
                fail(
                    ValueError, _WHERE, "minimum_calls", f"<= window ({self.window})",
                    self.minimum_calls, " with failure_rate set",
                    fix="lower minimum_calls or raise window",
                )  # fmt: skip
            object.__setattr__(self, "failure_rate", rate)
        exceptions = check_exception_types(
            _WHERE, "expected_exceptions", self.expected_exceptions,
            " (e.g. (ConnectionError, TimeoutError))",
        )  # fmt: skip
        object.__setattr__(self, "expected_exceptions", exceptions)
        for name in ("on_open", "on_close", "on_half_open"):
            check_callable(_WHERE, name, getattr(self, name), "a callable taking the breaker",
                           none=True)


class CircuitBreaker:
    """A named, thread-safe circuit breaker, shareable between functions.

    Use it as a decorator, with :meth:`call`, or as a context manager. ``clock`` returns
    seconds (``time.monotonic`` by default); tests inject a fake one to move time by hand.

    >>> breaker = CircuitBreaker(CircuitBreakerPolicy(failure_threshold=2), name="db")
    >>> @breaker
    ... def fetch(key):
    ...     return key.upper()
    >>> fetch("a"), breaker.state
    ('A', <CircuitState.CLOSED: 0>)
    >>> with breaker:
    ...     pass
    >>> breaker.call(len, "abc")
    3
    """

    def __init__(
        self,
        policy: CircuitBreakerPolicy | None = None,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy is None:
            policy = CircuitBreakerPolicy()
        given: object = policy
        if not isinstance(given, CircuitBreakerPolicy):
            fail(TypeError, "CircuitBreaker: ", "policy", "a CircuitBreakerPolicy or None", given)
        check_callable("CircuitBreaker: ", "clock", clock, "a callable returning seconds")
        self._policy = policy
        self._name = name if name is not None else f"breaker-{id(self):x}"
        self._clock = clock
        self._lock = threading.Lock()
        rate = -1.0 if policy.failure_rate is None else policy.failure_rate
        self._core = CircuitCore(
            policy.failure_threshold, rate, policy.window, policy.minimum_calls
        )
        self._expected = policy.expected_exceptions
        self._opened_at = 0.0
        self._probes = 0
        self._probe_successes = 0
        self._reason = ""
        self._previous = CircuitState.CLOSED  # the state before the last transition (logs)
        self._local = threading.local()

    # --- introspection --------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The breaker's name, used in errors and logs."""
        return self._name

    @property
    def policy(self) -> CircuitBreakerPolicy:
        """The validated policy."""
        return self._policy

    @property
    def state(self) -> CircuitState:
        """The current state; an open breaker whose timeout has passed reads as half-open."""
        core = self._core
        if core.state == CIRCUIT_OPEN and self._clock() - self._opened_at >= self._policy.timeout:
            self._to_half_open_if_due()
        return CircuitState(core.state)

    @property
    def consecutive_failures(self) -> int:
        """Failures in a row counted while closed (reset by a success or a transition)."""
        return int(self._core.consecutive_failures)

    @property
    def success_count(self) -> int:
        """Successful calls ever made through this breaker."""
        return int(self._core.total_successes)

    @property
    def failure_count(self) -> int:
        """Failed calls (of ``expected_exceptions``) ever made through this breaker."""
        return int(self._core.total_failures)

    @property
    def retry_after(self) -> float:
        """Seconds until an open breaker lets a call through (0.0 unless open)."""
        if self._core.state != CIRCUIT_OPEN:
            return 0.0
        remaining = self._open_for()
        return min(max(0.0, remaining), self._policy.timeout)

    def _open_for(self) -> float:
        """Seconds an open breaker still refuses calls (<= 0: its timeout has passed).

        ``timeout - elapsed``: the comparison ``state`` makes (``elapsed >= timeout``), so that
        float rounding can never make one say half-open while the other still refuses.
        """
        return self._policy.timeout - (self._clock() - self._opened_at)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self._name!r} {self.state}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # State lives in one process: a copy in another process starts closed, with the
        # same policy and name (this is what lets guarded lambdas reach worker processes).
        return (_rebuild_breaker, (self._policy, self._name, self._clock))

    @staticmethod
    def _reguard(breaker: CircuitBreaker, func: Callable[..., Any]) -> Callable[..., Any]:
        """Rebuild a guarded function after unpickling (see ``CircuitGuarded.__reduce__``)."""
        return breaker(func)

    # --- the call path (the compiled wrapper calls _admit and _settle) ---------------------
    def _admit(self) -> int:
        """Admit one call: its token is ``generation << 1 | is_probe``, or raise if open."""
        fire: tuple[Any, int] | None = None
        core = self._core
        if core.state == CIRCUIT_OPEN:
            # Refusing is the hot path of an open breaker: no lock. A transition racing with
            # this check can at worst refuse one call that a moment later would have probed.
            remaining = self._open_for()
            if remaining > 0:
                remaining = min(remaining, self._policy.timeout)
                record_circuit_refusal(self._name)
                raise CircuitOpenError(self._name, remaining, reason=self._reason)
        with self._lock:
            if core.state == CIRCUIT_OPEN:
                remaining = self._open_for()
                if remaining > 0:
                    # min(): float rounding in opened_at + timeout - now can exceed timeout.
                    remaining = min(remaining, self._policy.timeout)
                    record_circuit_refusal(self._name)
                    raise CircuitOpenError(self._name, remaining, reason=self._reason)
                self._enter(CIRCUIT_HALF_OPEN)
                fire = (self._policy.on_half_open, CIRCUIT_HALF_OPEN)
            if core.state == CIRCUIT_CLOSED:
                token = int(core.generation) << 1
            elif self._probes >= self._policy.half_open_max_calls:
                msg_reason = (
                    f"half-open, its {self._policy.half_open_max_calls} probe call slot(s)"
                    " are busy"
                )
                record_circuit_refusal(self._name)
                raise CircuitOpenError(self._name, 0.0, reason=msg_reason)
            else:
                self._probes += 1
                token = int(core.generation) << 1 | 1
        if fire is not None:
            self._fire(*fire)
        return token

    def _settle(self, token: int, exc: BaseException | None, counted: bool = False) -> None:
        """Record the outcome of a call admitted with ``token`` (never raises)."""
        generation, probe = token >> 1, token & 1
        core = self._core
        if exc is not None and not counted and not isinstance(exc, self._expected):
            if probe:
                with self._lock:
                    if generation == core.generation:
                        self._probes = max(0, self._probes - 1)
            return
        if not probe and exc is None:
            core.record_success(generation)
            return
        fire: tuple[Any, int] | None = None
        with self._lock:
            if not probe:
                assert exc is not None
                if core.record_failure(generation):
                    self._reason = self._trip_reason(exc)
                    self._enter(CIRCUIT_OPEN)
                    fire = (self._policy.on_open, CIRCUIT_OPEN)
            elif exc is None:
                core.record_success(generation)
                if generation == core.generation:
                    self._probes = max(0, self._probes - 1)
                    self._probe_successes += 1
                    if self._probe_successes >= self._policy.success_threshold:
                        self._enter(CIRCUIT_CLOSED)
                        fire = (self._policy.on_close, CIRCUIT_CLOSED)
            else:
                core.record_failure(generation)
                if generation == core.generation:
                    self._reason = f"a probe call failed: {describe_error(exc, one_line=True)}"
                    self._enter(CIRCUIT_OPEN)
                    fire = (self._policy.on_open, CIRCUIT_OPEN)
        if fire is not None:
            self._fire(*fire)

    def _trip_reason(self, exc: BaseException) -> str:
        core = self._core
        last = describe_error(exc, one_line=True)
        if self._policy.failure_rate is None:
            n = core.consecutive_failures
            plural = "s" if n != 1 else ""
            return f"{n} consecutive failure{plural}, the last: {last}"
        return (
            f"{core.window_failures} of the last {core.window_calls} calls failed, rate"
            f" >= {self._policy.failure_rate:g}; the last: {last}"
        )

    def _enter(self, state: int) -> None:
        # Called with the lock held. A new generation makes in-flight calls' outcomes stale.
        self._previous = CircuitState(self._core.state)
        self._core.transition(state)
        self._probes = 0
        self._probe_successes = 0
        if state == CIRCUIT_OPEN:
            self._opened_at = self._clock()

    def _to_half_open_if_due(self) -> None:
        with self._lock:
            due = (
                self._core.state == CIRCUIT_OPEN
                and self._clock() - self._opened_at >= self._policy.timeout
            )
            if due:
                self._enter(CIRCUIT_HALF_OPEN)
        if due:
            self._fire(self._policy.on_half_open, CIRCUIT_HALF_OPEN)

    def _fire(self, callback: Callable[[CircuitBreaker], object] | None, state: int) -> None:
        # After a transition, outside the lock: log it, count it, then run the user's
        # callback (a handler or callback may use the breaker without deadlocking).
        new = str(CircuitState(state))
        reason = self._reason if state == CIRCUIT_OPEN else ""
        log_breaker_transition(self._name, new, str(self._previous), reason)
        record_circuit_transition(self._name, new)
        if callback is None:
            return
        try:
            callback(self)
        except Exception:
            logger.exception("circuit breaker %r: state-change callback raised", self._name)

    # --- manual control and accounting -----------------------------------------------------
    def open(self, reason: str = "opened by hand") -> None:
        """Force the breaker open for ``policy.timeout`` seconds."""
        with self._lock:
            self._reason = reason
            self._enter(CIRCUIT_OPEN)
        self._fire(self._policy.on_open, CIRCUIT_OPEN)

    def close(self) -> None:
        """Force the breaker closed, with fresh counts."""
        with self._lock:
            self._enter(CIRCUIT_CLOSED)
        self._fire(self._policy.on_close, CIRCUIT_CLOSED)

    def allows_calls(self) -> bool:
        """True if a call made now would be let through (moves open to half-open when due)."""
        state = self.state
        if state == CircuitState.OPEN:
            return False
        if state == CircuitState.HALF_OPEN:
            return self._probes < self._policy.half_open_max_calls
        return True

    def open_error(self) -> CircuitOpenError:
        """The ``CircuitOpenError`` a call made now would raise (for callers that stop early)."""
        return CircuitOpenError(self._name, self.retry_after, reason=self._reason)

    def record_success(self) -> None:
        """Count a success of a call made outside the breaker (as ``execute`` does)."""
        self._settle(self._current_token(), None)

    def record_failure(self, exc: BaseException | None = None) -> None:
        """Count a failure of a call made outside the breaker; ``exc`` is checked against
        ``expected_exceptions`` (None always counts)."""
        if exc is None:
            self._settle(self._current_token(), _HandFailure(), counted=True)
        else:
            self._settle(self._current_token(), exc)

    def _current_token(self) -> int:
        core = self._core
        return int(core.generation) << 1 | (1 if core.state == CIRCUIT_HALF_OPEN else 0)

    # --- entry points ----------------------------------------------------------------------
    @overload
    def __call__(self, func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]: ...
    @overload
    def __call__(self, func: F) -> F: ...
    def __call__(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """Decorate ``func`` (sync or ``async def``) so that its calls go through the breaker."""
        check_callable("CircuitBreaker: ", "the decorated object", func)
        if inspect.iscoroutinefunction(func):
            return self._wrap_async(func)
        guarded = CircuitGuarded(func, self._core, self)
        functools.update_wrapper(guarded, func)
        return cast(Callable[..., Any], guarded)

    def _wrap_async(self, func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(func)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            token = self._token()
            try:
                result = await func(*args, **kwargs)
            except BaseException as exc:
                self._settle(token, exc)
                raise
            self._settle(token, None)
            return result

        guarded.circuit_breaker = self  # type: ignore[attr-defined]
        return guarded

    def _token(self) -> int:
        core = self._core
        if core.state == CIRCUIT_CLOSED:
            return int(core.generation) << 1
        return self._admit()

    def call(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call ``func(*args, **kwargs)`` through the breaker.

        >>> CircuitBreaker().call(max, 1, 2)
        2
        """
        return CircuitGuarded(func, self._core, self)(*args, **kwargs)

    def __enter__(self) -> CircuitBreaker:
        stack = self._local.__dict__.setdefault("tokens", [])
        stack.append(self._token())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._local.tokens.pop()
        if exc_type is not None and exc is None:
            exc = exc_type()
        self._settle(token, exc)


class _HandFailure(Exception):
    """Stands for a failure recorded by hand with ``record_failure()``."""

    def __init__(self) -> None:
        super().__init__("failure recorded by hand")


def _rebuild_breaker(
    policy: CircuitBreakerPolicy, name: str, clock: Callable[[], float]
) -> CircuitBreaker:
    return CircuitBreaker(policy, name=name, clock=clock)


@overload
def with_circuit_breaker(func: F, /) -> F: ...
@overload
def with_circuit_breaker(
    func: None = None,
    /,
    *,
    breaker: CircuitBreaker | None = None,
    policy: CircuitBreakerPolicy | None = None,
    name: str | None = None,
    clock: Callable[[], float] = ...,
    **policy_kwargs: Any,
) -> Callable[[F], F]: ...
def with_circuit_breaker(
    func: Callable[..., Any] | None = None,
    /,
    *,
    breaker: CircuitBreaker | None = None,
    policy: CircuitBreakerPolicy | None = None,
    name: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    **policy_kwargs: Any,
) -> Any:
    """Guard a function with a circuit breaker: ``@with_circuit_breaker``,
    ``@with_circuit_breaker(failure_threshold=3, timeout=10)``, ``@with_circuit_breaker(policy=p)``
    or ``@with_circuit_breaker(breaker=shared)`` (one breaker for several functions).

    The decorated function exposes the breaker as ``.circuit_breaker``.

    >>> @with_circuit_breaker(failure_threshold=3, name="api")
    ... def get(x):
    ...     return x
    >>> get(1), get.circuit_breaker.name
    (1, 'api')
    """
    if breaker is not None:
        if policy is not None or policy_kwargs or name is not None:
            msg = (
                "with_circuit_breaker: pass either breaker= or policy/name/policy parameters,"
                " not both; a shared breaker already has its policy and name"
            )
            raise TypeError(msg)
        given: object = breaker
        if not isinstance(given, CircuitBreaker):
            fail(TypeError, "with_circuit_breaker: ", "breaker", "a CircuitBreaker or None", given)
    else:
        if policy is not None and policy_kwargs:
            msg = (
                "with_circuit_breaker: pass either policy= or inline policy parameters"
                f" ({', '.join(sorted(policy_kwargs))}), not both"
            )
            raise TypeError(msg)
        if policy is None:
            policy = CircuitBreakerPolicy(**policy_kwargs)
        breaker = CircuitBreaker(policy, name=name, clock=clock)
    if func is None:
        return breaker
    return breaker(func)


class CircuitObserver(RunObserver):
    """Guards an ``execute`` run: stops dispatch when the breaker opens (see ``execute``).

    Every item outcome is counted by the breaker. While it is closed or half-open the
    executor keeps dispatching (the first items of a half-open run are its probes); once it
    is open, dispatch stops for the rest of the run and the items in flight finish.
    """

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self._stopped = False

    def allow_dispatch(self) -> bool:
        """False once the breaker is open: no new items are dispatched."""
        if self._stopped:
            return False
        if self.breaker.state == CircuitState.OPEN:
            self._stopped = True
            return False
        return True

    def on_success(self, index: int, item: Any, result: Any) -> None:
        """Count a success."""
        self.breaker.record_success()

    def on_success_block(self, start: int, items: list[Any], values: list[Any]) -> None:
        """Count a block of successes (for an executor that reports whole chunks)."""
        breaker = self.breaker
        for _ in range(len(items)):
            breaker.record_success()

    def on_failure(self, index: int, item: Any, exc: BaseException, attempts: int) -> bool:
        """Count a failure; the breaker does not take the failure off the run's hands."""
        self.breaker.record_failure(exc)
        return False

    def stop_error(self, counts: Mapping[str, int | None]) -> BaseException:
        """``CircuitOpenError`` naming the breaker, when it reopens and the run's counts."""
        return self.breaker.open_error().with_counts(
            counts.get("completed") or 0, counts.get("failed") or 0, counts.get("not_attempted")
        )


def circuit_observer(
    circuit_breaker: CircuitBreaker | CircuitBreakerPolicy | bool,
) -> CircuitObserver:
    """Build the ``execute`` observer for ``circuit_breaker=``: a breaker (shared), a policy
    (a fresh breaker named ``"execute"``) or True (the default policy)."""
    if circuit_breaker is True:
        circuit_breaker = CircuitBreakerPolicy()
    if isinstance(circuit_breaker, CircuitBreakerPolicy):
        circuit_breaker = CircuitBreaker(circuit_breaker, name="execute")
    if not isinstance(circuit_breaker, CircuitBreaker):
        rule = "a CircuitBreaker, a CircuitBreakerPolicy or True"
        fail(TypeError, "execute(): ", "circuit_breaker", rule, circuit_breaker)
    return CircuitObserver(circuit_breaker)

