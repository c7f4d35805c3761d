"""Retry with exponential backoff and jitter.

``RetryPolicy`` validates its parameters once and lowers them into the C fields that the
compiled core (``amorsize/_core_retry.pxi``) reads; ``with_retry`` wraps a function in a
compiled ``RetryingFunction`` whose call goes straight to the function and only leaves C
when an attempt fails.

Data flow when a decorated function runs in worker processes (``execute``, a process
pool)::

    parent                                  worker (fork / spawn / forkserver)
    ------                                  ------
    pickle(f) -> "module.qualname"  ──────▶  import module; f = module.qualname
                                             f(x): attempts, sleeps, RetryStats of the worker
    result  ◀──────────────────────────────  value, or RetryExhaustedError(exc, attempts)
                                             (pickles with its attributes and message)

>>> from amorsize import with_retry
>>> @with_retry(max_retries=3, initial_delay=0.0)
... def flaky(x):
...     return x + 1
>>> flaky(1)
2
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    NamedTuple,
    ParamSpec,
    TypeVar,
    cast,
    overload,
)

from amorsize import _core, _telemetry
from amorsize._core import (
    AsyncRetryingFunction,
    RetryingFunction,
    RetryStats,
    _RetryPolicyCore,
    seed_jitter,
)
from amorsize._format import describe_error
from amorsize._validate import (
    MAX_SECONDS,
    check_bool,
    check_callable,
    check_choice,
    check_exception_types,
    check_int,
    check_number,
    fail,
)
from amorsize.budget import RetryBudget

if TYPE_CHECKING:
    from datetime import timedelta  # only named in hints: importing it costs ~1.5 ms

__all__ = [
    "AsyncRetryingFunction",
    "BatchRetryWrapper",
    "JitterStrategy",
    "RetryExhaustedError",
    "RetryFailure",
    "RetryPolicy",
    "RetryStats",
    "RetryingFunction",
    "create_batch_retry_wrapper",
    "retry_call",
    "seed_jitter",
    "set_testing",
    "with_retry",
]

P = ParamSpec("P")
R = TypeVar("R")

#: ``jitter`` values: ``True`` is the proportional +-25 % jitter, ``False`` none.
JitterStrategy = bool | Literal["full", "equal", "decorrelated"]
#: ``RetryPolicy.wait_from``: the failed attempt's exception -> seconds to wait, or None.
WaitFrom = Callable[[BaseException], "float | timedelta | None"]
#: ``RetryExhaustedError.reason``: why retrying stopped.
StopReason = Literal["attempts", "elapsed", "budget"]

# Codes understood by the core (_core_retry.pxi, _RETRY_JITTER_*).
_JITTER_CODES: dict[object, int] = {True: 1, False: 0, "full": 2, "equal": 3, "decorrelated": 4}
_JITTERS = tuple(_JITTER_CODES)
_NO_LIMIT = -1.0  # max_elapsed in the core when there is no time budget


class _Lowered(NamedTuple):
    """A validated policy as ``_RetryPolicyCore._lower`` takes it, in its argument order."""

    max_retries: int
    initial_delay: float
    max_delay: float
    exponential_base: float
    jitter_mode: int
    exc_types: tuple[type[BaseException], ...]
    on_retry: Callable[[BaseException | None, int, float], object] | None
    max_elapsed: float
    retry_on_result: Callable[[Any], object] | None
    reraise: bool
    exc_excluded: tuple[type[BaseException], ...]
    wait_from: WaitFrom | None
    hedge: Callable[..., object] | None
    hedge_after: float
    budget: RetryBudget | None


# What the message adds for each reason ("attempts" is the plain "gave up after n attempts").
_REASON_NOTES: dict[str, str] = {
    "attempts": "",
    "elapsed": " (the next sleep would pass max_elapsed)",
    "budget": " (the retry budget refused a retry)",
}


class RetryExhaustedError(Exception):
    """Retrying stopped before an attempt succeeded.

    ``original_exception`` is the last attempt's exception (``None`` when the last
    attempt's *result* was rejected by ``retry_on_result``; it is then ``last_result``),
    ``attempts`` the number of attempts made, and ``reason`` why retrying stopped:

    * ``"attempts"``: ``max_retries`` retries were made (the default);
    * ``"elapsed"``: the next sleep would have ended past ``max_elapsed``;
    * ``"budget"``: the policy's retry budget refused the retry.

    Raised ``from`` the last exception, and picklable with its attributes, message and
    ``__cause__``, so it crosses process boundaries intact.

    >>> err = RetryExhaustedError(ConnectionError("refused"), 4)
    >>> str(err), err.reason
    ('gave up after 4 attempts; last error: ConnectionError: refused', 'attempts')
    """

    def __init__(
        self,
        original_exception: BaseException | None,
        attempts: int,
        last_result: Any = None,
        func_name: str | None = None,
        *,
        reason: StopReason = "attempts",
    ) -> None:
        self.original_exception = original_exception
        self.attempts = attempts
        self.last_result = last_result
        self.func_name = func_name
        self.reason: StopReason = cast(
            "StopReason",
            check_choice("RetryExhaustedError: ", "reason", reason, tuple(_REASON_NOTES)),
        )
        super().__init__(self._message())

    def _message(self) -> str:
        who = f"{self.func_name}: " if self.func_name else ""
        plural = "attempt" if self.attempts == 1 else "attempts"
        if self.reason == "budget":
            plural += " (the retry budget refused another)"
        exc = self.original_exception
        if exc is None:
            last = f"last result rejected by retry_on_result: {self.last_result!r}"
        else:
            last = f"last error: {describe_error(exc)}"
        note = _REASON_NOTES[self.reason]
        return f"{who}gave up after {self.attempts} {plural}{note}; {last}"

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.original_exception, self.attempts, self.last_result, self.func_name)
        # Exceptions pickle without __cause__ by default; it is the worker's traceback text.
        state = {**self.__dict__, "__cause__": self.__cause__}
        return (_exhausted_error, (type(self), args, self.reason), state)


def _exhausted_error(
    cls: type[RetryExhaustedError], args: tuple[Any, ...], reason: StopReason
) -> RetryExhaustedError:
    # Unpickling: reason is keyword-only, which a plain (cls, args) reduction cannot pass.
    return cls(*args, reason=reason)


_core._set_exhausted_error(RetryExhaustedError)
# OpenTelemetry metrics of failed attempts, only if the API is installed: the compiled loop
# reads the hook after a failed attempt, never on the success path.
if _telemetry.api_installed():
    _core._set_retry_event_hook(_telemetry.retry_event)


_WHERE = "RetryPolicy: "


def _check_delay(name: str, value: object) -> float:
    return check_number(_WHERE, name, value, 0, MAX_SECONDS, note=" (seconds)")


@dataclass(frozen=True, slots=True, eq=True)
class RetryPolicy(_RetryPolicyCore):
    """How to retry: how many times, how long to wait, and on what.

    Immutable and validated when built: a bad value raises ``ValueError`` or ``TypeError``
    naming the parameter, the rule and the value given.

    * ``max_retries``: retries after the first attempt (``-1``: no limit on the count);
      a call makes at most ``max_retries + 1`` attempts.
    * delay after failed attempt ``n`` (from 1):
      ``min(initial_delay * exponential_base ** (n - 1), max_delay)``, then ``jitter``:
      ``True`` (+-25 %), ``"full"``, ``"equal"``, ``"decorrelated"`` (AWS strategies) or
      ``False``; always within ``[0, max_delay]``.
    * ``retry_on_exceptions``: the exception classes to retry (default ``Exception``
      except ``CircuitOpenError``, which must be named to be retried;
      ``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit`` and
      ``asyncio.CancelledError`` never are).
    * ``on_retry(exception, attempt, delay)``: runs before each sleep (``exception`` is
      ``None`` when ``retry_on_result`` triggered the retry); if it raises, the error is
      logged on the ``amorsize`` logger and retrying goes on.
    * ``max_elapsed``: total budget in seconds (``time.monotonic``); no retry starts whose
      sleep would end past it (``RetryExhaustedError.reason == "elapsed"``).
    * ``wait_from(exception)``: a server's hint, read after a failed attempt: seconds
      (``int``, ``float`` or ``timedelta``) to wait before the next one, used instead of the
      backoff and clamped to ``[0, max_delay]``, or ``None`` for the backoff.
      ``amorsize.retry_after`` reads ``Retry-After``. The hinted sleep counts against
      ``max_elapsed`` and is the ``delay`` given to ``on_retry``; a ``wait_from`` that
      raises or returns something else is logged and the backoff used. Not consulted
      for a result rejected by ``retry_on_result``.
    * ``hedge_after``: for idempotent ``async def`` functions: an attempt still running
      after this many seconds gets a second copy; the first to succeed wins, the other is
      cancelled; both failing counts as one failed attempt. Refused for sync functions
      (a thread cannot be cancelled).
    * ``retry_on_result``: a predicate; a result for which it is true is retried.
    * ``reraise``: on exhaustion raise the last exception itself instead of
      ``RetryExhaustedError``.
    * ``budget``: a ``RetryBudget`` consulted before each retry (every call deposits, every
      retry withdraws); a refused retry ends the call with ``RetryExhaustedError`` whose
      ``reason`` is ``"budget"`` (or the last exception, with ``reraise``). One budget may
      serve many policies and functions, and ``execute`` shares it with every worker.

    >>> p = RetryPolicy(max_retries=5, initial_delay=0.5, jitter=False)
    >>> [p.calculate_delay(n) for n in (1, 2, 3)]
    [0.5, 1.0, 2.0]
    """

    max_retries: int = 3
    initial_delay: float = 0.1
    max_delay: float = 60.0
    exponential_base: float = 2.0
    jitter: JitterStrategy = True
    retry_on_exceptions: tuple[type[BaseException], ...] | None = None
    on_retry: Callable[[BaseException | None, int, float], object] | None = None
    _: KW_ONLY
    max_elapsed: float | None = None
    retry_on_result: Callable[[Any], object] | None = None
    reraise: bool = False
    wait_from: WaitFrom | None = None
    hedge_after: float | None = None
    budget: RetryBudget | None = None

    def __post_init__(self) -> None:
        """Validate every field, normalise, and lower the result into the C fields."""
        lowered = self._validated()
        if self.retry_on_exceptions is not None:
            # None stays None (the default, which differs from an explicit (Exception,)).
            object.__setattr__(self, "retry_on_exceptions", lowered.exc_types)
        self._lower(*lowered)

    def _validated(self) -> _Lowered:
        """Every field checked (as ``object``: callers without a type checker pass anything)
        and turned into what the core reads: plain numbers, a jitter code, class tuples."""
        initial, cap = self._delays()
        elapsed = check_number(
            _WHERE, "max_elapsed", self.max_elapsed, 0, MAX_SECONDS, low_open=True, none=True,
            note=" (seconds; None: no budget)",
        )
        check_callable(
            _WHERE, "on_retry", self.on_retry, "a callable (exception, attempt, delay)", none=True
        )
        check_callable(
            _WHERE, "retry_on_result", self.retry_on_result, "a predicate (result) -> bool",
            none=True,
        )
        check_callable(
            _WHERE, "wait_from", self.wait_from,
            "a callable (exception) -> seconds or None, such as amorsize.retry_after",
            none=True,
        )  # fmt: skip
        return _Lowered(
            max_retries=check_int(
                _WHERE, "max_retries", self.max_retries, -1, note=" (-1: no limit)"
            ),
            initial_delay=initial,
            max_delay=cap,
            exponential_base=check_number(
                _WHERE, "exponential_base", self.exponential_base, 1, note=" (1: constant delay)"
            ),
            jitter_mode=_JITTER_CODES[check_choice(_WHERE, "jitter", self.jitter, _JITTERS)],
            exc_types=self._exception_types(),
            on_retry=self.on_retry,
            max_elapsed=_NO_LIMIT if elapsed is None else elapsed,
            retry_on_result=self.retry_on_result,
            reraise=check_bool(_WHERE, "reraise", self.reraise),
            exc_excluded=self._excluded_types(),
            wait_from=self.wait_from,
            **self._hedge(),
            budget=self._budget(),
        )

    def _hedge(self) -> dict[str, Any]:
        """``hedge`` and ``hedge_after`` as the core takes them (no hedge: ``None``, 0)."""
        after = check_number(
            _WHERE, "hedge_after", self.hedge_after, 0, MAX_SECONDS, low_open=True, none=True,
            note=" (seconds an async attempt runs before a second one starts; None: never)",
        )  # fmt: skip
        if after is None:
            return {"hedge": None, "hedge_after": 0.0}
        from amorsize._hedge import attempt

        return {"hedge": attempt, "hedge_after": after}

    def _delays(self) -> tuple[float, float]:
        """``(initial_delay, max_delay)``: each a number of seconds, the cap not below the first."""
        initial = _check_delay("initial_delay", self.initial_delay)
        cap = _check_delay("max_delay", self.max_delay)
        if cap < initial:
            fail(
                ValueError, _WHERE, "max_delay", f">= initial_delay ({self.initial_delay!r})",
                self.max_delay, fix="raise max_delay or lower initial_delay",
            )  # fmt: skip
        return initial, cap

    def _exception_types(self) -> tuple[type[BaseException], ...]:
        """The classes to retry: ``retry_on_exceptions``, or ``(Exception,)`` for None."""
        if self.retry_on_exceptions is None:
            return (Exception,)
        return check_exception_types(
            _WHERE, "retry_on_exceptions", self.retry_on_exceptions, " (None: Exception)"
        )

    def _budget(self) -> RetryBudget | None:
        given: object = self.budget
        if given is not None and not isinstance(given, RetryBudget):
            fail(TypeError, _WHERE, "budget", "an amorsize.RetryBudget or None", given)
        return self.budget

    def _excluded_types(self) -> tuple[type[BaseException], ...]:
        """Classes never retried although ``Exception`` covers them: none once named."""
        if self.retry_on_exceptions is not None:
            return ()
        # An open circuit breaker means "stop calling for a while": retrying it at once
        # only burns the attempts. Naming CircuitOpenError opts back in.
        from amorsize.circuit import CircuitOpenError

        return (CircuitOpenError,)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through __init__, so the C fields are validated and lowered again.
        return (_policy_from_kwargs, (self._kwargs(),))

    def _kwargs(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "initial_delay": self.initial_delay,
            "max_delay": self.max_delay,
            "exponential_base": self.exponential_base,
            "jitter": self.jitter,
            "retry_on_exceptions": self.retry_on_exceptions,
            "on_retry": self.on_retry,
            "max_elapsed": self.max_elapsed,
            "retry_on_result": self.retry_on_result,
            "reraise": self.reraise,
            "wait_from": self.wait_from,
            "hedge_after": self.hedge_after,
            "budget": self.budget,
        }


def _policy_from_kwargs(kwargs: Mapping[str, Any]) -> RetryPolicy:
    return RetryPolicy(**kwargs)


def _policy_for(
    where: str, policy: RetryPolicy | None, policy_kwargs: Mapping[str, Any]
) -> RetryPolicy:
    if policy is not None:
        if policy_kwargs:
            names = ", ".join(sorted(policy_kwargs))
            msg = (
                f"{where}: pass either policy= or inline parameters, not both "
                f"(got policy={policy!r} and {names}); put them in the RetryPolicy"
            )
            raise TypeError(msg)
        given: object = policy
        if not isinstance(given, RetryPolicy):
            fail(TypeError, f"{where}: ", "policy", "a RetryPolicy or None", given)
        return policy
    return RetryPolicy(**policy_kwargs)


def _wrap(func: Callable[P, R], policy: RetryPolicy) -> RetryingFunction[P, R]:
    check_callable("with_retry: ", "the decorated object", func)
    call = getattr(func, "__call__", None)  # noqa: B004 - the method itself is inspected
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        msg = (
            f"with_retry cannot retry the generator function {func!r}: its body runs while "
            f"it is iterated, after the call has returned; decorate a function that "
            f"consumes it (for example one returning list(gen(...))) instead"
        )
        raise TypeError(msg)
    if inspect.iscoroutinefunction(func) or (
        not inspect.isroutine(func) and inspect.iscoroutinefunction(call)
    ):
        wrapped = AsyncRetryingFunction(func, policy)
        mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+
        if mark is not None:
            mark(wrapped)
        # Typed as RetryingFunction too: both share __call__, metadata and retry_* members.
        return cast("RetryingFunction[P, R]", wrapped)
    return RetryingFunction(func, policy)


@overload
def with_retry(func: Callable[P, R], /) -> RetryingFunction[P, R]: ...


@overload
def with_retry(
    func: None = None,
    /,
    *,
    policy: RetryPolicy | None = None,
    max_retries: int = ...,
    initial_delay: float = ...,
    max_delay: float = ...,
    exponential_base: float = ...,
    jitter: JitterStrategy = ...,
    retry_on_exceptions: tuple[type[BaseException], ...] | None = ...,
    on_retry: Callable[[BaseException | None, int, float], object] | None = ...,
    max_elapsed: float | None = ...,
    retry_on_result: Callable[[Any], object] | None = ...,
    reraise: bool = ...,
    wait_from: WaitFrom | None = ...,
    hedge_after: float | None = ...,
    budget: RetryBudget | None = ...,
) -> Callable[[Callable[P, R]], RetryingFunction[P, R]]: ...


def with_retry(
    func: Callable[P, R] | None = None,
    /,
    *,
    policy: RetryPolicy | None = None,
    **policy_kwargs: Any,
) -> RetryingFunction[P, R] | Callable[[Callable[P, R]], RetryingFunction[P, R]]:
    """Decorate a function so that failed calls are retried with backoff.

    Works as ``@with_retry``, ``@with_retry()``, ``@with_retry(max_retries=5, ...)`` (the
    ``RetryPolicy`` parameters) and ``@with_retry(policy=p)``. The result keeps the
    function's name, docstring, signature and ``__wrapped__``, works as a method, exposes
    ``.retry_policy`` and ``.retry_stats``, and pickles by reference when defined at module
    level. On an ``async def`` function it returns a coroutine function that awaits
    ``asyncio.sleep`` between attempts.

    >>> calls = []
    >>> @with_retry(max_retries=2, initial_delay=0)
    ... def flaky():
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise ConnectionError("try again")
    ...     return "ok"
    >>> flaky(), len(calls), flaky.retry_stats.retries
    ('ok', 3, 2)
    """
    p = _policy_for("with_retry", policy, policy_kwargs)
    if func is not None:
        return _wrap(func, p)

    def decorate(f: Callable[P, R]) -> RetryingFunction[P, R]:
        return _wrap(f, p)

    return decorate


def retry_call(
    func: Callable[..., R],
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    policy: RetryPolicy | None = None,
    **policy_kwargs: Any,
) -> R:
    """Call ``func(*args, **kwargs)`` once, with retries: the non-decorator form.

    >>> retry_call(int, args=("42",), max_retries=1)
    42
    """
    check_callable("retry_call(): ", "func", func)
    p = _policy_for("retry_call", policy, policy_kwargs)
    result: R = _core.retry_call_core(func, p, tuple(args), dict(kwargs) if kwargs else None)
    return result


@dataclass(frozen=True, slots=True)
class RetryFailure:
    """A call that failed for good: its arguments, the final exception, the attempts made.

    ``exception`` is the last attempt's exception (or the ``RetryExhaustedError`` when the
    last *result* was rejected by ``retry_on_result``). ``item`` is the single positional
    argument, as in ``wrapper(item)``.

    >>> RetryFailure((7,), ValueError("bad"), 3).item
    7
    """

    args: tuple[Any, ...]
    exception: BaseException
    attempts: int
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def item(self) -> Any:
        """The item, for a wrapper called as ``wrapper(item)``."""
        if len(self.args) != 1 or self.kwargs:
            msg = f"this failure has args={self.args!r}, kwargs={dict(self.kwargs)!r}: not one item"
            raise AttributeError(msg)
        return self.args[0]


class BatchRetryWrapper(Generic[R]):
    """Apply a function to items one at a time with retries (``create_batch_retry_wrapper``).

    With ``fail_fast=False`` a permanent failure returns a ``RetryFailure`` in place of the
    result and is appended to ``.failures``; with ``fail_fast=True`` it raises (the same
    error ``with_retry`` would). Picklable: it can be sent to worker processes (each worker
    then keeps its own ``.failures``).
    """

    __slots__ = ("_retrying", "fail_fast", "failures", "func", "policy")

    def __init__(
        self, func: Callable[..., R], policy: RetryPolicy | None = None, fail_fast: bool = False
    ) -> None:
        check_callable("create_batch_retry_wrapper(): ", "func", func)
        self.func = func
        self.policy = _policy_for("create_batch_retry_wrapper", policy, {})
        self.fail_fast = bool(fail_fast)
        self.failures: list[RetryFailure] = []
        self._retrying = RetryingFunction(func, self.policy)

    def __call__(self, *args: Any, **kwargs: Any) -> R | RetryFailure:
        if self.fail_fast:
            result: R = self._retrying(*args, **kwargs)
            return result
        ok, value, attempts = self._retrying.call_outcome(*args, **kwargs)
        if ok:
            return value  # type: ignore[no-any-return]
        failure = RetryFailure(args, value, attempts, kwargs)
        self.failures.append(failure)  # list.append is atomic under the GIL
        return failure

    @property
    def retry_stats(self) -> RetryStats:
        """The counters of this wrapper's calls (see ``RetryStats``)."""
        stats: RetryStats = self._retrying.retry_stats
        return stats

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.func, self.policy, self.fail_fast))

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", repr(self.func))
        return (
            f"<BatchRetryWrapper {name} fail_fast={self.fail_fast} failures={len(self.failures)}>"
        )


def create_batch_retry_wrapper(
    func: Callable[..., R], policy: RetryPolicy | None = None, fail_fast: bool = False
) -> BatchRetryWrapper[R]:
    """A picklable per-item callable with retries, for ``[wrapper(item) for item in items]``.

    >>> def parse(s): return int(s)
    >>> w = create_batch_retry_wrapper(parse, RetryPolicy(max_retries=1, initial_delay=0))
    >>> [w(s) if not isinstance(w(s), RetryFailure) else None for s in ("1", "x")]
    [1, None]
    >>> w.failures[0].item, w.failures[0].attempts
    ('x', 2)
    """
    return BatchRetryWrapper(func, policy, fail_fast)


class _TestingMode:
    """Returned by ``set_testing``: already applied; as a context manager it restores."""

    __slots__ = ("_previous",)

    def __init__(self, previous: tuple[bool, int]) -> None:
        self._previous = previous

    def __enter__(self) -> _TestingMode:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        enabled, cap = self._previous
        _core._set_testing_state(enabled, cap)


def set_testing(enabled: bool = True, max_retries: int | None = None) -> _TestingMode:
    """Testing mode for users' test suites: retry sleeps become no-ops, attempts capped.

    Process-wide, effective at once. ``max_retries`` caps every policy's retries while on.
    Also a context manager that restores the previous mode on exit.

    >>> from amorsize import set_testing
    >>> with set_testing(True, max_retries=1):
    ...     pass
    """
    check_bool("set_testing(): ", "enabled", enabled)
    limit = check_int("set_testing(): ", "max_retries", max_retries, 0, none=True)
    cap = -1 if limit is None else limit
    previous: tuple[bool, int] = _core._set_testing_state(enabled, cap if enabled else -1)
    return _TestingMode(previous)
