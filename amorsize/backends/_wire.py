"""Backend wire code: what the backends share to read their tasks and move chunks across a
process boundary (``processes`` and ``dask``; ``serial`` and ``threads`` use only ``TaskFeed``).

Data flow of one chunk (``kind`` is ``OK``, ``MIXED``, ``NOLOAD`` or ``FATAL``)::

    parent (backend)                                          worker
    ----------------                                          ------
    TaskFeed(tasks).pull() ─▶ Task, or None (PAUSE / end)
    dump_func(func, to) ─ once per run ─────────────────────▶ pickle.loads: the function
                          (cloudpickle when installed)        │ does not load: FATAL message
    Task.items ─ pickled by the backend ────────────────────▶ pickle.loads: the items
      │ does not pickle: singles(task) re-sends one item        │ do not load: NOLOAD message
      │ per task; a single item fails alone (not_sent)          ▼
      │                                                   run_and_pack(func, start, items)
      │                                                     run_chunk_fast, then
      │                                                     (OK, values) | (MIXED, [Outcome]);
      │                                                     a value that does not pickle fails
      │                                                     alone (portable_outcomes)
    load_results(blob, task, where) ◀─────────────────────────┘
      ─▶ OkValues | [Outcome] | Refused(kind, error)
      a value that does not load here fails alone (reload_outcomes, the tolerant unpickler);
      NOLOAD: the backend re-sends singles(task); a single item fails alone (not_loaded)
"""

from __future__ import annotations

import io
import os
import pickle
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple, cast

from amorsize._format import describe_error, safe_repr
from amorsize._timeline import stamp
from amorsize.backends.base import (
    PAUSE,
    OkValues,
    Outcome,
    Pause,
    RemoteTraceback,
    Task,
    as_outcomes,
    failure_outcome,
    run_chunk_fast,
)

PROTOCOL = 5

#: Message kinds, worker -> parent: every item ran (``OK``: the plain values) or not all
#: succeeded (``MIXED``: one ``Outcome`` each); none ran because the items (``NOLOAD``) or
#: the function (``FATAL``) did not load in the worker (the error as text); an item ran past
#: its timeout (``TIMEOUT``: its offset in the chunk and the outcomes of the items before it;
#: the worker ends itself after sending it).
OK, MIXED, NOLOAD, FATAL, TIMEOUT = 0, 1, 2, 3, 4

#: An exception as text that always pickles: (type name, message, formatted traceback).
ErrorText = tuple[str, str, str]

# --------------------------------------------------------------------------- the task feed


class TaskFeed:
    """The executor's task iterator as every backend reads it: the pause loop in one place.

    ``pull()`` gives the next task, or ``None`` when the iterator paused (``PAUSE``: ask
    again after the next completion) or ran out (``exhausted``). When nothing is in flight
    and nothing is left to send, a backend calls ``finish()``.
    """

    __slots__ = ("_tasks", "exhausted")

    def __init__(self, tasks: Iterator[Task | Pause]) -> None:
        self._tasks = tasks
        self.exhausted = False

    def pull(self) -> Task | None:
        """The next task; ``None`` if the iterator paused or is exhausted."""
        if self.exhausted:
            return None
        task = next(self._tasks, None)  # never a task or PAUSE: the end
        if task is None:
            self.exhausted = True
            return None
        if task is PAUSE:
            return None
        return task

    def finish(self) -> None:
        """End of the run (nothing in flight): fine when exhausted, an error when paused."""
        if not self.exhausted:
            msg = (
                "the task iterator paused (yielded PAUSE) with no task in flight: a pause "
                "lasts until the next task completes, so it would wait forever; yield PAUSE "
                "only while a task is in flight"
            )
            raise RuntimeError(msg)


# --------------------------------------------------------------------------- the function


def dump_func(func: Callable[[Any], Any], to: str) -> bytes:
    """``func`` pickled once per run for the workers (``to`` names them, for the error).

    cloudpickle when installed, so that lambdas, closures and ``__main__`` functions travel
    by value; plain pickle otherwise. Raises ``TypeError`` naming the fix.
    """
    try:
        import cloudpickle
    except ImportError:  # an optional extra: plain pickle sends module-level functions
        cloudpickle = None
    try:
        if cloudpickle is not None:
            return cast(bytes, cloudpickle.dumps(func, protocol=PROTOCOL))
        return pickle.dumps(func, protocol=PROTOCOL)
    except Exception as exc:
        hint = (
            "make what it captures picklable, define it at module level, or use "
            "backend='threads'"
            if cloudpickle is not None
            else "define it at module level, install cloudpickle (lambdas, closures and "
            "__main__ functions then work), or use backend='threads'"
        )
        msg = (
            f"func={safe_repr(func)} cannot be sent to {to}: pickling it failed "
            f"({describe_error(exc)}); {hint}"
        )
        raise TypeError(msg) from exc


# --------------------------------------------------------------------------- worker side


def error_payload(exc: BaseException) -> ErrorText:
    """``(type name, message, formatted traceback)`` of ``exc``: text that always pickles."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        text = str(exc)
    except Exception:
        text = "<str() failed>"
    return type(exc).__name__, text, tb


def run_and_pack(
    func: Callable[[Any], Any],
    start: int,
    items: list[Any],
    where: str,
    dumps: Callable[[Any], bytes],
) -> bytes:
    """The worker's half of a task: run the chunk, and its message for the parent.

    The message carries when the chunk ran here (``time.monotonic``, one clock for every
    process of the machine) and this process's id: two clock reads per chunk, for the
    run's timeline (``amorsize._timeline``).
    """
    t0 = time.monotonic()
    try:
        result = run_chunk_fast(func, items)
        span = (t0, time.monotonic(), os.getpid())
        return pack_results(result, start, where, dumps, span)
    except Exception as exc:
        # Belt and braces: whatever went wrong packing results fails the chunk's items,
        # never the worker (a dead worker's items would run again).
        msg = f"the results of items {start}.. could not be sent back: {exc!r:.300}"
        return dumps((MIXED, [failure_outcome(RuntimeError(msg))] * len(items)))


def pack_results(
    result: list[Outcome] | OkValues,
    start: int,
    where: str,
    dumps: Callable[[Any], bytes],
    span: tuple[float, float, int] | None = None,
) -> bytes:
    """A chunk's outcomes as a message: a value that does not pickle fails only its item.

    ``span``: ``(start, end, worker id)`` of the chunk in the worker, sent along."""
    if type(result) is OkValues:
        try:
            return dumps((OK, list(result), span))
        except Exception:
            pass  # some value does not pickle: find it below
    outcomes = portable_outcomes(as_outcomes(result), dumps, where, start)
    return dumps((MIXED, outcomes, span))


def pack_error(kind: int, exc: BaseException, dumps: Callable[[Any], bytes]) -> bytes:
    """A ``NOLOAD`` or ``FATAL`` message: none of the task's items ran, because of ``exc``."""
    return dumps((kind, error_payload(exc)))


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
                f"({describe_error(exc)}); the {what} was {safe_repr(out.value)}"
            )
            checked.append(failure_outcome(pickle.PicklingError(msg), out.attempts))
    return checked


# --------------------------------------------------------------------------- parent side


class Refused(NamedTuple):
    """The worker ran none of a task's items: they (``NOLOAD``) or the function (``FATAL``)
    did not load there."""

    kind: int
    error: ErrorText


class TimedOut(NamedTuple):
    """Item ``offset`` of a task ran past its timeout; ``done`` are the outcomes of the
    items before it (the items after it never ran)."""

    offset: int
    done: list[Outcome]


def load_results(blob: bytes, task: Task, where: str) -> list[Outcome] | OkValues | Refused:
    """The outcomes of ``task`` from the worker's message (``where`` names the worker)."""
    got = load_message(blob, task, where)
    if isinstance(got, TimedOut):  # only a worker with a watchdog sends one
        msg = f"unexpected TIMEOUT message from {where} for items {task.start}.."
        raise RuntimeError(msg)
    return got


def load_message(
    blob: bytes, task: Task, where: str
) -> list[Outcome] | OkValues | Refused | TimedOut:
    """``load_results``, and a ``TimedOut`` for a ``TIMEOUT`` message (processes backend).

    When and where the chunk ran, if the message says, is stamped for the executor's
    timeline (``amorsize._timeline.stamp``)."""
    try:
        kind, payload, *span = pickle.loads(blob)
    except Exception as exc:
        # A value that pickled in the worker but does not load here fails alone; only this
        # path pays for finding it.
        return reload_outcomes(blob, task, exc, where, _entries)
    if span and span[0] is not None:
        stamp(task, *span[0])
    if kind == OK:
        return OkValues(payload)
    if kind == MIXED:
        return cast("list[Outcome]", payload)
    if kind == TIMEOUT:
        return TimedOut(*payload)
    return Refused(kind, payload)


def _entries(message: Any) -> list[tuple[Any, Outcome]]:
    """A reloaded message's items for ``reload_outcomes``: (what to check, its outcome)."""
    kind, payload = message[:2]
    if kind == OK:
        return [(v, Outcome(True, v)) for v in payload]
    if kind == MIXED:
        return [(o, o) for o in payload]
    return []


def singles(task: Task) -> list[Task]:
    """``task`` as one task per item: re-sent so that an item that does not travel fails
    alone (its neighbours run)."""
    return [Task(task.start + i, [item]) for i, item in enumerate(task.items)]


def not_sent(task: Task, exc: Exception, to: str) -> list[Outcome]:
    """The failure of a single-item ``task`` whose item does not pickle (it never ran)."""
    msg = (
        f"item {task.start} cannot be pickled to send it to {to} ({describe_error(exc)}); "
        "use backend='threads' for unpicklable items"
    )
    err = pickle.PicklingError(msg)
    err.__cause__ = exc
    return [Outcome(False, err, 0)]


def not_loaded(task: Task, error: ErrorText, where: str, fix: str) -> list[Outcome]:
    """The failure of a single-item ``task`` whose item did not load ``where`` (never ran)."""
    name, text, tb = error
    msg = f"item {task.start} cannot be unpickled {where} ({name}: {text}); {fix}"
    err = pickle.UnpicklingError(msg)
    err.__cause__ = RemoteTraceback(tb)
    return [Outcome(False, err, 0)]


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
        f"calling process ({describe_error(stand_in.error)}); it was {stand_in.what}. Return "
        f"objects that load from what they pickle (an exception class whose __init__ takes "
        f"other arguments than its .args needs a __reduce__), or plain data"
    )
    err = pickle.UnpicklingError(msg)
    err.__cause__ = stand_in.error
    return Outcome(False, err, attempts)
