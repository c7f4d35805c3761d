"""The per-user key that signs the pickles amorsize stores in checkpoint and dead-letter files.

Loading a pickle can run arbitrary code, so a file that holds pickles is as trusted as the
code that wrote it. A checkpoint or dead-letter file written by *this user* carries an
HMAC-SHA256 over each stored blob, made with a secret key that only this user can read
(as Jupyter signs notebooks); a reader verifies the HMAC before it unpickles anything. A file
made or edited by someone without the key (a crafted file, a file copied from another
machine or user) fails verification, and is refused unless the caller passes ``trust=True``.

The threat model: an attacker who can write the checkpoint or dead-letter file but cannot
read this user's key file. An attacker who can read the key (the same user, root) can sign
anything; so can anyone who can replace amorsize's own code.

The key is 32 random bytes in ``signing.key`` of the user's config directory (on Linux
``$XDG_CONFIG_HOME/amorsize`` or ``~/.config/amorsize``), created with mode 0o600 on first
use. ``AMORSIZE_CONFIG_DIR`` relocates it (the test suite points it at a temp directory).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["KEY_BYTES", "MAC_BYTES", "SigningKey", "SigningKeyError", "key_path", "user_key"]

KEY_BYTES = 32
MAC_BYTES = 32  # HMAC-SHA256
_ENV_DIR = "AMORSIZE_CONFIG_DIR"
_FILE_NAME = "signing.key"

_lock = threading.Lock()
_memo: dict[Path, SigningKey] = {}


class SigningKeyError(OSError):
    """The signing key file cannot be created or read, or is not a key amorsize wrote."""


@dataclass(frozen=True)
class SigningKey:
    """A secret key and its public fingerprint.

    ``key_id`` may be stored beside signed data: it tells a reader whether the data was
    signed by this key (a damaged blob) or by another one (a foreign file).

    >>> k = SigningKey(bytes(32))
    >>> k.verify(k.sign(b"blob"), b"blob")
    True
    """

    secret: bytes = field(repr=False)
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            msg = f"a signing key has {KEY_BYTES} bytes, got {len(self.secret)}"
            raise ValueError(msg)
        fingerprint = hashlib.sha256(b"amorsize key id\0" + self.secret).hexdigest()[:16]
        object.__setattr__(self, "key_id", fingerprint)

    def sign(self, *parts: bytes) -> bytes:
        """HMAC-SHA256 over ``parts``, each length-prefixed so that the split is signed too."""
        mac = hmac.new(self.secret, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(8, "little"))
            mac.update(part)
        return mac.digest()

    def verify(self, mac: bytes, *parts: bytes) -> bool:
        """Whether ``mac`` is this key's signature of ``parts`` (constant-time compare)."""
        return hmac.compare_digest(self.sign(*parts), mac)


def _default_dir() -> Path:
    plat: str = sys.platform
    if plat.startswith("linux"):
        base = os.environ.get("XDG_CONFIG_HOME", "").strip() or str(Path.home() / ".config")
        return Path(base) / "amorsize"
    try:
        import platformdirs
    except ImportError:
        pass
    else:
        return Path(platformdirs.user_config_dir("amorsize", appauthor=False))
    if plat == "win32":
        base = os.environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
        return Path(base) / "amorsize"
    if plat == "darwin":
        return Path.home() / "Library" / "Application Support" / "amorsize"
    return Path.home() / ".config" / "amorsize"


def key_path() -> Path:
    """Where this user's signing key lives (``AMORSIZE_CONFIG_DIR`` first)."""
    env = os.environ.get(_ENV_DIR, "").strip()
    return (Path(env) if env else _default_dir()) / _FILE_NAME


def user_key() -> SigningKey:
    """This user's signing key, created (mode 0o600) on first use; read once per process.

    >>> user_key().key_id   # doctest: +SKIP
    '3f9c0a1b2c3d4e5f'
    """
    path = key_path()
    with _lock:
        key = _memo.get(path)
        if key is None:
            key = _memo[path] = SigningKey(_load_or_create(path))
        return key


def _reset() -> None:
    """Forget keys read in this process (tests relocate the key directory)."""
    with _lock:
        _memo.clear()


def _load_or_create(path: Path) -> bytes:
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    secret = os.urandom(KEY_BYTES)
    # Written in full under a private name, then linked into place: a process racing us
    # either finds no key or a whole one, and the first link wins.
    tmp = path.with_name(f".{_FILE_NAME}.{os.getpid()}.{secret[:4].hex()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(tmp, secret)
        os.link(tmp, path)
    except FileExistsError:
        return _read(path)
    except OSError as exc:
        msg = (
            f"cannot create amorsize's signing key {str(path)!r} ({exc.strerror or exc}); "
            f"make that directory writable, or set {_ENV_DIR} to a private directory"
        )
        raise SigningKeyError(msg) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return secret


def _write_private(path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        msg = (
            f"cannot read amorsize's signing key {str(path)!r} ({exc.strerror or exc}); "
            f"fix its permissions (it should be readable by you only), or set {_ENV_DIR}"
        )
        raise SigningKeyError(msg) from exc
    if len(data) != KEY_BYTES:
        msg = (
            f"amorsize's signing key {str(path)!r} has {len(data)} bytes, expected {KEY_BYTES}: "
            "it was not written by amorsize or is damaged; delete it (files signed with the "
            "old key will then need trust=True to load)"
        )
        raise SigningKeyError(msg)
    return data
