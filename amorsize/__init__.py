"""amorsize: decide whether and how to parallelise ``map(func, data)``, run it, survive failure.

This module only re-exports the public API; each concept lives in its own module.
"""

from amorsize._version import read_version as _read_version
from amorsize.backends.base import WorkerCrashedError
from amorsize.checkpoint import Checkpoint, CheckpointError, CheckpointMismatchError
from amorsize.circuit import (
    CircuitBreaker,
    CircuitBreakerPolicy,
    CircuitOpenError,
    CircuitState,
    with_circuit_breaker,
)
from amorsize.dlq import DeadLetter, DeadLetterQueue
from amorsize.executor import ExecutionPlan, ItemFailure, RunObserver, execute, execute_iter
from amorsize.optimizer import OptimizationResult, optimize
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
from amorsize.system import SystemInfo, get_system_info

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CircuitBreaker",
    "CircuitBreakerPolicy",
    "CircuitOpenError",
    "CircuitState",
    "DeadLetter",
    "DeadLetterQueue",
    "ExecutionPlan",
    "ItemFailure",
    "OptimizationResult",
    "Profile",
    "RetryExhaustedError",
    "RetryFailure",
    "RetryPolicy",
    "RetryStats",
    "RunObserver",
    "SystemInfo",
    "WorkerCrashedError",
    "__version__",
    "create_batch_retry_wrapper",
    "execute",
    "execute_iter",
    "get_system_info",
    "optimize",
    "retry_call",
    "set_testing",
    "with_circuit_breaker",
    "with_retry",
]


def __getattr__(name: str) -> str:
    # `__version__` is read from the metadata on first use: see amorsize/_version.py.
    if name == "__version__":
        return _read_version()
    msg = f"module 'amorsize' has no attribute {name!r}"
    raise AttributeError(msg)
