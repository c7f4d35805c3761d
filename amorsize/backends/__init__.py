"""Execution backends: serial, threads, processes, async (and dask, where installed).

``REGISTRY`` is the one list of backends: the optimizer, ``execute`` and the command line
read their names, defaults and planning hooks from it. Each ``BackendSpec`` names its class
as ``"module:Class"``, imported only when the backend is asked for, so the core install
never imports dask.

``get_backend(name, **options)`` returns the shared instance for a name and its options, so
that warm pools are reused across ``execute`` calls; ``warm_workers(name)`` says how many
workers such a pool already holds (the optimizer counts no start-up for them).
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from amorsize.backends.base import Backend, Outcome, Task, WorkerCrashedError

__all__ = [
    "BACKEND_NAMES",
    "DEFAULT_BACKENDS",
    "REGISTRY",
    "Backend",
    "BackendSpec",
    "HookPlan",
    "Outcome",
    "PlanHook",
    "Task",
    "WorkerCrashedError",
    "auto_backends",
    "get_backend",
    "plan_hook",
    "warm_workers",
]


class HookPlan(Protocol):
    """What a backend's planning hook returns: its best plan and the predicted wall seconds
    for the items left after sampling (``math.inf`` when it cannot run them)."""

    @property
    def n_jobs(self) -> int: ...
    @property
    def chunksize(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def reason(self) -> str: ...


#: ``hook(profile, n_items, client)``: plans a backend the compiled model does not know.
#: ``profile`` is the sample's ``amorsize.sampling.Profile``, ``n_items`` the data's length
#: (``None``: unknown), ``client`` what the caller passed as ``client=``.
PlanHook = Callable[[Any, int | None, Any], HookPlan]


@dataclass(frozen=True)
class BackendSpec:
    """One registered backend: its name, its class, and how the optimizer plans it.

    ``target`` is ``"module:Class"`` (imported on first use). ``plan`` is ``"module:function"``
    of a ``PlanHook``, for a backend whose costs the compiled model does not know; without
    one, the optimizer plans the backend with that model. ``default``: planned without being
    named (``optimize``'s default ``backends``, ``execute(backend="auto")``);
    ``spawns_processes``: cannot run inside a daemonic process, which may not have
    children; ``out_of_process``: runs ``func`` outside the calling process (so function and
    items must pickle, and a crash there does not end the program); ``cluster``:
    ``backend="auto"`` plans it when a cluster client is at hand.
    ``extra`` is the pip extra that installs what it needs. ``coroutines``: runs ``async def``
    functions, and only those; ``execute`` plans it for them (``optimize`` does not).

    >>> REGISTRY["processes"].default, REGISTRY["dask"].plan
    (True, 'amorsize.backends.dask:plan')
    """

    name: str
    target: str
    plan: str | None = None
    default: bool = False
    spawns_processes: bool = False
    out_of_process: bool = False
    cluster: bool = False
    extra: str | None = None
    coroutines: bool = False


#: Every backend, by name, in the order messages and the command line list them.
REGISTRY: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("serial", "amorsize.backends.serial:SerialBackend", default=True),
        BackendSpec(
            "processes",
            "amorsize.backends.processes:ProcessesBackend",
            default=True,
            spawns_processes=True,
            out_of_process=True,
        ),
        BackendSpec("threads", "amorsize.backends.threads:ThreadsBackend", default=True),
        BackendSpec(
            "dask",
            "amorsize.backends.dask:DaskBackend",
            plan="amorsize.backends.dask:plan",
            out_of_process=True,
            cluster=True,
            extra="dask",
        ),
        BackendSpec("async", "amorsize.backends.aio:AsyncBackend", coroutines=True),
    )
}

#: Every name ``get_backend`` accepts.
BACKEND_NAMES = tuple(REGISTRY)
#: What ``optimize`` chooses from unless told otherwise.
DEFAULT_BACKENDS = tuple(name for name, spec in REGISTRY.items() if spec.default)

_SHARED: dict[tuple[str, tuple[tuple[str, Any], ...]], Backend] = {}
_LOCK = threading.Lock()


def auto_backends(*, in_daemon: bool = False, cluster: bool = False) -> tuple[str, ...]:
    """The backends ``execute(backend="auto")`` plans among.

    The default ones this process can start (no process pool inside a daemonic process),
    plus the cluster backends when a cluster client is at hand (``cluster``).

    >>> auto_backends(in_daemon=True)
    ('serial', 'threads')
    """
    return tuple(
        spec.name
        for spec in REGISTRY.values()
        if (spec.default and not (in_daemon and spec.spawns_processes))
        or (cluster and spec.cluster)
    )


def plan_hook(name: str) -> PlanHook | None:
    """The planning hook of backend ``name`` (imported now), or ``None`` if it has none.

    >>> plan_hook("processes") is None
    True
    """
    spec = _spec(name)
    if spec.plan is None:
        return None
    hook: PlanHook = _load(spec, spec.plan)
    return hook


def _spec(name: str) -> BackendSpec:
    if not isinstance(name, str) or name not in REGISTRY:
        msg = f"backend must be one of {list(BACKEND_NAMES)}; got {name!r}"
        raise ValueError(msg)
    return REGISTRY[name]


def _load(spec: BackendSpec, target: str) -> Any:
    """The object ``target`` (``"module:name"``) names; a missing extra says how to add it."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if spec.extra is None:
            raise
        msg = (
            f"backend={spec.name!r} needs the {spec.extra!r} extra: {exc}. Install it with: "
            f"pip install 'amorsize[{spec.extra}]'"
        )
        raise ImportError(msg) from exc
    return getattr(module, attr)


# Each backend's class once loaded, with the spec it came from (a spec put in REGISTRY
# later loads again): import_module on every call cost ~10 us of a cold 7 ms serial run.
_CLASSES: dict[str, tuple[BackendSpec, Any]] = {}


def _backend_class(name: str) -> type[Backend]:
    loaded = _CLASSES.get(name) if type(name) is str else None
    if loaded is None or REGISTRY.get(name) is not loaded[0]:
        spec = _spec(name)
        loaded = _CLASSES[name] = (spec, _load(spec, spec.target))
    cls: type[Backend] = loaded[1]
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
    if options:
        options = {k: v for k, v in options.items() if v is not None}
    try:
        key = _key(name, options)
    except TypeError:
        return cls(**options)  # unhashable option (e.g. a client object): not shared
    backend = _SHARED.get(key)  # one dict read (atomic): the lock is for creating it
    if backend is not None:
        return backend
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
        backend = _SHARED.get(_key(name, {k: v for k, v in options.items() if v is not None}))
    except TypeError:
        return 0
    return 0 if backend is None else backend.warm_workers()


def _key(name: str, options: dict[str, Any]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    if not options:
        return (name, ())
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
