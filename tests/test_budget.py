"""RetryBudget: Finagle's windowed deposits and withdrawals, the retry hook, sharing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from amorsize import (
    ItemFailure,
    RetryBudget,
    RetryExhaustedError,
    RetryPolicy,
    create_batch_retry_wrapper,
    execute,
    retry_call,
    with_retry,
)


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def frozen_clock() -> float:
    return 0.0


def always_fails(x: int) -> int:
    raise ConnectionError(f"refused {x}")


def deposit_many(budget: RetryBudget) -> int:
    for _ in range(5000):
        budget._deposit()
    return 0


def test_retries_are_a_ratio_of_the_calls_plus_the_reserve() -> None:
    """ratio x calls + min_per_second x ttl retries are allowed, and not one more."""
    b = RetryBudget(ratio=0.25, min_per_second=0.3, ttl=10.0, clock=Clock())
    for _ in range(20):
        b._deposit()
    assert b.available == pytest.approx(8.0)
    assert [b._withdraw() for _ in range(9)] == [True] * 8 + [False]


def test_deposits_and_withdrawals_leave_the_window_after_ttl() -> None:
    """Calls older than ttl no longer count, and neither do the retries they paid for."""
    clock = Clock()
    b = RetryBudget(ratio=1.0, min_per_second=0.0, ttl=10.0, clock=clock)
    for _ in range(3):
        b._deposit()
    clock.now = 5.0
    assert b._withdraw() and b.available == pytest.approx(2.0)
    clock.now = 11.5  # past ttl plus one slice: the calls left, the retry at 5 s still counts
    assert b.available == -1.0 and not b._withdraw()
    clock.now = 16.5
    assert b.available == 0.0
    for _ in range(2):
        b._deposit()
    assert b._withdraw() and b._withdraw() and not b._withdraw()


def test_a_refused_retry_ends_the_call_with_reason_budget() -> None:
    """With the reserve spent, the call stops early: RetryExhaustedError(reason='budget')."""
    b = RetryBudget(ratio=0.0, min_per_second=0.2, ttl=10.0, clock=Clock())
    calls = []

    @with_retry(max_retries=5, initial_delay=0, budget=b)
    def f() -> None:
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(RetryExhaustedError) as first:
        f()
    with pytest.raises(RetryExhaustedError) as second:
        f()
    assert (first.value.reason, first.value.attempts) == ("budget", 3)
    assert (second.value.reason, second.value.attempts) == ("budget", 1)
    assert "retry budget" in str(first.value)
    assert isinstance(first.value.__cause__, ConnectionError)
    assert f.retry_stats.as_dict() == {"calls": 2, "retries": 2, "exhausted": 2}
    assert len(calls) == 4


def test_reraise_gives_the_last_exception_when_the_budget_refuses() -> None:
    """reraise=True still re-raises the call's own exception."""
    b = RetryBudget(ratio=0.0, min_per_second=0.0, ttl=10.0, clock=Clock())
    calls = []

    @with_retry(max_retries=3, initial_delay=0, budget=b, reraise=True)
    def f() -> None:
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        f()
    assert len(calls) == 1


def test_async_retries_draw_on_the_budget() -> None:
    """An async def function's retries withdraw from the same budget."""
    b = RetryBudget(ratio=0.0, min_per_second=0.1, ttl=10.0, clock=Clock())

    @with_retry(max_retries=5, initial_delay=0, budget=b)
    async def g() -> None:
        raise ConnectionError("down")

    with pytest.raises(RetryExhaustedError) as err:
        asyncio.run(g())
    assert (err.value.reason, err.value.attempts) == ("budget", 2)


def test_every_entry_point_deposits_per_call() -> None:
    """with_retry, retry_call and the batch wrapper each deposit once per call."""
    b = RetryBudget(ratio=0.5, min_per_second=0.0, ttl=10.0, clock=Clock())
    policy = RetryPolicy(budget=b)
    f = with_retry(abs, policy=policy)
    for i in range(6):
        f(-i)
    retry_call(abs, args=(-1,), policy=policy)
    wrapper = create_batch_retry_wrapper(abs, policy)
    assert [wrapper(-1), wrapper(-2), wrapper(-3)] == [1, 2, 3]
    assert b.available == pytest.approx(5.0)


def test_a_failing_injected_clock_fails_the_call() -> None:
    """An injected clock that raises makes the call raise that error, not crash."""

    def broken() -> float:
        raise OSError("clock gone")

    f = with_retry(abs, budget=RetryBudget(clock=broken))
    with pytest.raises(OSError, match="clock gone"):
        f(-1)


def test_deposits_from_threads_are_never_lost() -> None:
    """Concurrent deposits from many threads all count."""
    b = RetryBudget(ratio=1.0, min_per_second=0.0, ttl=10.0, clock=frozen_clock)
    threads = [threading.Thread(target=deposit_many, args=(b,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.available == 20000.0


def test_deposits_from_worker_processes_land_in_one_budget() -> None:
    """A budget pickled to worker processes maps the same counters (C atomics across processes)."""
    b = RetryBudget(ratio=1.0, min_per_second=0.0, ttl=10.0, clock=frozen_clock)
    try:
        execute(deposit_many, [b] * 4, backend="processes", n_jobs=2, chunksize=1)
        assert b.available == 20000.0
    finally:
        b.close()


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_a_budget_in_a_policy_is_shared_by_every_worker_of_a_run(backend: str) -> None:
    """Across all workers, exactly the reserve's retries run."""
    b = RetryBudget(ratio=0.0, min_per_second=0.5, ttl=10.0, clock=frozen_clock)
    policy = RetryPolicy(max_retries=3, initial_delay=0, budget=b)
    out = execute(
        always_fails, range(10), backend=backend, n_jobs=2, chunksize=1, retry=policy,
        on_error="collect",
    )  # fmt: skip
    assert all(isinstance(r, ItemFailure) for r in out)
    retries = sum(r.exception.attempts - 1 for r in out)
    assert retries == 5
    assert "budget" in {r.exception.reason for r in out}
    assert b.shared_name is None


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"ratio": -0.1}, ValueError, r"RetryBudget: ratio must be a finite number in \[0, 10\]"),
        ({"min_per_second": "1"}, TypeError, "RetryBudget: min_per_second must be"),
        ({"ttl": 0}, ValueError, r"RetryBudget: ttl must be a finite number in \[0.1, 86400\]"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict[str, Any], error: type, text: str) -> None:
    """Each bad parameter raises naming itself, the rule and the value."""
    with pytest.raises(error, match=text):
        RetryBudget(**kwargs)


def test_policy_refuses_a_non_budget_and_dask_refuses_a_budget() -> None:
    """budget= takes a RetryBudget; a cluster backend is refused before any item runs."""
    with pytest.raises(TypeError, match=r"RetryPolicy: budget must be an amorsize\.RetryBudget"):
        RetryPolicy(budget=0.2)  # type: ignore[arg-type]
    policy = RetryPolicy(budget=RetryBudget())
    with pytest.raises(ValueError, match="RetryBudget cannot be shared with backend='dask'"):
        execute(always_fails, [1], backend="dask", retry=policy)


def test_policy_with_a_budget_pickles_to_the_same_budget() -> None:
    """A pickled policy carries its budget by name: in this process, the very same object."""
    import pickle

    b = RetryBudget()
    policy = RetryPolicy(budget=b)
    try:
        assert pickle.loads(pickle.dumps(policy)).budget is b
    finally:
        b.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /dev/shm")
@pytest.mark.parametrize("end", ["sys.exit(0)", "os.kill(os.getpid(), signal.SIGKILL)"])
def test_an_owner_that_exits_or_is_killed_leaves_no_segment(tmp_path: Any, end: str) -> None:
    """At exit the owner unlinks its segment; after a SIGKILL the resource tracker does."""
    script = textwrap.dedent(
        f"""
        import os, pickle, signal, sys
        from amorsize import RetryBudget
        b = RetryBudget()
        pickle.dumps(b)
        print(b.shared_name, flush=True)
        {end}
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    name = proc.stdout.strip()
    assert name.startswith("psm_")
    if end.startswith("sys.exit"):
        assert "leaked" not in proc.stderr
    deadline = time.monotonic() + 30
    while os.path.exists(f"/dev/shm/{name}") and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not os.path.exists(f"/dev/shm/{name}")
