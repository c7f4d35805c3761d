"""The local backends (amorsize.backends): serial, threads, processes, and the registry."""

from __future__ import annotations

import copyreg
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import pytest

from amorsize._threadpool import Pool
from amorsize.backends import BACKEND_NAMES, get_backend, warm_workers
from amorsize.backends._wire import TaskFeed
from amorsize.backends.base import (
    PAUSE,
    Backend,
    OkValues,
    Outcome,
    Pause,
    RemoteTraceback,
    Task,
    WorkerCrashedError,
    as_outcomes,
    run_chunk_fast,
)
from amorsize.backends.processes import ProcessesBackend
from amorsize.backends.serial import SerialBackend
from amorsize.backends.threads import ThreadsBackend

# Spawned and forkserver workers cannot import this file (importlib mode keeps tests/ off
# sys.path): ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# CPython 3.12+ warns when fork() runs with threads alive; the tests that ask for fork on
# purpose (the thread pools of other tests may still be alive) accept it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

START_METHODS = ["fork", "spawn", "forkserver"]


def square(x: int) -> int:
    return x * x


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


def exit_on_seven(x: int) -> int:
    if x == 7:
        os._exit(3)
    return x


def kill_on_five(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def thread_env(_: Any) -> str | None:
    return os.environ.get("OMP_NUM_THREADS")


def pid_of(_: Any) -> int:
    return os.getpid()


def collect(
    backend: Backend, func: Callable[[Any], Any], tasks: list[Task], n_jobs: int = 2
) -> dict[int, Outcome]:
    """Run tasks; map each input index to its outcome, failing on any duplicate."""
    out: dict[int, Outcome] = {}
    for task, outcomes in backend.run(func, iter(tasks), n_jobs=n_jobs, max_in_flight=2 * n_jobs):
        got = as_outcomes(outcomes)
        assert len(got) == len(task.items)
        for i, o in enumerate(got):
            assert task.start + i not in out, f"index {task.start + i} reported twice"
            out[task.start + i] = o
    return out


def chunks(n: int, size: int) -> list[Task]:
    return [Task(s, list(range(s, min(n, s + size)))) for s in range(0, n, size)]


@pytest.fixture(scope="module")
def processes() -> Iterator[ProcessesBackend]:
    backend = ProcessesBackend("fork")
    yield backend
    backend.close()


@pytest.fixture(params=["serial", "threads", "processes"])
def backend(request: pytest.FixtureRequest, processes: ProcessesBackend) -> Iterator[Backend]:
    if request.param == "processes":
        yield processes
    elif request.param == "threads":
        b = ThreadsBackend()
        yield b
        b.close()
    else:
        yield SerialBackend()


@pytest.mark.parametrize("n, size", [(0, 4), (1, 4), (37, 4), (37, 1), (37, 100)])
def test_every_item_once_with_serial_results(backend: Backend, n: int, size: int) -> None:
    """Each item comes back exactly once, with func's value."""
    out = collect(backend, square, chunks(n, size))
    assert sorted(out) == list(range(n))
    assert [out[i].value for i in range(n)] == [square(i) for i in range(n)]


def test_failures_are_per_item(backend: Backend) -> None:
    """A raising item fails alone; the others in its chunk succeed."""
    out = collect(backend, fail_on_odd, chunks(10, 5))
    assert [out[i].ok for i in range(10)] == [i % 2 == 0 for i in range(10)]
    assert isinstance(out[3].value, ValueError) and str(out[3].value) == "odd 3"


def test_remote_traceback_survives_pickling(processes: ProcessesBackend) -> None:
    """A worker's exception arrives with its traceback text as __cause__."""
    out = collect(processes, fail_on_odd, [Task(0, [1])])
    cause = out[0].value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_on_odd" in cause.tb and "odd 1" in cause.tb


def test_pause_waits_for_a_completion(backend: Backend) -> None:
    """A PAUSE from the task iterator holds dispatch until something completes."""
    assert backend.supports_pause
    if backend.name == "serial":
        pytest.skip("serial has nothing in flight when it asks for a task: it never pauses")

    def tasks() -> Iterator[Task | Pause]:
        yield Task(0, [1])
        yield PAUSE
        yield Task(1, [2])

    got = list(backend.run(square, tasks(), n_jobs=2, max_in_flight=4))
    assert sorted((t.start, list(o)) for t, o in got) == [(0, [1]), (1, [4])]


def test_pause_with_nothing_in_flight_is_an_error(backend: Backend) -> None:
    """A pause that could never end raises instead of hanging."""
    with pytest.raises(RuntimeError, match="paused"):
        list(backend.run(square, iter([PAUSE]), n_jobs=2, max_in_flight=4))


def test_closing_the_run_stops_pulling_tasks(backend: Backend) -> None:
    """Closing the generator early leaves the rest of the task iterator unread."""
    pulled = []

    def tasks() -> Iterator[Task]:
        for t in chunks(1000, 1):
            pulled.append(t.start)
            yield t

    run = backend.run(square, tasks(), n_jobs=2, max_in_flight=4)
    next(run)
    run.close()  # type: ignore[attr-defined]
    assert len(pulled) <= 8


@pytest.mark.parametrize("start_method", START_METHODS)
def test_start_methods_run_lambdas_and_closures(start_method: str) -> None:
    """fork, spawn and forkserver workers run lambdas and closures (cloudpickle)."""
    offset = 10
    b = ProcessesBackend(start_method)
    try:
        out = collect(b, lambda x: x + offset, chunks(6, 2))
        assert [out[i].value for i in range(6)] == [i + 10 for i in range(6)]
        assert b.start_method == start_method
    finally:
        b.close()


def test_worker_crash_fails_only_the_culprit(processes: ProcessesBackend) -> None:
    """An item calling os._exit fails alone as WorkerCrashedError; nothing lost or repeated."""
    out = collect(processes, exit_on_seven, chunks(20, 4))
    assert sorted(out) == list(range(20))
    for i in range(20):
        if i == 7:
            err = out[i].value
            assert isinstance(err, WorkerCrashedError)
            assert err.exitcode == 3 and "exit code 3" in str(err)
            assert out[i].attempts == processes.crash_retries + 1
        else:
            assert out[i].ok and out[i].value == i
    # The pool healed itself: the next run works at full size.
    assert sorted(o.value for o in collect(processes, square, chunks(4, 1)).values()) == [
        0,
        1,
        4,
        9,
    ]
    assert processes.warm_workers() == 2


def test_sigkilled_worker_names_the_signal(processes: ProcessesBackend) -> None:
    """A worker killed by SIGKILL (as the OOM killer does) is reported with the signal."""
    out = collect(processes, kill_on_five, chunks(8, 8))
    err = out[5].value
    assert isinstance(err, WorkerCrashedError) and err.exitcode == -signal.SIGKILL
    assert "SIGKILL" in str(err)
    assert all(out[i].ok for i in range(8) if i != 5)


def test_worker_crashed_error_pickles() -> None:
    """WorkerCrashedError crosses processes with its attributes and message."""
    err = pickle.loads(pickle.dumps(WorkerCrashedError(-11, 2)))
    assert (err.exitcode, err.attempts) == (-11, 2)
    assert "SIGSEGV" in str(err)


def test_pool_stays_warm_between_runs(processes: ProcessesBackend) -> None:
    """A second run uses the same worker processes."""
    first = {o.value for o in collect(processes, pid_of, chunks(8, 1)).values()}
    second = {o.value for o in collect(processes, pid_of, chunks(8, 1)).values()}
    assert first == second and len(first) == 2


def test_unpicklable_function_is_a_clear_error(processes: ProcessesBackend) -> None:
    """A function that cannot be pickled fails before dispatch, naming the fix."""

    class Unpicklable:
        def __call__(self, x: int) -> int:
            return x

        def __reduce__(self) -> Any:
            raise TypeError("no pickling")

    with pytest.raises(TypeError, match="cannot be sent to worker processes"):
        collect(processes, Unpicklable(), chunks(2, 1))


def _explode() -> None:
    raise ImportError("module gone in the worker")


class LoadsBadly:
    """Pickles fine in the parent, fails to unpickle in the worker."""

    def __call__(self, x: int) -> int:
        return x

    def __reduce__(self) -> Any:
        return (_explode, ())


def test_function_that_fails_to_load_in_the_worker(processes: ProcessesBackend) -> None:
    """A function the worker cannot unpickle raises once, with the worker's traceback."""
    with pytest.raises(RuntimeError, match="could not be loaded in a worker") as info:
        collect(processes, LoadsBadly(), chunks(4, 2))
    assert "module gone in the worker" in str(info.value)
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_unpicklable_item_and_result_fail_alone(processes: ProcessesBackend) -> None:
    """Unpicklable items or results fail their own slot only."""
    lock_item = Task(0, [1, __import__("threading").Lock(), 3])
    out = collect(processes, lambda x: x, [lock_item])
    assert [out[i].ok for i in range(3)] == [True, False, True]
    assert isinstance(out[1].value, pickle.PicklingError)
    out = collect(processes, lambda x: (lambda: x) if x == 1 else x, [Task(0, [0, 1, 2])])
    assert out[0].ok and not out[1].ok and out[2].ok
    assert "cannot be pickled" in str(out[1].value)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_items_that_do_not_pickle_fail_alone_and_the_run_goes_on(
    processes: ProcessesBackend, n_jobs: int
) -> None:
    """Single-item tasks that do not pickle fail alone, even with nothing in flight."""
    lock = __import__("threading").Lock()
    tasks = [Task(0, [lock]), Task(1, [lock]), Task(2, [2]), Task(3, [lock]), Task(4, [3])]
    out = collect(processes, square, tasks, n_jobs=n_jobs)
    assert sorted(out) == list(range(5))
    for i in (0, 1, 3):
        assert isinstance(out[i].value, pickle.PicklingError) and out[i].attempts == 0
        assert str(out[i].value).startswith(f"item {i} cannot be pickled to send it")
    assert (out[2].value, out[4].value) == (4, 9)


def test_task_feed_reads_tasks_pauses_and_the_end() -> None:
    """TaskFeed gives tasks, None for a pause or the end; finish() raises only when paused."""
    feed = TaskFeed(iter([Task(0, [1]), PAUSE, Task(1, [2])]))
    assert feed.pull() == Task(0, [1])
    assert feed.pull() is None and not feed.exhausted
    with pytest.raises(RuntimeError, match=r"paused \(yielded PAUSE\) with no task in flight"):
        feed.finish()
    assert feed.pull() == Task(1, [2])
    assert feed.pull() is None and feed.exhausted
    assert feed.pull() is None
    feed.finish()


class TwoArgError(Exception):
    """Pickles, but does not load: its ``__init__`` takes other arguments than ``.args``."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def raise_two_arg_error_on_one(x: int) -> int:
    if x == 1:
        raise TwoArgError(x, 2)
    return x


@pytest.mark.parametrize("backend_name", ["processes", "dask"])
def test_exception_that_does_not_unpickle_fails_only_its_item(
    backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that pickles but does not load fails its own item, not the run."""
    # tblib (imported by dask) may have registered a reducer that makes this class load.
    monkeypatch.delitem(copyreg.dispatch_table, TwoArgError, raising=False)
    if backend_name == "dask":
        pytest.importorskip("distributed")
        from amorsize.backends.dask import DaskBackend

        backend: Backend = DaskBackend()
    else:
        backend = ProcessesBackend("fork")  # forked after the removal above
    try:
        out = collect(backend, raise_two_arg_error_on_one, [Task(0, [0, 1, 2])])
    finally:
        backend.close()
    assert [out[i].ok for i in range(3)] == [True, False, True]
    assert [out[0].value, out[2].value] == [0, 2]
    assert isinstance(out[1].value, pickle.UnpicklingError)
    assert str(out[1].value).startswith("item 1:")
    assert "TwoArgError('1/2')" in str(out[1].value)


def test_big_messages_do_not_deadlock(processes: ProcessesBackend) -> None:
    """Items and results far bigger than a pipe buffer flow both ways."""
    big = [bytes([i]) * 300_000 for i in range(6)]
    out = collect(processes, lambda b: b[::-1], [Task(i, [b]) for i, b in enumerate(big)])
    assert [out[i].value for i in range(6)] == big


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_limit_blas_threads(start_method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers get OMP/BLAS thread variables so n_jobs x threads <= cores."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    b = ProcessesBackend(start_method)
    try:
        out = collect(b, thread_env, chunks(2, 1), n_jobs=2)
    finally:
        b.close()
    cpus = len(os.sched_getaffinity(0))
    expected = str(max(1, cpus // 2))
    assert {o.value for o in out.values()} == {expected}
    assert "OMP_NUM_THREADS" not in os.environ  # the parent's environment is restored


def test_a_user_setting_of_blas_threads_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OMP_NUM_THREADS the user set is not overridden."""
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    b = ProcessesBackend("fork")
    try:
        out = collect(b, thread_env, chunks(2, 1))
    finally:
        b.close()
    assert {o.value for o in out.values()} == {"7"}


def test_busy_pool_gives_a_nested_run_a_private_pool(processes: ProcessesBackend) -> None:
    """A run started while another holds the warm pool gets its own workers."""
    outer = processes.run(pid_of, iter(chunks(4, 1)), n_jobs=2, max_in_flight=4)
    first = next(outer)
    inner = collect(processes, pid_of, chunks(2, 1))
    rest = list(outer)
    warm = {first[1][0]} | {next(iter(o)) for _, o in rest}
    assert not warm & {o.value for o in inner.values()}


def test_close_leaves_no_process() -> None:
    """close() stops and joins every worker."""
    psutil = pytest.importorskip("psutil")
    b = ProcessesBackend("fork")
    pids = {o.value for o in collect(b, pid_of, chunks(4, 1)).values()}
    b.close()
    assert b.warm_workers() == 0
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_bad_backend_options() -> None:
    """Bad constructor values and unknown names are clear errors."""
    with pytest.raises(ValueError, match="start_method"):
        ProcessesBackend("teleport")
    with pytest.raises(ValueError, match="crash_retries"):
        ProcessesBackend(crash_retries=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("gpu")


def test_registry_shares_instances() -> None:
    """get_backend returns one shared instance per name and options."""
    assert set(BACKEND_NAMES) >= {"serial", "threads", "processes"}
    assert get_backend("threads") is get_backend("threads")
    assert get_backend("processes") is get_backend("processes", start_method=None)
    assert warm_workers("serial") == 0


def test_ok_values_and_per_item_outcomes_agree() -> None:
    """OkValues and per-item outcomes describe the same results."""
    fast = run_chunk_fast(lambda x: x, [1, 2])
    assert type(fast) is OkValues
    assert as_outcomes(fast) == [Outcome(True, 1), Outcome(True, 2)]


_UNGUARDED_SCRIPT = """
from amorsize.backends.base import Task
from amorsize.backends.processes import ProcessesBackend

# No `if __name__ == "__main__":` guard: every spawned worker re-runs this and dies.
backend = ProcessesBackend("spawn")
list(backend.run(abs, iter([Task(0, [1, 2])]), n_jobs=2, max_in_flight=4))
"""


def test_workers_dying_at_start_raise_instead_of_looping(tmp_path: Any) -> None:
    """Workers that cannot even start (unguarded main under spawn) end the run clearly."""
    import subprocess

    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "worker processes die while starting" in proc.stderr
    assert "__name__ == '__main__'" in proc.stderr


def test_idle_worker_killed_between_runs_is_replaced(processes: ProcessesBackend) -> None:
    """A warm worker killed while idle (OOM killer) is replaced by the next run."""
    pids = {o.value for o in collect(processes, pid_of, chunks(4, 1)).values()}
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    next(w for w in processes._workers if w.process.pid == victim).process.join(10)
    out = collect(processes, square, chunks(10, 2))
    assert [out[i].value for i in range(10)] == [i * i for i in range(10)]
    assert victim not in {w.process.pid for w in processes._workers}


def _callers_on_one_backend(name: str, rounds: int) -> list[str]:
    """Eight threads run `execute` on the shared backend with n_jobs 1..8; return problems."""
    import threading

    from amorsize import execute

    barrier = threading.Barrier(8)
    problems: list[str] = []

    def caller(k: int) -> None:
        for r in range(rounds):
            barrier.wait()
            try:
                got = execute(square, range(40 + r), backend=name, n_jobs=k, chunksize=3)
            except Exception as exc:  # every failure is the finding
                problems.append(f"n_jobs={k}: {exc!r}")
            else:
                if got != [x * x for x in range(40 + r)]:
                    problems.append(f"n_jobs={k}: wrong results")

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return problems


@pytest.mark.parametrize(("name", "rounds"), [("threads", 6), ("processes", 2)])
def test_concurrent_callers_with_different_n_jobs(name: str, rounds: int) -> None:
    """issue 12 item 2: eight concurrent execute calls with n_jobs 1..8 all succeed."""
    assert _callers_on_one_backend(name, rounds) == []


def test_threads_pool_in_use_is_shut_by_its_last_user() -> None:
    """issue 12 item 2: an evicted or closed pool still in use serves its run to the end."""
    b = ThreadsBackend()
    outer = b.run(square, iter(chunks(6, 1)), n_jobs=7, max_in_flight=2)
    first = next(outer)
    for k in range(1, 6):  # evicts the 7-thread pool from the warm set
        assert len(collect(b, square, chunks(3, 1), n_jobs=k)) == 3
    b.close()
    rest = list(outer)
    assert sorted(t.start for t, _ in [first, *rest]) == list(range(6))
    assert b.warm_workers() == 0


def add_one(x: int) -> int:
    return x + 1


def nested_threads(x: int) -> int:
    from amorsize import execute

    return sum(execute(add_one, range(4), backend="threads", n_jobs=2, chunksize=1)) + x


def test_nested_threads_run_of_the_same_size_does_not_deadlock() -> None:
    """issue 12 item 2: a run from inside a pool thread gets its own pool, not a deadlock."""
    from amorsize import execute

    got = execute(nested_threads, range(4), backend="threads", n_jobs=2, chunksize=1)
    assert got == [10 + x for x in range(4)]


def test_threads_start_map_keeps_item_order_and_cancels() -> None:
    """Spilled items come back in item order; cancelled ones never run."""
    b = ThreadsBackend()
    try:
        assert b.start_map(square, list(range(20)))(False) == [x * x for x in range(20)]
        gate, ran = threading.Event(), []

        def held(x: int) -> int:
            ran.append(x)
            gate.wait(10.0)
            return x

        collect = b.start_map(held, [1, 2, 3])
        b.start_map(held, [4, 5, 6])(True)  # same pool, queued behind the held items
        gate.set()
        assert collect(False) == [1, 2, 3] and not {4, 5, 6} & set(ran)
    finally:
        b.close()


def test_threads_pool_runs_every_job_and_shuts_down() -> None:
    """The pool behind the backend: jobs beyond its size queue; shutdown ends threads."""
    pool = Pool(3)
    futures = [pool.submit(square, x) for x in range(50)]
    assert [f.result(10.0) for f in futures] == [x * x for x in range(50)]
    assert pool.threads <= 3
    pool.shutdown(cancel_futures=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 1)


def gated_barrier(barrier: threading.Barrier) -> Any:
    def wait(x: int) -> int:
        barrier.wait()  # all items at once, or BrokenBarrierError after its timeout
        return x + 1

    return wait


def test_waiting_work_runs_all_at_once_from_the_first_call() -> None:
    """execute: items that wait together (a barrier of all of them) finish while sampling."""
    from amorsize import execute

    n = 40
    got, plan = execute(gated_barrier(threading.Barrier(n, timeout=30.0)), list(range(n)),
                        return_plan=True)
    assert got == [x + 1 for x in range(n)]
    assert "already ran while sampling" in plan.reason


def test_pool_batch_slots_cancel_and_base_exceptions() -> None:
    """A batch fills its slots in item order; cancelled items never run; a BaseException
    raised in a pool thread reaches the waiter."""
    pool = Pool(4)
    try:
        assert pool.map_batch(square, list(range(30))).results() == [x * x for x in range(30)]
        assert pool.map_batch(square, []).results() == []

        def stop(x: int) -> int:
            if x == 2:
                raise SystemExit(3)
            return x

        with pytest.raises(SystemExit):
            pool.map_batch(stop, [1, 2, 3]).results()
        gate, ran = threading.Event(), []

        def held(x: int) -> int:
            ran.append(x)
            gate.wait(10.0)
            return x

        first = pool.map_batch(held, [1, 2, 3, 4])  # every thread busy
        later = pool.map_batch(held, [5, 6])
        later.cancel()
        gate.set()
        assert first.results() == [1, 2, 3, 4] and later.results() == [None, None]
        assert not {5, 6} & set(ran)
    finally:
        pool.shutdown(cancel_futures=True)
