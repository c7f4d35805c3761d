"""Demo 6: how the delay grows with each attempt, and where it stops growing.

Run it with ``python examples/retry_backoff_progression.py`` (well under a second).

``min(initial_delay * exponential_base ** (attempt - 1), max_delay)``: the table shows it
for a few policies, then a real call with 3 ms of backoff is timed.
"""

from __future__ import annotations

import time

from amorsize import RetryPolicy, with_retry


def main() -> None:
    policies = {
        "base 2, 0.1 s, cap 60 s": RetryPolicy(initial_delay=0.1, jitter=False),
        "base 3, 0.5 s, cap 10 s": RetryPolicy(
            initial_delay=0.5, exponential_base=3.0, max_delay=10.0, jitter=False
        ),
        "constant 1 s (base 1)": RetryPolicy(initial_delay=1.0, exponential_base=1.0, jitter=False),
    }
    print("attempt  " + "  ".join(f"{name:>24}" for name in policies))
    for attempt in range(1, 9):
        row = "  ".join(f"{p.calculate_delay(attempt):>24.2f}" for p in policies.values())
        print(f"{attempt:>7}  {row}")
    huge = RetryPolicy(jitter=False).calculate_delay(10**9)
    print(f"attempt 10**9 -> {huge} s (capped, no overflow)")

    fails = iter([True, True, False])

    @with_retry(initial_delay=0.001, jitter=False)
    def op() -> str:
        if next(fails):
            raise TimeoutError
        return "done"

    t0 = time.perf_counter()
    op()
    print(f"2 retries slept 1 ms + 2 ms; the call took {(time.perf_counter() - t0) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
