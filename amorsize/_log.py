"""amorsize's loggers: one ``logging.getLogger("amorsize")`` hierarchy, structured records.

Each concept logs on its own child logger, so that an application can raise or silence one of
them (``logging.getLogger("amorsize.retry").setLevel(logging.WARNING)``)::

    amorsize             the root: a NullHandler (library etiquette: nothing is printed
     │                   unless the application configures logging)
     ├─ amorsize.retry       a retry (DEBUG), a call that gave up (INFO); logged by the
     │                       compiled core (``_core_retry.pxi``) with the same fields
     ├─ amorsize.circuit     breaker transitions (WARNING when it opens, else INFO)
     ├─ amorsize.executor    an item that failed for good in an ``execute`` run (INFO)
     └─ amorsize.processes   a worker process that died (WARNING), or was recycled (INFO)

Records carry their facts as attributes (``logging``'s ``extra``), so that a JSON formatter
or a log pipeline reads them without parsing the message: ``run_id``, ``item_index``,
``attempt``, ``delay``, ``function``, ``breaker``, ``state``, ``exitcode``, ``pid``.
Nothing is logged on the success path: every function here runs after a failure or a
state change, and checks ``isEnabledFor`` before building anything.
"""

from __future__ import annotations

import itertools
import logging
import os
from contextvars import ContextVar
from typing import Any

__all__ = [
    "RUN_ID",
    "log_breaker_transition",
    "log_item_failed",
    "log_worker_crashed",
    "log_worker_recycled",
    "new_run_id",
]

root = logging.getLogger("amorsize")
root.addHandler(logging.NullHandler())
retry_logger = logging.getLogger("amorsize.retry")
circuit_logger = logging.getLogger("amorsize.circuit")
executor_logger = logging.getLogger("amorsize.executor")
processes_logger = logging.getLogger("amorsize.processes")

#: The id of the ``execute`` run the calling context is in (None outside a run): set by the
#: executor, read by the backends' logs, so that a worker's death names its run.
RUN_ID: ContextVar[str | None] = ContextVar("amorsize_run_id", default=None)
_runs = itertools.count(1)
# This process's id in hex, the run ids' prefix: read once (a getpid and a hex format,
# read at every run, cost ~20 us of a cold call: 0.1 % of a 200k-item serial run), again
# in a forked child.
_pid_hex = f"{os.getpid():x}"


def _read_pid() -> None:
    global _pid_hex
    _pid_hex = f"{os.getpid():x}"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_read_pid)


def new_run_id() -> str:
    """A run id unique in this process and readable in a log: ``"<pid hex>-<counter>"``.

    >>> a, b = new_run_id(), new_run_id()
    >>> a != b and a.split("-")[0] == b.split("-")[0]
    True
    """
    return f"{_pid_hex}-{next(_runs)}"


def _error_fields(exc: BaseException | None) -> dict[str, Any]:
    if exc is None:
        return {"error_type": None}
    return {"error_type": type(exc).__qualname__}


def _name_of(func: Any) -> str:
    from amorsize._core import callable_name

    return str(callable_name(func))


def log_item_failed(
    run_id: str | None, index: int, attempts: int, exc: BaseException, func: Any
) -> None:
    """An item of an ``execute`` run of ``func`` failed for good (after its retries), at
    INFO."""
    if not executor_logger.isEnabledFor(logging.INFO):
        return
    function = _name_of(func)
    extra = {
        "run_id": run_id, "item_index": index, "attempt": attempts, "function": function,
        **_error_fields(exc),
    }  # fmt: skip
    executor_logger.info(
        "run %s: item %d failed after %d attempt(s): %s: %s",
        run_id, index, attempts, type(exc).__name__, exc, extra=extra,
    )  # fmt: skip


def log_breaker_transition(name: str, state: str, previous: str | None, reason: str) -> None:
    """A circuit breaker changed state: WARNING when it opened (with why), else INFO."""
    level = logging.WARNING if state == "open" else logging.INFO
    if not circuit_logger.isEnabledFor(level):
        return
    extra = {"breaker": name, "state": state, "previous_state": previous, "reason": reason}
    if state == "open":
        circuit_logger.warning("circuit breaker %r opened: %s", name, reason, extra=extra)
    else:
        circuit_logger.info("circuit breaker %r is now %s", name, state, extra=extra)


def log_worker_crashed(
    pid: int | None, exitcode: int | None, first_index: int, n_items: int
) -> None:
    """A worker process died while running a task of ``n_items`` from input ``first_index``,
    at WARNING (the items re-run on a fresh worker, or fail once they crashed too often)."""
    if not processes_logger.isEnabledFor(logging.WARNING):
        return
    run_id = RUN_ID.get()
    extra = {
        "run_id": run_id, "pid": pid, "exitcode": exitcode, "item_index": first_index,
        "items": n_items,
    }  # fmt: skip
    processes_logger.warning(
        "run %s: worker process %s died (exit code %s) running %d item(s) from input %d",
        run_id, pid, exitcode, n_items, first_index, extra=extra,
    )  # fmt: skip


def log_worker_recycled(pid: int | None, reason: str, tasks_done: int | None = None) -> None:
    """A worker process was retired on purpose and replaced (``reason``: e.g. its task or
    memory limit), at INFO."""
    if not processes_logger.isEnabledFor(logging.INFO):
        return
    run_id = RUN_ID.get()
    extra = {"run_id": run_id, "pid": pid, "reason": reason, "tasks_done": tasks_done}
    processes_logger.info(
        "run %s: worker process %s recycled (%s)", run_id, pid, reason, extra=extra
    )
