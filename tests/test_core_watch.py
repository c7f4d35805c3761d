"""The watcher's waits (``_core_watch.pxi``): a posted item is reported only once it looks
blocked, quick items never, one item at a time, and in a forked child afresh."""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from amorsize import sampling
from amorsize._core import WatchBoard

pytestmark = pytest.mark.skipif(
    not hasattr(time, "pthread_getcpuclockid"), reason="needs a thread CPU clock (Linux, BSD)"
)

AFTER, MAX_CPU, CHECKS = 1e-3, 0.1, 2


def _clock() -> int:
    return time.pthread_getcpuclockid(threading.get_ident())


def _tid() -> int:
    return threading.get_native_id()


class Watcher:
    """``WatchBoard.wait`` in a thread of its own; ``reports`` gets what each return named."""

    def __init__(self, board: WatchBoard, after: float = AFTER) -> None:
        self.board = board
        self.after = after
        self.reports: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            generation = self.board.wait(self.after, MAX_CPU, CHECKS)
            self.reports.put(self.board.current(generation))

    def saw_blocked(self, name: str) -> bool:
        """Post ``name`` and block until the watcher names it (other reports: items that a
        busy machine kept off the CPU long enough to look blocked)."""
        assert self.board.post(name, _clock(), _tid())
        try:
            while True:
                if self.reports.get(timeout=30.0) == name:  # blocked here meanwhile
                    return True
        finally:
            self.board.end()


def test_one_item_at_a_time() -> None:
    """A second post while an item runs is refused; after end() a post is taken."""
    board = WatchBoard()
    assert board.post("a", _clock(), _tid()) and not board.post("b", _clock(), _tid())
    board.end()
    assert board.post("c", _clock(), _tid()) and board.generation == 2
    assert board.current(2) == "c" and board.current(1) is None
    board.end()
    assert board.current(2) is None


def test_a_blocked_item_is_reported_after_quick_ones() -> None:
    """Quick items come and go; the one that blocks is named once it has."""
    board = WatchBoard()
    watcher = Watcher(board)
    for k in range(50):  # quick items: posted and ended at once
        assert board.post(f"quick {k}", _clock(), _tid())
        board.end()
    assert watcher.saw_blocked("blocked")
    assert watcher.saw_blocked("blocked again")  # the watcher goes on


def _times_blocked(native_id: int) -> int:
    """How often thread ``native_id`` of this process went to sleep so far."""
    with open(f"/proc/self/task/{native_id}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the alarm is a timerfd")
def test_quick_items_wake_nobody() -> None:
    """A post arms an alarm and end() disarms it: the watcher sleeps through quick items
    (a wake-up each cost a TLB-flush IPI on every later munmap of the caller)."""
    board = WatchBoard()
    watcher = Watcher(board, after=60.0)  # no alarm can ring during the test
    assert board.post("first", _clock(), _tid())  # the watcher's first look may come now
    board.end()
    tid = watcher.thread.native_id
    assert tid is not None
    before = _times_blocked(tid)
    for k in range(500):
        assert board.post(f"quick {k}", _clock(), _tid())
        board.end()
    # The first post may still be being looked at (it rang at once, before the watcher's
    # first wait set the delay): a few wake-ups, not hundreds.
    assert _times_blocked(tid) - before <= 5
    assert watcher.reports.empty()


def test_without_an_alarm_a_post_wakes_the_watcher(
    in_forked_child: Callable[[Callable[[], int]], int],
) -> None:
    """Where no alarm can be made (here: no file descriptor left for the timerfd), a post
    releases the watcher's lock instead, and a blocked item is still reported."""
    import resource

    def without_descriptors() -> int:
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, lowest_free))
        try:
            os.close(os.dup(0))
            return 3  # a descriptor was still free: the alarm would have been made
        except OSError:
            return 0 if Watcher(WatchBoard()).saw_blocked("blocked") else 2

    assert in_forked_child(without_descriptors) == 0


def test_an_item_off_the_cpu_but_runnable_is_not_reported() -> None:
    """Low CPU alone is not waiting: an item whose thread reads as runnable (as a preempted
    one does on a busy machine) is not reported. The state is read without the GIL: read
    after taking it, a CPU-bound caller waiting for that very GIL read as blocked, and its
    next items spilled onto threads in the caller (a crash test caught it under load)."""
    board = WatchBoard()
    watcher = Watcher(board)
    gate = threading.Event()
    sleeper = threading.Thread(target=gate.wait)  # blocked: no CPU, state S
    sleeper.start()
    try:
        assert sleeper.ident is not None and sleeper.native_id is not None
        idle_clock = time.pthread_getcpuclockid(sleeper.ident)
        # The sleeper's clock (never advances) with this thread's state (running).
        assert board.post("runnable", idle_clock, _tid())
        spin_until = time.thread_time() + 40 * AFTER  # CPU time: many checks' worth
        while time.thread_time() < spin_until:
            pass
        board.end()
        assert watcher.reports.empty()
        assert board.post("blocked", idle_clock, sleeper.native_id)  # both the sleeper's
        assert watcher.reports.get(timeout=30.0) == "blocked"
        board.end()
    finally:
        gate.set()
        sleeper.join()


def test_posts_from_many_threads_never_share_the_board() -> None:
    """Eight threads posting and ending at once: a post is taken alone or refused, and the
    watcher still reports a blocked item afterwards."""
    board = WatchBoard()
    watcher = Watcher(board)
    inside = 0
    overlaps: list[int] = []
    lock = threading.Lock()

    def caller() -> None:
        nonlocal inside
        for _ in range(500):
            if board.post("x", _clock(), _tid()):
                with lock:
                    inside += 1
                    overlaps.append(inside)
                with lock:
                    inside -= 1
                board.end()

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps and max(overlaps) == 1
    assert watcher.saw_blocked("after the storm")


def test_a_forked_child_gets_its_own_watcher(
    in_forked_child: Callable[[Callable[[], int]], int],
) -> None:
    """The child has no watcher thread: its first watch starts one, and a waiting first
    item still spills there."""
    sampling.start_watcher()

    def spills() -> int:  # whether a waiting first item spilled in the child
        spilled = threading.Event()
        gate = threading.Event()

        def first_waits(x: int) -> int:
            if x == 0:
                gate.wait(30.0)
            else:
                spilled.set()
                gate.set()
            return x

        from amorsize.backends import get_backend

        spill = get_backend("threads").spill_runner()
        s = sampling.sample(first_waits, list(range(8)), spill=spill)
        return 0 if spilled.is_set() and s.results == tuple(range(8)) else 2

    assert in_forked_child(spills) == 0
