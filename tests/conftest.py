"""Shared fixtures for the test suite."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _machine_facts_cache(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Keep amorsize's machine-facts cache in a session temp dir, not the user's home."""
    import os

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
