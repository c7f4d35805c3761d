"""Sampling: counts, timing without distortion, sizes, errors and data kept intact."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amorsize import sampling
from amorsize.backends import get_backend
from amorsize.executor import _remote_sampler, _sample_tasks
from amorsize.sampling import (
    MAX_SAMPLE_ITEMS,
    ProbeRound,
    Profile,
    SampledFailure,
    TimedCall,
    probe_overlap,
    sample,
)


def double(x: int) -> int:
    return 2 * x


def fail_on_three(x: int) -> int:
    if x == 3:
        msg = "bad item 3"
        raise ValueError(msg)
    return x


def short_sleep(x: int) -> int:
    time.sleep(0.002)  # a real wait is the point: CPU time well below wall time
    return x


def is_tracing(_: Any) -> bool:
    return tracemalloc.is_tracing()


def make_lock(_: Any) -> threading.Lock:
    return threading.Lock()


class Counter:
    """An iterator that counts how many items were drawn from it."""

    def __init__(self, it: Iterator[int]) -> None:
        self.it = it
        self.drawn = 0

    def __iter__(self) -> Counter:
        return self

    def __next__(self) -> int:
        value = next(self.it)
        self.drawn += 1
        return value


def test_list_is_returned_as_is() -> None:
    """A list comes back as the same object; results are func of the first items."""
    data = list(range(50))
    s = sample(double, data)
    assert s.data is data
    assert s.results == tuple(double(x) for x in data[: len(s.results)])
    assert s.profile.n_sampled == len(s.results) == len(s.profile.item_seconds)
    assert s.profile.n_items == 50


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(), max_size=60), st.integers(min_value=1, max_value=80))
def test_generator_is_preserved_exactly(items: list[int], k: int) -> None:
    """A generator's sampled items are chained back: nothing lost, nothing repeated."""
    s = sample(double, (x for x in items), sample_size=k)
    assert list(s.data) == items
    assert s.results == tuple(double(x) for x in items[:k])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(), max_size=60))
def test_adaptive_sample_preserves_iterators(items: list[int]) -> None:
    """With the adaptive count too, iterators come back whole and in order."""
    s = sample(double, iter(items))
    assert list(s.data) == items
    assert s.results == tuple(double(x) for x in items[: s.profile.n_sampled])


@pytest.mark.parametrize("k", [1, 7, None])
def test_infinite_generator_not_consumed_beyond_sample(k: int | None) -> None:
    """Only the sampled items are drawn from an infinite iterator."""
    counter = Counter(itertools.count())
    s = sample(double, counter, sample_size=k)
    assert counter.drawn == s.profile.n_sampled
    assert s.profile.n_items is None and not s.profile.exhausted
    assert s.profile.n_sampled <= (k or MAX_SAMPLE_ITEMS)
    head = list(itertools.islice(s.data, s.profile.n_sampled + 3))
    assert head == list(range(s.profile.n_sampled + 3))


@pytest.mark.parametrize("data", [[], (), iter([]), (x for x in ()), range(0), set()])
def test_empty_data(data: Any) -> None:
    """Empty data samples nothing, is marked exhausted and stays empty."""
    s = sample(double, data)
    assert s.profile.n_sampled == 0 and s.results == ()
    assert s.profile.exhausted
    assert list(s.data) == []
    assert s.profile.mean_seconds == 0.0


@pytest.mark.parametrize("make", [list, tuple, iter, lambda x: (i for i in x)])
def test_data_shorter_than_sample(make: Any) -> None:
    """Fewer items than sample_size: all are sampled, the data is exhausted."""
    s = sample(double, make([1, 2, 3]), sample_size=10)
    assert s.results == (2, 4, 6)
    assert s.profile.exhausted and s.profile.n_items == 3
    assert list(s.data) == [1, 2, 3]


def test_single_item() -> None:
    """A single item is sampled and nothing remains."""
    s = sample(double, [21])
    assert s.results == (42,) and s.profile.exhausted


def test_reiterable_non_sequence_is_returned_as_is() -> None:
    """A set (iterable, sized, not a sequence) comes back as itself."""
    data = {1, 2, 3}
    s = sample(double, data, sample_size=2)
    assert s.data is data
    assert s.results == tuple(double(x) for x in list(data)[:2])


@pytest.mark.parametrize("make", [list, iter])
def test_function_raising_is_recorded(make: Any) -> None:
    """The failing item's index and exception are kept; results stop before it."""
    s = sample(fail_on_three, make(range(10)), sample_size=8)
    p = s.profile
    assert p.error_index == 3
    assert isinstance(p.error, ValueError) and "bad item 3" in str(p.error)
    assert s.results == (0, 1, 2)
    assert list(s.data) == list(range(10))


def test_no_tracemalloc_around_calls() -> None:
    """Timed calls run without tracemalloc (it distorts timing many times over)."""
    s = sample(is_tracing, range(20), sample_size=20)
    assert s.results == (False,) * 20


def test_budget_stops_early() -> None:
    """A zero budget samples exactly one item."""
    s = sample(double, list(range(1000)), budget_s=0.0)
    assert s.profile.n_sampled == 1


def test_fast_items_get_many_samples() -> None:
    """Microsecond items are sampled many times (for a stable mean), up to the cap."""
    s = sample(double, range(10**7))
    assert 100 <= s.profile.n_sampled <= MAX_SAMPLE_ITEMS


def test_cpu_ratio_tells_waiting_from_working() -> None:
    """Sleeping items read as waiting, busy items do not."""
    sleepy = sample(short_sleep, range(3), sample_size=3).profile
    busy = sample(sum, [range(20_000)] * 30, sample_size=30).profile
    # Not ``cpu_ratio``: it is the whole process's CPU over wall time, and threads that
    # earlier tests left running (a Dask cluster's) lifted it to 0.8 over these 6 ms in a
    # CI run. The waiting share reads the calling thread's own clock around each call.
    assert sleepy.wait_fraction > 0.5
    # A busy machine may preempt the busy work (low CPU/wall), but it never blocks.
    assert busy.wait_fraction < 0.5
    assert sleepy.mean_seconds >= 0.002


def test_sizes_are_measured() -> None:
    """Pickled input and output sizes per item match pickle's view."""
    data = [bytes([i]) * 10_000 for i in range(4)]  # distinct: pickle memoises repeats
    s = sample(bytes.upper, data, sample_size=4)
    p = s.profile
    assert 10_000 <= p.in_bytes <= 10_000 + 100
    assert 10_000 <= p.out_bytes <= 10_000 + 100
    assert p.func_picklable and p.items_picklable and p.outputs_picklable and p.picklable
    assert p.func_bytes == len(pickle.dumps(bytes.upper, pickle.HIGHEST_PROTOCOL))


def test_huge_item() -> None:
    """A 64 MB item is sized, and its memory counted at least as its output."""
    big = bytes(64 << 20)
    s = sample(bytes.upper, [big], sample_size=1)
    assert s.profile.in_bytes >= 64 << 20
    assert s.profile.mem_per_item >= 64 << 20


def test_lambda_is_picklable_via_cloudpickle() -> None:
    """Lambdas are sent with cloudpickle, so they count as picklable."""
    pytest.importorskip("cloudpickle")
    # A fixed size: an adaptive sample of so few items may stop after one on a busy machine.
    s = sample(lambda x: x + 1, [1, 2], sample_size=2)
    assert s.profile.func_picklable and s.results == (2, 3)


def test_unpicklable_closure_is_reported() -> None:
    """A function closing over a lock cannot go to a process: said clearly."""
    lock = threading.Lock()

    def locked(x: int) -> int:
        with lock:
            return x

    p = sample(locked, [1, 2]).profile
    assert not p.func_picklable and not p.picklable
    assert p.pickle_error is not None and "function cannot be pickled" in p.pickle_error


def test_unpicklable_item_is_named() -> None:
    """The first unpicklable item is named by index and type."""
    data: list[Any] = [1, 2, threading.Lock(), 4]
    p = sample(id, data, sample_size=4).profile  # every item, however busy the machine
    assert not p.items_picklable
    assert p.pickle_error is not None and "item 2" in p.pickle_error and "lock" in p.pickle_error


def test_unpicklable_output_is_named() -> None:
    """Results that cannot be pickled are reported (they could not come back)."""
    p = sample(make_lock, [1, 2]).profile
    assert not p.outputs_picklable
    assert p.pickle_error is not None and "result 0" in p.pickle_error


def test_profile_is_frozen() -> None:
    """Profiles are immutable records."""
    p: Profile = sample(double, [1]).profile
    with pytest.raises(AttributeError):
        p.n_sampled = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- failures as data
def fail_on_even(x: int) -> int:
    if x % 2 == 0:
        msg = f"bad {x}"
        raise ValueError(msg)
    return x


@pytest.mark.parametrize("make", [list, iter])
def test_keep_going_keeps_failures_as_data_points(make: Any) -> None:
    """issue 12 item 10: keep_going samples on past failures; each stays in its slot, timed."""
    s = sample(fail_on_even, make(range(10)), sample_size=6, keep_going=True)
    p = s.profile
    assert [type(r) for r in s.results] == [SampledFailure, int] * 3
    assert [str(r.exception) for r in s.results[::2]] == ["bad 0", "bad 2", "bad 4"]
    assert s.results[1::2] == (1, 3, 5)
    assert p.n_sampled == 6 and p.n_failed == 3 and len(p.item_seconds) == 6
    assert p.error_index == 0 and not p.stopped_on_error
    assert list(s.data) == list(range(10))


def test_stop_mode_keeps_the_failure_out_of_the_results() -> None:
    """Without keep_going the sample stops at the failure, which the profile names."""
    p = sample(fail_on_even, [1, 3, 4, 5], sample_size=4).profile
    assert p.stopped_on_error and p.error_index == 2 and p.n_sampled == 2


def test_index_of_names_the_input_index() -> None:
    """issue 12 item 13: a sample of a stream that skips items names the real input index."""
    p = sample(fail_on_three, [5, 3, 7], sample_size=3, index_of=lambda k: k + 100).profile
    assert p.error_index == 101


# --------------------------------------------------------------------------- where items run
def test_timed_call_measures_and_returns_failures_as_values() -> None:
    """A worker's timed call returns its outcome and costs; failures keep their traceback."""
    call = TimedCall(fail_on_three, stop=True)
    ok, value, tb, seconds, cpu, *_ = call(2)
    assert (ok, value, tb) == (True, 2, "") and seconds >= 0 and cpu >= 0
    ok, value, tb, *_ = call(3)
    assert not ok and isinstance(value, ValueError) and "fail_on_three" in tb
    assert call(4) is None  # stop: nothing runs after a failure
    fresh = pickle.loads(pickle.dumps(call))
    assert fresh(4)[:2] == (True, 4)


def test_timed_call_stops_at_its_budget() -> None:
    """Items after the time budget are not run, so a batch cannot outlast the sample."""
    call = TimedCall(short_sleep, stop=False, budget_s=0.001)
    assert call(1) is not None and call(2) is None


def test_offload_moves_the_rest_of_the_sample_to_a_worker() -> None:
    """issue 12 item 3: the first item runs in the caller, the rest in a real worker."""
    runner = _remote_sampler(get_backend("processes"), short_sleep, stop=True)
    s = sample(short_sleep, list(range(10)), sample_size=5, remote=runner,
               offload=lambda mean, n, weigh: True)
    assert s.results == (0, 1, 2, 3, 4)
    assert s.profile.in_caller == 1 and s.profile.n_sampled == 5
    assert s.profile.mean_seconds >= 0.002


def item_and_pid(x: int) -> tuple[int, int]:
    if x == 0:
        time.sleep(0.002)  # the sample moves to workers only after 1 ms of it
    return x, os.getpid()


def test_an_offloaded_batch_is_shared_by_the_workers() -> None:
    """With ``workers=2`` the batch runs as two runs of items in two real worker processes,
    and the results keep data order."""
    runner = _remote_sampler(get_backend("processes"), item_and_pid, stop=True, workers=2)
    s = sample(item_and_pid, list(range(20)), sample_size=9, remote=runner,
               offload=lambda mean, n, weigh: True)
    assert [x for x, _ in s.results] == list(range(9))
    pids = [pid for _, pid in s.results[1:]]  # the first item ran in the caller
    assert s.results[0][1] == os.getpid() and os.getpid() not in pids
    assert pids == sorted(pids, key=pids.index) and len(set(pids)) == 2  # two runs


@pytest.mark.parametrize(("n", "workers", "sizes"), [
    (1, 4, [1]), (3, 2, [1, 2]), (8, 4, [2, 2, 2, 2]), (9, 1, [9]), (5, 0, [5]),
])  # fmt: skip
def test_sample_tasks_cut_consecutive_runs(n: int, workers: int, sizes: list[int]) -> None:
    """Up to ``workers`` tasks of near-equal size, in order, covering every item once."""
    tasks = _sample_tasks(7, list(range(n)), workers)
    assert [len(t.items) for t in tasks] == sizes
    assert [x for t in tasks for x in t.items] == list(range(n))
    assert [t.start for t in tasks] == [7 + sum(sizes[:k]) for k in range(len(sizes))]


def test_no_offload_keeps_the_sample_in_the_caller() -> None:
    """While offload says no, every sampled item runs in the caller (no worker needed)."""
    def runner(first: int, items: list[Any], budget: float) -> list[Any]:
        raise AssertionError("no item may go to a worker")

    s = sample(double, list(range(50)), remote=runner, offload=lambda mean, n, weigh: False)
    assert s.profile.in_caller == s.profile.n_sampled == 50


@pytest.mark.parametrize(
    ("item", "low", "high"),
    [(b"x" * 1000, 1000, 1100), (threading.Lock(), math.inf, math.inf)],
    ids=["bytes", "unpicklable"],
)
def test_the_offload_rule_weighs_the_first_item_and_its_result(
    item: Any, low: float, high: float
) -> None:
    """What the rule is told one item moves: the first item and its result, pickled once
    (inf when they cannot travel)."""
    weighed: list[float] = []

    def rule(mean: float, n: int, weigh: Any) -> bool:
        weighed.extend((weigh(), weigh()))
        return False

    # Asked from 1 ms of work on: 30 items of a few hundred microseconds.
    sample(lambda x: python_loop(3), [item] * 50, sample_size=30, remote=lambda *a: [],
           offload=rule)
    assert weighed and low <= weighed[0] <= high and len(set(weighed)) == 1


_CRASH_SCRIPT = """
import json, os, signal, sys
import amorsize.optimizer
from amorsize import ItemFailure, WorkerCrashedError, execute
from amorsize.system import SystemInfo

CRASH_AT = int(sys.argv[2])

def work(x):
    if x == CRASH_AT:
        if sys.argv[3] == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        os._exit(7)
    s = 0
    for i in range(100_000):  # a few ms: over the 1 ms after which the sample may move
        s += i
    return x

if __name__ == "__main__":
    # Injected machine facts: a 2-core machine, whatever runs the test.
    facts = amorsize.optimizer.get_system_info()
    facts = SystemInfo(**{**facts.__dict__, "usable_cores": 2.0, "process_startup_s": 5e-3,
                          "process_startup_per_worker_s": 2e-3, "process_roundtrip_s": 5e-5})
    amorsize.optimizer.get_system_info = lambda: facts
    if sys.argv[4] == "unprobed":  # CPU items the two-thread probe skips (see the test)
        amorsize.sampling.PROBE_MIN_ITEM_S = float("inf")
    else:  # probed even where a busy machine makes them read as half waiting
        amorsize.sampling._PROBE_MAX_WAIT = 1.01
    backend = sys.argv[1]
    out = {}
    results, plan = execute(work, range(100), backend=backend, on_error="collect",
                            return_plan=True)
    out["failed"] = [[f.index, type(f.exception).__name__] for f in plan.failures]
    out["ok"] = sum(1 for r in results if not isinstance(r, ItemFailure))
    out["in_caller"] = plan.optimization.profile.in_caller
    out["probed"] = plan.optimization.profile.thread_overlap == plan.optimization.profile.thread_overlap
    out["backend"] = plan.backend
    try:
        execute(work, range(100), backend=backend)
    except WorkerCrashedError as exc:
        out["raised"] = str(exc)
    print(json.dumps(out))
"""


@pytest.mark.parametrize("how", ["exit", "segv"])
@pytest.mark.parametrize(
    ("backend", "crash_at", "probe"),
    [
        ("processes", 0, "unprobed"),  # every sampled item runs in a worker
        ("auto", 1, "unprobed"),  # the first item (1 ms of work) runs here, the rest there
        ("auto", 60, "probed"),  # ... and so do the two-thread probe's items, before them
    ],
)
def test_crash_in_a_sampled_item_is_reported_not_fatal(
    tmp_path: Path, backend: str, crash_at: int, probe: str, how: str
) -> None:
    """issue 12 item 3: a sampled item that kills its process is a WorkerCrashedError."""
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(_CRASH_SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), backend, str(crash_at), how, probe],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["failed"] == [[crash_at, "WorkerCrashedError"]]
    assert out["ok"] == 99 and out["probed"] is (probe == "probed")
    # The items before the crash that ran here: none, the first one, the probe's too.
    assert (out["in_caller"] == 0) is (backend == "processes")
    assert (out["in_caller"] == 1) is (probe == "unprobed" and backend == "auto")
    # The rest never runs in the caller, where another crash would end it.
    assert out["backend"] == "processes"
    assert "worker process died" in out["raised"]


_MAIN_LOCK_SCRIPT = """
import json, threading
import amorsize.optimizer
from amorsize import execute
from amorsize.sampling import sample
from amorsize.system import SystemInfo

LOCK = threading.Lock()

def work(x):
    with LOCK:  # cloudpickle sends __main__ functions by value: the lock cannot travel
        s = 0
        for i in range(100_000):
            s += i
    return x

if __name__ == "__main__":
    facts = amorsize.optimizer.get_system_info()
    facts = SystemInfo(**{**facts.__dict__, "usable_cores": 2.0, "process_startup_s": 5e-3,
                          "process_startup_per_worker_s": 2e-3, "process_roundtrip_s": 5e-5})
    amorsize.optimizer.get_system_info = lambda: facts
    picklable = sample(work, [1, 2], sample_size=2).profile.func_picklable
    results, plan = execute(work, range(200), return_plan=True)
    print(json.dumps([picklable, results == list(range(200)), plan.backend]))
"""


def test_main_function_that_cannot_travel_is_sampled_and_run_here(tmp_path: Path) -> None:
    """A __main__ function over a lock: not picklable as the workers get it; auto stays here."""
    pytest.importorskip("cloudpickle")
    script = tmp_path / "lock.py"
    script.write_text(textwrap.dedent(_MAIN_LOCK_SCRIPT))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    picklable, correct, backend = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not picklable and correct and backend != "processes"


# --------------------------------------------------------------------------- the two-thread probe
def python_loop(x: int) -> int:
    """Pure-Python CPU work (holds the GIL), a few hundred microseconds."""
    s = 0
    for i in range(10_000):
        s += i
    return s + x


class Recorder:
    """``python_loop`` that records which thread ran which item. Once the probe's helper
    thread exists, the main thread's items wait until it has run one: else the caller
    (holding the GIL) may run a whole round before the helper wakes."""

    def __init__(self, fail_off_main: bool = False) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fail_off_main = fail_off_main
        self.helper_ran = threading.Event()

    def __call__(self, x: int) -> int:
        self.calls.append((x, threading.get_ident()))
        if threading.current_thread() is not threading.main_thread():
            self.helper_ran.set()
            if self.fail_off_main:
                msg = f"item {x} off the main thread"
                raise RuntimeError(msg)
        elif not self.helper_ran.is_set() and any(
            t.name == "amorsize-probe" for t in threading.enumerate()
        ):
            assert self.helper_ran.wait(30.0), "the probe's helper never ran an item"
        return python_loop(x)


@pytest.fixture
def cpu_work_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU items are probed even when a busy machine makes them read as half waiting (the
    thread descheduled): these tests are about the probe, not about when it runs."""
    monkeypatch.setattr(sampling, "_PROBE_MAX_WAIT", 1.01)


@pytest.mark.usefixtures("cpu_work_is_probed")
def test_probe_runs_two_threads_and_keeps_every_result() -> None:
    """Probed items ran once each, on two threads; results stay a prefix, data intact."""
    rec = Recorder()
    s = sample(rec, range(5000), cores=2, probe_threads=True)
    p = s.profile
    assert 0.0 <= p.thread_overlap <= 1.0
    assert len({ident for _, ident in rec.calls}) == 2
    assert sorted(x for x, _ in rec.calls) == list(range(p.n_sampled))
    assert s.results == tuple(python_loop(x) for x in range(p.n_sampled))
    assert p.n_sampled > len(p.item_seconds) and p.in_caller == p.n_sampled
    assert list(s.data) == list(range(5000))


@pytest.mark.usefixtures("cpu_work_is_probed")
def test_probe_sees_that_python_holds_the_gil() -> None:
    """A pure-Python loop never looks GIL-free (a busy machine only lowers the reading)."""
    assert sample(python_loop, range(5000), cores=2, probe_threads=True).profile.thread_overlap < 0.5


@pytest.mark.parametrize(
    ("func", "kw"),
    [
        (python_loop, {"probe_threads": False}),
        (python_loop, {"sample_size": 20}),
        (python_loop, {"cores": 1.0}),
        (short_sleep, {}),  # known to wait: threads overlap it anyway
        (double, {}),  # too small for threads to pay
    ],
)
def test_probe_only_where_it_can_tell_something(func: Any, kw: dict[str, Any]) -> None:
    """No probe unless asked, for a fixed sample, on one core, for waiting or tiny items."""
    kw = {"cores": 2.0, "probe_threads": True, **kw}
    assert math.isnan(sample(func, range(5000), **kw).profile.thread_overlap)


def test_probe_is_skipped_when_few_items_are_left() -> None:
    """A probe must cost little beside the run: not on a short job."""
    p = sample(python_loop, range(12), cores=2, probe_threads=True).profile
    assert math.isnan(p.thread_overlap) and p.n_sampled == len(p.item_seconds)


@pytest.mark.usefixtures("cpu_work_is_probed")
def test_probe_failure_stops_the_sample_there() -> None:
    """A failure on the probe's second thread ends the sample at that item, as in a run."""
    rec = Recorder(fail_off_main=True)
    s = sample(rec, range(5000), cores=2, probe_threads=True)
    p = s.profile
    assert p.stopped_on_error and p.error_index == p.n_sampled
    assert isinstance(p.error, RuntimeError) and math.isnan(p.thread_overlap)
    assert s.results == tuple(python_loop(x) for x in range(p.n_sampled))
    assert list(s.data) == list(range(5000))


@pytest.mark.usefixtures("cpu_work_is_probed")
def test_probe_failures_are_data_points_when_keeping_going() -> None:
    """With keep_going every probed item keeps its slot: the failures as SampledFailure."""
    rec = Recorder(fail_off_main=True)
    s = sample(rec, range(5000), cores=2, probe_threads=True, keep_going=True)
    failed = [k for k, r in enumerate(s.results) if type(r) is SampledFailure]
    assert failed and s.profile.n_failed == len(failed)
    assert sorted(x for x, _ in rec.calls) == list(range(s.profile.n_sampled))


BOTH = ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0))  # busy all along
GIL = ((0.0, 0.0), (0.5, 0.25), (1.0, 0.5))  # busy half the time


@pytest.mark.parametrize(
    ("rounds", "expected"),
    [
        ([ProbeRound(BOTH, BOTH)], 1.0),  # both busy at once: they overlapped fully
        ([ProbeRound(GIL, GIL)], 0.0),  # the GIL: no more CPU than wall time together
        # The helper started late: only the time both ran counts, and in it they overlapped.
        ([ProbeRound(BOTH, ((0.5, 0.0), (0.75, 0.25), (1.0, 0.5)))], 1.0),
        # CPU outside the shared window never counts: here the helper ran before it.
        ([ProbeRound(((1.0, 0.0), (2.0, 1.0)), ((0.0, 0.0), (1.0, 1.0)))], 0.0),
        # A busy machine gave two cores in one round only: the best round counts.
        ([ProbeRound(GIL, GIL), ProbeRound(BOTH, ((0.0, 0.0), (0.5, 0.25), (1.0, 0.75)))], 0.75),
        # The helper woke late and the caller's end cut its last item: that item counts
        # whole (the window widened to 1.7), not 0.43 from the cut window alone.
        (
            [ProbeRound(((0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (1.6, 1.6)),
                        ((0.9, 0.0), (1.3, 0.4), (1.7, 0.8)))],
            0.75,
        ),
        ([], math.nan),
    ],
)
def test_probe_overlap_rule(rounds: list[ProbeRound], expected: float) -> None:
    """The probe's reading from injected clocks: CPU beyond wall time, best round."""
    got = probe_overlap(rounds)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_probe_takes_rounds_within_its_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to PROBE_ROUNDS rounds of at least four items a side, every result kept."""
    monkeypatch.setattr(sampling, "_PROBE_MAX_WAIT", 1.01)  # as cpu_work_is_probed
    seen: list[list[ProbeRound]] = []
    real = sampling.probe_overlap

    def spy(rounds: Any) -> float:
        seen.append(list(rounds))
        return real(seen[-1])

    monkeypatch.setattr(sampling, "probe_overlap", spy)
    s = sample(python_loop, range(20_000), cores=2, probe_threads=True)
    assert seen and 1 <= len(seen[-1]) <= sampling.PROBE_ROUNDS + sampling._PROBE_RERUNS
    # Each thread's start, then one reading per item: 8+ items a round.
    assert all(len(r.caller) + len(r.helper) >= 10 for r in seen[-1])
    assert s.results == tuple(python_loop(x) for x in range(s.profile.n_sampled))


# --------------------------------------------------------------------------- spilling waits
class GatedWait:
    """Item 0 waits (blocked, no CPU) until ``need`` other items have started: possible
    only if they start while it waits. ``fail`` items raise."""

    def __init__(self, need: int, fail: frozenset[int] = frozenset()) -> None:
        self.need, self.fail = need, fail
        self.started: list[int] = []
        self.threads: set[int] = set()
        self.lock = threading.Lock()
        self.all_in = threading.Event()

    def __call__(self, x: int) -> int:
        with self.lock:
            self.threads.add(threading.get_ident())
            if x:
                self.started.append(x)
                if len(self.started) >= self.need:
                    self.all_in.set()
        if x == 0:
            assert self.all_in.wait(30.0), "the next items never started beside item 0"
        if x in self.fail:
            msg = f"item {x} fails"
            raise ValueError(msg)
        return x * 10


@pytest.fixture
def spill() -> Any:
    return get_backend("threads").spill_runner()


def test_waiting_first_item_spills_the_next_items_onto_threads(spill: Any) -> None:
    """While item 0 waits, the next ones run beside it on threads; all are kept in order."""
    func = GatedWait(need=29)
    s = sample(func, list(range(30)), spill=spill)
    assert s.results == tuple(x * 10 for x in range(30))
    assert sorted(func.started) == list(range(1, 30)) and len(func.threads) >= 2
    p = s.profile
    assert p.n_sampled == 30 and p.exhausted and p.in_caller == 30 and p.on_threads == 29
    assert len(p.item_seconds) == 30  # each spilled item was timed on its thread


def test_spill_is_capped(spill: Any) -> None:
    """At most ``spill_items`` items join the first one."""
    func = GatedWait(need=5)
    s = sample(func, list(range(40)), spill=spill, spill_items=5)
    assert s.results[:6] == tuple(x * 10 for x in range(6))
    assert list(s.data) == list(range(40))


def test_failure_among_spilled_items_stops_the_sample_there(spill: Any) -> None:
    """Raise mode: results stay the prefix before the failed item; the data is intact."""
    s = sample(GatedWait(need=9, fail=frozenset({5})), list(range(10)), spill=spill)
    p = s.profile
    assert s.results == (0, 10, 20, 30, 40)
    assert p.stopped_on_error and p.error_index == 5 and isinstance(p.error, ValueError)
    assert list(s.data) == list(range(10))


def test_failed_first_item_drops_the_spilled_results(spill: Any) -> None:
    """The first item failed after the next ones started: the sample stops at it."""
    s = sample(GatedWait(need=9, fail=frozenset({0})), list(range(10)), spill=spill)
    assert s.results == () and s.profile.error_index == 0
    assert list(s.data) == list(range(10))


def test_spilled_failures_are_data_points_when_keeping_going(spill: Any) -> None:
    """keep_going: each spilled failure keeps its slot as a SampledFailure."""
    s = sample(GatedWait(need=9, fail=frozenset({3, 7})), list(range(10)), spill=spill,
               keep_going=True)
    failed = [k for k, r in enumerate(s.results) if type(r) is SampledFailure]
    assert failed == [3, 7] and s.profile.n_failed == 2 and s.profile.n_sampled == 10


def first_waits(x: int) -> int:
    """Item 0 blocks for 20 ms (long enough to be seen waiting), the others not at all."""
    if x == 0:
        threading.Event().wait(0.02)
    return x


class SpillSpy:
    """A spill runner that records whether it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, call: Any, items: list[Any]) -> Any:
        self.calls += 1
        return get_backend("threads").spill_runner()(call, items)


@pytest.mark.parametrize(
    ("func", "data", "kw"),
    [
        (double, list(range(500)), {}),  # quick: over before the first check
        (python_loop, list(range(50)), {}),  # busy on the CPU, never blocked
        (first_waits, list(range(50)), {"sample_size": 3}),  # a fixed sample
        (first_waits, iter(range(50)), {}),  # an iterator: drawn only by the caller
    ],
)
def test_no_spill_unless_the_first_item_waits(func: Any, data: Any, kw: dict[str, Any]) -> None:
    """Only a waiting first item of an adaptive sample of a sequence spills."""
    spy = SpillSpy()
    s = sample(func, data, spill=spy, **kw)
    assert spy.calls == 0 and s.profile.on_threads == 0


def test_the_same_waiting_first_item_spills_from_a_list() -> None:
    """The control for the cases above: adaptive, a sequence, a waiting first item."""
    spy = SpillSpy()
    s = sample(first_waits, list(range(50)), spill=spy)
    assert spy.calls == 1 and s.results == tuple(range(50))


@pytest.mark.parametrize(
    ("total", "mean_s", "rounds"),
    [
        (400, 280e-6, 1),  # a few hundred zlib-sized items: one round, not none
        (100_000, 280e-6, sampling.PROBE_ROUNDS),  # a long run: every round
        (40, 280e-6, 0),  # too short for even one round
        (400, 20e-6, 0),  # too small an item to pay on threads
    ],
)
def test_probe_size_takes_one_round_on_a_short_job(total: int, mean_s: float, rounds: int) -> None:
    """The probe's rounds: one on a job it costs at most a tenth of, more within 3 %."""
    tally = sampling._Tally(keep_going=False)
    tally.times = [mean_s] * 3
    tally.timed = 3 * mean_s
    tally.item_cpu = tally.item_wall = tally.timed  # pure CPU: not known to wait
    rules = sampling._Rules(fixed=False, budget_s=0.05, total=total, cores=2.0)
    assert sampling._probe_size(tally, rules)[1] == rounds


MS = ((0.0, 0.0), (0.5e-3, 0.5e-3), (1e-3, 1e-3))  # a caller that ran 1 ms of items


@pytest.mark.parametrize(
    ("caller", "helper", "preempted", "told"),
    [
        (BOTH, BOTH, 0, True),  # both ran all along
        (BOTH, ((0.5, 0.0), (0.75, 0.25), (1.0, 0.5)), 0, True),  # late, still overlapped
        (MS, ((1.5e-3, 0.0), (2e-3, 0.5e-3)), 0, False),  # late after 1 ms: a slow core?
        (BOTH, ((1.5, 0.0), (2.0, 0.5)), 0, True),  # kept out for 1 s: only the GIL does that
        (BOTH, (), 0, False),  # the helper never ran
        (BOTH, BOTH, 1, True),  # one preemption happens on a quiet machine too
        (MS, MS, sampling._PROBE_PREEMPTED, False),  # another process took a core
        (BOTH, BOTH, sampling._PROBE_PREEMPTED, True),  # ... in a 1 s window: it tells still
    ],
)
def test_a_round_that_tells_nothing_is_told_apart(
    caller: Any, helper: Any, preempted: int, told: bool
) -> None:
    """A round run without two cores, or whose helper may have woken late, tells nothing."""
    assert sampling._told(ProbeRound(caller, helper, preempted)) is told


@pytest.fixture
def round_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The item count of each probe round run, with every round reading serialised."""
    monkeypatch.setattr(sampling, "_PROBE_MAX_WAIT", 1.01)  # as cpu_work_is_probed
    monkeypatch.setattr(sampling, "probe_overlap", lambda rounds: 0.0)
    sizes: list[int] = []
    real = sampling._ProbePair.run

    def spy(self: Any, items: list[Any]) -> bool:
        sizes.append(len(items))
        return real(self, items)

    monkeypatch.setattr(sampling._ProbePair, "run", spy)
    return sizes


@pytest.mark.parametrize(("told", "rounds_run"), [(True, 1), (False, 3)])
def test_rounds_go_on_only_while_they_tell_nothing(
    monkeypatch: pytest.MonkeyPatch, round_sizes: list[int], told: bool, rounds_run: int
) -> None:
    """Of three planned rounds, a conclusive first one ends the probe; else all three run."""
    monkeypatch.setattr(sampling, "_probe_size", lambda tally, rules: (4, 3))
    monkeypatch.setattr(sampling, "_told", lambda r: told)
    s = sample(python_loop, range(20_000), cores=2, probe_threads=True)
    assert round_sizes == [8] * rounds_run
    assert s.results == tuple(python_loop(x) for x in range(s.profile.n_sampled))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.floats(1e-4, 1e-2)), min_size=2, max_size=40))
def test_threads_that_never_ran_at_once_read_zero(segments: list[tuple[int, float]]) -> None:
    """Any schedule of two threads taking turns reads 0, whatever windows are tried."""
    t, cpu = 0.0, [0.0, 0.0]
    points: list[list[tuple[float, float]]] = [[(0.0, 0.0)], [(0.0, 0.0)]]
    for who, seconds in segments:  # a reading at the end of each turn, as after an item
        t += seconds
        cpu[who] += seconds
        points[who].append((t, cpu[who]))
    assert probe_overlap([ProbeRound(tuple(points[0]), tuple(points[1]))]) <= 1e-9


def test_a_preempted_round_is_run_again_twice_as_long(
    monkeypatch: pytest.MonkeyPatch, round_sizes: list[int]
) -> None:
    """A lone round kept off a core (injected preemptions) runs again, with twice the items."""
    ticks = itertools.count(0, 5)  # every reading: five more preemptions
    monkeypatch.setattr(sampling, "_involuntary_switches", lambda: next(ticks))
    monkeypatch.setattr(sampling, "_probe_size", lambda tally, rules: (4, 1))  # one round
    s = sample(python_loop, range(20_000), cores=2, probe_threads=True)
    assert round_sizes == [8] + [16] * sampling._PROBE_RERUNS
    assert s.results == tuple(python_loop(x) for x in range(s.profile.n_sampled))


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity (Linux) and two allowed CPUs",
)
def test_the_probe_helper_moves_off_the_callers_cpu() -> None:
    """The helper thread leaves the caller's CPU for the others it may use."""
    cpus = sampling._allowed_cpus()
    here = sampling._current_cpu()
    assert here in cpus
    got: list[set[int]] = []

    def helper() -> None:
        sampling._avoid_cpu(here, cpus)
        got.append(os.sched_getaffinity(0))

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    assert got == [set(cpus - {here})] and os.sched_getaffinity(0) == set(cpus)


_BLOB = os.urandom(256 << 10)


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity (Linux) and two allowed CPUs",
)
@pytest.mark.parametrize("interrupt", [False, True], ids=["ends", "ctrl-c"])
def test_the_probe_keeps_the_caller_on_its_cpu_then_gives_it_back(interrupt: bool) -> None:
    """While the probe runs, the caller stays on one CPU and the helper on the others;
    afterwards (Ctrl-C included) the caller may run on all of them again."""
    before = os.sched_getaffinity(0)
    main = threading.get_ident()
    seen: list[tuple[bool, frozenset[int]]] = []

    def work(x: int) -> int:
        cpus = frozenset(os.sched_getaffinity(0))
        seen.append((threading.get_ident() == main, cpus))
        if interrupt and len(cpus) == 1 and threading.get_ident() == main:
            raise KeyboardInterrupt
        return len(hashlib.sha256(_BLOB).digest()) + x  # releases the GIL: both threads run

    if interrupt:
        with pytest.raises(KeyboardInterrupt):
            sample(work, range(20_000), cores=2, probe_threads=True)
    else:
        # On a loaded machine the helper may start too late for any item: probe again.
        for _ in range(5):
            sample(work, range(20_000), cores=2, probe_threads=True)
            if not all(here for here, _ in seen):
                break
            seen.clear()
    assert os.sched_getaffinity(0) == before
    pinned = {cpus for here, cpus in seen if here and cpus != before}
    assert len(pinned) == 1 and len(next(iter(pinned))) == 1
    if not interrupt:
        helper = {cpus for here, cpus in seen if not here}
        assert helper == {frozenset(before) - next(iter(pinned))}


class RemoteSpy:
    """A remote runner that runs batches here and records when it was first called."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __call__(self, first: int, items: list[Any], budget: float) -> list[Any]:
        self.log.append("remote")
        return [sampling.ItemRun(True, python_loop(x), 1e-3, 1e-3) for x in items]


@pytest.mark.usefixtures("cpu_work_is_probed")
@pytest.mark.parametrize(("overlap", "goes_remote"), [(1.0, False), (0.0, True)])
def test_the_probe_runs_before_the_sample_moves_to_a_worker(
    monkeypatch: pytest.MonkeyPatch, overlap: float, goes_remote: bool
) -> None:
    """Work threads overlap keeps its sample here; serialised work moves after the probe."""
    log: list[str] = []
    real = sampling._probe

    def probe(*args: Any) -> float:
        log.append("probe")
        real(*args)
        return overlap  # injected: the machine's cores and load must not decide the test

    monkeypatch.setattr(sampling, "_probe", probe)
    s = sample(python_loop, list(range(20_000)), cores=2, probe_threads=True,
               remote=RemoteSpy(log), offload=lambda mean, n, weigh: True)
    assert log[0] == "probe" and ("remote" in log) is goes_remote
    assert log.count("probe") == 1 and s.profile.thread_overlap == overlap
    assert s.results == tuple(python_loop(x) for x in range(s.profile.n_sampled))


class _VirtualClock:
    """``sampling.time`` for a test: every clock reads virtual seconds that only ``func``
    advances (CPU time = wall time: never preempted, never waiting)."""

    def __init__(self) -> None:
        self.now = 1.0

    def perf_counter(self) -> float:
        return self.now

    thread_time = process_time = monotonic = perf_counter


@pytest.mark.parametrize(
    ("slow", "n_sampled"),
    [
        (range(0), 256),  # alike from the start: 16 one by one, then 16 + 32 + 64 + 128
        (range(128, 256), 768),  # the block of 128 slowed: two blocks of 256 more
        (range(64, 128), 512),  # the first block of 64 slowed: one block of 256 more
    ],
    ids=["alike", "block-128-slowed", "block-64-slowed"],
)
def test_one_disturbed_block_does_not_run_the_sample_to_its_cap(
    monkeypatch: pytest.MonkeyPatch, slow: range, n_sampled: int
) -> None:
    """Tiny items stop sampling once the last two blocks agree, one slow block between."""
    clock = _VirtualClock()
    monkeypatch.setattr(sampling, "time", clock)

    def tiny(x: int) -> int:
        clock.now += 300e-9 if x in slow else 100e-9  # an interrupt, page faults: 3x
        return x

    s = sample(tiny, list(range(200_000)))
    assert s.profile.n_sampled == n_sampled < MAX_SAMPLE_ITEMS
    assert s.results == tuple(range(n_sampled))
