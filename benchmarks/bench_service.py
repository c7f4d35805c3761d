"""A flaky, throttling service called for N items: amorsize with Retry-After vs the peers.

The "server" is a local object (no network) with a token bucket of its own: a call that
finds no token is refused with a 429 whose ``Retry-After`` header (whole seconds, as HTTP
sends them) says when the next token is due; a call that gets a token still fails with a
503 (no hint) at a fixed rate, and otherwise takes ``SERVICE_S`` of (virtual) time. Time
is a virtual clock: ``time.sleep`` and ``time.monotonic`` are replaced for the run, so
every retry library sleeps and measures on it and a run takes milliseconds of real time.
The client is one worker calling the items one after the other, every implementation
allowed the same ``ATTEMPTS`` per item.

What each implementation can do with the server's hint (their best settings here):

* amorsize: ``RetryPolicy(wait_from=retry_after)`` sleeps the hinted delay for the 429s
  and the policy's jittered exponential backoff for the 503s; ``amorsize_no_hint`` is
  the same policy without ``wait_from`` (what the hint buys);
* tenacity: no built-in Retry-After, but ``wait=`` takes any callable of the retry state:
  a custom wait returns the hint (parsed with ``amorsize.retry_after``; tenacity has no
  parser) or else ``wait_random_exponential`` (full jitter, as amorsize's policy here);
* stamina (>= 25.1): ``on=`` may be a hook returning a float, used as that retry's
  backoff: the hook returns the hint, or ``True`` for stamina's own backoff;
* backoff: ``backoff.runtime`` computes the wait from the exception, but the wait
  generator is then the same for every failure, so a 503 gets a constant
  (``FALLBACK_S``) instead of an exponential backoff.

Measured per implementation: items done and failed for good, calls made, calls refused
by the server (429), 503s, and the virtual wall time of the run.

Run: ``pytest benchmarks/bench_service.py -m benchmark`` (real time per run in
pytest-benchmark's table, the counts in ``extra_info``), or
``python benchmarks/bench_service.py`` for the table of counts, every profile.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from amorsize import RetryBudget, RetryPolicy, retry_after, with_retry
from amorsize.retry import seed_jitter

ITEMS = 500
ATTEMPTS = 6  # per item, for every implementation (5 retries)
SERVICE_S = 0.01  # virtual time one accepted call takes
INITIAL_S = 0.1  # first backoff delay
MAX_DELAY_S = 30.0
FALLBACK_S = 0.5  # backoff.runtime's wait for a failure without a hint
SEED = 20261130


@dataclass(frozen=True)
class Profile:
    """The server: ``rate`` tokens per second, up to ``burst``; ``failure_rate`` of 503s."""

    rate: float
    burst: int
    failure_rate: float


PROFILES = {
    "steady": Profile(rate=20.0, burst=20, failure_rate=0.05),
    "tight": Profile(rate=2.0, burst=5, failure_rate=0.05),
}


class Clock:
    """Virtual time: ``sleep`` advances ``now``; nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@contextlib.contextmanager
def virtual_time(clock: Clock) -> Iterator[None]:
    """Every library looks ``time.sleep`` / ``time.monotonic`` up when it calls them."""
    saved = time.sleep, time.monotonic
    time.sleep, time.monotonic = clock.sleep, clock.monotonic  # type: ignore[assignment]
    try:
        yield
    finally:
        time.sleep, time.monotonic = saved  # type: ignore[assignment]


class _Response:
    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status_code = status
        self.headers = headers


class HTTPError(Exception):
    """Shaped like ``requests.HTTPError``: the response and its headers on the exception."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.response = _Response(status, headers or {})


@dataclass
class Service:
    """The throttling, flaky server, with its counters."""

    profile: Profile
    clock: Clock
    rng: random.Random = field(default_factory=lambda: random.Random(SEED))
    tokens: float = 0.0
    last: float = 0.0
    calls: int = 0
    refused: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        self.tokens = float(self.profile.burst)

    def __call__(self, item: int) -> int:
        self.calls += 1
        now = self.clock.now
        p = self.profile
        self.tokens = min(float(p.burst), self.tokens + (now - self.last) * p.rate)
        self.last = now
        if self.tokens < 1.0:
            self.refused += 1
            due = (1.0 - self.tokens) / p.rate
            raise HTTPError(429, {"Retry-After": str(math.ceil(due))})
        self.tokens -= 1.0
        self.clock.now += SERVICE_S
        if self.rng.random() < p.failure_rate:
            self.failed += 1
            raise HTTPError(503)
        return item * 2


# ------------------------------------------------------------------ the implementations


def _amorsize(
    call: Callable[[int], int], hints: bool, budget: bool = False
) -> Callable[[int], int]:
    # The budget reads the virtual clock (time.monotonic is looked up at each call). Its
    # reserve is 1 retry/s, not the default 10: this client makes only 2-20 calls/s.
    policy = RetryPolicy(
        max_retries=ATTEMPTS - 1, initial_delay=INITIAL_S, max_delay=MAX_DELAY_S,
        jitter="full", wait_from=retry_after if hints else None,
        budget=RetryBudget(ratio=0.2, min_per_second=1.0, clock=lambda: time.monotonic())
        if budget
        else None,
    )  # fmt: skip
    return with_retry(call, policy=policy)


def _tenacity(call: Callable[[int], int]) -> Callable[[int], int]:
    import tenacity

    # Full jitter, as amorsize's policy here (wait_exponential_jitter adds up to 1 s).
    backoff = tenacity.wait_random_exponential(multiplier=INITIAL_S, max=MAX_DELAY_S)

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        hint = retry_after(exc) if exc is not None else None
        return backoff(state) if hint is None else min(hint, MAX_DELAY_S)

    decorate = tenacity.retry(
        stop=tenacity.stop_after_attempt(ATTEMPTS), wait=wait,
        retry=tenacity.retry_if_exception_type(HTTPError), reraise=True,
    )  # fmt: skip
    return decorate(call)


def _stamina(call: Callable[[int], int]) -> Callable[[int], int]:
    import stamina
    import stamina.instrumentation

    stamina.instrumentation.set_on_retry_hooks([])  # no logging per retry

    def on(exc: Exception) -> bool | float:
        hint = retry_after(exc) if isinstance(exc, HTTPError) else None
        return isinstance(exc, HTTPError) if hint is None else min(hint, MAX_DELAY_S)

    decorate = stamina.retry(
        on=on, attempts=ATTEMPTS, timeout=None, wait_initial=INITIAL_S,
        wait_max=MAX_DELAY_S, wait_jitter=INITIAL_S,
    )  # fmt: skip
    return decorate(call)


def _backoff(call: Callable[[int], int]) -> Callable[[int], int]:
    import backoff

    def value(exc: BaseException) -> float:
        hint = retry_after(exc)
        return FALLBACK_S if hint is None else min(hint, MAX_DELAY_S)

    decorate = backoff.on_exception(
        backoff.runtime, HTTPError, value=value, jitter=None, max_tries=ATTEMPTS,
        logger=None,
    )  # fmt: skip
    return decorate(call)  # type: ignore[no-any-return]


IMPLEMENTATIONS: dict[str, Callable[[Callable[[int], int]], Callable[[int], int]]] = {
    "amorsize": lambda call: _amorsize(call, hints=True),
    "amorsize_no_hint": lambda call: _amorsize(call, hints=False),
    "amorsize_budget": lambda call: _amorsize(call, hints=True, budget=True),
    "amorsize_no_hint_budget": lambda call: _amorsize(call, hints=False, budget=True),
    "tenacity": _tenacity,
    "stamina": _stamina,
    "backoff": _backoff,
}
PEERS = ("tenacity", "stamina", "backoff")


# ---------------------------------------------------------------------------- the run


@dataclass
class Outcome:
    """What one run measured."""

    done: int
    given_up: int
    calls: int
    refused: int
    failed_503: int
    virtual_s: float


def run(name: str, profile: Profile, items: int = ITEMS) -> Outcome:
    """Call the service for ``items`` items through implementation ``name``."""
    clock = Clock()
    service = Service(profile, clock)
    random.seed(SEED)  # the peers' jitter
    seed_jitter(SEED)  # amorsize's
    call = IMPLEMENTATIONS[name](service)
    done = given_up = 0
    with virtual_time(clock):
        for item in range(items):
            try:
                call(item)
            except Exception:  # every implementation's final error
                given_up += 1
            else:
                done += 1
    return Outcome(done, given_up, service.calls, service.refused, service.failed, clock.now)


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_service(benchmark: Any, name: str, profile: str) -> None:
    """One run per implementation and server profile; the counts go to extra_info."""
    if name in PEERS:
        pytest.importorskip(name)  # the `bench` extra
    out = benchmark.pedantic(
        run, args=(name, PROFILES[profile]), rounds=5, iterations=1, warmup_rounds=1
    )
    benchmark.extra_info.update(vars(out))
    assert out.done + out.given_up == ITEMS


def _real_ms(profile: Profile, items: int, rounds: int) -> dict[str, float]:
    """Real milliseconds per run of each implementation: best of interleaved rounds."""
    best = dict.fromkeys(IMPLEMENTATIONS, math.inf)
    for _ in range(rounds):
        for name in IMPLEMENTATIONS:
            t0 = time.perf_counter()
            run(name, profile, items)
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def main() -> None:
    """Print one table per server profile: counts, and ratios against amorsize."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for label, profile in PROFILES.items():
        print(
            f"\n{label}: {profile.rate:g} calls/s, burst {profile.burst}, "
            f"{profile.failure_rate:.0%} 503s; {args.items} items, {ATTEMPTS} attempts each"
        )
        print(f"{'':18}{'done':>6}{'gave up':>9}{'calls':>7}{'refused':>9}{'503s':>6}"
              f"{'virtual s':>11}{'calls/ours':>12}{'refused/ours':>14}{'real ms':>9}"
              f"{'real/ours':>11}")  # fmt: skip
        results = {name: run(name, profile, args.items) for name in IMPLEMENTATIONS}
        real = _real_ms(profile, args.items, args.rounds)
        ours = results["amorsize"]
        for name, o in results.items():
            print(
                f"{name:18}{o.done:6}{o.given_up:9}{o.calls:7}{o.refused:9}{o.failed_503:6}"
                f"{o.virtual_s:11.1f}{o.calls / ours.calls:12.2f}"
                f"{o.refused / max(ours.refused, 1):14.2f}{real[name]:9.2f}"
                f"{real[name] / real['amorsize']:11.2f}"
            )


if __name__ == "__main__":
    main()
