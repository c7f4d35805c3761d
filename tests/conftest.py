"""Shared fixtures for the test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(autouse=True, scope="session")
def _machine_facts_cache(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Keep amorsize's machine-facts cache in a session temp dir, not the user's home."""
    import amorsize.system

    old = os.environ.get("AMORSIZE_CACHE_DIR")
    os.environ["AMORSIZE_CACHE_DIR"] = str(tmp_path_factory.mktemp("amorsize-cache"))
    amorsize.system._reset_memo()
    yield None
    if old is None:
        os.environ.pop("AMORSIZE_CACHE_DIR", None)
    else:
        os.environ["AMORSIZE_CACHE_DIR"] = old
    amorsize.system._reset_memo()


@pytest.fixture(autouse=True, scope="session")
def _signing_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep amorsize's signing key in a session temp dir, not the user's config directory."""
    import amorsize._signing

    old = os.environ.get("AMORSIZE_CONFIG_DIR")
    where = tmp_path_factory.mktemp("amorsize-config")
    os.environ["AMORSIZE_CONFIG_DIR"] = str(where)
    amorsize._signing._reset()
    yield where
    if old is None:
        os.environ.pop("AMORSIZE_CONFIG_DIR", None)
    else:
        os.environ["AMORSIZE_CONFIG_DIR"] = old
    amorsize._signing._reset()
