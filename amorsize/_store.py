"""The SQLite files amorsize keeps (checkpoint, dead-letter queue): open, refuse, seal.

``open_database`` opens or creates (mode 0o600) the file of one *kind*; anything that is
not that kind's file in this format version is refused with ``StoreError`` (or the
subclass the caller passes) and left byte-for-byte unchanged. What happens to the path:

* missing: created 0o600; a dangling symbolic link gets its target created 0o600 (SQLite's
  ``-wal`` and ``-shm`` files take the database file's mode);
* an **empty file** (0 bytes): taken over, it keeps the permissions it has;
* an SQLite database without tables, another application's database, another kind's file,
  another format version, or not SQLite at all: refused;
* a directory that is missing or not writable, a full disk, a read-only file: a
  ``StoreError`` naming the path, the cause and the fix, never a raw ``OSError`` or
  ``sqlite3.OperationalError``. A file that cannot be written is opened read-only
  (``conn.read_only``): reading it works, writing raises.

``Seal`` is the integrity and authenticity check of stored blocks (one mechanism for every
file): each block carries a BLAKE2b-128 digest of its bytes, checked on every read (a
flipped bit is found, never returned), and an HMAC-SHA256 with this user's key
(``amorsize._signing``) over the file's random id, the block's id and the digest, so that a
block cannot be forged, altered, or moved to another file or row by someone without the
key. The file records the key's id: a file signed by another key, or not signed, is refused
before anything is unpickled unless the caller trusts it (then only digests are checked).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from amorsize import _signing

__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "DIGEST_BYTES",
    "Seal",
    "StoreConnection",
    "StoreError",
    "block_digest",
    "open_database",
    "write_error",
]

#: How long a writer waits for another process holding the database lock before failing.
BUSY_TIMEOUT_SECONDS = 30.0
DIGEST_BYTES = 16


class StoreError(Exception):
    """An amorsize database file (checkpoint, dead-letter queue) cannot be used: it is not a
    database, belongs to something else, is damaged or forged, or cannot be created or
    written (missing or read-only directory, full disk). The message names the path, the
    cause and the fix; a file that exists is left unchanged."""


class StoreConnection(sqlite3.Connection):
    """An SQLite connection that knows whether the file could be opened for writing."""

    read_only: bool = False
    #: Why the file is read-only (an OS error text), when it is.
    read_only_cause: str = ""


# --- errors ----------------------------------------------------------------------------------
_FIXES = {
    "SQLITE_FULL": "free space on that disk, or pass a path on another disk",
    "SQLITE_READONLY": "make the file and its directory writable, or pass another path",
    "SQLITE_CANTOPEN": "check that the directory exists and is writable, or pass another path",
    "SQLITE_PERM": "make the file and its directory writable, or pass another path",
}


def _sqlite_code(exc: BaseException) -> str:
    """SQLite's primary result code name for ``exc`` (``SQLITE_IOERR_WRITE`` -> ``SQLITE_IOERR``)."""
    if isinstance(exc, OSError):
        by_errno = {errno.ENOSPC: "SQLITE_FULL", errno.EROFS: "SQLITE_READONLY"}
        return by_errno.get(exc.errno or 0, "SQLITE_PERM" if exc.errno == errno.EACCES else "")
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    if not name:  # Python 3.10 has no sqlite_errorname
        text = str(exc).lower()
        if "full" in text:
            name = "SQLITE_FULL"
        elif "readonly" in text or "read-only" in text:
            name = "SQLITE_READONLY"
        elif "unable to open" in text:
            name = "SQLITE_CANTOPEN"
    return "_".join(name.split("_")[:2])


def _noun(kind: str) -> str:
    """``amorsize-dead-letter`` -> ``dead-letter file`` (for messages)."""
    return kind.removeprefix("amorsize-") + " file"


def write_error(
    where: str, kind: str, doing: str, exc: BaseException, error: type[StoreError]
) -> StoreError:
    """The ``error`` for an SQLite or OS failure while ``doing`` something to ``where``.

    Names the path, the cause (disk full, read-only, ...) and the fix; what was committed
    before stays in the file (SQLite rolls back only the failed transaction).
    """
    code = _sqlite_code(exc)
    fix = _FIXES.get(code, "check the disk and the file, or pass another path")
    msg = (
        f"cannot {doing} {_noun(kind)} {where!r}: {exc}; {fix}. What was stored before is kept:"
        " run the same call again to resume"
    )
    out = error(msg)
    out.__cause__ = exc
    return out


# --- opening ---------------------------------------------------------------------------------
def open_database(
    path: str | os.PathLike[str],
    kind: str,
    schema: str,
    *,
    version: str,
    synchronous: str = "NORMAL",
    error: type[StoreError] = StoreError,
) -> StoreConnection:
    """Open (or create, mode 0o600) the amorsize database of type ``kind`` at ``path``.

    An existing file is only read until it is known to be an amorsize database of this
    ``kind`` and format ``version`` with every table of ``schema``; anything else raises
    ``error`` (a ``StoreError``) and leaves the file untouched (see the module docstring).
    A file that cannot be written is opened read-only: ``conn.read_only`` is True.
    """
    where = os.fspath(path)
    if os.path.isdir(where):
        msg = f"{where!r} is a directory; pass the path of a database file to create or reuse"
        raise error(msg)
    real = os.path.realpath(where)
    _create_private(where, real, kind, error)
    conn = _connect(where, real, kind, error)
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


def _create_private(where: str, real: str, kind: str, error: type[StoreError]) -> None:
    """Create the file 0o600 if it does not exist (through a dangling link: its target)."""
    try:
        fd = os.open(real, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except FileNotFoundError as exc:
        parent = os.path.dirname(real) or "."
        shown = f"{where!r}" if real == os.path.abspath(where) else f"{where!r} (-> {real!r})"
        msg = (
            f"cannot create the {_noun(kind)} {shown}: directory {parent!r} does not exist;"
            " create it first, or pass a path in an existing directory"
        )
        raise error(msg) from exc
    except OSError as exc:
        msg = (
            f"cannot create the {_noun(kind)} {where!r}: {exc.strerror or exc}; pass a path in a"
            " directory you can write to"
        )
        raise error(msg) from exc
    os.close(fd)


def _writable(real: str) -> tuple[bool, str]:
    """Whether SQLite can write ``real`` (file and, for its WAL files, its directory)."""
    if not os.access(real, os.W_OK):
        return False, _access_cause(real)
    side = [real + "-wal", real + "-shm"]
    folder = os.path.dirname(real) or "."
    if os.access(folder, os.W_OK) or all(os.access(p, os.W_OK) for p in side):
        return True, ""
    return False, f"its directory {folder!r}: {_access_cause(folder)}"


def _access_cause(path: str) -> str:
    """Why ``path`` cannot be written, as the OS would say it."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    except (OSError, AttributeError):  # no statvfs on Windows
        pass
    return os.strerror(errno.EACCES)


def _connect(where: str, real: str, kind: str, error: type[StoreError]) -> StoreConnection:
    writable, cause = _writable(real)
    target, uri = real, False
    if not writable:
        # A read-only WAL database needs a -shm file; when none can be created, SQLite can
        # still read the file as immutable (the WAL cannot hold anything: nobody could write).
        folder_ok = os.access(os.path.dirname(real) or ".", os.W_OK)
        immutable = not folder_ok and not os.path.exists(real + "-shm")
        query = "mode=ro" + ("&immutable=1" if immutable else "")
        target, uri = f"file:{urllib.parse.quote(real)}?{query}", True
    try:
        conn = sqlite3.connect(
            target,
            timeout=BUSY_TIMEOUT_SECONDS,
            isolation_level=None,
            check_same_thread=False,
            factory=StoreConnection,
            uri=uri,
        )
    except sqlite3.Error as exc:
        msg = f"cannot open {where!r} as an SQLite database: {exc}"
        raise error(msg) from exc
    conn.read_only = not writable
    conn.read_only_cause = cause
    return conn


_SCHEMA_NAMES = re.compile(r"CREATE\s+(TABLE|INDEX)\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.IGNORECASE)


def _check_or_init(
    conn: StoreConnection,
    where: str,
    kind: str,
    version: str,
    schema: str,
    synchronous: str,
    error: type[StoreError],
) -> None:
    tables, meta, pages = _read_meta(conn, where, kind, error)
    if not tables and pages:
        msg = (
            f"{where!r} is an SQLite database with no tables, not an {kind!r} file; it was"
            f" left unchanged. Pass another path for the {kind} (an empty file is taken over;"
            " this one is not empty)."
        )
        raise error(msg)
    if tables:
        _check_ours(where, kind, version, schema, tables, meta, error)
        if not conn.read_only:
            _pragmas(conn, where, kind, synchronous, error)
        return
    if conn.read_only:
        msg = (
            f"cannot create the {_noun(kind)} {where!r}: it is read-only ({conn.read_only_cause});"
            " make it writable, or pass another path"
        )
        raise error(msg)
    _init(conn, where, kind, version, schema, error)
    _pragmas(conn, where, kind, synchronous, error)


def _read_meta(
    conn: StoreConnection, where: str, kind: str, error: type[StoreError]
) -> tuple[dict[str, str], dict[str, Any], int]:
    """``(schema objects by name -> type, format/version rows, page count)``."""
    try:
        conn.execute("BEGIN")  # one snapshot for the three reads
        try:
            rows = conn.execute("SELECT name, type FROM sqlite_master").fetchall()
            objects = {str(name): str(typ) for name, typ in rows}
            meta: dict[str, Any] = {}
            if objects.get("amorsize_meta") == "table":
                meta = dict(
                    conn.execute(
                        "SELECT key, value FROM amorsize_meta WHERE key IN ('format', 'version')"
                    ).fetchall()
                )
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        finally:
            conn.execute("COMMIT")
    except (sqlite3.DatabaseError, TypeError, ValueError) as exc:
        msg = (
            f"{where!r} is not a readable SQLite database ({exc}); it was left unchanged."
            f" Pass another path for the {kind}, or move the file away if it is damaged."
        )
        raise error(msg) from exc
    return objects, meta, pages


def _check_ours(
    where: str,
    kind: str,
    version: str,
    schema: str,
    objects: dict[str, str],
    meta: dict[str, Any],
    error: type[StoreError],
) -> None:
    tables = sorted(n for n, t in objects.items() if t == "table")
    meta_kind = meta.get("format")
    if meta_kind != kind:
        what = f"an {meta_kind!r} file" if meta_kind else "another application's database"
        msg = (
            f"{where!r} is {what}, not an {kind!r} file (tables: {', '.join(tables)});"
            f" it was left unchanged. Pass another path for the {kind}."
        )
        raise error(msg)
    if meta.get("version") != version:
        msg = (
            f"{where!r} is an {kind!r} file in format version {meta.get('version')!r}, and"
            f" this version of amorsize reads version {version!r}; it was left unchanged."
            " Pass another path, or open the file with the amorsize version that wrote it."
        )
        raise error(msg)
    missing = [n for t, n in _SCHEMA_NAMES.findall(schema) if objects.get(n) != t.lower()]
    if missing:
        # Never created again on an existing file: that would write to a damaged one.
        msg = (
            f"{_noun(kind)} {where!r} is damaged: {', '.join(missing)} missing; it was left"
            " unchanged. Delete the file or move it aside to start over."
        )
        raise error(msg)


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` around the block, rolled back if the block raises:
    the writer takes the file's write lock before it reads what it will write after."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _init(
    conn: StoreConnection, where: str, kind: str, version: str, schema: str, error: type[StoreError]
) -> None:
    """Write the format rows and the schema in one transaction (empty file only)."""
    try:
        with write_transaction(conn):
            # Another process may have initialised the file since we looked.
            if not conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                conn.execute(
                    "CREATE TABLE amorsize_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                )
                conn.execute(
                    "INSERT INTO amorsize_meta VALUES ('format', ?), ('version', ?)",
                    (kind, version),
                )
                for statement in schema.split(";"):
                    # executescript() would commit the open transaction: one by one instead.
                    if statement.strip():
                        conn.execute(statement)
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise error(f"{where!r} is locked: {exc}") from exc
        raise write_error(where, kind, "create the", exc, error) from exc


def _pragmas(
    conn: StoreConnection, where: str, kind: str, synchronous: str, error: type[StoreError]
) -> None:
    # WAL is switched on only once the file holds its tables: a file with a header and no
    # tables is never ours, so it can be refused as foreign.
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise error(f"{where!r} is locked: {exc}") from exc
        raise write_error(where, kind, "use the", exc, error) from exc


# --- the seal on stored blocks ---------------------------------------------------------------
def block_digest(*parts: bytes) -> bytes:
    """BLAKE2b-128 of ``parts``, each length-prefixed (the split is part of what is hashed)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


class Seal:
    """Makes and checks the digest and HMAC of the blocks of one file (see module docstring).

    ``file_id`` is the file's random id (stored in its header), ``signer`` the key id the
    header records ("" when the file is unsigned), ``trust`` the caller's choice to load a
    file this user's key did not sign. ``check_signer`` raises if the file is foreign or
    unsigned and not trusted; ``check`` raises if a block's digest or MAC is wrong.
    """

    def __init__(
        self,
        where: str,
        what: str,
        file_id: bytes,
        signer: str,
        *,
        trust: bool,
        trust_hint: str,
        error: type[StoreError],
    ) -> None:
        self.where, self.what, self.file_id = where, what, file_id
        self.signer, self.trust, self.trust_hint, self.error = signer, trust, trust_hint, error
        try:
            self.key = _signing.user_key()
        except _signing.SigningKeyError as exc:
            raise error(f"{what} {where!r}: {exc}") from exc

    def mac(self, block_id: str, digest: bytes) -> bytes:
        """This user's HMAC of the block ``block_id`` whose digest is ``digest``."""
        return self.key.sign(self.file_id, block_id.encode(), digest)

    def check_signer(self) -> None:
        """Refuse a file signed by another key, or unsigned, unless it is trusted."""
        if not (self.trust or self.signer == self.key.key_id):
            raise self.foreign(self.signer)

    def foreign(self, signer: str, block: str = "") -> StoreError:
        """The error for data (the file, or its ``block``) not signed by this user's key."""
        who = (
            f"was signed by another key (id {signer:.32}; yours is {self.key.key_id}): it was"
            " written by another user or on another machine, or your key was replaced"
            if signer
            else "carries no signature: it was not written by this version of amorsize"
        )
        what = f"{self.what} {self.where!r}" + (f", {block}," if block else "")
        msg = (
            f"{what} {who}. It holds pickles, and loading a pickle can run arbitrary code, so"
            f" amorsize loads only what is signed with your key ({_signing.key_path()}). If"
            f" you trust whoever wrote it, {self.trust_hint}; otherwise delete it or move it"
            " aside. It was left unchanged."
        )
        return self.error(msg)

    def sign_row(self, *parts: bytes) -> bytes:
        """This user's HMAC of a row signed on its own (a dead-letter entry's ``parts``)."""
        return self.key.sign(self.file_id, *parts)

    def check_row(self, block: str, signer: Any, mac: Any, *parts: bytes) -> None:
        """Raise unless the row ``block`` is signed by this user's key (or trusted): another
        signer or none is a foreign row, a wrong MAC a damaged one."""
        if self.trust:
            return
        if not isinstance(mac, bytes) or not isinstance(signer, str):
            raise self.foreign("", block)
        if signer != self.key.key_id:
            raise self.foreign(signer, block)
        if not self.key.verify(mac, self.file_id, *parts):
            raise self.damaged(block, "does not match its signature")

    def check(
        self, block: str, digest: Any, mac: Any, *parts: bytes, digest_only: bool = False
    ) -> None:
        """Raise ``error`` naming ``block`` unless its digest (and MAC, unless trusted or
        ``digest_only``) match ``parts``."""
        ok = isinstance(digest, bytes) and hmac.compare_digest(digest, block_digest(*parts))
        if ok and not (self.trust or digest_only):
            ok = isinstance(mac, bytes) and self.key.verify(mac, self.file_id, block.encode(), digest)
        if not ok:
            raise self.damaged(block, "does not match its checksum or signature")

    def damaged(self, block: str, why: str) -> StoreError:
        """The error for a damaged (or altered) ``block``."""
        msg = (
            f"{self.what} {self.where!r} is damaged: {block} {why} (the file was changed"
            " after it was written: a disk or copy error, or an edit by someone without your"
            " key); nothing was loaded from it and it was left unchanged. Delete the file or"
            " move it aside to run the work again."
        )
        return self.error(msg)
