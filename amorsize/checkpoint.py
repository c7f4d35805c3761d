"""Checkpoint/resume: ``execute(..., checkpoint="run.db")`` survives a crash of the whole run.

Each completed item's result is recorded in an SQLite database; running the same call again
skips the items already done and returns the full result list. The guarantee is
**at-least-once execution, exactly-once results**: an item may run again after a crash (its
result was computed but not yet committed), but every index gets exactly one result, and
a resumed run returns the same list as an uninterrupted one.

Data flow (everything here runs in the parent, in the thread that called ``execute``)::

    known(i, item) ── hash(pickle(item)) ──▶ stored index? ─ yes ─▶ same hash? ─▶ stored result
                                              │                    └─ no ─▶ CheckpointMismatchError
                                              └ no ─▶ item is run by a worker
    on_success(i, item, result) ──▶ batch in memory ── every COMMIT_EVERY_ITEMS results or
                                                       COMMIT_EVERY_SECONDS ──▶ one transaction
    end() ──▶ last batch committed, file closed

Storage. One row per committed batch holds the batch's input indices (as ``(start, count)``
runs: a chunk is one run), the item hashes (packed uint64, computed by the compiled
``_core.pack_item_hashes``) and the results (one pickle per batch). The whole batched store
costs about 0.13 µs per item, hashing included; one SQLite row per item would cost 1.8 µs
(measured by ``benchmarks/bench_checkpoint.py``). Indices, not positions in the file, are
the key: a result belongs to the item at index ``i`` whose hash matches the stored one, and
a run header records the function's identity and the input length.

Durability. WAL journal with ``synchronous=NORMAL`` by default: a committed batch survives
a crash or ``SIGKILL`` of the process (it is in the WAL, handed to the OS), and the file is
never corrupted; only a power loss or OS crash may lose the last batches committed before
it, which are then simply run again. ``synchronous="FULL"`` also survives power loss, at the
cost of an ``fsync`` per batch.

Security. The file holds pickles, and loading a pickle can run arbitrary code: trust a
checkpoint file like code. New files are created with owner-only permissions (0o600).
"""

from __future__ import annotations

import array
import datetime
import hashlib
import inspect
import os
import pickle
import sqlite3
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence, Sized
from pathlib import Path
from types import CodeType
from typing import Any, Literal

from amorsize._core import pack_item_hashes
from amorsize._observers import RunObserver

__all__ = [
    "COMMIT_EVERY_ITEMS",
    "COMMIT_EVERY_SECONDS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWarning",
    "StoreError",
    "checkpoint_observer",
]

#: Results per committed batch. At 1000 a batch costs ~0.02 µs per item of pickling and one
#: small transaction; smaller batches lose less on a crash but cost more per item
#: (measured by benchmarks/bench_checkpoint.py).
COMMIT_EVERY_ITEMS = 1000
#: A partial batch is committed once it is this old, so slow items are saved promptly: a
#: crash loses at most about this many seconds of finished work.
COMMIT_EVERY_SECONDS = 1.0
#: How long a writer waits for another process holding the database lock before failing.
BUSY_TIMEOUT_SECONDS = 30.0

_FORMAT = "amorsize-checkpoint"
# Version 2 stores each batch's input indices as (start, count) runs (version 1: one int64
# per item); a file in another version is refused, never misread.
_VERSION = "2"
# How item hashes are made; recorded so that a future change is detected, not misread.
_HASH_SCHEME = "int31|crc32+adler32(pickle protocol 5), v3"
# Ints in [-2**30, 2**30) hash to themselves, shifted and tagged odd: one-digit arithmetic
# for CPython, several times cheaper than pickling (larger ints take the pickle path).
_INT_LIMIT = 1 << 30
_INT_LOW = -_INT_LIMIT
_EVEN_MASK = (1 << 64) - 2
_PROTOCOL = 5
_CHECK_CLOCK_EVERY = 64  # results between two clock reads for the time-based commit
_UNSEEN: Any = object()  # an index known() was not asked about (hash it now)

_CHECKPOINT_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoint_batches (
    id INTEGER PRIMARY KEY,
    n INTEGER NOT NULL,
    runs BLOB NOT NULL,      -- int64 little-endian (start, count) pairs: the input indices
    hashes BLOB NOT NULL,    -- uint64 little-endian item hashes, one per result, same order
    results BLOB NOT NULL    -- pickle of the list of results, same order
);
"""


class StoreError(Exception):
    """An amorsize database file (checkpoint, dead-letter queue) cannot be used: it is not a
    database, belongs to something else, or is damaged. The file is left unchanged."""


class CheckpointError(StoreError):
    """The checkpoint file cannot be used (not a database, not a checkpoint, unreadable)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another function or other input data."""


class CheckpointWarning(UserWarning):
    """An item or result could not be checkpointed (it will be run again on resume)."""


# --- the SQLite file, shared with the dead-letter queue --------------------------------------
def open_database(
    path: str | os.PathLike[str],
    kind: str,
    schema: str,
    *,
    version: str,
    synchronous: str = "NORMAL",
    error: type[StoreError] = StoreError,
) -> sqlite3.Connection:
    """Open (or create, mode 0o600) the amorsize database of type ``kind`` at ``path``.

    An existing file is only read until it is known to be an amorsize database of this
    ``kind`` and format ``version``; anything else (not SQLite, corrupted, another
    application's, another kind's or another format version's database) raises ``error``
    (a ``StoreError``) and leaves the file untouched.
    """
    where = os.fspath(path)
    if os.path.isdir(where):
        msg = f"{where!r} is a directory; pass the path of a database file to create or reuse"
        raise error(msg)
    try:
        fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    try:
        conn = sqlite3.connect(
            where, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        msg = f"cannot open {where!r} as an SQLite database: {exc}"
        raise error(msg) from exc
    # SQLite's busy handler does not cover every lock taken on first open (switching to WAL,
    # upgrading a read to a write), so writers that open a new file together can see
    # "database is locked" at once: retry within the same busy timeout.
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    pause = 0.001
    while True:
        try:
            _check_or_init(conn, where, kind, version, schema, synchronous, error)
            return conn
        except error as exc:
            locked = "locked" in str(exc.__cause__) or "busy" in str(exc.__cause__)
            if not locked or time.monotonic() + pause > deadline:
                conn.close()
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        except BaseException:
            conn.close()
            raise


def _check_or_init(
    conn: sqlite3.Connection,
    where: str,
    kind: str,
    version: str,
    schema: str,
    synchronous: str,
    error: type[StoreError],
) -> None:
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        meta: dict[str, str] = {}
        if "amorsize_meta" in tables:
            meta = dict(
                conn.execute(
                    "SELECT key, value FROM amorsize_meta WHERE key IN ('format', 'version')"
                ).fetchall()
            )
        meta_kind = meta.get("format")
    except sqlite3.DatabaseError as exc:
        msg = (
            f"{where!r} is not a readable SQLite database ({exc}); it was left unchanged."
            f" Pass another path for the {kind}, or move the file away if it is damaged."
        )
        raise error(msg) from exc
    if tables and meta_kind != kind:
        what = f"an {meta_kind!r} file" if meta_kind else "another application's database"
        msg = (
            f"{where!r} is {what}, not an {kind!r} file (tables: {', '.join(sorted(tables))});"
            f" it was left unchanged. Pass another path for the {kind}."
        )
        raise error(msg)
    if tables and meta.get("version") != version:
        msg = (
            f"{where!r} is an {kind!r} file in format version {meta.get('version')!r}, and"
            f" this version of amorsize reads version {version!r}; it was left unchanged."
            " Pass another path, or open the file with the amorsize version that wrote it."
        )
        raise error(msg)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        if not tables:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS amorsize_meta"
                " (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            conn.execute(
                "INSERT OR IGNORE INTO amorsize_meta VALUES ('format', ?), ('version', ?)",
                (kind, version),
            )
            _run_schema(conn, schema)
            conn.execute("COMMIT")
        else:
            _run_schema(conn, schema)
    except sqlite3.DatabaseError as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        msg = f"cannot use {where!r} as an {kind!r} file: {exc}"
        raise error(msg) from exc


def _run_schema(conn: sqlite3.Connection, schema: str) -> None:
    # executescript() would commit the open transaction; run statement by statement instead.
    for statement in schema.split(";"):
        if statement.strip():
            conn.execute(statement)


# --- identities and hashes -------------------------------------------------------------------
def _code_digest(code: CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, CodeType):
            _code_digest(const, h)
        elif isinstance(const, frozenset):
            # Set literals: element order follows string hashing, which varies per process.
            h.update(repr(sorted(map(repr, const))).encode())
        else:
            h.update(repr(const).encode())


def function_identity(func: Callable[..., Any]) -> dict[str, str]:
    """The module, qualified name and code digest that identify ``func`` in a checkpoint.

    Wrappers that set ``__wrapped__`` (``with_retry``, ``with_circuit_breaker``,
    ``functools.wraps``) are looked through.

    >>> function_identity(len)["func_qualname"]
    'len'
    """
    f: Any = inspect.unwrap(func)
    extra = b""
    while hasattr(f, "func") and hasattr(f, "args") and hasattr(f, "keywords"):  # partial
        try:
            extra += pickle.dumps((f.args, sorted(f.keywords.items())), _PROTOCOL)
        except Exception:
            extra += repr((f.args, f.keywords)).encode()
        f = inspect.unwrap(f.func)
    module = getattr(f, "__module__", None) or type(f).__module__
    qualname = getattr(f, "__qualname__", None) or type(f).__qualname__
    code = getattr(f, "__code__", None)
    if code is None:
        # A callable object: its class's __call__ holds the code.
        code = getattr(type(f).__dict__.get("__call__"), "__code__", None)
    digest = ""
    if isinstance(code, CodeType) or extra:
        h = hashlib.sha256(extra)
        if isinstance(code, CodeType):
            _code_digest(code, h)
        digest = h.hexdigest()[:16]
    return {"func_module": str(module), "func_qualname": str(qualname), "func_code": digest}


def item_hash(item: Any) -> int | None:
    """A 64-bit hash of ``item``, stable across processes and runs; None if unpicklable.

    Plain ints (the usual ids and indices) hash to themselves, tagged odd; anything else
    hashes its pickle (CRC-32 and Adler-32 side by side), tagged even, so the two kinds
    never collide.

    >>> item_hash(3) == item_hash(3), item_hash(3) == item_hash(4), item_hash("3") == item_hash(3)
    (True, False, False)
    """
    if type(item) is int and _INT_LOW <= item < _INT_LIMIT:
        return (item + _INT_LIMIT) * 2 + 1
    try:
        data = pickle.dumps(item, _PROTOCOL)
    except Exception:
        return None
    # Never 0: packed hashes use 0 for "no hash" (see _core_checkpoint.pxi).
    return (zlib.crc32(data) << 32 | zlib.adler32(data)) & _EVEN_MASK or 2


def _pack(values: Iterable[int], code: str) -> bytes:
    arr = array.array(code, values)
    if sys.byteorder == "big":  # pragma: no cover - the file format is little-endian
        arr.byteswap()
    return arr.tobytes()


def _unpack(data: bytes, code: str) -> array.array[int]:
    arr = array.array(code)
    arr.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        arr.byteswap()
    return arr


def _expand_runs(runs: Sequence[int]) -> list[int]:
    """The input indices that flat ``[start, count, ...]`` runs stand for, in order."""
    out: list[int] = []
    for j in range(0, len(runs), 2):
        out.extend(range(runs[j], runs[j] + runs[j + 1]))
    return out


def _add_run(runs: list[int], start: int, count: int) -> None:
    """Append indices ``start .. start + count - 1`` to flat ``[start, count, ...]`` runs."""
    if runs and runs[-2] + runs[-1] == start:
        runs[-1] += count
    else:
        runs += (start, count)


def _runs_of(indices: Iterable[int]) -> list[int]:
    """Flat ``[start, count, ...]`` runs of consecutive ``indices`` (the inverse of above)."""
    runs: list[int] = []
    for i in indices:
        _add_run(runs, i, 1)
    return runs


def _hash_list(blob: bytes) -> list[int | None]:
    """Hashes packed by ``pack_item_hashes`` as ints, None for its 0 (no hash)."""
    return [h or None for h in _unpack(blob, "Q")]


# --- the public object -----------------------------------------------------------------------
Synchronous = Literal["NORMAL", "FULL"]


class Checkpoint:
    """A checkpoint file and its options; pass it (or just a path) as ``execute(checkpoint=)``.

    * ``synchronous``: ``"NORMAL"`` (default; survives process crashes, may lose the last
      batches on power loss) or ``"FULL"`` (survives power loss, an fsync per batch).
    * ``check_code``: also refuse to resume when the function's code changed (not only its
      module and name). Turn off to resume after an edit you know keeps results valid, or
      after a Python upgrade (bytecode differs between versions).
    * ``commit_every`` / ``commit_interval``: batch size and age that trigger a commit.

    The file holds pickles: trust it like code. It is created with permissions 0o600.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "run.db")
    >>> from amorsize import execute
    >>> execute(abs, [-1, -2, 3], checkpoint=Checkpoint(path), backend="serial")
    [1, 2, 3]
    >>> Checkpoint(path).results()
    {0: 1, 1: 2, 2: 3}
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        check_code: bool = True,
        commit_every: int = COMMIT_EVERY_ITEMS,
        commit_interval: float = COMMIT_EVERY_SECONDS,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            msg = f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}"  # type: ignore[unreachable]
            raise TypeError(msg)
        if synchronous not in ("NORMAL", "FULL"):
            msg = f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}"
            raise ValueError(msg)
        if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every < 1:
            msg = f"commit_every must be an int >= 1, got {commit_every!r}"
            raise ValueError(msg)
        if not isinstance(commit_interval, (int, float)) or not commit_interval >= 0:
            msg = f"commit_interval must be a number of seconds >= 0, got {commit_interval!r}"
            raise ValueError(msg)
        self.path = Path(path)
        self.synchronous: Synchronous = synchronous
        self.check_code = bool(check_code)
        self.commit_every = commit_every
        self.commit_interval = float(commit_interval)

    def __repr__(self) -> str:
        return f"Checkpoint({os.fspath(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        return open_database(
            self.path,
            _FORMAT,
            _CHECKPOINT_SCHEMA,
            version=_VERSION,
            synchronous=self.synchronous,
            error=CheckpointError,
        )

    def header(self) -> dict[str, str]:
        """The run header: format, function identity, input length, completion, times."""
        conn = self._connect()
        try:
            return dict(conn.execute("SELECT key, value FROM amorsize_meta").fetchall())
        finally:
            conn.close()

    def results(self) -> dict[int, Any]:
        """Every recorded result by input index (loads pickles: trust the file)."""
        conn = self._connect()
        out: dict[int, Any] = {}
        try:
            for runs, blob in conn.execute(
                "SELECT runs, results FROM checkpoint_batches ORDER BY id"
            ):
                for i, value in zip(
                    _expand_runs(_unpack(runs, "q")), pickle.loads(blob), strict=True
                ):
                    out.setdefault(i, value)
        finally:
            conn.close()
        return dict(sorted(out.items()))

    def __len__(self) -> int:
        """How many distinct items have a recorded result."""
        conn = self._connect()
        try:
            seen: set[int] = set()
            for (runs,) in conn.execute("SELECT runs FROM checkpoint_batches"):
                seen.update(_expand_runs(_unpack(runs, "q")))
            return len(seen)
        finally:
            conn.close()


# --- the execute observer --------------------------------------------------------------------
class CheckpointObserver(RunObserver):
    """Answers ``known()`` from the file and records new results in batches."""

    def __init__(self, checkpoint: Checkpoint, func: Callable[..., Any], n_items: int | None):
        self.checkpoint = checkpoint
        self.identity = function_identity(func)
        self.n_items = n_items
        self.conn: sqlite3.Connection | None = None
        # index -> (batch id, position, item hash) of results stored by earlier runs.
        self._where: dict[int, tuple[int, int, int]] = {}
        self._remaining: dict[int, int] = {}
        self._cache: dict[int, list[Any]] = {}
        self._pending: dict[int, int | None] = {}
        # start -> (item count, packed hashes, how many have none) of blocks in flight.
        self._block_hashes: dict[int, tuple[int, bytes, int]] = {}
        # The batch being gathered, in the file's layout so that a block costs a few C-speed
        # appends: the input indices as flat (start, count) runs, the item hashes as packed
        # little-endian uint64, and the results, all in the same order.
        self._runs: list[int] = []
        self._hashes = bytearray()
        self._values: list[Any] = []
        # Results until the next look at the batch size and age (a clock read costs more
        # than the bookkeeping of one result).
        self._countdown = min(_CHECK_CLOCK_EVERY, checkpoint.commit_every)
        self._last_commit = 0.0
        self._failed = 0
        self._warned = False
        self.resumed = 0

    # -- RunObserver -------------------------------------------------------------------------
    def begin(self, func: Callable[[Any], Any]) -> None:
        """Open the file, check or write the run header, index what earlier runs stored."""
        self.conn = conn = self.checkpoint._connect()
        try:
            self._check_header(conn)
            self._load_index(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            self.conn = None
            msg = (
                f"checkpoint {os.fspath(self.checkpoint.path)!r} cannot be read ({exc}); it was"
                " left unchanged. Move the damaged file away or pass another path."
            )
            raise CheckpointError(msg) from exc
        except BaseException:
            conn.close()
            self.conn = None
            raise
        self._last_commit = time.monotonic()

    def known(self, index: int, item: Any) -> tuple[bool, Any]:
        """The stored result for ``item`` at ``index``; raises if a different item was there."""
        if type(item) is int and _INT_LOW <= item < _INT_LIMIT:  # item_hash's int rule, inline
            h: int | None = (item + _INT_LIMIT) * 2 + 1
        else:
            h = item_hash(item)
        where = self._where.pop(index, None) if self._where else None
        if where is None:
            self._pending[index] = h
            return False, None
        batch, pos, stored = where
        if h != stored:
            self._mismatch_item(index, item, h)
        values = self._cache.get(batch)
        if values is None:
            values = self._load_batch(batch)
        value = values[pos]
        left = self._remaining[batch] - 1
        if left:
            self._remaining[batch] = left
        else:
            del self._remaining[batch]
            self._cache.pop(batch, None)
        self.resumed += 1
        return True, value

    def known_ahead(self, start: int) -> int:
        """Results stored by earlier runs for index ``start`` on, not yet asked for."""
        end = self.n_items if self.n_items is not None else float("inf")
        return sum(1 for i in self._where if start <= i < end)

    def on_success(self, index: int, item: Any, result: Any) -> None:
        """Add the result to the current batch; commit when it is big or old enough."""
        h = self._pending.pop(index, _UNSEEN)
        if h is _UNSEEN:
            h = self._hash_from_block(index)
            if h is _UNSEEN:
                h = item_hash(item)
        if h is None:
            self._warn(f"item {index} cannot be pickled, so it cannot be checkpointed")
            return
        _add_run(self._runs, index, 1)
        self._hashes += h.to_bytes(8, "little")
        self._values.append(result)
        self._countdown -= 1
        if self._countdown <= 0:
            self._maybe_flush()

    # Block hooks: the same work for a block of consecutive items, for an executor that
    # hands over whole chunks (per-item method calls cost more than the bookkeeping).
    def known_block(self, start: int, items: list[Any]) -> dict[int, Any]:
        """Stored results for ``items[k]`` (input index ``start + k``), as ``{k: result}``."""
        if not self._where:
            # Nothing stored: only hash (before the items run: a function may mutate them).
            blob, missing = pack_item_hashes(items, item_hash)
            self._block_hashes[start] = (len(items), blob, missing)
            return {}
        found: dict[int, Any] = {}
        for k, item in enumerate(items):
            hit, value = self.known(start + k, item)
            if hit:
                found[k] = value
        return found

    def on_success_block(self, start: int, items: list[Any], values: list[Any]) -> None:
        """``items`` (input indices ``start``...) all succeeded with ``values``."""
        n, blob, missing = self._block_hashes.pop(start, (-1, b"", 0))
        if n != len(items) or missing:
            # A block split by the executor, hashed per item, or with unpicklable items:
            # the per-item path sorts it out.
            if n >= 0:
                self._pending.update(zip(range(start, start + n), _hash_list(blob), strict=True))
            for k, item in enumerate(items):
                self.on_success(start + k, item, values[k])
            return
        _add_run(self._runs, start, n)
        self._hashes += blob
        self._values.extend(values)
        self._countdown -= n
        if self._countdown <= 0:
            self._maybe_flush()

    def _maybe_flush(self) -> None:
        n = len(self._values)
        if (
            n >= self.checkpoint.commit_every
            or time.monotonic() - self._last_commit >= self.checkpoint.commit_interval
        ):
            self.flush()
        else:
            self._countdown = min(_CHECK_CLOCK_EVERY, self.checkpoint.commit_every - n)

    def _hash_from_block(self, index: int) -> Any:
        # A per-item hook for an item hashed by known_block: move its block's hashes to the
        # per-index table (only blocks in flight are scanned: a handful).
        for start, (n, blob, _) in self._block_hashes.items():
            if start <= index < start + n:
                del self._block_hashes[start]
                self._pending.update(zip(range(start, start + n), _hash_list(blob), strict=True))
                return self._pending.pop(index)
        return _UNSEEN

    def on_failure(self, index: int, item: Any, exc: BaseException, attempts: int) -> bool:
        """Failed items are not recorded: a resumed run tries them again."""
        if self._pending.pop(index, _UNSEEN) is _UNSEEN:
            self._hash_from_block(index)
        self._failed += 1
        return False

    def end(self, completed: bool) -> None:
        """Commit the last batch (also after an error or Ctrl-C) and close the file."""
        conn = self.conn
        if conn is None:
            return
        try:
            self.flush()
            if completed and not self._failed:
                conn.execute(
                    "INSERT OR REPLACE INTO amorsize_meta VALUES ('completed_at', ?)",
                    (_now(),),
                )
        finally:
            self.conn = None
            conn.close()

    # -- internals ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit the results gathered since the last commit, as one batch row."""
        conn = self.conn
        self._last_commit = time.monotonic()
        if conn is None or not self._values:
            return
        runs, hashes, values = self._runs, bytes(self._hashes), self._values
        self._runs, self._hashes, self._values = [], bytearray(), []
        blob: bytes
        try:
            blob = pickle.dumps(values, _PROTOCOL)
        except Exception:
            runs, hashes, values = self._keep_picklable(runs, hashes, values)
            if not values:
                return
            blob = pickle.dumps(values, _PROTOCOL)
        row = (len(values), _pack(runs, "q"), hashes, blob)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO checkpoint_batches (n, runs, hashes, results) VALUES (?,?,?,?)",
                row,
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._countdown = min(_CHECK_CLOCK_EVERY, self.checkpoint.commit_every)

    def _keep_picklable(
        self, runs: list[int], hashes: bytes, values: list[Any]
    ) -> tuple[list[int], bytes, list[Any]]:
        # Some result does not pickle: keep the others, drop (and warn about) the culprits.
        indices = _expand_runs(runs)
        keep = [k for k, v in enumerate(values) if _picklable(v)]
        dropped = sorted(set(range(len(values))) - set(keep))
        if dropped:
            self._warn(
                f"the result of item {indices[dropped[0]]} cannot be pickled, so it is not saved"
            )
        kept_hashes = b"".join(hashes[8 * k : 8 * k + 8] for k in keep)
        return _runs_of(indices[k] for k in keep), kept_hashes, [values[k] for k in keep]

    def _warn(self, what: str) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"checkpoint {os.fspath(self.checkpoint.path)!r}: {what}; such items run again"
            " when the run is resumed (this warning is shown once per run)",
            CheckpointWarning,
            stacklevel=4,
        )

    def _check_header(self, conn: sqlite3.Connection) -> None:
        head = dict(conn.execute("SELECT key, value FROM amorsize_meta").fetchall())
        mine = {**self.identity, "n_items": "" if self.n_items is None else str(self.n_items)}
        if "func_qualname" not in head:
            rows = [
                *mine.items(),
                ("hash_scheme", _HASH_SCHEME),
                ("python", sys.version.split()[0]),
                ("created_at", _now()),
            ]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR IGNORE INTO amorsize_meta VALUES (?, ?)", rows)
            conn.execute("COMMIT")
            head = dict(conn.execute("SELECT key, value FROM amorsize_meta").fetchall())
        problems = []
        if head.get("hash_scheme", _HASH_SCHEME) != _HASH_SCHEME:
            problems.append(
                f"it hashes items with {head['hash_scheme']!r}, this version with {_HASH_SCHEME!r}"
            )
        name_then = f"{head.get('func_module')}.{head.get('func_qualname')}"
        name_now = f"{mine['func_module']}.{mine['func_qualname']}"
        if name_then != name_now:
            problems.append(f"it was written by function {name_then}, this run calls {name_now}")
        elif self.checkpoint.check_code and head.get("func_code") != mine["func_code"]:
            note = ""
            if head.get("python") and head["python"] != sys.version.split()[0]:
                note = f" (it was written by Python {head['python']}: bytecode differs)"
            problems.append(
                f"the code of {name_now} changed since it was written{note}; pass"
                " Checkpoint(path, check_code=False) if the results are still valid"
            )
        then_n, now_n = head.get("n_items", ""), mine["n_items"]
        if then_n and now_n and then_n != now_n:
            problems.append(f"it was written for {then_n} input items, this run has {now_n}")
        if problems:
            msg = (
                f"checkpoint {os.fspath(self.checkpoint.path)!r} does not match this run: "
                + "; ".join(problems)
                + ". Its results were not used. Use another checkpoint path, or delete the"
                " file to start over."
            )
            raise CheckpointMismatchError(msg)

    def _load_index(self, conn: sqlite3.Connection) -> None:
        where = self._where
        remaining = self._remaining
        for batch, runs, hashes in conn.execute(
            "SELECT id, runs, hashes FROM checkpoint_batches ORDER BY id"
        ):
            count = 0
            for pos, (i, h) in enumerate(
                zip(_expand_runs(_unpack(runs, "q")), _unpack(hashes, "Q"), strict=True)
            ):
                if i not in where:  # the first result recorded for an index wins
                    where[i] = (batch, pos, h)
                    count += 1
            if count:
                remaining[batch] = count

    def _load_batch(self, batch: int) -> list[Any]:
        assert self.conn is not None
        try:
            row = self.conn.execute(
                "SELECT results FROM checkpoint_batches WHERE id = ?", (batch,)
            ).fetchone()
            values: list[Any] = pickle.loads(row[0])
        except Exception as exc:
            msg = (
                f"checkpoint {os.fspath(self.checkpoint.path)!r}: batch {batch} cannot be"
                f" unpickled ({type(exc).__name__}: {exc}); the file is damaged or was"
                " written with classes that no longer import. Delete it to start over."
            )
            raise CheckpointError(msg) from exc
        self._cache[batch] = values
        return values

    def _mismatch_item(self, index: int, item: Any, h: int | None) -> None:
        why = "cannot be pickled now" if h is None else "differs from the one checkpointed"
        msg = (
            f"checkpoint {os.fspath(self.checkpoint.path)!r} does not match this run: the"
            f" input item at index {index} ({_short_repr(item)}) {why}. The input changed"
            " since the checkpoint was written (or pickles differently: sets of strings do"
            " between processes); its results were not used. Use another checkpoint path, or"
            " delete the file to start over."
        )
        raise CheckpointMismatchError(msg)


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value, _PROTOCOL)
    except Exception:
        return False
    return True


def _short_repr(item: Any) -> str:
    try:
        text = repr(item)
    except Exception:
        text = f"<{type(item).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def checkpoint_observer(
    checkpoint: Checkpoint | str | os.PathLike[str], func: Callable[..., Any], data: Any
) -> CheckpointObserver:
    """Build the ``execute`` observer for ``checkpoint=`` (a path or a ``Checkpoint``).

    ``data`` is only measured (``len``) when it is a sized collection, never iterated.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = Checkpoint(checkpoint)
    if not isinstance(checkpoint, Checkpoint):
        msg = (  # type: ignore[unreachable]
            "checkpoint must be a path (str or os.PathLike) or a Checkpoint,"
            f" got {checkpoint!r} ({type(checkpoint).__name__})"
        )
        raise TypeError(msg)
    n_items = len(data) if isinstance(data, Sized) else None
    return CheckpointObserver(checkpoint, func, n_items)
