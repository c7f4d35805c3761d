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

>>> s = sample(abs, [-1, 2, -3])
>>> s.results, s.profile.n_sampled
((1, 2, 3), 3)
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_SAMPLE_ITEMS", "SAMPLE_BUDGET_S", "Profile", "Sample", "sample"]

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
_PICKLE_BYTES = 2 << 20
# Items whose resident-memory growth is read (each read is a small file read, ~5 us).
_MEMORY_ITEMS = 4
_PROTOCOL = pickle.HIGHEST_PROTOCOL


@dataclass(frozen=True)
class Profile:
    """What the sample measured. Times are seconds per item, sizes bytes per item.

    ``cpu_ratio`` is CPU time / wall time over the sample: about 1 for CPU-bound work,
    near 0 for sleeping or waiting on I/O, above 1 when ``func`` runs its own threads.
    ``wait_fraction`` is the share of wall time ``func`` spent blocked (sleep, I/O): the
    missing CPU time when the thread really blocked, 0 when it was merely preempted.
    ``error_index`` / ``error`` name the item ``func`` raised on (sampling stops there).

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
    error_index: int | None
    error: BaseException | None = field(compare=False)
    sample_seconds: float

    @property
    def cv(self) -> float:
        """Coefficient of variation of the item times (spread / mean)."""
        return self.std_seconds / self.mean_seconds if self.mean_seconds > 0 else 0.0

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
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _voluntary_switches() -> int:
    """Voluntary context switches of this thread so far (it blocked: sleep, I/O, locks).

    Being preempted on a busy machine also lowers CPU time / wall time, but it counts as
    an involuntary switch: this is how waiting work is told from crowded work.
    """
    if _getrusage is None:
        return -1
    return int(_getrusage(_RUSAGE).ru_nvcsw)


_getrusage: Callable[[int], Any] | None
try:
    import resource as _resource

    _getrusage = _resource.getrusage
    _RUSAGE = getattr(_resource, "RUSAGE_THREAD", _resource.RUSAGE_SELF)
except ImportError:  # pragma: no cover - Windows
    _getrusage = None
    _RUSAGE = 0

try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
    _PAGE = 4096
_HAS_STATM = os.path.exists("/proc/self/statm")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _func_pickle(func: Callable[..., Any]) -> tuple[int, bool, str | None]:
    """Pickled size of ``func`` (plain pickle, else cloudpickle as the process backend does)."""
    try:
        return len(pickle.dumps(func, _PROTOCOL)), True, None
    except Exception as exc:
        first = exc
    try:
        import cloudpickle
    except ImportError:
        return 0, False, (
            f"the function cannot be pickled ({_describe(first)}) and cloudpickle is not "
            "installed; define it at module level or `pip install cloudpickle`"
        )
    try:
        return len(cloudpickle.dumps(func, _PROTOCOL)), True, None
    except Exception as exc:
        return 0, False, f"the function cannot be pickled, even by cloudpickle ({_describe(exc)})"


def _batch_pickle(
    objs: list[Any], what: str, offset: int = 0
) -> tuple[float, float, float, str | None]:
    """(bytes per item, dump s per item, load s per item, error) for one pickled batch."""
    if not objs:
        return 0.0, 0.0, 0.0, None
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
        for i, obj in enumerate(objs):
            try:
                pickle.dumps(obj, _PROTOCOL)
            except Exception as item_exc:
                return 0.0, 0.0, 0.0, (
                    f"{what} {offset + i} ({type(obj).__name__}) cannot be pickled "
                    f"({_describe(item_exc)}), so it cannot be sent to a process"
                )
        return 0.0, 0.0, 0.0, f"the sampled {what}s cannot be pickled ({_describe(exc)})"
    n = len(objs)
    return len(blob) / n, (t1 - t0) / n, (t2 - t1) / n, None


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def sample(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    sample_size: int | None = None,
    budget_s: float = SAMPLE_BUDGET_S,
    max_items: int = MAX_SAMPLE_ITEMS,
    cores: float = 1.0,
    assumed_length: int = 10_000,
) -> Sample:
    """Run ``func`` on the first items of ``data`` and measure them.

    ``sample_size`` fixes the count (else it adapts, see the module docstring; ``cores`` and
    ``assumed_length``, used when the length is unknown, size the best-case parallel run
    that the sample must stay a small fraction of). Never draws
    more items from an iterator than it runs. If ``func`` raises, sampling stops: the
    profile records the item and the error, and ``results`` hold only the items before it.

    >>> s = sample(str, iter(range(5)), sample_size=2)
    >>> s.results, list(s.data)
    (('0', '1'), [0, 1, 2, 3, 4])
    """
    is_iterator = iter(data) is data
    n_items = None if is_iterator else _length(data)
    seq: Sequence[Any] | None = data if isinstance(data, Sequence) else None
    it: Iterator[Any] | None = None
    if seq is None:
        it = iter(data)
        if is_iterator and n_items is None:
            hint = operator.length_hint(it, -1)
            n_items = None if hint < 0 else hint  # remaining = total before sampling
    limit = max_items if sample_size is None else sample_size
    if n_items is not None and not is_iterator:
        # An iterator's length_hint is only a hint: it never cuts the sample short.
        limit = min(limit, n_items)

    items: list[Any] = []
    results: list[Any] = []
    times: list[float] = []
    mem = 0
    error_index: int | None = None
    error: BaseException | None = None
    exhausted = False
    pc = time.perf_counter
    overhead = _timer_overhead()
    cpu0 = time.process_time()
    vol0 = _voluntary_switches()
    start = pc()
    i = 0
    while i < limit:
        if seq is not None:
            item = seq[i]
        else:
            assert it is not None
            try:
                item = next(it)
            except StopIteration:
                exhausted = True
                break
        items.append(item)
        track_mem = _HAS_STATM and i < _MEMORY_ITEMS
        rss0 = _rss() if track_mem else 0
        t0 = pc()
        try:
            out = func(item)
        except Exception as exc:
            error_index, error = i, exc
            break
        t1 = pc()
        if track_mem:
            mem = max(mem, _rss() - rss0)
        results.append(out)
        times.append(max(t1 - t0 - overhead, 0.0))
        i += 1
        if sample_size is None:
            spent = t1 - start
            if spent >= budget_s:
                break
            if spent >= _MIN_SAMPLE_S:
                total = n_items if n_items is not None else assumed_length
                waiting = time.process_time() - cpu0 < 0.5 * spent and (
                    vol0 < 0 or _voluntary_switches() - vol0 >= 0.5 * i)
                best_case = total * (spent / i) / (IO_PARALLELISM if waiting else cores)
                if spent >= SAMPLE_FRACTION * best_case:
                    break
    wall = pc() - start
    cpu = time.process_time() - cpu0
    switches = _voluntary_switches() - vol0 if vol0 >= 0 else -1

    if seq is not None:
        if n_items is not None and i >= n_items and error is None:
            exhausted = True
        out_data: Iterable[Any] = data
    elif is_iterator:
        assert it is not None
        out_data = itertools.chain(items, it)
        if exhausted:
            n_items = len(items)
    else:
        out_data = data
        if n_items is not None and i >= n_items:
            exhausted = True

    func_bytes, func_ok, func_err = _func_pickle(func)
    in_b, in_dump, in_load, in_err = _batch_pickle(items[:_PICKLE_ITEMS], "item")
    out_b, out_dump, out_load, out_err = _batch_pickle(results[:_PICKLE_ITEMS], "result")
    pickle_error = func_err or in_err or out_err

    n = len(times)
    mean = math.fsum(times) / n if n else 0.0
    std = math.sqrt(math.fsum((t - mean) ** 2 for t in times) / (n - 1)) if n > 1 else 0.0
    timed_wall = math.fsum(times)
    # The loop's own work (pickling is outside it) is tiny beside the items themselves,
    # so CPU over loop wall is the items' CPU share.
    cpu_ratio = cpu / wall if wall > 0 else 1.0
    if timed_wall <= 0:
        cpu_ratio = 1.0
    # Blocking shows as voluntary switches (at least one per waiting call); without them a
    # low ratio means the machine was busy, and the work itself is CPU-bound.
    blocked = switches < 0 or switches >= 0.5 * max(len(times), 1)
    wait_fraction = max(0.0, 1.0 - cpu_ratio) if blocked else 0.0
    profile = Profile(
        n_sampled=n,
        n_items=n_items,
        exhausted=exhausted,
        item_seconds=tuple(times),
        mean_seconds=mean,
        std_seconds=std,
        max_seconds=max(times, default=0.0),
        cpu_ratio=cpu_ratio,
        wait_fraction=wait_fraction,
        in_bytes=in_b,
        out_bytes=out_b,
        in_dump_seconds=in_dump,
        in_load_seconds=in_load,
        out_dump_seconds=out_dump,
        out_load_seconds=out_load,
        mem_per_item=float(max(mem, 0, int(out_b))),
        func_bytes=func_bytes,
        func_picklable=func_ok,
        items_picklable=in_err is None,
        outputs_picklable=out_err is None,
        pickle_error=pickle_error,
        error_index=error_index,
        error=error,
        sample_seconds=wall,
    )
    return Sample(profile=profile, results=tuple(results), data=out_data)
