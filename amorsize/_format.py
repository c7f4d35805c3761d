"""How amorsize writes numbers and values into reports and error messages.

One module, so that a duration or a size reads the same in the optimizer's report, the dask
planner's reason, the demo's table and ``amorsize info``, and so that every message that
shows a user's value shows it the same safe way:

* :func:`format_seconds` — ``"2.50 s"``, ``"12.3 ms"``, ``"450 us"``, ``"80 ns"``;
* :func:`format_bytes` — ``"1.5 MB"``, ``"512 B"`` (binary units);
* :func:`safe_repr` — a bounded ``repr`` that never raises, however deep, large or broken
  the value (an item, a result, an option value);
* :func:`describe_error` — ``"ValueError: bad input"``, even when ``str()`` of the exception
  raises.
"""

from __future__ import annotations

import functools
import math
import reprlib
from typing import Any

__all__ = ["describe_error", "format_bytes", "format_seconds", "safe_repr"]

# Ints shown as "an int of about N digits" past this size: their repr is unreadable, and
# refused past 4,300 digits (sys.set_int_max_str_digits).
_HUGE_INT_BITS = 200


def format_seconds(s: float | None) -> str:
    """A duration with three significant digits in the unit that suits it; ``None``: ``"-"``.

    >>> format_seconds(2.5), format_seconds(0.0123), format_seconds(4.5e-7)
    ('2.50 s', '12.3 ms', '450 ns')
    """
    if s is None:
        return "-"
    if not math.isfinite(s):
        return f"{s} s"
    if s < 0:
        return "-" + format_seconds(-s)
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.3g} us"
    return f"{s * 1e9:.3g} ns"


def format_bytes(b: float) -> str:
    """A size in B, KB, MB or GB (powers of 1024), three significant digits.

    >>> format_bytes(512), format_bytes(1.5 * (1 << 20))
    ('512 B', '1.5 MB')
    """
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def _huge_int(value: int) -> str:
    digits = math.floor(value.bit_length() * math.log10(2)) + 1
    return f"an int of about {digits} digits"


class _BoundedRepr(reprlib.Repr):
    """``reprlib.Repr`` sized for a budget of ``limit`` characters, that survives any value.

    reprlib bounds depth and width, so a deep or self-referencing value costs little; this
    subclass also names an object whose ``__repr__`` raises, and a huge int by its size.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        # Error messages (160 characters) keep reprlib's widths; a larger budget, such as a
        # dead-letter listing's, shows proportionally more elements of each container.
        k = max(1, limit // 160)
        self.maxlevel = 4
        self.maxtuple = self.maxlist = self.maxset = self.maxfrozenset = self.maxdeque = 6 * k
        self.maxarray = 5 * k
        self.maxdict = 4 * k
        self.maxstring = self.maxother = self.maxlong = limit

    def repr_int(self, x: int, level: int) -> str:
        """A huge int by its digit count; others as reprlib does."""
        if x.bit_length() > _HUGE_INT_BITS:
            return _huge_int(x)
        return super().repr_int(x, level)

    def repr_instance(self, x: Any, level: int) -> str:
        """``repr(x)``, or what went wrong when it raises; cut to ``maxother`` characters."""
        try:
            text = repr(x)
        except Exception as exc:
            return _repr_failed(x, exc)
        if len(text) > self.maxother:
            i = max(0, (self.maxother - 3) // 2)
            j = max(0, self.maxother - 3 - i)
            text = text[:i] + "..." + text[len(text) - j :]
        return text


@functools.lru_cache(maxsize=8)
def _repr_for(limit: int) -> _BoundedRepr:
    return _BoundedRepr(limit)


def _repr_failed(obj: object, exc: BaseException) -> str:
    return f"<{type(obj).__qualname__} whose repr raised {type(exc).__name__}>"


def safe_repr(obj: object, limit: int | None = 160) -> str:
    """``repr(obj)`` in at most ``limit`` characters; never raises.

    Containers are shown to a bounded depth and width (``reprlib``), so a deep, huge or
    self-referencing value costs little; an object whose ``__repr__`` raises is shown as
    ``<T whose repr raised E>``; an int too long to read as ``an int of about N digits``.
    ``limit=None`` is the complete ``repr`` (for output that must keep it all), still with
    those two fallbacks.

    >>> safe_repr(list(range(100)))
    '[0, 1, 2, 3, 4, 5, ...]'
    >>> safe_repr("x" * 100, limit=20)
    "'xxxxxxx...xxxxxxxx'"
    >>> safe_repr(10**5000)
    'an int of about 5001 digits'
    """
    try:
        if isinstance(obj, int) and obj.bit_length() > _HUGE_INT_BITS:
            return _huge_int(obj)
        text = repr(obj) if limit is None else _repr_for(limit).repr(obj)
    except Exception as exc:  # reprlib guards __repr__ of instances, not of every container
        return _repr_failed(obj, exc)
    if limit is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


def describe_error(exc: BaseException, *, one_line: bool = False) -> str:
    """``"TypeName: message"`` (the name alone for an empty message); never raises.

    ``one_line`` folds the message's whitespace, for a line on stderr or in a log.

    >>> describe_error(ValueError("bad   input"), one_line=True), describe_error(KeyError())
    ('ValueError: bad input', 'KeyError')
    """
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not hide the error it describes
        text = "<str() of the exception raised>"
    if one_line:
        text = " ".join(text.split())
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
