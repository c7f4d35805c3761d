"""amorsize: decide whether and how to parallelise ``map(func, data)``, run it, survive failure.

This module only re-exports the public API; each concept lives in its own module.

The re-exports are resolved on first access (PEP 562): a worker process that only needs
``amorsize.backends.processes`` then starts without importing the whole package, which
saves ~40 ms per spawned worker (`python -X importtime -c "import amorsize"`). Type
checkers read the imports under ``TYPE_CHECKING``.

>>> from amorsize import execute
>>> execute(abs, [-1, -2], backend="serial")
[1, 2]
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
from typing import TYPE_CHECKING, Any

from amorsize._version import read_version as _read_version


def _refuse_source_tree() -> None:
    """Refuse to run from an unbuilt clone: the compiled core is missing, so nothing works.

    ``python`` run in a clone's directory imports the clone (the current directory comes
    first on ``sys.path``), not the installed package; without this check every feature
    would fail later with a message that does not say why.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(os.path.join(here, "_core" + suffix)):
            return
    root = os.path.dirname(here)
    if not any(os.path.exists(os.path.join(root, n)) for n in ("pyproject.toml", "setup.py")):
        return  # an installed package that lost its core: the import of _core says so
    msg = (
        f"you are importing the amorsize source tree at {root}, whose compiled core"
        " (amorsize._core) is not built; install the package (`pip install .`, or"
        " `pip install -e .` to develop) or run from another directory"
    )
    raise ImportError(msg)


_refuse_source_tree()

if TYPE_CHECKING:
    from amorsize._timeout import ItemTimeoutError
    from amorsize.backends.base import WorkerCrashedError
    from amorsize.budget import RetryBudget
    from amorsize.checkpoint import (
        Checkpoint,
        CheckpointError,
        CheckpointMismatchError,
    )
    from amorsize.circuit import (
        CircuitBreaker,
        CircuitBreakerPolicy,
        CircuitOpenError,
        CircuitState,
        with_circuit_breaker,
    )
    from amorsize.dlq import (
        DeadLetter,
        DeadLetterQueue,
    )
    from amorsize.executor import (
        ChunkSpan,
        ExecutionPlan,
        ItemFailure,
        RunObserver,
        RunReport,
        execute,
        execute_async,
        execute_iter,
    )
    from amorsize.hints import retry_after
    from amorsize.optimizer import (
        OptimizationResult,
        optimize,
    )
    from amorsize.ratelimit import RateLimiter
    from amorsize.retry import (
        RetryExhaustedError,
        RetryFailure,
        RetryPolicy,
        RetryStats,
        create_batch_retry_wrapper,
        retry_call,
        set_testing,
        with_retry,
    )
    from amorsize.sampling import Profile
    from amorsize.system import (
        SystemInfo,
        get_system_info,
    )

# public name -> the module that defines it
_SOURCES: dict[str, str] = {
    "ItemTimeoutError": "amorsize._timeout",
    "WorkerCrashedError": "amorsize.backends.base",
    "RetryBudget": "amorsize.budget",
    "Checkpoint": "amorsize.checkpoint",
    "CheckpointError": "amorsize.checkpoint",
    "CheckpointMismatchError": "amorsize.checkpoint",
    "CircuitBreaker": "amorsize.circuit",
    "CircuitBreakerPolicy": "amorsize.circuit",
    "CircuitOpenError": "amorsize.circuit",
    "CircuitState": "amorsize.circuit",
    "with_circuit_breaker": "amorsize.circuit",
    "DeadLetter": "amorsize.dlq",
    "DeadLetterQueue": "amorsize.dlq",
    "ChunkSpan": "amorsize.executor",
    "ExecutionPlan": "amorsize.executor",  # deprecated alias of RunReport, kept until 1.0
    "ItemFailure": "amorsize.executor",
    "RunObserver": "amorsize.executor",
    "RunReport": "amorsize.executor",
    "execute": "amorsize.executor",
    "execute_async": "amorsize.executor",
    "execute_iter": "amorsize.executor",
    "OptimizationResult": "amorsize.optimizer",
    "optimize": "amorsize.optimizer",
    "RateLimiter": "amorsize.ratelimit",
    "RetryExhaustedError": "amorsize.retry",
    "RetryFailure": "amorsize.retry",
    "RetryPolicy": "amorsize.retry",
    "RetryStats": "amorsize.retry",
    "create_batch_retry_wrapper": "amorsize.retry",
    "retry_call": "amorsize.retry",
    "retry_after": "amorsize.hints",
    "set_testing": "amorsize.retry",
    "with_retry": "amorsize.retry",
    "Profile": "amorsize.sampling",
    "SystemInfo": "amorsize.system",
    "get_system_info": "amorsize.system",
}

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "ChunkSpan",
    "CircuitBreaker",
    "CircuitBreakerPolicy",
    "CircuitOpenError",
    "CircuitState",
    "DeadLetter",
    "DeadLetterQueue",
    "ExecutionPlan",
    "ItemFailure",
    "ItemTimeoutError",
    "OptimizationResult",
    "Profile",
    "RateLimiter",
    "RetryBudget",
    "RetryExhaustedError",
    "RetryFailure",
    "RetryPolicy",
    "RetryStats",
    "RunObserver",
    "RunReport",
    "SystemInfo",
    "WorkerCrashedError",
    "__version__",
    "create_batch_retry_wrapper",
    "execute",
    "execute_async",
    "execute_iter",
    "get_system_info",
    "optimize",
    "retry_after",
    "retry_call",
    "set_testing",
    "with_circuit_breaker",
    "with_retry",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        # Read from the metadata on first use: see amorsize/_version.py.
        return _read_version()
    source = _SOURCES.get(name)
    if source is None:
        msg = f"module 'amorsize' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
