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
* Fast path: a backend may yield ``OkValues`` (a list of plain results) instead of a list of
  ``Outcome`` when every item of the task succeeded on its first attempt; the executor
  accepts both, and ``as_outcomes`` turns either into outcomes.
* Pausing: when ``Backend.supports_pause`` is true, the task iterator may yield ``None``
  meaning "nothing to dispatch now, ask again after the next completion" (the executor uses
  it to bound its reorder buffer). Backends without it never see ``None``.
"""

from __future__ import annotations

import abc
import io
import pickle
import signal
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from amorsize._format import safe_repr


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


def _safe_str(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return type(exc).__name__


def error_payload(exc: BaseException) -> tuple[str, str, str]:
    """``(type name, message, formatted traceback)`` of ``exc``: text that always pickles."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        text = str(exc)
    except Exception:
        text = "<str() failed>"
    return type(exc).__name__, text, tb


def portable_outcomes(
    outcomes: list[Outcome], dumps: Callable[[Any], bytes], where: str, start: int
) -> list[Outcome]:
    """``outcomes`` made safe to send to the parent: each one that would not pickle fails alone.

    A result or exception that cannot be pickled (unpicklable, too deeply nested) would
    otherwise break the whole chunk's message. It becomes a ``PicklingError`` failure of its
    own item, naming its index (``start`` is the first item's) and ``where`` it could not
    leave. Runs in the worker, only for chunks that hold a failure or whose results did not
    pickle at once. Its counterpart in the parent, for what pickles but does not load, is
    ``reload_outcomes``.
    """
    checked: list[Outcome] = []
    for i, out in enumerate(outcomes):
        try:
            dumps(out.value)
            checked.append(out)
        except Exception as exc:
            what = "result" if out.ok else "exception"
            msg = (
                f"item {start + i}: its {what} cannot be pickled back from {where} "
                f"({_safe_str(exc)}); the {what} was {safe_repr(out.value)}"
            )
            checked.append(failure_outcome(pickle.PicklingError(msg), out.attempts))
    return checked


class _Unloadable:
    """Stands in for an object that failed to load during ``reload_outcomes``.

    It absorbs the opcodes that would have filled the object (state, items), so the rest of
    the message still loads.
    """

    def __init__(self, what: str, error: BaseException) -> None:
        self.what = what
        # Without its traceback: the failure it becomes must not keep the loader's frames,
        # and with them every object of the chunk, alive.
        self.error = error.with_traceback(None)

    def __call__(self, *args: Any, **kwargs: Any) -> _Unloadable:
        return self  # a class or function that could not be found, called by REDUCE

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def add(self, item: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def _describe(func: Any, args: Any) -> str:
    name = func.what if isinstance(func, _Unloadable) else getattr(func, "__qualname__", None)
    shown = ", ".join(safe_repr(a) for a in args) if isinstance(args, tuple) else safe_repr(args)
    return f"{name or safe_repr(func)}({shown})"[:300]


class _TolerantUnpickler(pickle._Unpickler):
    """Loads what it can: an object whose class is missing or whose reconstruction raises
    becomes an ``_Unloadable``, and every object built from one is marked (``taint``), so
    that each top-level entry of the message can be told good or broken.

    The pure-Python unpickler, because its opcodes can be replaced; it only ever runs after
    the C unpickler failed on the same bytes.
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]  # the unpickler's own, set by load()
    _op = 0  # the opcode being run (NEWOBJ and NEWOBJ_EX share a handler)

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        # id -> (object kept alive so that its id is never reused, the stand-in behind it)
        self.taint: dict[int, tuple[Any, _Unloadable]] = {}

    def broken(self, obj: Any) -> _Unloadable | None:
        """The stand-in that ``obj`` holds (itself, or somewhere inside), if any."""
        hit = self.taint.get(id(obj))
        return hit[1] if hit is not None else None

    def _fail(self, what: str, error: Exception) -> _Unloadable:
        stand_in = _Unloadable(what, error)
        self.taint[id(stand_in)] = (stand_in, stand_in)
        return stand_in

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except Exception as exc:
            return self._fail(f"{module}.{name}", exc)

    def _reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        try:
            stack[-1] = func(*args)
        except Exception as exc:
            stack[-1] = self._fail(_describe(func, args), exc)

    def _newobj(self) -> None:
        stack = self.stack
        kwargs = stack.pop() if self._op == pickle.NEWOBJ_EX[0] else {}
        args = stack.pop()
        cls = stack.pop()
        try:
            stack.append(cls.__new__(cls, *args, **kwargs))
        except Exception as exc:
            stack.append(self._fail(_describe(cls, args), exc))

    def _build(self) -> None:
        inst = self.stack[-2]
        try:
            pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
        except Exception as exc:
            # The state was popped; the half-built object stays, marked broken.
            what = f"a {type(inst).__qualname__} object whose state did not load"
            self.taint[id(inst)] = (inst, _Unloadable(what, exc))


def _tainting(op: Callable[[Any], None], arity: int, code: int) -> Callable[[Any], None]:
    """``op`` (an opcode that builds or fills an object from the top of the stack), marking
    its result broken when anything it consumed was. ``arity`` 0: it consumes up to the mark."""

    def run(self: _TolerantUnpickler) -> None:
        consumed = self.stack[-arity:] if arity else list(self.stack)
        self._op = code
        op(self)
        if self.taint:
            for obj in consumed:
                hit = self.taint.get(id(obj))
                if hit is not None:
                    result = self.stack[-1]
                    self.taint.setdefault(id(result), (result, hit[1]))
                    break

    return run


_OPS = _TolerantUnpickler.dispatch
for _code, _op, _arity in (
    (pickle.REDUCE, _TolerantUnpickler._reduce, 2),
    (pickle.NEWOBJ, _TolerantUnpickler._newobj, 2),
    (pickle.NEWOBJ_EX, _TolerantUnpickler._newobj, 3),
    (pickle.BUILD, _TolerantUnpickler._build, 2),
    (pickle.TUPLE1, _OPS[pickle.TUPLE1[0]], 1),
    (pickle.TUPLE2, _OPS[pickle.TUPLE2[0]], 2),
    (pickle.TUPLE3, _OPS[pickle.TUPLE3[0]], 3),
    (pickle.APPEND, _OPS[pickle.APPEND[0]], 2),
    (pickle.SETITEM, _OPS[pickle.SETITEM[0]], 3),
    (pickle.TUPLE, _OPS[pickle.TUPLE[0]], 0),
    (pickle.LIST, _OPS[pickle.LIST[0]], 0),
    (pickle.DICT, _OPS[pickle.DICT[0]], 0),
    (pickle.FROZENSET, _OPS[pickle.FROZENSET[0]], 0),
    (pickle.APPENDS, _OPS[pickle.APPENDS[0]], 0),
    (pickle.SETITEMS, _OPS[pickle.SETITEMS[0]], 0),
    (pickle.ADDITEMS, _OPS[pickle.ADDITEMS[0]], 0),
):
    _OPS[_code[0]] = _tainting(_op, _arity, _code[0])


def reload_outcomes(
    blob: bytes,
    task: Task,
    error: Exception,
    where: str,
    entries: Callable[[Any], list[tuple[Any, Outcome]]],
) -> list[Outcome]:
    """The outcomes of a chunk whose message pickled in ``where`` but did not load here.

    Each item whose result or exception cannot be unpickled (a class whose ``__init__`` takes
    other arguments than it pickles, a ``__reduce__`` that fails on load, a class missing
    here) fails alone with an ``UnpicklingError`` naming its index; the others keep their
    values. Called only after ``pickle.loads(blob)`` raised ``error``, so a chunk that loads
    pays nothing. ``entries`` splits the loaded message into one ``(entry, outcome)`` pair
    per item; the entry is the object checked for a part that did not load.
    """
    loader = _TolerantUnpickler(blob)
    try:
        pairs = entries(loader.load())
    except Exception:
        pairs = []
    if len(pairs) != len(task.items):
        # Not even a tolerant load got through: no item's value can be trusted.
        whole = _Unloadable("part of this chunk's message", error)
        return [_unloadable(task.start + i, True, whole, where, 1) for i in range(len(task.items))]
    out: list[Outcome] = []
    for i, (entry, outcome) in enumerate(pairs):
        stand_in = loader.broken(entry)
        if stand_in is None:
            out.append(outcome)
        else:
            out.append(_unloadable(task.start + i, outcome.ok, stand_in, where, outcome.attempts))
            if not outcome.ok and isinstance(outcome.value, _Unloadable):
                # The worker's traceback of the original exception rode on the stand-in.
                cause = getattr(outcome.value, "__cause__", None)
                if isinstance(cause, RemoteTraceback):
                    out[-1].value.__cause__ = cause
    return out


def _unloadable(index: int, ok: bool, stand_in: _Unloadable, where: str, attempts: int) -> Outcome:
    what = "result" if ok else "exception"
    msg = (
        f"item {index}: its {what} was pickled in {where} but cannot be unpickled in the "
        f"calling process ({_safe_str(stand_in.error)}); it was {stand_in.what}. Return "
        f"objects that load from what they pickle (an exception class whose __init__ takes "
        f"other arguments than its .args needs a __reduce__), or plain data"
    )
    err = pickle.UnpicklingError(msg)
    err.__cause__ = stand_in.error
    return Outcome(False, err, attempts)


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
    """``run_chunk`` with the fast path: ``OkValues`` when every item succeeds.

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
    #: True when ``run`` accepts ``None`` from the task iterator as "pause dispatch".
    supports_pause: ClassVar[bool] = False

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

    def warm_workers(self) -> int:
        """Workers already started and idle-ready (the optimizer counts no start-up for them)."""
        return 0
