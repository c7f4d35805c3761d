"""Shared fixtures for the test suite."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _run_outside_the_source_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Run the session from a temp dir: a `python -c` child must import the installed package.

    `python -c` and `python -m` put the working directory first on sys.path, and the source
    tree holds no compiled core, so a child started from the checkout would import it instead.
    """
    here = Path.cwd()
    work = tmp_path_factory.mktemp("cwd")
    os.chdir(work)
    yield work
    os.chdir(here)


@contextlib.contextmanager
def _private_dir(variable: str, where: Path, forget: Callable[[], None]) -> Iterator[Path]:
    """Point ``variable`` at ``where`` for the session; ``forget`` drops what was read."""
    old = os.environ.get(variable)
    os.environ[variable] = str(where)
    forget()
    try:
        yield where
    finally:
        if old is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = old
        forget()


@pytest.fixture(autouse=True, scope="session")
def _machine_facts_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep amorsize's machine-facts cache in a session temp dir, not the user's home."""
    import amorsize.system

    where = tmp_path_factory.mktemp("amorsize-cache")
    with _private_dir("AMORSIZE_CACHE_DIR", where, amorsize.system._reset_memo) as path:
        yield path


@pytest.fixture(autouse=True, scope="session")
def _signing_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep amorsize's signing key in a session temp dir, not the user's config directory."""
    import amorsize._signing

    where = tmp_path_factory.mktemp("amorsize-config")
    with _private_dir("AMORSIZE_CONFIG_DIR", where, amorsize._signing._reset) as path:
        yield path


def _run_in_forked_child(body: Callable[[], int]) -> int:
    """``body()``'s code (0: as expected), run in a forked child; 1 if it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body()
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    return got[0] if got else 1


@pytest.fixture
def in_forked_child() -> Callable[[Callable[[], int]], int]:
    """Runs a check in a forked child (``os.fork``): its code, 0 when as expected."""
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    return _run_in_forked_child
