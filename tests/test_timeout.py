"""Per-item timeouts (issue 15 item 4): real worker processes, real kills, functions that
block on an Event nobody sets; every call counted in a file, so a lost or duplicated item
shows."""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from amorsize import (
    DeadLetterQueue,
    ItemFailure,
    ItemTimeoutError,
    RetryExhaustedError,
    RetryPolicy,
    execute,
    execute_async,
    execute_iter,
)
from amorsize._timeout import TimeLimited, Watchdog
from amorsize.backends import get_backend, processes
from amorsize.backends.processes import ProcessesBackend
from amorsize.checkpoint import Checkpoint

psutil = pytest.importorskip("psutil")

# Spawned and forkserver workers cannot import this file (importlib mode): ship by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

LIMIT = 0.1  # seconds: long enough for a loaded machine to start an item, short for the suite
BACKENDS = ["serial", "threads", "processes"]


def _log(path: str, x: int) -> None:
    """Append ``x`` to the call log: one ``write`` of a short line on O_APPEND is atomic."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{x}\n".encode())
    finally:
        os.close(fd)


def _calls(path: Path) -> collections.Counter[int]:
    if not path.exists():
        return collections.Counter()
    return collections.Counter(int(line) for line in path.read_text().split())


def hang_on(hang: frozenset[int], log: str, x: int) -> int:
    """``2 * x``, logged once finished; the items in ``hang`` never finish."""
    if x in hang:
        threading.Event().wait()  # never set: only the timeout ends this item
    _log(log, x)
    return 2 * x


def hang_once(hang: frozenset[int], log: str, marks: str, x: int) -> int:
    """Like ``hang_on``, but an item in ``hang`` hangs on its first attempt only."""
    mark = os.path.join(marks, str(x))
    if x in hang and not os.path.exists(mark):
        Path(mark).touch()
        threading.Event().wait()
    _log(log, x)
    return 2 * x


def pid_or_hang(hang: frozenset[int], log: str, x: int) -> int:
    """The worker's pid, logged; the items in ``hang`` never finish."""
    if x in hang:
        threading.Event().wait()
    _log(log, x)
    return os.getpid()


def _sizes(backend: str) -> dict[str, Any]:
    return {"n_jobs": None if backend == "serial" else 2, "chunksize": 4}


# ---------------------------------------------------------------- one item times out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hanging_item_fails_alone(tmp_path: Path, backend: str) -> None:
    """Each hanging item fails with ItemTimeoutError in its slot; every other item runs once."""
    log = tmp_path / "calls"
    func = functools.partial(hang_on, frozenset({3, 8}), str(log))
    out, report = execute(
        func, range(12), backend=backend, timeout=LIMIT, on_error="collect", return_plan=True,
        **_sizes(backend),
    )  # fmt: skip
    for i, value in enumerate(out):
        if i in (3, 8):
            assert isinstance(value, ItemFailure)
            err = value.exception
            assert isinstance(err, ItemTimeoutError) and isinstance(err, TimeoutError)
            assert (err.index, err.seconds) == (i, LIMIT)
            assert f"item {i} ran longer than its timeout of 100 ms" in str(err)
        else:
            assert value == 2 * i
    assert report.failed == 2 and report.completed == 10
    assert _calls(log) == collections.Counter(i for i in range(12) if i not in (3, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_raise_mode_raises_the_timeout(tmp_path: Path, backend: str) -> None:
    """on_error='raise': the ItemTimeoutError itself, naming the item and the limit."""
    func = functools.partial(hang_on, frozenset({5}), str(tmp_path / "calls"))
    with pytest.raises(ItemTimeoutError, match=r"item 5 ran longer than its timeout of 100 ms"):
        execute(func, range(8), backend=backend, timeout=LIMIT, **_sizes(backend))


def test_execute_iter_yields_the_failure_in_order(tmp_path: Path) -> None:
    """execute_iter: the timed-out item's ItemFailure in its place, the rest in order."""
    func = functools.partial(hang_on, frozenset({2}), str(tmp_path / "calls"))
    got = list(
        execute_iter(func, iter(range(6)), backend="threads", n_jobs=2, chunksize=2,
                     timeout=LIMIT, on_error="collect")
    )  # fmt: skip
    assert [g if not isinstance(g, ItemFailure) else "T" for g in got] == [0, 2, "T", 6, 8, 10]


def test_serial_fast_path_execute_iter_times_out(tmp_path: Path) -> None:
    """A serial plan nobody watches (execute_iter's own loop) applies the limit too."""
    func = functools.partial(hang_on, frozenset({1}), str(tmp_path / "calls"))
    got = list(execute_iter(func, [0, 1, 2], backend="serial", timeout=LIMIT, on_error="collect"))
    assert got[0] == 0 and got[2] == 4
    assert isinstance(got[1].exception, ItemTimeoutError) and got[1].exception.index == 1


# ---------------------------------------------------------------- processes: kill and replace


def test_the_worker_is_replaced_and_its_chunk_kept_or_rerun(tmp_path: Path) -> None:
    """Processes: items finished before the hanging one keep their results (run once), the
    worker is ended, and the items after it run on a fresh worker."""
    log = tmp_path / "calls"
    func = functools.partial(pid_or_hang, frozenset({2}), str(log))
    out = execute(
        func, range(6), backend="processes", n_jobs=1, chunksize=6, timeout=LIMIT,
        on_error="collect",
    )  # fmt: skip
    first, second = out[0], out[3]
    assert out[:2] == [first, first] and out[3:] == [second] * 3
    assert first != second
    assert isinstance(out[2], ItemFailure) and out[2].exception.index == 2
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
    assert _calls(log) == collections.Counter([0, 1, 3, 4, 5])


def test_prefetched_tasks_of_a_timed_out_worker_are_not_lost(tmp_path: Path) -> None:
    """Processes: many chunks, several hang; each other item runs exactly once."""
    log = tmp_path / "calls"
    hang = frozenset({1, 9, 10, 22})
    func = functools.partial(hang_on, hang, str(log))
    out = execute(
        func, range(30), backend="processes", n_jobs=2, chunksize=3, timeout=LIMIT,
        on_error="collect",
    )  # fmt: skip
    assert [i for i, v in enumerate(out) if isinstance(v, ItemFailure)] == sorted(hang)
    assert all(out[i] == 2 * i for i in range(30) if i not in hang)
    assert _calls(log) == collections.Counter(i for i in range(30) if i not in hang)


def test_the_pool_stays_usable_after_a_raised_timeout(tmp_path: Path) -> None:
    """Raise mode stops the run at the timeout; the same warm pool then runs a clean run."""
    pool = ProcessesBackend()
    log = str(tmp_path / "calls")
    try:
        with pytest.raises(ItemTimeoutError):
            execute(functools.partial(hang_on, frozenset({4}), log), range(40), backend=pool,
                    n_jobs=2, chunksize=2, timeout=LIMIT)  # fmt: skip
        out = execute(functools.partial(hang_on, frozenset(), log), range(40), backend=pool,
                      n_jobs=2, chunksize=2, timeout=30.0)  # fmt: skip
        assert out == [2 * i for i in range(40)]
    finally:
        pool.close()


def test_execute_iter_unordered_on_processes(tmp_path: Path) -> None:
    """execute_iter(ordered=False): every index once, the timed-out one as its failure."""
    log = tmp_path / "calls"
    func = functools.partial(hang_on, frozenset({5, 6}), str(log))
    got = dict(
        execute_iter(func, iter(range(20)), ordered=False, backend="processes", n_jobs=2,
                     chunksize=4, timeout=LIMIT, on_error="collect")
    )  # fmt: skip
    assert sorted(got) == list(range(20))
    assert {i for i, v in got.items() if isinstance(v, ItemFailure)} == {5, 6}
    assert _calls(log) == collections.Counter(set(range(20)) - {5, 6})


def regex_hang(hang: frozenset[int], log: str, x: int) -> int:
    """``2 * x``, logged; the items in ``hang`` backtrack for minutes in C, holding the GIL."""
    if x in hang:
        re.match(r"(a+)+$", "a" * 40 + "b")
    _log(log, x)
    return 2 * x


def test_an_item_holding_the_gil_is_stopped_by_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog thread cannot run while C code holds the GIL: the parent kills the
    worker a grace period past the deadline; the chunk's other items still all complete."""
    monkeypatch.setattr(processes, "BACKSTOP_GRACE", 0.2)
    log = tmp_path / "calls"
    func = functools.partial(regex_hang, frozenset({2}), str(log))
    out = execute(func, range(6), backend="processes", n_jobs=1, chunksize=6, timeout=LIMIT,
                  on_error="collect")  # fmt: skip
    assert isinstance(out[2].exception, ItemTimeoutError) and out[2].exception.index == 2
    assert [out[i] for i in (0, 1, 3, 4, 5)] == [0, 2, 6, 8, 10]
    calls = _calls(log)
    # Items after it ran once; those before it lost their results with the worker.
    assert [calls[i] for i in (3, 4, 5)] == [1, 1, 1] and calls[0] >= 1 and calls[2] == 0


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_every_start_method_times_out(tmp_path: Path, start_method: str) -> None:
    """The watchdog works in forked, spawned and forkserver workers alike."""
    log = tmp_path / "calls"
    func = functools.partial(hang_on, frozenset({1}), str(log))
    backend = get_backend("processes", start_method=start_method)
    out = execute(func, range(4), backend=backend, n_jobs=1, chunksize=4, timeout=LIMIT,
                  on_error="collect")  # fmt: skip
    assert out[0] == 0 and out[2:] == [4, 6]
    assert isinstance(out[1].exception, ItemTimeoutError)
    assert _calls(log) == collections.Counter([0, 2, 3])


def watchdog_state(_: Any) -> tuple[bool, bool]:
    """(a watchdog thread runs in this worker, it is armed)."""
    import amorsize._timeout

    names = {t.name for t in threading.enumerate()}
    return "amorsize-watchdog" in names, amorsize._timeout._ARMED is not None


def test_a_run_without_timeout_arms_nothing() -> None:
    """timeout=None: no watchdog in a fresh worker; after a timed run it is left disarmed."""
    pool = ProcessesBackend()
    try:
        run = functools.partial(execute, watchdog_state, [0], backend=pool, n_jobs=1, chunksize=1)
        assert run() == [(False, False)]
        assert run(timeout=60.0) == [(True, True)]
        assert run() == [(True, False)]
    finally:
        pool.close()


def test_a_shorter_timeout_wakes_a_watchdog_set_for_a_longer_one(tmp_path: Path) -> None:
    """A warm worker's watchdog, asleep on the last run's 1000 s limit, keeps the new one."""
    pool = ProcessesBackend()
    log = str(tmp_path / "calls")
    try:
        execute(functools.partial(hang_on, frozenset(), log), range(2), backend=pool, n_jobs=1,
                chunksize=1, timeout=1000.0)  # fmt: skip
        out = execute(functools.partial(hang_on, frozenset({0}), log), range(2), backend=pool,
                      n_jobs=1, chunksize=2, timeout=LIMIT, on_error="collect")  # fmt: skip
        assert isinstance(out[0].exception, ItemTimeoutError) and out[1] == 2
    finally:
        pool.close()


# ---------------------------------------------------------------- retry, dead letters


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_a_timed_out_attempt_is_retried(tmp_path: Path, backend: str) -> None:
    """With a retry policy, a timed-out attempt is retried; the second attempt succeeds."""
    log = tmp_path / "calls"
    marks = tmp_path / "marks"
    marks.mkdir()
    func = functools.partial(hang_once, frozenset({1, 6}), str(log), str(marks))
    policy = RetryPolicy(max_retries=2, initial_delay=0.0, jitter=False)
    out, report = execute(
        func, range(8), backend=backend, n_jobs=2, chunksize=4, timeout=LIMIT, retry=policy,
        return_plan=True,
    )  # fmt: skip
    assert out == [2 * i for i in range(8)]
    assert report.failed == 0
    assert _calls(log) == collections.Counter(range(8))


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_timeouts_exhaust_the_retry_policy(tmp_path: Path, backend: str) -> None:
    """Each attempt times out: the policy gives up after its attempts, as for any error."""
    func = functools.partial(hang_on, frozenset({1}), str(tmp_path / "calls"))
    policy = RetryPolicy(max_retries=1, initial_delay=0.0, jitter=False)
    out = execute(
        func, range(3), backend=backend, n_jobs=1, chunksize=3, timeout=LIMIT, retry=policy,
        on_error="collect",
    )  # fmt: skip
    failure = out[1]
    assert isinstance(failure, ItemFailure) and failure.attempts == 2
    assert isinstance(failure.exception, RetryExhaustedError)
    assert isinstance(failure.exception.original_exception, ItemTimeoutError)
    assert out[0] == 0 and out[2] == 4


def test_a_policy_that_does_not_retry_timeouts_reports_the_timeout(tmp_path: Path) -> None:
    """retry_on_exceptions without TimeoutError: the timeout fails the item at once."""
    func = functools.partial(hang_on, frozenset({0}), str(tmp_path / "calls"))
    policy = RetryPolicy(max_retries=3, initial_delay=0.0, retry_on_exceptions=(KeyError,))
    out = execute(
        func, [0, 1], backend="processes", n_jobs=1, chunksize=2, timeout=LIMIT, retry=policy,
        on_error="collect",
    )  # fmt: skip
    assert type(out[0].exception) is ItemTimeoutError and out[0].attempts == 1


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_the_dead_letter_queue_records_a_timeout(tmp_path: Path, backend: str) -> None:
    """A timed-out item goes to the dead-letter queue and the run goes on."""
    func = functools.partial(hang_on, frozenset({2}), str(tmp_path / "calls"))
    path = tmp_path / "dead.db"
    out = execute(func, range(4), backend=backend, n_jobs=2, chunksize=2, timeout=LIMIT,
                  dead_letter=path)  # fmt: skip
    assert isinstance(out[2], ItemFailure)
    [entry] = DeadLetterQueue(path).entries()
    assert entry.index == 2 and "ItemTimeoutError" in entry.exc_type


# ---------------------------------------------------------------- async


CANCELLED: list[int] = []


async def async_hang(x: int) -> int:
    if x == 2:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            CANCELLED.append(x)
            raise
    return 2 * x


async def own_timeout(x: int) -> int:
    raise TimeoutError(f"the service timed out on {x}")


def test_async_item_is_cancelled_at_the_deadline() -> None:
    """Async: the coroutine is cancelled (its CancelledError runs) and the item fails."""
    CANCELLED.clear()
    out = execute(async_hang, range(5), timeout=LIMIT, on_error="collect")
    assert out[:2] == [0, 2] and out[3:] == [6, 8]
    assert isinstance(out[2].exception, ItemTimeoutError) and out[2].exception.index == 2
    assert CANCELLED == [2]


ATTEMPTS: collections.Counter[int] = collections.Counter()


async def async_hang_once(x: int) -> int:
    ATTEMPTS[x] += 1
    if x == 1 and ATTEMPTS[x] == 1:
        await asyncio.Event().wait()
    return 2 * x


def test_async_timed_out_attempt_is_retried() -> None:
    """Async with a retry policy: the cancelled attempt is retried and succeeds."""
    ATTEMPTS.clear()
    policy = RetryPolicy(max_retries=1, initial_delay=0.0, jitter=False)
    assert execute(async_hang_once, range(3), timeout=LIMIT, retry=policy) == [0, 2, 4]
    assert dict(ATTEMPTS) == {0: 1, 1: 2, 2: 1}


def test_execute_async_times_out_on_the_callers_loop() -> None:
    """execute_async: the same limit, on the caller's own loop."""
    out = asyncio.run(execute_async(async_hang, range(4), timeout=LIMIT, on_error="collect"))
    assert isinstance(out[2].exception, ItemTimeoutError)
    assert out[3] == 6


def test_a_functions_own_timeout_error_is_not_a_deadline() -> None:
    """A TimeoutError raised by func itself stays what it is."""
    out = execute(own_timeout, [1], timeout=5.0, on_error="collect")
    assert type(out[0].exception) is TimeoutError


# ---------------------------------------------------------------- dask


def test_dask_times_items_out(tmp_path: Path) -> None:
    """Dask: the item fails at the deadline on its worker thread (the thread rule)."""
    distributed = pytest.importorskip("distributed")
    func = functools.partial(hang_on, frozenset({1}), str(tmp_path / "calls"))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:  # fmt: skip
        # An in-process cluster shares this process's GIL with its scheduler's threads and
        # with what earlier tests left running: LIMIT was once too short for a quick item.
        out = execute(func, range(4), backend="dask", client=client, n_jobs=1, chunksize=2,
                      timeout=10 * LIMIT, on_error="collect")  # fmt: skip
    assert out[0] == 0 and out[2:] == [4, 6]
    assert isinstance(out[1].exception, ItemTimeoutError)


# ---------------------------------------------------------------- the parts, with fake time


class FakeClock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        time.sleep(0)  # let the main thread run


def test_watchdog_fires_when_an_attempt_passes_its_deadline() -> None:
    """The watchdog reports the overdue attempt at its deadline (fake clock)."""
    fired = threading.Event()
    positions: list[int] = []
    clock = FakeClock()

    def fire(k: int) -> None:
        positions.append(k)
        fired.set()

    guard = Watchdog(5.0, fire, clock=clock, sleep=clock.sleep)
    guard.busy.set()
    guard.done = ["a", "b"]  # two items of the chunk finished: this attempt is the third's
    guard.attempt(lambda _: fired.wait(), None, 5.0)  # returns once the watchdog fired
    assert clock.now >= 105.0 and positions == [2]


def test_watchdog_leaves_an_attempt_that_ends_in_time() -> None:
    """An attempt that returns before its deadline is never reported."""
    fired = threading.Event()
    clock = FakeClock()
    guard = Watchdog(5.0, lambda k: fired.set(), clock=clock, sleep=clock.sleep)
    guard.busy.set()
    assert guard.attempt(abs, -3, 5.0) == 3
    guard.busy.clear()
    assert not fired.wait(0.02)


def test_a_helper_ends_with_the_thread_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads that come and go (execute_async's, evicted pools') leave no helper behind."""
    import amorsize._timeout as timeout_mod

    monkeypatch.setattr(timeout_mod, "_IDLE_CHECK_SECONDS", 0.01)
    before = {t.ident for t in threading.enumerate()}
    owner = threading.Thread(target=lambda: TimeLimited(abs, 5.0)(-1))
    owner.start()
    owner.join()
    helpers = [t for t in threading.enumerate() if t.ident not in before]
    assert [t.name for t in helpers] == ["amorsize-timeout"]
    helpers[0].join(5.0)  # it sees its owner gone at its next idle check
    assert not helpers[0].is_alive()


def test_time_limited_is_picklable_and_named_after_func() -> None:
    """TimeLimited travels to workers and keeps func's names for messages."""
    import pickle

    limited = pickle.loads(pickle.dumps(TimeLimited(math.sqrt, 1.0)))
    assert limited(16.0) == 4.0 and limited.__qualname__ == "sqrt"
    err = pickle.loads(pickle.dumps(ItemTimeoutError(0.5, 3, 2)))
    assert (err.seconds, err.index, err.attempts) == (0.5, 3, 2)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timeout": 0}, ValueError, r"^execute\(\): timeout must be a finite number in \(0, "),
        ({"timeout": -1.0}, ValueError, r"timeout must be .*; got -1\.0"),
        ({"timeout": math.nan}, ValueError, r"timeout must be .*; got nan"),
        ({"timeout": "1"}, TypeError, r"timeout must be .*; got '1' \(str\)"),
        ({"timeout": True}, TypeError, r"timeout must be .*; got True"),
    ],
)
def test_bad_timeout_is_refused_before_anything_runs(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """The parameter, the rule and the value, before any item runs."""
    calls: list[int] = []
    with pytest.raises(error, match=match):
        execute(calls.append, [1], backend="serial", **kwargs)
    assert calls == []


# ---------------------------------------------------------------- SIGKILL of the parent

KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    from amorsize import execute
    from amorsize.checkpoint import Checkpoint

    def work(log, x):
        if x % 25 == 7:
            threading.Event().wait()  # times out: what makes the run last
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{x}\\n".encode())
        os.close(fd)
        return x * 3

    if __name__ == "__main__":
        import functools
        ck = Checkpoint(sys.argv[1], commit_every=10, commit_interval=0.01)
        execute(functools.partial(work, sys.argv[3]), range(int(sys.argv[2])), checkpoint=ck,
                backend="processes", n_jobs=2, chunksize=5, timeout=0.1, on_error="collect")
        print("done")
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="uses process groups")
def test_sigkill_mid_run_with_timeouts_then_resume(tmp_path: Path) -> None:
    """SIGKILL of a run with a checkpoint and a timeout; the resumed run runs only what the
    checkpoint lacks: no stored item runs again, none is missing."""
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT)
    n, db, log = 400, tmp_path / "run.db", tmp_path / "calls"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(db), str(n), str(log)], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and len(_stored(db)) < 60:
        time.sleep(0.01)
    assert proc.poll() is None, "the job ended before the kill: make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    stored = _stored(db)
    before = _calls(log)
    log.unlink()
    ns: dict[str, Any] = {}
    exec(compile(KILL_SCRIPT, str(script), "exec"), ns)
    work = types.FunctionType(ns["work"].__code__, ns, "work")
    work.__module__ = "__main__"  # as in the killed script, whose checkpoint names it
    func = functools.partial(work, str(log))
    out = execute(func, range(n), checkpoint=Checkpoint(db), backend="processes", n_jobs=2,
                  chunksize=5, timeout=0.1, on_error="collect")  # fmt: skip
    hang = {i for i in range(n) if i % 25 == 7}
    failed = {i: v.exception for i, v in enumerate(out) if isinstance(v, ItemFailure)}
    # A machine that stalls the workers longer than the limit may time out another item:
    # that is the limit doing its job, not a lost item.
    assert hang <= set(failed) and all(type(e) is ItemTimeoutError for e in failed.values())
    assert all(out[i] == 3 * i for i in range(n) if i not in failed)
    again = _calls(log)
    assert set(again) & set(stored) == set()  # nothing stored ran again
    assert max(again.values()) == 1  # and nothing ran twice in the resumed run
    assert set(range(n)) - set(failed) <= set(again) | set(stored)  # nor is any missing
    assert all(before[i] >= 1 for i in stored)
    assert Checkpoint(db).results() == {i: 3 * i for i in range(n) if i not in failed}


def _stored(path: Path) -> dict[int, Any]:
    try:
        return Checkpoint(path).results()
    except Exception:  # not created yet, or mid-write
        return {}
