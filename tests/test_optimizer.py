"""optimize(): validation, plans within bounds, data kept intact, and the cost model's choices."""

from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amorsize
import amorsize.optimizer
from amorsize import Checkpoint, ItemFailure, RetryPolicy, WorkerCrashedError, execute
from amorsize._core import (
    model_max_workers_for_memory,
    model_parallel_floor,
    model_process_seconds,
    model_search,
    model_serial_seconds,
    model_thread_seconds,
)
from amorsize.backends import (
    BACKEND_NAMES,
    DEFAULT_BACKENDS,
    REGISTRY,
    BackendSpec,
    auto_backends,
    plan_hook,
)
from amorsize.optimizer import MIN_SPEEDUP, OptimizationResult, _decide, _offload_rule, optimize
from amorsize.retry import set_testing
from amorsize.sampling import MAX_SAMPLE_ITEMS, Profile, Sample, sample
from amorsize.system import SystemInfo, get_system_info


def inc(x: int) -> int:
    return x + 1


def busy_ms(x: int) -> int:
    """About 1 ms of pure-Python CPU work."""
    s = 0
    for i in range(20_000):
        s += i
    return s + x


def nap(x: int) -> int:
    time.sleep(0.002)  # the point is waiting: CPU time far below wall time
    return x


def one_mb(x: int) -> bytes:
    return bytes([x % 256]) * (1 << 20)


def boom_at_2(x: int) -> int:
    if x == 2:
        msg = "item two is bad"
        raise KeyError(msg)
    return x


def boom(x: int) -> int:
    msg = f"always fails on {x}"
    raise RuntimeError(msg)


class Drawn:
    """An infinite iterator that counts the items drawn from it."""

    def __init__(self) -> None:
        self.it = itertools.count()
        self.drawn = 0

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        self.drawn += 1
        return next(self.it)


def _check_bounds(r: OptimizationResult, n: int | None) -> None:
    assert r.backend in ("serial", "processes", "threads")
    assert r.n_jobs >= 1 and r.chunksize >= 1
    if r.backend == "serial":
        assert r.n_jobs == 1
    if n is not None:
        assert r.chunksize <= max(n, 1)
        assert r.n_jobs <= max(n, 1) or r.backend == "serial"
    assert r.estimated_speedup > 0
    assert math.isfinite(r.estimated_seconds.serial) and math.isfinite(r.estimated_seconds.chosen)
    assert r.reason and isinstance(r.warnings, list)
    if r.backend != "serial":
        assert r.estimated_speedup >= MIN_SPEEDUP


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"func": 3}, TypeError, ["func", "callable", "int"]),
        ({"data": 5}, TypeError, ["data", "iterable", "int"]),
        ({"n_jobs": 0}, ValueError, ["n_jobs", "[1, 10000]", "0"]),
        ({"n_jobs": 2.5}, TypeError, ["n_jobs", "2.5"]),
        ({"n_jobs": True}, TypeError, ["n_jobs", "True"]),
        ({"sample_size": -1}, ValueError, ["sample_size", "-1"]),
        ({"backends": ()}, ValueError, ["backends", "non-empty"]),
        ({"backends": ("gpu",)}, ValueError, ["backends", "'gpu'"]),
        ({"backends": 7}, ValueError, ["backends", "7"]),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], exc: type[Exception], words: list[str]) -> None:
    """Bad arguments raise with the parameter, the rule, the value and a fix."""
    args: dict[str, Any] = {"func": inc, "data": [1, 2]}
    args.update(kwargs)
    func, data = args.pop("func"), args.pop("data")
    with pytest.raises(exc) as info:
        optimize(func, data, **args)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


def test_single_backend_name_is_accepted() -> None:
    """backends="threads" is read as ("threads",)."""
    r = optimize(nap, range(3), backends="threads")  # type: ignore[arg-type]
    assert r.backend == "threads"


# --------------------------------------------------------------------------- bounds & data
@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(-1000, 1000), max_size=300),
    st.sampled_from(["list", "tuple", "iter", "gen", "range"]),
    st.one_of(st.none(), st.integers(1, 50)),
)
def test_plan_within_bounds_and_data_intact(items: list[int], kind: str, k: int | None) -> None:
    """For any input the plan is within bounds and data + sample_results match the input."""
    data: Any = {
        "list": lambda: items,
        "tuple": lambda: tuple(items),
        "iter": lambda: iter(items),
        "gen": lambda: (x for x in items),
        "range": lambda: range(len(items)),
    }[kind]()
    expected = list(range(len(items))) if kind == "range" else items
    r = optimize(inc, data, sample_size=k)
    _check_bounds(r, len(items))
    assert list(r.data) == expected
    assert list(r.sample_results) == [inc(x) for x in expected[: len(r.sample_results)]]
    if kind == "list":
        assert r.data is data


def test_infinite_generator_only_sampled() -> None:
    """An infinite iterator is drawn only as far as the sample, and the plan still works."""
    src = Drawn()
    r = optimize(inc, src)
    assert src.drawn == len(r.sample_results) == r.profile.n_sampled
    assert r.n_items is None
    assert any("length is unknown" in w for w in r.warnings)
    assert list(itertools.islice(r.data, 5)) == [0, 1, 2, 3, 4]
    _check_bounds(r, None)


@pytest.mark.parametrize("data", [[], iter([]), (x for x in ())])
def test_empty_data_is_serial(data: Any) -> None:
    """No items: serial, with a reason saying so."""
    r = optimize(inc, data)
    assert (r.backend, r.n_jobs, r.chunksize) == ("serial", 1, 1)
    assert "no items" in r.reason
    assert list(r.data) == [] and r.sample_results == ()


def test_single_item_is_serial() -> None:
    """One item runs while sampling: nothing is left to parallelise."""
    r = optimize(busy_ms, [5])
    assert r.backend == "serial" and r.sample_results == (busy_ms(5),)
    assert "already ran" in r.reason


@pytest.mark.parametrize(("on_threads", "words"), [
    (0, "already ran while sampling (2 ms); nothing is left to run"),
    (199, "the first one waited, so the next 199 ran on 199 threads beside it"),
])  # fmt: skip
def test_a_run_done_while_sampling_says_where_its_items_ran(on_threads: int, words: str) -> None:
    """Every item ran in the sample: serial, and the reason says whether threads ran them."""
    profile = _profile(1e-5, 200, n_sampled=200, on_threads=on_threads, sample_seconds=2e-3)
    r = _plan(profile)
    assert r.backend == "serial" and words in r.reason


def test_data_shorter_than_sample() -> None:
    """sample_size above the length samples everything and stays serial."""
    r = optimize(inc, (x for x in range(4)), sample_size=100)
    assert r.sample_results == (1, 2, 3, 4) and list(r.data) == [0, 1, 2, 3]
    assert r.backend == "serial" and r.n_items == 4


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make", [list, iter])
def test_function_raising_while_sampled(make: Any) -> None:
    """The failing item and error are reported; results stop before it; data is intact."""
    r = optimize(boom_at_2, make(range(10)), sample_size=5)
    assert r.sample_results == (0, 1)
    assert r.profile.error_index == 2 and isinstance(r.profile.error, KeyError)
    assert any("item 2" in w and "KeyError" in w for w in r.warnings)
    assert list(r.data) == list(range(10))
    _check_bounds(r, 10)


def test_function_raising_on_first_item_is_serial() -> None:
    """Nothing could be timed: serial, so the error surfaces at once."""
    r = optimize(boom, [1, 2, 3])
    assert r.backend == "serial" and r.sample_results == ()
    assert "first item" in r.reason and "RuntimeError" in r.reason


def test_unpicklable_function_never_goes_to_processes() -> None:
    """A closure over a lock is planned on threads or serial, with a warning."""
    lock = threading.Lock()

    def locked_nap(x: int) -> int:
        with lock:
            pass
        time.sleep(0.002)
        return x

    r = optimize(locked_nap, range(200))
    assert r.backend in ("threads", "serial")
    assert all(c.backend != "processes" for c in r.alternatives)
    assert any("cannot be pickled" in w for w in r.warnings)


def test_unpicklable_function_with_only_processes_raises() -> None:
    """Asking for processes only for an unpicklable function fails clearly, up front."""
    lock = threading.Lock()

    def locked(x: int) -> int:
        with lock:
            return x

    with pytest.raises(ValueError, match="no backend") as info:
        optimize(locked, range(100_000), backends=("processes",), sample_size=2)
    assert "cannot be pickled" in str(info.value)


def test_lambda_can_go_to_processes() -> None:
    """Lambdas travel by cloudpickle: processes stay among the alternatives."""
    pytest.importorskip("cloudpickle")
    r = optimize(lambda x: busy_ms(x), range(2000), n_jobs=2)
    assert any(c.backend == "processes" for c in r.alternatives)


def test_huge_items_are_sized() -> None:
    """Huge items are measured and counted against memory per worker."""
    data = [bytes([i]) * (8 << 20) for i in range(3)]
    r = optimize(len, data, sample_size=2)
    assert r.profile.in_bytes >= 8 << 20 and r.profile.mem_per_item > 0
    _check_bounds(r, 3)


# --------------------------------------------------------------------------- decisions
# Decisions are tested on injected profiles and machine facts: a real sample's timings move
# with the machine's load (two CPU hogs beside the suite made waiting work look CPU-bound).
def _facts(**kw: Any) -> SystemInfo:
    """Machine facts of a small 2-core machine (injected: never measured)."""
    facts: dict[str, Any] = {
        "logical_cores": 2, "physical_cores": 2, "usable_cores": 2.0,
        "available_memory": 8 << 30, "start_method": "fork", "process_startup_s": 5e-3,
        "process_startup_per_worker_s": 2e-3, "process_roundtrip_s": 5e-5,
        "transfer_s_per_byte": 2e-9, "worker_rss_bytes": 20 << 20,
        "thread_startup_s": 1e-4, "thread_roundtrip_s": 5e-5, "blas_threads": 1,
        "blas_pools": (), "cache_path": None, "from_cache": False, "measured_seconds": 0.0,
    }
    facts.update(kw)
    return SystemInfo(**facts)


def _profile(mean: float, n_items: int, n_sampled: int = 10, **kw: Any) -> Profile:
    """What a sample of ``n_sampled`` items of ``mean`` seconds each would have measured."""
    fields: dict[str, Any] = {
        "n_sampled": n_sampled, "n_items": n_items, "exhausted": n_sampled >= n_items,
        "item_seconds": (mean,) * n_sampled, "mean_seconds": mean, "std_seconds": 0.0,
        "max_seconds": mean, "cpu_ratio": 1.0, "wait_fraction": 0.0, "in_bytes": 30.0,
        "out_bytes": 30.0, "in_dump_seconds": 1e-7, "in_load_seconds": 1e-7,
        "out_dump_seconds": 1e-7, "out_load_seconds": 1e-7, "mem_per_item": 100.0,
        "func_bytes": 50, "func_picklable": True, "items_picklable": True,
        "outputs_picklable": True, "pickle_error": None, "n_failed": 0, "n_crashed": 0,
        "in_caller": n_sampled, "error_index": None, "error": None,
        "sample_seconds": mean * n_sampled,
    }
    fields.update(kw)
    return Profile(**fields)


def _plan(profile: Profile, **kw: Any) -> OptimizationResult:
    """The plan for ``profile`` on the injected 2-core machine."""
    n = profile.n_items or 0
    s = Sample(profile, tuple(range(profile.n_sampled)), range(n))
    kw.setdefault("allowed", ("serial", "processes", "threads"))
    kw.setdefault("n_jobs", None)
    return _decide(s, kw.pop("system", _facts()), **kw)


def test_cpu_bound_work_goes_to_processes() -> None:
    """Enough ~1 ms CPU-bound items: processes on all usable cores."""
    r = _plan(_profile(1e-3, 2000))
    assert (r.backend, r.n_jobs) == ("processes", 2)
    assert r.estimated_speedup >= MIN_SPEEDUP and "1,990 remain" in r.reason


def test_tiny_items_stay_serial() -> None:
    """Sub-microsecond items never pay for parallel overhead."""
    r = _plan(_profile(1e-7, 100_000, n_sampled=2000))
    assert r.backend == "serial" and "serial is best" in r.reason


def test_tiny_items_are_decided_before_any_plan_is_predicted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job below the parallel floor skips the search: its reason names the floor."""
    searched: list[int] = []
    real = amorsize.optimizer.model_search

    def spy(*args: Any) -> Any:
        searched.append(1)
        return real(*args)

    monkeypatch.setattr(amorsize.optimizer, "model_search", spy)
    r = _plan(_profile(1e-7, 200_000, n_sampled=256))
    assert r.backend == "serial" and "no parallel plan can be predicted under" in r.reason
    assert not searched and [c.backend for c in r.alternatives] == ["serial"]
    assert r.n_jobs == 1 and r.estimated_speedup == 1.0
    _plan(_profile(1e-3, 2000))
    assert searched  # work above the floor is still searched


@settings(max_examples=120, deadline=None)
@given(
    mean=st.floats(1e-8, 0.05), n_items=st.integers(2, 10**6), wait=st.floats(0, 1),
    out_bytes=st.floats(1, 1e7), overlap=st.floats(0, 1), warm=st.integers(0, 4),
)
def test_the_floor_never_changes_a_decision(
    mean: float, n_items: int, wait: float, out_bytes: float, overlap: float, warm: int
) -> None:
    """Deciding serial at the floor gives the backend a full search would choose."""
    p = _profile(mean, n_items, n_sampled=1, cpu_ratio=1.0 - wait, wait_fraction=wait,
                 out_bytes=out_bytes, out_load_seconds=out_bytes * 1e-9,
                 thread_overlap=overlap)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(amorsize.optimizer, "_below_floor", lambda *a: "")
        full = _plan(p, warm_workers=warm)
    assert _plan(p, warm_workers=warm).backend == full.backend


def test_sleep_bound_work_goes_to_many_threads() -> None:
    """Waiting work: threads, with many more workers than cores."""
    r = _plan(_profile(2e-3, 1000, n_sampled=3, cpu_ratio=0.02, wait_fraction=0.98))
    assert r.backend == "threads"
    assert r.n_jobs >= 4 * 2


def _waiting(n_items: int = 200, mean: float = 10e-3, wait: float = 0.99, **kw: Any) -> Profile:
    """A sampled waiting job: one item of ``mean`` seconds, ``wait`` of it blocked."""
    return _profile(mean, n_items, n_sampled=1, cpu_ratio=1.0 - wait, wait_fraction=wait, **kw)


def test_waiting_work_gets_many_threads_and_chunks_of_one() -> None:
    """200 x 10 ms at 99% wait: threads, at least 32 of them, one item per task."""
    r = _plan(_waiting())
    assert (r.backend, r.chunksize) == ("threads", 1)
    assert r.n_jobs >= 32


def test_waiting_work_can_get_more_threads_than_64() -> None:
    """With cheap threads, the items left run in one wave: far more threads than 64."""
    cheap = _facts(thread_startup_s=1e-5, thread_roundtrip_s=2e-6)
    r = _plan(_waiting(wait=0.997), system=cheap)
    assert (r.backend, r.n_jobs, r.chunksize) == ("threads", 199, 1)


def test_cold_thread_start_up_is_priced() -> None:
    """Expensive thread start-up (a cold pool) buys fewer threads; a warm pool is free."""
    cheap = _plan(_waiting(), system=_facts(thread_startup_s=1e-5))
    dear = _plan(_waiting(), system=_facts(thread_startup_s=1e-3))
    assert dear.backend == "threads" and dear.n_jobs < cheap.n_jobs
    warm = _plan(_waiting(), system=_facts(thread_startup_s=1e-3), warm_threads=dear.n_jobs)
    assert warm.estimated_seconds.chosen < dear.estimated_seconds.chosen


def test_measured_task_cost_sets_the_chunk_size() -> None:
    """Chunks of one while a task costs little beside an item; bigger when it does not."""
    job = _waiting(n_items=2000, mean=1e-3, wait=0.999)
    assert _plan(job, system=_facts(thread_roundtrip_s=2e-6)).chunksize == 1
    slow = _plan(job, system=_facts(thread_roundtrip_s=2e-4))
    assert slow.backend == "threads" and slow.chunksize > 1


def test_the_gil_share_of_waiting_work_limits_threads() -> None:
    """Waiting work that holds the GIL 20% of the time gains at most ~5x from threads."""
    r = _plan(_waiting(wait=0.8), allowed=("serial", "threads"))
    assert r.backend == "threads" and r.estimated_speedup < 1.0 / 0.2


def _gil_free(overlap: float, **kw: Any) -> Profile:
    """2,000 CPU-bound items of 300 us with 16 KB inputs (zlib-like), ``overlap`` measured."""
    kb16 = 16.0 * 1024
    kw = {"in_bytes": kb16, "in_dump_seconds": 4e-6, "in_load_seconds": 4e-6,
          "mem_per_item": kb16, **kw}
    return _profile(3e-4, 2000, n_sampled=40, thread_overlap=overlap, **kw)


@pytest.mark.parametrize("overlap", [0.0, math.nan])
def test_work_holding_the_gil_never_goes_to_threads(overlap: float) -> None:
    """Overlap 0 (or unprobed): processes or serial, never threads."""
    r = _plan(_gil_free(overlap))
    assert r.backend == "processes"
    assert _plan(_gil_free(overlap), allowed=("serial", "threads")).backend == "serial"


def test_gil_releasing_work_goes_to_threads() -> None:
    """Overlap 1: threads beat processes (no pickling, no start-up), on the usable cores."""
    r = _plan(_gil_free(1.0))
    assert (r.backend, r.n_jobs) == ("threads", 2)
    assert "overlapped 100%" in r.reason
    procs = [c for c in r.alternatives if c.backend == "processes"]
    assert procs and procs[0].seconds > r.estimated_seconds.chosen


def test_partly_gil_releasing_work_goes_to_the_faster_backend() -> None:
    """Overlap 0.3: threads would gain 1.2x at best, processes ~2x: processes."""
    r = _plan(_gil_free(0.3))
    assert r.backend == "processes"
    threads = [c for c in r.alternatives if c.backend == "threads"]
    assert threads and threads[0].speedup < r.estimated_speedup


def test_unpicklable_gil_releasing_work_goes_to_threads() -> None:
    """A function that cannot travel still runs in parallel when it releases the GIL."""
    err = "the function cannot be pickled"
    r = _plan(_gil_free(0.9, func_picklable=False, pickle_error=err))
    assert r.backend == "threads"
    serial = _plan(_gil_free(0.0, func_picklable=False, pickle_error=err))
    assert serial.backend == "serial" and "overlapped 0%" in serial.reason


@pytest.mark.parametrize("overlap", [0.0, 0.5, 1.0])
def test_thread_model_reproduces_the_probe(overlap: float) -> None:
    """Two CPU-bound items on two threads take (2 - overlap) item times, as probed."""
    w = _workload(n_items=2.0, t_mean=1e-2, t_max=1e-2, thread_overlap=overlap)
    m = _machine(thread_startup_s=0.0, thread_roundtrip_s=0.0, parent_item_s=0.0)
    expected = (2.0 - overlap) * 1e-2
    contention = 2 * (1.0 - overlap) * 1e-2 * 0.10  # the GIL's hand-offs, per item
    assert model_thread_seconds(w, m, 2, 1) == pytest.approx(expected + contention)


def test_gil_free_threads_are_bound_by_the_cores() -> None:
    """Fully GIL-free CPU work gains no more than the usable cores from more threads."""
    w = _workload(thread_overlap=1.0)
    assert model_thread_seconds(w, _machine(), 64, 16) >= model_serial_seconds(w) / 2


def test_sampling_tells_sleeping_from_working() -> None:
    """The real sample of a sleeping function measures it as waiting (CPU time, not speed)."""
    assert optimize(nap, range(1000), sample_size=3).profile.wait_fraction > 0.5


def test_big_outputs_stay_serial() -> None:
    """1 MB results cost the parent more to receive than to compute: serial."""
    mb = float(1 << 20)
    r = _plan(_profile(5e-4, 300, n_sampled=3, out_bytes=mb, mem_per_item=mb,
                       out_load_seconds=3e-4, out_dump_seconds=3e-4))
    assert r.backend == "serial"
    assert "result" in r.reason


def test_real_big_outputs_are_measured() -> None:
    """A real sample sizes 1 MB results (the figure the decision above is made on)."""
    assert optimize(one_mb, range(300), sample_size=3).profile.out_bytes >= 1 << 20


def test_n_jobs_is_respected() -> None:
    """An explicit n_jobs fixes the worker count of a parallel plan; 1 means serial."""
    waiting = _profile(2e-3, 500, n_sampled=3, cpu_ratio=0.02, wait_fraction=0.98)
    r = _plan(waiting, n_jobs=3)
    assert r.n_jobs == 3 and r.backend in ("threads", "processes")
    assert _plan(waiting, n_jobs=1).backend == "serial"
    assert optimize(nap, range(500), n_jobs=1).backend == "serial"


def test_backends_restrict_the_choice() -> None:
    """Without serial in backends, the best allowed backend is chosen, with a warning."""
    r = _plan(_profile(1e-7, 10_000, n_sampled=2000), allowed=("threads",))
    assert r.backend == "threads"
    assert any("excluded by backends" in w for w in r.warnings)
    assert optimize(inc, range(10_000), backends=("threads",)).backend == "threads"


def test_warm_workers_make_processes_cheaper() -> None:
    """The same sample on warm process workers is predicted faster than on cold ones."""
    s = sample(busy_ms, range(300), sample_size=3)
    info = get_system_info()
    args: dict[str, Any] = {"allowed": ("processes",), "n_jobs": 2}
    cold = _decide(s, info, **args)
    warm = _decide(s, info, warm_workers=2, **args)
    assert warm.estimated_seconds.chosen < cold.estimated_seconds.chosen
    assert warm.estimated_seconds.serial == cold.estimated_seconds.serial


def test_plan_works_with_multiprocessing_pool() -> None:
    """Pool(n_jobs).map(func, data, chunksize) gives the serial results (the seed's usage)."""
    data = list(range(40))
    r = optimize(busy_ms, data, n_jobs=2, backends=("processes",))
    with multiprocessing.Pool(r.n_jobs) as pool:
        out = pool.map(busy_ms, r.data, chunksize=r.chunksize)
    assert out == [busy_ms(x) for x in data]


def test_report_and_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    """str() is a short report; verbose=True prints it with the ranked alternatives."""
    r = _plan(_profile(2e-3, 200, n_sampled=3, cpu_ratio=0.02, wait_fraction=0.98),
              verbose=True)
    printed = capsys.readouterr().out
    assert r.backend in str(r) and r.reason in str(r)
    assert "alternatives" in printed and "alternatives" not in str(r)
    assert printed.count("threads n_jobs=") >= 2
    optimize(nap, range(200), sample_size=3, verbose=True)
    assert "alternatives" in capsys.readouterr().out


def test_result_is_exported_and_frozen() -> None:
    """The result is importable from the package and immutable."""
    r = amorsize.optimize(inc, [1, 2, 3])
    assert isinstance(r, amorsize.OptimizationResult)
    with pytest.raises(AttributeError):
        r.n_jobs = 4  # type: ignore[misc]


# --------------------------------------------------------------------------- the model
def _workload(**kw: float) -> dict[str, float]:
    w = {
        "n_items": 1000.0, "t_mean": 1e-3, "t_std": 0.0, "t_max": 1e-3, "cpu_fraction": 1.0,
        "in_bytes": 30.0, "out_bytes": 30.0, "in_dump_s": 1e-7, "in_load_s": 1e-7,
        "out_dump_s": 1e-7, "out_load_s": 1e-7, "mem_per_item": 100.0, "func_bytes": 50.0,
        "thread_overlap": 0.0,
    }
    w.update(kw)
    return w


def _machine(**kw: float) -> dict[str, float]:
    m = {
        "cores": 2.0, "proc_startup_s": 5e-3, "proc_startup_per_worker_s": 2e-3,
        "warm_workers": 0.0, "proc_roundtrip_s": 5e-5, "per_byte_s": 2e-9,
        "parent_item_s": 2e-7, "worker_rss": 2e7, "available_memory": 8e9,
        "thread_startup_s": 1e-4, "thread_roundtrip_s": 5e-5, "warm_threads": 0.0,
    }
    m.update(kw)
    return m


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 10**6), t=st.floats(1e-8, 1.0), cv=st.floats(0, 3),
    cpu=st.floats(0, 1), b=st.floats(0, 1e7), cores=st.floats(1, 64),
)
def test_model_search_is_sane(n: int, t: float, cv: float, cpu: float, b: float, cores: float) -> None:
    """Every candidate has a positive finite time, chunks within 1..N, sorted fastest first."""
    w = _workload(n_items=float(n), t_mean=t, t_std=cv * t, t_max=t * (1 + 3 * cv),
                  cpu_fraction=cpu, out_bytes=b)
    out = model_search(w, _machine(cores=cores), [2, 4, 8], [2, 8, 32])
    assert out[0][3] <= out[-1][3]
    assert [c[3] for c in out] == sorted(c[3] for c in out)
    assert any(c[0] == 0 for c in out)
    for backend, workers, chunk, secs in out:
        assert math.isfinite(secs) and secs >= 0
        assert 1 <= chunk <= max(n, 1)
        if backend:
            assert secs >= model_serial_seconds(w) / max(workers, 1) * min(cpu, 1.0) / 2 - 1e-9


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 10**6), t=st.floats(1e-8, 1.0), cv=st.floats(0, 3),
    cpu=st.floats(0, 1), b=st.floats(0, 1e7), cores=st.floats(1, 64),
    overlap=st.floats(0, 1), warm=st.integers(0, 8), warm_threads=st.integers(0, 64),
    k=st.integers(1, 4096),
)
def test_the_parallel_floor_is_below_every_plan(
    n: int, t: float, cv: float, cpu: float, b: float, cores: float, overlap: float,
    warm: int, warm_threads: int, k: int,
) -> None:
    """``model_parallel_floor`` is at most the predicted time of any process or thread plan."""
    w = _workload(n_items=float(n), t_mean=t, t_std=cv * t, t_max=t * (1 + 3 * cv),
                  cpu_fraction=cpu, in_bytes=b, out_bytes=b, thread_overlap=overlap)
    m = _machine(cores=cores, warm_workers=float(warm), warm_threads=float(warm_threads))
    ns = [1, 2, 3, 4, 8, 16, 64, 128]
    floor_p = model_parallel_floor(w, m, True, False)
    floor_t = model_parallel_floor(w, m, False, True)
    assert model_parallel_floor(w, m, True, True) == min(floor_p, floor_t)
    assert model_parallel_floor(w, m, False, False) >= 1e300
    for code, _, _, secs in model_search(w, m, ns, ns):
        assert code == 0 or secs >= (floor_p if code == 1 else floor_t) * (1 - 1e-12)
    for x in ns:
        assert model_process_seconds(w, m, x, k) >= floor_p * (1 - 1e-12)
        assert model_thread_seconds(w, m, x, k) >= floor_t * (1 - 1e-12)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 8), c=st.integers(1, 512), warm=st.integers(0, 8))
def test_warm_workers_never_cost_more(n: int, c: int, warm: int) -> None:
    """Predicted process time never grows with the number of warm workers."""
    w = _workload()
    assert model_process_seconds(w, _machine(warm_workers=warm), n, c) <= model_process_seconds(
        w, _machine(), n, c
    )


def test_threads_do_not_speed_up_cpu_bound_python() -> None:
    """With the GIL held all the time, threads are never faster than serial."""
    w = _workload(cpu_fraction=1.0)
    for n in (2, 8, 64):
        assert model_thread_seconds(w, _machine(), n, 16) >= model_serial_seconds(w)


def test_threads_overlap_waiting() -> None:
    """Waiting work on 32 threads is predicted far faster than serial."""
    w = _workload(cpu_fraction=0.02, t_mean=5e-3)
    assert model_thread_seconds(w, _machine(), 32, 1) < model_serial_seconds(w) / 10


def test_output_bytes_are_a_serial_term() -> None:
    """More workers cannot beat the parent's time to receive every output."""
    w = _workload(out_bytes=1 << 20, out_load_s=3e-4)
    parent = 1000 * ((1 << 20) * 2e-9 + 3e-4)
    assert model_process_seconds(w, _machine(cores=64), 64, 4) >= parent


def test_spread_prefers_smaller_chunks() -> None:
    """Skewed item times move the best chunk size down."""
    even = model_search(_workload(n_items=5000.0, t_mean=2e-4), _machine(), [2], [])
    skew = model_search(
        _workload(n_items=5000.0, t_mean=2e-4, t_std=1e-3, t_max=1e-2), _machine(), [2], []
    )
    chunk = {1: 0}
    for code, _, c, _ in even:
        if code == 1:
            chunk[1] = c
    skew_chunk = next(c for code, _, c, _ in skew if code == 1)
    assert skew_chunk < chunk[1]


def test_memory_limits_workers() -> None:
    """Workers that do not fit in memory are not proposed."""
    w = _workload(mem_per_item=2e9)
    m = _machine(available_memory=5e9)
    assert model_max_workers_for_memory(w, m, 1) == 1
    assert all(code != 1 for code, *_ in model_search(w, m, [2, 4], []))


# --------------------------------------------------------------------------- issue 12
def _calls(folder: Path, x: int) -> int:
    return len(list(folder.glob(f"{x}-*")))


def busy_fails_first(arg: tuple[int, str]) -> int:
    """About 1 ms of CPU work; item 0 fails (once, or always). Leaves one file per call."""
    x, folder = arg
    Path(folder, f"{x}-{uuid.uuid4().hex}").touch()
    if x == 0 and (not Path(folder, "once").exists() or _calls(Path(folder), 0) == 1):
        msg = f"bad {x}"
        raise ValueError(msg)
    return busy_ms(x) - busy_ms(0)


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> SystemInfo:
    """The optimizer sees the injected 2-core machine, whatever runs the test."""
    facts = _facts()
    monkeypatch.setattr(amorsize.optimizer, "get_system_info", lambda: facts)
    return facts


@pytest.mark.parametrize("how", ["collect", "dead_letter"])
def test_failed_sample_is_a_data_point(tmp_path: Path, two_cores: SystemInfo, how: str) -> None:
    """issue 12 item 10: a sample failing on item 0 goes on, and the failure is kept."""
    data = [(i, str(tmp_path)) for i in range(200)]
    kw: dict[str, Any] = (
        {"on_error": "collect"} if how == "collect" else {"dead_letter": tmp_path / "dl.db"}
    )
    results, plan = execute(busy_fails_first, data, return_plan=True, **kw)
    # The plan itself depends on how busy the machine is while sampling (under load the
    # sample can use up most items): the decision is tested on an injected profile below.
    profile = plan.optimization.profile
    assert profile.n_failed == 1 and profile.error_index == 0 and profile.n_sampled > 1
    assert "raised on the first item" not in plan.reason
    assert isinstance(results[0], ItemFailure) and results[0].index == 0
    assert results[1:] == list(range(1, 200))
    assert [_calls(tmp_path, i) for i in range(200)] == [1] * 200  # nothing ran twice
    assert plan.failed == 1 and plan.completed == 199


def test_failed_sample_does_not_force_serial() -> None:
    """issue 12 item 10: CPU-bound items whose first one failed still go to processes."""
    failed = _profile(
        1e-3, 2000, n_failed=1, error_index=0, error=ValueError("bad 0"), in_caller=1
    )
    r = _plan(failed)
    assert (r.backend, r.n_jobs) == ("processes", 2), r.reason


def test_transient_sample_failure_is_retried_in_the_sample(
    tmp_path: Path, two_cores: SystemInfo
) -> None:
    """issue 12 item 10: with retry=, the sample retries item 0, which then counts as a
    success (the plan that follows is load-dependent: see the injected-profile test)."""
    Path(tmp_path, "once").touch()
    data = [(i, str(tmp_path)) for i in range(200)]
    with set_testing(True):
        results, plan = execute(busy_fails_first, data, retry=RetryPolicy(max_retries=2),
                                return_plan=True)
    profile = plan.optimization.profile
    assert profile.n_failed == 0 and profile.error_index is None and profile.n_sampled > 1
    assert results == list(range(200))
    assert _calls(tmp_path, 0) == 2 and _calls(tmp_path, 1) == 1


def test_failed_sample_in_raise_mode_surfaces_at_once(
    tmp_path: Path, two_cores: SystemInfo
) -> None:
    """issue 12 item 10: in raise mode the sampled failure raises, without running it again."""
    data = [(i, str(tmp_path)) for i in range(200)]
    with pytest.raises(ValueError, match="bad 0"):
        execute(busy_fails_first, data)
    assert _calls(tmp_path, 0) == 1 and _calls(tmp_path, 1) == 0


def test_sampled_crash_keeps_the_rest_in_workers() -> None:
    """issue 12 item 3: once a sampled item crashed a worker, the plan never runs in-process."""
    crash = WorkerCrashedError(7)
    r = _plan(_profile(1e-7, 10_000, n_failed=1, n_crashed=1, error_index=3, error=crash))
    assert r.backend == "processes"
    assert "crashed a worker process" in r.reason


def test_offload_rule_on_injected_facts() -> None:
    """issue 12 item 3: only work a process plan could speed up moves its sample to a worker."""
    small = lambda: 60.0  # noqa: E731 - bytes of an item and its result, pickled
    rule = _offload_rule(_facts(), 0, 1000)
    assert rule(1e-3, 1, small) and not rule(1e-7, 500, small) and not rule(2e-6, 990, small)
    assert not _offload_rule(_facts(usable_cores=1.0), 0, 1000)(1.0, 1, small)
    assert _offload_rule(_facts(), 2, 1000)(5e-6, 100, small)  # warm workers start for free


def test_offload_rule_counts_warm_workers_only_when_needed() -> None:
    """The warm-worker count (a poll of each worker process) is asked once, and never for
    items too quick to move."""
    asked: list[int] = []

    def warm() -> int:
        asked.append(1)
        return 2

    small = lambda: 60.0  # noqa: E731
    rule = _offload_rule(_facts(), warm, 1000)
    assert not rule(1e-7, 500, small) and asked == []
    assert rule(5e-6, 100, small) and rule(1e-3, 1, small) and asked == [1]


@pytest.mark.parametrize(
    ("item_bytes", "moves"),
    [(60.0, True), (10e3, True), (200e3, False), (math.inf, False)],
)
def test_offload_rule_weighs_what_each_item_moves(item_bytes: float, moves: bool) -> None:
    """Items whose bytes take the parent longer to move than to compute stay in the caller;
    the bytes are weighed only when the work alone could pay."""
    weighed: list[int] = []

    def weigh() -> float:
        weighed.append(1)
        return item_bytes

    rule = _offload_rule(_facts(transfer_s_per_byte=1.7e-9), 0, 2500)
    assert rule(1e-4, 30, weigh) is moves and weighed == [1]
    assert not rule(1e-7, 30, weigh) and weighed == [1]


def bad_5(x: int) -> int:
    if x == 5:
        msg = f"bad {x}"
        raise ValueError(msg)
    return x


def test_resumed_failure_names_the_input_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """issue 12 item 13: items 0-4 checkpointed, item 5 fails: the plan names item 5."""
    path = tmp_path / "run.db"
    with pytest.raises(ValueError, match="bad 5"):
        execute(bad_5, range(10), checkpoint=path, backend="serial")
    assert set(range(5)) <= set(Checkpoint(path).results())
    with pytest.raises(ValueError, match="bad 5"):
        execute(bad_5, range(10), checkpoint=path, verbose=True)
    printed = capsys.readouterr().out
    assert "raised on item 5 while sampling" in printed and "item 0" not in printed
    results, plan = execute(bad_5, range(10), checkpoint=path, on_error="collect",
                            return_plan=True)
    assert isinstance(results[5], ItemFailure) and [f.index for f in plan.failures] == [5]
    assert plan.optimization.profile.error_index == 5


def fails_while_marked(arg: tuple[int, str]) -> int:
    x, folder = arg
    if Path(folder, "fail").exists() and x % 9 >= 4:
        msg = f"bad {x}"
        raise ValueError(msg)
    return x


def test_resumed_plan_counts_what_really_remains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """issue 12 item 13: with scattered items checkpointed, count and prediction use the rest."""
    path = tmp_path / "run.db"
    data = [(i, str(tmp_path)) for i in range(2000)]
    Path(tmp_path, "fail").touch()
    execute(fails_while_marked, data, checkpoint=path, on_error="collect", backend="serial")
    done = len(Checkpoint(path))
    assert done == sum(1 for i in range(2000) if i % 9 < 4)
    Path(tmp_path, "fail").unlink()
    results, plan = execute(fails_while_marked, data, checkpoint=path, return_plan=True,
                            verbose=True)
    assert results == list(range(2000)) and plan.skipped == done
    opt = plan.optimization
    left = 2000 - done
    assert opt.n_items == opt.profile.n_items == left
    p = opt.profile
    assert opt.estimated_seconds.serial == pytest.approx(
        p.sample_seconds + (left - p.n_sampled) * p.mean_seconds)
    assert f"of {left} items" in capsys.readouterr().out


def test_unpicklable_lambda_without_cloudpickle_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue 12 item 20: no cloudpickle: serial says the lambda cannot be pickled, names the extra."""
    monkeypatch.setitem(sys.modules, "cloudpickle", None)  # the core install: no cloudpickle
    measured = sample(lambda x: x + 1, range(3), sample_size=3).profile
    assert not measured.func_picklable
    profile = dataclasses.replace(
        _profile(1e-3, 2000), func_picklable=False, pickle_error=measured.pickle_error
    )
    r = _plan(profile)
    assert r.backend == "serial"
    assert "cannot be pickled" in r.reason and "amorsize[full]" in r.reason
    assert "would be predicted" in r.reason and "GIL" in r.reason


def test_resumed_generator_is_planned_as_unknown_length(tmp_path: Path) -> None:
    """issue 12 item 13: a checkpointed generator's length is unknown, never "no items"."""
    n = 5 * MAX_SAMPLE_ITEMS  # more than any sample takes
    results, plan = execute(inc, (x for x in range(n)), checkpoint=tmp_path / "run.db",
                            return_plan=True)
    assert results == [x + 1 for x in range(n)]
    assert plan.optimization.n_items is None and "no items" not in plan.reason


# --------------------------------------------------------------------------- registry & hooks
def test_registry_is_the_one_list_of_backends() -> None:
    """Names, optimize's default backends and the CLI's choices all come from REGISTRY."""
    import inspect

    from amorsize import cli

    assert BACKEND_NAMES == tuple(REGISTRY) == ("serial", "processes", "threads", "dask", "async")
    assert all(spec.name == name for name, spec in REGISTRY.items())
    assert DEFAULT_BACKENDS == ("serial", "processes", "threads")
    assert inspect.signature(optimize).parameters["backends"].default == DEFAULT_BACKENDS
    assert ("auto", *BACKEND_NAMES) == cli._BACKENDS
    assert plan_hook("processes") is None


@pytest.mark.parametrize(
    ("in_daemon", "cluster", "names"),
    [
        (False, False, ("serial", "processes", "threads")),
        (True, False, ("serial", "threads")),
        (False, True, ("serial", "processes", "threads", "dask")),
        (True, True, ("serial", "threads", "dask")),
    ],
)
def test_auto_backends(in_daemon: bool, cluster: bool, names: tuple[str, ...]) -> None:
    """backend="auto" plans no process pool in a daemon, and a cluster only with a client."""
    assert auto_backends(in_daemon=in_daemon, cluster=cluster) == names


@dataclasses.dataclass(frozen=True)
class _HookPlan:
    n_jobs: int
    chunksize: int
    seconds: float
    reason: str


_HOOK_CALLS: list[tuple[Any, ...]] = []


def _cluster_plan(profile: Profile, n_items: int | None, client: Any) -> _HookPlan:
    _HOOK_CALLS.append((profile, n_items, client))
    seconds = float(client) if isinstance(client, float) else 0.01
    return _HookPlan(4, 50, seconds, "the test cluster is fast")


@pytest.fixture
def cluster_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A backend "cluster" registered with a planning hook (in an importable module)."""
    module = types.ModuleType("amorsize_test_hooks")
    module.plan = _cluster_plan  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    spec = BackendSpec(
        "cluster", "amorsize.backends.serial:SerialBackend",
        plan="amorsize_test_hooks:plan", out_of_process=True,
    )  # fmt: skip
    monkeypatch.setitem(REGISTRY, "cluster", spec)
    _HOOK_CALLS.clear()
    yield "cluster"
    _HOOK_CALLS.clear()


_WITH_CLUSTER = ("serial", "processes", "threads", "cluster")


def test_planning_hook_is_ranked_beside_the_model(cluster_backend: str) -> None:
    """A hook is asked with profile, length and client; its plan wins when fastest."""
    p = _profile(1e-3, 10_000)
    r = _plan(p, allowed=_WITH_CLUSTER, client="the client")
    assert [(p, 10_000, "the client")] == _HOOK_CALLS
    assert (r.backend, r.n_jobs, r.chunksize) == ("cluster", 4, 50)
    assert "the test cluster is fast" in r.reason
    assert {c.backend for c in r.alternatives} == {"serial", "processes", "threads", "cluster"}


def test_planning_hook_that_cannot_run_loses(cluster_backend: str) -> None:
    """A hook predicting infinite time is ranked last, never chosen."""
    r = _plan(_profile(1e-3, 10_000), allowed=_WITH_CLUSTER, client=math.inf)
    assert r.backend == "processes"
    assert r.alternatives[-1].backend == "cluster" and r.alternatives[-1].speedup == 0.0


def test_crash_keeps_out_of_process_hook_backends(cluster_backend: str) -> None:
    """A sampled crash rules out serial and threads, not a backend running elsewhere."""
    p = _profile(1e-3, 10_000, n_crashed=1, n_failed=1, error_index=3, error=RuntimeError("x"))
    r = _plan(p, allowed=_WITH_CLUSTER, client=1e9)
    assert r.backend == "processes" and "ruled out" in r.reason
    r = _plan(p, allowed=_WITH_CLUSTER)
    assert r.backend == "cluster"


def test_missing_planning_hook_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook whose module is missing names the backend and the extra to install."""
    spec = BackendSpec(
        "cluster", "amorsize.backends.serial:SerialBackend",
        plan="amorsize_no_such_module:plan", extra="cluster",
    )  # fmt: skip
    monkeypatch.setitem(REGISTRY, "cluster", spec)
    with pytest.raises(ImportError) as info:
        _plan(_profile(1e-3, 1000), allowed=("serial", "cluster"))
    msg = str(info.value)
    assert "'cluster'" in msg and "pip install 'amorsize[cluster]'" in msg, msg
    assert "leave 'cluster' out of backends" in msg, msg


# --------------------------------------------------------------------------- dask cost model
def test_dask_cost_model_on_injected_costs() -> None:
    """Tiny items are batched into far bigger tasks than slow ones, at 10x the overhead."""
    from amorsize._dask_plan import MIN_OVERHEAD_RATIO, ClusterCosts, _chunksize, _reason, _work

    costs = ClusterCosts(latency_s=4e-3, task_s=2e-3, bytes_per_s=2e8)
    tiny = _work(_profile(1e-6, 200_000), 200_000, costs, processes=2, threads=2)
    slow = _work(_profile(2e-2, 40), 40, costs, processes=2, threads=2)
    c_tiny = _chunksize(tiny)[0]
    c_slow, cap, want = _chunksize(slow)
    assert c_tiny > 100 * c_slow
    assert c_tiny * tiny.t >= MIN_OVERHEAD_RATIO * costs.task_s
    n_tasks = math.ceil(40 / c_slow)
    assert n_tasks >= 2 * 2  # slow items: several tasks per worker
    assert 0 < tiny.seconds(c_tiny) < tiny.seconds(1)
    reason = _reason(slow, c_slow, cap, want, 2, 2, n_tasks)
    assert "task" in reason and ". " not in reason  # one sentence


@pytest.mark.parametrize(
    ("kw", "n", "words"),
    [
        ({"func_picklable": False, "pickle_error": "no pickle"}, 100, "ruled out: no pickle"),
        ({}, 10, "no items are left"),
    ],
)
def test_dask_cost_model_needs_no_cluster_to_say_no(
    kw: dict[str, Any], n: int, words: str
) -> None:
    """Unpicklable work and nothing left are planned without measuring the cluster."""
    from amorsize._dask_plan import _nothing_to_plan

    p = _profile(1e-3, n, **kw)
    got = _nothing_to_plan(p, max(n - p.n_sampled, 0), processes=2, threads=2)
    assert got is not None and words in got.reason and got.costs is None
    assert _nothing_to_plan(p, 10, processes=0, threads=0) is not None
