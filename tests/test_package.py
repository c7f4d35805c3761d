"""The installed package: compiled core, version, typing data, wheel contents."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import os
from pathlib import Path

import pytest

import amorsize
import amorsize._core


def test_core_is_compiled_extension() -> None:
    """`amorsize._core` is loaded from an extension module, not a Python file."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert amorsize._core.__file__ is not None
    assert amorsize._core.__file__.endswith(suffixes), amorsize._core.__file__


def test_version_matches_metadata() -> None:
    """`__version__` is the installed distribution's version."""
    assert amorsize.__version__ == importlib.metadata.version("amorsize")


def test_all_is_sorted_and_resolves() -> None:
    """`__all__` is sorted and every name in it exists."""
    assert list(amorsize.__all__) == sorted(amorsize.__all__)
    for name in amorsize.__all__:
        assert hasattr(amorsize, name), name


def _installed_files() -> list[str]:
    files = importlib.metadata.files("amorsize")
    if files is None:
        pytest.skip("the distribution has no RECORD (not installed from a wheel)")
    return [str(f) for f in files]


@pytest.mark.skipif(
    os.environ.get("AMORSIZE_TEST_INSTALLED") != "1",
    reason="wheel-content checks need a non-editable install (set AMORSIZE_TEST_INSTALLED=1)",
)
class TestInstalledWheel:
    """Checks that only make sense against a real (non-editable) install, as in CI."""

    def test_tested_package_is_the_installed_one(self) -> None:
        """The package under test comes from site-packages, not the source tree."""
        assert "site-packages" in Path(amorsize.__file__).parts

    def test_wheel_ships_typing_data_and_compiled_core(self) -> None:
        """The wheel holds `py.typed`, the `.pyi` stub and the compiled `_core`."""
        files = _installed_files()
        assert "amorsize/py.typed" in files
        assert "amorsize/_core.pyi" in files
        suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
        assert any(f.startswith("amorsize/_core") and f.endswith(suffixes) for f in files)

    def test_wheel_ships_no_generated_or_cython_sources(self) -> None:
        """No `.c`, `.pyx`, `.pxi` or `.html` files are installed."""
        bad = [f for f in _installed_files() if f.endswith((".c", ".pyx", ".pxi", ".html"))]
        assert bad == []


def test_lazy_exports_match_all() -> None:
    """Every lazily re-exported name is in `__all__` and resolves to its defining module."""
    sources = amorsize._SOURCES
    assert set(sources) | {"__version__"} == set(amorsize.__all__)
    for name, module in sources.items():
        assert getattr(amorsize, name) is getattr(importlib.import_module(module), name), name


def test_import_does_not_load_the_whole_package(tmp_path: Path) -> None:
    """`import amorsize` loads no submodule: workers import only what they use."""
    import subprocess
    import sys

    code = "import amorsize, sys; print(sorted(m for m in sys.modules if m.startswith('amorsize')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert out.strip() == "['amorsize', 'amorsize._version']"
