"""One check, and one message, for every option of the public API and the command line.

Each error names where the option belongs, the option, what it accepts and the value given,
always as ``<owner>: <param> must be <rule>; got <value>``::

    execute(): chunksize must be an int in [1, 9223372036854775807] or None; got
    1000000000000000000000000000000

A value of the wrong type is a ``TypeError`` (``True`` is not a number here); a value out of
range, NaN or an infinity, or not one of the allowed choices, is a ``ValueError``. The
bounds are those the code can honour: a count that fits a C ``long long`` or an ``islice``
stop, a number of seconds that ``time.sleep`` accepts. A rule no helper here expresses
raises through :func:`fail`, so that its message reads the same.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from typing import Literal, NoReturn, overload

from amorsize._format import safe_repr

#: Largest count a C ``long long`` field (the compiled core) or ``islice`` accepts.
MAX_COUNT = sys.maxsize
#: Largest number of seconds accepted for a delay or a timeout: about 31 years
#: (``time.sleep`` refuses lengths past ~292 years).
MAX_SECONDS = 1e9
#: Largest worker count: far above any machine's cores or a sane thread pool, so that only a
#: mistake (``n_jobs=10**30``) is refused.
MAX_WORKERS = 10_000


def show(value: object) -> str:
    """The value as an error message shows it: :func:`amorsize._format.safe_repr`, 80 chars."""
    return safe_repr(value, 80)


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}".replace("e+0", "e").replace("e+", "e")


def fail(
    error: type[Exception],
    where: str,
    name: str,
    rule: str,
    value: object,
    note: str = "",
    *,
    fix: str = "",
) -> NoReturn:
    """Raise ``error("<where><name> must be <rule><note>; got <value>[; <fix>]")``.

    ``TypeError`` messages also name the value's type; ``fix`` says how to fix it.

    >>> fail(ValueError, "Checkpoint: ", "mode", "'a' or 'b'", "c", fix="pick one")
    Traceback (most recent call last):
    ValueError: Checkpoint: mode must be 'a' or 'b'; got 'c'; pick one
    """
    kind = f" ({type(value).__name__})" if error is TypeError else ""
    msg = f"{where}{name} must be {rule}{note}; got {show(value)}{kind}"
    if fix:
        msg += f"; {fix}"
    raise error(msg)


@overload
def check_int(
    where: str,
    name: str,
    value: object,
    low: int,
    high: int = ...,
    *,
    none: Literal[False] = ...,
    note: str = ...,
) -> int: ...
@overload
def check_int(
    where: str,
    name: str,
    value: object,
    low: int,
    high: int = ...,
    *,
    none: bool,
    note: str = ...,
) -> int | None: ...
def check_int(
    where: str,
    name: str,
    value: object,
    low: int,
    high: int = MAX_COUNT,
    *,
    none: bool = False,
    note: str = "",
) -> int | None:
    """``value`` as an int in ``[low, high]`` (``None`` too when ``none``), or raise.

    ``where`` prefixes the message (e.g. ``"execute(): "``); ``note`` follows the rule (e.g.
    ``" (-1: no limit)"``). Integer types other than ``int`` (numpy's) are accepted.

    >>> check_int("f(): ", "n", 3, 1, 8)
    3
    >>> check_int("f(): ", "n", 0, 1, 8)
    Traceback (most recent call last):
    ValueError: f(): n must be an int in [1, 8]; got 0
    """
    if value is None and none:
        return None
    rule = f"an int in [{low}, {high}]" + (" or None" if none else "")
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        fail(TypeError, where, name, rule, value, note)
    number = operator.index(value)  # type: ignore[arg-type]
    if not low <= number <= high:
        fail(ValueError, where, name, rule, value, note)
    return number


@overload
def check_number(
    where: str,
    name: str,
    value: object,
    low: float,
    high: float = ...,
    *,
    low_open: bool = ...,
    none: Literal[False] = ...,
    note: str = ...,
) -> float: ...
@overload
def check_number(
    where: str,
    name: str,
    value: object,
    low: float,
    high: float = ...,
    *,
    low_open: bool = ...,
    none: bool,
    note: str = ...,
) -> float | None: ...
def check_number(
    where: str,
    name: str,
    value: object,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    none: bool = False,
    note: str = "",
) -> float | None:
    """``value`` as a finite float within the bounds (``None`` too when ``none``), or raise.

    ``low_open`` excludes ``low``; ``high=math.inf`` means "any finite number".

    >>> check_number("", "timeout", 2, 0, 10)
    2.0
    >>> check_number("", "timeout", float("nan"), 0, 10)
    Traceback (most recent call last):
    ValueError: timeout must be a finite number in [0, 10]; got nan
    """
    if high == math.inf:
        rule = f"a finite number {'>' if low_open else '>='} {_bound(low)}"
    else:
        rule = f"a finite number in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}]"
    rule += " or None" if none else ""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(TypeError, where, name, rule, value, note)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number) or number < low or number > high or (low_open and number == low):
        fail(ValueError, where, name, rule, value, note)
    return number


def check_bool(where: str, name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False`` (not merely truthy), or raise ``TypeError``.

    >>> check_bool("f(): ", "strict", 1)
    Traceback (most recent call last):
    TypeError: f(): strict must be True or False; got 1 (int)
    """
    if not isinstance(value, bool):
        fail(TypeError, where, name, "True or False", value)
    return value


def check_choice(where: str, name: str, value: object, choices: tuple[object, ...]) -> object:
    """``value`` if it is one of ``choices`` (of the same type: ``1`` is not ``True``).

    >>> check_choice("", "mode", "FULL", ("NORMAL", "FULL"))
    'FULL'
    >>> check_choice("", "mode", "OFF", ("NORMAL", "FULL"))
    Traceback (most recent call last):
    ValueError: mode must be 'NORMAL' or 'FULL'; got 'OFF'
    """
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return choice
    shown = [repr(c) for c in choices]
    rule = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
    fail(ValueError, where, name, rule, value)


def check_callable(
    where: str, name: str, value: object, rule: str = "a callable", *, none: bool = False
) -> None:
    """Raise ``TypeError`` unless ``value`` is callable (or ``None``, when ``none``).

    ``rule`` says what the callable is called with, e.g. ``"a callable (result) -> bool"``.

    >>> check_callable("RetryPolicy: ", "on_retry", "log", none=True)
    Traceback (most recent call last):
    TypeError: RetryPolicy: on_retry must be a callable or None; got 'log' (str)
    """
    if value is None and none:
        return
    if not callable(value):
        fail(TypeError, where, name, rule + (" or None" if none else ""), value)


def check_exception_types(
    where: str, name: str, value: object, note: str = ""
) -> tuple[type[BaseException], ...]:
    """An exception class, or a non-empty tuple, list or set of them, as a tuple.

    >>> check_exception_types("", "on", (KeyError, ValueError))
    (<class 'KeyError'>, <class 'ValueError'>)
    >>> check_exception_types("", "on", ())
    Traceback (most recent call last):
    TypeError: on must be an exception class or a non-empty tuple of them; got () (tuple)
    """
    items = (value,) if isinstance(value, type) else value
    if (
        not isinstance(items, (tuple, list, set, frozenset))
        or not items
        or not all(isinstance(t, type) and issubclass(t, BaseException) for t in items)
    ):
        fail(TypeError, where, name, "an exception class or a non-empty tuple of them", value, note)
    return tuple(items)
