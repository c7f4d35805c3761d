"""Every numeric option of the public API is checked by one helper (amorsize._validate)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from amorsize import (
    Checkpoint,
    CircuitBreaker,
    CircuitBreakerPolicy,
    DeadLetterQueue,
    RetryPolicy,
    execute,
    execute_iter,
    optimize,
    set_testing,
    with_retry,
)
from amorsize._validate import check_choice, check_int, check_number, show


def square(x: int) -> int:
    return x * x


def _execute(**kw: Any) -> Any:
    return execute(square, [1, 2], backend="threads", **kw)


def _execute_iter(**kw: Any) -> Any:
    return list(execute_iter(square, [1, 2], backend="threads", **kw))


def _optimize(**kw: Any) -> Any:
    return optimize(square, [1, 2], **kw)


def _set_testing(**kw: Any) -> Any:
    with set_testing(True, **kw):
        pass


def _calculate_delay(**kw: Any) -> Any:
    return RetryPolicy().calculate_delay(**{"attempt": 2, **kw})


OPTIONS: list[tuple[Callable[..., Any], str]] = [
    (_calculate_delay, "attempt"),
    (_calculate_delay, "previous_delay"),
    (_execute, "n_jobs"),
    (_execute, "chunksize"),
    (_execute_iter, "n_jobs"),
    (_execute_iter, "chunksize"),
    (_optimize, "n_jobs"),
    (_optimize, "sample_size"),
    (_set_testing, "max_retries"),
    *[
        (RetryPolicy, name)
        for name in ("max_retries", "initial_delay", "max_delay", "exponential_base", "max_elapsed")
    ],
    *[
        (CircuitBreakerPolicy, name)
        for name in (
            "failure_threshold",
            "success_threshold",
            "timeout",
            "failure_rate",
            "window",
            "minimum_calls",
            "half_open_max_calls",
        )
    ],
]

# Wrong for every option above: not numbers, not finite, below -1, or past any bound.
BAD_VALUES = st.one_of(
    st.booleans(),
    st.text(max_size=3),
    st.sampled_from([math.nan, math.inf, -math.inf, b"1", [1], 1j]),
    st.integers(max_value=-2),
    st.integers(min_value=2**63, max_value=10**5000),
)


@pytest.mark.parametrize(("build", "name"), OPTIONS)
@settings(max_examples=60, deadline=None)
@given(value=BAD_VALUES)
def test_every_numeric_option_names_itself(
    build: Callable[..., Any], name: str, value: object
) -> None:
    """issue 12 item 19: a bad value is a ValueError/TypeError naming option, rule and value."""
    if name == "exponential_base":  # any finite base >= 1 is allowed: only past float's range
        assume(not (type(value) is int and value > 0 and value.bit_length() <= 1024))
    if name == "attempt":  # a huge attempt number saturates: it is past any policy's limit
        assume(not (type(value) is int and value > 0))
    with pytest.raises((ValueError, TypeError)) as info:
        build(**{name: value})
    msg = str(info.value)
    assert f"{name} must be " in msg and "; got " in msg, msg
    assert " in [" in msg or " in (" in msg or " >= " in msg, msg  # the allowed range
    assert show(value) in msg, msg


@pytest.mark.parametrize(
    ("build", "kwargs", "needle"),
    [
        (RetryPolicy, {"max_retries": 10**30}, "max_retries must be an int in [-1, "),
        (_execute, {"chunksize": 10**30}, "chunksize must be an int in [1, "),
        (RetryPolicy, {"max_delay": 10**400}, "max_delay must be a finite number in [0, 1e9]"),
        (CircuitBreakerPolicy, {"window": 10**12}, "window must be an int in [1, 1000000]"),
    ],
)
def test_issue_examples(build: Callable[..., Any], kwargs: dict[str, Any], needle: str) -> None:
    """issue 12 item 19: the reported huge values name the parameter instead of overflowing."""
    with pytest.raises(ValueError) as info:
        build(**kwargs)
    assert needle in str(info.value)


def test_helpers_accept_what_they_promise() -> None:
    """Bounds are inclusive (unless low_open), None only when allowed, ints become floats."""
    assert check_int("", "n", 8, 1, 8) == 8
    assert check_int("", "n", None, 1, none=True) is None
    assert check_number("", "t", 3, 0, 5) == 3.0
    with pytest.raises(ValueError, match=r"t must be a finite number in \(0, 5\]; got 0"):
        check_number("", "t", 0, 0, 5, low_open=True)
    with pytest.raises(TypeError, match=r"n must be an int in \[1, 8\]; got None \(NoneType\)"):
        check_int("", "n", None, 1, 8)
    assert show(10**5000) == "an int of about 5001 digits"


# One message style for the options that are not numbers, and for rules across options.
_STYLE = r"^[\w.]+(\(\))?: [\w ]+ must be .+; got .+"


@pytest.mark.parametrize(
    ("build", "kwargs", "error"),
    [
        (RetryPolicy, {"jitter": "sometimes"}, ValueError),
        (RetryPolicy, {"jitter": 1}, ValueError),
        (RetryPolicy, {"on_retry": "log"}, TypeError),
        (RetryPolicy, {"retry_on_result": 3}, TypeError),
        (RetryPolicy, {"reraise": "yes"}, TypeError),
        (RetryPolicy, {"retry_on_exceptions": ()}, TypeError),
        (RetryPolicy, {"initial_delay": 2.0, "max_delay": 1.0}, ValueError),
        (CircuitBreakerPolicy, {"expected_exceptions": "ValueError"}, TypeError),
        (CircuitBreakerPolicy, {"on_open": 3}, TypeError),
        (CircuitBreakerPolicy, {"failure_rate": 0.5, "window": 5, "minimum_calls": 6}, ValueError),
        (lambda **kw: CircuitBreaker(**kw), {"policy": {"failure_threshold": 3}}, TypeError),
        (lambda **kw: CircuitBreaker(**kw), {"clock": 5}, TypeError),
        (lambda **kw: Checkpoint("x.db", **kw), {"synchronous": "OFF"}, ValueError),
        (lambda **kw: Checkpoint("x.db", **kw), {"commit_every": True}, TypeError),
        (lambda **kw: Checkpoint("x.db", **kw), {"commit_interval": math.nan}, ValueError),
        (lambda **kw: DeadLetterQueue(**kw), {"path": 3}, TypeError),
        (lambda **kw: set_testing(**kw), {"enabled": 1}, TypeError),
        (lambda **kw: with_retry(policy=kw["policy"]), {"policy": "p"}, TypeError),
    ],
)
def test_every_option_error_has_one_style(
    build: Callable[..., Any], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    """Non-numeric and cross-option checks read '<owner>: <param> must be <rule>; got <value>'."""
    with pytest.raises(error, match=_STYLE) as info:
        build(**kwargs)
    assert show(kwargs[next(reversed(kwargs))]) in str(info.value)  # the offending value


@pytest.mark.parametrize(
    ("value", "choices", "ok"),
    [(True, (True, False), True), (1, (True, False), False), ("a", ("a",), True),
     (1.0, (1,), False)],
)
def test_check_choice_compares_types_too(
    value: object, choices: tuple[object, ...], ok: bool
) -> None:
    """1 is not True and 1.0 is not 1: a choice matches only a value of its own type."""
    if ok:
        assert check_choice("", "x", value, choices) == value
    else:
        with pytest.raises(ValueError, match="x must be"):
            check_choice("", "x", value, choices)
