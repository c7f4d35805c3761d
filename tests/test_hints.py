"""Server hints: RetryPolicy(wait_from=...) in every retry loop, and amorsize.retry_after."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest

from amorsize import (
    RetryExhaustedError,
    RetryFailure,
    RetryPolicy,
    create_batch_retry_wrapper,
    execute,
    retry_after,
    retry_call,
    with_retry,
)

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)

# ------------------------------------------------------------------------------- fixtures


class Throttled(Exception):
    """An application's own throttling error carrying the server's hint."""

    def __init__(self, retry_after: object = None) -> None:
        super().__init__(f"throttled, retry after {retry_after!r}")
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.retry_after,))


class FailThen:
    """Raises the given exceptions in turn, then returns `x * 2`."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, x: int = 1) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return x * 2


class Clock:
    """A virtual clock: `sleep` advances `monotonic` and records the delay."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Patch `time.sleep` and `time.monotonic` (the retry loop looks both up late)."""
    c = Clock()
    monkeypatch.setattr(time, "monotonic", c.monotonic)
    monkeypatch.setattr(time, "sleep", c.sleep)
    return c


def hinted(exc: BaseException) -> Any:
    """A wait_from reading only the test exception's own attribute."""
    return getattr(exc, "retry_after", None)


# ------------------------------------------------------------------ wait_from: sync loop


def test_hint_replaces_the_backoff_and_none_falls_back(clock: Clock) -> None:
    """A hint is slept as given; None (or no hint) uses the backoff delay of that attempt."""
    f = FailThen(Throttled(7), Throttled(None), ConnectionError(), Throttled(timedelta(seconds=3)))
    g = with_retry(f, max_retries=5, initial_delay=1.0, jitter=False, wait_from=hinted)
    assert g(4) == 8
    assert clock.slept == [7.0, 2.0, 4.0, 3.0]


@pytest.mark.parametrize(
    ("hint", "slept"),
    [(500, 60.0), (10**400, 60.0), (float("inf"), 60.0), (-3, 0.0), (0, 0.0), (2.5, 2.5),
     (timedelta(hours=2), 60.0), (timedelta(seconds=-1), 0.0)],
)  # fmt: skip
def test_hint_is_clamped_to_zero_and_max_delay(clock: Clock, hint: Any, slept: float) -> None:
    """Hints outside [0, max_delay] are clamped; a zero-second hint sleeps not at all."""
    calls: list[float] = []
    f = FailThen(Throttled(hint))
    policy = RetryPolicy(max_delay=60.0, wait_from=hinted, on_retry=lambda e, a, d: calls.append(d))
    assert retry_call(f, policy=policy) == 2
    assert calls == [slept]
    assert clock.slept == ([slept] if slept > 0 else [])


def test_on_retry_gets_the_delay_actually_slept(clock: Clock) -> None:
    """on_retry's delay is the hinted one, not the backoff it replaced."""
    seen: list[tuple[int, float]] = []
    f = FailThen(Throttled(9.5), ConnectionError())
    g = with_retry(
        f, initial_delay=0.5, jitter=False, wait_from=hinted,
        on_retry=lambda exc, attempt, delay: seen.append((attempt, delay)),
    )  # fmt: skip
    g()
    assert seen == [(1, 9.5), (2, 1.0)] and clock.slept == [9.5, 1.0]


def test_hint_past_max_elapsed_stops_with_reason_elapsed(clock: Clock) -> None:
    """A hinted sleep counts against max_elapsed: 30 s after 0 s used of 20 s stops at once."""
    f = FailThen(Throttled(30), Throttled(30))
    g = with_retry(f, max_delay=120.0, max_elapsed=20.0, wait_from=hinted)
    with pytest.raises(RetryExhaustedError) as info:
        g()
    err = info.value
    assert (err.reason, err.attempts, f.calls, clock.slept) == ("elapsed", 1, 1, [])
    assert "max_elapsed" in str(err) and isinstance(err.__cause__, Throttled)
    assert g.retry_stats.exhausted == 1


def test_hints_within_max_elapsed_are_slept(clock: Clock) -> None:
    """5 + 5 s fit in 12 s; the third 5 s sleep would end at 15 s and stops the call."""
    f = FailThen(*(Throttled(5) for _ in range(5)))
    g = with_retry(f, max_retries=-1, max_elapsed=12.0, wait_from=hinted)
    with pytest.raises(RetryExhaustedError) as info:
        g()
    assert clock.slept == [5.0, 5.0] and info.value.reason == "elapsed"


def test_reason_attempts_when_retries_run_out(clock: Clock) -> None:
    """Running out of retries is reason "attempts", with or without wait_from."""
    g = with_retry(FailThen(*(Throttled(1) for _ in range(5))), max_retries=2, wait_from=hinted)
    with pytest.raises(RetryExhaustedError) as info:
        g()
    assert info.value.reason == "attempts" and info.value.attempts == 3


@pytest.mark.parametrize("bad", ["soon", float("nan"), True, [1]])
def test_a_hint_that_is_not_seconds_is_logged_and_the_backoff_used(
    clock: Clock, caplog: pytest.LogCaptureFixture, bad: Any
) -> None:
    """A str, NaN, bool or list hint is not a delay: a warning, then the backoff."""
    g = with_retry(FailThen(Throttled(bad)), initial_delay=1.5, jitter=False, wait_from=hinted)
    with caplog.at_level(logging.WARNING, logger="amorsize"):
        assert g() == 2
    assert clock.slept == [1.5]
    assert "wait_from" in caplog.text and "backoff" in caplog.text


def test_a_wait_from_that_raises_is_logged_and_retrying_goes_on(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The hint reader failing is not the call failing: the backoff is used."""

    def broken(exc: BaseException) -> float:
        raise KeyError("no header")

    g = with_retry(FailThen(ConnectionError()), initial_delay=0.25, jitter=False, wait_from=broken)
    with caplog.at_level(logging.WARNING, logger="amorsize"):
        assert g() == 2
    assert clock.slept == [0.25] and "KeyError" in caplog.text


def test_wait_from_is_consulted_only_after_a_failure(clock: Clock) -> None:
    """Not on success, not when retries are exhausted, not for a rejected result."""
    asked: list[BaseException] = []

    def spy(exc: BaseException) -> None:
        asked.append(exc)

    ok = with_retry(lambda: 1, wait_from=spy)
    assert [ok() for _ in range(3)] == [1, 1, 1] and asked == []
    once = with_retry(FailThen(ConnectionError()), max_retries=0, wait_from=spy)
    with pytest.raises(RetryExhaustedError):
        once()
    results = iter([None, 3])
    by_result = with_retry(
        lambda: next(results), retry_on_result=lambda r: r is None, wait_from=spy
    )
    assert by_result() == 3 and asked == []


@pytest.mark.parametrize("bad", ["retry_after", 3.0, object()])
def test_wait_from_must_be_callable(bad: Any) -> None:
    """Checked once when the policy is built, naming the parameter and the fix."""
    with pytest.raises(TypeError, match=r"wait_from.*callable.*retry_after"):
        RetryPolicy(wait_from=bad)


def test_policy_with_wait_from_pickles_equal() -> None:
    """The policy crosses to process workers with its wait_from (a module-level function)."""
    p = RetryPolicy(max_retries=4, wait_from=retry_after)
    back = pickle.loads(pickle.dumps(p))
    assert back == p and back.wait_from is retry_after


# ------------------------------------------------- wait_from: async, retry_call, batches


def test_async_loop_sleeps_the_hint_and_stops_on_elapsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The async loop uses the same rule: hinted sleeps, then reason "elapsed"."""
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(d: float) -> None:
        slept.append(d)
        now[0] += d

    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    f = FailThen(Throttled(4), ConnectionError(), Throttled(50))

    async def call() -> int:
        return f()

    g = with_retry(call, initial_delay=1.0, jitter=False, max_elapsed=30.0, wait_from=hinted)
    with pytest.raises(RetryExhaustedError) as info:
        asyncio.run(g())
    assert slept == [4.0, 2.0] and info.value.reason == "elapsed" and f.calls == 3


def test_retry_call_and_batch_wrapper_use_the_hint(clock: Clock) -> None:
    """retry_call and create_batch_retry_wrapper share the compiled loop and its hint rule."""
    policy = RetryPolicy(max_retries=1, initial_delay=1.0, jitter=False, wait_from=hinted)
    assert retry_call(FailThen(Throttled(6)), args=(5,), policy=policy) == 10
    w = create_batch_retry_wrapper(FailThen(Throttled(2), Throttled(3)), policy)
    out = w(1)
    assert isinstance(out, RetryFailure) and out.attempts == 2
    assert clock.slept == [6.0, 2.0]


def throttled_item(x: int) -> int:
    """Fails with a one-hour Retry-After for odd items (module level: workers import it)."""
    if x % 2:
        raise Throttled(3600)
    return x * 10


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_execute_retry_policy_with_wait_from(backend: str) -> None:
    """Through execute(retry=...): the hour-long hint passes max_elapsed, so odd items stop
    at once with reason "elapsed" (in a worker process too: policy and error both pickle)."""
    policy = RetryPolicy(max_delay=7200.0, max_elapsed=60.0, wait_from=retry_after)
    out = execute(
        throttled_item, range(6), backend=backend, n_jobs=2, retry=policy, on_error="collect"
    )
    assert [out[i] for i in (0, 2, 4)] == [0, 20, 40]
    for i in (1, 3, 5):
        err = out[i].exception
        assert isinstance(err, RetryExhaustedError), err
        assert err.reason == "elapsed" and err.attempts == 1
        assert isinstance(err.original_exception, Throttled)


# ------------------------------------------------------------------------ retry_after


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(3, 3.0), (2.5, 2.5), (timedelta(minutes=2), 120.0), ("120", 120.0), (b" 7 ", 7.0),
     (-4, 0.0), ("Sun, 30 Nov 2026 12:01:30 GMT", 90.0), ("Sun, 30 Nov 2026 11:00:00 GMT", 0.0)],
)  # fmt: skip
def test_retry_after_reads_the_exceptions_own_attribute(value: Any, seconds: float) -> None:
    """exc.retry_after: a number, a timedelta, or a header value (seconds or HTTP-date)."""
    assert retry_after(Throttled(value), now=NOW) == seconds


@pytest.mark.parametrize(
    "value", [None, "soon", "", "nan", "inf", True, object(), "Mon, 99 Foo 2026 25:00:00 GMT"]
)
def test_retry_after_is_none_without_a_usable_hint(value: Any) -> None:
    """Missing, unparsable or non-finite values give None: the policy's backoff applies."""
    assert retry_after(Throttled(value), now=NOW) is None
    assert retry_after(ValueError("plain")) is None


class _Headers:
    """Only `.get`, case-sensitive: what a foreign headers class may offer."""

    def __init__(self, items: dict[str, str]) -> None:
        self._items = items

    def get(self, key: str) -> str | None:
        return self._items.get(key)


class _Response:
    def __init__(self, headers: object) -> None:
        self.headers = headers


class _HTTPError(Exception):
    def __init__(self, headers: object) -> None:
        super().__init__("429")
        self.response = _Response(headers)


def test_retry_after_reads_response_headers_of_any_shape() -> None:
    """A plain dict (any key case), a .get()-only object; the own attribute comes first."""
    assert retry_after(_HTTPError({"retry-after": "11"})) == 11.0
    assert retry_after(_HTTPError({"RETRY-AFTER": "12"})) == 12.0
    assert retry_after(_HTTPError(_Headers({"Retry-After": "13"}))) == 13.0
    assert retry_after(_HTTPError({"Content-Type": "text/plain"})) is None
    aiohttp_shaped = ConnectionError("429")  # aiohttp puts the headers on the exception
    aiohttp_shaped.headers = {"Retry-After": "14"}  # type: ignore[attr-defined]
    assert retry_after(aiohttp_shaped) == 14.0
    both = _HTTPError({"Retry-After": "20"})
    both.retry_after = 1  # type: ignore[attr-defined]
    assert retry_after(both) == 1.0


def test_retry_after_survives_properties_that_raise() -> None:
    """A `.response` that raises (httpx's errors without one) is just no hint."""

    class Odd(Exception):
        @property
        def response(self) -> Any:
            raise RuntimeError("no response set")

    assert retry_after(Odd()) is None


def test_retry_after_http_date_uses_the_current_time_by_default() -> None:
    """Without now=, an HTTP-date an hour ahead is about 3600 s away; one in the past is 0."""
    ahead = format_datetime(datetime.now(timezone.utc) + timedelta(hours=1), usegmt=True)
    got = retry_after(_HTTPError({"Retry-After": ahead}))
    assert got is not None and 3500 < got <= 3600
    assert retry_after(_HTTPError({"Retry-After": "Thu, 01 Jan 2015 00:00:00 GMT"})) == 0.0


def test_retry_after_with_requests() -> None:
    """A real requests.HTTPError from raise_for_status on a 429 (a falsy Response)."""
    requests = pytest.importorskip("requests")
    resp = requests.Response()
    resp.status_code = 429
    resp.headers["retry-after"] = "17"
    resp.url = "http://example.invalid/"
    with pytest.raises(requests.HTTPError) as info:
        resp.raise_for_status()
    assert not resp and retry_after(info.value) == 17.0


def test_retry_after_with_httpx() -> None:
    """A real httpx.HTTPStatusError from raise_for_status on a 503 with an HTTP-date."""
    httpx = pytest.importorskip("httpx")
    request = httpx.Request("GET", "http://example.invalid/")
    when = format_datetime(NOW + timedelta(seconds=45), usegmt=True)
    resp = httpx.Response(503, headers={"Retry-After": when}, request=request)
    with pytest.raises(httpx.HTTPStatusError) as info:
        resp.raise_for_status()
    assert retry_after(info.value, now=NOW) == 45.0
    assert retry_after(httpx.ConnectError("refused")) is None


def test_retry_after_with_aiohttp() -> None:
    """A real aiohttp.ClientResponseError carries the headers on the exception itself."""
    aiohttp = pytest.importorskip("aiohttp")
    from multidict import CIMultiDict, CIMultiDictProxy

    headers = CIMultiDictProxy(CIMultiDict({"Retry-After": "8"}))
    err = aiohttp.ClientResponseError(
        request_info=None, history=(), status=429, message="Too Many Requests", headers=headers
    )  # type: ignore[arg-type]
    assert retry_after(err) == 8.0
    bare = aiohttp.ClientResponseError(request_info=None, history=(), status=500)  # type: ignore[arg-type]
    assert retry_after(bare) is None


def test_retry_after_as_wait_from_end_to_end(clock: Clock) -> None:
    """The ready wait_from in a policy: a header hint, then a hint-less error's backoff."""
    f = FailThen(_HTTPError({"Retry-After": "4"}), ConnectionError())
    g = with_retry(f, initial_delay=1.0, jitter=False, wait_from=retry_after)
    assert g() == 2 and clock.slept == [4.0, 2.0]


# ------------------------------------------------------------------ hedge_after (async)


class Slow:
    """The first `stuck` calls wait until cancelled; later calls return at once."""

    def __init__(self, stuck: int = 1, fail: int = 0) -> None:
        self.stuck, self.fail = stuck, fail
        self.calls = 0
        self.cancelled = 0

    async def __call__(self, x: int) -> tuple[int, int]:
        self.calls += 1
        n = self.calls
        if n <= self.stuck:
            try:
                await asyncio.Event().wait()  # never set: only cancellation ends it
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if n <= self.stuck + self.fail:
            raise ConnectionError(f"call {n} failed")
        return x, n


def test_a_slow_attempt_is_hedged_and_the_loser_cancelled() -> None:
    """The stuck first call gets a second one after hedge_after; its result wins."""
    f = Slow(stuck=1)
    g = with_retry(f, max_retries=0, hedge_after=0.002)

    async def main() -> tuple[int, int]:
        out = await g(7)
        await asyncio.sleep(0)  # let the cancellation reach the loser
        return out

    assert asyncio.run(main()) == (7, 2)
    assert (f.calls, f.cancelled) == (2, 1)


def test_a_fast_attempt_is_not_hedged() -> None:
    """An attempt done before hedge_after runs alone."""
    f = Slow(stuck=0)
    g = with_retry(f, hedge_after=60.0)
    assert asyncio.run(g(3)) == (3, 1) and f.calls == 1


def test_both_hedged_copies_failing_is_one_failed_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hedged pair that both fail is one failed attempt: one backoff sleep, then a retry."""
    slept: list[float] = []

    async def fake_sleep(d: float) -> None:
        slept.append(d)

    calls: list[int] = []
    release = asyncio.Event()

    async def pair(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:  # slow, then fails once its hedge has failed
            await release.wait()
            raise ConnectionError("first copy")
        if len(calls) == 2:
            release.set()
            raise ConnectionError("hedge copy")
        return len(calls)

    g = with_retry(pair, max_retries=1, initial_delay=0.5, jitter=False, hedge_after=0.002)
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    assert asyncio.run(g(1)) == 3 and slept == [0.5]


def test_execute_async_backend_hedges_with_the_policy() -> None:
    """execute(retry=RetryPolicy(hedge_after=...)) hedges each item on the async backend."""
    f = Slow(stuck=1)

    async def item(x: int) -> int:
        return (await f(x))[0] * 10

    out = execute(item, range(4), backend="async", retry=RetryPolicy(hedge_after=0.002))
    assert out == [0, 10, 20, 30] and f.calls == 5 and f.cancelled == 1


@pytest.mark.parametrize("bad", [0, -1.0, "1", float("nan")])
def test_hedge_after_is_validated(bad: Any) -> None:
    """Seconds > 0, or None."""
    with pytest.raises((TypeError, ValueError), match="hedge_after"):
        RetryPolicy(hedge_after=bad)


def test_hedge_after_is_refused_for_sync_functions() -> None:
    """A thread cannot be cancelled: sync entry points refuse a hedging policy at once."""
    policy = RetryPolicy(hedge_after=1.0)
    with pytest.raises(TypeError, match=r"hedge_after.*async def"):
        with_retry(lambda x: x, policy=policy)
    with pytest.raises(TypeError, match="hedge_after"):
        retry_call(int, args=("1",), policy=policy)
    with pytest.raises(TypeError, match="hedge_after"):
        execute(abs, range(3), backend="threads", retry=policy)
    assert pickle.loads(pickle.dumps(policy)) == policy
