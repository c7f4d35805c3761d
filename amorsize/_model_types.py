"""The compiled cost model's inputs, typed: the C structs ``Workload`` and ``Machine``.

``amorsize._core``'s ``model_*`` functions take these as dicts (Cython converts a dict to
the struct of the same name in ``_core_model.pxi``: every key must be present, every value
a number). The optimizer fills them; the type stub ``_core.pyi`` names them.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["Machine", "Workload"]


class Workload(TypedDict):
    """The job: per-item seconds and bytes from the sample, items still to run."""

    n_items: float  # items still to run (the sampled ones are already done)
    t_mean: float  # wall seconds per item
    t_std: float  # spread of wall seconds per item
    t_max: float  # slowest sampled item
    cpu_fraction: float  # CPU seconds / wall seconds of an item, clipped to [0, 1]
    in_bytes: float  # pickled input per item
    out_bytes: float  # pickled output per item
    in_dump_s: float  # parent: pickle one input (amortised over a chunk)
    in_load_s: float  # worker: unpickle one input
    out_dump_s: float  # worker: pickle one output
    out_load_s: float  # parent: unpickle one output
    mem_per_item: float  # bytes a worker holds per item in flight
    func_bytes: float  # pickled function, sent once per worker
    thread_overlap: float  # share of the CPU part that overlapped on two threads (0: unknown)


class Machine(TypedDict):
    """The machine: usable cores, memory, and the measured costs of workers."""

    cores: float  # usable cores (affinity, quota)
    proc_startup_s: float  # first process worker: start + first round trip
    proc_startup_per_worker_s: float
    warm_workers: float  # process workers already running (no start-up)
    proc_roundtrip_s: float  # one small message to a worker and back
    per_byte_s: float  # moving one byte through a pipe
    parent_item_s: float  # executor bookkeeping per item in the parent
    worker_rss: float  # resident bytes of an idle worker
    available_memory: float
    thread_startup_s: float  # start one pool thread
    thread_roundtrip_s: float  # parent time per task handed to a thread pool
    warm_threads: float  # size of the warm thread pool (its threads run already)
