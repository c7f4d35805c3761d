"""One check, and one message, for every numeric option of the public API.

Each error names where the option belongs, the option, what it accepts and the value given::

    execute(): chunksize must be an int in [1, 9223372036854775807] or None; got
    1000000000000000000000000000000

A value of the wrong type is a ``TypeError`` (``True`` is not a number here); a value out of
range, NaN or an infinity is a ``ValueError``. The bounds are those the code can honour: a
count that fits a C ``long long`` or an ``islice`` stop, a number of seconds that
``time.sleep`` accepts.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from typing import Literal, overload

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


def _fail(
    error: type[Exception], where: str, name: str, rule: str, value: object, note: str
) -> None:
    kind = f" ({type(value).__name__})" if error is TypeError else ""
    msg = f"{where}{name} must be {rule}{note}; got {show(value)}{kind}"
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
    rule = f"an int in [{low}, {high}]" + (" or None" if none else "")
    if value is None and none:
        return None
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        _fail(TypeError, where, name, rule, value, note)
    number = operator.index(value)  # type: ignore[arg-type]
    if not low <= number <= high:
        _fail(ValueError, where, name, rule, value, note)
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
        _fail(TypeError, where, name, rule, value, note)
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number) or number < low or number > high or (low_open and number == low):
        _fail(ValueError, where, name, rule, value, note)
    return number
