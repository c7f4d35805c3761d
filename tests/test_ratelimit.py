"""RateLimiter: GCRA windows on recorded timestamps, sharing across workers, clean-up."""

from __future__ import annotations

import asyncio
import os
import pickle
import sys
from typing import Any

import cloudpickle
import pytest

from amorsize import ItemFailure, RateLimiter, RetryPolicy, execute, execute_async, execute_iter
from amorsize._shared import Shareable
from amorsize.backends import get_backend
from amorsize.executor import RunObserver

# Spawned workers cannot import this module (importlib mode): send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FakeTime:
    """A clock that only a sleep moves: timestamps then follow the limiter's arithmetic."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def frozen_clock() -> float:
    return 0.0


def refuse(seconds: float) -> None:
    # A builtin class: it pickles back from workers that got this module by value.
    raise BlockingIOError(f"would wait {seconds:.3f} s")


def square(x: int) -> int:
    return x * x


def _max_in_window(stamps: list[float], per: float) -> int:
    return max(sum(1 for t in stamps if s <= t < s + per - 1e-9) for s in stamps)


@pytest.mark.parametrize(("rate", "per", "burst"), [(5, 1.0, 2), (3, 0.5, 0), (10, 2.0, 4)])
def test_any_window_of_per_seconds_holds_at_most_rate_plus_burst_starts(
    rate: int, per: float, burst: int
) -> None:
    """Starts recorded on the injected clock never exceed rate + burst in any window, and reach it."""
    t = FakeTime()
    lim = RateLimiter(rate, per=per, burst=burst, clock=t.clock, sleep=t.sleep)
    stamps = []
    for _ in range(6 * (rate + burst)):
        lim.acquire()
        stamps.append(t.clock())
    assert _max_in_window(stamps, per) == rate + burst


def test_waiting_callers_sleep_exactly_their_turn_once() -> None:
    """A waiting call sleeps once, for exactly the spacing: no polling, no extra wait."""
    t = FakeTime()
    lim = RateLimiter(4, per=1.0, burst=0, clock=t.clock, sleep=t.sleep)
    waits = [lim.acquire() for _ in range(5)]
    assert waits == [0.0, 0.25, 0.25, 0.25, 0.25]
    assert t.sleeps == [0.25] * 4


def test_a_quiet_spell_refills_at_most_burst_plus_one() -> None:
    """After a long pause only burst + 1 calls start at once."""
    t = FakeTime()
    lim = RateLimiter(2, per=1.0, burst=3, clock=t.clock, sleep=t.sleep)
    t.now = 1000.0
    assert [lim.try_acquire() for _ in range(5)] == [True] * 4 + [False]


def test_decorator_limits_sync_and_async_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """@limiter spaces the calls of a plain and of an async def function alike."""
    t = FakeTime()
    lim = RateLimiter(2, per=1.0, burst=0, clock=t.clock, sleep=t.sleep)
    stamps: list[float] = []

    @lim
    def f(x: int) -> int:
        stamps.append(t.now)
        return x

    @lim
    async def g(x: int) -> int:
        stamps.append(t.now)
        return x

    async def fake_sleep(seconds: float) -> None:
        t.sleep(seconds)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    assert [f(1), f(2)] == [1, 2]
    assert asyncio.run(g(3)) == 3
    assert stamps == [0.0, 0.5, 1.0]
    assert f.__name__ == "f" and asyncio.iscoroutinefunction(g)


@pytest.mark.parametrize("backend", ["threads", "processes", "processes-spawn"])
def test_all_workers_of_a_run_draw_from_one_bucket(backend: str) -> None:
    """With the clock stopped, exactly burst + 1 calls start across every worker."""
    lim = RateLimiter(5, per=1.0, burst=3, clock=frozen_clock, sleep=refuse)
    be: Any = backend
    if backend == "processes-spawn":
        be = get_backend("processes", start_method="spawn")
    out = execute(
        square, range(24), backend=be, n_jobs=2, chunksize=1, on_error="collect",
        rate_limit=lim,
    )  # fmt: skip
    done = [r for r in out if not isinstance(r, ItemFailure)]
    refused = [r for r in out if isinstance(r, ItemFailure)]
    assert len(done) == 4
    assert all(isinstance(r.exception, BlockingIOError) for r in refused)
    assert not lim.try_acquire()  # the run's starts stayed in the limiter


def test_retries_wait_for_the_limiter_too() -> None:
    """Each retry of an item takes a start: burst + 1 attempts, then the limiter refuses."""
    calls = []

    def flaky(x: int) -> int:
        calls.append(x)
        raise ValueError("busy")

    lim = RateLimiter(1, per=1.0, burst=5, clock=frozen_clock, sleep=refuse)
    policy = RetryPolicy(max_retries=20, initial_delay=0, retry_on_exceptions=(ValueError,))
    out = execute(flaky, [7], backend="serial", retry=policy, on_error="collect", rate_limit=lim)
    assert len(calls) == 6
    assert isinstance(out[0], ItemFailure) and isinstance(out[0].exception, BlockingIOError)


def test_async_function_runs_are_limited() -> None:
    """execute on an async def function awaits the limiter before each call."""

    async def double(x: int) -> int:
        return 2 * x

    lim = RateLimiter(1, per=1.0, burst=2, clock=frozen_clock, sleep=refuse)
    t = FakeTime()
    lim_ok = RateLimiter(100, per=1.0, burst=100, clock=t.clock)
    assert execute(double, range(5), rate_limit=lim_ok) == [0, 2, 4, 6, 8]
    out = execute(double, range(5), rate_limit=lim, on_error="collect", backend="async")
    assert sum(not isinstance(r, ItemFailure) for r in out) == 3
    assert not lim.try_acquire()
    again = RateLimiter(1, per=1.0, burst=1, clock=frozen_clock, sleep=refuse)
    out = asyncio.run(execute_async(double, range(4), rate_limit=again, on_error="collect"))
    assert sum(not isinstance(r, ItemFailure) for r in out) == 2


def _recording_shares(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    names: list[str] = []
    share = Shareable._share

    def recording(self: Shareable) -> str:
        name = share(self)
        names.append(name)
        return name

    monkeypatch.setattr(Shareable, "_share", recording)
    return names


def _segment_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


class _Interrupt(RunObserver):
    def on_success(self, index: int, item: Any, result: Any) -> None:
        raise KeyboardInterrupt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /dev/shm")
def test_no_segment_outlives_a_run_or_a_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """The segment a run shared is unlinked when it ends, normally or by KeyboardInterrupt."""
    names = _recording_shares(monkeypatch)
    lim = RateLimiter(1000, per=1.0, burst=1000)
    assert execute(square, range(8), backend="processes", n_jobs=2, rate_limit=lim)[3] == 9
    with pytest.raises(KeyboardInterrupt):
        execute(square, range(8), backend="processes", n_jobs=2, rate_limit=lim,
                observers=[_Interrupt()])  # fmt: skip
    assert len(names) == 2
    assert not any(_segment_exists(n) for n in names)
    assert lim.shared_name is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /dev/shm")
def test_pickling_attaches_to_the_same_state_until_close() -> None:
    """A pickled limiter maps the same slot; in its own process it unpickles as itself."""
    lim = RateLimiter(1, per=60.0, burst=0)
    again = pickle.loads(pickle.dumps(lim))
    assert again is lim
    name = lim.shared_name
    assert name is not None and _segment_exists(name)
    assert lim.try_acquire() and not again.try_acquire()
    lim.close()
    assert not _segment_exists(name) and not lim.try_acquire()


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"rate": 0}, ValueError, r"RateLimiter: rate must be a finite number in \(0, .*; got 0"),
        ({"rate": 1, "per": -1}, ValueError, "RateLimiter: per must be"),
        ({"rate": 1, "burst": 1.5}, TypeError, "RateLimiter: burst must be an int"),
        ({"rate": 1, "clock": 3}, TypeError, "RateLimiter: clock must be a callable"),
        ({"rate": 1e-9, "per": 86400}, ValueError, r"per / rate \* \(burst \+ 1\) must be"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict[str, Any], error: type, text: str) -> None:
    """Each bad parameter raises naming itself, the rule and the value."""
    with pytest.raises(error, match=text):
        RateLimiter(**kwargs)


def test_execute_refuses_a_non_limiter_and_a_cluster_backend() -> None:
    """rate_limit= takes a RateLimiter; a cluster backend is refused before anything runs."""
    ran: list[int] = []
    with pytest.raises(TypeError, match=r"execute\(\): rate_limit must be an amorsize.RateLimiter"):
        execute(square, [1], rate_limit=5)
    with pytest.raises(ValueError, match="RateLimiter cannot be shared with backend='dask'"):
        list(execute_iter(ran.append, [1], backend="dask", rate_limit=RateLimiter(1)))
    assert ran == []
