"""The hook protocol through which reliability features (checkpoint, dead-letter queue,
circuit breaker) plug into ``execute`` without touching its loop, and ``ItemFailure``, the
value a failed item leaves in its slot. Both live below the executor, so the features import
them without importing the executor.

Call sequence for one ``execute`` run (every call happens in the thread that called
``execute``, never concurrently, so an observer needs no locking of its own)::

    begin(func)
    for each block of consecutive input items, in input order, before any is sampled or
    dispatched (the block size is the plan's chunk size, 256 before the plan exists):
        known_block(start, items) -> {k: result}   items[k] (index start + k) is not run;
                                                    result is used as is. The default asks
                                                    known(index, item) -> (hit, result)
                                                    per item: override either.
        known_ahead(start) -> int               how many items from index start on it
                                                will answer (planning only; 0 by default)
    planned(report)                             the plan is made: ``report`` is the run's
                                                RunReport, filled in as the run goes (final
                                                when ``end`` is called)
    before each chunk is dispatched:
        allow_dispatch() -> False               dispatch stops for good; chunks in flight
                                                finish; then stop_error(counts) is asked for
                                                the error naming why (see below)
    for each finished chunk, in completion order:
        on_success_block(start, items, values)  a chunk with no failure, one call; the
                                                default calls on_success(index, item, result)
                                                per item: override either
        on_success(index, item, result)         each success in a chunk with failures, and
                                                each result reused from sampling
        on_failure(index, item, exc, attempts) -> True when the failure was recorded
                                                elsewhere (dead-letter queue): the run goes
                                                on even with on_error="raise"
        chunk_finished(start, size, failed)     after the calls above: the chunk is back,
                                                ``failed`` of its items failed (not called
                                                for a chunk whose failure ends the run)
        on_chunk(span)                          the chunk's ChunkSpan (worker, start and
                                                end times, items, failures): called only for
                                                observers that override it, and then the
                                                serial fast path is not taken
    on_report(report)                           the run's RunReport, complete, before end
                                                (only for observers that override it)
    end(completed)                              always, in ``finally``; ``completed`` is True
                                                only when the run ended normally with every
                                                item run to a result or a failure (False after
                                                an error, Ctrl-C, or a dispatch stop)

An observer that overrides none of the item and dispatch hooks (``known``, ``known_block``,
``allow_dispatch``, ``on_success``, ``on_success_block``, ``on_failure``)
watches the run only as a whole: a serial plan then runs in one loop, without chunks, so
``chunk_finished`` is not called for it (the report has the counts).

Items a ``known`` answered are neither passed to ``on_success`` again nor counted as run.
Sampled items (run once by the optimizer) are reported through ``on_success`` like the rest.

When ``allow_dispatch`` returns False, the items never dispatched are "not attempted": with
``on_error="collect"`` each gets an ``ItemFailure`` whose exception is ``stop_error(counts)``
of the observer that refused; with ``on_error="raise"`` that exception is raised after the
in-flight items finished. ``counts`` maps ``"completed"``, ``"failed"`` and
``"not_attempted"`` to ints (``not_attempted`` is None when the input has no length).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from amorsize._timeline import ChunkSpan


@dataclass(frozen=True)
class ItemFailure:
    """An item that failed for good: it sits in the item's result slot (collect mode).

    ``attempts`` counts calls of ``func`` (retries included) or worker crashes; it is 0 for
    an item never attempted because dispatch stopped. Defined here, with the hooks, so that
    the modules below the executor (the dead-letter queue's replay) can tell a failure from
    a result without importing the executor.

    >>> ItemFailure(3, "x", ValueError("bad"), 2)
    ItemFailure(index=3, item='x', exception=ValueError('bad'), attempts=2)
    """

    index: int
    item: Any
    exception: BaseException
    attempts: int


class DispatchStoppedError(RuntimeError):
    """Dispatch was stopped by an observer that did not say why (the default stop error)."""


class RunObserver:
    """Base class for ``execute`` hooks: every method is a no-op with the neutral answer.

    Subclass and override what you need; see the module docstring for the call order.

    >>> class Counter(RunObserver):
    ...     def __init__(self) -> None:
    ...         self.ok = 0
    ...     def on_success(self, index, item, result) -> None:
    ...         self.ok += 1
    >>> from amorsize import execute
    >>> c = Counter()
    >>> execute(abs, [-1, -2], backend="serial", observers=[c])   # doctest: +SKIP
    >>> c.ok   # doctest: +SKIP
    2
    """

    def begin(self, func: Callable[[Any], Any]) -> None:
        """The run starts with ``func`` (the user's function, before any retry wrapper)."""

    def known(self, index: int, item: Any) -> tuple[bool, Any]:
        """``(True, result)`` if ``item`` at ``index`` already has a result; may raise."""
        return False, None

    def known_block(self, start: int, items: list[Any]) -> dict[int, Any]:
        """Known results for consecutive items: ``{k: result}`` for ``items[k]`` at
        ``start + k``. The executor calls this form; by default it asks ``known`` per item."""
        found: dict[int, Any] = {}
        for k, item in enumerate(items):
            hit, value = self.known(start + k, item)
            if hit:
                found[k] = value
        return found

    def known_ahead(self, start: int) -> int:
        """How many items at index ``start`` or later ``known`` will answer (0: cannot tell).

        Only counts: the executor plans with the items that really remain to run."""
        return 0

    def planned(self, report: Any) -> None:
        """The plan is made; ``report`` (a ``RunReport``) is completed as the run goes."""

    def chunk_finished(self, start: int, size: int, failed: int) -> None:
        """The chunk from index ``start`` came back; ``failed`` of its items failed."""

    def allow_dispatch(self) -> bool:
        """False stops dispatching new items for the rest of the run."""
        return True

    def on_success(self, index: int, item: Any, result: Any) -> None:
        """``item`` at ``index`` gave ``result``."""

    def on_success_block(self, start: int, items: list[Any], values: list[Any]) -> None:
        """Consecutive items from ``start`` all succeeded with ``values``. The executor calls
        this form for a chunk without failures; by default it calls ``on_success`` per item."""
        for k, item in enumerate(items):
            self.on_success(start + k, item, values[k])

    def on_failure(self, index: int, item: Any, exc: BaseException, attempts: int) -> bool:
        """``item`` failed for good after ``attempts`` tries; True = recorded elsewhere."""
        return False

    def on_chunk(self, span: ChunkSpan) -> None:
        """A chunk finished: ``span`` is its ``amorsize._timeline.ChunkSpan`` (the worker and
        ``time.monotonic()`` times where it ran). Overriding this turns chunk timing on."""

    def on_report(self, report: Any) -> None:
        """The run's ``RunReport``, complete (counts, failures, timeline), before ``end``."""

    def stop_error(self, counts: Mapping[str, int | None]) -> BaseException:
        """The exception describing why this observer stopped dispatch."""
        msg = (
            f"{type(self).__name__} stopped dispatch: {counts.get('completed')} item(s) "
            f"completed, {counts.get('failed')} failed, "
            f"{counts.get('not_attempted')} not attempted"
        )
        return DispatchStoppedError(msg)

    def end(self, completed: bool) -> None:
        """The run is over (normally, by an error, or by Ctrl-C)."""
