"""The contract every execution backend implements.

Data flow (the executor owns ordering, retries, error policy and reliability hooks;
a backend only moves chunks to workers and outcomes back)::

    executor                       backend                       worker
    --------                       -------                       ------
    iter(data) -> Task(start, items) ──submit──▶ (pickle once) ──▶ run_chunk(func, items)
                                                                       │ per item: ok / failure
    ordered / unordered results ◀── (Task, [Outcome]) ◀──────────────┘

* Tasks are pulled lazily from an iterator, so a backend never holds more than
  ``max_in_flight`` tasks: memory stays bounded on infinite generators, and the executor
  stops dispatch (circuit open, first error in raise mode) simply by not yielding more.
* Each item's exception is caught in the worker and returned as a failed ``Outcome``; the
  remote traceback travels as text and becomes the ``__cause__`` of the re-raised error.
* A worker that dies takes its in-flight task with it: the backend re-runs that task's
  items (one item per task, so only the culprit fails again) up to a bound, then reports
  ``WorkerCrashedError`` outcomes naming the exit code. No item is lost or duplicated.
"""

from __future__ import annotations

import abc
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Task:
    """A chunk of consecutive input items; ``start`` is the input index of ``items[0]``."""

    start: int
    items: list[Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one item: ``ok`` with ``value``, or a failure.

    On failure ``value`` is the exception (its ``__cause__`` carries the remote traceback)
    and ``attempts`` says how many times the item was tried.
    """

    ok: bool
    value: Any
    attempts: int = 1


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker, kept as its ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def failure_outcome(exc: BaseException, attempts: int = 1) -> Outcome:
    """Wrap ``exc`` so that the worker's traceback survives pickling as its ``__cause__``."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__cause__ = RemoteTraceback(tb)
    return Outcome(False, exc, getattr(exc, "attempts", attempts))


def run_chunk(func: Callable[[Any], Any], items: list[Any]) -> list[Outcome]:
    """Apply ``func`` to each item, catching each item's ``Exception`` separately.

    Runs inside the worker. ``KeyboardInterrupt`` and ``SystemExit`` propagate: they mean
    the worker itself must stop, not that one item failed.
    """
    out: list[Outcome] = []
    append = out.append
    for item in items:
        try:
            append(Outcome(True, func(item)))
        except Exception as exc:
            append(failure_outcome(exc))
    return out


class Backend(abc.ABC):
    """Runs tasks on workers and yields ``(task, outcomes)`` pairs as they complete.

    Implementations: ``serial``, ``threads``, ``processes`` (and ``dask`` where installed).
    To add one, subclass this, set ``name``, implement ``run`` and ``close``, and register it
    in ``amorsize.backends`` (see ``docs/ARCHITECTURE.md``).
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def run(
        self,
        func: Callable[[Any], Any],
        tasks: Iterator[Task],
        *,
        n_jobs: int,
        max_in_flight: int,
    ) -> Iterator[tuple[Task, list[Outcome]]]:
        """Yield each task with one outcome per item, in completion order.

        Closing the returned generator cancels tasks not yet started and returns promptly.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release workers held by this backend (called at interpreter exit for warm pools)."""
