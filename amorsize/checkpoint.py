"""Checkpoint/resume: ``execute(..., checkpoint="run.db")`` survives a crash of the whole run.

Each completed item's result is recorded in an SQLite database; running the same call again
skips the items already done and returns the full result list. The guarantee is
**at-least-once execution, exactly-once results**: an item may run again after a crash (its
result was computed but not yet committed), but every index gets exactly one result, and
a resumed run returns the same list as an uninterrupted one.

Data flow (everything here runs in the parent, in the thread that called ``execute``)::

    begin() ── header: format, signer, function identity, input length ── verified, or written
            ── every stored batch: checksum and signature verified, indexed (nothing unpickled)
    known(i, item) ── keyed hash(item) ──▶ stored index? ─ yes ─▶ same hash? ─▶ stored result
                                            │                    └─ no ─▶ CheckpointMismatchError
                                            └ no ─▶ item is run by a worker
    on_success(i, item, result) ──▶ batch in memory ── every COMMIT_EVERY_ITEMS results or
                                    COMMIT_EVERY_SECONDS ──▶ checked to load, sealed, one transaction
    end() ──▶ last batch committed, file closed

Storage. One row per committed batch holds the batch's input indices (as ``(start, count)``
runs: a chunk is one run), the item hashes (packed uint64) and the results (one pickle per
batch), with a BLAKE2b-128 digest of all three and an HMAC of the digest (see Integrity).
Indices, not positions in the file, are the key: a result belongs to the item at index
``i`` whose hash matches the stored one, and the run header records the function's identity
and the input length. An **empty file** at the path is taken over; any other file that is
not a checkpoint of this format version is refused and left unchanged (``_store``).

Item hashes are keyed: 64 bits of SipHash-2-4 (ints, compiled) or BLAKE2b (the pickle of
anything else) under a random 128-bit key stored in the file, so someone who controls the
input items but cannot read the file cannot build two items that hash alike.

Integrity and trust. Every batch row and the run header carry a digest, verified on every
read (a flipped bit is a ``CheckpointError`` naming the file and the batch, never a wrong
result), and an HMAC-SHA256 over (file id, block id, digest) with this user's secret key
(``amorsize._signing``, 0o600 in the user's config directory). A file signed with another
key, or not signed, is refused before anything is unpickled (loading a pickle can run
code) unless ``Checkpoint(path, trust=True)``: then digests are still checked, signatures
are not. Results are also loaded once when their batch is committed, so a result that
pickles but does not unpickle is never stored (it is warned about and runs again on resume).

Durability. WAL journal with ``synchronous=NORMAL`` by default: a committed batch survives
a crash or ``SIGKILL`` of the process (it is in the WAL, handed to the OS), and the file is
never corrupted; only a power loss or OS crash may lose the last batches committed before
it, which are then simply run again. ``synchronous="FULL"`` also survives power loss, at the
cost of an ``fsync`` per batch. A full disk, a read-only file or directory, or a missing
directory raise ``CheckpointError`` naming the path, the cause and the fix; what was
committed stays. A read-only checkpoint can be read, and resumed from when it already holds
every result.
"""

from __future__ import annotations

import array
import contextlib
import datetime
import hashlib
import json
import os
import pickle
import sqlite3
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any, Literal

from amorsize._core import ItemHasher
from amorsize._format import safe_repr
from amorsize._identity import function_identity
from amorsize._observers import RunObserver
from amorsize._store import (
    BUSY_TIMEOUT_SECONDS,
    Seal,
    StoreConnection,
    StoreError,
    block_digest,
    open_database,
    write_error,
    write_transaction,
)
from amorsize._timeline import MAX_SPANS
from amorsize._validate import MAX_SECONDS, check_choice, check_int, check_number, fail

__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "COMMIT_EVERY_ITEMS",
    "COMMIT_EVERY_SECONDS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWarning",
    "StoreError",
    "checkpoint_observer",
    "function_identity",
    "item_hash",
    "open_database",
]

#: Results per committed batch. At 1000 a batch costs ~0.02 µs per item of pickling and one
#: small transaction; smaller batches lose less on a crash but cost more per item
#: (measured by benchmarks/bench_checkpoint.py).
COMMIT_EVERY_ITEMS = 1000
#: A partial batch is committed once it is this old, so slow items are saved promptly: a
#: crash loses at most about this many seconds of finished work.
COMMIT_EVERY_SECONDS = 1.0

_FORMAT = "amorsize-checkpoint"
# Version 3 adds keyed item hashes, a digest and an HMAC per batch and a signed header
# (version 2: unkeyed CRC hashes, no checksums); a file in another version is refused.
_VERSION = "3"
# How item hashes are made; recorded so that a future change is detected, not misread.
_HASH_SCHEME = "siphash24(int64)|blake2b-64(pickle 5), keyed per file, v4"
_PROTOCOL = 5
_KEY_BYTES = 16
_MAX_BATCH = 1 << 40  # a sane bound on a batch's item count (a damaged one is refused)
_CHECK_CLOCK_EVERY = 64  # results between two clock reads for the time-based commit
_UNSEEN: Any = object()  # an index known() was not asked about (hash it now)
_TRUST_HINT = "pass Checkpoint(path, trust=True) as checkpoint="
# Header rows covered by its digest and signature (completed_at is informational, unsealed).
_SEALED_KEYS = (
    "format", "version", "file_id", "hash_key", "key_id", "func_module", "func_qualname",
    "func_code", "func_values", "n_items", "hash_scheme", "python", "created_at",
)

_CHECKPOINT_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoint_batches (
    id INTEGER PRIMARY KEY,
    n INTEGER NOT NULL,
    runs BLOB NOT NULL,      -- int64 little-endian (start, count) pairs: the input indices
    hashes BLOB NOT NULL,    -- uint64 little-endian keyed item hashes, one per result
    results BLOB NOT NULL,   -- pickle of the list of results, same order
    digest BLOB NOT NULL,    -- BLAKE2b-128 of (n, runs, hashes, results)
    mac BLOB NOT NULL        -- HMAC-SHA256 of (file id, batch id, digest), the user's key
);
"""


# The run timeline (``execute(report=)``, ``amorsize report``): created on first write, so
# that files written before it existed open as they are (they simply hold no timeline).
# Plain numbers and JSON, never pickles; each row sealed like a batch (digest + HMAC).
_TIMELINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoint_timeline (
    id INTEGER PRIMARY KEY,
    run TEXT NOT NULL,       -- random id of the run (one execute call) that wrote the row
    kind TEXT NOT NULL,      -- 'spans': float64 little-endian rows of _SPAN_FIELDS values;
                             -- 'summary': JSON of the run's report (plan, counts, failures)
    body BLOB NOT NULL,
    digest BLOB NOT NULL,    -- BLAKE2b-128 of (run, kind, body)
    mac BLOB NOT NULL        -- HMAC-SHA256 of (file id, "timeline <id>", digest)
)
"""
# worker, start, end (Unix time), items, failed, first index, chunks merged
_SPAN_FIELDS = 7
_MAX_SUMMARY_FAILURES = 50
_MAX_TIMELINE_ROW = 1 << 26  # bytes: a damaged length is refused, not loaded


class CheckpointError(StoreError):
    """The checkpoint file cannot be used: not a checkpoint, damaged, signed by another key,
    or not writable where it must be written. The message says why and what to do."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another function, other values, or other input data."""


class CheckpointWarning(UserWarning):
    """An item or result could not be checkpointed (it will be run again on resume)."""


# --- hashes ----------------------------------------------------------------------------------
def _pickle_hasher(key: bytes) -> Callable[[Any], int | None]:
    """Keyed BLAKE2b-64 of an item's pickle (``ItemHasher``'s hash of a non-int item)."""
    blake2b = hashlib.blake2b
    dumps = pickle.dumps

    def hash_other(item: Any) -> int | None:
        try:
            data = dumps(item, _PROTOCOL)
        except Exception:
            return None
        return int.from_bytes(blake2b(data, key=key, digest_size=8).digest(), "little")

    return hash_other


def _hasher(key: bytes) -> ItemHasher:
    return ItemHasher(key, _pickle_hasher(key))


def item_hash(item: Any, key: bytes) -> int | None:
    """The 64-bit hash of ``item`` under a file's 16-byte ``key``; None if unpicklable.

    The rule is ``amorsize._core.ItemHasher``'s (int64 items: SipHash-2-4, anything else:
    keyed BLAKE2b of its pickle). Stable across processes and runs for the same key.

    >>> k = bytes(16)
    >>> item_hash(3, k) == item_hash(3, k), item_hash(3, k) == item_hash(4, k)
    (True, False)
    >>> item_hash("3", k) == item_hash(3, k), item_hash(3, k) == item_hash(3, b"1" * 16)
    (False, False)
    """
    return _hasher(key)(item)


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
    """Hashes packed by ``ItemHasher.pack`` as ints, None for its 0 (no hash)."""
    return [h or None for h in _unpack(blob, "Q")]


# --- the sealed header and batches -----------------------------------------------------------
def _header_parts(head: dict[str, Any]) -> bytes:
    """The canonical bytes of the sealed header rows (absent rows count as absent)."""
    return b"".join(
        f"{k}={head[k]}\n".encode("utf-8", "surrogatepass") for k in _SEALED_KEYS if k in head
    )


def _has_run(head: dict[str, Any]) -> bool:
    """Whether a run header was written (any row beyond the format rows: a damaged header
    must be verified and refused, never taken for a missing one and written over)."""
    return any(k not in ("format", "version") for k in head)


def _hex(value: Any, size: int) -> bytes | None:
    """``value`` decoded from ``size`` bytes of hex, or None if it is not that."""
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return None
    return raw if len(raw) == size else None


def _header_seal(head: dict[str, Any], where: str, *, trust: bool) -> Seal:
    """Verify the run header (digest, then signer, then signature); the file's ``Seal``."""
    file_id = _hex(head.get("file_id"), 16)
    signer = head.get("key_id", "")
    seal = Seal(
        where, "checkpoint", file_id or b"", signer if isinstance(signer, str) else "?",
        trust=trust, trust_hint=_TRUST_HINT, error=CheckpointError,
    )
    sealed = [k for k in _SEALED_KEYS if k != "key_id"]
    if any(not isinstance(head.get(k), str) for k in sealed) or file_id is None:
        raise seal.damaged("the run header", "is incomplete")
    if _hex(head["hash_key"], _KEY_BYTES) is None:
        raise seal.damaged("the run header", "holds a malformed key")
    # The digest first: a damaged key id must read as damage, not as another user's file.
    digest, parts = _hex(head.get("header_digest"), 16), _header_parts(head)
    seal.check("the run header", digest, None, parts, digest_only=True)
    seal.check_signer()
    seal.check("the run header", digest, _hex(head.get("header_mac"), 32), parts)
    return seal


def _batch_parts(n: int, runs: bytes, hashes: bytes, results: bytes) -> tuple[bytes, ...]:
    return n.to_bytes(8, "little"), runs, hashes, results


def _verified_batches(
    conn: sqlite3.Connection, seal: Seal, *, digest_only: bool = False, batch: int | None = None
) -> Iterator[tuple[int, list[int], bytes, bytes]]:
    """``(id, runs, hashes, results)`` of every batch (or one), each checked before use."""
    sql = "SELECT id, n, runs, hashes, results, digest, mac FROM checkpoint_batches"
    rows = (
        conn.execute(sql + " ORDER BY id")
        if batch is None
        else conn.execute(sql + " WHERE id = ?", (batch,))
    )
    for bid, n, runs, hashes, results, digest, mac in rows:
        block = f"batch {bid}"
        if not (
            isinstance(bid, int)
            and isinstance(n, int)
            and 0 < n <= _MAX_BATCH
            and all(isinstance(b, bytes) for b in (runs, hashes, results))
        ):
            raise seal.damaged(block, "has fields of the wrong type or size")
        seal.check(block, digest, mac, *_batch_parts(n, runs, hashes, results), digest_only=digest_only)
        flat = list(_unpack(runs, "q")) if len(runs) % 16 == 0 else []
        counts = flat[1::2]
        if (
            len(hashes) != 8 * n
            or sum(counts) != n
            or any(c < 1 for c in counts)
            or any(s < 0 for s in flat[0::2])
        ):
            raise seal.damaged(block, "has an inconsistent index")
        yield bid, flat, hashes, results


def _unpickle_batch(seal: Seal, bid: int, n: int, results: bytes) -> list[Any]:
    """The results of a verified batch; any failure is a ``CheckpointError`` naming it."""
    try:
        values = pickle.loads(results)
    except Exception as exc:
        msg = (
            f"checkpoint {seal.where!r}: batch {bid} cannot be unpickled ({type(exc).__name__}:"
            f" {exc}); it was written with classes that no longer import (or changed). Restore"
            " them, or delete the file or move it aside to run the work again."
        )
        raise CheckpointError(msg) from exc
    if type(values) is not list or len(values) != n:
        raise seal.damaged(f"batch {bid}", "does not hold one result per index")
    return values


@contextlib.contextmanager
def _reading(where: str) -> Iterator[None]:
    """SQLite errors while reading a checkpoint as ``CheckpointError``."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        msg = (
            f"checkpoint {where!r} cannot be read ({exc}); it was left unchanged. Delete the"
            " damaged file or move it aside to run the work again, or pass another path."
        )
        raise CheckpointError(msg) from exc


# --- the public object -----------------------------------------------------------------------
Synchronous = Literal["NORMAL", "FULL"]


class Checkpoint:
    """A checkpoint file and its options; pass it (or just a path) as ``execute(checkpoint=)``.

    * ``synchronous``: ``"NORMAL"`` (default; survives process crashes, may lose the last
      batches on power loss) or ``"FULL"`` (survives power loss, an fsync per batch).
    * ``check_code``: also refuse to resume when the function's code, or the values it uses
      (defaults, closure cells, module constants: see ``amorsize._identity`` for what is and
      is not covered), changed, not only its module and name. Turn off to resume after an
      edit you know keeps results valid, or after a Python upgrade (bytecode differs).
    * ``trust``: load a file signed with another user's key or not signed (a copy from
      another machine, a file you received). Such a file holds pickles that run code when
      loaded: trust it only if you trust whoever wrote it. Checksums are still verified.
    * ``commit_every`` / ``commit_interval``: batch size and age that trigger a commit.

    The file is created with permissions 0o600; an empty file at ``path`` is taken over, any
    other file that is not a checkpoint is refused, unchanged.

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
        trust: bool = False,
        commit_every: int = COMMIT_EVERY_ITEMS,
        commit_interval: float = COMMIT_EVERY_SECONDS,
    ) -> None:
        given: object = path
        if not isinstance(given, (str, os.PathLike)):
            fail(TypeError, "Checkpoint: ", "path", "a str or os.PathLike", given)
        check_choice("Checkpoint: ", "synchronous", synchronous, ("NORMAL", "FULL"))
        self.path = Path(path)
        self.synchronous: Synchronous = synchronous
        self.check_code = bool(check_code)
        self.trust = bool(trust)
        self.commit_every = check_int("Checkpoint: ", "commit_every", commit_every, 1)
        self.commit_interval = check_number(
            "Checkpoint: ", "commit_interval", commit_interval, 0, MAX_SECONDS, note=" (seconds)"
        )

    def __repr__(self) -> str:
        trust = ", trust=True" if self.trust else ""
        return f"Checkpoint({os.fspath(self.path)!r}{trust})"

    @property
    def _where(self) -> str:
        return os.fspath(self.path)

    def _connect(self) -> StoreConnection:
        return open_database(
            self.path,
            _FORMAT,
            _CHECKPOINT_SCHEMA,
            version=_VERSION,
            synchronous=self.synchronous,
            error=CheckpointError,
        )

    def _open(self, *, loading: bool) -> tuple[StoreConnection, Seal | None]:
        """The file and its verified header's seal (None: no run was started in it yet)."""
        conn = self._connect()
        try:
            with _reading(self._where):
                head = dict(conn.execute("SELECT key, value FROM amorsize_meta").fetchall())
                if not _has_run(head):
                    return conn, None
                return conn, _header_seal(head, self._where, trust=self.trust or not loading)
        except BaseException:
            conn.close()
            raise

    def header(self) -> dict[str, str]:
        """The run header: format, signer, function identity, input length, times.

        Checked against its digest, not its signature (nothing is unpickled).
        """
        conn, _ = self._open(loading=False)
        try:
            with _reading(self._where):
                return dict(conn.execute("SELECT key, value FROM amorsize_meta").fetchall())
        finally:
            conn.close()

    def results(self) -> dict[int, Any]:
        """Every recorded result by input index (verified, then unpickled)."""
        conn, seal = self._open(loading=True)
        out: dict[int, Any] = {}
        try:
            if seal is None:
                return out
            with _reading(self._where):
                for bid, runs, hashes, blob in _verified_batches(conn, seal):
                    values = _unpickle_batch(seal, bid, len(hashes) // 8, blob)
                    for i, value in zip(_expand_runs(runs), values, strict=True):
                        out.setdefault(i, value)
        finally:
            conn.close()
        return dict(sorted(out.items()))

    def __len__(self) -> int:
        """How many distinct items have a recorded result (checksums verified)."""
        conn, seal = self._open(loading=False)
        try:
            if seal is None:
                return 0
            seen: set[int] = set()
            with _reading(self._where):
                for _, runs, _, _ in _verified_batches(conn, seal, digest_only=True):
                    seen.update(_expand_runs(runs))
            return len(seen)
        finally:
            conn.close()

    def timeline(self) -> list[dict[str, Any]]:
        """What each run recorded for its report, oldest run first: ``{"run": id,
        "summary": dict or None, "spans": [(worker, start, end, items, failed, first,
        chunks), ...]}`` with times in Unix seconds. ``[]`` for a file written before run
        timelines existed. Every row's digest is checked, and its signature too when the
        file is signed with your key; nothing is unpickled.
        """
        conn, seal = self._open(loading=False)
        try:
            if seal is None:
                return []
            with _reading(self._where):
                head = dict(conn.execute("SELECT key, value FROM amorsize_meta").fetchall())
                own = head.get("key_id") == seal.key.key_id
                return _read_timeline(conn, _header_seal(head, self._where, trust=not own))
        finally:
            conn.close()


# --- the execute observer --------------------------------------------------------------------
class CheckpointObserver(RunObserver):
    """Answers ``known()`` from the file and records new results in batches."""

    def __init__(self, checkpoint: Checkpoint, func: Callable[..., Any], n_items: int | None):
        self.checkpoint = checkpoint
        self.identity = function_identity(func)
        self.n_items = n_items
        self.conn: StoreConnection | None = None
        self._seal: Seal | None = None
        self._hasher: Any = None  # the file's ItemHasher, once begin() read its key
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
        self._broken = False  # a write failed: nothing more is written in this run
        self._warned = False
        self.resumed = 0
        # The run's timeline, stored with the results (see _TIMELINE_SCHEMA): spans not yet
        # written, the summary once the run reported, and the offset from the monotonic
        # clock the spans are measured with to Unix time.
        self._run_id = os.urandom(8).hex()
        self._spans: list[float] = []
        self._summary: dict[str, Any] | None = None
        self._clock = time.time() - time.monotonic()
        self._timeline_table = False  # created in this run's connection (or found there)

    @property
    def _path(self) -> str:
        return os.fspath(self.checkpoint.path)

    # -- RunObserver -------------------------------------------------------------------------
    def begin(self, func: Callable[[Any], Any]) -> None:
        """Open the file, check or write the run header, verify and index the stored batches."""
        self.conn = conn = self.checkpoint._connect()
        try:
            with _reading(self._path):
                head = self._header(conn)
                self._seal = seal = _header_seal(head, self._path, trust=self.checkpoint.trust)
                self._compare(head)
                self._hasher = _hasher(bytes.fromhex(head["hash_key"]))
                self._load_index(conn, seal)
            if conn.read_only:
                self._check_complete()
        except BaseException:
            conn.close()
            self.conn = None
            raise
        self._last_commit = time.monotonic()

    def known(self, index: int, item: Any) -> tuple[bool, Any]:
        """The stored result for ``item`` at ``index``; raises if a different item was there."""
        h = self._hasher(item)
        where = self._where.pop(index, None) if self._where else None
        if where is None:
            self._pending[index] = h
            return False, None
        batch, pos, stored = where
        if h != stored:
            self._refuse()
            self._mismatch_item(index, item, h)
        values = self._cache.get(batch)
        if values is None:
            try:
                values = self._load_batch(batch)
            except CheckpointError:
                self._refuse()
                raise
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
                h = self._hasher(item)
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
            blob, missing = self._hasher.pack(items)
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

    def _refuse(self) -> None:
        """The file turned out damaged or not this run's: write nothing more to it (it is
        left unchanged), not even the run's timeline."""
        self._broken = True

    def on_chunk(self, span: Any) -> None:
        """Keep the chunk's span for the run's timeline (written with the next batch)."""
        w, t0, t1, n, failed, first, chunks = span
        clock = self._clock
        self._spans += (w, t0 + clock, t1 + clock, n, failed, first, chunks)
        if len(self._spans) >= MAX_SPANS * _SPAN_FIELDS:
            self._save_spans()

    def on_report(self, report: Any) -> None:
        """Keep the run's report (plan, counts, failures) to store when the run ends."""
        self._summary = _summary(report, self._clock)

    def end(self, completed: bool) -> None:
        """Commit the last batch (also after an error or Ctrl-C) and close the file."""
        conn = self.conn
        if conn is None:
            return
        try:
            if not self._broken:
                self.flush()
                self._save_spans()
                if self._summary is not None:
                    self._save_timeline_row("summary", json.dumps(self._summary).encode())
                if completed and not self._failed and not conn.read_only:
                    self._mark_completed(conn)
        finally:
            self.conn = None
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # -- writing -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit the results gathered since the last commit, as one sealed batch row."""
        conn = self.conn
        self._last_commit = time.monotonic()
        if conn is None or not self._values or self._broken:
            return
        runs, hashes, values = self._runs, bytes(self._hashes), self._values
        self._runs, self._hashes, self._values = [], bytearray(), []
        self._countdown = min(_CHECK_CLOCK_EVERY, self.checkpoint.commit_every)
        blob = _dumps_loadable(values)
        if blob is None:
            runs, hashes, values = self._keep_storable(runs, hashes, values)
            if not values:
                return
            blob = pickle.dumps(values, _PROTOCOL)
        if conn.read_only:
            self._broken = True
            raise self._read_only_error(f"{len(values)} new result(s) cannot be stored")
        self._insert(conn, len(values), _pack(runs, "q"), hashes, blob)

    def _insert(self, conn: StoreConnection, n: int, runs: bytes, hashes: bytes, blob: bytes) -> None:
        assert self._seal is not None
        digest = block_digest(*_batch_parts(n, runs, hashes, blob))
        with self._writing(conn):
            # The writer holds the lock: the next id is its own, and the MAC names it.
            (bid,) = conn.execute(
                "SELECT coalesce(max(id), 0) + 1 FROM checkpoint_batches"
            ).fetchone()
            mac = self._seal.mac(f"batch {bid}", digest)
            conn.execute(
                "INSERT INTO checkpoint_batches VALUES (?,?,?,?,?,?,?)",
                (bid, n, runs, hashes, blob, digest, mac),
            )
            if self._spans:  # the chunks so far, in the same transaction: no extra commit
                spans, self._spans = self._spans, []
                self._timeline_row(conn, "spans", _pack_doubles(spans))

    def _save_spans(self) -> None:
        """Write the chunk spans gathered since the last write as one sealed row."""
        if self._spans:
            spans, self._spans = self._spans, []
            self._save_timeline_row("spans", _pack_doubles(spans))

    def _save_timeline_row(self, kind: str, body: bytes) -> None:
        """One sealed timeline row (skipped for a read-only file or after a failed write:
        the timeline is a picture of the run, never a reason to fail it)."""
        conn = self.conn
        if conn is None or conn.read_only or self._broken:
            return
        with self._writing(conn):
            self._timeline_row(conn, kind, body)

    @contextlib.contextmanager
    def _writing(self, conn: StoreConnection) -> Iterator[None]:
        """A write transaction; a failed write leaves the file alone from then on."""
        try:
            with write_transaction(conn):
                yield
        except sqlite3.Error as exc:
            self._broken = True
            raise write_error(self._path, "checkpoint", "write to the", exc, CheckpointError) from exc

    def _timeline_row(self, conn: StoreConnection, kind: str, body: bytes) -> None:
        """Insert one sealed timeline row, in the caller's write transaction."""
        assert self._seal is not None
        if not self._timeline_table:
            conn.execute(_TIMELINE_SCHEMA)  # a file from before timelines gets the table here
            self._timeline_table = True
        digest = block_digest(self._run_id.encode(), kind.encode(), body)
        (rid,) = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM checkpoint_timeline").fetchone()
        mac = self._seal.mac(f"timeline {rid}", digest)
        conn.execute(
            "INSERT INTO checkpoint_timeline VALUES (?,?,?,?,?,?)",
            (rid, self._run_id, kind, body, digest, mac),
        )

    def _mark_completed(self, conn: StoreConnection) -> None:
        try:
            conn.execute(
                "INSERT OR IGNORE INTO amorsize_meta VALUES ('completed_at', ?)", (_now(),)
            )
        except sqlite3.Error as exc:
            raise write_error(self._path, "checkpoint", "write to the", exc, CheckpointError) from exc

    def _keep_storable(
        self, runs: list[int], hashes: bytes, values: list[Any]
    ) -> tuple[list[int], bytes, list[Any]]:
        # Some result does not pickle, or does not load back: keep the others, drop (and
        # warn about) the culprits, which run again on resume.
        indices = _expand_runs(runs)
        keep: list[int] = []
        first = ""
        for k, value in enumerate(values):
            why = _unstorable(value)
            if why is None:
                keep.append(k)
            elif not first:
                first = f"the result of item {indices[k]} {why}, so it is not saved"
        if first:
            self._warn(first)
        kept_hashes = b"".join(hashes[8 * k : 8 * k + 8] for k in keep)
        return _runs_of(indices[k] for k in keep), kept_hashes, [values[k] for k in keep]

    def _warn(self, what: str) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"checkpoint {self._path!r}: {what}; such items run again"
            " when the run is resumed (this warning is shown once per run)",
            CheckpointWarning,
            stacklevel=4,
        )

    # -- reading -----------------------------------------------------------------------------
    def _header(self, conn: StoreConnection) -> dict[str, Any]:
        """The file's run header, written (sealed with a new file id and hash key) if absent."""
        head: dict[str, Any] = dict(conn.execute("SELECT key, value FROM amorsize_meta").fetchall())
        if _has_run(head):
            return head
        if conn.read_only:
            raise self._read_only_error("it holds no run yet, and one cannot be started")
        try:
            with write_transaction(conn):
                # Another process may have started a run in the file since we looked.
                now = dict(conn.execute("SELECT key, value FROM amorsize_meta").fetchall())
                if not _has_run(now):
                    conn.executemany(
                        "INSERT INTO amorsize_meta VALUES (?, ?)", self._new_header(head).items()
                    )
        except sqlite3.Error as exc:
            raise write_error(self._path, "checkpoint", "write to the", exc, CheckpointError) from exc
        return dict(conn.execute("SELECT key, value FROM amorsize_meta").fetchall())

    def _new_header(self, meta: dict[str, Any]) -> dict[str, str]:
        file_id = os.urandom(16)
        seal = Seal(
            self._path, "checkpoint", file_id, "", trust=False, trust_hint="",
            error=CheckpointError,
        )
        head = {
            "format": str(meta.get("format")),
            "version": str(meta.get("version")),
            "file_id": file_id.hex(),
            "hash_key": os.urandom(_KEY_BYTES).hex(),
            "key_id": seal.key.key_id,
            **self.identity,
            "n_items": "" if self.n_items is None else str(self.n_items),
            "hash_scheme": _HASH_SCHEME,
            "python": sys.version.split()[0],
            "created_at": _now(),
        }
        digest = block_digest(_header_parts(head))
        rows = {k: v for k, v in head.items() if k not in ("format", "version")}
        return {**rows, "header_digest": digest.hex(), "header_mac": seal.mac("the run header", digest).hex()}

    def _compare(self, head: dict[str, Any]) -> None:
        """Raise ``CheckpointMismatchError`` if the file was written for another run."""
        mine = {**self.identity, "n_items": "" if self.n_items is None else str(self.n_items)}
        problems = []
        if head["hash_scheme"] != _HASH_SCHEME:
            problems.append(
                f"it hashes items with {head['hash_scheme']!r}, this version with {_HASH_SCHEME!r}"
            )
        name_then = f"{head['func_module']}.{head['func_qualname']}"
        name_now = f"{mine['func_module']}.{mine['func_qualname']}"
        if name_then != name_now:
            problems.append(f"it was written by function {name_then}, this run calls {name_now}")
        elif self.checkpoint.check_code:
            problems += _code_changes(head, mine, name_now)
        then_n, now_n = head["n_items"], mine["n_items"]
        if then_n and now_n and then_n != now_n:
            problems.append(f"it was written for {then_n} input items, this run has {now_n}")
        if problems:
            msg = (
                f"checkpoint {self._path!r} does not match this run: "
                + "; ".join(problems)
                + ". Its results were not used. Use another checkpoint path, or delete the"
                " file to start over."
            )
            raise CheckpointMismatchError(msg)

    def _load_index(self, conn: StoreConnection, seal: Seal) -> None:
        # Every batch is verified here, before any result is used or any new one written:
        # a damaged file is refused whole, and left unchanged.
        where = self._where
        remaining = self._remaining
        for batch, runs, hashes, _ in _verified_batches(conn, seal):
            count = 0
            for pos, (i, h) in enumerate(zip(_expand_runs(runs), _unpack(hashes, "Q"), strict=True)):
                if i not in where:  # the first result recorded for an index wins
                    where[i] = (batch, pos, h)
                    count += 1
            if count:
                remaining[batch] = count

    def _load_batch(self, batch: int) -> list[Any]:
        assert self.conn is not None and self._seal is not None
        with _reading(self._path):
            rows = list(_verified_batches(self.conn, self._seal, batch=batch))
        if not rows:
            raise self._seal.damaged(f"batch {batch}", "disappeared while the run was reading it")
        _, _, hashes, blob = rows[0]
        values = _unpickle_batch(self._seal, batch, len(hashes) // 8, blob)
        self._cache[batch] = values
        return values

    def _check_complete(self) -> None:
        """A read-only file can serve a run only if it already holds every result."""
        if self.n_items is None:
            return  # unknown length: the first result to store raises
        stored = sum(1 for i in self._where if 0 <= i < self.n_items)
        if stored < self.n_items:
            raise self._read_only_error(
                f"it holds {stored} of the {self.n_items} results, and this run would have"
                f" to store the other {self.n_items - stored}"
            )

    def _read_only_error(self, what: str) -> CheckpointError:
        cause = self.conn.read_only_cause if self.conn is not None else ""
        msg = (
            f"checkpoint {self._path!r} is read-only ({cause}): {what}. Make the file and its"
            " directory writable, or copy the file to a writable place and pass that path;"
            " it was left unchanged."
        )
        return CheckpointError(msg)

    def _mismatch_item(self, index: int, item: Any, h: int | None) -> None:
        why = "cannot be pickled now" if h is None else "differs from the one checkpointed"
        msg = (
            f"checkpoint {self._path!r} does not match this run: the"
            f" input item at index {index} ({safe_repr(item, 60)}) {why}. The input changed"
            " since the checkpoint was written (or pickles differently: sets of strings do"
            " between processes); its results were not used. Use another checkpoint path, or"
            " delete the file to start over."
        )
        raise CheckpointMismatchError(msg)


def _code_changes(head: dict[str, Any], mine: dict[str, str], name: str) -> list[str]:
    """What changed in the function's code or in the values it uses (see _identity)."""
    fix = "; pass Checkpoint(path, check_code=False) if the results are still valid"
    if head["func_code"] != mine["func_code"]:
        note = ""
        if head["python"] != sys.version.split()[0]:
            note = f" (it was written by Python {head['python']}: bytecode differs)"
        return [f"the code of {name} changed since it was written{note}{fix}"]
    if head["func_values"] != mine["func_values"]:
        return [
            f"the values {name} uses (default arguments, closure cells, module constants"
            f" or functions it calls) changed since it was written{fix}"
        ]
    return []


def _dumps_loadable(values: list[Any]) -> bytes | None:
    """The pickle of ``values`` if it loads back (checked once per batch), else None."""
    try:
        blob = pickle.dumps(values, _PROTOCOL)
        back = pickle.loads(blob)
    except Exception:
        return None
    return blob if type(back) is list and len(back) == len(values) else None


def _unstorable(value: Any) -> str | None:
    """Why ``value`` cannot be checkpointed (None: it can)."""
    try:
        blob = pickle.dumps(value, _PROTOCOL)
    except Exception as exc:
        return f"cannot be pickled ({type(exc).__name__}: {exc})"
    try:
        pickle.loads(blob)
    except Exception as exc:
        return f"pickles but does not unpickle ({type(exc).__name__}: {exc})"
    return None


def _pack_doubles(values: list[float]) -> bytes:
    arr = array.array("d", values)
    if sys.byteorder == "big":  # pragma: no cover - the file format is little-endian
        arr.byteswap()
    return arr.tobytes()


def _summary(report: Any, clock: float) -> dict[str, Any]:
    """A ``RunReport`` as plain JSON data for the timeline (text only: no pickles)."""
    tl = report.timeline
    dead = set(report.dead_lettered)
    failures = [
        {"index": f.index, "error": type(f.exception).__name__,
         "message": _text(f.exception)[:400], "attempts": f.attempts,
         "dead_lettered": f.index in dead}
        for f in report.failures[:_MAX_SUMMARY_FAILURES]
    ]  # fmt: skip
    return {
        "started_at": _now(),
        "backend": report.backend, "n_jobs": report.n_jobs, "chunksize": report.chunksize,
        "reason": report.reason, "predicted_seconds": report.predicted_seconds,
        "wall_seconds": report.wall_seconds, "items": report.items,
        "completed": report.completed, "failed": report.failed,
        "dead_lettered": len(report.dead_lettered), "not_attempted": report.not_attempted,
        "reused": report.reused, "skipped": report.skipped, "retries": report.retries,
        "failures": failures,
        "origin": None if tl is None else tl.origin + clock,
        "dispatch_started": None if tl is None or tl.dispatch_started is None
        else tl.dispatch_started + clock,
        "total_chunks": 0 if tl is None else tl.total_chunks,
    }  # fmt: skip


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return safe_repr(exc)


def _read_timeline(conn: sqlite3.Connection, seal: Seal) -> list[dict[str, Any]]:
    """The verified timeline rows of a checkpoint, grouped by run (see ``Checkpoint.timeline``)."""
    has = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoint_timeline'"
    ).fetchone()
    if not has:
        return []
    runs: dict[str, dict[str, Any]] = {}
    for rid, run, kind, body, digest, mac in conn.execute(
        "SELECT id, run, kind, body, digest, mac FROM checkpoint_timeline ORDER BY id"
    ):
        block = f"timeline {rid}"
        if not (isinstance(run, str) and isinstance(kind, str) and isinstance(body, bytes)
                and len(body) <= _MAX_TIMELINE_ROW):  # fmt: skip
            raise seal.damaged(block, "has fields of the wrong type or size")
        seal.check(block, digest, mac, run.encode(), kind.encode(), body)
        entry = runs.setdefault(run, {"run": run, "summary": None, "spans": []})
        if kind == "spans":
            if len(body) % (8 * _SPAN_FIELDS):
                raise seal.damaged(block, "holds a partial chunk record")
            flat = array.array("d")
            flat.frombytes(body)
            if sys.byteorder == "big":  # pragma: no cover
                flat.byteswap()
            entry["spans"] += [tuple(flat[k : k + _SPAN_FIELDS])
                               for k in range(0, len(flat), _SPAN_FIELDS)]  # fmt: skip
        elif kind == "summary":
            entry["summary"] = _json_object(body, seal, block)
        else:
            raise seal.damaged(block, f"holds an unknown record kind {kind[:20]!r}")
    return list(runs.values())


def _json_object(body: bytes, seal: Seal, block: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise seal.damaged(block, "does not hold a JSON object")
    return value


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
