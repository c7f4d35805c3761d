"""amorsize._format: durations, sizes and the bounded repr every message uses."""

from __future__ import annotations

import math
from typing import Any

import pytest

from amorsize._format import describe_error, format_bytes, format_seconds, safe_repr


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.0, "0 ns"),
        (4.5e-7, "450 ns"),
        (2e-6, "2 us"),
        (0.0123, "12.3 ms"),
        (0.5, "500 ms"),
        (1.0, "1.00 s"),
        (125.0, "125.00 s"),
        (-0.002, "-2 ms"),
        (math.inf, "inf s"),
    ],
)
def test_format_seconds(seconds: float | None, text: str) -> None:
    """Three significant digits in the unit that suits the duration."""
    assert format_seconds(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (512, "512 B"), (2048, "2 KB"), (1.5 * (1 << 20), "1.5 MB"), (3 << 30, "3 GB")],
)
def test_format_bytes(size: float, text: str) -> None:
    """Binary units, three significant digits."""
    assert format_bytes(size) == text


class _BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def _deep(levels: int) -> list[Any]:
    nested: list[Any] = []
    for _ in range(levels):
        nested = [nested]
    return nested


def _self_referencing() -> list[Any]:
    loop: list[Any] = [1]
    loop.append(loop)
    return loop


# A class that reprlib takes for a list (it dispatches on the type's name) and that breaks it.
_FakeList = type("list", (), {"__len__": lambda self: 1 // 0})


@pytest.mark.parametrize("limit", [60, 160, 2000, None])
@pytest.mark.parametrize(
    "value",
    [_BrokenRepr(), _deep(100_000), _self_referencing(), _FakeList(), 10**5000,
     [_BrokenRepr()], {"k": _deep(50)}, "x" * 10_000],
    ids=["broken", "deep", "self", "fake-list", "huge-int", "list-of-broken", "dict", "long-str"],
)
def test_safe_repr_never_raises_and_stays_bounded(value: object, limit: int | None) -> None:
    """However deep, huge or broken the value, safe_repr returns text within its limit."""
    text = safe_repr(value, limit)
    assert isinstance(text, str) and text
    if limit is not None:
        assert len(text) <= limit


def test_safe_repr_names_what_went_wrong() -> None:
    """A raising __repr__ and a huge int are described, not hidden."""
    assert safe_repr(_BrokenRepr()) == "<_BrokenRepr whose repr raised RuntimeError>"
    assert safe_repr([_BrokenRepr()]) == "[<_BrokenRepr whose repr raised RuntimeError>]"
    assert safe_repr(10**5000) == "an int of about 5001 digits"
    assert safe_repr(_deep(100_000), None) == "<list whose repr raised RecursionError>"


def test_safe_repr_width_grows_with_the_limit() -> None:
    """Error messages show six elements of a list; a 2,000-character budget shows more."""
    assert safe_repr(list(range(100))) == "[0, 1, 2, 3, 4, 5, ...]"
    assert safe_repr(list(range(50)), 2000) == repr(list(range(50)))
    assert safe_repr(list(range(100)), None) == repr(list(range(100)))


class _BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


@pytest.mark.parametrize(
    ("exc", "one_line", "text"),
    [
        (ValueError("bad"), False, "ValueError: bad"),
        (KeyError(), False, "KeyError"),
        (ValueError("two\nlines"), False, "ValueError: two\nlines"),
        (ValueError("two\n  lines"), True, "ValueError: two lines"),
        (_BrokenStr(), False, "_BrokenStr: <str() of the exception raised>"),
    ],
)
def test_describe_error(exc: BaseException, one_line: bool, text: str) -> None:
    """'Type: message', the name alone when empty, folded on request, even if str() raises."""
    assert describe_error(exc, one_line=one_line) == text
