"""The installed distribution's version, read from its metadata (single source: pyproject)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("amorsize")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled source tree
    __version__ = "0.0.0+unknown"
