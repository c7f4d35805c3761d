"""Chunk sizes during a parallel run: the sampled model, corrected as chunks complete.

The optimizer picks a chunk size from a few sampled items. Two things it cannot know then:

* **the end of the run.** Equal chunks leave workers idle while the last ones finish; so,
  factoring-style (guided self-scheduling), no chunk holds more than
  ``remaining / (TAIL_FACTOR * n_jobs)`` items, and the last chunks finish together;
* **the real item time.** Items that turn out far slower or faster than sampled (a skewed
  input, a warm cache, a slow phase) would keep a chunk size planned for other work; so
  the measured per-item time (an exponentially weighted mean over completed chunks, per-task
  overhead taken off) corrects the plan once it is off by more than ``REPLAN_RATIO``.
  Slower items (by more than ``SHRINK_RATIO``) shrink chunks to the planned duration, but
  only when the run's length is unknown: with a known length the tail already balances the end, and smaller chunks would
  only add per-task overhead. Faster items grow chunks only as far as per-task overhead
  needs (at most ``MAX_OVERHEAD`` of a chunk's work): bigger chunks would unbalance the end.
  A new size is taken only when the measure moved by more than ``REPLAN_RATIO`` since the
  last change and the size would too, so noise (a skewed input) does not churn it.

Chunks never shrink below the size that keeps per-task overhead under ``MAX_OVERHEAD`` of
the work (or the planned size, if that is smaller: the plan knew better; when items turn out
slower, of the sampled work: the slowdown may be the machine's load), nor grow beyond
``GROWTH`` times the planned size (memory in flight stays bounded). Pure arithmetic: no
clock, no I/O; the executor passes measured seconds in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ChunkSizer", "Replan"]

# Chunks of the tail hold at most remaining / (TAIL_FACTOR * n_jobs) items: with two
# rounds per worker of what is left, the last chunks are small enough to finish together.
TAIL_FACTOR = 2
# Per-task overhead may cost at most this share of a chunk's work.
MAX_OVERHEAD = 0.03
# Weight kept by the previous per-item estimate at each completed chunk, for 2 workers (~9
# chunks' memory); more workers remember more chunks (4 per worker), since their completions
# arrive in bursts that a short memory would read as items far faster or slower than they are.
DECAY = 8 / 9
# Re-plan only when the measured per-item time is off by more than this factor: closer than
# that, the planned size is near its optimum and measurement noise would only churn it.
REPLAN_RATIO = 2.0
# Slower items shrink chunks only when this far off: a smaller chunk costs per-task overhead
# for sure and helps only the balance of a run of unknown length, and a loaded machine alone
# makes items look 2-3x slower in a run than in the sample (measured on 2 cores, load 5).
SHRINK_RATIO = 2 * REPLAN_RATIO
# Chunks grow at most this many times the planned size when items turn out faster.
GROWTH = 4


@dataclass(frozen=True)
class Replan:
    """One change of chunk size during a run, and why."""

    after_items: int
    expected_seconds: float
    measured_seconds: float
    old_size: int
    new_size: int

    def __str__(self) -> str:
        return (
            f"after {self.after_items} items: {self.measured_seconds * 1e3:.3g} ms per item, "
            f"not {self.expected_seconds * 1e3:.3g} ms: chunksize {self.old_size} -> "
            f"{self.new_size}"
        )


class ChunkSizer:
    """The size of the next chunk of a parallel run (see the module docstring).

    ``chunksize`` and ``n_jobs`` are the plan's, ``item_seconds`` the sampled time per item
    (0 if unknown), ``task_seconds`` the backend's cost per task (a round trip).
    ``grow=False`` keeps every chunk at most the planned size (a bound that depends on it,
    such as an ordered reorder window, stays true).

    >>> s = ChunkSizer(100, 2, item_seconds=1e-3, task_seconds=1e-4)
    >>> s.next_size(None), s.next_size(1000), s.next_size(40)
    (100, 100, 10)
    """

    __slots__ = (
        "_items", "_seconds", "basis", "chunks", "decay", "floor_items", "known_length", "largest", "limit",
        "n_jobs", "observations", "observed_items", "planned", "replans", "sampled", "size", "smallest",
        "task_seconds",
    )  # fmt: skip

    def __init__(
        self,
        chunksize: int,
        n_jobs: int,
        *,
        item_seconds: float,
        task_seconds: float,
        grow: bool = True,
    ) -> None:
        self.planned = self.size = max(1, chunksize)
        self.n_jobs = max(1, n_jobs)
        self.limit = GROWTH * self.planned if grow else self.planned
        self.decay = max(DECAY, 1.0 - 1.0 / (1 + 4 * self.n_jobs))
        # The per-item time the current size is based on (0: unknown, adopt the first measure).
        self.basis = self.sampled = max(0.0, item_seconds)
        self.known_length: bool | None = None
        self.task_seconds = max(0.0, task_seconds)
        self.floor_items = self._floor(self.basis)
        self.replans: list[Replan] = []
        self.chunks = self.observations = self.observed_items = 0
        self.smallest = self.largest = 0
        self._items = self._seconds = 0.0

    def _overhead_bound(self, item_seconds: float) -> int:
        """Items a chunk needs for per-task overhead to stay under ``MAX_OVERHEAD``."""
        if item_seconds <= 0.0:
            return self.limit if self.task_seconds > 0.0 else 1
        return max(1, math.ceil(self.task_seconds / (MAX_OVERHEAD * item_seconds)))

    def _floor(self, item_seconds: float) -> int:
        """The smallest chunk the tail cuts: overhead-bound, never above the plan."""
        if item_seconds <= 0.0:
            return self.planned
        return min(self.planned, self._overhead_bound(item_seconds))

    @property
    def read_ahead(self) -> int:
        """Items to read ahead of an input of unknown length: if it ends among them, the
        tail's chunks can still be cut to finish together (``next_size(len(them))``).

        >>> ChunkSizer(10, 2, item_seconds=1e-3, task_seconds=0.0).read_ahead
        40
        """
        return TAIL_FACTOR * self.n_jobs * self.size

    def next_size(self, remaining: int | None) -> int:
        """Items in the next chunk; ``remaining`` is what is left to cut (None: unknown)."""
        size = self.size
        self.known_length = remaining is not None
        if remaining is not None:
            tail = math.ceil(remaining / (TAIL_FACTOR * self.n_jobs))
            size = max(1, min(size, max(self.floor_items, tail), remaining))
        self.chunks += 1
        self.smallest = size if self.chunks == 1 else min(self.smallest, size)
        self.largest = max(self.largest, size)
        return size

    def observe(self, items: int, seconds: float) -> None:
        """A chunk of ``items`` took ``seconds`` of a worker's time (overhead included)."""
        if items <= 0:
            return
        self.observations += 1
        self.observed_items += items
        self._items = self.decay * self._items + items
        self._seconds = self.decay * self._seconds + max(0.0, seconds - self.task_seconds)
        measured = self._seconds / self._items
        if self.sampled <= 0.0:
            self.sampled = self.basis = measured
            self.floor_items = self._floor(measured)
            return
        # Wait for a couple of chunks per worker: the first completions carry start-up noise.
        if self.observations < 2 * self.n_jobs:
            return
        if self.basis > 0.0 and measured > 0.0:
            moved = measured / self.basis
            if 1.0 / REPLAN_RATIO <= moved <= REPLAN_RATIO:
                return
        self._replan(measured)

    def _replan(self, measured: float) -> None:
        """Rescale the planned size to ``measured`` seconds per item, if far enough off."""
        ratio = measured / self.sampled
        target = self.planned
        if ratio > SHRINK_RATIO and self.known_length is False:
            # The floor of the sampled time, not the measured one: a slowdown may be the
            # machine's (a loaded machine slows the workers and each task's overhead
            # alike), and chunks cut for it kept flipping between the floor and the plan
            # as the load came and went (7 -> 1 -> 7 ... on 1 ms items at load 9-13).
            target = max(self._floor(self.sampled), round(self.planned / ratio))
        elif ratio < 1.0 / REPLAN_RATIO:
            need = self._overhead_bound(measured)
            target = max(self.planned, need)
        target = max(1, min(self.limit, target))
        if max(target, self.size) <= REPLAN_RATIO * min(target, self.size):
            return  # within REPLAN_RATIO of the current size: keep it (no churn on noise)
        self.floor_items = self._floor(measured)
        self.replans.append(Replan(self.observed_items, self.basis, measured, self.size, target))
        self.size, self.basis = target, measured
