"""The dask backend on a real LocalCluster: results, failures, killed workers, planning."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import pickle
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed is not installed: pip install 'amorsize[dask]'"
)
import cloudpickle  # noqa: E402 - a dependency of dask, so present whenever dask is
import dask  # noqa: E402

from amorsize import ItemFailure, execute  # noqa: E402
from amorsize.backends.base import (  # noqa: E402
    PAUSE,
    OkValues,
    Outcome,
    Pause,
    RemoteTraceback,
    Task,
    WorkerCrashedError,
    as_outcomes,
)
from amorsize.backends.dask import (  # noqa: E402
    DaskBackend,
    DaskPlan,
    current_client,
    measure_costs,
    plan,
)
from amorsize.sampling import sample  # noqa: E402

# Under --import-mode=importlib this module cannot be imported by the worker processes:
# send its functions (and the classes they use) by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="session")
def client() -> Iterator[Any]:
    """One real LocalCluster (2 worker processes, 1 thread each) for the whole session."""
    settings = {
        # An item that kills its worker is given up on after 2 deaths (default 4): the same
        # code path, half the worker restarts.
        "distributed.scheduler.allowed-failures": 1,
        # Fetching a result from a worker that has just died retries the connection until
        # this timeout (default 30 s) before dask reschedules; keeps crash tests short.
        "distributed.comm.timeouts.connect": "5s",
    }
    with dask.config.set(settings):
        cluster = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
        # Not the default client: other test files must not find a "current" dask client.
        c = distributed.Client(cluster, set_as_default=False)
        try:
            yield c
        finally:
            c.close()
            cluster.close()


@pytest.fixture
def killer(client: Any) -> Iterator[None]:
    """For tests that kill workers: wait until the nannies have restarted both."""
    yield
    client.wait_for_workers(2, timeout=60)


@pytest.fixture
def backend(client: Any) -> DaskBackend:
    """A backend on the session's cluster."""
    return DaskBackend(client)


# ---------------------------------------------------------------- functions run remotely


def square(x: int) -> int:
    return x * x


def fail_on_sevens(x: int) -> int:
    if x % 7 == 0:
        raise ValueError(f"bad item {x}")
    return x * x


def kill_once(marker: str, x: int) -> int:
    """Kill the worker the first time item 13 runs (the marker file says it happened)."""
    if x == 13 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return x * x


def kill_always(x: int) -> int:
    if x == 5:
        os._exit(3)
    return x * x


def return_lock(x: int) -> Any:
    return threading.Lock() if x == 2 else x


class TwoArgError(Exception):
    """Pickles, but cannot be unpickled (``__init__`` needs two arguments)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def raise_two_arg(x: int) -> int:
    if x == 1:
        raise TwoArgError(x, 2)
    return x


_ATTEMPTS: dict[int, int] = {}


def fail_while_marker(marker: str, x: int) -> int:
    """Fails on item 20 while the marker file exists (a crash that a fix removes)."""
    if x == 20 and os.path.exists(marker):
        raise RuntimeError("simulated crash")
    return x * x


def flaky(x: int) -> int:
    """Fails the first attempt at each item in this worker, then succeeds."""
    _ATTEMPTS[x] = _ATTEMPTS.get(x, 0) + 1
    if _ATTEMPTS[x] == 1:
        raise ConnectionError(f"transient failure on {x}")
    return x + 100


def _chunks(n: int, size: int) -> Iterator[Task]:
    for start in range(0, n, size):
        yield Task(start, list(range(start, min(n, start + size))))


def _collect(
    backend: DaskBackend, func: Callable[[Any], Any], tasks: Iterator[Task | Pause], **kw: int
) -> dict[int, Outcome]:
    """Run and index every outcome by input position; fail on any duplicate."""
    got: dict[int, Outcome] = {}
    kw.setdefault("n_jobs", 2)
    kw.setdefault("max_in_flight", 4)
    for task, outcomes in backend.run(func, tasks, **kw):
        outs = as_outcomes(outcomes)
        assert len(outs) == len(task.items)
        for i, out in enumerate(outs):
            assert task.start + i not in got, f"item {task.start + i} reported twice"
            got[task.start + i] = out
    return got


def _amorsize_futures(client: Any) -> list[str]:
    return [str(k) for k in client.futures if str(k).startswith("amorsize-")]


# ---------------------------------------------------------------- backend.run


@pytest.mark.parametrize("size", [1, 7, 64])
def test_results_equal_serial(backend: DaskBackend, size: int) -> None:
    """Every item comes back once, equal to the serial result, whatever the chunk size."""
    got = _collect(backend, square, _chunks(150, size))
    assert sorted(got) == list(range(150))
    assert all(o.ok for o in got.values())
    assert [got[i].value for i in range(150)] == [square(i) for i in range(150)]


def test_identical_chunks_are_not_merged(backend: DaskBackend) -> None:
    """Equal chunks are separate dask tasks (unique keys), each reported."""
    tasks = (Task(i, [3, 3]) for i in range(0, 40, 2))
    got = _collect(backend, square, tasks)
    assert sorted(got) == list(range(40))
    assert backend.last_run.chunks == 20


def test_lambda_and_closure_run(backend: DaskBackend) -> None:
    """cloudpickle sends lambdas and closures by value."""
    offset = 1000
    got = _collect(backend, lambda x: x + offset, _chunks(10, 3))
    assert [got[i].value for i in range(10)] == [i + 1000 for i in range(10)]


def test_empty_task_and_no_tasks(backend: DaskBackend) -> None:
    """No task yields nothing; an empty task yields an empty result."""
    assert list(backend.run(square, iter([]), n_jobs=2, max_in_flight=2)) == []
    [(task, out)] = list(backend.run(square, iter([Task(0, [])]), n_jobs=2, max_in_flight=2))
    assert task.start == 0 and list(out) == []


def test_infinite_tasks_bounded_and_cancelled_on_close(backend: DaskBackend, client: Any) -> None:
    """An endless task stream is pulled only max_in_flight ahead; close() cancels the rest."""
    pulled = itertools.count()

    def endless() -> Iterator[Task]:
        for i in itertools.count():
            next(pulled)
            yield Task(i, [i])

    gen = backend.run(square, endless(), n_jobs=2, max_in_flight=3)
    received = [next(gen) for _ in range(10)]
    gen.close()
    assert len(received) == 10
    assert next(pulled) <= 10 + 3  # never more than max_in_flight beyond what was received
    assert _amorsize_futures(client) == []


def test_pause_with_nothing_in_flight_is_an_error(backend: DaskBackend) -> None:
    """A task iterator that pauses (PAUSE) with nothing running would wait forever."""
    with pytest.raises(RuntimeError, match="paused"):
        list(backend.run(square, iter([PAUSE]), n_jobs=1, max_in_flight=2))


def test_pause_resumes_after_completion(backend: DaskBackend) -> None:
    """PAUSE from the task iterator holds dispatch until a task completes."""
    tasks = iter([Task(0, [1]), PAUSE, Task(1, [2]), PAUSE, Task(2, [3])])
    got = _collect(backend, square, tasks)
    assert [got[i].value for i in range(3)] == [1, 4, 9]


def test_item_exception_keeps_remote_traceback(backend: DaskBackend) -> None:
    """A failing item is a failed outcome whose __cause__ is the worker's traceback."""
    got = _collect(backend, fail_on_sevens, _chunks(30, 4))
    failed = sorted(i for i, o in got.items() if not o.ok)
    assert failed == [0, 7, 14, 21, 28]
    err = got[14].value
    assert isinstance(err, ValueError) and str(err) == "bad item 14"
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "fail_on_sevens" in err.__cause__.tb
    assert all(got[i].value == i * i for i in range(30) if i not in failed)


def test_unpicklable_item_fails_only_itself(backend: DaskBackend) -> None:
    """An item that cannot be pickled fails alone; its chunk neighbours run."""
    lock = threading.Lock()
    items = [1, 2, lock, 4]
    got = _collect(backend, lambda x: x, iter([Task(0, items)]))
    assert [got[i].value for i in (0, 1, 3)] == [1, 2, 4]
    assert not got[2].ok and isinstance(got[2].value, pickle.PicklingError)
    assert "cannot be pickled" in str(got[2].value)


def test_unpicklable_result_fails_only_itself(backend: DaskBackend) -> None:
    """A result that cannot be pickled back fails its item, not its chunk."""
    got = _collect(backend, return_lock, iter([Task(0, [0, 1, 2, 3])]))
    assert [got[i].value for i in (0, 1, 3)] == [0, 1, 3]
    assert not got[2].ok and "cannot be pickled" in str(got[2].value)
    assert isinstance(got[2].value.__cause__, RemoteTraceback)


def test_exception_that_cannot_be_unpickled(backend: DaskBackend) -> None:
    """An exception class that does not survive pickling is reported, not a crash."""
    got = _collect(backend, raise_two_arg, iter([Task(0, [0, 1, 2])]))
    assert got[0].value == 0 and got[2].value == 2
    assert not got[1].ok and "TwoArgError" in str(got[1].value)


def test_unpicklable_function_is_a_clear_error(backend: DaskBackend) -> None:
    """A function that cannot be pickled raises at once, naming it."""
    lock = threading.Lock()

    def holds_lock(x: int) -> int:
        with lock:
            return x

    with pytest.raises(TypeError, match="cannot be sent to dask workers") as info:
        list(backend.run(holds_lock, _chunks(3, 1), n_jobs=2, max_in_flight=2))
    assert info.value.__cause__ is not None


def test_function_not_loadable_on_worker_fails_items(backend: DaskBackend) -> None:
    """A function whose module the workers lack fails each item with a clear error."""

    class Unloadable:
        def __call__(self, x: int) -> int:
            return x

        def __reduce__(self) -> Any:
            return (functools.partial(_import_missing_module), ())

    got = _collect(backend, Unloadable(), iter([Task(0, [1, 2])]))
    assert not got[0].ok and not got[1].ok
    assert "could not be loaded on the dask worker" in str(got[0].value)


def _import_missing_module() -> Any:
    import amorsize_no_such_module  # type: ignore[import-not-found]  # noqa: F401

    return None


def test_large_chunks_are_scattered(backend: DaskBackend) -> None:
    """A chunk over SCATTER_BYTES goes to a worker directly, with the same results."""
    items = [bytes([i]) * 700_000 for i in range(3)]
    got = _collect(backend, len, iter([Task(0, items[:2]), Task(2, items[2:])]))
    assert [got[i].value for i in range(3)] == [700_000] * 3
    assert backend.last_run.scattered_chunks == 1


# ---------------------------------------------------------------- killed workers


def test_worker_killed_once_loses_nothing(
    backend: DaskBackend, tmp_path: Path, killer: None
) -> None:
    """A worker that dies mid-run: dask reruns its tasks, every item succeeds once."""
    func = functools.partial(kill_once, str(tmp_path / "killed"))
    got = _collect(backend, func, _chunks(40, 4))
    assert (tmp_path / "killed").exists()  # the worker really died
    assert sorted(got) == list(range(40))
    assert [got[i].value for i in range(40)] == [i * i for i in range(40)]
    assert backend.last_run.workers_lost >= 1
    assert "worker(s) lost" in str(backend.last_run)


def test_item_that_always_kills_is_reported(client: Any, killer: None) -> None:
    """An item that kills every worker becomes a WorkerCrashedError; the others succeed."""
    backend = DaskBackend(client)
    got = _collect(backend, kill_always, _chunks(12, 4))
    assert sorted(got) == list(range(12))
    assert not got[5].ok
    err = got[5].value
    assert isinstance(err, WorkerCrashedError)
    assert isinstance(err.__cause__, distributed.scheduler.KilledWorker)
    wrong = {i: (o.value, o.value.__cause__) for i, o in got.items() if i != 5 and not o.ok}
    assert wrong == {}
    assert all(got[i].value == i * i for i in range(12) if i != 5)
    assert backend.last_run.crashed_items == 1
    assert backend.last_run.killed_chunks >= 2  # its chunk, then the item alone


def test_crash_retries_is_validated() -> None:
    """crash_retries must be a non-negative int."""
    with pytest.raises(ValueError, match="crash_retries"):
        DaskBackend(crash_retries=-1)


# ---------------------------------------------------------------- clients


def test_current_client_is_used(client: Any) -> None:
    """Without client=, the current client is found (and none outside as_current)."""
    assert current_client() is None
    with client.as_current():
        assert current_client() is client
        assert DaskBackend().client is client
        got = _collect(DaskBackend(), square, _chunks(5, 2))
    assert [got[i].value for i in range(5)] == [0, 1, 4, 9, 16]


def test_warm_workers_counts_cluster_threads(backend: DaskBackend) -> None:
    """The cluster's threads are warm: the optimizer counts no start-up for them."""
    assert backend.warm_workers() == 2


# ---------------------------------------------------------------- plan


def _busy(seconds: float, x: int) -> int:
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return x


def test_plan_batches_tiny_items(client: Any) -> None:
    """Microsecond items are batched into far bigger tasks than 20 ms items."""
    tiny_profile = sample(square, range(200_000)).profile
    tiny = plan(tiny_profile, 200_000, client)
    slow_func = functools.partial(_busy, 0.02)
    slow = plan(sample(slow_func, range(40)).profile, 40, client)
    assert isinstance(tiny, DaskPlan) and isinstance(slow, DaskPlan)
    assert tiny.n_jobs == slow.n_jobs == 2 and tiny.processes == 2
    assert tiny.chunksize > 100 * slow.chunksize
    # A task of tiny items costs several times the scheduler's per-task overhead, or, when
    # the whole job is too small for that, there is one task per worker.
    costs = measure_costs(client)
    prof = tiny_profile  # per item on a worker: the call, loading its input, pickling its output
    item_s = prof.mean_seconds + prof.in_load_seconds + prof.out_dump_seconds
    task_s = tiny.chunksize * item_s
    assert task_s > 5 * costs.task_s or tiny.n_tasks <= tiny.processes
    for p in (tiny, slow):
        assert 0 < p.seconds < float("inf")
        assert "task" in p.reason
        assert re.search(r"\.\s+[A-Z]", p.reason) is None  # one sentence


def test_plan_balances_slow_items(client: Any) -> None:
    """Slow items are spread over several tasks per worker, none left idle."""
    p = plan(sample(functools.partial(_busy, 0.02), range(40)).profile, 40, client)
    assert p.n_tasks >= 2 * p.processes
    assert p.chunksize * p.n_tasks >= 40 - 10


def test_plan_edge_cases(client: Any) -> None:
    """Nothing left after sampling, unknown length, and unpicklable work are handled."""
    s = sample(square, range(10))
    assert plan(s.profile, s.profile.n_sampled, client).seconds == 0.0
    unknown = plan(s.profile, None, client)
    assert unknown.chunksize >= 1 and unknown.seconds > 0
    lock = threading.Lock()
    bad = sample(lambda x: (lock, x), range(5))
    ruled_out = plan(bad.profile, 1000, client)
    assert ruled_out.seconds == float("inf") and "ruled out" in ruled_out.reason


def test_costs_are_measured_once_per_scheduler(client: Any) -> None:
    """The overhead probe runs once per scheduler address; refresh=True measures again."""
    first = measure_costs(client)
    assert measure_costs(client) is first
    again = measure_costs(client, refresh=True)
    assert again is not first and again.task_s > 0 and again.bytes_per_s > 0


# ---------------------------------------------------------------- through execute


def test_execute_on_dask_equals_serial(client: Any) -> None:
    """execute(backend="dask") returns the serial results in order."""
    from amorsize import execute

    data = list(range(300))
    assert execute(square, data, backend="dask", client=client) == [x * x for x in data]
    fixed = execute(square, iter(data), backend="dask", client=client, n_jobs=2, chunksize=9)
    assert fixed == [x * x for x in data]


def test_execute_optimize_plans_for_dask(client: Any) -> None:
    """optimize(backends=("dask",)) returns a dask plan with a reason."""
    from amorsize.optimizer import optimize

    res = optimize(square, range(50_000), backends=("dask",), client=client)
    assert res.backend == "dask" and res.chunksize > 100
    assert "task" in res.reason


def test_execute_collect_mode(client: Any) -> None:
    """on_error="collect" keeps going and records each failure in its slot."""
    from amorsize import execute
    from amorsize.executor import ItemFailure

    results, run = execute(
        fail_on_sevens, range(30), backend="dask", client=client, n_jobs=2, chunksize=4,
        on_error="collect", return_plan=True,
    )  # fmt: skip
    bad = [i for i, r in enumerate(results) if isinstance(r, ItemFailure)]
    assert bad == [0, 7, 14, 21, 28]
    assert sorted(f.index for f in run.failures) == bad
    assert all(results[i] == i * i for i in range(30) if i not in bad)


def test_execute_raise_mode_keeps_traceback(client: Any) -> None:
    """on_error="raise" raises the item's error with the worker traceback as __cause__."""
    from amorsize import execute

    with pytest.raises(ValueError, match="bad item") as info:
        execute(fail_on_sevens, range(1, 30), backend="dask", client=client, n_jobs=2,
                chunksize=4)  # fmt: skip
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_execute_retry_policy(client: Any) -> None:
    """A transient failure is retried inside the dask worker and succeeds."""
    from amorsize import execute
    from amorsize.retry import RetryPolicy

    policy = RetryPolicy(max_retries=2, initial_delay=0.0, jitter=False)
    out = execute(flaky, range(20), backend="dask", client=client, n_jobs=2, chunksize=5,
                  retry=policy)  # fmt: skip
    assert out == [x + 100 for x in range(20)]


def test_execute_unordered_iter(client: Any) -> None:
    """execute_iter(ordered=False) yields every (index, result) once."""
    from amorsize import execute_iter

    out = execute_iter(square, range(100), backend="dask", client=client, n_jobs=2,
                       chunksize=8, ordered=False)  # fmt: skip
    assert dict(out) == {x: x * x for x in range(100)}


def test_outcomes_fast_path_type(backend: DaskBackend) -> None:
    """A chunk with no failure comes back as OkValues (no Outcome per item)."""
    [(_, out)] = list(backend.run(square, iter([Task(0, [1, 2])]), n_jobs=1, max_in_flight=1))
    assert type(out) is OkValues and list(out) == [1, 4]


def test_execute_checkpoint_resumes(client: Any, tmp_path: Path) -> None:
    """A dask run that dies part-way resumes from its checkpoint, skipping saved items."""
    from amorsize import Checkpoint, execute

    marker = tmp_path / "crash"
    marker.touch()
    func = functools.partial(fail_while_marker, str(marker))
    path = tmp_path / "run.db"
    kw: dict[str, Any] = {"backend": "dask", "client": client, "n_jobs": 2, "chunksize": 5}
    with pytest.raises(RuntimeError, match="simulated crash"):
        execute(func, range(60), checkpoint=path, **kw)
    saved = len(Checkpoint(path))
    assert 0 < saved < 60
    marker.unlink()
    results, run = execute(func, range(60), checkpoint=path, return_plan=True, **kw)
    assert results == [x * x for x in range(60)]
    assert run.skipped == saved


def test_execute_dead_letter_queue(client: Any, tmp_path: Path) -> None:
    """Items that fail on dask workers land in the dead-letter queue with their traceback."""
    from amorsize import DeadLetterQueue, ItemFailure, execute

    dlq = DeadLetterQueue(tmp_path / "failed.db")
    out = execute(fail_on_sevens, range(30), backend="dask", client=client, n_jobs=2,
                  chunksize=4, dead_letter=dlq)  # fmt: skip
    assert [i for i, r in enumerate(out) if isinstance(r, ItemFailure)] == [0, 7, 14, 21, 28]
    entries = sorted(dlq, key=lambda e: e.index)
    assert [e.index for e in entries] == [0, 7, 14, 21, 28]
    assert [e.item for e in entries] == [0, 7, 14, 21, 28]
    assert all("fail_on_sevens" in e.traceback for e in entries)


def always_fails(x: int) -> int:
    raise ConnectionError(f"service down ({x})")


def test_execute_circuit_breaker_stops_dispatch(client: Any) -> None:
    """An open breaker stops dispatch to the cluster; items never sent are reported."""
    from amorsize import CircuitBreakerPolicy, CircuitOpenError, ItemFailure, execute

    out = execute(
        always_fails, range(200), backend="dask", client=client, n_jobs=2, chunksize=1,
        on_error="collect", circuit_breaker=CircuitBreakerPolicy(failure_threshold=3),
    )  # fmt: skip
    assert all(isinstance(r, ItemFailure) for r in out)
    never = [r for r in out if isinstance(r.exception, CircuitOpenError)]
    assert never and all(r.attempts == 0 for r in never)
    assert len(never) > 150  # only the first few items (and those in flight) were sent


def client_seen_in_task(x: int) -> bool:
    return current_client() is None and x == 1


def test_no_current_client_inside_a_task(backend: DaskBackend) -> None:
    """func running on a worker never sees a "current" client (no nested submission)."""
    got = _collect(backend, client_seen_in_task, iter([Task(0, [1])]))
    assert got[0].value is True


def test_execute_survives_killed_worker(client: Any, tmp_path: Path, killer: None) -> None:
    """Through execute: a worker dies mid-run, the results are still complete and in order."""
    from amorsize import execute

    func = functools.partial(kill_once, str(tmp_path / "killed"))
    out = execute(func, range(40), backend="dask", client=client, n_jobs=2, chunksize=4)
    assert (tmp_path / "killed").exists()
    assert out == [x * x for x in range(40)]


def test_execute_iter_infinite_generator_ordered(client: Any) -> None:
    """Ordered streaming from an endless generator; stopping early cancels the rest."""
    from amorsize import execute_iter

    it = execute_iter(square, itertools.count(), backend="dask", client=client, n_jobs=2,
                      chunksize=5)  # fmt: skip
    first = list(itertools.islice(it, 50))
    it.close()  # type: ignore[attr-defined]
    assert first == [x * x for x in range(50)]
    assert _amorsize_futures(client) == []


class ItemFromMissingModule:
    """Pickles by reference to this test module, which the workers cannot import."""

    def __reduce__(self) -> Any:
        return (_import_missing_module, ())


def test_item_not_loadable_on_worker_fails_alone(backend: DaskBackend) -> None:
    """issue 12 item 8: an item the workers cannot load fails alone, never run; its chunk runs."""
    got = _collect(backend, repr, iter([Task(0, [1, ItemFromMissingModule(), 2])]))
    assert [got[0].value, got[2].value] == ["1", "2"]
    err = got[1].value
    assert not got[1].ok and got[1].attempts == 0
    assert isinstance(err, pickle.UnpicklingError)
    assert str(err).startswith("item 1 cannot be unpickled on the dask worker")
    assert isinstance(err.__cause__, RemoteTraceback)


class HalfReduced:
    """Its ``__reduce__`` forgets an argument its ``__init__`` needs: pickles, does not load."""

    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b

    def __reduce__(self) -> Any:
        return (HalfReduced, (self.a,))


class LoadsBadly:
    """Pickles anywhere, raises wherever it is unpickled."""

    def __reduce__(self) -> Any:
        return (int, ("not a number",))


class Unpicklable:
    """Cannot be pickled, and its repr raises too."""

    def __reduce__(self) -> Any:
        raise TypeError("not picklable")

    def __repr__(self) -> str:
        raise RuntimeError("repr is broken")


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


BAD_RESULTS: dict[str, Callable[[], Any]] = {
    "exception as a value": lambda: TwoArgError(1, 2),
    "init needs more than reduce gives": lambda: HalfReduced(1, 2),
    "reduce fails on load": LoadsBadly,
    "nested in a good value": lambda: {"ok": [1, 2], "bad": (LoadsBadly(),)},
    "unpicklable, repr raises": Unpicklable,
    "nested 100,000 deep": lambda: _nested(100_000),
}


def bad_on_three(kind: str, x: int) -> Any:
    if x == 3:
        return BAD_RESULTS[kind]()
    if x == 5:
        raise KeyError(x)
    return x * 10


@pytest.mark.parametrize("kind", sorted(BAD_RESULTS))
def test_result_that_does_not_travel_fails_alone(client: Any, kind: str) -> None:
    """issue 12 items 7 and 8: a result that does not pickle or load fails alone, by index."""
    out = execute(
        functools.partial(bad_on_three, kind),
        range(8),
        backend="dask",
        client=client,
        n_jobs=2,
        chunksize=4,
        on_error="collect",
    )
    assert [o for i, o in enumerate(out) if i not in (3, 5)] == [0, 10, 20, 40, 60, 70]
    assert isinstance(out[5], ItemFailure) and isinstance(out[5].exception, KeyError)
    bad = out[3]
    assert isinstance(bad, ItemFailure) and bad.attempts == 1
    assert isinstance(bad.exception, pickle.PickleError)
    assert str(bad.exception).startswith("item 3")
    assert "cannot be unpickled" in str(bad.exception) or "cannot be pickled" in str(
        bad.exception
    )


def test_result_that_does_not_unpickle_raises_in_raise_mode(client: Any) -> None:
    """issue 12 item 7: in raise mode the item's own error is raised, naming the item."""
    with pytest.raises(pickle.UnpicklingError, match=r"^item 3: .*HalfReduced\(1\)"):
        execute(
            functools.partial(bad_on_three, "init needs more than reduce gives"),
            range(4),
            backend="dask",
            client=client,
            n_jobs=2,
            chunksize=4,
        )


def test_interrupt_cancels_pending_tasks(backend: DaskBackend, client: Any) -> None:
    """Ctrl-C (KeyboardInterrupt) mid-run propagates and leaves nothing on the cluster."""

    def tasks() -> Iterator[Task]:
        yield from _chunks(20, 2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        for _ in backend.run(functools.partial(_busy, 0.01), tasks(), n_jobs=2, max_in_flight=4):
            pass
    assert _amorsize_futures(client) == []


def test_embedded_local_cluster_without_client() -> None:
    """With no client given or current, a LocalCluster is started, used and closed."""
    from amorsize.backends import dask as dask_backend

    assert current_client() is None
    backend = DaskBackend()
    try:
        got = _collect(backend, square, _chunks(6, 3))
        assert [got[i].value for i in range(6)] == [0, 1, 4, 9, 16, 25]
        embedded = backend.client
        assert embedded is dask_backend._EMBEDDED["client"]
        assert backend.warm_workers() >= 1
    finally:
        backend.close()
    assert "client" not in dask_backend._EMBEDDED
    assert embedded.status in ("closed", "closing")


def test_plan_for_a_cluster_without_workers() -> None:
    """No workers: the plan says so at once (infinite time) instead of waiting for one."""
    with (
        distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cl,
        distributed.Client(cl, set_as_default=False) as c,
    ):
        p = plan(sample(square, range(1000)).profile, 1000, c)
    assert p.seconds == float("inf") and "no workers" in p.reason
