"""execute / execute_iter (amorsize.executor): results, errors, retries, crashes, Ctrl-C, hooks."""

from __future__ import annotations

import ast
import inspect
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amorsize
from amorsize import (
    ItemFailure,
    RunObserver,
    RunReport,
    WorkerCrashedError,
    execute,
    execute_iter,
)
from amorsize import executor as executor_module
from amorsize.backends import get_backend
from amorsize.backends.base import Backend, NotRunError, RemoteTraceback, run_chunk_fast
from amorsize.executor import DispatchStoppedError
from amorsize.retry import RetryExhaustedError, RetryPolicy

# Spawned and forkserver workers cannot import this file (importlib mode): ship by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# CPython 3.12+ warns when fork() runs with threads alive; the tests that ask for fork on
# purpose (the thread pools of other tests may still be alive) accept it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

BACKENDS = ["serial", "threads", "processes"]
NO_WAIT = RetryPolicy(max_retries=2, initial_delay=0.0, max_delay=0.0, jitter=False)


def square(x: int) -> int:
    return x * x


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


def exit_on_seven(x: int) -> int:
    if x == 7:
        os._exit(7)
    return x


def flaky(arg: tuple[int, str]) -> int:
    """Fails the first time it sees an item (a marker file remembers), then succeeds."""
    x, folder = arg
    marker = Path(folder, str(x))
    if not marker.exists():
        marker.touch()
        raise ConnectionError(f"transient failure on {x}")
    return x * 2


def count_calls(arg: tuple[int, str]) -> int:
    """Leaves one file per call, so the test can count calls per item across processes."""
    x, folder = arg
    Path(folder, f"{x}-{uuid.uuid4().hex}").touch()
    return x + 1


def pid_of(_: Any) -> int:
    return os.getpid()


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 2, 101])
def test_results_equal_serial(backend: str, n: int) -> None:
    """execute returns [func(x) for x in data] in input order, for every backend."""
    assert execute(square, list(range(n)), backend=backend) == [square(i) for i in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_input(backend: str) -> None:
    """A generator is consumed once and its results come back in order."""
    gen = (i for i in range(57))
    assert execute(square, gen, backend=backend, chunksize=5) == [i * i for i in range(57)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ordered", [True, False])
def test_execute_iter_ordered_and_unordered(backend: str, ordered: bool) -> None:
    """execute_iter yields results in order, or (index, result) pairs as they complete."""
    got = list(execute_iter(square, iter(range(40)), backend=backend, chunksize=3, ordered=ordered))
    if ordered:
        assert got == [i * i for i in range(40)]
    else:
        assert sorted(got) == [(i, i * i) for i in range(40)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(st.integers(-1000, 1000), max_size=60),
    chunksize=st.integers(1, 20),
    backend=st.sampled_from(BACKENDS),
)
def test_any_list_any_chunksize(data: list[int], chunksize: int, backend: str) -> None:
    """Property: any data and chunk size give the serial results."""
    assert execute(
        square,
        data,
        backend=backend,
        n_jobs=None if backend == "serial" else 2,
        chunksize=chunksize,
    ) == [x * x for x in data]


def test_auto_backend_reuses_sampled_results(tmp_path: Path) -> None:
    """With backend='auto' no item runs twice: the optimizer's sampled results are reused."""
    data = [(i, str(tmp_path)) for i in range(300)]
    results, plan = execute(count_calls, data, return_plan=True)
    assert results == [i + 1 for i in range(300)]
    calls = [p.name.split("-")[0] for p in tmp_path.iterdir()]
    assert sorted(map(int, calls)) == list(range(300))
    assert plan.reused > 0 and plan.optimization is not None


def test_explicit_backend_reuses_sampled_results(tmp_path: Path) -> None:
    """An explicit backend still asks the optimizer for sizes, and reuses its samples."""
    data = iter([(i, str(tmp_path)) for i in range(120)])
    results, plan = execute(count_calls, data, backend="processes", n_jobs=2, return_plan=True)
    assert results == [i + 1 for i in range(120)]
    assert len(list(tmp_path.iterdir())) == 120
    assert (plan.backend, plan.n_jobs) == ("processes", 2)


def test_explicit_parameters_skip_the_optimizer() -> None:
    """backend, n_jobs and chunksize all given: the plan is exactly that."""
    _, plan = execute(square, range(10), backend="threads", n_jobs=3, chunksize=4, return_plan=True)
    assert (plan.backend, plan.n_jobs, plan.chunksize) == ("threads", 3, 4)
    assert plan.optimization is None and plan.reused == 0


def test_lambdas_and_closures_on_processes() -> None:
    """Lambdas and closures run on worker processes (cloudpickle)."""
    k = 3
    assert execute(lambda x: x * k, range(9), backend="processes", n_jobs=2, chunksize=2) == [
        x * 3 for x in range(9)
    ]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_backend_instance_with_start_method(start_method: str) -> None:
    """A Backend instance (here spawn/forkserver workers) can be passed as backend=."""
    backend = get_backend("processes", start_method=start_method)
    try:
        got = execute(lambda x: -x, range(7), backend=backend, n_jobs=2, chunksize=2)
    finally:
        backend.close()
    assert got == [-x for x in range(7)]


def test_warm_pool_is_reused() -> None:
    """The second execute on processes uses the workers the first one started."""
    first = set(execute(pid_of, range(8), backend="processes", n_jobs=2, chunksize=1))
    second = set(execute(pid_of, range(8), backend="processes", n_jobs=2, chunksize=1))
    assert first == second and os.getpid() not in first


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_raise_mode_raises_the_items_exception(backend: str) -> None:
    """on_error='raise' raises the item's own exception type and message."""
    with pytest.raises(ValueError, match="odd 1") as info:
        execute(fail_on_odd, [0, 1, 2], backend=backend, chunksize=1)
    if backend == "processes":
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "fail_on_odd" in info.value.__cause__.tb


@pytest.mark.parametrize("backend", BACKENDS)
def test_collect_mode_keeps_going(backend: str) -> None:
    """on_error='collect' puts an ItemFailure in each failed slot and lists them."""
    results, plan = execute(
        fail_on_odd, range(10), backend=backend, chunksize=3, on_error="collect", return_plan=True
    )
    for i, r in enumerate(results):
        if i % 2:
            assert isinstance(r, ItemFailure) and (r.index, r.item, r.attempts) == (i, i, 1)
            assert str(r.exception) == f"odd {i}"
        else:
            assert r == i
    assert [f.index for f in sorted(plan.failures, key=lambda f: f.index)] == [1, 3, 5, 7, 9]
    assert (plan.completed, plan.failed, plan.items) == (5, 5, 10)


def test_raise_mode_cancels_pending_work() -> None:
    """After the first failure, no further input is pulled beyond what was in flight."""
    pulled = []

    def gen() -> Iterator[int]:
        for i in range(10_000):
            pulled.append(i)
            yield i

    with pytest.raises(ValueError):
        execute(fail_on_odd, gen(), backend="processes", n_jobs=2, chunksize=1)
    assert len(pulled) < 20


def fail_and_count(arg: tuple[int, str]) -> int:
    """Leaves one file per call, then fails: the test counts calls across processes."""
    x, folder = arg
    Path(folder, f"{x}-{uuid.uuid4().hex}").touch()
    raise ValueError(f"bad {x}")


def fail_first_and_count(arg: tuple[int, str]) -> int:
    """Like ``count_calls``, but item 0 fails."""
    if arg[0] == 0:
        raise ValueError("bad 0")
    return count_calls(arg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("retry", [None, NO_WAIT])
def test_raise_mode_stops_at_the_first_failure(
    backend: str, retry: RetryPolicy | None, tmp_path: Path
) -> None:
    """issue 12 item 9: each worker stops at its first failure, not at the end of its chunk."""
    be = backend if backend != "processes" else get_backend("processes", start_method="fork")
    jobs = 1 if backend == "serial" else 2
    data = [(i, str(tmp_path)) for i in range(200)]
    with pytest.raises((ValueError, RetryExhaustedError), match="bad"):
        execute(fail_and_count, data, backend=be, n_jobs=jobs, chunksize=16, retry=retry)
    attempts = 1 if retry is None else 3
    if backend == "processes":
        be.close()  # type: ignore[union-attr]  # the workers are done writing
    # Before: the whole chunk of 16 ran (x attempts) before the error was raised.
    assert len(list(tmp_path.iterdir())) <= jobs * attempts


@pytest.mark.parametrize("backend", BACKENDS)
def test_raise_mode_runs_nothing_after_the_failing_item(backend: str, tmp_path: Path) -> None:
    """issue 12 item 9: one worker, item 0 fails: no later item of the run is called."""
    data = [(i, str(tmp_path)) for i in range(64)]
    be = backend if backend != "processes" else get_backend("processes", start_method="fork")
    with pytest.raises(ValueError, match="bad 0"):
        execute(fail_first_and_count, data, backend=be, n_jobs=1, chunksize=64)
    if backend == "processes":
        be.close()  # type: ignore[union-attr]
    assert list(tmp_path.iterdir()) == []


class _ResultsBackwards(Backend):
    """Runs every task in input order, then yields them last first (or drops one)."""

    name = "backwards"

    def __init__(self, drop: int | None = None) -> None:
        self.drop = drop

    def run(self, func: Any, tasks: Iterator[Any], *, n_jobs: int, max_in_flight: int
            ) -> Iterator[Any]:
        done = [(t, run_chunk_fast(func, t.items, remote=False)) for t in tasks]
        yield from (pair for pair in reversed(done) if pair[0].start != self.drop)


def test_skipped_chunks_arriving_first_still_raise_the_real_failure() -> None:
    """issue 12 item 9: chunks a worker skipped may arrive before the failure that stopped it."""
    with pytest.raises(ValueError, match="odd 1"):
        execute(fail_on_odd, range(12), backend=_ResultsBackwards(), n_jobs=1, chunksize=4)
    results = execute(fail_on_odd, range(12), backend=_ResultsBackwards(), n_jobs=1,
                      chunksize=4, on_error="collect")
    assert sum(isinstance(r, ItemFailure) for r in results) == 6


def test_skipped_items_whose_failure_was_lost_are_an_error() -> None:
    """issue 12 item 9: items skipped for a failure that never arrived are never dropped."""
    with pytest.raises(NotRunError, match="8 item"):
        execute(fail_on_odd, range(12), backend=_ResultsBackwards(drop=0), n_jobs=1, chunksize=4)


@pytest.mark.parametrize("on_error", ["raise", "collect"])
def test_worker_exit_mid_run(on_error: str) -> None:
    """A worker calling os._exit does not hang execute; only its item fails."""
    if on_error == "raise":
        with pytest.raises(WorkerCrashedError, match="exit code 7"):
            execute(exit_on_seven, range(20), backend="processes", n_jobs=2, chunksize=4)
        return
    results = execute(
        exit_on_seven, range(20), backend="processes", n_jobs=2, chunksize=4, on_error="collect"
    )
    assert isinstance(results[7], ItemFailure)
    assert isinstance(results[7].exception, WorkerCrashedError)
    assert results[:7] + results[8:] == [i for i in range(20) if i != 7]


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("backend", BACKENDS)
def test_transient_failure_succeeds_with_retry(backend: str, tmp_path: Path) -> None:
    """A function failing once per item in the worker succeeds with retry=."""
    data = [(i, str(tmp_path)) for i in range(12)]
    assert execute(flaky, data, backend=backend, chunksize=3, retry=NO_WAIT) == [
        i * 2 for i in range(12)
    ]


def test_without_retry_the_transient_failure_is_reported(tmp_path: Path) -> None:
    """The same function without retry fails each item once (the test can fail)."""
    data = [(i, str(tmp_path)) for i in range(4)]
    results = execute(flaky, data, backend="processes", n_jobs=2, chunksize=2, on_error="collect")
    assert all(isinstance(r, ItemFailure) and r.attempts == 1 for r in results)


@pytest.mark.parametrize("backend", ["serial", "processes"])
def test_exhausted_retries_report_attempts(backend: str) -> None:
    """A permanent failure under retry reports every attempt made."""
    results, plan = execute(
        fail_on_odd,
        [1, 2],
        backend=backend,
        chunksize=1,
        retry=NO_WAIT,
        on_error="collect",
        return_plan=True,
    )
    assert results[1] == 2
    failure = results[0]
    assert isinstance(failure, ItemFailure) and failure.attempts == 3
    assert isinstance(failure.exception, RetryExhaustedError)
    assert plan.failures == [failure]


def always_fails(x: int) -> int:
    raise ValueError(f"bad {x}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_retry_error_names_the_users_function(backend: str) -> None:
    """issue 12 item 11: RetryExhaustedError names the user's function, not a wrapper."""
    with pytest.raises(RetryExhaustedError) as info:
        execute(always_fails, [3], backend=backend, n_jobs=1, chunksize=1, retry=NO_WAIT)
    name = f"{always_fails.__module__}.always_fails"
    assert info.value.func_name == name
    assert str(info.value) == f"{name}: gave up after 3 attempts; last error: ValueError: bad 3"
    assert info.value.attempts == 3


def test_retry_true_uses_the_default_policy() -> None:
    """retry=True is accepted (default policy) and succeeds on good items."""
    assert execute(square, [1, 2], backend="serial", retry=True) == [1, 4]


# --------------------------------------------------------------------------- streaming


def test_execute_iter_on_an_infinite_generator_reads_ahead_boundedly() -> None:
    """execute_iter on itertools.count() yields results and reads only a bounded window."""
    pulled = 0

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled = i + 1
            yield i

    it = execute_iter(square, numbers(), backend="processes", n_jobs=2, chunksize=4)
    assert [next(it) for _ in range(10)] == [i * i for i in range(10)]
    it.close()  # type: ignore[attr-defined]
    assert pulled <= 100


def test_ordered_iter_pauses_behind_a_slow_head() -> None:
    """A slow first item holds a bounded reorder buffer: input reading stalls."""
    release = threading.Event()
    pulled = 0
    peak: list[int] = []

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled = i + 1
            yield i

    def slow_head(x: int) -> int:
        if x == 0:
            release.wait(10)
        return x

    def watchdog() -> None:
        # Release the head once reading has stalled (or after 2 s, which would fail below).
        last, stable, deadline = -1, 0, time.monotonic() + 2
        while stable < 30 and time.monotonic() < deadline:
            time.sleep(0.001)
            stable = stable + 1 if pulled == last else 0
            last = pulled
        peak.append(pulled)
        release.set()

    threading.Thread(target=watchdog, daemon=True).start()
    it = execute_iter(slow_head, numbers(), backend="threads", n_jobs=2, chunksize=1)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()  # type: ignore[attr-defined]
    assert peak and peak[0] <= 40


# --------------------------------------------------------------------------- Ctrl-C

_SIGINT_SCRIPT = """
import os, sys, threading
from pathlib import Path
from amorsize import execute

folder = sys.argv[1]

def block(x):
    Path(folder, f"{os.getpid()}-{x}").touch()
    threading.Event().wait(60)  # an item that runs until the test interrupts the run
    return x

if __name__ == "__main__":
    try:
        execute(block, range(8), backend="processes", n_jobs=2, chunksize=1)
    except KeyboardInterrupt:
        import psutil
        # Before interpreter exit (whose multiprocessing hooks would also reap daemons):
        print("children left:", len(psutil.Process().children(recursive=True)), flush=True)
        raise
"""


def test_sigint_stops_workers_and_leaves_no_process(tmp_path: Path) -> None:
    """SIGINT to a process running execute: KeyboardInterrupt, no child left behind."""
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_SIGINT_SCRIPT))
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marks)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)  # waiting for the workers to start is the point here
        assert len(list(marks.iterdir())) == 2, "workers never started"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert "children left: 0" in out
    left = [c.pid for c in children if psutil.pid_exists(c.pid)]
    assert left == [], f"processes left behind: {left}"


# --------------------------------------------------------------------------- observers


class Recorder(RunObserver):
    """Records every hook call; knows results for some indices; can stop dispatch."""

    def __init__(
        self,
        known: dict[int, Any] | None = None,
        stop_after: int | None = None,
        absorb: bool = False,
    ) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.known_results = known or {}
        self.stop_after = stop_after
        self.absorb = absorb
        self.dispatches = 0

    def begin(self, func: Any) -> None:
        self.calls.append(("begin", func))

    def known(self, index: int, item: Any) -> tuple[bool, Any]:
        if index in self.known_results:
            return True, self.known_results[index]
        return False, None

    def allow_dispatch(self) -> bool:
        self.dispatches += 1
        return self.stop_after is None or self.dispatches <= self.stop_after

    def on_success(self, index: int, item: Any, result: Any) -> None:
        self.calls.append(("ok", index, result))

    def on_failure(self, index: int, item: Any, exc: BaseException, attempts: int) -> bool:
        self.calls.append(("fail", index, type(exc).__name__, attempts))
        return self.absorb

    def end(self, completed: bool) -> None:
        self.calls.append(("end", completed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_observer_sees_every_item_once(backend: str) -> None:
    """begin, one on_success/on_failure per item, end(True), in that frame."""
    rec = Recorder()
    execute(
        fail_on_odd, range(6), backend=backend, chunksize=2, on_error="collect", observers=[rec]
    )
    assert rec.calls[0] == ("begin", fail_on_odd) and rec.calls[-1] == ("end", True)
    middle = sorted(rec.calls[1:-1], key=lambda c: c[1])
    assert middle == [
        ("ok", 0, 0),
        ("fail", 1, "ValueError", 1),
        ("ok", 2, 2),
        ("fail", 3, "ValueError", 1),
        ("ok", 4, 4),
        ("fail", 5, "ValueError", 1),
    ]


def test_known_items_are_not_run(tmp_path: Path) -> None:
    """Items an observer knows (a checkpoint) are taken as is and never run."""
    rec = Recorder(known={0: "zero", 3: "three"})
    data = [(i, str(tmp_path)) for i in range(6)]
    results, plan = execute(
        count_calls,
        data,
        backend="processes",
        n_jobs=2,
        chunksize=2,
        observers=[rec],
        return_plan=True,
    )
    assert results == ["zero", 2, 3, "three", 5, 6]
    assert sorted(int(p.name.split("-")[0]) for p in tmp_path.iterdir()) == [1, 2, 4, 5]
    assert plan.skipped == 2


def test_absorbed_failure_does_not_stop_raise_mode() -> None:
    """on_failure returning True (dead-lettered) lets a raise-mode run finish."""
    rec = Recorder(absorb=True)
    results = execute(fail_on_odd, range(4), backend="serial", observers=[rec])
    assert results[0] == 0 and isinstance(results[1], ItemFailure)
    assert rec.calls[-1] == ("end", True)


def test_stopped_dispatch_collect_reports_not_attempted() -> None:
    """When an observer stops dispatch, the rest is reported as not attempted."""
    rec = Recorder(stop_after=2)
    results, plan = execute(
        square,
        range(10),
        backend="serial",
        chunksize=2,
        on_error="collect",
        observers=[rec],
        return_plan=True,
    )
    assert results[:4] == [0, 1, 4, 9]
    assert all(isinstance(r, ItemFailure) and r.attempts == 0 for r in results[4:])
    assert isinstance(results[4].exception, DispatchStoppedError)
    assert rec.calls[-1] == ("end", False)  # the work is not done: a checkpoint stays open
    assert (plan.completed, plan.not_attempted, plan.items) == (4, 6, 10)


def test_stopped_dispatch_raise_mode_raises_the_stop_error() -> None:
    """In raise mode a stopped run raises the observer's stop error, with counts."""
    rec = Recorder(stop_after=1)
    with pytest.raises(DispatchStoppedError, match=r"2 item\(s\) completed.*8 not attempted"):
        execute(square, range(10), backend="serial", chunksize=2, observers=[rec])
    assert rec.calls[-1] == ("end", False)


def test_circuit_breaker_stops_the_run() -> None:
    """circuit_breaker= plugs in through the observer hooks."""
    circuit = pytest.importorskip("amorsize.circuit")
    policy = circuit.CircuitBreakerPolicy(failure_threshold=2)
    results, plan = execute(
        fail_on_odd,
        [1, 3, 5, 7, 9, 11],
        backend="serial",
        chunksize=1,
        on_error="collect",
        circuit_breaker=policy,
        return_plan=True,
    )
    assert plan.failed == 2 and plan.not_attempted == 4
    assert isinstance(results[-1].exception, circuit.CircuitOpenError)


# --------------------------------------------------------------------------- reporting


def test_return_plan_has_measurements() -> None:
    """return_plan=True returns a RunReport with timings and counts."""
    results, plan = execute(square, range(50), return_plan=True)
    assert results == [i * i for i in range(50)]
    assert isinstance(plan, RunReport)
    assert plan.items == 50 and plan.wall_seconds > 0 and plan.items_per_second > 0
    assert plan.backend in ("serial", "threads", "processes")
    assert plan.predicted_seconds is not None and plan.predicted_over_measured is not None
    assert "measured" in str(plan)


def test_verbose_prints_plan_and_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    """verbose=True prints the decision and, after the run, predicted vs measured."""
    execute(square, range(20), verbose=True)
    out = capsys.readouterr().out
    assert "measured" in out and "predicted" in out


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    """progress=True draws a tqdm bar that reaches the item count."""
    pytest.importorskip("tqdm")
    execute(square, range(30), backend="serial", chunksize=7, progress=True)
    assert "30/30" in capsys.readouterr().err


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_jobs": 0}, ValueError, r"n_jobs must be an int in \[1, 10000\]"),
        ({"n_jobs": 2.5}, TypeError, "n_jobs must be an int"),
        ({"n_jobs": True}, TypeError, "n_jobs"),
        ({"chunksize": -3}, ValueError, r"chunksize must be an int in \[1, "),
        ({"backend": "gpu"}, ValueError, "backend must be 'auto'"),
        ({"on_error": "ignore"}, ValueError, "on_error must be 'raise' or 'collect'"),
        ({"retry": 3}, TypeError, "retry must be None, True, False or an amorsize.RetryPolicy"),
        ({"progress": "yes"}, TypeError, "progress must be True or False"),
        ({"verbose": 1}, TypeError, "verbose must be True or False"),
        ({"return_plan": None}, TypeError, "return_plan must be True or False"),
        ({"backend": "serial", "n_jobs": 4}, ValueError, "n_jobs must be 1"),
        ({"backend": "threads", "client": object()}, ValueError, "client= only applies"),
        ({"observers": [object()]}, TypeError, "RunObserver"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    """Each bad argument is refused before anything runs, naming the parameter."""
    with pytest.raises(error, match=match):
        execute(square, [1], **kwargs)


def test_bad_func_and_data() -> None:
    """A non-callable func or a non-iterable data is a clear TypeError."""
    with pytest.raises(TypeError, match="func must be callable"):
        execute(42, [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data must be an iterable"):
        execute(square, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ordered must be True or False"):
        execute_iter(square, [1], ordered="yes")  # type: ignore[arg-type]


def test_n_jobs_minus_one_means_every_cpu() -> None:
    """n_jobs=-1 uses every available CPU."""
    _, plan = execute(square, range(4), backend="threads", n_jobs=-1, chunksize=1, return_plan=True)
    assert plan.n_jobs == len(os.sched_getaffinity(0))


def test_public_names() -> None:
    """execute and friends are exported from the package."""
    for name in ("execute", "execute_iter", "RunReport", "ItemFailure", "RunObserver"):
        assert name in amorsize.__all__


def test_execution_plan_is_the_deprecated_alias_of_run_report() -> None:
    """ExecutionPlan, the report's former name, stays exported as an alias until 1.0."""
    assert "ExecutionPlan" in amorsize.__all__
    assert amorsize.ExecutionPlan is amorsize.RunReport is executor_module.ExecutionPlan


def test_execute_and_execute_iter_share_their_options() -> None:
    """Both signatures agree (names, defaults, types) and _RunOptions.build takes just those."""
    run = dict(inspect.signature(execute).parameters)
    it = dict(inspect.signature(execute_iter).parameters)
    assert run.pop("return_plan").default is False and it.pop("ordered").default is True
    assert list(run) == list(it)
    for name, param in run.items():
        assert (param.kind, param.default, param.annotation) == (
            it[name].kind, it[name].default, it[name].annotation,
        ), name  # fmt: skip
    build = dict(inspect.signature(executor_module._RunOptions.build).parameters)
    del build["api"], build["ordered_window"]
    assert list(build) == list(run)


async def _async_square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("func", [square, _async_square], ids=["def", "async-def"])
@pytest.mark.parametrize("ordered_window", [False, True])
def test_a_plain_call_gets_the_options_the_checks_would_give(
    func: Any, ordered_window: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """execute(func, data) skips the option checks, and gets what they would have built."""
    build = executor_module._RunOptions.build
    defaults = {
        name: p.default for name, p in inspect.signature(execute).parameters.items()
        if p.default is not inspect.Parameter.empty and name != "return_plan"
    }  # fmt: skip
    # Every option defaulting to None is in the plain call's check.
    assert len(executor_module._NOTHING_GIVEN) == sum(v is None for v in defaults.values())
    plain = build("execute", func, [1], ordered_window=ordered_window, **defaults)
    monkeypatch.setattr(executor_module, "_NOTHING_GIVEN", ())  # the checked path
    checked = build("execute", func, [1], ordered_window=ordered_window, **defaults)
    assert plain == checked and plain.is_async == (func is _async_square)
    assert plain is not checked


def test_modules_below_the_executor_never_import_it() -> None:
    """Imports go one way: only the CLI, the demo and the package root import the executor,
    even inside a function body (no hidden cycle)."""
    package = Path(amorsize.__file__).parent
    above = {"executor.py", "cli.py", "demo.py", "__init__.py", "__main__.py"}
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name in above and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                names = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            if names & {"amorsize.executor", "amorsize.execute", "amorsize.execute_iter"}:
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_in_the_input_generator_propagates(backend: str) -> None:
    """An exception raised by the data generator itself reaches the caller."""

    def broken() -> Iterator[int]:
        yield from range(5)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        execute(square, broken(), backend=backend, chunksize=2)


def test_observer_error_ends_the_run_and_calls_end() -> None:
    """An observer raising (a checkpoint mismatch) stops the run; end(False) still runs."""

    class Mismatch(Recorder):
        def known(self, index: int, item: Any) -> tuple[bool, Any]:
            if index == 3:
                raise LookupError("input changed at item 3")
            return False, None

    rec = Mismatch()
    with pytest.raises(LookupError, match="item 3"):
        execute(square, range(10), backend="processes", n_jobs=2, chunksize=2, observers=[rec])
    assert rec.calls[-1] == ("end", False)
    # The warm pool survives and serves the next call.
    assert execute(square, range(10), backend="processes", n_jobs=2, chunksize=2) == [
        i * i for i in range(10)
    ]


def test_progress_without_tqdm_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """progress=True without tqdm runs anyway, with a warning naming the fix."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.warns(RuntimeWarning, match="pip install tqdm"):
        assert execute(square, [1, 2], backend="serial", progress=True) == [1, 4]


def interrupt_on_three(x: int) -> int:
    if x == 3:
        raise KeyboardInterrupt
    return x


@pytest.mark.parametrize("backend", ["serial", "threads"])
def test_keyboard_interrupt_in_process_propagates(backend: str) -> None:
    """A KeyboardInterrupt during execute propagates (it is never collected as a failure)."""
    with pytest.raises(KeyboardInterrupt):
        execute(interrupt_on_three, range(10), backend=backend, chunksize=1, on_error="collect")
    assert execute(square, range(4), backend=backend, chunksize=1) == [0, 1, 4, 9]


def test_known_items_are_not_sampled_by_the_optimizer(tmp_path: Path) -> None:
    """With backend='auto', items an observer knows are never run, not even to sample."""
    known = {i: -i for i in range(0, 200, 2)}
    rec = Recorder(known=known)
    data = [(i, str(tmp_path)) for i in range(200)]
    results, plan = execute(count_calls, data, observers=[rec], return_plan=True)
    assert results == [-i if i % 2 == 0 else i + 1 for i in range(200)]
    calls = sorted(int(p.name.split("-")[0]) for p in tmp_path.iterdir())
    assert calls == list(range(1, 200, 2))
    assert plan.skipped == 100 and plan.items == 200


class BlockRecorder(RunObserver):
    """Implements only the block hooks: knows every third item."""

    def __init__(self) -> None:
        self.known_blocks: list[tuple[int, int]] = []
        self.success_blocks: list[tuple[int, list[Any], list[Any]]] = []

    def known_block(self, start: int, items: list[Any]) -> dict[int, Any]:
        self.known_blocks.append((start, len(items)))
        return {k: "known" for k in range(len(items)) if (start + k) % 3 == 0}

    def on_success_block(self, start: int, items: list[Any], values: list[Any]) -> None:
        self.success_blocks.append((start, list(items), list(values)))


@pytest.mark.parametrize("backend", ["serial", "processes"])
def test_block_hooks_are_called_per_chunk(backend: str) -> None:
    """Block hooks see whole chunks of consecutive unknown items, never a known one."""
    rec = BlockRecorder()
    results = execute(square, range(40), backend=backend, n_jobs=1 if backend == "serial" else 2,
                      chunksize=4, observers=[rec])  # fmt: skip
    assert results == ["known" if i % 3 == 0 else i * i for i in range(40)]
    covered = sorted(i for start, _ in rec.known_blocks for i in range(start, start + _))
    assert covered == list(range(40))  # every item asked about exactly once
    reported: list[int] = []
    for start, items, values in rec.success_blocks:
        assert items == list(range(start, start + len(items)))  # consecutive
        assert values == [x * x for x in items]
        reported += items
    assert sorted(reported) == [i for i in range(40) if i % 3]


def test_serial_plan_batches_tiny_items_and_keeps_slow_ones_small() -> None:
    """A serial plan sizes chunks by item time: large for tiny items, small for slow ones."""
    data = range(100_000)
    results, plan = execute(square, data, backend="serial", n_jobs=None, return_plan=True)
    assert results == [x * x for x in data]
    assert plan.backend == "serial"
    from amorsize.executor import _serial_chunk

    fast = type("P", (), {"mean_seconds": 1e-7})()
    slow = type("P", (), {"mean_seconds": 0.5})()
    assert _serial_chunk(fast) >= 1024
    assert _serial_chunk(slow) == 1
    assert _serial_chunk(None) >= 1
