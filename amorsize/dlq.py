"""Dead-letter queue: items that failed for good are recorded, and the run goes on.

``execute(..., dead_letter="failed.db")`` (or a :class:`DeadLetterQueue`) records each item
whose failure is final (after any retries): its index, the pickled item, the exception's
type, message and traceback (the worker's), the attempts and a timestamp. The run treats the
failure as handled, even with ``on_error="raise"``. Later, :meth:`DeadLetterQueue.replay`
runs the entries again and removes those that now succeed.

Data flow::

    worker: func(item) raises ──▶ parent: on_failure(i, item, exc, attempts)
                                   └─▶ INSERT one row, committed at once ──▶ failed.db
    DeadLetterQueue(path).replay(func) ─▶ execute(func, items, on_error="collect")
                                   ├─ succeeded: rows deleted
                                   └─ failed again: rows updated (attempts, error, time)

An item that cannot be pickled is stored as its ``repr`` with ``item_pickled=False``: the
run never fails because of the queue, but such entries cannot be replayed.

Security. The file holds pickles, and loading one (``entries()``, ``replay()``) can run
arbitrary code: trust a dead-letter file like code. New files get permissions 0o600.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import sqlite3
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from amorsize._observers import RunObserver
from amorsize.checkpoint import StoreError, open_database

__all__ = [
    "DeadLetter",
    "DeadLetterError",
    "DeadLetterQueue",
    "DeadLetterWarning",
    "ReplayResult",
    "dead_letter_observer",
]

_FORMAT = "amorsize-dead-letter"
_VERSION = "1"  # of the file format; a file in another version is refused, never misread
_PROTOCOL = 5
_REPR_LIMIT = 2000  # characters of an item's repr kept when it cannot be pickled

_DLQ_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    idx INTEGER NOT NULL,
    item BLOB,                       -- pickle of the item, NULL when it cannot be pickled
    item_repr TEXT NOT NULL,
    item_pickled INTEGER NOT NULL,
    exc_type TEXT NOT NULL,          -- module.qualname of the exception class
    message TEXT NOT NULL,
    traceback TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    timestamp REAL NOT NULL,         -- seconds since the epoch (UTC)
    func TEXT NOT NULL               -- module.qualname of the function that failed
);
"""
_COLUMNS = (
    "id, idx, item, item_repr, item_pickled, exc_type, message, traceback, attempts,"
    " timestamp, func"
)


class DeadLetterError(StoreError):
    """The dead-letter file cannot be used (not a database, another kind of file, damaged)."""


class DeadLetterWarning(UserWarning):
    """A failure could not be written to the dead-letter queue (it is handled as usual)."""


@dataclass(frozen=True)
class DeadLetter:
    """One recorded failure. ``item`` is the unpickled item, or its repr when
    ``item_pickled`` is False."""

    id: int
    index: int
    item: Any
    item_repr: str
    item_pickled: bool
    exc_type: str
    message: str
    traceback: str
    attempts: int
    timestamp: float
    func: str

    @property
    def when(self) -> datetime.datetime:
        """``timestamp`` as an aware UTC datetime."""
        return datetime.datetime.fromtimestamp(self.timestamp, datetime.timezone.utc)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``item`` is kept when JSON can hold it, else None (see
        ``item_repr``)."""
        try:
            json.dumps(self.item)
            item = self.item if self.item_pickled else None
        except (TypeError, ValueError):
            item = None
        return {
            "id": self.id,
            "index": self.index,
            "item": item,
            "item_repr": self.item_repr,
            "item_pickled": self.item_pickled,
            "exc_type": self.exc_type,
            "message": self.message,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "timestamp": self.when.isoformat(),
            "func": self.func,
        }


@dataclass
class ReplayResult:
    """What :meth:`DeadLetterQueue.replay` did: ``succeeded`` pairs each removed entry with
    its new result; ``failed`` entries failed again (updated in place); ``skipped`` entries
    hold only a repr and cannot be replayed."""

    succeeded: list[tuple[DeadLetter, Any]] = field(default_factory=list)
    failed: list[DeadLetter] = field(default_factory=list)
    skipped: list[DeadLetter] = field(default_factory=list)


def _qualified(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{module}.{name}" if module and module != "builtins" else str(name)


def _safe_repr(item: Any) -> str:
    try:
        text = repr(item)
    except Exception as exc:
        text = f"<{type(item).__qualname__} whose repr raised {type(exc).__name__}>"
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _exception_text(exc: BaseException) -> tuple[str, str, str]:
    try:
        message = str(exc)
    except Exception:
        message = f"<{type(exc).__name__} whose str() raised>"
    # Failures from workers carry the worker's formatted traceback as their __cause__
    # (amorsize.backends.base.RemoteTraceback); it is the one worth keeping.
    remote = getattr(exc.__cause__, "tb", None)
    if isinstance(remote, str):
        tb = remote
    else:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return _qualified(type(exc)), message, tb


class DeadLetterQueue:
    """An SQLite file of failed items: record, list, count, export, replay.

    >>> import tempfile, os
    >>> dlq = DeadLetterQueue(os.path.join(tempfile.mkdtemp(), "failed.db"))
    >>> from amorsize import execute
    >>> execute(lambda x: 1 // x, [1, 0, 2], dead_letter=dlq, backend="serial")  # doctest: +ELLIPSIS
    [1, ItemFailure(...), 0]
    >>> len(dlq), dlq.entries()[0].exc_type
    (1, 'ZeroDivisionError')
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            msg = f"dead-letter path must be a str or os.PathLike, got {type(path).__name__}"  # type: ignore[unreachable]
            raise TypeError(msg)
        self.path = Path(path)
        # Opening validates the file at once: a foreign or damaged file is reported here.
        self._connect().close()

    def __repr__(self) -> str:
        return f"DeadLetterQueue({os.fspath(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        return open_database(self.path, _FORMAT, _DLQ_SCHEMA, version=_VERSION, error=DeadLetterError)

    # --- writing ----------------------------------------------------------------------------
    def record(
        self,
        index: int,
        item: Any,
        exc: BaseException,
        attempts: int = 1,
        func: Callable[..., Any] | str = "",
        *,
        conn: sqlite3.Connection | None = None,
    ) -> int:
        """Record one failure; returns the new entry's id. Never fails on the item."""
        try:
            blob: bytes | None = pickle.dumps(item, _PROTOCOL)
        except Exception:
            blob = None
        exc_type, message, tb = _exception_text(exc)
        row = (
            int(index),
            blob,
            _safe_repr(item),
            int(blob is not None),
            exc_type,
            message,
            tb,
            int(attempts),
            time.time(),
            func if isinstance(func, str) else _qualified(func),
        )
        own = conn is None
        c = self._connect() if conn is None else conn
        try:
            cur = c.execute(
                "INSERT INTO dead_letters (idx, item, item_repr, item_pickled, exc_type,"
                " message, traceback, attempts, timestamp, func) VALUES (?,?,?,?,?,?,?,?,?,?)",
                row,
            )
            return int(cur.lastrowid or 0)
        finally:
            if own:
                c.close()

    def remove(self, ids: Sequence[int]) -> int:
        """Delete the entries with these ids; returns how many were deleted."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids])
            conn.execute("COMMIT")
            return cur.rowcount
        finally:
            conn.close()

    def clear(self) -> int:
        """Delete every entry; returns how many there were."""
        conn = self._connect()
        try:
            return conn.execute("DELETE FROM dead_letters").rowcount
        finally:
            conn.close()

    # --- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.count()

    def count(self) -> int:
        """How many entries the queue holds."""
        conn = self._connect()
        try:
            return int(conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])
        finally:
            conn.close()

    def entries(self, limit: int | None = None) -> list[DeadLetter]:
        """The entries, oldest first (unpickles items: trust the file)."""
        return list(self._iter(limit))

    def __iter__(self) -> Iterator[DeadLetter]:
        return self._iter(None)

    def _iter(self, limit: int | None) -> Iterator[DeadLetter]:
        conn = self._connect()
        try:
            sql = f"SELECT {_COLUMNS} FROM dead_letters ORDER BY id"
            rows = conn.execute(sql + " LIMIT ?", (limit,)) if limit is not None else conn.execute(sql)
            for row in rows.fetchall():
                yield _entry(row)
        finally:
            conn.close()

    def export_jsonl(self, dest: str | os.PathLike[str] | IO[str]) -> int:
        """Write one JSON object per entry to ``dest`` (a path or a text file); returns
        how many were written. See :meth:`DeadLetter.to_json` for the fields."""
        if isinstance(dest, (str, os.PathLike)):
            fd = os.open(os.fspath(dest), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w", encoding="utf-8") as fh:
                return self.export_jsonl(fh)
        n = 0
        for entry in self:
            dest.write(json.dumps(entry.to_json(), ensure_ascii=False) + "\n")
            n += 1
        return n

    # --- replay -----------------------------------------------------------------------------
    def replay(self, func: Callable[[Any], Any], **execute_kwargs: Any) -> ReplayResult:
        """Run every replayable entry through ``amorsize.execute(func, items, ...)``.

        Entries that now succeed are removed; those that fail again are updated (attempts
        added, new error and time). ``execute_kwargs`` go to ``execute`` (``retry=``,
        ``n_jobs=``, ``backend=`` ...); ``on_error`` is always ``"collect"``.

        >>> import tempfile, os
        >>> dlq = DeadLetterQueue(os.path.join(tempfile.mkdtemp(), "failed.db"))
        >>> _ = dlq.record(0, 4, ValueError("flaky"))
        >>> [result for _, result in dlq.replay(lambda x: x * 10).succeeded], len(dlq)
        ([40], 0)
        """
        from amorsize.executor import ItemFailure, execute

        for bad in ("on_error", "dead_letter", "checkpoint"):
            if bad in execute_kwargs:
                msg = f"replay() does not take {bad}=: it always collects failures itself"
                raise TypeError(msg)
        report = ReplayResult()
        todo: list[DeadLetter] = []
        for entry in self.entries():
            (todo if entry.item_pickled else report.skipped).append(entry)
        if not todo:
            return report
        results = execute(func, [e.item for e in todo], on_error="collect", **execute_kwargs)
        done: list[int] = []
        updates: list[tuple[Any, ...]] = []
        for entry, value in zip(todo, results, strict=True):
            if isinstance(value, ItemFailure):
                exc_type, message, tb = _exception_text(value.exception)
                updates.append(
                    (exc_type, message, tb, entry.attempts + value.attempts, time.time(), entry.id)
                )
                report.failed.append(entry)
            else:
                done.append(entry.id)
                report.succeeded.append((entry, value))
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in done])
            conn.executemany(
                "UPDATE dead_letters SET exc_type=?, message=?, traceback=?, attempts=?,"
                " timestamp=? WHERE id=?",
                updates,
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        return report


def _entry(row: tuple[Any, ...]) -> DeadLetter:
    (id_, idx, blob, item_repr, pickled, exc_type, message, tb, attempts, ts, func) = row
    item: Any = item_repr
    if pickled:
        try:
            item = pickle.loads(blob)
        except Exception as exc:
            msg = (
                f"dead-letter entry {id_}: the item cannot be unpickled"
                f" ({type(exc).__name__}: {exc}); its class may no longer import"
            )
            raise DeadLetterError(msg) from exc
    return DeadLetter(
        id_, idx, item, item_repr, bool(pickled), exc_type, message, tb, attempts, ts, func
    )


class DeadLetterObserver(RunObserver):
    """Records each final failure of an ``execute`` run; the run goes on."""

    def __init__(self, queue: DeadLetterQueue) -> None:
        self.queue = queue
        self.conn: sqlite3.Connection | None = None
        self.func = ""
        self.recorded = 0

    def begin(self, func: Callable[[Any], Any]) -> None:
        """Open the queue's file for the run."""
        self.func = _qualified(func)
        self.conn = self.queue._connect()

    def on_failure(self, index: int, item: Any, exc: BaseException, attempts: int) -> bool:
        """Record the failure (committed at once); True unless the file cannot be written."""
        try:
            self.queue.record(index, item, exc, attempts, self.func, conn=self.conn)
        except (sqlite3.Error, OSError, StoreError) as err:
            warnings.warn(
                f"dead-letter queue {os.fspath(self.queue.path)!r}: item {index} could not be"
                f" recorded ({type(err).__name__}: {err}); its failure is handled as if there"
                " were no queue",
                DeadLetterWarning,
                stacklevel=3,
            )
            return False
        self.recorded += 1
        return True

    def end(self, completed: bool) -> None:
        """Close the file."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def dead_letter_observer(dead_letter: DeadLetterQueue | str | os.PathLike[str]) -> DeadLetterObserver:
    """Build the ``execute`` observer for ``dead_letter=`` (a path or a ``DeadLetterQueue``)."""
    if isinstance(dead_letter, (str, os.PathLike)):
        dead_letter = DeadLetterQueue(dead_letter)
    if not isinstance(dead_letter, DeadLetterQueue):
        msg = (  # type: ignore[unreachable]
            "dead_letter must be a path (str or os.PathLike) or a DeadLetterQueue,"
            f" got {dead_letter!r} ({type(dead_letter).__name__})"
        )
        raise TypeError(msg)
    return DeadLetterObserver(dead_letter)
