"""Execution backends: serial, threads, processes (and dask, where installed).

``get_backend(name, **options)`` returns the shared instance for a name and its options, so
that warm pools are reused across ``execute`` calls; ``warm_workers(name)`` says how many
workers such a pool already holds (the optimizer counts no start-up for them).

The dask backend lives in ``amorsize.backends.dask`` (class ``DaskBackend``, taking
``client=``) and is imported only when asked for, so the core install never imports dask.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

from amorsize.backends.base import Backend, Outcome, Task, WorkerCrashedError

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "Outcome",
    "Task",
    "WorkerCrashedError",
    "get_backend",
    "warm_workers",
]

#: Every name ``get_backend`` accepts.
BACKEND_NAMES = ("serial", "threads", "processes", "dask")

# name -> "module:class"; imported lazily so that importing amorsize stays cheap.
_CLASSES = {
    "serial": "amorsize.backends.serial:SerialBackend",
    "threads": "amorsize.backends.threads:ThreadsBackend",
    "processes": "amorsize.backends.processes:ProcessesBackend",
    "dask": "amorsize.backends.dask:DaskBackend",
}

_SHARED: dict[tuple[str, tuple[tuple[str, Any], ...]], Backend] = {}
_LOCK = threading.Lock()


def _backend_class(name: str) -> type[Backend]:
    if not isinstance(name, str) or name not in _CLASSES:
        msg = f"backend must be one of {list(BACKEND_NAMES)}; got {name!r}"
        raise ValueError(msg)
    module_name, _, cls_name = _CLASSES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if name == "dask":
            msg = (
                "backend='dask' needs dask.distributed and amorsize's dask backend: "
                f"{exc}. Install it with: pip install 'amorsize[dask]'"
            )
            raise ImportError(msg) from exc
        raise
    cls: type[Backend] = getattr(module, cls_name)
    return cls


def get_backend(name: str, **options: Any) -> Backend:
    """The shared backend for ``name`` and ``options`` (created on first use).

    Options go to the backend's constructor: ``start_method=`` for ``"processes"``,
    ``client=`` for ``"dask"``. Calls with equal options get the same instance, which is
    what keeps a process pool warm between ``execute`` calls.

    >>> get_backend("serial") is get_backend("serial")
    True
    """
    cls = _backend_class(name)
    options = {k: v for k, v in options.items() if v is not None}
    try:
        key = _key(name, options)
    except TypeError:
        return cls(**options)  # unhashable option (e.g. a client object): not shared
    with _LOCK:
        backend = _SHARED.get(key)
        if backend is None:
            backend = _SHARED[key] = cls(**options)
        return backend


def warm_workers(name: str, **options: Any) -> int:
    """Workers the shared ``name`` backend already holds (0 if it was never used).

    >>> warm_workers("serial")
    0
    """
    try:
        key = _key(name, {k: v for k, v in options.items() if v is not None})
        with _LOCK:
            backend = _SHARED.get(key)
    except TypeError:
        return 0
    return 0 if backend is None else backend.warm_workers()


def _key(name: str, options: dict[str, Any]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    key = (name, tuple(sorted(options.items(), key=lambda kv: kv[0])))
    hash(key)
    return key


def _forget_shared_after_fork() -> None:
    # A forked child must not reuse its parent's pools (the processes backend also closes
    # its copies of the parent's pipes itself).
    global _LOCK
    _SHARED.clear()
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_shared_after_fork)
