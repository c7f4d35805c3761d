"""Demo 3: retries inside parallel workers, with ``amorsize.execute``.

Run it with ``python examples/retry_parallel_execution.py`` (about a second).

The decorated function is defined at module level, so it pickles by reference and every
worker process imports it and retries on its own. One item never recovers: with
``on_error="collect"`` its slot holds an ``ItemFailure`` whose exception is a
``RetryExhaustedError`` naming the attempts made.
"""

from __future__ import annotations

import os

from amorsize import ItemFailure, execute, with_retry

_seen: dict[int, int] = {}  # per worker process: attempts made for each item


@with_retry(max_retries=2, initial_delay=0.001, jitter="full")
def flaky_square(x: int) -> int:
    """Fails on the first attempt for multiples of 3; item 13 always fails."""
    _seen[x] = _seen.get(x, 0) + 1
    if x == 13 or (x % 3 == 0 and _seen[x] == 1):
        raise ConnectionError(f"item {x}: worker {os.getpid()} lost its connection")
    return x * x


def main() -> None:
    results = execute(flaky_square, range(16), n_jobs=2, backend="processes", on_error="collect")
    assert isinstance(results, list)
    ok = [r for r in results if not isinstance(r, ItemFailure)]
    failed = [r for r in results if isinstance(r, ItemFailure)]
    print(f"{len(ok)} items ok: {ok}")
    for f in failed:
        print(f"failed for good: {f}")


if __name__ == "__main__":
    main()
