"""The cost model's inputs, as the optimizer hands them to ``amorsize._core``.

``Workload`` and ``Machine`` are the C structs of ``_core_model.pxi``, key for key: the
core converts a dict into its struct and refuses one that lacks a key
(``tests/test_core_stubs.py`` checks that the two agree). Every value is a float; counts
(items, cores, workers) are floats too, because the model computes with them.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["Machine", "SearchRow", "Workload"]


class Workload(TypedDict):
    """What the sampled items say about the rest of the run (all per item unless noted)."""

    n_items: float  # items still to run (the sampled ones are already done)
    t_mean: float  # wall seconds
    t_std: float  # spread of wall seconds
    t_max: float  # slowest sampled item
    cpu_fraction: float  # CPU seconds / wall seconds, in [0, 1]
    in_bytes: float  # pickled input
    out_bytes: float  # pickled output
    in_dump_s: float  # parent: pickle one input (amortised over a chunk)
    in_load_s: float  # worker: unpickle one input
    out_dump_s: float  # worker: pickle one output
    out_load_s: float  # parent: unpickle one output
    mem_per_item: float  # bytes a worker holds per item in flight
    func_bytes: float  # pickled function, sent once per worker


class Machine(TypedDict):
    """The machine facts the model needs (``amorsize.system.SystemInfo``, plus constants)."""

    cores: float  # usable cores (affinity, quota)
    proc_startup_s: float  # first process worker: start + first round trip
    proc_startup_per_worker_s: float  # each further process worker
    warm_workers: float  # process workers already running (no start-up)
    proc_roundtrip_s: float  # one small message to a worker and back
    per_byte_s: float  # moving one byte through a pipe
    parent_item_s: float  # executor bookkeeping per item in the parent
    worker_rss: float  # resident bytes of an idle worker
    available_memory: float  # bytes
    thread_startup_s: float
    thread_roundtrip_s: float


#: One row of ``model_search``: (backend code 0 serial / 1 processes / 2 threads, workers,
#: chunk size, predicted seconds).
SearchRow = tuple[int, int, int, float]
