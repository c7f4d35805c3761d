"""``optimize(func, data)``: decide serial, processes or threads, how many workers, what chunks.

Data flow::

    func, data ─▶ sampling.sample() ─▶ Profile + results of the first items + data (intact)
                                          │
    system.get_system_info() ─────────────┤  (cached JSON: measured once per machine)
                                          ▼
                    _core.model_search(): predicted seconds per (backend, n, chunksize)
                                          │  (+ amorsize.backends.dask.plan() if asked)
                                          ▼
               OptimizationResult: the fastest plan, clearly faster than serial or serial

>>> def square(x):
...     return x * x
>>> plan = optimize(square, range(100))
>>> plan.backend, plan.n_jobs
('serial', 1)
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from amorsize._core import model_max_workers_for_memory, model_search
from amorsize._model_types import Machine, Workload
from amorsize._validate import MAX_WORKERS, check_int
from amorsize.sampling import Profile, RemoteRunner, Sample, sample
from amorsize.system import SystemInfo, get_system_info

__all__ = ["MIN_SPEEDUP", "Candidate", "Estimate", "OptimizationResult", "optimize"]

#: Parallel plans must be predicted at least this much faster than serial. The model's
#: error on benchmarks/bench_quality.py's suite is within about +-15%, so a smaller margin
#: could pick a plan that is really slower than serial.
MIN_SPEEDUP = 1.2
#: Items whose CPU time is below this share of their wall time mostly wait (sleep, I/O):
#: worker counts well above the core count pay off for them.
IO_BOUND_CPU_RATIO = 0.5
#: Thread counts tried: up to 64 for waiting work (benchmarks/bench_quality.py's
#: sleep-bound workload is fastest at 32-64 threads).
THREAD_COUNTS = (2, 4, 8, 16, 32, 64)
#: Planning horizon for iterators of unknown length: long enough that start-up amortises,
#: the common case for generators fed to a parallel map.
ASSUMED_UNKNOWN_LENGTH = 10_000
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
# Above this pickled size per item, transfer is worth naming as the reason for serial.
_BIG_ITEM_BYTES = 16 * 1024
_BACKENDS = ("serial", "processes", "threads", "dask")
_CODE = {0: "serial", 1: "processes", 2: "threads"}


@dataclass(frozen=True)
class Estimate:
    """Predicted wall seconds of the whole run: serially and with the chosen plan.

    Both include the time already spent running the sampled items.

    >>> Estimate(serial=2.0, chosen=1.0)["serial"]
    2.0
    """

    serial: float
    chosen: float

    def __getitem__(self, key: str) -> float:
        if key not in ("serial", "chosen"):
            raise KeyError(key)
        return float(getattr(self, key))


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
def _fmt_s(s: float) -> str:
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.3g} us"
    return f"{s * 1e9:.3g} ns"


def _fmt_b(b: float) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def _plan_name(backend: str, n: int, c: int) -> str:
    if backend == "serial":
        return "serial"
    return f"{backend} n_jobs={n} chunksize={c}"


def _report(r: OptimizationResult, alternatives: int) -> str:
    p = r.profile
    lines = [
        f"amorsize plan: {_plan_name(r.backend, r.n_jobs, r.chunksize)}"
        f" (predicted {r.estimated_speedup:.2f}x vs serial:"
        f" {_fmt_s(r.estimated_seconds.chosen)} vs {_fmt_s(r.estimated_seconds.serial)})",
        f"why: {r.reason}",
    ]
    if p.n_sampled:
        kind = "mostly waiting" if p.wait_fraction > 1.0 - IO_BOUND_CPU_RATIO else "CPU-bound"
        lines.append(
            f"sampled {p.n_sampled} of {r.n_items if r.n_items is not None else '?'} items in"
            f" {_fmt_s(p.sample_seconds)}: {_fmt_s(p.mean_seconds)} each"
            f" (spread {p.cv:.0%}), {kind} (CPU/wall {p.cpu_ratio:.2f}),"
            f" {_fmt_b(p.in_bytes)} in / {_fmt_b(p.out_bytes)} out per item"
        )
    s = r.system
    lines.append(
        f"machine: {s.usable_cores:g} usable cores, start method {s.start_method},"
        f" worker start-up {_fmt_s(s.process_startup_s)}, round trip"
        f" {_fmt_s(s.process_roundtrip_s)}, {s.transfer_s_per_byte * (1 << 20) * 1e3:.3g} ms/MB"
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
                f" {_fmt_s(c.seconds):>10}  {c.speedup:5.2f}x{note}"
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
    if not isinstance(backends, Sequence | set | frozenset) or not backends:
        msg = (
            f"optimize(): backends must be a non-empty sequence of backend names; got "
            f"{backends!r}. Use e.g. backends=('serial', 'processes', 'threads')."
        )
        raise ValueError(msg)
    out: list[str] = []
    for b in backends:
        if b not in _BACKENDS:
            msg = (
                f"optimize(): backends may contain only {', '.join(map(repr, _BACKENDS))}; got "
                f"{b!r} in {backends!r}. Remove it or fix its spelling."
            )
            raise ValueError(msg)
        if b not in out:
            out.append(b)
    return tuple(out)


# --------------------------------------------------------------------------- planning
def _dask_candidate(profile: Profile, n_items: int | None, client: Any) -> Any:
    try:
        from amorsize.backends import dask as dask_backend
    except ImportError as exc:
        msg = (
            "optimize(): backends includes 'dask' but amorsize's dask backend cannot be "
            f"imported ({type(exc).__name__}: {exc}). Install the extra with "
            "`pip install 'amorsize[dask]'`, or leave 'dask' out of backends."
        )
        raise ImportError(msg) from exc
    plan = getattr(dask_backend, "plan", None)
    if plan is None:
        msg = (
            "optimize(): backends includes 'dask' but amorsize.backends.dask has no plan() "
            "function in this version. Leave 'dask' out of backends."
        )
        raise ImportError(msg)
    return plan(profile, n_items, client)


def _reason_serial_nothing(n_items: int, profile: Profile) -> str:
    if n_items == 0:
        return "there are no items, so there is nothing to parallelise"
    return (
        f"all {profile.n_sampled} item(s) already ran while sampling"
        f" ({_fmt_s(profile.sample_seconds)}), so nothing is left to parallelise"
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
        gil = "; threads cannot overlap CPU-bound Python (the GIL)"
    if not procs and "processes" in allowed and not profile.picklable:
        would = f" (they would be predicted {ghost:.2f}x faster)" if ghost > 1.0 else ""
        return f"processes are ruled out{would}: {profile.pickle_error}{gil}"
    if not procs and not threads:
        return "no parallel backend is allowed or available for this function and data"
    if not procs:
        return "the work is CPU-bound Python, which threads cannot overlap (the GIL)"
    best = procs[0]
    per_byte = system.transfer_s_per_byte
    out_cost = profile.out_load_seconds + profile.out_bytes * per_byte
    in_cost = profile.in_dump_seconds + profile.in_bytes * per_byte
    t = profile.mean_seconds
    if out_cost > 0.4 * t and out_cost >= in_cost and profile.out_bytes >= _BIG_ITEM_BYTES:
        return (
            f"each result is {_fmt_b(profile.out_bytes)} and the parent alone must receive and "
            f"unpickle it ({_fmt_s(out_cost)}, vs {_fmt_s(t)} to compute it){gil}"
        )
    if in_cost > 0.4 * t and profile.in_bytes >= _BIG_ITEM_BYTES:
        return (
            f"each input is {_fmt_b(profile.in_bytes)} and the parent alone must pickle and send"
            f" it ({_fmt_s(in_cost)}, vs {_fmt_s(t)} to compute it){gil}"
        )
    return (
        f"the work is too small for the overhead ({_fmt_s(t)} per item; the best process plan, "
        f"{_plan_name(best.backend, best.n_jobs, best.chunksize)}, is predicted "
        f"{best.speedup:.2f}x vs serial){gil}"
    )


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
            else sorted({n for n in (*THREAD_COUNTS, top) if 2 <= n <= limit})
        )
    return proc_ns, thread_ns, ghost_ns


def _optimize(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    n_jobs: int | None = None,
    sample_size: int | None = None,
    backends: Sequence[str] = ("serial", "processes", "threads"),
    verbose: bool = False,
    warm_workers: int | Callable[[], int] = 0,
    client: Any = None,
    min_speedup: float = MIN_SPEEDUP,
    keep_going: bool = False,
    remote: RemoteRunner | None = None,
    offload: bool = False,
    index_of: Callable[[int], int] | None = None,
) -> OptimizationResult:
    """``optimize`` for the executor: ``warm_workers`` process workers already run.

    Their start-up costs nothing, which can tip small jobs towards processes (a callable is
    asked after sampling, which may have started one). ``keep_going``, ``remote`` and
    ``index_of`` go to ``sample``; with ``offload`` the sample moves to ``remote`` once its
    items show that a process plan could pay off (``_offload_rule``).
    """
    allowed = _validate(func, data, n_jobs, sample_size, backends)
    t_start = time.perf_counter()
    system = get_system_info()
    t_sample = time.perf_counter()
    rule = None
    if remote is not None and offload:
        warm = warm_workers() if callable(warm_workers) else warm_workers
        rule = _offload_rule(system, warm, _planned_length(data))
    s = sample(
        func, data, sample_size=sample_size, cores=system.usable_cores,
        assumed_length=ASSUMED_UNKNOWN_LENGTH, keep_going=keep_going, remote=remote,
        offload=rule, index_of=index_of,
    )
    # Decision time excludes sampling: machine facts before it, the model after it.
    t_decide = time.perf_counter() - (t_sample - t_start)
    warm = warm_workers() if callable(warm_workers) else warm_workers
    return _decide(
        s, system, allowed=allowed, n_jobs=n_jobs, warm_workers=warm, client=client,
        min_speedup=min_speedup, verbose=verbose, t_decide=t_decide,
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


def _offload_rule(system: SystemInfo, warm: int, total: int) -> Callable[[float, int], bool]:
    """Whether items this slow could make a process plan pay off: then sample in a worker.

    A lower bound on any process plan: it starts a worker (unless one is warm) and costs a
    round trip, and it must still save the share ``1/MIN_SPEEDUP - 1/cores`` of the serial
    time of the items left; items under ``_OFFLOAD_MIN_ITEM_S`` never pay.
    """
    gain = 1.0 / MIN_SPEEDUP - 1.0 / max(system.usable_cores, 1.0)
    fixed = system.process_roundtrip_s + (
        0.0 if warm > 0 else system.process_startup_s + system.process_startup_per_worker_s
    )

    def could_pay(mean: float, done: int) -> bool:
        rest = max(total - done, 0)
        return gain > 0 and mean > _OFFLOAD_MIN_ITEM_S and rest * mean * gain > fixed

    return could_pay


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
) -> OptimizationResult:
    """The plan for an already measured sample on ``system`` (no sampling, no I/O)."""
    if t_decide is None:
        t_decide = time.perf_counter()
    profile = s.profile
    warnings: list[str] = []

    n_items = profile.n_items
    warnings.extend(_failure_warnings(profile))
    if profile.pickle_error is not None and (
        "processes" in allowed or "dask" in allowed
    ):
        warnings.append(profile.pickle_error + "; process backends are ruled out")

    remaining: float
    if n_items is None:
        remaining = float(ASSUMED_UNKNOWN_LENGTH)
        warnings.append(
            f"the data's length is unknown (an iterator); planned as if {remaining:,.0f} more"
            " items follow the sample"
        )
    else:
        # A failure that stopped sampling is delivered too: it is not run again.
        remaining = float(max(n_items - profile.n_sampled - profile.stopped_on_error, 0))

    sampled_s = profile.sample_seconds
    t = profile.mean_seconds
    serial_rest = remaining * t
    serial_total = sampled_s + serial_rest

    def result(
        backend: str, n: int, c: int, chosen_rest: float, reason: str,
        alts: tuple[Candidate, ...] = (),
    ) -> OptimizationResult:
        chosen_total = sampled_s + chosen_rest
        speedup = serial_total / chosen_total if chosen_total > 0 else 1.0
        r = OptimizationResult(
            n_jobs=n,
            chunksize=c,
            backend=backend,
            estimated_speedup=speedup,
            estimated_seconds=Estimate(serial=serial_total, chosen=chosen_total),
            reason=reason,
            warnings=warnings,
            data=s.data,
            profile=profile,
            system=system,
            alternatives=alts or (
                Candidate("serial", 1, 1, serial_total, 1.0),
            ),
            sample_results=s.results,
            n_items=n_items,
            decision_seconds=time.perf_counter() - t_decide,
        )
        if verbose:
            print(r.report())
        return r

    if n_items is not None and remaining == 0 and not profile.stopped_on_error:
        return result("serial", 1, 1, 0.0, _reason_serial_nothing(n_items, profile))
    forced = ""
    if profile.n_crashed and "processes" in allowed and profile.picklable:
        # Serial or threads would run the rest in this process, where the crash is fatal.
        allowed = tuple(b for b in allowed if b in ("processes", "dask"))
        forced = (
            f"serial and threads are ruled out: {profile.n_crashed} sampled item(s) crashed a "
            "worker process, and in the calling process a crash would end the program"
        )
        warnings.append(forced)
    serial_ok = "serial" in allowed
    if profile.stopped_on_error and profile.n_sampled == 0:
        return result(
            "serial", 1, 1, serial_rest,
            f"func raised on the first item ({type(profile.error).__name__}), so nothing could "
            "be timed; running serially surfaces the error at once",
        )
    if n_jobs == 1 and serial_ok:
        return result("serial", 1, 1, serial_rest, "n_jobs=1 was requested")

    cores = system.usable_cores
    cpu_ratio = profile.cpu_ratio
    cpu_fraction = min(max(1.0 - profile.wait_fraction, 0.0), 1.0)
    io_bound = cpu_fraction < IO_BOUND_CPU_RATIO
    # Work that already keeps several cores busy (BLAS/OpenMP) gets no more CPU from more
    # workers: plan with its CPU seconds per item as if it ran on one thread.
    t_par = t
    if cpu_ratio > MULTITHREADED_CPU_RATIO:
        t_par = t * cpu_ratio
        warnings.append(
            f"func uses about {cpu_ratio:.1f} cores by itself (BLAS/OpenMP threads:"
            f" {system.blas_threads}); parallel workers would compete for the same cores"
        )

    proc_ns, thread_ns, ghost_ns = _worker_counts(
        profile, allowed, n_jobs, max(int(cores), 1), max(int(remaining), 1), io_bound
    )
    procs_ok = bool(proc_ns)

    w: Workload = {
        "n_items": remaining,
        "t_mean": t_par,
        "t_std": profile.std_seconds * (t_par / t if t > 0 else 1.0),
        "t_max": profile.max_seconds * (t_par / t if t > 0 else 1.0),
        "cpu_fraction": cpu_fraction,
        "in_bytes": profile.in_bytes,
        "out_bytes": profile.out_bytes,
        "in_dump_s": profile.in_dump_seconds,
        "in_load_s": profile.in_load_seconds,
        "out_dump_s": profile.out_dump_seconds,
        "out_load_s": profile.out_load_seconds,
        "mem_per_item": profile.mem_per_item,
        "func_bytes": float(profile.func_bytes),
    }
    m: Machine = {
        "cores": cores,
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
    }
    raw = model_search(w, m, proc_ns, thread_ns)
    ghost = 0.0
    if ghost_ns:
        best_ghost = min(secs for code, _, _, secs in model_search(w, m, ghost_ns, []) if code)
        ghost = serial_total / (sampled_s + best_ghost) if sampled_s + best_ghost > 0 else 0.0
    if procs_ok and proc_ns:
        fit = model_max_workers_for_memory(w, m, 1.0)
        if fit < max(proc_ns):
            warnings.append(
                f"memory ({_fmt_b(system.available_memory)} available) fits only {fit} process"
                f" workers of {_fmt_b(system.worker_rss_bytes + profile.mem_per_item)} each"
            )

    cands: list[Candidate] = []
    for code, workers, chunk, secs in raw:
        backend = _CODE[int(code)]
        if backend == "serial":
            secs = serial_rest
        total = sampled_s + secs
        cands.append(
            Candidate(backend, int(workers), int(chunk), total,
                      serial_total / total if total else 1.0)
        )
    if "dask" in allowed:
        dp = _dask_candidate(profile, n_items, client)
        total = sampled_s + float(dp.seconds)
        cands.append(
            Candidate("dask", int(dp.n_jobs), int(dp.chunksize), total,
                      serial_total / total if total else 1.0, str(getattr(dp, "reason", "")))
        )
    cands.sort(key=lambda cand: cand.seconds)
    alts = tuple(cands)
    usable = [c for c in cands if c.backend in allowed]
    parallel = [c for c in usable if c.backend != "serial"]
    best_par = parallel[0] if parallel else None
    if best_par is None and not serial_ok:
        msg = (
            f"optimize(): no backend in backends={allowed!r} can run this function: "
            f"{profile.pickle_error or 'no candidate plan'}. Add 'threads' or 'serial' to "
            "backends, or make the function and items picklable."
        )
        raise ValueError(msg)

    if best_par is not None and (not serial_ok or best_par.speedup >= min_speedup):
        c = best_par
        rest = c.seconds - sampled_s
        what = (
            f"items take {_fmt_s(t)} each"
            + (f", mostly waiting ({profile.wait_fraction:.0%} of wall time)" if io_bound else "")
            + (f" and {remaining:,.0f} remain" if n_items is not None else "")
        )
        if c.backend == "threads" and io_bound:
            why = "threads overlap the waiting with little overhead"
        elif c.backend == "threads":
            why = "threads avoid pickling costs and the work releases the GIL"
        elif c.backend == "dask":
            why = c.note or "the cluster has the most capacity"
        else:
            why = "processes run Python in parallel on the usable cores"
        reason = (
            f"{what}: {_plan_name(c.backend, c.n_jobs, c.chunksize)} is predicted"
            f" {c.speedup:.2f}x faster than serial ({why})"
        )
        if forced:
            reason += f"; {forced}"
        elif c.speedup < min_speedup:
            reason += "; serial was excluded by backends"
            warnings.append(
                f"the chosen plan is predicted only {c.speedup:.2f}x vs serial, which was "
                "excluded by backends"
            )
        return result(c.backend, c.n_jobs, c.chunksize, rest, reason, alts)

    why = _why_not_parallel(profile, parallel, system, allowed, ghost)
    return result("serial", 1, 1, serial_rest, f"serial is best: {why}", alts)


def optimize(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    n_jobs: int | None = None,
    sample_size: int | None = None,
    backends: Sequence[str] = ("serial", "processes", "threads"),
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
