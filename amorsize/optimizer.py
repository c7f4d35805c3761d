"""``optimize(func, data)``: decide serial, processes or threads, how many workers, what chunks.

Data flow::

    func, data ─▶ sampling.sample() ─▶ Profile + results of the first items + data (intact)
                                          │
    system.get_system_info() ─────────────┤  (cached JSON: measured once per machine)
                                          ▼
                    _core.model_search(): predicted seconds per (backend, n, chunksize)
                                          │  (+ a backend's planning hook, e.g. dask's)
                                          ▼
               OptimizationResult: the fastest plan, clearly faster than serial or serial

>>> def square(x):
...     return x * x
>>> plan = optimize(square, range(100))
>>> plan.backend, plan.n_jobs
('serial', 1)
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from amorsize._core import (
    model_max_workers_for_memory,
    model_parallel_floor,
    model_search,
    model_thread_seconds,
)
from amorsize._format import format_bytes, format_seconds
from amorsize._model_types import Machine, Workload
from amorsize._validate import MAX_WORKERS, check_int
from amorsize.backends import BACKEND_NAMES, DEFAULT_BACKENDS, REGISTRY, plan_hook
from amorsize.backends import warm_workers as backend_warm_workers
from amorsize.sampling import (
    ASSUMED_UNKNOWN_LENGTH,
    SPILL_MAX_ITEMS,
    OffloadRule,
    Profile,
    RemoteRunner,
    Sample,
    SpillRunner,
    sample,
    start_watcher,
)
from amorsize.system import SystemInfo, get_system_info

__all__ = ["MIN_SPEEDUP", "Candidate", "Estimate", "OptimizationResult", "optimize"]

#: Parallel plans must be predicted at least this much faster than serial. The model's
#: error on benchmarks/bench_quality.py's suite is within about +-15%, so a smaller margin
#: could pick a plan that is really slower than serial.
MIN_SPEEDUP = 1.2
#: Items whose CPU time is below this share of their wall time mostly wait (sleep, I/O):
#: worker counts well above the core count pay off for them.
IO_BOUND_CPU_RATIO = 0.5
#: Thread counts tried for CPU work (threads help it only where it releases the GIL).
THREAD_COUNTS = (2, 4, 8, 16, 32, 64)
#: Most threads planned for waiting work: the model prices each thread's start-up and
#: hand-out, so this only bounds the search (200 x 10 ms sleeps are fastest on ~200).
#: Far more concurrent waits belong on an event loop (``async def``), not threads.
MAX_WAITING_THREADS = 512
#: The executor's own bookkeeping per item in the parent (ordering, result slots), beyond
#: pickling: parent CPU time per item of ``execute(ident, range(400_000),
#: backend="processes", chunksize=2000)`` is ~70 ns on the CI machine, ~30 ns of it pickling.
PARENT_ITEM_SECONDS = 50e-9
#: Work that uses this many cores' worth of CPU per wall second runs its own threads
#: (BLAS, OpenMP): extra workers then compete for the same cores.
MULTITHREADED_CPU_RATIO = 1.3

# Below this per item, the cost model never predicts a process plan 1.2x faster than serial
# (pickling and dispatch in the parent; 2 warm workers, 100,000 small items): such work is
# sampled in the caller, where a sample costs no process round trip.
_OFFLOAD_MIN_ITEM_S = 1e-6
# The backends ``model_parallel_floor`` prices (a decision among others predicts them all).
_FLOOR_BACKENDS = frozenset(("serial", "processes", "threads"))
# Above this pickled size per item, transfer is worth naming as the reason for serial.
_BIG_ITEM_BYTES = 16 * 1024
# Waiting items go one per task to threads unless bigger chunks are predicted this much
# faster (the model's error is about +-15%: within it, the robust choice wins).
_ONE_PER_TASK_SLACK = 1.15
# The compiled model's backend codes (model_search's tuples; _core_model.pxi's enum).
_CODE = {0: "serial", 1: "processes", 2: "threads"}


@dataclass(frozen=True)
class Estimate:
    """Predicted wall seconds of the whole run: serially and with the chosen plan.

    Both include the time already spent running the sampled items.

    >>> Estimate(serial=2.0, chosen=1.0).serial
    2.0
    """

    serial: float
    chosen: float


@dataclass(frozen=True)
class Candidate:
    """One ranked alternative: a backend, worker count, chunk size and predicted seconds.

    >>> Candidate("processes", 2, 16, 0.5, 1.9).backend
    'processes'
    """

    backend: str
    n_jobs: int
    chunksize: int
    seconds: float
    speedup: float
    note: str = ""


@dataclass(frozen=True)
class OptimizationResult:
    """The plan ``optimize`` chose, why, and everything it measured to choose it.

    ``data`` is equal to the input (a list is returned as is; an iterator's sampled items are
    chained back in front of the rest). ``sample_results`` are ``func``'s results for the
    first ``len(sample_results)`` items of ``data``: an executor skips those items (when
    ``execute`` samples on past failures, a ``sampling.SampledFailure`` marks a failed one).

    >>> import multiprocessing
    >>> plan = optimize(abs, [-1, 2])
    >>> with multiprocessing.Pool(plan.n_jobs) as pool:      # doctest: +SKIP
    ...     pool.map(abs, plan.data, chunksize=plan.chunksize)
    [1, 2]
    """

    n_jobs: int
    chunksize: int
    backend: str
    estimated_speedup: float
    estimated_seconds: Estimate
    reason: str
    warnings: list[str]
    data: Iterable[Any] = field(repr=False)
    profile: Profile = field(repr=False)
    system: SystemInfo = field(repr=False)
    alternatives: tuple[Candidate, ...] = field(repr=False)
    sample_results: tuple[Any, ...] = field(repr=False)
    n_items: int | None = None
    decision_seconds: float = 0.0

    def __str__(self) -> str:
        return _report(self, alternatives=0)

    def report(self, alternatives: int = 8) -> str:
        """The readable report with up to ``alternatives`` ranked alternatives."""
        return _report(self, alternatives=alternatives)


# --------------------------------------------------------------------------- formatting
def _plan_name(backend: str, n: int, c: int) -> str:
    if backend == "serial":
        return "serial"
    return f"{backend} n_jobs={n} chunksize={c}"


def _report(r: OptimizationResult, alternatives: int) -> str:
    p = r.profile
    lines = [
        f"amorsize plan: {_plan_name(r.backend, r.n_jobs, r.chunksize)}"
        f" (predicted {r.estimated_speedup:.2f}x vs serial:"
        f" {format_seconds(r.estimated_seconds.chosen)} vs {format_seconds(r.estimated_seconds.serial)})",
        f"why: {r.reason}",
    ]
    if p.n_sampled:
        kind = "mostly waiting" if p.wait_fraction > 1.0 - IO_BOUND_CPU_RATIO else "CPU-bound"
        lines.append(
            f"sampled {p.n_sampled} of {r.n_items if r.n_items is not None else '?'} items in"
            f" {format_seconds(p.sample_seconds)}: {format_seconds(p.mean_seconds)} each"
            f" (spread {p.cv:.0%}), {kind} (CPU/wall {p.cpu_ratio:.2f}),"
            f" {format_bytes(p.in_bytes)} in / {format_bytes(p.out_bytes)} out per item"
        )
    s = r.system
    lines.append(
        f"machine: {s.usable_cores:g} usable cores, start method {s.start_method},"
        f" worker start-up {format_seconds(s.process_startup_s)}, round trip"
        f" {format_seconds(s.process_roundtrip_s)}, {s.transfer_s_per_byte * (1 << 20) * 1e3:.3g} ms/MB"
        f" through a pipe"
    )
    lines.extend(f"warning: {w}" for w in r.warnings)
    if alternatives and r.alternatives:
        lines.append("alternatives (predicted, fastest first):")
        for c in r.alternatives[:alternatives]:
            mark = "*" if (c.backend, c.n_jobs, c.chunksize) == (
                r.backend, r.n_jobs, r.chunksize) else " "
            note = f"  {c.note}" if c.note else ""
            lines.append(
                f" {mark} {_plan_name(c.backend, c.n_jobs, c.chunksize):<40}"
                f" {format_seconds(c.seconds):>10}  {c.speedup:5.2f}x{note}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- validation
def _validate(
    func: Any, data: Any, n_jobs: Any, sample_size: Any, backends: Any
) -> tuple[str, ...]:
    if not callable(func):
        msg = (
            f"optimize(): func must be callable (it is applied to each item); got "
            f"{func!r} of type {type(func).__name__}. Pass a function such as `optimize(f, data)`."
        )
        raise TypeError(msg)
    try:
        iter(data)
    except TypeError:
        msg = (
            f"optimize(): data must be iterable (a list, range, generator...); got "
            f"{type(data).__name__}. Wrap a single item in a list: `optimize(f, [item])`."
        )
        raise TypeError(msg) from None
    check_int("optimize(): ", "n_jobs", n_jobs, 1, MAX_WORKERS, none=True, note=" (None: choose)")
    check_int("optimize(): ", "sample_size", sample_size, 1, none=True, note=" (None: adapt)")
    if isinstance(backends, str):
        backends = (backends,)
    sequence = type(backends) is tuple or isinstance(backends, Sequence | set | frozenset)
    if not sequence or not backends:
        msg = (
            f"optimize(): backends must be a non-empty sequence of backend names; got "
            f"{backends!r}. Use e.g. backends=('serial', 'processes', 'threads')."
        )
        raise ValueError(msg)
    out: list[str] = []
    for b in backends:
        if b not in BACKEND_NAMES:
            msg = (
                f"optimize(): backends may contain only {', '.join(map(repr, BACKEND_NAMES))}; got "
                f"{b!r} in {backends!r}. Remove it or fix its spelling."
            )
            raise ValueError(msg)
        if REGISTRY[b].coroutines:
            msg = (
                f"optimize(): backend {b!r} runs async def functions and execute() plans it "
                f"itself (execute(async_func, data)); remove {b!r} from backends={backends!r}"
            )
            raise ValueError(msg)
        if b not in out:
            out.append(b)
    return tuple(out)


# --------------------------------------------------------------------------- planning
def _reason_serial_nothing(n_items: int, profile: Profile) -> str:
    if n_items == 0:
        return "there are no items, so there is nothing to parallelise"
    threads = profile.on_threads
    beside = (
        f": the first one waited, so the next {threads} ran on {threads} threads beside it"
        if threads else ""
    )
    return (
        f"all {profile.n_sampled} item(s) already ran while sampling"
        f" ({format_seconds(profile.sample_seconds)}){beside}; nothing is left to run"
    )


def _failure_warnings(profile: Profile) -> list[str]:
    """What the sample's failures mean for the run (items named by input index)."""
    err = profile.error
    if profile.error_index is None or err is None:
        return []
    what = f"{type(err).__name__}: {err}"
    if profile.stopped_on_error:
        return [
            f"func raised on item {profile.error_index} while sampling ({what}); sampling "
            "stopped there, and that failure is reported without running the item again"
        ]
    return [
        f"{profile.n_failed} of the {profile.n_sampled} sampled items failed (the first: item"
        f" {profile.error_index}, {what}); their failures are kept, and their times count"
    ]


def _why_not_parallel(
    profile: Profile,
    cands: list[Candidate],
    system: SystemInfo,
    allowed: tuple[str, ...],
    ghost: float = 0.0,
) -> str:
    """A sentence saying what keeps the parallel plans from paying off.

    ``ghost`` is the predicted speedup of the best process plan when the function or data
    cannot be pickled (0 when processes were not considered).
    """
    procs = [c for c in cands if c.backend == "processes"]
    threads = [c for c in cands if c.backend == "threads"]
    gil = ""
    if threads and profile.wait_fraction <= 1.0 - IO_BOUND_CPU_RATIO:
        gil = "; " + _gil_words(profile)
    if not procs and "processes" in allowed and not profile.picklable:
        would = f" (they would be predicted {ghost:.2f}x faster)" if ghost > 1.0 else ""
        return f"processes are ruled out{would}: {profile.pickle_error}{gil}"
    if not procs and not threads:
        return "no parallel backend is allowed or available for this function and data"
    if not procs:
        return f"the work is CPU-bound: {_gil_words(profile)}"
    best = procs[0]
    return _transfer_words(profile, system, gil) or (
        f"the work is too small for the overhead ({format_seconds(profile.mean_seconds)} per "
        f"item; the best process plan, {_plan_name(best.backend, best.n_jobs, best.chunksize)},"
        f" is predicted {best.speedup:.2f}x vs serial){gil}"
    )


def _transfer_words(profile: Profile, system: SystemInfo, gil: str) -> str:
    """The sentence naming big inputs or results as what keeps processes from paying off
    (the parent alone moves them), or ``""``; ``gil`` ends it."""
    per_byte = system.transfer_s_per_byte
    out_cost = profile.out_load_seconds + profile.out_bytes * per_byte
    in_cost = profile.in_dump_seconds + profile.in_bytes * per_byte
    t = profile.mean_seconds
    if out_cost > 0.4 * t and out_cost >= in_cost and profile.out_bytes >= _BIG_ITEM_BYTES:
        return (
            f"each result is {format_bytes(profile.out_bytes)} and the parent alone must receive and "
            f"unpickle it ({format_seconds(out_cost)}, vs {format_seconds(t)} to compute it){gil}"
        )
    if in_cost > 0.4 * t and profile.in_bytes >= _BIG_ITEM_BYTES:
        return (
            f"each input is {format_bytes(profile.in_bytes)} and the parent alone must pickle and send"
            f" it ({format_seconds(in_cost)}, vs {format_seconds(t)} to compute it){gil}"
        )
    return ""


def _gil_words(profile: Profile) -> str:
    """What the sample says about threads for CPU work (the GIL), in a few words."""
    o = profile.thread_overlap
    if math.isnan(o):
        return "threads cannot overlap CPU-bound Python (the GIL)"
    return f"two items on two threads overlapped {o:.0%} (the GIL serialises the rest)"


def _worker_counts(
    profile: Profile, allowed: tuple[str, ...], n_jobs: int | None, top: int, limit: int,
    io_bound: bool,
) -> tuple[list[int], list[int], list[int]]:
    """Worker counts to predict: (processes, threads, ghost processes).

    Process plans for a function or data that cannot travel are still predicted as ghosts,
    never chosen: the reason for serial can then say what pickling costs.
    """
    proc_ns: list[int] = []
    ghost_ns: list[int] = []
    thread_ns: list[int] = []
    if "processes" in allowed:
        ns = {n_jobs} if n_jobs is not None else set(range(2, top + 1))
        if io_bound and n_jobs is None:
            ns.update((2 * top, 4 * top))
        found = sorted(n for n in ns if n <= limit or n == n_jobs)
        if profile.picklable:
            proc_ns = found
        else:
            ghost_ns = found
    if "threads" in allowed:
        thread_ns = (
            [n_jobs] if n_jobs is not None
            else sorted({n for n in _thread_counts(top, limit, io_bound) if 2 <= n <= limit})
        )
    return proc_ns, thread_ns, ghost_ns


def _thread_counts(top: int, limit: int, io_bound: bool) -> tuple[int, ...]:
    """Thread counts to predict; for waiting work also counts that run the ``limit`` items
    left in one, two or three whole waves (no thread idles in a last partial wave)."""
    if not io_bound:
        return (*THREAD_COUNTS, top)
    grid = tuple(1 << k for k in range(1, MAX_WAITING_THREADS.bit_length()))
    waves = tuple(-(-limit // k) for k in (1, 2, 3) if -(-limit // k) <= MAX_WAITING_THREADS)
    return (*grid, top, *waves)


def _optimize(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    n_jobs: int | None = None,
    sample_size: int | None = None,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    verbose: bool = False,
    warm_workers: int | Callable[[], int] = 0,
    client: Any = None,
    min_speedup: float = MIN_SPEEDUP,
    keep_going: bool = False,
    remote: RemoteRunner | None = None,
    offload: bool = False,
    index_of: Callable[[int], int] | None = None,
    spill: SpillRunner | None = None,
) -> OptimizationResult:
    """``optimize`` for the executor: ``warm_workers`` process workers already run.

    Their start-up costs nothing, which can tip small jobs towards processes (a callable is
    asked after sampling, which may have started one). ``keep_going``, ``remote`` and
    ``index_of`` go to ``sample``; with ``offload`` the sample moves to ``remote`` once its
    items show that a process plan could pay off (``_offload_rule``). ``spill`` starts
    waiting items on threads while the first one runs (``sample``), when threads may run.
    """
    allowed = _validate(func, data, n_jobs, sample_size, backends)
    if spill is not None:
        start_watcher()
    t_start = time.perf_counter()
    system = get_system_info()
    t_sample = time.perf_counter()
    rule = None
    if remote is not None and offload:
        rule = _offload_rule(system, warm_workers, _planned_length(data))
    s = sample(
        func, data, sample_size=sample_size, cores=system.usable_cores,
        assumed_length=ASSUMED_UNKNOWN_LENGTH, keep_going=keep_going, remote=remote,
        offload=rule, index_of=index_of, probe_threads="threads" in allowed and n_jobs != 1,
        spill=spill if "threads" in allowed and n_jobs != 1 else None,
        spill_items=SPILL_MAX_ITEMS if n_jobs is None else n_jobs - 1,
    )
    # Decision time excludes sampling: machine facts before it, the model after it.
    t_decide = time.perf_counter() - (t_sample - t_start)
    warm = warm_workers() if callable(warm_workers) else warm_workers
    threads = backend_warm_workers("threads") if "threads" in allowed else 0
    return _decide(
        s, system, allowed=allowed, n_jobs=n_jobs, warm_workers=warm, client=client,
        min_speedup=min_speedup, verbose=verbose, t_decide=t_decide, warm_threads=threads,
    )


def _planned_length(data: Iterable[Any]) -> int:
    """Items the run will have: the length, an iterator's hint, or the planning horizon."""
    if iter(data) is not data:
        try:
            return len(data)  # type: ignore[arg-type]
        except TypeError:
            return ASSUMED_UNKNOWN_LENGTH
    hint = operator.length_hint(data, -1)
    return ASSUMED_UNKNOWN_LENGTH if hint < 0 else hint


def _offload_rule(system: SystemInfo, warm: int | Callable[[], int], total: int) -> OffloadRule:
    """Whether items this slow could make a process plan pay off: then sample in a worker.

    A lower bound on any process plan (``model_parallel_floor``'s, with what the sample
    knows so far): it starts a worker (unless one is warm) and costs a round trip, the
    parent hands out every item, at least the bytes of the first one and its result
    through a pipe, and the CPU work spreads over the usable cores at best; it must still
    come out ``MIN_SPEEDUP`` faster than serial on the items left. Items under
    ``_OFFLOAD_MIN_ITEM_S`` never pay. The bytes are weighed only when the rest of the
    rule says yes: 2500 items of 200 KB that took 0.1 ms each went to a worker (45 ms of
    a 0.3 s serial job, bench_quality.py big_input_200kb) though moving one costs 0.35 ms.
    ``warm`` (running workers) may be a callable: it is asked once, when first needed (it
    polls each worker process; most samples never get that far).
    """
    cores = max(system.usable_cores, 1.0)
    asked: list[int] = []  # ``warm``'s answer, once asked

    def fixed() -> float:
        if not asked:
            asked.append(warm() if callable(warm) else warm)
        start = system.process_startup_s + system.process_startup_per_worker_s
        return system.process_roundtrip_s + (0.0 if asked[0] > 0 else start)

    def pays(rest: int, mean: float, parent: float) -> bool:
        share = max(parent, (mean + parent) / cores)
        return rest * mean > MIN_SPEEDUP * (fixed() + rest * share)

    def could_pay(mean: float, done: int, item_bytes: Callable[[], float]) -> bool:
        rest = max(total - done, 0)
        if mean <= _OFFLOAD_MIN_ITEM_S or not pays(rest, mean, 0.0):
            return False
        parent = item_bytes() * system.transfer_s_per_byte + PARENT_ITEM_SECONDS
        return pays(rest, mean, parent)

    return could_pay


# --------------------------------------------------------------------------- the decision
# (backend, n_jobs, chunksize, predicted seconds for the items left, note)
_Row = tuple[str, int, int, float, str]


class _Job(NamedTuple):
    """The sampled job as the decision sees it: items left and their serial seconds.

    ``sampled_s`` was already spent running the sampled items: every total includes it.
    ``cpu_fraction`` is the share of an item's wall time not spent waiting, in [0, 1];
    ``io_bound`` items mostly wait (sleep, I/O): many more workers than cores pay off;
    ``nothing_left``: every item already ran while sampling.
    (Tuples, not dataclasses, here: the whole decision costs tens of microseconds.)
    """

    profile: Profile
    remaining: float
    sampled_s: float
    serial_rest: float
    serial_total: float
    cpu_fraction: float
    io_bound: bool
    nothing_left: bool

    @classmethod
    def of(cls, profile: Profile) -> _Job:
        """The job left after ``profile``'s sample (an unknown length: the horizon)."""
        if profile.n_items is None:
            remaining = float(ASSUMED_UNKNOWN_LENGTH)
        else:
            # A failure that stopped sampling is delivered too: it is not run again.
            remaining = float(
                max(profile.n_items - profile.n_sampled - profile.stopped_on_error, 0)
            )
        serial_rest = remaining * profile.mean_seconds
        sampled_s = profile.sample_seconds
        cpu_fraction = min(max(1.0 - profile.wait_fraction, 0.0), 1.0)
        # Nothing to plan: every item ran while sampling (a failure that stopped it still
        # has to be delivered, by the run).
        nothing_left = (
            profile.n_items is not None and remaining == 0 and not profile.stopped_on_error
        )
        return cls(
            profile, remaining, sampled_s, serial_rest, sampled_s + serial_rest,
            cpu_fraction, cpu_fraction < IO_BOUND_CPU_RATIO, nothing_left,
        )

    def candidates(self, plans: Iterable[_Row]) -> list[Candidate]:
        """Candidates from ``(backend, n_jobs, chunksize, seconds for the items left, note)``
        rows: their totals include the sample, their speedups are against serial."""
        out = []
        for backend, n, c, rest, note in plans:
            total = self.sampled_s + rest
            out.append(
                Candidate(backend, n, c, total, self.serial_total / total if total else 1.0, note)
            )
        return out


class _Choice(NamedTuple):
    """The plan chosen: ``rest`` is its predicted seconds for the items left."""

    backend: str
    n_jobs: int
    chunksize: int
    rest: float
    reason: str

    @classmethod
    def serial(cls, rest: float, reason: str) -> _Choice:
        """Serial, with its predicted seconds and why."""
        return cls("serial", 1, 1, rest, reason)


class _Ranked(NamedTuple):
    """Every predicted plan, fastest first, and what predicting them found.

    ``ghost`` is the predicted speedup of the best process plan when the function or data
    cannot be pickled (0 when processes were not considered).
    """

    candidates: tuple[Candidate, ...]
    ghost: float
    warnings: tuple[str, ...]


def _decide(
    s: Sample,
    system: SystemInfo,
    *,
    allowed: tuple[str, ...],
    n_jobs: int | None,
    warm_workers: int = 0,
    client: Any = None,
    min_speedup: float = MIN_SPEEDUP,
    verbose: bool = False,
    t_decide: float | None = None,
    warm_threads: int = 0,
) -> OptimizationResult:
    """The plan for an already measured sample on ``system`` (no sampling, no I/O).

    ``warm_threads``: the size of the shared threads backend's warm pool (its threads cost
    no start-up), as ``warm_workers`` counts running process workers.

    Steps: what the sample says (warnings, plans it rules out) -> the ranked candidates ->
    the choice -> its explanation.
    """
    if t_decide is None:
        t_decide = time.perf_counter()
    p = s.profile
    job = _Job.of(p)
    warnings = _sample_warnings(p, allowed)
    if job.nothing_left:
        choice = _Choice.serial(0.0, _reason_serial_nothing(p.n_items or 0, p))
        return _result(s, system, job, choice, warnings, (), verbose=verbose, t_decide=t_decide)
    allowed, forced = _rule_out_this_process(p, allowed)
    if forced:
        warnings.append(forced)
    early = _early_serial_reason(p, allowed, n_jobs) or _below_floor(
        job, system, allowed, warm_workers, warm_threads, min_speedup
    )
    if early:
        choice = _Choice.serial(job.serial_rest, early)
        return _result(s, system, job, choice, warnings, (), verbose=verbose, t_decide=t_decide)
    ranked = _rank(job, system, allowed, n_jobs, warm_workers, client, warm_threads)
    warnings += ranked.warnings
    best = _choose(p, ranked.candidates, allowed, min_speedup)
    choice, note = _explain(job, best, ranked, system, allowed, forced, min_speedup)
    if note:
        warnings.append(note)
    alts = ranked.candidates
    return _result(s, system, job, choice, warnings, alts, verbose=verbose, t_decide=t_decide)


def _result(
    s: Sample,
    system: SystemInfo,
    job: _Job,
    choice: _Choice,
    warnings: list[str],
    alts: tuple[Candidate, ...],
    *,
    verbose: bool,
    t_decide: float,
) -> OptimizationResult:
    """The ``OptimizationResult`` for ``choice`` (printed with ``verbose``)."""
    chosen_total = job.sampled_s + choice.rest
    r = OptimizationResult(
        n_jobs=choice.n_jobs,
        chunksize=choice.chunksize,
        backend=choice.backend,
        estimated_speedup=job.serial_total / chosen_total if chosen_total > 0 else 1.0,
        estimated_seconds=Estimate(serial=job.serial_total, chosen=chosen_total),
        reason=choice.reason,
        warnings=warnings,
        data=s.data,
        profile=s.profile,
        system=system,
        alternatives=alts or (Candidate("serial", 1, 1, job.serial_total, 1.0),),
        sample_results=s.results,
        n_items=s.profile.n_items,
        decision_seconds=time.perf_counter() - t_decide,
    )
    if verbose:
        print(r.report())
    return r


# --------------------------------------------------------------------------- what the sample says
def _sample_warnings(profile: Profile, allowed: tuple[str, ...]) -> list[str]:
    """Warnings from the sample alone: failures, what cannot travel, an unknown length."""
    warnings = _failure_warnings(profile)
    if profile.pickle_error is not None and any(REGISTRY[b].out_of_process for b in allowed):
        warnings.append(profile.pickle_error + "; process backends are ruled out")
    if profile.n_items is None:
        warnings.append(
            f"the data's length is unknown (an iterator); planned as if"
            f" {float(ASSUMED_UNKNOWN_LENGTH):,.0f} more items follow the sample"
        )
    return warnings


def _rule_out_this_process(
    profile: Profile, allowed: tuple[str, ...]
) -> tuple[tuple[str, ...], str]:
    """``allowed`` without the in-process backends once a sampled item crashed a worker.

    Serial or threads would run the rest in this process, where the crash is fatal. Returns
    the backends left and the sentence saying why (empty when nothing was ruled out).
    """
    if not (profile.n_crashed and "processes" in allowed and profile.picklable):
        return allowed, ""
    forced = (
        f"serial and threads are ruled out: {profile.n_crashed} sampled item(s) crashed a "
        "worker process, and in the calling process a crash would end the program"
    )
    return tuple(b for b in allowed if REGISTRY[b].out_of_process), forced


def _early_serial_reason(profile: Profile, allowed: tuple[str, ...], n_jobs: int | None) -> str:
    """Why serial is decided before any plan is predicted, or ``""``."""
    if profile.stopped_on_error and profile.n_sampled == 0:
        return (
            f"func raised on the first item ({type(profile.error).__name__}), so nothing could "
            "be timed; running serially surfaces the error at once"
        )
    if n_jobs == 1 and "serial" in allowed:
        return "n_jobs=1 was requested"
    return ""


def _below_floor(
    job: _Job,
    system: SystemInfo,
    allowed: tuple[str, ...],
    warm_workers: int,
    warm_threads: int,
    min_speedup: float,
) -> str:
    """Why serial wins before any plan is predicted: no process or thread plan can come
    within ``min_speedup`` of it (``model_parallel_floor``), or ``""``.

    Only where the compiled model prices every allowed parallel backend the plain way (no
    planning hook, no ghost plans of unpicklable work, no multithreaded func to rescale).
    """
    p = job.profile
    procs = "processes" in allowed and p.picklable
    threads = "threads" in allowed
    if (
        "serial" not in allowed
        or any(b not in _FLOOR_BACKENDS for b in allowed)
        or ("processes" in allowed and not p.picklable)
        or p.cpu_ratio > MULTITHREADED_CPU_RATIO
        or not (procs or threads)
    ):
        return ""
    w, m = _model_inputs(job, system, warm_workers, p.mean_seconds, warm_threads)
    floor = job.sampled_s + model_parallel_floor(w, m, procs, threads)
    if job.serial_total >= min_speedup * floor:
        return ""
    gil = "; " + _gil_words(p) if threads and not job.io_bound else ""
    why = (procs and _transfer_words(p, system, gil)) or (
        f"the work is too small for the overhead ({format_seconds(p.mean_seconds)} per item;"
        f" no parallel plan can be predicted under {format_seconds(floor)}, against"
        f" {format_seconds(job.serial_total)} serially){gil}"
    )
    return f"serial is best: {why}"


# --------------------------------------------------------------------------- candidates
def _model_inputs(
    job: _Job, system: SystemInfo, warm_workers: int, t_par: float, warm_threads: int = 0
) -> tuple[Workload, Machine]:
    """The compiled model's structs; ``t_par`` is the item's seconds as one thread's work;
    ``warm_threads`` the size of a warm thread pool (0: none)."""
    p = job.profile
    t = p.mean_seconds
    w: Workload = {
        "n_items": job.remaining,
        "t_mean": t_par,
        "t_std": p.std_seconds * (t_par / t if t > 0 else 1.0),
        "t_max": p.max_seconds * (t_par / t if t > 0 else 1.0),
        "cpu_fraction": job.cpu_fraction,
        "in_bytes": p.in_bytes,
        "out_bytes": p.out_bytes,
        "in_dump_s": p.in_dump_seconds,
        "in_load_s": p.in_load_seconds,
        "out_dump_s": p.out_dump_seconds,
        "out_load_s": p.out_load_seconds,
        "mem_per_item": p.mem_per_item,
        "func_bytes": float(p.func_bytes),
        "thread_overlap": p.thread_overlap if p.thread_overlap > 0.0 else 0.0,
    }
    m: Machine = {
        "cores": system.usable_cores,
        "proc_startup_s": system.process_startup_s,
        "proc_startup_per_worker_s": system.process_startup_per_worker_s,
        "warm_workers": float(max(warm_workers, 0)),
        "proc_roundtrip_s": system.process_roundtrip_s,
        "per_byte_s": system.transfer_s_per_byte,
        "parent_item_s": PARENT_ITEM_SECONDS,
        "worker_rss": float(system.worker_rss_bytes),
        "available_memory": float(system.available_memory),
        "thread_startup_s": system.thread_startup_s,
        "thread_roundtrip_s": system.thread_roundtrip_s,
        "warm_threads": float(max(warm_threads, 0)),
    }
    return w, m


def _rank(
    job: _Job,
    system: SystemInfo,
    allowed: tuple[str, ...],
    n_jobs: int | None,
    warm_workers: int,
    client: Any,
    warm_threads: int = 0,
) -> _Ranked:
    """Every plan predicted, fastest first: the compiled model's, then the planning hooks'."""
    p = job.profile
    warnings: list[str] = []
    # Work that already keeps several cores busy (BLAS/OpenMP) gets no more CPU from more
    # workers: plan with its CPU seconds per item as if it ran on one thread.
    t_par = p.mean_seconds
    if p.cpu_ratio > MULTITHREADED_CPU_RATIO:
        t_par = p.mean_seconds * p.cpu_ratio
        warnings.append(
            f"func uses about {p.cpu_ratio:.1f} cores by itself (BLAS/OpenMP threads:"
            f" {system.blas_threads}); parallel workers would compete for the same cores"
        )
    top, limit = max(int(system.usable_cores), 1), max(int(job.remaining), 1)
    proc_ns, thread_ns, ghost_ns = _worker_counts(p, allowed, n_jobs, top, limit, job.io_bound)
    w, m = _model_inputs(job, system, warm_workers, t_par, warm_threads)
    rows = model_search(w, m, proc_ns, thread_ns)
    if job.io_bound:
        rows = _one_per_task(w, m, rows)
    cands = job.candidates(
        (_CODE[int(code)], int(n), int(c), job.serial_rest if code == 0 else secs, "")
        for code, n, c, secs in rows
    )
    ghost = 0.0
    if ghost_ns:
        best = min(secs for code, _, _, secs in model_search(w, m, ghost_ns, []) if code)
        total = job.sampled_s + best
        ghost = job.serial_total / total if total > 0 else 0.0
    if proc_ns:
        warnings.extend(_memory_warning(w, m, system, p, max(proc_ns)))
    cands.extend(job.candidates(_hook_plans(job.profile, allowed, client)))
    cands.sort(key=lambda cand: cand.seconds)
    return _Ranked(tuple(cands), ghost, tuple(warnings))


def _one_per_task(
    w: Workload, m: Machine, rows: list[tuple[int, int, int, float]]
) -> list[tuple[int, int, int, float]]:
    """``rows`` with every thread plan at chunks of one item, if the best of those is
    predicted within ``_ONE_PER_TASK_SLACK`` of the best thread plan (else as they are).

    For waiting items: one stalled item (a slow request) then never holds up the items
    queued behind it in its chunk, which a sample of one or two items cannot price.
    """
    ones = [
        (code, n, 1, secs if c == 1 else model_thread_seconds(w, m, float(n), 1.0))
        for code, n, c, secs in rows if code == 2
    ]
    if not ones:
        return rows
    best = min(secs for code, _, _, secs in rows if code == 2)
    if min(secs for *_, secs in ones) > best * _ONE_PER_TASK_SLACK:
        return rows
    return sorted([r for r in rows if r[0] != 2] + ones, key=operator.itemgetter(3))


def _memory_warning(
    w: Workload, m: Machine, system: SystemInfo, profile: Profile, most: int
) -> list[str]:
    """A warning when memory fits fewer process workers than ``most``."""
    fit = model_max_workers_for_memory(w, m, 1.0)
    if fit >= most:
        return []
    return [
        f"memory ({format_bytes(system.available_memory)} available) fits only {fit} process"
        f" workers of {format_bytes(system.worker_rss_bytes + profile.mem_per_item)} each"
    ]


def _hook_plans(profile: Profile, allowed: tuple[str, ...], client: Any) -> list[_Row]:
    """The plans of the allowed backends that plan themselves (``BackendSpec.plan``)."""
    out = []
    for name in allowed:
        if REGISTRY[name].plan is None:
            continue
        try:
            hook = plan_hook(name)
        except ImportError as exc:
            msg = (
                f"optimize(): backends includes {name!r}, but its planning hook cannot be "
                f"imported ({type(exc).__name__}: {exc}). Install what it needs, or leave "
                f"{name!r} out of backends."
            )
            raise ImportError(msg) from exc
        assert hook is not None  # REGISTRY[name].plan is set
        hp = hook(profile, profile.n_items, client)
        note = str(getattr(hp, "reason", ""))
        out.append((name, int(hp.n_jobs), int(hp.chunksize), float(hp.seconds), note))
    return out


# --------------------------------------------------------------------------- choice
def _parallel(cands: tuple[Candidate, ...], allowed: tuple[str, ...]) -> list[Candidate]:
    """The allowed parallel plans, fastest first."""
    return [c for c in cands if c.backend in allowed and c.backend != "serial"]


def _choose(
    profile: Profile, cands: tuple[Candidate, ...], allowed: tuple[str, ...], min_speedup: float
) -> Candidate | None:
    """The fastest allowed parallel plan if it is clearly faster than serial (or serial is
    not allowed); ``None``: serial."""
    parallel = _parallel(cands, allowed)
    best = parallel[0] if parallel else None
    serial_ok = "serial" in allowed
    if best is None and not serial_ok:
        msg = (
            f"optimize(): no backend in backends={allowed!r} can run this function: "
            f"{profile.pickle_error or 'no candidate plan'}. Add 'threads' or 'serial' to "
            "backends, or make the function and items picklable."
        )
        raise ValueError(msg)
    if best is not None and (not serial_ok or best.speedup >= min_speedup):
        return best
    return None


# --------------------------------------------------------------------------- explanation
def _explain(
    job: _Job,
    best: Candidate | None,
    ranked: _Ranked,
    system: SystemInfo,
    allowed: tuple[str, ...],
    forced: str,
    min_speedup: float,
) -> tuple[_Choice, str]:
    """The choice with its reason (serial when ``best`` is None), and a warning when serial
    was excluded although the plan is not clearly faster (else ``""``)."""
    p = job.profile
    if best is None:
        parallel = _parallel(ranked.candidates, allowed)
        why = _why_not_parallel(p, parallel, system, allowed, ranked.ghost)
        return _Choice.serial(job.serial_rest, f"serial is best: {why}"), ""
    what = (
        f"items take {format_seconds(p.mean_seconds)} each"
        + (f", mostly waiting ({p.wait_fraction:.0%} of wall time)" if job.io_bound else "")
        + (f" and {job.remaining:,.0f} remain" if p.n_items is not None else "")
    )
    reason = (
        f"{what}: {_plan_name(best.backend, best.n_jobs, best.chunksize)} is predicted"
        f" {best.speedup:.2f}x faster than serial ({_why_parallel(job, best)})"
    )
    note = ""
    if forced:
        reason += f"; {forced}"
    elif best.speedup < min_speedup:
        reason += "; serial was excluded by backends"
        note = (
            f"the chosen plan is predicted only {best.speedup:.2f}x vs serial, which was "
            "excluded by backends"
        )
    rest = best.seconds - job.sampled_s
    return _Choice(best.backend, best.n_jobs, best.chunksize, rest, reason), note


def _why_parallel(job: _Job, c: Candidate) -> str:
    """What makes the parallel plan ``c`` pay off, in a few words."""
    if c.backend == "threads" and job.io_bound:
        return "threads overlap the waiting with little overhead"
    if c.backend == "threads":
        o = job.profile.thread_overlap
        probed = f": two items on two threads overlapped {o:.0%}" if not math.isnan(o) else ""
        return f"threads avoid pickling costs and the work releases the GIL{probed}"
    if c.backend == "processes":
        return "processes run Python in parallel on the usable cores"
    return c.note or "the cluster has the most capacity"  # a planning hook's reason


def optimize(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    n_jobs: int | None = None,
    sample_size: int | None = None,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    verbose: bool = False,
    client: Any = None,
) -> OptimizationResult:
    """Decide how to run ``map(func, data)``: serial, processes or threads, n_jobs, chunksize.

    Runs ``func`` on the first few items (their results are kept in ``sample_results``),
    reads this machine's measured costs, and predicts the wall time of each plan; a parallel
    plan is chosen only if predicted at least ``MIN_SPEEDUP`` times faster than serial.
    ``n_jobs`` fixes the worker count; ``backends`` limits the choice (``"dask"`` plans for
    the cluster of ``client`` or the current one). ``verbose=True`` prints the report with
    the ranked alternatives.

    The sample runs in the calling process (``execute`` may run it in a worker process: see
    its docstring) and stops at the first item ``func`` raises on (``profile.error_index``).

    >>> import math
    >>> plan = optimize(math.sqrt, [1.0, 4.0, 9.0])
    >>> plan.backend, list(plan.data), plan.sample_results
    ('serial', [1.0, 4.0, 9.0], (1.0, 2.0, 3.0))
    """
    return _optimize(
        func,
        data,
        n_jobs=n_jobs,
        sample_size=sample_size,
        backends=backends,
        verbose=verbose,
        client=client,
    )
