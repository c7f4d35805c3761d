"""Retry overhead: amorsize against a bare call, a hand-written wrapper and the peers.

Every implementation decorates the same function and is measured in the same run:

* ``success``: ``def f(x): return x + 1``, a call that does not fail;
* ``fail_once``: each logical call fails once, then succeeds on the retry, zero delay
  (``time.sleep`` is patched to a no-op for the peers, which call it even for 0 s);
* ``async_success``: ``async def f(x): return x + 1`` awaited 1,000 times in one coroutine;
* ``calculate_delay``: one backoff delay with jitter, computed from Python.

Run, then print the README table (ns per call and ratio to the baseline)::

    pytest benchmarks/bench_retry.py -m benchmark --benchmark-json=/tmp/retry.json
    python benchmarks/bench_retry.py /tmp/retry.json
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from amorsize import RetryPolicy, with_retry

MAX_TRIES = 4  # attempts allowed per call, for every implementation
CALLS = 1000  # calls per measured round: f(1) is called directly, as user code calls it


def _repeat(f: Callable[[int], int], n: int) -> Callable[[], None]:
    # A direct call inside a loop, the way real code calls a function (a harness that
    # calls f(*args) itself would hide CPython's fast path for Python-to-Python calls).
    def run() -> None:
        for _ in range(n):
            f(1)

    return run


def _peers_quiet() -> None:
    # stamina logs every retry through its default hooks (to stderr, at WARNING), which
    # amorsize does not do by default (its retries log at DEBUG): measure retrying, not I/O.
    import stamina.instrumentation

    stamina.instrumentation.set_on_retry_hooks([])


def _decorate(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` decorated by implementation `name`, retrying any Exception, zero delay."""
    if name in PEERS:
        pytest.importorskip(name)  # the `bench` extra
    if name in ("bare", "bare_loop"):
        return func
    if name == "hand_written":
        # A minimal generic retry decorator written by hand: a loop around try/except.
        if asyncio.iscoroutinefunction(func):

            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                attempt = 1
                while True:
                    try:
                        return await func(*args, **kwargs)
                    except Exception:
                        if attempt >= MAX_TRIES:
                            raise
                        attempt += 1

            return awrapper

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            attempt = 1
            while True:
                try:
                    return func(*args, **kwargs)
                except Exception:
                    if attempt >= MAX_TRIES:
                        raise
                    attempt += 1

        return wrapper
    if name == "amorsize":
        return with_retry(func, max_retries=MAX_TRIES - 1, initial_delay=0.0, jitter=False)
    if name == "opnieuw":
        import opnieuw

        return opnieuw.retry(retry_on_exceptions=Exception, max_calls_total=MAX_TRIES)(func)  # type: ignore[no-any-return]
    if name == "backoff":
        import backoff

        deco = backoff.on_exception(
            backoff.constant, Exception, max_tries=MAX_TRIES, interval=0, jitter=None
        )
        return deco(func)  # type: ignore[no-any-return]
    if name == "stamina":
        import stamina

        _peers_quiet()
        return stamina.retry(  # type: ignore[no-any-return]
            on=Exception, attempts=MAX_TRIES, wait_initial=0, wait_max=0, wait_jitter=0
        )(func)
    if name == "tenacity":
        import tenacity

        return tenacity.retry(  # type: ignore[no-any-return]
            stop=tenacity.stop_after_attempt(MAX_TRIES), wait=tenacity.wait_none(), reraise=True
        )(func)
    raise ValueError(name)


PEERS = ("opnieuw", "backoff", "stamina", "tenacity")
SYNC_IMPLS = ["bare", "hand_written", "amorsize", *PEERS]


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Peers sleep even for 0 s (about 76 us per time.sleep(0)): patch it out for them."""
    monkeypatch.setattr(time, "sleep", lambda s: None)
    try:
        import opnieuw.test_util
    except ImportError:
        yield
        return
    with opnieuw.test_util.retry_immediately():
        yield


# ------------------------------------------------------------------------------ success


def plus_one(x: int) -> int:
    return x + 1


@pytest.mark.benchmark(group="retry: success path")
@pytest.mark.parametrize("impl", SYNC_IMPLS)
def test_success(benchmark: Any, impl: str) -> None:
    """A decorated call that does not fail."""
    f = _decorate(impl, plus_one)
    assert f(1) == 2
    benchmark(_repeat(f, CALLS))


# ---------------------------------------------------------------------------- fail once


def _fail_every_other() -> Callable[[int], int]:
    failed = [False]

    def f(x: int) -> int:
        if not failed[0]:
            failed[0] = True
            raise ConnectionError("transient")
        failed[0] = False
        return x + 1

    return f


@pytest.mark.benchmark(group="retry: fail once, succeed on retry (zero delay)")
@pytest.mark.parametrize("impl", ["bare_loop", *SYNC_IMPLS[1:]])
def test_fail_once(benchmark: Any, impl: str, no_sleep: None) -> None:
    """Each logical call raises once and succeeds on the retry."""
    raw = _fail_every_other()
    if impl == "bare_loop":
        # The floor: the same two calls and one exception, with no retry library at all.
        def f(x: int) -> int:
            try:
                return raw(x)
            except ConnectionError:
                return raw(x)

    else:
        f = _decorate(impl, raw)
    assert f(1) == 2 and f(1) == 2
    benchmark(_repeat(f, CALLS))


# -------------------------------------------------------------------------------- async


async def aplus_one(x: int) -> int:
    return x + 1


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.mark.benchmark(group=f"retry: async success path ({CALLS} awaits per round)")
@pytest.mark.parametrize("impl", SYNC_IMPLS)
def test_async_success(benchmark: Any, impl: str, loop: asyncio.AbstractEventLoop) -> None:
    """`await f(x)` of a decorated coroutine function that does not fail."""
    if impl == "opnieuw":
        opnieuw = pytest.importorskip("opnieuw")

        f = opnieuw.retry_async(retry_on_exceptions=Exception, max_calls_total=MAX_TRIES)(aplus_one)
    else:
        f = _decorate(impl, aplus_one)

    async def drive() -> int:
        total = 0
        for _ in range(CALLS):
            total += await f(1)
        return total

    def run() -> int:
        return loop.run_until_complete(drive())

    assert run() == 2 * CALLS
    benchmark(run)


# ------------------------------------------------------------------------ calculate_delay


def _python_delay(attempt: int) -> float:
    # The same formula as RetryPolicy(jitter=True), in plain Python, for reference.
    d = min(0.1 * 2.0 ** (attempt - 1), 60.0)
    return min(d * (0.75 + 0.5 * random.random()), 60.0)


@pytest.mark.benchmark(group="retry: calculate_delay from Python")
@pytest.mark.parametrize("impl", ["amorsize", "python", "tenacity"])
def test_calculate_delay(benchmark: Any, impl: str) -> None:
    """One jittered exponential delay (attempt 3)."""
    if impl == "amorsize":
        f: Callable[[Any], float] = RetryPolicy().calculate_delay
        arg: Any = 3
    elif impl == "python":
        f, arg = _python_delay, 3
    else:
        tenacity = pytest.importorskip("tenacity")
        wait = tenacity.wait_random_exponential(multiplier=0.1, max=60.0, exp_base=2.0)
        state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        state.attempt_number = 3
        f, arg = wait, state
    d = f(arg)
    assert math.isfinite(d) and d >= 0
    benchmark(f, arg)


# --------------------------------------------------------------------------------- table


def _table(path: str) -> str:
    """The README table from a pytest-benchmark JSON file: ns per call, ratio to baseline."""
    data = json.loads(Path(path).read_text())
    groups: dict[str, list[tuple[str, float]]] = {}
    for b in data["benchmarks"]:
        per_call = b["stats"]["median"] * 1e9
        if not b["name"].startswith("test_calculate_delay"):
            per_call /= CALLS
        groups.setdefault(b["group"], []).append((b["param"], per_call))
    lines = []
    for group, rows in groups.items():
        base = dict(rows).get("bare", dict(rows).get("bare_loop", dict(rows).get("python")))
        lines += [
            f"**{group}**",
            "",
            "| implementation | ns per call | over baseline (ns) | ratio |",
            "|---|---:|---:|---:|",
        ]
        for name, ns in sorted(rows, key=lambda r: r[1]):
            ratio = f"{ns / base:.2f}x" if base else "-"
            over = f"{ns - base:+,.0f}" if base else "-"
            lines.append(f"| {name} | {ns:,.0f} | {over} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table(sys.argv[1]))
