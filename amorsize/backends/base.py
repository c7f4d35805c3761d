"""The contract every execution backend implements.

Data flow (the executor owns ordering, retries, error policy and reliability hooks;
a backend only moves chunks to workers and outcomes back)::

    executor                       backend                       worker
    --------                       -------                       ------
    Task(start, items) | PAUSE ──▶ (pickle once) ──────────────▶ run_chunk_fast(func, items)
                                                                       │ per item: ok / failure
    ordered / unordered results ◀── (Task, OkValues | [Outcome]) ◀───┘

* Tasks are pulled lazily from an iterator, so a backend never holds more than
  ``max_in_flight`` tasks: memory stays bounded on infinite generators, and the executor
  stops dispatch (circuit open, first error in raise mode) simply by not yielding more.
* Each item's exception is caught in the worker and returned as a failed ``Outcome``; the
  remote traceback travels as text and becomes the ``__cause__`` of the re-raised error.
* A worker that dies takes its in-flight task with it: the backend re-runs that task's
  items (one item per task, so only the culprit fails again) up to a bound, then reports
  ``WorkerCrashedError`` outcomes naming the exit code. No item is lost or duplicated.
* Fast path: a backend may yield ``OkValues`` (a list of plain results) instead of a list of
  ``Outcome`` when every item of the task succeeded on its first attempt; the executor
  accepts both, and ``as_outcomes`` turns either into outcomes.
* Pausing: the task iterator may yield ``PAUSE`` instead of a task, meaning "nothing to
  dispatch now, ask again after the next completion" (the executor uses it to bound its
  reorder buffer), but only to a backend whose ``supports_pause`` is true.

How a chunk crosses a process boundary (pickling the function, packing results, items that
do not travel) and the loop that reads the task iterator live in ``amorsize.backends._wire``.
"""

from __future__ import annotations

import abc
import enum
import signal
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Final


@dataclass(frozen=True, slots=True)
class Task:
    """A chunk of consecutive input items; ``start`` is the input index of ``items[0]``."""

    start: int
    items: list[Any]


class Pause(enum.Enum):
    """The type of ``PAUSE``: what a task iterator yields when it has nothing to dispatch yet."""

    PAUSE = "pause"


#: Yielded by the task iterator instead of a ``Task``: dispatch nothing more until the next
#: task completes. Only a backend with ``supports_pause`` is ever given one.
PAUSE: Final = Pause.PAUSE


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one item: ``ok`` with ``value``, or a failure.

    On failure ``value`` is the exception (its ``__cause__`` carries the remote traceback)
    and ``attempts`` says how many times the item was tried.
    """

    ok: bool
    value: Any
    attempts: int = 1

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling an exception drops its __cause__: ship the remote traceback beside it.
        cause = getattr(self.value, "__cause__", None) if not self.ok else None
        if isinstance(cause, RemoteTraceback):
            return (_rebuild_failure, (self.value, self.attempts, cause.tb))
        return (Outcome, (self.ok, self.value, self.attempts))


def _rebuild_failure(exc: BaseException, attempts: int, tb: str) -> Outcome:
    exc.__cause__ = RemoteTraceback(tb)
    return Outcome(False, exc, attempts)


class OkValues(list):  # type: ignore[type-arg]
    """Every item of a task succeeded on its first attempt: the plain results, in order.

    A backend may yield this instead of ``[Outcome(True, v) for v in values]``: building one
    ``Outcome`` per tiny item in the parent would cost more than the item itself.
    """

    __slots__ = ()


def as_outcomes(outcomes: list[Outcome] | OkValues) -> list[Outcome]:
    """The outcomes of a task, whichever form the backend yielded."""
    if type(outcomes) is OkValues:
        return [Outcome(True, v) for v in outcomes]
    return outcomes


class WorkerCrashedError(RuntimeError):
    """The worker process running an item died (segfault, ``os._exit``, OOM killer, kill).

    ``exitcode`` is the process exit code (negative: killed by signal ``-exitcode``);
    ``attempts`` counts the crashes the item went through. Picklable with its attributes.

    >>> str(WorkerCrashedError(-9, attempts=2))[:46]
    'worker process died (killed by signal SIGKILL)'
    """

    def __init__(self, exitcode: int | None, attempts: int = 1) -> None:
        self.exitcode = exitcode
        self.attempts = attempts
        super().__init__(self._message())

    def _message(self) -> str:
        code = self.exitcode
        if code is None:
            how = "exit code unknown"
        elif code < 0:
            try:
                how = f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        return (
            f"worker process died ({how}) while running this item; it crashed the worker "
            f"{self.attempts} time(s), each time on a fresh worker"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.exitcode, self.attempts))


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


class NotRunError(RuntimeError):
    """An item not run because an earlier one failed in a run that stops at its first failure.

    Only a ``StopOnFailure`` run produces it, and the executor raises that earlier failure
    instead: users see it only if the failure itself was lost (its worker died).
    """


class StopOnFailure:
    """``func`` for a run that ends at its first failure (``execute(on_error="raise")``).

    ``run_chunk_fast`` unwraps it once per chunk (the per-item path is untouched). After an
    item fails, the rest of its chunk and every later chunk that this copy runs answer
    ``NotRunError`` outcomes instead of running: the flag lives in the copy, so a thread
    pool shares one and each worker process has its own (a pickle carries no flag).
    Calling it directly just calls ``func``.
    """

    __slots__ = ("failed", "func")

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func
        self.failed = False

    def __call__(self, item: Any) -> Any:
        return self.func(item)

    @property
    def __name__(self) -> str:  # what backends name their tasks after
        return str(getattr(self.func, "__name__", type(self.func).__name__))

    def __repr__(self) -> str:
        return repr(self.func)

    def __reduce__(self) -> tuple[Any, ...]:
        return (StopOnFailure, (self.func,))


_NOT_RUN = Outcome(
    False,
    NotRunError(
        "not run: an earlier item failed in the same worker and on_error='raise' stops the "
        "run at its first failure, but that failure was lost with its worker; run again"
    ),
    0,
)


def run_chunk_fast(
    func: Callable[[Any], Any], items: list[Any], *, remote: bool = True
) -> list[Outcome] | OkValues:
    """Apply ``func`` to each item in the worker: ``OkValues`` when every item succeeds, else
    one ``Outcome`` per item, each item's ``Exception`` caught separately.

    ``KeyboardInterrupt`` and ``SystemExit`` propagate: they mean the worker itself must
    stop, not that one item failed.

    ``remote=False`` (serial and thread backends) leaves each exception untouched, with its
    own traceback and ``__cause__``, instead of attaching the formatted traceback.
    ``func`` may be a ``StopOnFailure``: items after a failure are then not run.
    """
    stop: StopOnFailure | None = None
    if type(func) is StopOnFailure:
        stop = func
        if stop.failed:
            return [_NOT_RUN] * len(items)
        func = stop.func
    values = OkValues()
    try:
        # extend(map(...)) runs at C speed and keeps the results computed before a raise.
        values.extend(map(func, items))
        return values
    except Exception as exc:
        first = exc
    # Slow path: keep the results already computed, never run an item twice.
    done = len(values)
    out = [Outcome(True, v) for v in values]
    out.append(_failed(first, remote))
    if stop is not None:
        stop.failed = True
        out.extend([_NOT_RUN] * (len(items) - done - 1))
        return out
    for item in items[done + 1 :]:
        try:
            out.append(Outcome(True, func(item)))
        except Exception as exc:
            out.append(_failed(exc, remote))
    return out


def _failed(exc: BaseException, remote: bool) -> Outcome:
    if remote:
        return failure_outcome(exc)
    return Outcome(False, exc, getattr(exc, "attempts", 1))


class Backend(abc.ABC):
    """Runs tasks on workers and yields ``(task, outcomes)`` pairs as they complete.

    Implementations: ``serial``, ``threads``, ``processes`` (and ``dask`` where installed).
    To add one, subclass this, set ``name``, implement ``run`` and ``close``, and register it
    in ``amorsize.backends`` (see ``docs/ARCHITECTURE.md``).
    """

    name: ClassVar[str]
    #: True when ``run`` accepts ``PAUSE`` from the task iterator.
    supports_pause: ClassVar[bool] = False

    @abc.abstractmethod
    def run(
        self,
        func: Callable[[Any], Any],
        tasks: Iterator[Task | Pause],
        *,
        n_jobs: int,
        max_in_flight: int,
    ) -> Iterator[tuple[Task, list[Outcome] | OkValues]]:
        """Yield each task with its outcomes (``OkValues`` or one ``Outcome`` per item), in
        completion order.

        ``tasks`` yields ``PAUSE`` only if ``supports_pause``; ``_wire.TaskFeed`` reads it.
        Closing the returned generator cancels tasks not yet started and returns promptly.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release workers held by this backend (called at interpreter exit for warm pools)."""

    def warm_workers(self) -> int:
        """Workers already started and idle-ready (the optimizer counts no start-up for them)."""
        return 0
