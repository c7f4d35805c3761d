"""Tests for amorsize._signing: the per-user key that signs stored pickles."""

from __future__ import annotations

import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from amorsize import _signing


@pytest.fixture
def key_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh key directory for one test."""
    monkeypatch.setenv("AMORSIZE_CONFIG_DIR", str(tmp_path / "cfg"))
    _signing._reset()
    yield tmp_path / "cfg"
    _signing._reset()


def test_key_is_created_private_and_reused(key_dir: Path) -> None:
    """The first call creates a 32-byte key with mode 0o600; later calls read the same key."""
    key = _signing.user_key()
    path = key_dir / "signing.key"
    assert path.read_bytes() == key.secret
    if sys.platform != "win32":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    _signing._reset()
    assert _signing.user_key() == key


def test_sign_verify_roundtrip_and_tamper(key_dir: Path) -> None:
    """A signature verifies for the same parts only: a flipped bit or a moved split fails."""
    key = _signing.user_key()
    mac = key.sign(b"ab", b"c")
    assert key.verify(mac, b"ab", b"c")
    assert not key.verify(mac, b"a", b"bc")
    assert not key.verify(mac, b"ab", b"d")
    other = _signing.SigningKey(os.urandom(32))
    assert not other.verify(mac, b"ab", b"c")
    assert other.key_id != key.key_id


@pytest.mark.parametrize("content", [b"", b"short", bytes(33)])
def test_foreign_key_file_is_refused(key_dir: Path, content: bytes) -> None:
    """A key file of the wrong size raises SigningKeyError naming the path and the fix."""
    key_dir.mkdir(parents=True)
    (key_dir / "signing.key").write_bytes(content)
    with pytest.raises(_signing.SigningKeyError, match=r"signing\.key.*delete it"):
        _signing.user_key()


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root ignores modes")
def test_unwritable_directory_names_the_fix(key_dir: Path) -> None:
    """A key directory that cannot be written gives SigningKeyError naming the variable."""
    key_dir.mkdir(parents=True)
    key_dir.chmod(0o500)
    try:
        with pytest.raises(_signing.SigningKeyError, match="AMORSIZE_CONFIG_DIR"):
            _signing.user_key()
    finally:
        key_dir.chmod(0o700)


def test_unwritable_directory_as_root_names_the_fix(key_dir: Path) -> None:
    """A key path under a regular file (so no directory can be made) names the fix."""
    key_dir.parent.mkdir(parents=True, exist_ok=True)
    key_dir.write_bytes(b"not a directory")
    with pytest.raises(_signing.SigningKeyError, match="AMORSIZE_CONFIG_DIR"):
        _signing.user_key()


def test_eight_threads_get_one_key(key_dir: Path) -> None:
    """Eight threads racing to create the key all get the same one."""
    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def get() -> None:
        barrier.wait()
        keys.append(_signing.user_key().secret)

    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1
    assert (key_dir / "signing.key").read_bytes() == keys[0]
