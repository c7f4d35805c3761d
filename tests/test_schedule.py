"""ChunkSizer: chunk sizes during a parallel run (guided tail, re-planning from measured times)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from amorsize._schedule import GROWTH, ChunkSizer

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


@given(st.sampled_from([None, 10_000]))
def test_slower_items_than_sampled_shrink_chunks(remaining):
    """Items 10x slower than sampled: the chunk size drops ~10x, once, and says why."""
    sizer = ChunkSizer(100, 2, item_seconds=1e-4, task_seconds=0.0)
    for _ in range(6):
        sizer.observe(sizer.next_size(remaining), 100 * 1e-3)
    assert sizer.size == 10
    [replan] = sizer.replans
    assert (replan.old_size, replan.new_size) == (100, 10)
    assert "1 ms per item, not 0.1 ms: chunksize 100 -> 10" in str(replan)


def test_faster_items_grow_chunks_within_bounds():
    """Items 100x faster than sampled: chunks grow, at most GROWTH times the plan."""
    sizer = ChunkSizer(10, 2, item_seconds=1e-2, task_seconds=0.0)
    for _ in range(8):
        sizer.observe(10, 10 * 1e-4)
    assert sizer.size == GROWTH * 10
    assert sizer.next_size(None) == GROWTH * 10


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
