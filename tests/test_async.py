"""``async def`` functions: the async backend, its planning, and ``execute_async``."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import amorsize
from amorsize import ItemFailure, RetryExhaustedError, execute, execute_async, execute_iter
from amorsize.backends import aio, get_backend
from amorsize.backends.base import NotRunError, StopOnFailure, Task
from amorsize.retry import RetryPolicy, set_testing, with_retry


class Boom(Exception):
    """What the failing test functions raise."""


async def double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


async def fail_on_odd(x: int) -> int:
    await asyncio.sleep(0)
    if x % 2:
        raise Boom(f"odd {x}")
    return x


async def scaled(x: int, factor: int) -> int:
    await asyncio.sleep(0)
    return x * factor


class Doubler:
    """An object whose ``__call__`` is ``async def``."""

    async def __call__(self, x: int) -> int:
        return 2 * x


def plain_double(x: int) -> int:
    return 2 * x


ASYNC_FUNCS = [
    double,
    functools.partial(scaled, factor=2),
    with_retry(max_retries=1)(double),
    Doubler(),
]


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("func", ASYNC_FUNCS, ids=["def", "partial", "with_retry", "__call__"])
def test_results_equal_in_input_order(func: Any) -> None:
    """An async function (also through partial, with_retry, __call__) is awaited, in order."""
    results, plan = execute(func, range(100), return_plan=True)
    assert results == [2 * x for x in range(100)]
    assert plan.backend == "async" and plan.chunksize == 1 and "event loop" in plan.reason


@pytest.mark.parametrize(
    ("data", "n"), [([], 0), (iter([]), 0), ((x for x in range(37)), 37)], ids=["empty", "empty-iter", "gen"]
)
def test_empty_and_generator_input(data: Any, n: int) -> None:
    """Empty inputs give [], a generator of unknown length runs completely."""
    assert execute(double, data) == [2 * x for x in range(n)]
    assert list(execute_iter(double, iter(range(n)))) == [2 * x for x in range(n)]


def test_execute_iter_unordered_yields_every_index() -> None:
    """ordered=False yields (index, result) pairs for every item."""
    pairs = list(execute_iter(double, range(50), ordered=False, backend="async"))
    assert sorted(pairs) == [(i, 2 * i) for i in range(50)]


def test_explicit_sizes_skip_sampling() -> None:
    """backend='async' with n_jobs and chunksize runs as given (chunks awaited in order)."""
    results, plan = execute(double, range(23), backend="async", n_jobs=3, chunksize=4,
                            return_plan=True)
    assert results == [2 * x for x in range(23)]
    assert (plan.n_jobs, plan.chunksize, plan.reason) == (3, 4, "given by the caller")


# --------------------------------------------------------------------------- wrong backend


def test_plain_function_on_async_backend_names_the_fix() -> None:
    """backend='async' with a plain function is an error that says what to do."""
    with pytest.raises(TypeError, match=r"backend='async'.*not an async def.*backend='auto'"):
        execute(plain_double, [1], backend="async")


@pytest.mark.parametrize("backend", ["serial", "threads", "processes"])
def test_async_function_on_other_backend_is_refused(backend: str) -> None:
    """An async function on a backend that would not await it is an error, not coroutines."""
    with pytest.raises(ValueError, match=rf"async def.*backend={backend!r}.*backend='async'"):
        execute(double, [1], backend=backend)


def test_plain_function_returning_coroutines_names_the_fix() -> None:
    """A plain function that returns coroutines is caught by the sample, not returned."""
    with pytest.raises(TypeError, match=r"returned a coroutine.*async def"):
        execute(lambda x: double(x), range(10))


def test_optimize_refuses_the_async_backend() -> None:
    """optimize() plans the other backends; execute plans async itself."""
    with pytest.raises(ValueError, match=r"'async' runs async def functions.*execute"):
        amorsize.optimize(plain_double, range(10), backends=["async"])


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize(
    ("wait", "cpu", "left", "expected"),
    [
        (0.02, 20e-6, 10_000, aio.MAX_CONCURRENCY),  # waiting work: the cap
        (0.02, 20e-6, 300, 300),  # never more than the items left
        (0.02, 20e-6, None, aio.MAX_CONCURRENCY),  # unknown length
        (1e-3, 1e-3, 10_000, 4),  # CPU-bound coroutines: a few, just the headroom
        (1e-3, 0.5e-3, 10_000, 8),  # half waiting: 4 x 2
        (0.0, 0.0, 10, 4),  # nothing measured
    ],
)
def test_concurrency_follows_the_wait_fraction(
    wait: float, cpu: float, left: int | None, expected: int
) -> None:
    """Coroutines in flight = 4 x wait/CPU per item, capped by items left and MAX_CONCURRENCY."""
    assert aio.concurrency(wait, cpu, left)[0] == expected


def test_plan_from_an_injected_sample() -> None:
    """The plan's sizes come from the sample's wall and CPU; the caller's n_jobs wins."""
    sampled = aio.Sampled([(True, 1, 0.01)] * 4, wall=0.01, cpu=4 * 0.001)
    assert aio.plan(sampled, 1000, None, None).n_jobs == 40
    fixed = aio.plan(sampled, 1000, 7, None)
    assert (fixed.n_jobs, fixed.chunksize) == (7, 1) and "n_jobs=7" in fixed.reason


def test_sampled_items_are_not_run_again() -> None:
    """The first items are awaited to plan the run; their results are reused."""
    calls: list[int] = []

    async def counted(x: int) -> int:
        calls.append(x)
        return x

    results, plan = execute(counted, range(40), return_plan=True)
    assert results == list(range(40)) and sorted(calls) == list(range(40))
    assert plan.reused == aio.SAMPLE_ITEMS


@pytest.mark.parametrize(
    ("busy", "n", "room", "spill"),
    [
        (0.9, 16, 984, 0),  # the loop is busy: the items use it, no more in flight
        (0.2, 16, 984, 984),  # they wait: every item offered
        (0.2, 16, 4000, 984),  # ... up to MAX_CONCURRENCY in flight
        (0.0, 16, 4, 4),  # never more than offered
    ],
)
def test_spill_count(busy: float, n: int, room: int, spill: int) -> None:
    """How many items join a sample that leaves the loop idle."""
    assert aio.spill_count(busy, n, room) == spill


def _gated(need: int, started: list[int], gate: list[asyncio.Event]) -> Any:
    """An async function whose items wait until ``need`` of them have started (or 5 s)."""

    async def item(x: int) -> int:
        if not gate:
            gate.append(asyncio.Event())
        started.append(x)
        if len(started) >= need:
            gate[0].set()
        await asyncio.wait_for(gate[0].wait(), 5)
        return x

    return item


def test_a_waiting_sample_starts_the_next_items_at_once() -> None:
    """Items that wait do not spend a wave on the sample: 100 of them all start together."""
    started: list[int] = []
    results, plan = execute(_gated(100, started, []), range(100), return_plan=True)
    assert results == list(range(100))
    assert plan.reused == 100  # every item ran in the sample, none waited for another wave


def test_a_busy_first_look_is_taken_again() -> None:
    """A loop kept busy through the first look (a garbage collection, a first call's
    imports: here 3 ms of CPU in item 0) is looked at again: waiting items still spill."""
    started: list[int] = []
    gate: list[asyncio.Event] = []
    waiting = _gated(100, started, gate)

    async def item(x: int) -> int:
        if x == 0:
            end = time.thread_time() + 3e-3  # CPU, not a wait: the loop reads as busy
            while time.thread_time() < end:
                pass
        return await waiting(x)

    results, plan = execute(item, range(100), return_plan=True)
    assert results == list(range(100)) and plan.reused == 100


def test_the_caller_n_jobs_caps_the_sample() -> None:
    """n_jobs=20 (no chunksize): the sample never has more than 20 items in flight."""
    started: list[int] = []
    results, plan = execute(_gated(20, started, []), range(60), n_jobs=20, return_plan=True)
    assert results == list(range(60)) and plan.reused == 20


def test_a_checkpointed_async_run_does_not_spill(tmp_path: Path) -> None:
    """With a checkpoint the stream's items are never pulled ahead: the sample stays 16."""
    started: list[int] = []
    out, plan = execute(
        _gated(16, started, []), range(40), checkpoint=str(tmp_path / "run.db"), return_plan=True
    )
    assert out == list(range(40)) and plan.reused == aio.SAMPLE_ITEMS


def test_thousands_in_flight_need_no_threads() -> None:
    """2,000 coroutines all waiting at once run on one loop: the thread count stays flat."""
    n = 2000
    started = 0
    counts: list[int] = []
    gate: asyncio.Event | None = None

    async def wait_for_all(x: int) -> int:
        nonlocal started, gate
        if gate is None:
            gate = asyncio.Event()
        started += 1
        counts.append(threading.active_count())
        if started == n:
            gate.set()
        await asyncio.wait_for(gate.wait(), timeout=30)  # only a failing run waits
        return x

    before = threading.active_count()
    assert execute(wait_for_all, range(n), backend="async", n_jobs=n, chunksize=1) == list(range(n))
    assert max(counts) <= before


# --------------------------------------------------------------------------- failures


def test_raise_mode_raises_the_first_failure() -> None:
    """on_error='raise' raises the item's own exception."""
    with pytest.raises(Boom, match="odd 1"):
        execute(fail_on_odd, range(10), backend="async", n_jobs=1, chunksize=1)


def test_raise_mode_failure_in_the_sample() -> None:
    """A sampled item that fails raises (the planned run)."""
    with pytest.raises(Boom, match="odd"):
        execute(fail_on_odd, range(100))


def test_collect_mode_puts_failures_in_their_slots() -> None:
    """on_error='collect' keeps going; each failed slot holds an ItemFailure."""
    results, plan = execute(fail_on_odd, range(40), on_error="collect", return_plan=True)
    assert [r for r in results[::2]] == list(range(0, 40, 2))
    failed = results[1::2]
    assert all(isinstance(f, ItemFailure) and isinstance(f.exception, Boom) for f in failed)
    assert [f.index for f in failed] == list(range(1, 40, 2)) and plan.failed == 20


def test_stop_on_failure_skips_the_rest_of_a_chunk() -> None:
    """Under StopOnFailure the items after a failure are not awaited."""
    be = aio.AsyncBackend()
    stop = StopOnFailure(fail_on_odd)
    [(_, outs)] = list(be.run(stop, iter([Task(0, [0, 1, 2, 4])]), n_jobs=1, max_in_flight=2))
    assert [o.ok for o in outs] == [True, False, False, False]
    assert all(type(o.value) is NotRunError for o in outs[2:])


def test_retry_awaits_each_item_again() -> None:
    """retry= retries an async function per item (async sleeps, skipped in testing mode)."""
    tries: dict[int, int] = {}

    async def flaky(x: int) -> int:
        tries[x] = tries.get(x, 0) + 1
        await asyncio.sleep(0)
        if tries[x] < 3:
            raise ConnectionError(f"flaky {x}")
        return x

    with set_testing():
        out = execute(flaky, range(30), retry=RetryPolicy(max_retries=3, initial_delay=5.0))
    assert out == list(range(30)) and set(tries.values()) == {3}


def test_retry_exhausted_is_a_failure_with_attempts() -> None:
    """An item that fails every attempt fails with RetryExhaustedError and its attempts."""
    with set_testing():
        results = execute(
            fail_on_odd, [0, 1], on_error="collect", backend="async", n_jobs=2, chunksize=1,
            retry=RetryPolicy(max_retries=2, initial_delay=5.0),
        )
    assert results[0] == 0 and isinstance(results[1].exception, RetryExhaustedError)
    assert results[1].attempts == 3


# --------------------------------------------------------------------------- observers


STOP_AT: set[int] = set()
CALLS: list[int] = []


async def stopping_square(x: int) -> int:
    CALLS.append(x)
    await asyncio.sleep(0)
    if x in STOP_AT:
        raise Boom(f"stop at {x}")
    return x * x


def test_checkpoint_resume_runs_only_missing_items(tmp_path: Path) -> None:
    """A resumed run awaits only the items the checkpoint does not hold."""
    from amorsize import Checkpoint

    path = tmp_path / "run.db"
    data = list(range(200))
    kw: dict[str, Any] = {"backend": "async", "n_jobs": 4, "chunksize": 8}
    STOP_AT.add(77)
    CALLS.clear()
    try:
        with pytest.raises(Boom):
            execute(stopping_square, data, checkpoint=path, **kw)
    finally:
        STOP_AT.clear()
    stored = set(Checkpoint(path).results())
    assert stored and 77 not in stored
    CALLS.clear()
    assert execute(stopping_square, data, checkpoint=path) == [x * x for x in data]
    assert sorted(CALLS) == sorted(set(data) - stored)


def test_dead_letter_queue_records_failures(tmp_path: Path) -> None:
    """dead_letter= records each failed item and the run goes on."""
    from amorsize import DeadLetterQueue

    path = tmp_path / "dlq.db"
    out = execute(fail_on_odd, range(20), dead_letter=path)
    assert [x for x in out if not isinstance(x, ItemFailure)] == list(range(0, 20, 2))
    entries = DeadLetterQueue(path).entries()
    assert sorted(e.index for e in entries) == list(range(1, 20, 2))


def test_circuit_breaker_stops_dispatch() -> None:
    """circuit_breaker= opens after failures and the rest is not attempted."""
    from amorsize.circuit import CircuitBreakerPolicy, CircuitOpenError

    results, plan = execute(
        fail_on_odd, [1, 3, 5, 7, 9, 11], backend="async", n_jobs=1, chunksize=1,
        on_error="collect", circuit_breaker=CircuitBreakerPolicy(failure_threshold=2),
        return_plan=True,
    )
    assert plan.failed == 2 and plan.not_attempted == 4
    assert isinstance(results[-1].exception, CircuitOpenError)


# --------------------------------------------------------------------------- cancellation


def test_closing_execute_iter_cancels_pending_coroutines() -> None:
    """Closing execute_iter early cancels the coroutines in flight (their finally runs)."""
    cancelled: list[int] = []
    release = threading.Event()

    async def slow(x: int) -> int:
        if x == 0:
            return x
        try:
            while not release.is_set():
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            cancelled.append(x)
            raise
        return x

    it = execute_iter(slow, range(50), backend="async", n_jobs=10, chunksize=1)
    assert next(it) == 0
    it.close()  # type: ignore[attr-defined]
    release.set()
    assert sorted(cancelled) == list(range(1, 10))


def test_backend_close_cancels_and_closes_the_loop() -> None:
    """Closing the backend's generator cancels what runs; nothing is left on a loop."""
    gate = threading.Event()

    async def hold(x: int) -> int:
        while not gate.is_set():
            await asyncio.sleep(0)
        return x

    def tasks() -> Iterator[Task]:
        for i in range(100):
            yield Task(i, [i])

    gen = aio.AsyncBackend().run(hold, tasks(), n_jobs=5, max_in_flight=10)
    gate.set()
    first = next(gen)
    gen.close()
    assert first[1] == [first[0].start]


async def interrupt_at_30(x: int) -> int:
    await asyncio.sleep(0)
    if x == 30:
        raise KeyboardInterrupt
    return x


@pytest.mark.parametrize("in_loop", [False, True], ids=["own-loop", "helper-thread-loop"])
def test_keyboard_interrupt_in_a_coroutine_propagates(in_loop: bool) -> None:
    """KeyboardInterrupt raised by a coroutine reaches the caller; no loop is left hanging."""

    def run() -> None:
        with pytest.raises(KeyboardInterrupt):
            execute(interrupt_at_30, range(100), backend="async", n_jobs=8, chunksize=1)

    async def main() -> None:
        run()

    if in_loop:
        asyncio.run(main())
    else:
        run()
    assert execute(double, range(3)) == [0, 2, 4]


# --------------------------------------------------------------------------- inside a loop


def test_execute_inside_a_running_loop_uses_a_helper_thread() -> None:
    """execute() called from a coroutine runs its own loop beside the blocked one."""

    async def main() -> list[int]:
        return execute(double, range(30))

    assert asyncio.run(main()) == [2 * x for x in range(30)]


def test_execute_async_runs_on_the_callers_loop() -> None:
    """execute_async awaits the coroutines on the caller's loop (its Event works there)."""

    async def main() -> tuple[list[int], Any]:
        ready = asyncio.Event()  # bound to this loop: only coroutines on it may wait on it
        loop = asyncio.get_running_loop()

        async def on_caller_loop(x: int) -> int:
            assert asyncio.get_running_loop() is loop
            ready.set()
            await ready.wait()
            return x + 1

        return await execute_async(on_caller_loop, range(25), return_plan=True)

    results, plan = asyncio.run(main())
    assert results == list(range(1, 26)) and plan.backend == "async"


def test_execute_async_takes_plain_functions_and_raises_failures() -> None:
    """A plain function runs in a helper thread; a failure reaches the awaiting task."""

    async def main() -> list[int]:
        return await execute_async(plain_double, range(5), backend="serial")

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]

    async def failing() -> list[int]:
        return await execute_async(fail_on_odd, range(5), backend="async", n_jobs=1, chunksize=1)

    with pytest.raises(Boom):
        asyncio.run(failing())


def test_cancelling_execute_async_cancels_its_coroutines() -> None:
    """Cancelling the awaiting task cancels the run's coroutines on the caller's loop."""
    cancelled: list[int] = []

    async def main() -> None:
        started = asyncio.Event()
        never = asyncio.Event()
        running: list[int] = []

        async def hold(x: int) -> int:
            running.append(x)
            if len(running) == 6:
                started.set()
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.append(x)
                raise
            return x

        task = asyncio.ensure_future(
            execute_async(hold, range(6), backend="async", n_jobs=6, chunksize=1)
        )
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # let the cancellations land
            if len(cancelled) == 6:
                break
            await asyncio.sleep(0)

    asyncio.run(main())
    assert sorted(cancelled) == list(range(6))


def test_registry_names_the_async_backend() -> None:
    """backends.get_backend('async') is the shared AsyncBackend; auto never plans it."""
    assert isinstance(get_backend("async"), aio.AsyncBackend)
    assert "async" not in amorsize.backends.auto_backends()
