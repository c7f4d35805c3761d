"""A circuit breaker in front of a failing dependency, and around a whole ``execute`` run.

Run it with ``python examples/reliability_circuit_breaker.py`` (about 1 second).

1. A decorated function: three failures open the breaker, calls then fail fast with
   ``CircuitOpenError`` (which says when the next call is allowed), and after ``timeout``
   a successful probe closes it again.
2. ``execute(..., circuit_breaker=...)``: once the breaker opens, no new item is dispatched;
   the items never attempted are reported with the run's counts.
"""

from __future__ import annotations

import logging
import time

from amorsize import (
    CircuitBreaker,
    CircuitBreakerPolicy,
    CircuitOpenError,
    ItemFailure,
    execute,
)

SERVICE_UP = False


def fetch(key: str) -> str:
    """Stands for a call to a remote service that is down until SERVICE_UP is set."""
    if not SERVICE_UP:
        raise ConnectionError(f"service unreachable while fetching {key!r}")
    return key.upper()


def price(x: int) -> float:
    """A batch step whose backend starts failing after item 20."""
    if x >= 20:
        raise ConnectionError("pricing backend is down")
    return x * 1.5


def main() -> None:
    global SERVICE_UP
    logging.basicConfig(level=logging.WARNING, format="  log: %(message)s")

    print("1. a guarded function")
    breaker = CircuitBreaker(
        CircuitBreakerPolicy(
            failure_threshold=3,
            timeout=0.3,
            success_threshold=1,
            expected_exceptions=(ConnectionError,),
            on_close=lambda b: print(f"  breaker {b.name!r} closed again"),
        ),
        name="profile-service",
    )
    guarded = breaker(fetch)
    for attempt in range(5):
        try:
            guarded("ada")
        except ConnectionError as exc:
            print(f"  call {attempt}: failed ({exc}), state={breaker.state}")
        except CircuitOpenError as exc:
            print(f"  call {attempt}: refused without calling: {exc}")
    SERVICE_UP = True
    time.sleep(0.35)
    print(f"  after the timeout the state reads {breaker.state}; a probe call ->", guarded("ada"))

    print("\n2. guarding a whole execute run")
    out, plan = execute(
        price,
        range(100),
        circuit_breaker=CircuitBreakerPolicy(failure_threshold=5, timeout=60.0),
        on_error="collect",
        backend="threads",
        n_jobs=2,
        chunksize=1,
        return_plan=True,
    )
    not_attempted = [v for v in out if isinstance(v, ItemFailure) and v.attempts == 0]
    print(f"  {plan.completed} completed, {plan.failed} failed, {plan.not_attempted} not attempted")
    print(f"  why: {not_attempted[0].exception}")


if __name__ == "__main__":
    main()
