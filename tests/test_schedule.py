"""ChunkSizer: chunk sizes during a parallel run (guided tail, re-planning from measured times)."""

from __future__ import annotations

import dataclasses
import itertools
import sys
import threading
import time

import cloudpickle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amorsize import RunObserver, RunReport, execute, execute_iter
from amorsize import executor as executor_module
from amorsize._schedule import GROWTH, ChunkSizer
from amorsize.system import get_system_info

# Spawned and forkserver workers cannot import this file (importlib mode): ship by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

_PLANS = st.tuples(
    st.integers(min_value=1, max_value=500),  # planned chunk size
    st.integers(min_value=1, max_value=16),  # workers
    st.floats(min_value=1e-7, max_value=1.0),  # sampled seconds per item
    st.floats(min_value=0.0, max_value=1e-2),  # seconds per task
)


def _cut(sizer: ChunkSizer, n: int, item_s: float) -> list[int]:
    """Cut ``n`` items, reporting each chunk as taking ``item_s`` per item plus overhead."""
    sizes = []
    remaining = n
    while remaining:
        size = sizer.next_size(remaining)
        assert 1 <= size <= remaining
        sizes.append(size)
        remaining -= size
        sizer.observe(size, size * item_s + sizer.task_seconds)
    return sizes


@settings(max_examples=200, deadline=None)
@given(_PLANS, st.integers(min_value=0, max_value=5_000), st.floats(min_value=1e-8, max_value=10.0))
def test_sizes_cover_every_item_once(plan, n, slowdown):
    """Sizes are >= 1 and add up to the item count, whatever the measured times."""
    chunk, jobs, item_s, task_s = plan
    sizer = ChunkSizer(chunk, jobs, item_seconds=item_s, task_seconds=task_s)
    assert sum(_cut(sizer, n, item_s * slowdown)) == n


@settings(max_examples=200, deadline=None)
@given(_PLANS, st.integers(min_value=1, max_value=5_000))
def test_constant_item_time_sizes_never_grow(plan, n):
    """With items as fast as sampled, sizes only shrink toward the end and never re-plan."""
    chunk, jobs, item_s, task_s = plan
    sizer = ChunkSizer(chunk, jobs, item_seconds=item_s, task_seconds=task_s)
    sizes = _cut(sizer, n, item_s)
    assert all(a >= b for a, b in itertools.pairwise(sizes))
    assert max(sizes) <= chunk
    assert sizer.replans == []


def test_tail_shrinks_so_the_last_chunks_finish_together():
    """The last chunks hold a share of what is left, down to the overhead floor."""
    sizer = ChunkSizer(100, 2, item_seconds=1e-3, task_seconds=0.0)
    sizes = _cut(sizer, 1_000, 1e-3)
    assert sizes[0] == 100
    assert sizes[-4:] == [1, 1, 1, 1]
    assert (sizer.smallest, sizer.largest, sizer.chunks) == (1, 100, len(sizes))


def test_tail_stops_at_the_overhead_floor():
    """Per-task overhead caps how small the tail's chunks get (at most 3 % of the work)."""
    # 1 ms per task, 1 ms per item: a chunk needs 34 items for overhead under 3 %.
    sizer = ChunkSizer(100, 2, item_seconds=1e-3, task_seconds=1e-3)
    sizes = _cut(sizer, 1_000, 1e-3)
    assert min(sizes[:-1]) == 34


def test_slower_items_than_sampled_shrink_chunks_of_unknown_length():
    """Items 10x slower than sampled, length unknown: chunks drop ~10x, once, and say why."""
    sizer = ChunkSizer(100, 2, item_seconds=1e-4, task_seconds=0.0)
    for _ in range(6):
        sizer.observe(sizer.next_size(None), 100 * 1e-3)
    assert sizer.size == 10
    [replan] = sizer.replans
    assert (replan.old_size, replan.new_size) == (100, 10)
    assert "1 ms per item, not 0.1 ms: chunksize 100 -> 10" in str(replan)


def test_slower_items_keep_the_plan_when_the_tail_balances():
    """Known length: slower items keep the planned size (the tail shrinks chunks anyway)."""
    sizer = ChunkSizer(100, 2, item_seconds=1e-4, task_seconds=0.0)
    for _ in range(6):
        sizer.observe(sizer.next_size(100_000), 100 * 1e-3)
    assert (sizer.size, sizer.replans) == (100, [])


def test_replans_do_not_churn_on_noise():
    """A skewed run (one chunk in five 20x slower) settles on one size, not a flip-flop."""
    sizer = ChunkSizer(50, 2, item_seconds=1e-4, task_seconds=0.0)
    for k in range(200):
        size = sizer.next_size(None)
        sizer.observe(size, size * (2e-3 if k % 5 == 0 else 1e-4))
    assert len(sizer.replans) <= 1


@pytest.mark.parametrize(("task_s", "size"), [(0.0, 10), (1e-4, 34), (1e-3, GROWTH * 10)])
def test_faster_items_grow_chunks_as_far_as_overhead_needs(task_s, size):
    """Items 100x faster than sampled: chunks grow until per-task overhead is under 3 %
    of the work, at most GROWTH times the plan (free tasks: no need to grow)."""
    sizer = ChunkSizer(10, 2, item_seconds=1e-2, task_seconds=task_s)
    for _ in range(8):
        sizer.observe(10, 10 * 1e-4 + task_s)
    assert sizer.next_size(None) == size


def test_no_growth_when_asked():
    """grow=False: faster items never make chunks bigger than planned."""
    sizer = ChunkSizer(10, 2, item_seconds=1e-2, task_seconds=1e-3, grow=False)
    for _ in range(8):
        sizer.observe(10, 10 * 1e-4 + 1e-3)
    assert sizer.next_size(None) == 10


def test_noise_within_the_ratio_keeps_the_plan():
    """Measured times within 2x of the sample do not re-plan."""
    sizer = ChunkSizer(50, 2, item_seconds=1e-3, task_seconds=0.0)
    for k in range(20):
        sizer.observe(50, 50 * (1.8e-3 if k % 2 else 0.6e-3))
    assert (sizer.size, sizer.replans) == (50, [])


def test_unknown_item_time_adopts_the_first_measure():
    """Without a sampled time the first measure becomes the basis (no re-plan from nothing)."""
    sizer = ChunkSizer(20, 2, item_seconds=0.0, task_seconds=1e-4)
    assert sizer.next_size(None) == 20
    sizer.observe(20, 20 * 1e-3 + 1e-4)
    assert sizer.basis == 1e-3
    assert sizer.replans == []


def test_first_completions_do_not_replan():
    """Fewer than two chunks per worker observed: start-up noise is not acted on."""
    sizer = ChunkSizer(100, 4, item_seconds=1e-4, task_seconds=0.0)
    sizer.next_size(None)
    for _ in range(7):
        sizer.observe(100, 1.0)
    assert sizer.replans == []
    sizer.observe(100, 1.0)
    assert len(sizer.replans) == 1


def test_empty_observation_is_ignored():
    """A chunk of no items tells nothing."""
    sizer = ChunkSizer(5, 1, item_seconds=1e-3, task_seconds=0.0)
    sizer.observe(0, 1.0)
    assert sizer.observations == 0


# --------------------------------------------------------------------------- in execute


def square(x: int) -> int:
    return x * x


@pytest.fixture
def free_tasks(monkeypatch):
    """Machine facts with tasks that cost nothing: the tail's chunks may shrink to 1 item."""
    _task_cost(monkeypatch, 0.0)


def _task_cost(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    facts = dataclasses.replace(
        get_system_info(), thread_roundtrip_s=seconds, process_roundtrip_s=seconds
    )
    monkeypatch.setattr(executor_module, "get_system_info", lambda: facts)


@pytest.mark.parametrize("backend", ["threads", "processes"])
@pytest.mark.parametrize("kind", ["list", "generator", "checkpoint"])
def test_adaptive_chunks_run_every_item_once_in_order(backend, kind, tmp_path, free_tasks):
    """Chunks cut by the sizer cover every item once: lists, generators, checkpoint segments."""
    data = list(range(3_000))
    feed = (x for x in data) if kind == "generator" else data
    extra = {"checkpoint": tmp_path / "c.db"} if kind == "checkpoint" else {}
    results, report = execute(square, feed, backend=backend, n_jobs=2, return_plan=True, **extra)
    assert results == [x * x for x in data]
    assert report.chunk_sizes is not None
    lo, hi = report.chunk_sizes
    assert 1 <= lo <= hi <= GROWTH * report.chunksize


@pytest.mark.parametrize("feed", [range, lambda n: (x for x in range(n))], ids=["range", "generator"])
def test_tail_chunks_shrink_in_a_run(feed, free_tasks):
    """A run ends with one-item chunks when tasks cost nothing, whether its length is known
    or only found at the end of a generator (read ahead)."""
    results, report = execute(square, feed(5_000), backend="threads", n_jobs=2, return_plan=True)
    assert results == [x * x for x in range(5_000)]
    assert report.chunk_sizes is not None
    assert report.chunk_sizes[0] == 1
    assert "smaller toward the end" in str(report)


@pytest.mark.parametrize("n", [1, 39, 40, 41, 400])
def test_a_generator_is_read_ahead_so_its_tail_shrinks(n: int) -> None:
    """Chunks of an input of unknown length: every item once, in order, and once the input
    ends within the read-ahead, the last chunks get smaller, as for a known length."""
    sizer = ChunkSizer(10, 2, item_seconds=1e-3, task_seconds=0.0)
    read: list[int] = []

    def feed():
        for x in range(n):
            read.append(x)
            yield x

    chunks = []
    for start, items in executor_module._read_ahead_chunks(feed(), 5, sizer):
        assert len(read) - (start - 5 + len(items)) <= sizer.read_ahead  # bounded
        chunks.append((start, items))
    assert [x for _, items in chunks for x in items] == list(range(n))
    assert [start for start, _ in chunks] == [5 + sum(len(i) for _, i in chunks[:k])
                                              for k in range(len(chunks))]
    sizes = [len(items) for _, items in chunks]
    assert max(sizes) <= 10 and (n < 40 or sizes[-1] < 10)


@pytest.mark.parametrize(("one_block", "pulled"), [(True, 40), (False, 10)])
def test_only_execute_reads_a_generator_ahead(one_block: bool, pulled: int) -> None:
    """execute waits for all results anyway and reads a tail ahead; execute_iter reads one
    chunk at a time, so that a live stream's first results are not held back."""
    opts = executor_module._plain_options(False, False)
    run = executor_module._Execution(square, iter(()), opts, one_block=one_block)
    run.sizer = ChunkSizer(10, 2, item_seconds=1e-3, task_seconds=0.0)
    source = itertools.count()
    first = next(run._input_chunks(source, 0))
    assert first == (0, list(range(10))) and next(source) == pulled


def test_a_generator_that_raises_has_its_items_run_first() -> None:
    """Items read ahead of an input's error are still cut into chunks; then it is raised."""
    sizer = ChunkSizer(10, 2, item_seconds=1e-3, task_seconds=0.0)

    def feed():
        yield from range(25)
        raise KeyError("input broke")

    got: list[int] = []
    with pytest.raises(KeyError, match="input broke"):
        for _, items in executor_module._read_ahead_chunks(feed(), 0, sizer):
            got += items
    assert got == list(range(25))


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_an_input_that_raises_ends_a_parallel_run_with_its_error(backend: str) -> None:
    """A generator raising mid-run is the run's error (not an item failure), in collect mode
    too."""

    def feed():
        yield from range(3_000)
        raise KeyError("input broke")

    with pytest.raises(KeyError, match="input broke"):
        execute(square, feed(), backend=backend, n_jobs=2, on_error="collect")


class _AfterSampling(RunObserver):
    """Sets ``event`` when execute hands out the sampled results (before any chunk runs)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_success(self, index, item, result):
        self.event.set()


def test_items_faster_than_sampled_replan(monkeypatch):
    """Items that wait 2 ms while sampled and return at once afterwards, on tasks that cost
    0.1 ms: chunks grow, and the report names the re-plan and why."""
    _task_cost(monkeypatch, 1e-4)
    ran = threading.Event()

    def func(x):
        if not ran.is_set():
            time.sleep(0.002)
        return x

    results, report = execute(
        func, range(3_000), backend="threads", n_jobs=2, return_plan=True,
        observers=[_AfterSampling(ran)],
    )  # fmt: skip
    assert results == list(range(3_000))
    assert report.replans, str(report)
    assert "per item, not" in report.replans[0]
    assert "re-planned" in str(report)


def test_ordered_iter_never_grows_chunks(free_tasks):
    """execute_iter(ordered=True) with adaptive chunks (never above the plan's) keeps order."""
    got = list(execute_iter(square, iter(range(3_000)), backend="threads", n_jobs=2))
    assert got == [x * x for x in range(3_000)]


@pytest.mark.parametrize(
    ("backend", "options"), [("serial", {}), ("threads", {"chunksize": 7, "n_jobs": 2})]
)
def test_fixed_chunks_stay_fixed(backend, options):
    """Serial plans and a caller's chunk size keep the plan's chunks: no sizes to report."""
    _, report = execute(square, range(500), backend=backend, return_plan=True, **options)
    assert (report.chunk_sizes, report.replans) == (None, [])
    assert "chunks:" not in str(report)


def test_report_without_replans_says_so():
    """The report's chunk line counts re-plans even when there were none."""
    report = RunReport("threads", 2, 10, "why", chunk_sizes=(1, 10))
    assert "chunks: 1-10 items" in str(report)
    assert "re-planned 0 times)" in str(report)


def test_a_slowdown_does_not_shrink_chunks_below_the_sampled_overhead_floor():
    """Items 5x slower than sampled (a loaded machine, say), length unknown: chunks shrink
    no further than per-task overhead on the *sampled* item time allows, so no churn."""
    # 0.15 ms per task, 1.37 ms sampled: 4 items keep overhead under 3 %; 7 planned.
    sizer = ChunkSizer(7, 2, item_seconds=1.37e-3, task_seconds=1.5e-4)
    for k in range(300):
        size = sizer.next_size(None)
        slow = (k // 10) % 2 == 0  # the load comes and goes
        sizer.observe(size, size * (6.7e-3 if slow else 3.3e-3) + sizer.task_seconds)
    assert sizer.smallest >= 4
    assert sizer.replans == []
