"""The compiled serial loop (``_core_serial.pxi``): each item once, failures where the
executor's policy puts them, everything else propagating unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from amorsize._core import SerialMap, SerialStream, serial_extend


def _square_or_fail(x: int) -> int:
    if x % 5 == 3:
        raise ValueError(f"bad {x}")
    return x * x


def _slot(index: int, item: Any, exc: Exception) -> tuple[int, Any, str]:
    return index, item, str(exc)


def test_serial_extend_appends_results_and_slots_failures() -> None:
    """Results follow what is there already; a failure takes the callback's value."""
    values: list[Any] = ["sampled"]
    failures = serial_extend(_square_or_fail, iter(range(1, 9)), values, 10, _slot)
    assert failures == 2
    assert values == ["sampled", 1, 4, (13, 3, "bad 3"), 16, 25, 36, 49, (18, 8, "bad 8")]


def test_serial_extend_stops_when_the_callback_raises() -> None:
    """Raise mode: the callback raises, and no later item is taken from the input."""
    it = iter(range(10))

    def stop(index: int, item: Any, exc: Exception) -> Any:
        raise exc

    values: list[Any] = []
    with pytest.raises(ValueError, match="bad 3"):
        serial_extend(_square_or_fail, it, values, 0, stop)
    assert values == [0, 1, 4]
    assert next(it) == 4


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_base_exceptions_are_not_item_failures(exc: type[BaseException]) -> None:
    """Ctrl-C and friends end the run as they are: the callback never sees them."""

    def func(x: int) -> int:
        if x == 2:
            raise exc
        return x

    seen: list[Any] = []
    with pytest.raises(exc):
        serial_extend(func, iter(range(5)), [], 0, lambda *a: seen.append(a))
    with pytest.raises(exc):
        list(SerialMap(func, iter(range(5)), 0, lambda *a: seen.append(a)))
    assert seen == []


def test_an_error_of_the_input_propagates() -> None:
    """The iterator's own error is not an item failure."""

    def source() -> Iterator[int]:
        yield 1
        raise KeyError("input broke")

    seen: list[Any] = []
    with pytest.raises(KeyError, match="input broke"):
        serial_extend(abs, source(), [], 0, lambda *a: seen.append(a))
    with pytest.raises(KeyError, match="input broke"):
        list(SerialMap(abs, source(), 0, lambda *a: seen.append(a)))
    assert seen == []


@pytest.mark.parametrize("pairs", [False, True])
def test_serial_map_yields_results_failures_and_counts(pairs: bool) -> None:
    """Input ``start`` comes first; pairs carry the input index; count is items taken."""
    m = SerialMap(_square_or_fail, iter(range(1, 6)), 7, _slot, pairs)
    got = list(m)
    want: list[Any] = [1, 4, (9, 3, "bad 3"), 16, 25]
    assert got == (list(enumerate(want, 7)) if pairs else want)
    assert m.count == 5
    assert iter(m) is m


def test_serial_stream_flattens_its_parts_in_order() -> None:
    """Lists and iterators alike, each item once, then the parts' end."""

    def parts() -> Iterator[Any]:
        yield [1, 2]
        yield []
        yield SerialMap(abs, iter([-3, -4]), 2, _slot)
        yield iter([5])

    s = SerialStream(parts())
    assert list(s) == [1, 2, 3, 4, 5]
    with pytest.raises(StopIteration):
        next(s)


def test_serial_stream_closes_its_parts_on_an_error_and_when_closed() -> None:
    """A part's error closes the generator (the run finishes) and spends the stream;
    close() closes it too."""
    finished: list[str] = []

    def parts(tag: str) -> Iterator[Any]:
        try:
            yield [0]
            yield SerialMap(_square_or_fail, iter(range(1, 9)), 1, _raise)
        finally:
            finished.append(tag)

    s = SerialStream(parts("error"))
    with pytest.raises(ValueError, match="bad 3"):
        list(s)
    assert finished == ["error"]
    with pytest.raises(StopIteration):
        next(s)
    s = SerialStream(parts("closed"))
    assert next(s) == 0
    s.close()
    assert finished == ["error", "closed"]
    with pytest.raises(StopIteration):
        next(s)


def _raise(index: int, item: Any, exc: Exception) -> Any:
    raise exc


@pytest.mark.parametrize("pairs", [False, True])
def test_serial_stream_runs_a_map_part_as_the_map_would(pairs: bool) -> None:
    """The stream runs a SerialMap part's loop itself: the same items, failures, pairs and
    count as the map's own iteration."""

    def parts() -> Iterator[Any]:
        yield SerialMap(_square_or_fail, iter(range(1, 10)), 7, _slot, pairs)

    alone = list(SerialMap(_square_or_fail, iter(range(1, 10)), 7, _slot, pairs))
    source = parts()
    m = SerialMap(_square_or_fail, iter(range(1, 10)), 7, _slot, pairs)
    streamed = list(SerialStream(iter([m])))
    assert streamed == alone == list(SerialStream(source))
    assert m.count == 9


@pytest.mark.parametrize(
    "broken",
    [
        lambda: SerialMap(_raise_base, iter(range(5)), 0, _slot),  # Ctrl-C in func
        lambda: SerialMap(abs, _broken_input(), 0, _slot),  # the input's own error
    ],
)
def test_serial_stream_map_part_errors_close_the_parts(broken: Any) -> None:
    """An error that is not an item failure ends the stream from a map part too, parts closed."""
    finished: list[bool] = []

    def parts() -> Iterator[Any]:
        try:
            yield broken()
        finally:
            finished.append(True)

    s = SerialStream(parts())
    with pytest.raises((KeyboardInterrupt, KeyError)):
        list(s)
    assert finished == [True]


def _raise_base(x: int) -> int:
    if x == 2:
        raise KeyboardInterrupt
    return x


def _broken_input() -> Iterator[int]:
    yield 1
    raise KeyError("input broke")
