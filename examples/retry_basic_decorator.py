"""Demo 1: the basic retry decorator.

Run it with ``python examples/retry_basic_decorator.py`` (well under a second).

A function that fails twice with ``ConnectionError`` and then answers is decorated with
``with_retry``: the caller sees only the answer. ``retry_stats`` tells what happened.
"""

from __future__ import annotations

from amorsize import with_retry

calls = 0


@with_retry(max_retries=3, initial_delay=0.01)
def fetch_price(symbol: str) -> float:
    """Pretend to call a flaky quote service: the first two calls fail."""
    global calls
    calls += 1
    if calls <= 2:
        raise ConnectionError(f"quote service unreachable (call {calls})")
    return 101.25


def main() -> None:
    price = fetch_price("ACME")
    print(f"price: {price} after {calls} calls")
    print(f"stats: {fetch_price.retry_stats}")
    print(f"still the function: name={fetch_price.__name__!r}, doc={fetch_price.__doc__!r}")


if __name__ == "__main__":
    main()
