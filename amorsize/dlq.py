"""Dead-letter queue: items that failed for good are recorded, and the run goes on.

``execute(..., dead_letter="failed.db")`` (or a :class:`DeadLetterQueue`) records each item
whose failure is final (after any retries): its index, the pickled item, a safe text form of
it (its ``repr``, and the item itself as JSON when JSON holds it exactly), the exception's
type, message and traceback (the worker's), the attempts and a timestamp. The run treats the
failure as handled, even with ``on_error="raise"``. Later, :meth:`DeadLetterQueue.replay`
runs the entries again and removes those that now succeed.

One entry per failure, not per attempt to run it: an entry is keyed by the function's
qualified name, the input index and a digest of the item's pickle (of its ``repr`` when it
cannot be pickled). Recording the same failure again (rerunning a command, resuming from a
checkpoint) updates that entry: attempts are added, the error and the time are the latest.

Data flow::

    worker: func(item) raises ──▶ parent: on_failure(i, item, exc, attempts)
                                   └─▶ UPSERT one row, committed at once ──▶ failed.db
    DeadLetterQueue(path).replay(func, execute=amorsize.execute) ─▶ verify each signature
                                   ─▶ unpickle the items ─▶ execute(func, items, on_error="collect")
                                   ├─ succeeded: rows deleted
                                   └─ failed again: rows updated (attempts, error, time)

An item that cannot be pickled is stored as its ``repr`` with ``item_pickled=False``: the
run never fails because of the queue, but such entries cannot be replayed.

Security. Loading a pickle can run arbitrary code. Listing (``entries()``, iteration,
``export_jsonl``, ``amorsize dead-letter FILE``) never unpickles: it shows the text stored
at write time (which a forged file may fake, but cannot make run). Only :meth:`replay` and
:meth:`load_item` unpickle, and only an item whose HMAC-SHA256 signature, made with this
user's secret key (``amorsize._signing``), verifies: a file written by another user or
machine, or crafted or edited by someone without the key, is refused with
:class:`DeadLetterError` unless the caller passes ``trust=True`` (CLI: ``--trust``), which
means "I trust whoever wrote this file like code". New files get permissions 0o600.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
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

from amorsize._format import safe_repr
from amorsize._observers import ItemFailure, RunObserver
from amorsize._store import Seal, StoreError, open_database, write_transaction
from amorsize._validate import fail

__all__ = [
    "DeadLetter",
    "DeadLetterError",
    "DeadLetterQueue",
    "DeadLetterWarning",
    "ReplayResult",
    "dead_letter_observer",
]

_FORMAT = "amorsize-dead-letter"
# Version 2: entries are unique per (function, index, item digest), carry a JSON copy of the
# item and a signature of its pickle. A file in another version is refused, never misread.
_VERSION = "2"
_PROTOCOL = 5
_REPR_LIMIT = 2000  # characters of an item's repr kept for listing
_JSON_LIMIT = 65536  # characters of an item's JSON copy; a larger item is listed by repr only
_SIGNED = b"amorsize dead-letter item v2"  # the domain of the signatures, so none is reused

_DLQ_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    func TEXT NOT NULL,              -- module.qualname of the function that failed
    idx INTEGER NOT NULL,
    item_key TEXT NOT NULL,          -- sha256 of the item's pickle (or of its repr)
    item BLOB,                       -- pickle of the item, NULL when it cannot be pickled
    item_mac BLOB,                   -- HMAC-SHA256 of (func, idx, item) with the user's key
    key_id TEXT,                     -- fingerprint of the key that made item_mac
    item_json TEXT,                  -- the item as JSON when JSON holds it exactly, else NULL
    item_repr TEXT NOT NULL,
    item_pickled INTEGER NOT NULL,
    exc_type TEXT NOT NULL,          -- module.qualname of the exception class
    message TEXT NOT NULL,
    traceback TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    timestamp REAL NOT NULL,         -- seconds since the epoch (UTC), of the latest failure
    UNIQUE (func, idx, item_key)
);
"""
_COLUMNS = (
    "id, idx, item_json, item_repr, item_pickled, exc_type, message, traceback, attempts,"
    " timestamp, func"
)
_UPSERT = """
INSERT INTO dead_letters (func, idx, item_key, item, item_mac, key_id, item_json, item_repr,
    item_pickled, exc_type, message, traceback, attempts, timestamp)
VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT (func, idx, item_key) DO UPDATE SET
    exc_type = excluded.exc_type, message = excluded.message, traceback = excluded.traceback,
    attempts = attempts + excluded.attempts, timestamp = excluded.timestamp,
    item = excluded.item, item_mac = excluded.item_mac, key_id = excluded.key_id,
    item_json = excluded.item_json, item_repr = excluded.item_repr
"""


class DeadLetterError(StoreError):
    """The dead-letter file cannot be used (not a database, another kind of file, damaged),
    or an item in it cannot be loaded (unsigned, signed by another key, damaged)."""


class DeadLetterWarning(UserWarning):
    """A failure could not be written to the dead-letter queue (it is handled as usual)."""


@dataclass(frozen=True)
class DeadLetter:
    """One recorded failure, as listed: nothing in it was unpickled.

    ``item`` is the item itself when it was plain JSON data (numbers, strings, lists,
    dicts with string keys ...; ``item_json`` is then True), else None: see ``item_repr``,
    and :meth:`DeadLetterQueue.load_item` for the original object. ``timestamp`` and
    ``attempts`` are those of the latest failure and of all recorded failures.
    """

    id: int
    index: int
    item: Any
    item_json: bool
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
        """A JSON-ready dict: ``item`` is None unless the item was plain JSON data (see
        ``item_repr``)."""
        return {
            "id": self.id,
            "index": self.index,
            "item": self.item,
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
    its new result; ``failed`` entries failed again (updated in place; listed here with the
    new error); ``skipped`` entries hold only a repr and cannot be replayed."""

    succeeded: list[tuple[DeadLetter, Any]] = field(default_factory=list)
    failed: list[DeadLetter] = field(default_factory=list)
    skipped: list[DeadLetter] = field(default_factory=list)


def _qualified(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{module}.{name}" if module and module != "builtins" else str(name)


def _exact_json(item: Any) -> str | None:
    """``item`` as JSON text when decoding it gives back an equal item of the same type."""
    try:
        text = json.dumps(item, allow_nan=False, ensure_ascii=False)
        if len(text) > _JSON_LIMIT:
            return None
        back = json.loads(text)
    except Exception:  # not JSON data, too deep, an int too long for str() ...
        return None
    try:
        same = type(back) is type(item) and bool(back == item)
    except Exception:  # an __eq__ that raises
        return None
    return text if same else None


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


def _signed_parts(func: str, index: int, blob: bytes) -> tuple[bytes, ...]:
    return (_SIGNED, func.encode("utf-8", "surrogatepass"), str(index).encode(), blob)


class DeadLetterQueue:
    """An SQLite file of failed items: record, list, count, export, replay.

    Listing never unpickles; :meth:`replay` and :meth:`load_item` load only items signed
    with this user's key, unless ``trust=True`` (see the module's "Security").

    >>> import tempfile, os
    >>> dlq = DeadLetterQueue(os.path.join(tempfile.mkdtemp(), "failed.db"))
    >>> from amorsize import execute
    >>> execute(lambda x: 1 // x, [1, 0, 2], dead_letter=dlq, backend="serial")  # doctest: +ELLIPSIS
    [1, ItemFailure(...), 0]
    >>> len(dlq), dlq.entries()[0].exc_type
    (1, 'ZeroDivisionError')
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        given: object = path
        if not isinstance(given, (str, os.PathLike)):
            fail(TypeError, "DeadLetterQueue: ", "path", "a str or os.PathLike", given)
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
        """Record one failure, or update the entry of the same function, index and item
        (attempts added, latest error and time); returns the entry's id. Never fails on
        the item."""
        try:
            blob: bytes | None = pickle.dumps(item, _PROTOCOL)
        except Exception:
            blob = None
        item_repr = safe_repr(item, _REPR_LIMIT)
        name = func if isinstance(func, str) else _qualified(func)
        item_key = hashlib.sha256(blob if blob is not None else item_repr.encode()).hexdigest()
        mac: bytes | None = None
        key_id: str | None = None
        if blob is not None:
            seal = self._seal(trust=False)
            mac, key_id = seal.sign_row(*_signed_parts(name, int(index), blob)), seal.key.key_id
        exc_type, message, tb = _exception_text(exc)
        row = (
            name, int(index), item_key, blob, mac, key_id, _exact_json(item), item_repr,
            int(blob is not None), exc_type, message, tb, int(attempts), time.time(),
        )  # fmt: skip
        c = self._connect() if conn is None else conn
        try:
            c.execute(_UPSERT, row)
            found = c.execute(
                "SELECT id FROM dead_letters WHERE func = ? AND idx = ? AND item_key = ?",
                (name, int(index), item_key),
            ).fetchone()
            return int(found[0]) if found else 0
        finally:
            if conn is None:
                c.close()

    def remove(self, ids: Sequence[int]) -> int:
        """Delete the entries with these ids; returns how many were deleted."""
        conn = self._connect()
        try:
            with write_transaction(conn):
                cur = conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids])
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

    # --- reading (never unpickles) ----------------------------------------------------------
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
        """The entries, oldest first. Nothing is unpickled (see :meth:`load_item`)."""
        return list(self._iter(limit))

    def __iter__(self) -> Iterator[DeadLetter]:
        return self._iter(None)

    def _iter(self, limit: int | None) -> Iterator[DeadLetter]:
        conn = self._connect()
        try:
            sql = f"SELECT {_COLUMNS} FROM dead_letters ORDER BY id"
            rows = conn.execute(sql + " LIMIT ?", (limit,)) if limit is not None else conn.execute(sql)
            for row in rows.fetchall():
                yield _entry(self.path, row)
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

    # --- loading pickles (verified) ---------------------------------------------------------
    def load_item(self, entry: DeadLetter | int, *, trust: bool = False) -> Any:
        """The original item of ``entry`` (a :class:`DeadLetter` or its id), unpickled.

        Raises :class:`DeadLetterError` if the item was not signed with this user's key
        (another user's or machine's file, a crafted or edited one) unless ``trust=True``,
        if it is damaged, or if the entry holds only a repr.
        """
        id_ = entry.id if isinstance(entry, DeadLetter) else int(entry)
        items = self._load_items([id_], trust)
        if id_ not in items:
            msg = f"dead-letter file {os.fspath(self.path)!r} has no entry #{id_}"
            raise DeadLetterError(msg)
        return items[id_]

    def _load_items(self, ids: Sequence[int], trust: bool) -> dict[int, Any]:
        """``{id: item}`` for the entries that still exist: every signature is checked
        before anything is unpickled."""
        conn = self._connect()
        try:
            rows = [
                r
                for i in ids
                for r in conn.execute(
                    "SELECT id, func, idx, item, item_mac, key_id, item_pickled"
                    " FROM dead_letters WHERE id = ?",
                    (i,),
                ).fetchall()
            ]
        finally:
            conn.close()
        for row in rows:
            self._verify(row, trust)
        return {row[0]: self._unpickle(row[0], row[3]) for row in rows}

    def _verify(self, row: tuple[Any, ...], trust: bool) -> None:
        id_, func, idx, blob, mac, key_id, pickled = row
        block = f"entry #{id_}"
        if not pickled or not isinstance(blob, bytes):
            msg = (
                f"dead-letter file {os.fspath(self.path)!r}, {block}: the item was stored as"
                " its repr only (it could not be pickled)"
            )
            raise DeadLetterError(msg)
        if trust:
            return
        seal = self._seal(trust=False)
        if not (isinstance(func, str) and type(idx) is int):
            raise seal.damaged(block, "has a function name or index of the wrong type")
        seal.check_row(block, key_id, mac, *_signed_parts(func, idx, blob))

    def _seal(self, *, trust: bool) -> Seal:
        """Signs and checks entries with this user's key (rows are signed one by one)."""
        return Seal(
            os.fspath(self.path), "dead-letter file", b"", "", trust=trust,
            trust_hint="pass trust=True (CLI: --trust)", error=DeadLetterError,
        )  # fmt: skip

    def _unpickle(self, id_: int, blob: bytes) -> Any:
        try:
            return pickle.loads(blob)
        except Exception as exc:
            msg = (
                f"dead-letter file {os.fspath(self.path)!r}, entry #{id_}: the item cannot be"
                f" unpickled ({type(exc).__name__}: {exc}); the file is damaged, or the"
                " item's class no longer imports"
            )
            raise DeadLetterError(msg) from exc

    # --- replay -----------------------------------------------------------------------------
    def replay(
        self,
        func: Callable[[Any], Any],
        *,
        execute: Callable[..., list[Any]],
        trust: bool = False,
        **execute_kwargs: Any,
    ) -> ReplayResult:
        """Run every replayable entry through ``execute(func, items, ...)``.

        ``execute`` is ``amorsize.execute`` (or a wrapper of it taking the same keywords): the
        queue sits below the executor and does not import it. Every item's signature is
        checked first (nothing runs if one fails; ``trust=True`` skips the check, see
        :meth:`load_item`). Entries that now succeed are removed; those that fail again are
        updated (attempts added, new error and time). ``execute_kwargs`` go to ``execute``
        (``retry=``, ``n_jobs=``, ``backend=`` ...); ``on_error`` is always ``"collect"``.

        >>> import tempfile, os
        >>> from amorsize import execute
        >>> dlq = DeadLetterQueue(os.path.join(tempfile.mkdtemp(), "failed.db"))
        >>> _ = dlq.record(0, 4, ValueError("flaky"))
        >>> report = dlq.replay(lambda x: x * 10, execute=execute)
        >>> [result for _, result in report.succeeded], len(dlq)
        ([40], 0)
        """
        for bad in ("on_error", "dead_letter", "checkpoint"):
            if bad in execute_kwargs:
                msg = f"replay() does not take {bad}=: it always collects failures itself"
                raise TypeError(msg)
        report = ReplayResult()
        todo: list[DeadLetter] = []
        for entry in self.entries():
            (todo if entry.item_pickled else report.skipped).append(entry)
        items = self._load_items([e.id for e in todo], trust) if todo else {}
        todo = [e for e in todo if e.id in items]  # another replay may have removed some
        if not todo:
            return report
        results = execute(func, [items[e.id] for e in todo], on_error="collect", **execute_kwargs)
        done: list[int] = []
        updates: list[tuple[Any, ...]] = []
        for entry, value in zip(todo, results, strict=True):
            if isinstance(value, ItemFailure):
                exc_type, message, tb = _exception_text(value.exception)
                now = dataclasses.replace(
                    entry, exc_type=exc_type, message=message, traceback=tb,
                    attempts=entry.attempts + value.attempts, timestamp=time.time(),
                )  # fmt: skip
                updates.append((exc_type, message, tb, now.attempts, now.timestamp, entry.id))
                report.failed.append(now)
            else:
                done.append(entry.id)
                report.succeeded.append((entry, value))
        self._apply(done, updates)
        return report

    def _apply(self, done: list[int], updates: list[tuple[Any, ...]]) -> None:
        conn = self._connect()
        try:
            with write_transaction(conn):
                conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in done])
                conn.executemany(
                    "UPDATE dead_letters SET exc_type=?, message=?, traceback=?, attempts=?,"
                    " timestamp=? WHERE id=?",
                    updates,
                )
        finally:
            conn.close()


# Latest time an entry may carry (year ~2286): a forged one beyond it is refused when listed.
_MAX_TIMESTAMP = 1e10


def _entry(path: Path, row: tuple[Any, ...]) -> DeadLetter:
    """A listed entry, its columns checked: a forged file gets a DeadLetterError, never a
    TypeError or OverflowError later. Nothing is unpickled."""
    (id_, idx, item_json, item_repr, pickled, exc_type, message, tb, attempts, ts, func) = row
    texts = (item_repr, exc_type, message, tb, func)
    ok = (
        all(type(v) is int for v in (id_, idx, pickled, attempts))
        and all(isinstance(t, str) for t in texts)
        and (item_json is None or isinstance(item_json, str))
        and isinstance(ts, (int, float))
        and 0 <= ts <= _MAX_TIMESTAMP
    )
    if not ok:
        msg = (
            f"dead-letter file {os.fspath(path)!r}, entry #{id_!r:.20}: a column holds a value"
            " of the wrong type or out of range; the file is damaged or was not written by"
            " amorsize. Move it away or delete that entry."
        )
        raise DeadLetterError(msg)
    item: Any = None
    if item_json is not None:
        try:
            item = json.loads(item_json)
        except Exception:  # damaged or forged: list it by its repr
            item_json = None
    return DeadLetter(
        id_, idx, item, item_json is not None, item_repr, bool(pickled), exc_type, message, tb,
        attempts, float(ts), func,
    )  # fmt: skip


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
