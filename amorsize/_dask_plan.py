"""The dask cost model: items per task on a cluster, and the predicted wall time.

The dask backend's planning hook (``amorsize.backends.dask.plan``) resolves the client and
calls ``plan`` here; the optimizer ranks the result beside the local plans. Steps::

    cluster size (workers, threads) ──┐
    profile ─▶ what is left to run ───┼─▶ nothing to plan? ─▶ DaskPlan (inf or 0 s)
                                      ▼
    measure_costs(client), once per scheduler ─▶ _Work: per-item costs, worker slots
                                      ▼
    _chunksize: square-root rule, >= 10x the task overhead, capped ─▶ _reason ─▶ DaskPlan

This module imports no dask: it only calls the client it is given.
"""

# distributed's public API is only partly annotated.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amorsize._format import format_seconds
from amorsize.sampling import ASSUMED_UNKNOWN_LENGTH

if TYPE_CHECKING:
    import distributed

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_TASK_SECONDS",
    "MIN_OVERHEAD_RATIO",
    "ClusterCosts",
    "DaskPlan",
    "measure_costs",
    "plan",
]

#: A task costs at least this many times the scheduler's per-task overhead (issue 7 asks
#: for 10-100x): below it, overhead would be more than ~10% of the run.
MIN_OVERHEAD_RATIO = 10.0
#: A task need not be longer than this: longer tasks only delay the first results, raise the
#: work lost to a killed worker and hold more results in worker memory.
MAX_TASK_SECONDS = 2.0
#: Largest pickled input per task: bounds worker memory and the size of each transfer.
MAX_CHUNK_BYTES = 16 << 20
# Overhead probe: enough no-op tasks for a stable mean, cheap enough to run once per cluster
# (about 0.2-0.4 s on a 2-core LocalCluster).
_PROBE_TASKS = 64
_PROBE_BYTES = 1 << 20
# From this many bytes per item, the reason names what moving them through the client costs
# (an eighth of the size from which the backend scatters a chunk instead of sending it).
_NAMED_BYTES = 128 << 10


@dataclass(frozen=True)
class ClusterCosts:
    """What one task costs on a scheduler, measured once per scheduler address.

    ``latency_s``: one no-op task's round trip; ``task_s``: the cluster's cost per task when
    many are in flight (its throughput limit: client, scheduler and workers together);
    ``bytes_per_s``: bytes moved to a worker and back per second, through the task path.

    >>> ClusterCosts(0.004, 0.002, 2e8).task_s
    0.002
    """

    latency_s: float
    task_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class DaskPlan:
    """How to run a job on the cluster: ``n_jobs`` worker threads, ``chunksize`` items per
    task, the predicted wall time ``seconds`` (sampled items excluded; infinite when dask
    cannot run it) and why.

    ``optimize(..., backends=("dask",))`` turns it into a plan with ``backend == "dask"``.

    >>> costs = ClusterCosts(0.004, 0.002, 2e8)
    >>> DaskPlan(2, 500, 0.5, "why", processes=2, threads=2, n_tasks=8, costs=costs).chunksize
    500
    """

    n_jobs: int
    chunksize: int
    seconds: float
    reason: str
    processes: int
    threads: int
    n_tasks: int
    costs: ClusterCosts | None  # None when nothing had to be measured


# --------------------------------------------------------------------------- measuring
_COSTS: dict[str, ClusterCosts] = {}
_COSTS_LOCK = threading.Lock()


def _echo(x: Any) -> Any:
    return x


def measure_costs(client: distributed.Client, *, refresh: bool = False) -> ClusterCosts:
    """Measure (once per scheduler address, then cached) what a task costs on ``client``.

    Runs about 130 no-op tasks and one 1 MB round trip: about 0.2-0.4 s on a LocalCluster.

    >>> from distributed import Client, LocalCluster
    >>> with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, \\
    ...         Client(cluster) as client:
    ...     measure_costs(client).task_s > 0
    True
    """
    rpc = client.scheduler
    address = str(rpc.address if rpc is not None else client.scheduler_info()["address"])
    with _COSTS_LOCK:
        costs = _COSTS.get(address)
    if costs is not None and not refresh:
        return costs
    pc = time.perf_counter
    latency = math.inf
    for _ in range(3):
        t0 = pc()
        client.submit(_echo, None, pure=False).result()
        latency = min(latency, pc() - t0)
    wall = math.inf
    for _ in range(2):  # the first batch may still pay for imports on fresh workers
        t0 = pc()
        client.gather([client.submit(_echo, i, pure=False) for i in range(_PROBE_TASKS)])
        wall = min(wall, pc() - t0)
    # One latency is paid once, not per task; never let noise make tasks free.
    task_s = max(wall - latency, wall / 4) / _PROBE_TASKS
    blob = os.urandom(_PROBE_BYTES)  # incompressible: dask may compress frames
    t0 = pc()
    client.submit(_echo, blob, pure=False).result()
    moved = pc() - t0
    bytes_per_s = 2 * _PROBE_BYTES / max(moved - latency, 1e-4)
    costs = ClusterCosts(latency, task_s, bytes_per_s)
    with _COSTS_LOCK:
        _COSTS[address] = costs
    return costs


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class _Work:
    """The job as the cluster sees it: ``n`` items of ``t`` seconds on a worker (call,
    loading the input, pickling the output; ``sd`` their spread), ``client_s`` seconds each
    on the client alone (pickling inputs, unpickling outputs, the bytes), ``slots`` items
    the cluster runs at once."""

    n: int
    t: float
    sd: float
    client_s: float
    in_b: float
    out_b: float
    slots: float
    costs: ClusterCosts

    def seconds(self, c: int) -> float:
        """Wall time in tasks of ``c`` items: waves of tasks, or the dispatch limit."""
        n_tasks = math.ceil(self.n / c)
        waves = math.ceil(n_tasks / self.slots)
        compute = waves * c * self.t + self.sd * math.sqrt(c)  # the last wave: imbalance
        return self.costs.latency_s + self.n * self.client_s + max(
            compute, n_tasks * self.costs.task_s
        )


def _work(profile: Any, n: int, costs: ClusterCosts, processes: int, threads: int) -> _Work:
    """Per-item costs from the sampled ``profile`` (``amorsize.sampling.Profile``)."""
    mean = float(profile.mean_seconds)
    # The share of time not spent waiting: cpu_ratio drops when the machine is merely busy.
    cpu = min(max(1.0 - float(getattr(profile, "wait_fraction", 0.0)), 0.0), 1.0)
    in_b = float(getattr(profile, "in_bytes", 0.0))
    out_b = float(getattr(profile, "out_bytes", 0.0))
    t = max(
        mean + getattr(profile, "in_load_seconds", 0.0) + getattr(profile, "out_dump_seconds", 0.0),
        1e-9,
    )
    client_s = (
        getattr(profile, "in_dump_seconds", 0.0)
        + getattr(profile, "out_load_seconds", 0.0)
        + (in_b + out_b) / costs.bytes_per_s
    )
    # Threads of one worker process share its GIL: they add capacity only while items wait.
    slots = processes + (threads - processes) * (1.0 - cpu)
    sd = float(getattr(profile, "std_seconds", 0.0))
    return _Work(n, t, sd, client_s, in_b, out_b, slots, costs)


def _chunksize(w: _Work) -> tuple[int, int, int]:
    """Items per task, the cap on it and what the overhead rules wanted: ``(c, cap, want)``.

    Overhead per task against load imbalance: the run loses about n/c * o to overhead and
    about c * t * slots / (2n) of itself to the last, partly idle wave; their sum is least
    at c = sqrt(2 n o / (t slots)) (the classic square-root chunking rule).
    """
    n, t, task_s = w.n, w.t, w.costs.task_s
    c_sqrt = max(1, round(math.sqrt(2.0 * n * task_s / (t * w.slots))))
    c_over = math.ceil(MIN_OVERHEAD_RATIO * task_s / t)
    cap = max(1, min(int(MAX_TASK_SECONDS / t), int(MAX_CHUNK_BYTES / max(w.in_b, 1.0)), n))
    want = max(c_sqrt, c_over)
    c = min(want, cap)
    all_slots = math.ceil(n / w.slots)
    if c > all_slots and w.seconds(all_slots) < w.seconds(c):
        c = all_slots
    # Even out the tasks so that the last wave is full: never a lone short task at the end.
    waves = math.ceil(math.ceil(n / c) / w.slots)
    return max(1, math.ceil(n / (waves * w.slots))), cap, want


def _reason(
    w: _Work, c: int, cap: int, want: int, processes: int, threads: int, n_tasks: int
) -> str:
    """One sentence: the cluster, the costs, and why ``c`` items per task."""
    t, task_s = w.t, w.costs.task_s
    ratio = c * t / task_s
    what = (
        f"the cluster has {processes} worker process(es) with {threads} thread(s); a task "
        f"costs {format_seconds(task_s)} on this scheduler and an item {format_seconds(t)}"
    )
    if cap < want and c < w.n:
        limit = (
            f"tasks are capped at {format_seconds(MAX_TASK_SECONDS)}"
            if cap == int(MAX_TASK_SECONDS / t)
            else f"tasks are capped at {MAX_CHUNK_BYTES >> 20} MB of input"
        )
        how = f"{c:,} items per task ({limit}, {ratio:.0f}x the overhead)"
    elif ratio >= MIN_OVERHEAD_RATIO / 2 or n_tasks > w.slots:
        how = (
            f"{c:,} items per task make {n_tasks:,} tasks of {format_seconds(c * t)} "
            f"({ratio:.0f}x the overhead), balancing overhead against an idle last wave"
        )
    else:
        how = (
            f"one task per worker slot ({c:,} items, tasks of {format_seconds(c * t)}) still leaves "
            f"the overhead at {100 / (1 + ratio):.0f}% of each task"
        )
    if w.in_b + w.out_b >= _NAMED_BYTES:
        how += (
            f", and moving {(w.in_b + w.out_b) * w.n / 1e6:,.1f} MB through the client costs "
            f"{format_seconds(w.n * w.client_s)}"
        )
    return f"{what}, so {how}"


def _nothing_to_plan(profile: Any, n: int, processes: int, threads: int) -> DaskPlan | None:
    """The plan when nothing needs measuring: no workers, unpicklable work, no items."""
    if processes == 0:  # nothing to measure on, and nothing would run
        return DaskPlan(1, 1, math.inf, "the cluster has no workers", 0, 0, 0, None)
    if not getattr(profile, "picklable", True):
        why = getattr(profile, "pickle_error", None) or "the function or items cannot be pickled"
        return DaskPlan(
            threads, 1, math.inf, f"dask is ruled out: {why}", processes, threads, 0, None
        )
    if n == 0:
        return DaskPlan(threads, 1, 0.0, "no items are left to run", processes, threads, 0, None)
    return None


def plan(profile: Any, n_items: int | None, client: distributed.Client) -> DaskPlan:
    """Size the work for the cluster behind ``client``, from the sampled ``profile``.

    Counts the worker processes and threads the scheduler reports, the measured per-task
    cost (small items are batched so that a task costs at least 10x that overhead), load
    balance (the square-root rule weighs overhead against an idle last wave), and the bytes
    moved per item; the client pickles inputs and unpickles outputs alone, so those are
    serial terms. ``n_items`` is the data's length (``None``: unknown, planned as
    ``ASSUMED_UNKNOWN_LENGTH`` items after the sample).
    """
    nthreads = client.nthreads()
    processes = len(nthreads)
    threads = sum(nthreads.values())
    n_sampled = int(getattr(profile, "n_sampled", 0))
    n = ASSUMED_UNKNOWN_LENGTH if n_items is None else max(int(n_items) - n_sampled, 0)
    early = _nothing_to_plan(profile, n, processes, threads)
    if early is not None:
        return early
    costs = measure_costs(client)
    w = _work(profile, n, costs, processes, threads)
    c, cap, want = _chunksize(w)
    n_tasks = math.ceil(n / c)
    reason = _reason(w, c, cap, want, processes, threads, n_tasks)
    return DaskPlan(threads, c, w.seconds(c), reason, processes, threads, n_tasks, costs)
