"""What a run's chunks did, in bounded memory: the data behind ``execute(report=...)``.

Data flow of one chunk's times::

    worker (processes, dask: _wire.run_and_pack; threads)      parent (executor)
    ------------------------------------------------------      -----------------
    t0 = monotonic(); run_chunk_fast(...); t1 = monotonic()
    ── (t0, t1, worker id) ride on the result message ──▶ stamp(task, t0, t1, worker)
                                                          taken by the executor on receipt
                                                          (take), else dispatch/receipt times
                                                          ──▶ ChunkSpan ──▶ Timeline.add
                                                              and RunObserver.on_chunk

``time.monotonic`` is one system-wide clock on Linux, macOS and Windows, so times taken in
worker processes line up with the parent's. Recording costs two clock reads and a tuple per
chunk, never anything per item.

A ``Timeline`` keeps at most ``max_spans`` spans: when full, each worker's spans are merged
in neighbouring pairs (their union: first start, last end, summed counts), so an infinite
run keeps a picture of its whole history at a coarser grain, never an unbounded list.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, NamedTuple

__all__ = ["MAX_SPANS", "ChunkSpan", "Timeline", "forget", "stamp", "take"]

#: Spans a ``Timeline`` keeps before it merges neighbours (~100 bytes each: ~1 MB).
MAX_SPANS = 10_000

# Worker-side times of chunks received but not yet taken, by id(task): (start index, item
# count, t0, t1, worker). Set by a backend just before it yields the task, popped by the
# executor right after; the (start, count) check guards against a stale entry whose task
# id was reused. Entries nobody takes (a sampling run, a run closed early) are dropped in
# bulk once there are too many.
_STAMPS: dict[int, tuple[int, int, float, float, int]] = {}
_MAX_STAMPS = 4096


class ChunkSpan(NamedTuple):
    """One chunk (or, after downsampling, ``chunks`` neighbouring chunks) of one worker: what
    ``RunObserver.on_chunk`` receives and ``RunReport.timeline.spans`` holds.

    ``worker``: a process id or thread id where the chunk ran, or a negative slot number
    when the backend did not say (then ``start``/``end`` are the parent's dispatch and
    receipt times). ``start``/``end``: ``time.monotonic()`` seconds. ``first``: input index
    of the chunk's first item.
    """

    worker: int
    start: float
    end: float
    items: int
    failed: int
    first: int
    chunks: int = 1


def stamp(task: Any, t0: float, t1: float, worker: int) -> None:
    """Record where and when ``task`` (a ``Task``) ran; the executor ``take``\\ s it."""
    if len(_STAMPS) >= _MAX_STAMPS:
        _STAMPS.clear()
    _STAMPS[id(task)] = (task.start, len(task.items), t0, t1, worker)


def forget(task: Any) -> None:
    """Drop a stale stamp under ``task``'s id (a finished task of an earlier run whose id
    this one reuses): called when ``task`` is dispatched, before anything can stamp it."""
    _STAMPS.pop(id(task), None)


def take(task: Any) -> tuple[float, float, int] | None:
    """``(t0, t1, worker)`` stamped for ``task``, or None (the backend measured nothing)."""
    got = _STAMPS.pop(id(task), None)
    if got is None or got[0] != task.start or got[1] != len(task.items):
        return None
    return got[2], got[3], got[4]


class Timeline:
    """The chunks of one run, bounded (see the module docstring).

    ``origin`` is the run's start (``time.monotonic()``); ``dispatch_started`` when the first
    chunk was sent (planning and sampling came before). Totals count every chunk ever added,
    also those merged away.

    >>> tl = Timeline(max_spans=4)
    >>> for k in range(6):
    ...     tl.add(ChunkSpan(1, k, k + 1, 10, 0, 10 * k))
    >>> len(tl.spans), tl.total_chunks, tl.total_items
    (2, 6, 60)
    """

    def __init__(self, origin: float | None = None, *, max_spans: int = MAX_SPANS) -> None:
        self.origin = time.monotonic() if origin is None else origin
        self.max_spans = max(2, int(max_spans))
        self.spans: list[ChunkSpan] = []
        self.dispatch_started: float | None = None
        self.total_chunks = 0
        self.total_items = 0
        self.total_failed = 0
        self.merges = 0  # how many times the spans were halved
        # Slots for spans whose worker is unknown: the time each slot is busy until.
        self._slots: list[float] = []

    def add(self, span: ChunkSpan) -> None:
        """Record a finished chunk; merges neighbours when ``max_spans`` are held."""
        self.spans.append(span)
        self.total_chunks += span.chunks
        self.total_items += span.items
        self.total_failed += span.failed
        if len(self.spans) >= self.max_spans:
            self._downsample()

    def add_unplaced(
        self, start: float, end: float, items: int, failed: int, first: int
    ) -> ChunkSpan:
        """A chunk whose worker is unknown: it goes to the first slot free at ``start``
        (slots are numbered -1, -2, ...), so that bars never overlap in a lane."""
        slots = self._slots
        for k, busy in enumerate(slots):
            if busy <= start:
                slots[k] = end
                break
        else:
            slots.append(end)
            k = len(slots) - 1
        span = ChunkSpan(-1 - k, start, end, items, failed, first)
        self.add(span)
        return span

    def _downsample(self) -> None:
        """Halve the spans: each worker's spans merged in neighbouring pairs, in time order."""
        by_worker: dict[int, list[ChunkSpan]] = {}
        for span in self.spans:
            by_worker.setdefault(span.worker, []).append(span)
        merged: list[ChunkSpan] = []
        for spans in by_worker.values():
            spans.sort(key=lambda s: s.start)
            merged.extend(_pairs(spans))
        merged.sort(key=lambda s: s.start)
        self.spans = merged
        self.merges += 1

    def workers(self) -> list[int]:
        """Worker ids in the order they first ran a chunk."""
        seen: dict[int, None] = {}
        for span in sorted(self.spans, key=lambda s: s.start):
            seen.setdefault(span.worker, None)
        return list(seen)

    def throughput(self, bins: int = 60) -> list[tuple[float, float]]:
        """``(seconds since origin, items per second)`` in ``bins`` equal time bins, each
        chunk's items spread evenly over its span."""
        if not self.spans:
            return []
        lo = min(s.start for s in self.spans)
        hi = max(s.end for s in self.spans)
        width = max(hi - lo, 1e-9) / bins
        counts = [0.0] * bins
        for s in self.spans:
            _spread(counts, lo, width, s.start, max(s.end, s.start + 1e-12), s.items)
        return [(lo - self.origin + (k + 0.5) * width, c / width) for k, c in enumerate(counts)]

    def to_rows(self) -> list[tuple[float, ...]]:
        """The spans as plain number tuples, times relative to ``origin`` (for storage)."""
        o = self.origin
        return [(s.worker, s.start - o, s.end - o, s.items, s.failed, s.first, s.chunks)
                for s in self.spans]  # fmt: skip

    @classmethod
    def from_rows(cls, rows: Iterable[Iterable[float]], *, max_spans: int = MAX_SPANS) -> Timeline:
        """A timeline (origin 0) from ``to_rows`` tuples."""
        tl = cls(0.0, max_spans=max_spans)
        for row in rows:
            w, t0, t1, n, f, first, chunks = row
            tl.add(ChunkSpan(int(w), float(t0), float(t1), int(n), int(f), int(first), int(chunks)))
        return tl


def _pairs(spans: list[ChunkSpan]) -> Iterable[ChunkSpan]:
    """Neighbouring spans of one worker merged two by two (an odd last one kept)."""
    for k in range(0, len(spans) - 1, 2):
        a, b = spans[k], spans[k + 1]
        yield ChunkSpan(a.worker, a.start, max(a.end, b.end), a.items + b.items,
                        a.failed + b.failed, min(a.first, b.first), a.chunks + b.chunks)  # fmt: skip
    if len(spans) % 2:
        yield spans[-1]


def _spread(counts: list[float], lo: float, width: float, t0: float, t1: float, n: int) -> None:
    """Add ``n`` items spread evenly over ``[t0, t1]`` to the bins ``counts``."""
    last = len(counts) - 1
    k0 = int((t0 - lo) / width)
    k1 = int((t1 - lo) / width)
    k0 = 0 if k0 < 0 else last if k0 > last else k0
    k1 = 0 if k1 < 0 else last if k1 > last else k1
    if k0 == k1:  # most chunks: within one bin (no builtin calls: this runs per span)
        counts[k0] += n
        return
    rate = n / (t1 - t0)
    for k in range(k0, k1 + 1):
        a = max(t0, lo + k * width)
        b = min(t1, lo + (k + 1) * width)
        if b > a:
            counts[k] += rate * (b - a)
