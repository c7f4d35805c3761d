"""Run ``func`` on the first few items to learn what one item costs.

Data flow::

    data ──▶ first items ──▶ func(item), timed with perf_counter only ──▶ results kept
      │          │                                                      (execute reuses them)
      │          └─▶ pickle.dumps(batch of inputs / outputs) ──▶ sizes and (un)pickling times
      └─▶ Sample.data: the list itself, or chain(sampled items, rest of the iterator)

The count adapts: sampling stops after about :data:`SAMPLE_BUDGET_S`, or a small fraction
of the predicted serial time, or :data:`MAX_SAMPLE_ITEMS` items, whichever comes first, so
slow items are sampled once or twice and microsecond items a few thousand times. Nothing
(no tracemalloc, no profiler) wraps the timed calls; memory is read between calls.

Items run in the calling thread, or in batches in a worker process (``remote``: the executor
passes one built on the processes backend), where ``TimedCall`` measures each call and a
crash only fails its item. A failure either stops the sample or, with ``keep_going``, is a
data point kept in its slot (``SampledFailure``).

The two-thread probe (``sample(probe_threads=True)``): when the sample adapts and shows
CPU work (not waiting) of at least ``PROBE_MIN_ITEM_S`` per item, with enough items left
that the probe costs at most ``SAMPLE_FRACTION`` of the best parallel run, the next items
run in rounds of about ``2 * PROBE_SIDE_S`` of work on two threads at once (in the calling
process): their CPU seconds while both ran give ``Profile.thread_overlap``
(``probe_overlap``). Their results are kept like any sampled item (a failure stops the
probe; items the other thread ran past it are dropped, like a parallel run's, and stay in
the data). With ``offload``, the probe runs in the caller just before the sample would
move to ``remote``; if the threads overlapped, the rest of the sample stays in the caller.

Spilling (``sample(spill=...)``): when the sample adapts and its first item runs in the
caller, a watcher thread reads the caller's CPU clock while that item runs. Once it has
waited (run ``SPILL_AFTER_S`` at under a tenth of a core), up to ``spill_items`` next items
start on threads at once through ``spill``, and the sample takes them all: waiting work
then loses no whole item time to a lone first item. A failure among them is handled as in
the probe.

>>> s = sample(abs, [-1, 2, -3])
>>> s.results, s.profile.n_sampled
((1, 2, 3), 3)
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import itertools
import math
import operator
import os
import pickle
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from amorsize._core import WatchBoard

__all__ = [
    "ASSUMED_UNKNOWN_LENGTH",
    "MAX_SAMPLE_ITEMS",
    "SAMPLE_BUDGET_S",
    "UNKNOWN_SAMPLE_HORIZON",
    "ItemRun",
    "Profile",
    "Sample",
    "SampledFailure",
    "TimedCall",
    "sample",
]

# Wall-time budget for sampling. Sampled results are reused, so the real cost is only the
# parallelism lost on these items: 50 ms is < 5% of the ~1 s jobs where parallelism starts
# to pay on a small machine.
SAMPLE_BUDGET_S = 0.05
# Stop once sampling has taken this fraction of the best conceivable parallel run time
# (items / cores for CPU-bound work, items / IO_PARALLELISM for waiting work): sampled items
# run serially, so on a job that parallelises 30x even a short sample is a large share.
SAMPLE_FRACTION = 0.03
# Parallelism assumed reachable for waiting (I/O-bound) items, as the optimizer's threads.
IO_PARALLELISM = 32.0
# Below this much sampling time, keep going: a mean from a few microsecond calls is noise.
_MIN_SAMPLE_S = 0.001
# Enough microsecond items for a stable mean and spread; more only costs memory.
MAX_SAMPLE_ITEMS = 2000
# Inputs/outputs pickled (as one batch, as a chunk is) to size them: at most this many
# items and, beyond two items, about this many bytes.
_PICKLE_ITEMS = 256
# ... and at most this many when the items are tiny (see ``_sizes``).
_PICKLE_TINY = 32
# A 1 MB batch: a 2 MB one cost gil_zlib (16-200 KB blobs) ~2.1 ms of a 55 ms first call, mostly
# page faults on fresh memory, 1 MB ~1.0 ms (the same decisions on bench_quality.py big_input_200kb
# and big_output_1mb).
_PICKLE_BYTES = 1 << 20
#: Planning horizon for iterators of unknown length: long enough that start-up amortises,
#: the common case for generators fed to a parallel map.
ASSUMED_UNKNOWN_LENGTH = 10_000
#: ... but an iterator of unknown length is sampled as if this many items followed: the
#: sample runs serially, and a stream shorter than the horizon (400 items of 1 ms, say)
#: would lose up to 3 % of 10,000 items' run to it; the run corrects a rough mean anyway
#: (chunk sizes are re-planned from measured chunk times, ``_schedule``).
UNKNOWN_SAMPLE_HORIZON = 1_000
# The two-thread probe (does the work release the GIL?): each thread runs about this much
# work, long enough that thread start-up and the GIL's 5 ms switch interval show as what
# they are (two GIL-bound halves of 2 ms run one after the other).
PROBE_SIDE_S = 2e-3
# Only items at least this slow are probed: below it the executor's per-item bookkeeping
# alone keeps a thread plan from paying off, and waking threads per item is noise.
PROBE_MIN_ITEM_S = 50e-6
# How long the two probe threads wait for each other to start before giving up.
_PROBE_START_TIMEOUT_S = 1.0
# Probe rounds at most (within the probe's share of the run, see ``_probe_size``): a busy
# machine gives two threads two cores only now and then, and the best round counts.
PROBE_ROUNDS = 4
# One round is taken when it costs at most this share of the best parallel run left (the
# rounds after it, SAMPLE_FRACTION): at worst, pure Python work that processes would run
# twice as fast loses this share; GIL-releasing work of 400 zlib items (bench_oracle.py
# gil_zlib, 0.1 s serially) wins 2x on threads.
PROBE_FIRST_ROUND_SHARE = 0.1
_PROBE_MIN_SIDE = 4
# Items that waited this share of their time or more are not probed: threads overlap
# waits anyway (on a busy machine CPU work can read as half waiting: descheduled).
_PROBE_MAX_WAIT = 0.5
# A round showing this much overlap settles it: no more rounds.
_PROBE_CLEAR = 0.5
# A round whose threads were preempted this many times (involuntary switches, both together)
# did not have two cores: a lone planned round is run again, up to _PROBE_RERUNS times.
# Measured on the 2-core machine (benchmarks/bench_probe.py: zlib, first calls): rounds that
# read zlib as GIL-bound showed 3-4 preemptions of the caller's thread; clean rounds 0-1,
# GIL-bound or not.
_PROBE_PREEMPTED = 2
_PROBE_RERUNS = 1
# A helper that has not started after the caller ran items alone this long was kept out by
# the GIL, not by a late core: an idle core of the 2-core virtual machine took ~1.5 ms to
# come back (benchmarks/bench_probe.py), and this is twice that.
_PROBE_LATE_S = 3e-3
# A window both threads ran in that is this long tells, preempted or not: preemptions cost
# it a few ms at most. GIL-bound rounds of 30 ms (bench_oracle.py skewed) showed 6-12
# preemptions, from the GIL's own hand-overs; zlib's disturbed rounds lasted 2-4 ms.
_PROBE_LONG_S = 10e-3
# Spilling (``sample(spill=...)``): once the first item has run this long in the caller
# with its thread's CPU clock below _SPILL_MAX_CPU of that time, it waits (I/O, sleep), and
# the next items start at once on threads instead of a whole item time later. The CPU
# share is read again at doubling intervals: an item may compute first, then wait.
SPILL_AFTER_S = 5e-4
_SPILL_MAX_CPU = 0.1
# Checks in a row that must find the item waiting: between two checks the watcher lets go
# of the GIL, so a CPU-bound item that a busy machine had merely preempted (or that gave
# the GIL to the watcher) runs again and shows its CPU time.
_SPILL_CHECKS = 2
#: Most items spilled onto threads at once (as many threads as items).
SPILL_MAX_ITEMS = 256
# Items after one at least this slow get their CPU time read around the call alone (two
# clock reads, ~1 us: noise on faster items, which the loop's clocks measure well enough).
_TIGHT_CPU_MIN_S = 20e-6
# CPU seconds per wall second of the whole process above which func is taken to run its
# own threads (the optimizer's MULTITHREADED_CPU_RATIO).
_OWN_THREADS_RATIO = 1.3
# Items whose resident-memory growth is read (each read is a small file read, ~5 us).
_MEMORY_ITEMS = 4
# Once this many items in a row took under _BLOCK_ITEM_S each, the caller times them in
# blocks (``_run_blocks``): a perf_counter pair and the bookkeeping around each call cost
# ~0.3 us, several times a 0.1 us item, and the sample of such items is then most of the
# overhead of a serial run. Blocks double up to _BLOCK_MAX items (~0.5 ms at most).
_BLOCK_ITEM_S = 2e-6
_QUICK_RUN = 16
_BLOCK_MAX = 256
# Items this tiny are clearly tiny once this many ran in blocks (16 + 32 + 64 + 128) and
# the last two blocks' per-item times agree within _BLOCK_AGREE: the mean is known well
# enough for any plan (each block averages its items, so the 1 ms floor against per-call
# clock noise does not apply), and every further sampled item costs bookkeeping the run
# would not pay (a list slot, a share of the profile's sums: ~0.1 ms per 2000 items, 1 %
# of a 200k-item run).
_BLOCK_ENOUGH = 240
_BLOCK_AGREE = 2.0
# Blocks compared for that: smaller ones carry a visible share of the block's own cost
# (~1 us: 60 ns per item of a 16-item block).
_BLOCK_ALIKE_MIN = 64
# A block whose wall time exceeds twice its CPU time by more than this, without a voluntary
# switch, was preempted (a busy machine), not waiting: its CPU time is its own time.
_PREEMPT_SLACK_S = 20e-6
_PROTOCOL = pickle.HIGHEST_PROTOCOL


@dataclass(frozen=True)
class Profile:
    """What the sample measured. Times are seconds per item, sizes bytes per item.

    ``cpu_ratio`` is CPU time / wall time over the sample: about 1 for CPU-bound work,
    near 0 for sleeping or waiting on I/O, above 1 when ``func`` runs its own threads.
    ``wait_fraction`` is the share of wall time ``func`` spent blocked (sleep, I/O): the
    missing CPU time when the thread really blocked, 0 when it was merely preempted.
    ``error_index`` / ``error`` name the first item that failed (by input index): sampling
    stopped there unless it kept going, and then ``n_failed`` of the ``n_sampled`` items
    failed (``n_crashed`` of them killed their worker process). ``in_caller`` items ran in
    the calling process (``on_threads`` of them on threads beside a first item that waited:
    ``sample``'s ``spill``), the others in a worker process. ``thread_overlap`` is how far
    two items overlapped on two threads (1: fully, the work releases the GIL; 0: not at
    all), NaN when not probed (see ``sample``).

    >>> sample(len, ["ab", "c"]).profile.n_sampled
    2
    """

    n_sampled: int
    n_items: int | None
    exhausted: bool
    item_seconds: tuple[float, ...]
    mean_seconds: float
    std_seconds: float
    max_seconds: float
    cpu_ratio: float
    wait_fraction: float
    in_bytes: float
    out_bytes: float
    in_dump_seconds: float
    in_load_seconds: float
    out_dump_seconds: float
    out_load_seconds: float
    mem_per_item: float
    func_bytes: int
    func_picklable: bool
    items_picklable: bool
    outputs_picklable: bool
    pickle_error: str | None
    n_failed: int
    n_crashed: int
    in_caller: int
    error_index: int | None
    error: BaseException | None = field(compare=False)
    sample_seconds: float
    thread_overlap: float = math.nan
    on_threads: int = 0

    @property
    def cv(self) -> float:
        """Coefficient of variation of the item times (spread / mean)."""
        return self.std_seconds / self.mean_seconds if self.mean_seconds > 0 else 0.0

    @property
    def stopped_on_error(self) -> bool:
        """Sampling stopped at a failure: the failed item is not among the sampled ones."""
        return self.error_index is not None and self.n_failed == 0

    @property
    def picklable(self) -> bool:
        """Whether function, sampled items and results can all travel to a process."""
        return self.func_picklable and self.items_picklable and self.outputs_picklable


@dataclass(frozen=True)
class Sample:
    """The profile, ``func``'s results for the first items, and the data to run on.

    >>> s = sample(len, iter(["a", "bb", "ccc"]), sample_size=2)
    >>> s.results, list(s.data)
    ((1, 2), ['a', 'bb', 'ccc'])
    """

    profile: Profile
    results: tuple[Any, ...]
    data: Iterable[Any]


def _timer_overhead() -> float:
    """The cost of one perf_counter() call, subtracted from each timed item."""
    pc = time.perf_counter
    best = math.inf
    for _ in range(5):
        t0 = pc()
        t1 = pc()
        best = min(best, t1 - t0)
    return best


def _rss() -> int:
    """This process's resident memory in bytes (0: unknown).

    Read from a descriptor kept open per process: opening /proc/self/statm costs ~35 us,
    a read at offset 0 ~1 us (the file is regenerated on each read), and the first
    sampled item of every run is read twice (on 0.1 us items, 0.7 % of a 200k-item run).
    A forked child drops the parent's descriptor at the fork (``_forked``), so no read
    asks for the process id (a system call each).
    """
    global _statm
    statm = _statm
    try:
        if statm is None:
            statm = _open_statm()
        return int(os.pread(statm[1], 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        _statm = None  # closed behind our back, say: open it again next time
        return 0


def _open_statm() -> tuple[int, int]:
    """``_statm`` for this process, opened once."""
    global _statm
    with _statm_lock:
        if _statm is None:
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        return _statm


# (pid that opened it, descriptor) of /proc/self/statm, opened by ``_rss``.
_statm: tuple[int, int] | None = None
_statm_lock = threading.Lock()


def _forked() -> None:
    """In a forked child: a fresh lock (another thread may have held the parent's), and
    the parent's descriptor closed (it reads the parent's memory)."""
    global _statm_lock, _statm
    _statm_lock = threading.Lock()
    if _statm is not None:
        with contextlib.suppress(OSError):
            os.close(_statm[1])
        _statm = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _voluntary_switches() -> int:
    """Voluntary context switches of this thread so far (it blocked: sleep, I/O, locks).

    Being preempted on a busy machine also lowers CPU time / wall time, but it counts as
    an involuntary switch: this is how waiting work is told from crowded work.
    """
    if _getrusage is None:
        return -1
    return int(_getrusage(_RUSAGE).ru_nvcsw)


def _current_cpu() -> int:
    """The CPU this thread runs on now (Linux: ``/proc``), -1 where unknown."""
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[36])
    except (OSError, IndexError, ValueError):
        return -1


def _allowed_cpus() -> frozenset[int]:
    """The CPUs this thread may run on (empty where the OS does not say)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset()


def _avoid_cpu(cpu: int, cpus: frozenset[int]) -> None:
    """Keep this thread (the probe's helper, which ends with the probe) on ``cpus`` but off
    ``cpu``, if another CPU is left.

    On a virtual machine whose second core sat idle, the helper was woken onto the caller's
    core and the two took turns there for milliseconds (13 of 40 first calls read zlib as
    serialised, benchmarks/bench_probe.py): moved, it waits for the other core to wake
    instead, then runs beside the caller.
    """
    if cpu in cpus and len(cpus) > 1:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus - {cpu})


def _stay_on_cpu(cpu: int, cpus: frozenset[int]) -> frozenset[int] | None:
    """Keep this thread (the probe's caller) on ``cpu`` until ``_restore_cpus`` gives back
    the CPUs it returns (None: nothing was changed).

    With only the helper moved, the caller still followed it: each time the helper woke
    it (the round's barrier, a released GIL), Linux woke it on the helper's core, and the
    two took turns there. In 10 % of first calls (4 of 40, benchmarks/bench_probe.py)
    both threads of a round read one CPU, and zlib read as serialised.
    """
    if cpu not in cpus or len(cpus) < 2:
        return None
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return None
    return cpus


def _restore_cpus(cpus: frozenset[int] | None) -> None:
    """Undo ``_stay_on_cpu``."""
    if cpus is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)


def _involuntary_switches() -> int:
    """Times this thread was preempted so far (another thread or process took its core);
    0 where the OS does not count them per thread."""
    if _getrusage is None or not _PER_THREAD:
        return 0
    return int(_getrusage(_RUSAGE).ru_nivcsw)


_getrusage: Callable[[int], Any] | None
try:
    import resource as _resource

    _getrusage = _resource.getrusage
    _RUSAGE = getattr(_resource, "RUSAGE_THREAD", _resource.RUSAGE_SELF)
    _PER_THREAD = hasattr(_resource, "RUSAGE_THREAD")
except ImportError:  # pragma: no cover - Windows
    _getrusage = None
    _RUSAGE = 0
    _PER_THREAD = False

try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
    _PAGE = 4096
_HAS_STATM = os.path.exists("/proc/self/statm")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _func_pickle(func: Callable[..., Any]) -> tuple[int, bool, str | None]:
    """``_pickle_func`` remembered per function object (by value, ``__main__`` functions
    cost ~30 us to pickle: more than a whole tiny run)."""
    try:
        return _FUNC_PICKLES[func]
    except (KeyError, TypeError):  # new, or not weakly referable (then never remembered)
        pass
    out = _pickle_func(func)
    with contextlib.suppress(TypeError):
        _FUNC_PICKLES[func] = out
    return out


_FUNC_PICKLES: weakref.WeakKeyDictionary[Any, tuple[int, bool, str | None]] = (
    weakref.WeakKeyDictionary()
)


def _pickle_func(func: Callable[..., Any]) -> tuple[int, bool, str | None]:
    """Pickled size of ``func`` as the process backend sends it (cloudpickle when installed).

    cloudpickle sends ``__main__`` functions by value, so a closure over a lock defined in a
    script pickles by reference with plain pickle but not with cloudpickle. Its import costs
    ~20 ms: it is used when already imported, for ``__main__`` code, or when pickle fails.
    """
    first: Exception | None = None
    if "cloudpickle" not in sys.modules and not _in_main(func):
        try:
            return len(pickle.dumps(func, _PROTOCOL)), True, None
        except Exception as exc:
            first = exc
    try:
        import cloudpickle
    except ImportError:
        try:
            return len(pickle.dumps(func, _PROTOCOL)), True, None
        except Exception as exc:
            first = first or exc
        return 0, False, (
            f"the function cannot be pickled ({_describe(first)}) and cloudpickle, which "
            "sends lambdas, closures and __main__ functions, is not installed: install the "
            "`full` extra (`pip install 'amorsize[full]'`) or define it at module level"
        )
    try:
        return len(cloudpickle.dumps(func, _PROTOCOL)), True, None
    except Exception as exc:
        return 0, False, f"the function cannot be pickled, even by cloudpickle ({_describe(exc)})"


def _in_main(func: Any) -> bool:
    """Whether ``func`` (or the function a wrapper or partial holds) lives in ``__main__``."""
    inner = getattr(func, "func", None)
    return getattr(func, "__module__", None) == "__main__" or (
        inner is not None and getattr(inner, "__module__", None) == "__main__"
    )


def _batch_pickle(
    pairs: list[tuple[int, Any]], what: str, index_of: Callable[[int], int]
) -> tuple[float, float, float, str | None]:
    """(bytes per item, dump s per item, load s per item, error) for one pickled batch.

    ``pairs`` are (position in the data, object); ``index_of`` names a position's item.
    """
    if not pairs:
        return 0.0, 0.0, 0.0, None
    objs = [obj for _, obj in pairs]
    # Large items: a few are enough for sizes and times, and pickling costs real time.
    try:
        first = len(pickle.dumps(objs[0], _PROTOCOL))
    except Exception:
        first = 0
    if first > 0:
        objs = objs[: max(2, _PICKLE_BYTES // first)]
    try:
        t0 = time.perf_counter()
        blob = pickle.dumps(objs, _PROTOCOL)
        t1 = time.perf_counter()
        pickle.loads(blob)
        t2 = time.perf_counter()
    except Exception as exc:
        for pos, obj in pairs:
            try:
                pickle.dumps(obj, _PROTOCOL)
            except Exception as item_exc:
                return 0.0, 0.0, 0.0, (
                    f"{what} {index_of(pos)} ({type(obj).__name__}) cannot be pickled "
                    f"({_describe(item_exc)}), so it cannot be sent to a process"
                )
        return 0.0, 0.0, 0.0, f"the sampled {what}s cannot be pickled ({_describe(exc)})"
    n = len(objs)
    return len(blob) / n, (t1 - t0) / n, (t2 - t1) / n, None


# --------------------------------------------------------------------------- items run elsewhere
class ItemRun(NamedTuple):
    """One sampled item run in a worker process: its outcome and what the call cost.

    ``value`` is the result, or the exception when ``ok`` is false. ``seconds`` is NaN when
    unknown: the worker died (``crashed``) or the item or its outcome could not cross the
    process boundary (``travelled`` false).
    """

    ok: bool
    value: Any
    seconds: float
    cpu: float = 0.0
    waits: int = -1
    mem: int = 0
    attempts: int = 1
    crashed: bool = False
    travelled: bool = True


#: Starts ``call`` on every item at once, one thread each, and returns what waits for them:
#: their results in item order (``call`` catches ``Exception`` itself). With ``cancel``
#: it stops waiting, and items not started yet are not run.
SpillRunner = Callable[[Callable[[Any], Any], list[Any]], Callable[[bool], list[Any]]]

#: Runs a batch of sampled items in a worker: ``(position of the first item, items, time
#: budget)`` to one ``ItemRun`` per item, or ``None`` for an item not run (the budget was
#: spent, or an earlier item failed): see ``TimedCall``.
RemoteRunner = Callable[[int, list[Any], float], list["ItemRun | None"]]

#: Whether the rest of the sample moves to a worker: ``(mean seconds per item, items so
#: far, item_bytes)``; ``item_bytes()`` (asked only when needed: it pickles) is what one
#: item and its result weigh pickled, ``inf`` when they cannot travel.
OffloadRule = Callable[[float, int, Callable[[], float]], bool]


class TimedCall:
    """``func`` on one item, measured where it runs (a worker process), as sampling does.

    Returns ``(ok, result or exception, traceback text, seconds, cpu seconds, voluntary
    switches, memory growth)``: a failure is a value, so its time still counts. Items are
    not run (``None``) once the calls took ``budget_s`` in all, or after a failure with
    ``stop``. Picklable when ``func`` is; each unpickled copy starts afresh.

    >>> TimedCall(abs, stop=False)(-2)[:2]
    (True, 2)
    """

    __slots__ = ("budget_s", "calls", "done", "func", "overhead", "spent", "stop")

    def __init__(
        self, func: Callable[[Any], Any], *, stop: bool, budget_s: float = math.inf
    ) -> None:
        self.__setstate__((func, stop, budget_s))

    def __getstate__(self) -> tuple[Callable[[Any], Any], bool, float]:
        return self.func, self.stop, self.budget_s

    def __setstate__(self, state: tuple[Callable[[Any], Any], bool, float]) -> None:
        self.func, self.stop, self.budget_s = state
        self.done = False
        self.calls = 0
        self.spent = 0.0
        self.overhead = -1.0

    def __repr__(self) -> str:
        # Messages about the function sent to workers (it cannot be pickled...) name func.
        return repr(self.func)

    def __call__(self, item: Any) -> tuple[Any, ...] | None:
        if self.done:
            return None
        if self.overhead < 0:
            self.overhead = _timer_overhead()
        track = _HAS_STATM and self.calls < _MEMORY_ITEMS
        self.calls += 1
        rss0 = _rss() if track else 0
        vol0 = _voluntary_switches()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        try:
            value = self.func(item)
            ok = True
        except Exception as exc:
            value, ok = exc, False
        seconds = max(time.perf_counter() - t0 - self.overhead, 0.0)
        cpu = time.process_time() - cpu0
        waits = _voluntary_switches() - vol0 if vol0 >= 0 else -1
        mem = max(_rss() - rss0, 0) if track else 0
        self.spent += seconds
        self.done = self.spent >= self.budget_s or (self.stop and not ok)
        if ok:
            return (True, value, "", seconds, cpu, waits, mem)
        try:
            pickle.loads(pickle.dumps(value, _PROTOCOL))
        except Exception:
            # It cannot reach the parent as a value: let the backend report the item.
            raise value from None
        tb = "".join(traceback.format_exception(type(value), value, value.__traceback__))
        return (False, value, tb, seconds, cpu, waits, mem)


@dataclass(frozen=True)
class SampledFailure:
    """A sampled item that failed, in its slot of ``Sample.results`` (keep-going samples).

    ``attempts`` counts the calls made (retries) or the worker crashes.
    """

    exception: BaseException
    attempts: int = 1


# --------------------------------------------------------------------------- the sample loop
_END: Any = object()


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


class _Source:
    """The items of ``data`` in order; ``pos`` counts those the sample used up."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.is_iterator = iter(data) is data
        self.n_items = None if self.is_iterator else _length(data)
        self.seq: Sequence[Any] | None = data if isinstance(data, Sequence) else None
        self.it: Iterator[Any] | None = None
        self.drawn: list[Any] = []
        self.it_done = False  # the iterator raised StopIteration
        if self.seq is None:
            self.it = iter(data)
            if self.is_iterator and self.n_items is None:
                hint = operator.length_hint(self.it, -1)
                self.n_items = None if hint < 0 else hint  # remaining = total before sampling
        self.pos = 0

    @property
    def ended(self) -> bool:
        """Every item was taken."""
        if self.seq is not None:
            return self.pos >= len(self.seq)
        if not self.is_iterator and self.n_items is not None and self.pos >= self.n_items:
            return True
        return self.it_done and self.pos >= len(self.drawn)

    def take(self, n: int) -> list[Any]:
        """The next ``n`` items (fewer at the end); never draws more from an iterator."""
        if self.seq is not None:
            out = list(self.seq[self.pos : self.pos + n])
        else:
            assert self.it is not None
            out = self.drawn[self.pos : self.pos + n]
            want = n - len(out)
            if want > 0 and not self.it_done:
                more = list(itertools.islice(self.it, want))
                self.it_done = len(more) < want
                self.drawn.extend(more)
                out.extend(more)
        self.pos += len(out)
        return out

    def next(self) -> Any:
        """The next item, or ``_END``: ``take(1)`` without building a list."""
        pos = self.pos
        if self.seq is not None:
            if pos >= len(self.seq):
                return _END
            self.pos = pos + 1
            return self.seq[pos]
        got = self.take(1)
        return got[0] if got else _END

    def give_back(self, n: int) -> None:
        """The last ``n`` items taken were not run: they stay in the data to run."""
        self.pos -= n


def _item_bytes(src: _Source, tally: _Tally) -> float:
    """The first sampled item and its result, pickled: bytes a process plan moves per item
    (``inf``: they cannot travel). Pickled once per sample."""
    if tally.item_bytes is None:
        item = src.seq[0] if src.seq is not None else src.drawn[0]
        out = tally.results[0] if tally.results else None
        try:
            size = float(len(pickle.dumps(item, _PROTOCOL)))
            if type(out) is not SampledFailure:
                size += len(pickle.dumps(out, _PROTOCOL))
        except Exception:
            size = math.inf
        tally.item_bytes = size
    return tally.item_bytes


class _Tally:
    """What the sample found so far, wherever its items ran."""

    def __init__(self, keep_going: bool) -> None:
        self.keep_going = keep_going
        self.results: list[Any] = []
        self.times: list[float] = []
        self.mem = 0
        self.cpu = 0.0
        self.wall = 0.0  # the timed part: item times, or the caller's loop
        self.timed = 0.0  # the items' own times
        # CPU and wall seconds of the items whose CPU time was read around the call alone,
        # in the thread that ran it (the loop's own work, a few microseconds, would hide a
        # 0.2% CPU share).
        self.item_cpu = 0.0
        self.item_wall = 0.0
        self.switches = 0  # -1: unknown
        self.n_failed = 0
        self.n_crashed = 0
        self.in_caller = 0
        self.on_threads = 0  # of those, items spilled onto threads
        self.error_pos: int | None = None
        self.error: BaseException | None = None
        self.item_bytes: float | None = None  # ``_item_bytes``, once asked

    @property
    def stopped(self) -> bool:
        return self.error is not None and not self.keep_going

    def tight(self, cpu: float, wall: float) -> None:
        """One item's CPU and wall seconds, read around the call alone."""
        self.item_cpu += cpu
        self.item_wall += wall

    def ok(self, value: Any, seconds: float) -> None:
        self.results.append(value)
        self.times.append(seconds)
        self.timed += seconds

    def fail(self, pos: int, exc: BaseException, seconds: float, attempts: int) -> None:
        """A failed item: a data point (keep going), or where the sample stops."""
        if self.error is None:
            self.error_pos, self.error = pos, exc
        if not self.keep_going:
            return
        self.n_failed += 1
        self.results.append(SampledFailure(exc, attempts))
        if math.isfinite(seconds):
            self.times.append(seconds)
            self.timed += seconds

    def add_remote(self, pos: int, run: ItemRun) -> None:
        """An item that ran in a worker."""
        if math.isfinite(run.seconds):
            self.cpu += run.cpu
            self.wall += run.seconds
            self.tight(run.cpu, run.seconds)
            self.mem = max(self.mem, run.mem)
            if self.switches >= 0:
                self.switches = self.switches + run.waits if run.waits >= 0 else -1
        self.n_crashed += run.crashed
        if run.ok:
            self.ok(run.value, run.seconds)
        else:
            self.fail(pos, run.value, run.seconds, run.attempts)


@dataclass(frozen=True)
class _Rules:
    """When a sample is big enough (see the module docstring). ``total`` items are planned
    for; the sample's share is of a run of ``horizon`` items (-1: ``total``)."""

    fixed: bool
    budget_s: float
    total: int
    cores: float
    horizon: int = -1

    @property
    def sampled_for(self) -> int:
        """Items whose best parallel run the sample must stay a small share of."""
        return self.total if self.horizon < 0 else self.horizon

    def enough(self, spent: float, n: int, cpu: float, switches: int) -> bool:
        if self.fixed or n == 0:
            return False
        if spent >= self.budget_s:
            return True
        if spent < _MIN_SAMPLE_S:
            return False
        best_case = self.sampled_for * (spent / n) / self.parallelism(spent, n, cpu, switches)
        return spent >= SAMPLE_FRACTION * best_case

    def parallelism(self, spent: float, n: int, cpu: float, switches: int) -> float:
        """The best conceivable parallelism: IO_PARALLELISM for waiting work, else cores."""
        waiting = cpu < 0.5 * spent and (switches < 0 or switches >= 0.5 * n)
        return IO_PARALLELISM if waiting else self.cores

    def batch(self, tally: _Tally, left: int) -> int:
        """Items to send in the next batch to a worker: about what the rules still want."""
        n = len(tally.times)
        if self.fixed or left <= 0:
            return max(left, 0)
        if n == 0 or tally.wall <= 0:
            return 1
        mean = tally.wall / n
        par = self.parallelism(tally.wall, n, tally.cpu, tally.switches)
        want = max(_MIN_SAMPLE_S / mean, SAMPLE_FRACTION * self.sampled_for / par)
        want = min(want, self.budget_s / mean)
        return max(1, min(math.ceil(want) - n, left))


class _Meter:
    """The caller's clocks when a run of items in the calling thread starts."""

    __slots__ = ("cpu0", "src", "start", "vol0", "wall0")

    def __init__(self, tally: _Tally, src: _Source) -> None:
        self.src = src
        self.wall0 = tally.wall
        self.cpu0 = time.process_time()
        self.vol0 = _voluntary_switches()
        self.start = time.perf_counter()

    def spent(self, now: float) -> float:
        """Seconds of sampling so far, in the caller and before this run."""
        return self.wall0 + (now - self.start)

    def verdict(
        self,
        tally: _Tally,
        rules: _Rules,
        offload: OffloadRule | None,
        timed: float,
        now: float,
    ) -> str:
        """After an item: ``"enough"`` (the sample is done), ``"offload"`` (the rest goes
        to a worker) or ``""`` (go on). ``timed`` is this run's item seconds so far."""
        n = len(tally.times)
        cpu = tally.cpu + time.process_time() - self.cpu0
        switches = _voluntary_switches() - self.vol0 if self.vol0 >= 0 else -1
        if rules.enough(self.spent(now), n, cpu, switches):
            return "enough"
        # Asked only from 1 ms of work on: a lone first call is often slow (caches,
        # imports) and would send microsecond work to a worker.
        if offload is not None and offload(
            (tally.timed + timed) / n, n, functools.partial(_item_bytes, self.src, tally)
        ):
            return "offload"
        return ""

    def settle(self, tally: _Tally, ran: int, timed: float) -> None:
        """Add this run's items and clocks to ``tally``."""
        tally.timed += timed
        tally.in_caller += ran
        tally.wall += time.perf_counter() - self.start
        tally.cpu += time.process_time() - self.cpu0
        if self.vol0 < 0:
            tally.switches = -1
        elif tally.switches >= 0:
            tally.switches += _voluntary_switches() - self.vol0


def _run_here(
    func: Callable[[Any], Any],
    src: _Source,
    tally: _Tally,
    rules: _Rules,
    limit: int,
    offload: OffloadRule | None,
) -> bool:
    """Run items in the calling thread until the sample is done; True: the rest goes remote.

    ``offload`` (an ``OffloadRule``) is asked after each item. The success path stays
    inline: on microsecond items this loop is the sample's cost.
    """
    # This thread's CPU only: other threads of the program (a pool shutting down, a
    # server) must not make a waiting item look busy.
    pc, cpu_clock = time.perf_counter, time.thread_time
    overhead = _timer_overhead()
    times = tally.times
    keep, put = tally.results.append, times.append
    timed = 0.0
    ran = 0
    verdict = ""
    seq = src.seq  # limit <= len(seq): index it directly, the cheapest way to get an item
    pos = src.pos
    quick = 0  # items in a row under _BLOCK_ITEM_S: then the rest is timed in blocks
    meter = _Meter(tally, src)
    wall0, start = meter.wall0, meter.start
    while pos < limit:
        if seq is not None:
            item = seq[pos]
        else:
            item = src.next()
            if item is _END:
                break
        pos += 1
        ran += 1
        # An item that ran in under _BLOCK_ITEM_S cannot have touched much new memory:
        # the next ones are not read for it (each read costs more than such an item).
        track_mem = _HAS_STATM and len(times) < _MEMORY_ITEMS and not (
            times and times[-1] < _BLOCK_ITEM_S
        )
        rss0 = _rss() if track_mem else 0
        tight = not times or times[-1] >= _TIGHT_CPU_MIN_S
        c0 = cpu_clock() if tight else 0.0
        t0 = pc()
        try:
            out = func(item)
        except Exception as exc:
            t1 = pc()
            tally.fail(pos - 1, exc, max(t1 - t0 - overhead, 0.0), getattr(exc, "attempts", 1))
            if tally.stopped:
                break
        else:
            t1 = pc()
            if tight:
                tally.tight(cpu_clock() - c0, t1 - t0)
            if track_mem:
                tally.mem = max(tally.mem, _rss() - rss0)
            sec = t1 - t0 - overhead
            if sec < 0.0:
                sec = 0.0
            keep(out)
            put(sec)
            timed += sec
            quick = quick + 1 if sec < _BLOCK_ITEM_S else 0
        if times and (wall0 + (t1 - start) >= _MIN_SAMPLE_S or rules.budget_s <= 0):
            verdict = meter.verdict(tally, rules, offload, timed, t1)
            if verdict:
                break
        if quick >= _QUICK_RUN:
            verdict = "blocks"
            break
    src.pos = pos
    meter.settle(tally, ran, timed)
    if verdict == "blocks":
        return _run_blocks(func, src, tally, rules, limit, offload)
    return verdict == "offload"


def _run_blocks(
    func: Callable[[Any], Any],
    src: _Source,
    tally: _Tally,
    rules: _Rules,
    limit: int,
    offload: OffloadRule | None,
) -> bool:
    """``_run_here`` for items found tiny: each block of items is timed as one ``map``, and
    each item counts the block's mean (the spread is then the blocks' spread). Same rules,
    same failures (the failed item, then the rest of its block, as in ``_run_here``)."""
    pc, ct = time.perf_counter, time.thread_time
    overhead = _timer_overhead()
    results, times = tally.results, tally.times
    timed = 0.0
    ran = 0
    verdict = ""
    size = _QUICK_RUN
    meter = _Meter(tally, src)
    own = _OwnTime()
    # Seconds per item of the last block of 64 or more (``last``), and of the last two
    # (``lo`` the faster, ``hi`` the slower): two in a row that agree tell the mean, so a
    # block that an interrupt or page faults slowed costs a block or two more, not the
    # rest of MAX_SAMPLE_ITEMS.
    last, lo, hi = math.inf, math.inf, 0.0
    while not verdict and src.pos < limit and not tally.stopped:
        first = src.pos
        items = src.take(min(size, limit - first))
        if not items:
            break
        done = len(results)
        failure: Exception | None = None
        c0 = ct()
        t0 = pc()
        try:
            results.extend(map(func, items))  # keeps the results before a failure
        except Exception as exc:
            failure = exc
        t1 = pc()
        cpu = ct() - c0
        n_ok = len(results) - done
        n_run = n_ok + (failure is not None)
        ran += n_run
        sec = own.seconds(max(t1 - t0 - overhead, 0.0), cpu) / n_run
        times.extend([sec] * n_ok)
        timed += sec * n_ok
        if failure is not None:
            src.give_back(len(items) - n_run)  # not run: they stay in the data
            tally.fail(first + n_ok, failure, sec, getattr(failure, "attempts", 1))
        if n_run >= _BLOCK_ALIKE_MIN:  # smaller blocks carry the block's fixed cost
            lo, hi, last = min(last, sec), max(last, sec), sec
        if times and (meter.spent(t1) >= _MIN_SAMPLE_S or rules.budget_s <= 0):
            verdict = meter.verdict(tally, rules, offload, timed, t1)
        elif _clearly_tiny(rules, ran, lo, hi):
            verdict = "enough"
        size = min(2 * size, _BLOCK_MAX)
    meter.settle(tally, ran, timed)
    return verdict == "offload"


def _clearly_tiny(rules: _Rules, ran: int, lo: float, hi: float) -> bool:
    """Whether ``ran`` items timed in blocks, the last two of ``lo`` and ``hi`` seconds per
    item, are enough: tiny, and alike (see ``_BLOCK_ENOUGH``). A fixed sample size runs in
    full."""
    return (
        not rules.fixed and ran >= _BLOCK_ENOUGH and 0.0 < hi < _BLOCK_ITEM_S
        and hi <= _BLOCK_AGREE * max(lo, 50e-9)
    )  # fmt: skip


class _OwnTime:
    """A block's own time: its wall time, or its CPU time when it was preempted.

    On a busy machine a block of tiny items can lose milliseconds to other processes, which
    spread over its items would make 0.1 us work look like microseconds (and worth
    processes). Waiting is the work's own time: it shows as a voluntary switch.
    """

    __slots__ = ("switches",)

    def __init__(self) -> None:
        self.switches = _voluntary_switches()

    def seconds(self, wall: float, cpu: float) -> float:
        if wall <= 2.0 * cpu + _PREEMPT_SLACK_S:
            return wall
        before, self.switches = self.switches, _voluntary_switches()
        if before < 0 or self.switches > before:  # unknown, or it waited (I/O, sleep, lock)
            return wall
        return cpu


def _run_remote(
    remote: RemoteRunner, src: _Source, tally: _Tally, rules: _Rules, limit: int, auto: bool
) -> bool:
    """Run items in batches in a worker until the sample is done; True: back to the caller.

    With ``auto``, an item that cannot cross to a process (or whose outcome cannot come
    back) sends the sample back to the caller, which runs it: so would a serial plan.
    """
    while src.pos < limit and not tally.stopped:
        first = src.pos
        items = src.take(rules.batch(tally, limit - first))
        if not items:
            return False
        # The worker stops at the budget left: a fast first item cannot launch a long batch.
        budget = math.inf if rules.fixed else max(rules.budget_s - tally.wall, 0.0)
        runs = remote(first, items, budget)
        for k, run in enumerate(runs):
            if run is None or (auto and not run.travelled) or tally.stopped:
                src.give_back(len(items) - k)
                return run is not None and not run.travelled and not tally.stopped
            tally.add_remote(first + k, run)
        if rules.enough(tally.wall, len(tally.times), tally.cpu, tally.switches):
            return False
    return False


def sample(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    sample_size: int | None = None,
    budget_s: float = SAMPLE_BUDGET_S,
    max_items: int = MAX_SAMPLE_ITEMS,
    cores: float = 1.0,
    assumed_length: int = ASSUMED_UNKNOWN_LENGTH,
    keep_going: bool = False,
    remote: RemoteRunner | None = None,
    offload: OffloadRule | None = None,
    index_of: Callable[[int], int] | None = None,
    probe_threads: bool = False,
    spill: SpillRunner | None = None,
    spill_items: int = SPILL_MAX_ITEMS,
) -> Sample:
    """Run ``func`` on the first items of ``data`` and measure them.

    ``sample_size`` fixes the count (else it adapts, see the module docstring; ``cores`` and
    ``assumed_length``, used when the length is unknown, at most ``UNKNOWN_SAMPLE_HORIZON``,
    size the best-case parallel run that the sample must stay a small fraction of). Never
    draws more items from an iterator than it runs.

    Failures: by default sampling stops at the first item ``func`` raises on; the profile
    records it and ``results`` hold only the items before it. With ``keep_going`` a failed
    item is a data point (its time counts, a ``SampledFailure`` takes its slot).

    Where items run: in the calling thread, unless ``remote`` is given (a ``RemoteRunner``,
    running batches in a worker process). With ``remote`` alone every item runs there; with
    ``offload`` too, the first item runs in the caller, and so do the next ones until they
    add up to 1 ms and ``offload`` (an ``OffloadRule``) says yes: then the rest of the
    sample runs remotely. ``index_of`` maps a position in ``data`` to the input index that
    messages name (a stream that skips items). ``probe_threads`` runs the two-thread probe
    and ``spill`` starts up to ``spill_items`` next items on threads once a first item
    waits (the module docstring tells both).

    >>> s = sample(str, iter(range(5)), sample_size=2)
    >>> s.results, list(s.data)
    (('0', '1'), [0, 1, 2, 3, 4])
    """
    src = _Source(data)
    limit = max_items if sample_size is None else sample_size
    if src.n_items is not None and not src.is_iterator:
        # An iterator's length_hint is only a hint: it never cuts the sample short.
        limit = min(limit, src.n_items)
    total = src.n_items if src.n_items is not None else assumed_length
    horizon = -1 if src.n_items is not None else min(assumed_length, UNKNOWN_SAMPLE_HORIZON)
    rules = _Rules(sample_size is not None, budget_s, total, cores, horizon)
    tally = _Tally(keep_going)
    start = time.perf_counter()
    here = remote is None or offload is not None
    if spill is not None and here and src.seq is not None and not rules.fixed and limit > 1:
        # Sequences only: an iterator's next items would be drawn on the watcher's thread.
        _run_first_watched(func, src, tally, spill, min(spill_items, limit - 1))
        limit, here = _after_first(src, tally, rules, limit, offload if remote else None)
    probe = probe_threads and not rules.fixed
    overlap = math.nan
    while src.pos < limit and not tally.stopped and not src.ended:
        if here:
            if not _run_here(func, src, tally, rules, limit, offload if remote else None):
                break
            here = False
        elif probe and offload is not None and tally.times:
            # Probed before the sample moves: work that threads overlap then never waits for
            # a worker to start and for its items to cross (bench_oracle.py gil_zlib: 1.5x).
            probe, overlap = False, _probe(func, src, tally, rules)
            if overlap >= _PROBE_CLEAR:
                here, offload = True, None  # the rest of the sample stays here
        else:
            assert remote is not None
            if not _run_remote(remote, src, tally, rules, limit, offload is not None):
                break
            here, offload = True, None  # the caller runs the rest: it cannot travel
    if probe and not tally.stopped and not src.ended:
        overlap = _probe(func, src, tally, rules)
    wall = time.perf_counter() - start
    return _finish(func, data, src, tally, wall, index_of or (lambda k: k), overlap)


def _after_first(
    src: _Source, tally: _Tally, rules: _Rules, limit: int, offload: OffloadRule | None
) -> tuple[int, bool]:
    """After the watched first item (and any spilled ones): the sample's new limit, and
    whether the next items run in the caller (``offload``, asked as ``_run_here`` asks
    after each item, may send them to a worker)."""
    n = len(tally.times)
    if n and rules.enough(tally.wall, n, tally.cpu, tally.switches):
        return src.pos, True  # enough already (the spilled items, or one slow item)
    if n and offload is not None and tally.wall >= _MIN_SAMPLE_S:
        return limit, not offload(tally.timed / n, n, functools.partial(_item_bytes, src, tally))
    return limit, True


def _probe_size(tally: _Tally, rules: _Rules) -> tuple[int, int]:
    """Items per thread and rounds for the overlap probe; ``(0, 0)``: not probed."""
    n = len(tally.times)
    if n == 0 or tally.n_failed or rules.cores < 1.5:
        return 0, 0
    mean = tally.timed / n
    if mean < PROBE_MIN_ITEM_S or _timing(tally).wait_fraction >= _PROBE_MAX_WAIT:
        return 0, 0  # too small to pay on threads, or known to wait (threads overlap it)
    # At least _PROBE_MIN_SIDE items a thread: only CPU between readings (one after each
    # item) while both threads ran counts (``probe_overlap``), and item times read on a
    # busy machine can be several times the items' own.
    k = max(_PROBE_MIN_SIDE, math.ceil(PROBE_SIDE_S / mean))
    # Probed items are kept, so a round of 2k loses at most k items' time against a
    # perfect parallel run: keep all rounds together a small share of the best parallel
    # run left; one round may take a larger share, else a job of a few hundred
    # GIL-releasing items is never probed and runs serially at half the speed threads give.
    # A stream of unknown length: the sample's horizon, not the 10,000 items assumed for
    # the plan (400 generated 1 ms items took 33 items of probe, 4 rounds, where 3 would do).
    rest = (rules.sampled_for - n) * mean / rules.cores
    rounds = int(SAMPLE_FRACTION * rest / (k * mean))
    if rounds == 0 and k * mean <= PROBE_FIRST_ROUND_SHARE * rest:
        rounds = 1
    return k, min(PROBE_ROUNDS, rounds)


class ProbeRound(NamedTuple):
    """One round of the overlap probe, as measured: each thread's ``(wall clock, its own
    CPU clock)`` when its side began and after each item it ran, and how many times the
    two threads were preempted while they ran (another process took their core)."""

    caller: tuple[tuple[float, float], ...]
    helper: tuple[tuple[float, float], ...]
    preempted: int = 0


def _cpu_within(points: tuple[tuple[float, float], ...], lo: float, hi: float) -> float:
    """CPU seconds between the first and the last reading inside ``[lo, hi]``."""
    inside = [cpu for t, cpu in points if lo <= t <= hi]
    return inside[-1] - inside[0] if len(inside) > 1 else 0.0


def probe_overlap(rounds: Iterable[ProbeRound]) -> float:
    """The overlap the probe reports: the best of its rounds, in [0, 1]; NaN without any.

    A round counts only the time both threads ran items (from the later start to the
    earlier end: on a busy machine a thread wakes milliseconds late), and of each
    thread's CPU seconds only those between its readings inside that window. Both CPU
    sums over the window, minus one, is the round's overlap: at most 0 while the GIL lets
    one thread run at a time, whatever the machine's load (a busy machine only lowers it:
    a thread holding the GIL while preempted stops the other too), up to 1 when both ran
    at once. That holds for any window, so the window is also widened to the next
    reading past either end (an item cut by an edge then counts whole) and the best of
    these windows counts. No noise lifts GIL-bound work above 0, hence the best round
    counts too: a busy machine gives the two threads two cores only now and then.

    >>> both = ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0))
    >>> probe_overlap([ProbeRound(both, both)])
    1.0
    >>> gil = ((0.0, 0.0), (0.5, 0.25), (1.0, 0.5))
    >>> probe_overlap([ProbeRound(gil, gil)])
    0.0
    >>> late = ((0.5, 0.0), (0.75, 0.25), (1.0, 0.5))  # started late: half a window
    >>> probe_overlap([ProbeRound(both, late)])
    1.0
    """
    best = math.nan
    for r in rounds:
        if not r.caller or not r.helper:
            continue
        lo = max(r.caller[0][0], r.helper[0][0])
        hi = min(r.caller[-1][0], r.helper[-1][0])
        got = 0.0
        if hi > lo:
            # Widened to the first starter's last reading before ``lo`` and the last
            # finisher's first reading after ``hi``: items cut by an edge count whole.
            early = r.caller if r.caller[0][0] <= r.helper[0][0] else r.helper
            late = r.caller if r.caller[-1][0] >= r.helper[-1][0] else r.helper
            los = (lo, max(t for t, _ in early if t <= lo))
            his = (hi, min(t for t, _ in late if t >= hi))
            got = max(_window_overlap(r, a, b) for a in los for b in his)
        best = got if math.isnan(best) else max(best, got)
    return best


def _window_overlap(r: ProbeRound, lo: float, hi: float) -> float:
    """Both threads' CPU seconds between their readings inside ``[lo, hi]``, over its
    length, minus one, in [0, 1]."""
    cpu = _cpu_within(r.caller, lo, hi) + _cpu_within(r.helper, lo, hi)
    return min(max(cpu / (hi - lo) - 1.0, 0.0), 1.0)


def _probe(func: Callable[[Any], Any], src: _Source, tally: _Tally, rules: _Rules) -> float:
    """Run the next items on two threads at once, in up to ``PROBE_ROUNDS`` rounds; their
    overlap in [0, 1] (``probe_overlap``). NaN: not probed.

    Rounds go on only while they tell nothing (``_told``: the threads never ran at once
    though either could have, or another process kept one off its core): they stop at
    one that does, at ``_PROBE_CLEAR`` overlap, or at a failure that stops the sample. A
    lone planned round that tells nothing is run again (twice as long if preempted), up to
    ``_PROBE_RERUNS`` times: one late wake-up must not make GIL-releasing work look
    serialised (on a virtual machine a core idle for a moment took ~1.5 ms to come back,
    most of a round). Both threads live through all rounds, so only one thread is started.
    """
    k, rounds = _probe_size(tally, rules)
    if k == 0 or rounds == 0:
        return math.nan
    pair = _ProbePair(func, tally.keep_going)
    measured: list[ProbeRound] = []
    single = rounds == 1
    tries = 1 + _PROBE_RERUNS if single else rounds
    size = 2 * k
    try:
        while tries > 0:
            first = src.pos
            items = src.take(size)
            if len(items) < size or not pair.run(items):
                src.give_back(len(items))
                break
            if not _keep_round(pair, items, first, src, tally):
                return math.nan
            measured.append(pair.measured)
            if probe_overlap(measured[-1:]) >= _PROBE_CLEAR or _told(pair.measured):
                break
            tries -= 1
            if single and pair.measured.preempted >= _PROBE_PREEMPTED:
                size = 4 * k  # a core came late: a longer round leaves time both ran
    finally:
        pair.close()
    return probe_overlap(measured)


def _told(r: ProbeRound) -> bool:
    """Whether a round says something about the work: no other process kept the threads
    from running on two cores (``_PROBE_PREEMPTED``, unless their shared window is long,
    ``_PROBE_LONG_S``), and both threads ran items at the same time, or the caller ran
    alone long enough (``_PROBE_LATE_S``) that only the GIL can have kept the helper out:
    a late wake-up must not decide the plan."""
    if not r.caller or not r.helper:
        return False
    window = min(r.caller[-1][0], r.helper[-1][0]) - max(r.caller[0][0], r.helper[0][0])
    if r.preempted >= _PROBE_PREEMPTED and window < _PROBE_LONG_S:
        return False
    if window > 0.0:
        return True
    return r.caller[-1][0] - r.caller[0][0] >= _PROBE_LATE_S


def _keep_round(
    pair: _ProbePair, items: list[Any], first: int, src: _Source, tally: _Tally
) -> bool:
    """Add a round's results to ``tally`` in data order; False: a failure stopped the
    sample (the items after it are given back, as after a failure in a run)."""
    for j, got in enumerate(pair.out):
        if got is None:  # after a failure that stopped the sample: never reached
            src.give_back(len(items) - j)
            return False
        tally.in_caller += 1
        ok, value = got
        if ok:
            tally.results.append(value)
            continue
        tally.fail(first + j, value, math.nan, getattr(value, "attempts", 1))
        if tally.stopped:
            src.give_back(len(items) - j - 1)
            return False
    return True


class _ProbePair:
    """The caller and one helper thread running rounds of the probe. In a round the
    caller takes items from the front and the helper from the back until they meet, so
    both work for as long as items are left, however late either started.

    ``out`` holds a round's ``(ok, value)`` per item (None: not run), ``measured`` its
    clocks. A failure (when failures stop the sample) stops the helper; the caller still
    runs every item before the helper's failure, so that the results stay a prefix, and
    stops at a failure of its own.
    """

    def __init__(self, func: Callable[[Any], Any], keep_going: bool) -> None:
        self.func, self.keep_going = func, keep_going
        self.items: list[Any] = []
        self.out: list[tuple[bool, Any] | None] = []
        self.next = [0, 0]  # the caller's next item, the helper's next item
        self.lock = threading.Lock()
        self.points: list[list[tuple[float, float]]] = [[], []]
        self.preempted = [0, 0]
        self.caller_cpu = -1
        self.cpus = _allowed_cpus()  # the caller's: both threads' are narrowed for the probe
        self.pinned: frozenset[int] | None = None  # the caller's CPUs while it is pinned
        self.measured = ProbeRound((), ())
        self.stop = threading.Event()
        # A helper that cannot start (or reach a round) in time breaks the barrier, and
        # that round is not probed.
        self.gate = threading.Barrier(2, timeout=_PROBE_START_TIMEOUT_S)
        self.done = threading.Barrier(2, timeout=None)
        self.helper: threading.Thread | None = None

    def run(self, items: list[Any]) -> bool:
        """One round on ``items``; False: not run (no helper thread)."""
        self.items, self.out = items, [None] * len(items)
        if self.pinned is None:  # the first round: the caller stays where it is
            self.caller_cpu = _current_cpu()
            self.pinned = _stay_on_cpu(self.caller_cpu, self.cpus)
        self.next = [0, len(items) - 1]
        self.points = [[], []]
        self.stop.clear()
        if self.helper is None:
            self.helper = threading.Thread(target=self._helper, name="amorsize-probe", daemon=True)
            try:
                self.helper.start()
            except RuntimeError:  # no thread can be started here (a resource limit)
                self.helper = None
                return False
        try:
            self.gate.wait()
        except threading.BrokenBarrierError:
            return False
        try:
            self._side(0)
        finally:
            self.done.wait()
        self.measured = ProbeRound(
            tuple(self.points[0]), tuple(self.points[1]), sum(self.preempted)
        )
        return True

    def close(self) -> None:
        """End the helper thread (it waits at the next round's start); the caller may run
        on its CPUs again."""
        self.gate.abort()
        self.done.abort()
        if self.helper is not None:
            self.helper.join()
        _restore_cpus(self.pinned)
        self.pinned = None

    def _helper(self) -> None:
        while True:
            try:
                self.gate.wait()
            except threading.BrokenBarrierError:
                return
            _avoid_cpu(self.caller_cpu, self.cpus)
            try:
                self._side(1)
            finally:  # the caller waits for this side's end, whatever happened in it
                ended = self._wait_done()
            if not ended:
                return

    def _wait_done(self) -> bool:
        try:
            self.done.wait()
        except threading.BrokenBarrierError:
            return False
        return True

    def _take(self, side: int) -> int:
        """The next item index for ``side`` (-1: none left for it)."""
        with self.lock:
            lo, hi = self.next
            if lo > hi or (side and self.stop.is_set()):
                return -1
            if side:
                self.next[1] = hi - 1
                return hi
            self.next[0] = lo + 1
            return lo

    def _side(self, side: int) -> None:
        preempted = _involuntary_switches()
        try:
            self._run_side(side)
        finally:
            self.preempted[side] = _involuntary_switches() - preempted

    def _run_side(self, side: int) -> None:
        func, items, out = self.func, self.items, self.out
        points = self.points[side]
        points.append((time.perf_counter(), time.thread_time()))
        while (j := self._take(side)) >= 0:
            try:
                out[j] = (True, func(items[j]))
            except Exception as exc:
                out[j] = (False, exc)
                if not self.keep_going:
                    self.stop.set()
                    if side == 0:
                        return
            finally:
                points.append((time.perf_counter(), time.thread_time()))
            if side and self.stop.is_set():
                return


class _Watch:
    """The caller's first item, watched from the watcher thread (see ``sample``'s ``spill``)."""

    def __init__(self, start: Callable[[], _Spilled | None]) -> None:
        self.start = start  # takes the next items and starts them on threads
        self.ended = False
        self.lock = threading.Lock()  # held while items are taken and started
        self.clock = time.pthread_getcpuclockid(threading.get_ident())
        self.tid = threading.get_native_id()
        self.spilled: _Spilled | None = None
        self.board: WatchBoard | None = None  # where it was posted (None: not watched)

    def spill(self) -> None:
        """In the watcher thread, once the item waited ``_SPILL_CHECKS`` checks in a row:
        start the next items, unless it returned meanwhile."""
        with self.lock:
            if not self.ended:
                self.spilled = self.start()

    def stop(self) -> _Spilled | None:
        """The item returned: no spill from now on; the spilled items, if any."""
        with self.lock:
            self.ended = True
            if self.board is not None:
                self.board.end()
            return self.spilled


class _Watcher:
    """The process's one watcher thread, started on first use (again in a forked child,
    which has none: ``reset`` runs at the fork): starting a thread per sample cost ~80 us,
    a tiny run's budget. It waits in the compiled core (``WatchBoard``), without the GIL,
    until an item looks blocked: a quick first item never hands it the GIL."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """As new: in a forked child (no watcher thread there, maybe a lock held)."""
        self.lock = threading.Lock()
        self.board: WatchBoard | None = None

    def watch(self, watch: _Watch | None) -> None:
        """Post ``watch`` (not watched if another caller's item is); None: only start the
        thread (a first call starts it early, so that it runs in time)."""
        with self.lock:
            board = self.board
            if board is None:
                board = WatchBoard()
                _thread.start_new_thread(self._loop, (board,))
                self.board = board
        if watch is not None and board.post(watch, watch.clock, watch.tid):
            watch.board = board

    @staticmethod
    def _loop(board: WatchBoard) -> None:
        while True:
            watch = board.current(board.wait(SPILL_AFTER_S, _SPILL_MAX_CPU, _SPILL_CHECKS))
            if watch is not None:
                watch.spill()


_WATCHER = _Watcher()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WATCHER.reset)


def start_watcher() -> None:
    """Start the thread that watches first items for ``sample(spill=...)``, if not yet
    running in this process: on a busy machine a thread started just before the first
    item may run only after it."""
    if _WATCHER.board is not None:
        return  # running already (most calls)
    with contextlib.suppress(RuntimeError):
        _WATCHER.watch(None)


class _Spilled(NamedTuple):
    """Items started on threads: how many, and what waits for their results."""

    n: int
    collect: Callable[[bool], list[Any]]


def _watch(func: Callable[[Any], Any], src: _Source, spill: SpillRunner, room: int) -> _Watch | None:
    """A started watcher that may spill up to ``room`` next items of ``src`` (the caller
    runs the item before them meanwhile), or None (no thread CPU clock here, no thread)."""

    def start() -> _Spilled | None:
        items = src.take(room)
        if not items:
            return None
        try:
            return _Spilled(len(items), spill(functools.partial(_timed_on_thread, func), items))
        except Exception:  # e.g. no thread can start (a resource limit): run them later
            src.give_back(len(items))
            return None

    try:
        watch = _Watch(start)
        _WATCHER.watch(watch)
    except (AttributeError, OSError, RuntimeError):
        return None
    return watch


def _timed_on_thread(func: Callable[[Any], Any], item: Any) -> tuple[bool, Any, float, float, int]:
    """``func(item)`` timed in this thread (the caller's first item, or one on a spill
    thread): ``(ok, result or exception, seconds, this thread's CPU seconds, voluntary
    switches)``."""
    vol0 = _voluntary_switches()
    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    try:
        value, ok = func(item), True
    except Exception as exc:
        value, ok = exc, False
    seconds = time.perf_counter() - t0
    cpu = time.thread_time() - cpu0
    return ok, value, seconds, cpu, _voluntary_switches() - vol0 if vol0 >= 0 else -1


def _run_first_watched(
    func: Callable[[Any], Any], src: _Source, tally: _Tally, spill: SpillRunner, room: int
) -> None:
    """The first item in the caller, watched: if it waits, the next items join it on
    threads (``sample``'s ``spill``), and all are added to ``tally`` in data order."""
    item = src.next()
    if item is _END:
        return
    pos = src.pos - 1
    watch = _watch(func, src, spill, room)
    rss0 = _rss() if _HAS_STATM else 0
    try:
        ok, out, seconds, cpu, vol = _timed_on_thread(func, item)
    except BaseException:
        spilled = watch.stop() if watch is not None else None
        if spilled is not None:
            spilled.collect(True)
        raise
    spilled = watch.stop() if watch is not None else None
    mem = max(_rss() - rss0, 0) if _HAS_STATM else 0
    attempts = 1 if ok else getattr(out, "attempts", 1)
    tally.in_caller += 1
    tally.add_remote(pos, ItemRun(ok, out, seconds, cpu, vol, mem, attempts))
    if spilled is None:
        return
    first = src.pos - spilled.n
    if tally.stopped:  # the first item failed: the run raises it, the rest never counts
        spilled.collect(True)
        src.give_back(spilled.n)
        return
    runs = spilled.collect(False)
    for k, (ok, value, seconds, cpu, waits) in enumerate(runs):
        tally.in_caller += 1
        tally.on_threads += 1
        tally.add_remote(first + k, ItemRun(
            ok, value, seconds, cpu, waits, 0, 1 if ok else getattr(value, "attempts", 1)
        ))
        if not ok and not tally.keep_going:  # it ends the sample: the rest stays in the data
            src.give_back(len(runs) - k - 1)
            return


def _finish(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    src: _Source,
    tally: _Tally,
    wall: float,
    index_of: Callable[[int], int],
    overlap: float = math.nan,
) -> Sample:
    """The profile and the data to run on, once the items have run."""
    out_data, n_items = _data_to_run(data, src)
    sizes = _sizes(func, src, tally, index_of)
    timing = _timing(tally)
    profile = Profile(
        n_sampled=len(tally.results),
        n_items=n_items,
        exhausted=src.ended and not tally.stopped,
        item_seconds=tuple(tally.times),
        mean_seconds=timing.mean,
        std_seconds=timing.std,
        max_seconds=max(tally.times, default=0.0),
        cpu_ratio=timing.cpu_ratio,
        wait_fraction=timing.wait_fraction,
        in_bytes=sizes.in_bytes,
        out_bytes=sizes.out_bytes,
        in_dump_seconds=sizes.in_dump,
        in_load_seconds=sizes.in_load,
        out_dump_seconds=sizes.out_dump,
        out_load_seconds=sizes.out_load,
        mem_per_item=float(max(tally.mem, 0, int(sizes.out_bytes))),
        func_bytes=sizes.func_bytes,
        func_picklable=sizes.func_ok,
        items_picklable=sizes.in_error is None,
        outputs_picklable=sizes.out_error is None,
        pickle_error=sizes.func_error or sizes.in_error or sizes.out_error,
        n_failed=tally.n_failed,
        n_crashed=tally.n_crashed,
        in_caller=tally.in_caller,
        error_index=None if tally.error_pos is None else index_of(tally.error_pos),
        error=tally.error,
        sample_seconds=wall,
        thread_overlap=overlap,
        on_threads=tally.on_threads,
    )
    return Sample(profile=profile, results=tuple(tally.results), data=out_data)


def _data_to_run(data: Iterable[Any], src: _Source) -> tuple[Iterable[Any], int | None]:
    """The data equal to the input (an iterator's sampled items chained back in front of
    the rest), and its length if known (an iterator that ended while sampled: known now)."""
    if not src.is_iterator:
        return data, src.n_items
    assert src.it is not None
    return itertools.chain(src.drawn, src.it), len(src.drawn) if src.it_done else src.n_items


class _Sizes(NamedTuple):
    """Pickled bytes and (un)pickling seconds per item, and why something cannot travel."""

    func_bytes: int
    func_ok: bool
    func_error: str | None
    in_bytes: float
    in_dump: float
    in_load: float
    in_error: str | None
    out_bytes: float
    out_dump: float
    out_load: float
    out_error: str | None


def _sizes(
    func: Callable[[Any], Any], src: _Source, tally: _Tally, index_of: Callable[[int], int]
) -> _Sizes:
    """Pickle the function, the first sampled inputs and their results (failures left out)."""
    # Tiny items (timed in blocks) pickle alike: a few show their size and cost, and
    # pickling more would cost a serial run of them more than the decision gains.
    tiny = len(tally.times) >= _QUICK_RUN and tally.timed < _BLOCK_ITEM_S * len(tally.times)
    most = _PICKLE_TINY if tiny else _PICKLE_ITEMS
    n_in = min(src.pos, most)
    items = list(src.seq[:n_in]) if src.seq is not None else src.drawn[:n_in]
    func_bytes, func_ok, func_err = _func_pickle(func)
    in_b, in_dump, in_load, in_err = _batch_pickle(list(enumerate(items)), "item", index_of)
    outs = [(k, r) for k, r in enumerate(tally.results[:most])
            if type(r) is not SampledFailure]
    out_b, out_dump, out_load, out_err = _batch_pickle(outs, "result", index_of)
    return _Sizes(
        func_bytes, func_ok, func_err, in_b, in_dump, in_load, in_err,
        out_b, out_dump, out_load, out_err,
    )


class _Timing(NamedTuple):
    """Item seconds (mean, spread), CPU over wall, and the share spent blocked."""

    mean: float
    std: float
    cpu_ratio: float
    wait_fraction: float


def _timing(tally: _Tally) -> _Timing:
    """What the item times and the caller's clocks say about the work."""
    times = tally.times
    n = len(times)
    total = sum(times)
    mean = total / n if n else 0.0
    std = 0.0
    if n > 1:
        # Sums at C speed (a sample of tiny items holds 2000 times, and this ran in ~0.3 ms
        # as a generator): the cancellation only blurs spreads under ~0.1% of the mean.
        squares = sum(map(operator.mul, times, times))
        std = math.sqrt(max(squares - n * mean * mean, 0.0) / (n - 1))
    # The loop's own work (pickling is outside it) is tiny beside the items themselves,
    # so CPU over the timed wall is the items' CPU share.
    cpu_ratio = tally.cpu / tally.wall if tally.wall > 0 and total > 0 else 1.0
    busy = cpu_ratio
    if tally.item_wall > 0.5 * tally.timed > 0 and cpu_ratio <= _OWN_THREADS_RATIO:
        # Most of the sampled time was read around the calls alone: the items' own share
        # (the loop's clocks add the loop's work and every other thread's). Not when the
        # process kept more than a core busy: then func runs threads of its own (BLAS),
        # and its thread waiting for them is not waiting work.
        busy = tally.item_cpu / tally.item_wall
    # Blocking shows as voluntary switches (at least one per waiting call); without them a
    # low ratio means the machine was busy, and the work itself is CPU-bound.
    blocked = tally.switches < 0 or tally.switches >= 0.5 * max(n, 1)
    return _Timing(mean, std, cpu_ratio, max(0.0, 1.0 - busy) if blocked else 0.0)
