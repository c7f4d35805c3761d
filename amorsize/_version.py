"""The installed distribution's version, read from its metadata (single source: pyproject)."""

from __future__ import annotations

import functools


@functools.cache
def read_version() -> str:
    """Return the version of the installed ``amorsize`` distribution.

    >>> read_version() == __import__("amorsize").__version__
    True
    """
    # importlib.metadata costs 50-80 ms to import (measured with `python -X importtime`), which
    # every spawned worker would pay: it is imported only when the version is asked for.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amorsize")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled source tree
        return "0.0.0+unknown"
