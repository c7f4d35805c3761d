"""The hand-written stubs of the compiled core agree with the module that is built."""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

import amorsize._core as core
from amorsize._model_types import Machine, Workload

_PXI_MODEL = Path(__file__).resolve().parents[1] / "amorsize" / "_core_model.pxi"

# What stubtest reports that is not drift, each kind with why. The Cython-generated names
# are always reported: seeing them proves that stubtest really compared the stub (it says
# nothing at all when it cannot find the stub of a private module such as ``_core``).
_NOT_DRIFT = {
    # Cython writes pickling helpers and a doctest table into every module it builds.
    "cython-generated": re.compile(r"(__reduce_cython__|__setstate_cython__|\._core\.__test__) "),
    # The core sets the vectorcall slot after the type is ready, so the type's dict has no
    # ``__call__`` entry; the instances are callable (checked below).
    "vectorcall slot": re.compile(
        r"_core\.(CircuitGuarded|_RetryingBase)\.__call__ is not present at runtime$"
    ),
    # ``@disjoint_base`` (PEP 800) is too new for the type checkers amorsize supports.
    "disjoint base": re.compile(r" is a disjoint base at runtime, but isn't marked with"),
}


def _stubtest(tmp_path: Path) -> list[str]:
    """``mypy.stubtest amorsize._core``, one line per finding."""
    pytest.importorskip("mypy.stubtest")
    config = tmp_path / "mypy.ini"
    # Only the stub is checked; skipping what it imports keeps the run to ~1 s.
    config.write_text("[mypy]\nfollow_imports = skip\nfollow_imports_for_stubs = True\n")
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "cache"))
    root = Path(core.__file__ or "").resolve().parents[1]
    if str(root) not in {str(Path(p).resolve()) for p in site.getsitepackages()}:
        env["MYPYPATH"] = str(root)  # a source tree (editable install): mypy needs the path
    cmd = [sys.executable, "-m", "mypy.stubtest", "amorsize._core", "--concise",
           "--mypy-config-file", str(config)]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]


def test_stub_matches_the_compiled_module(tmp_path: Path) -> None:
    """Every name, signature and final class in `_core.pyi` matches `amorsize._core`."""
    lines = _stubtest(tmp_path)
    drift = [line for line in lines if not any(r.search(line) for r in _NOT_DRIFT.values())]
    assert drift == [], "\n".join(drift)
    assert any(_NOT_DRIFT["cython-generated"].search(x) for x in lines), "stubtest checked nothing"


def test_stubtest_sees_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stub that names a parameter the module lacks is reported (the check has teeth)."""
    tree = tmp_path / "tree" / "amorsize"
    tree.mkdir(parents=True)
    stub = Path(core.__file__ or "").with_name("_core.pyi").read_text()
    drifted = stub.replace("def jitter_uniform() -> float", "def jitter_uniform(n: int) -> float")
    assert drifted != stub
    (tree / "__init__.pyi").write_text("")
    (tree / "_core.pyi").write_text(drifted)
    (tree / "_model_types.pyi").write_text(
        Path(sys.modules[Workload.__module__].__file__ or "").read_text()
    )
    monkeypatch.setattr(core, "__file__", str(tree / "_core.so"))  # MYPYPATH -> the copy
    lines = _stubtest(tmp_path)
    assert any('jitter_uniform is inconsistent, runtime does not have parameter "n"' in x
               for x in lines), lines  # fmt: skip


@pytest.mark.parametrize("cls", [core.CircuitGuarded, core.RetryingFunction])
def test_vectorcall_wrappers_are_callable(cls: type) -> None:
    """The classes whose `__call__` stubtest cannot see are callable through their slot."""
    assert callable(cls.__new__(cls))


def _struct_fields(name: str) -> list[str]:
    """The fields of ``cdef struct name`` in ``_core_model.pxi``, in order."""
    text = _PXI_MODEL.read_text()
    body = text.split(f"cdef struct {name}:\n", 1)[1].split("\n\n", 1)[0]
    return [line.split()[1] for line in body.splitlines() if line.strip()]


@pytest.mark.parametrize("typed", [Workload, Machine])
def test_model_typeddicts_are_the_c_structs(typed: type) -> None:
    """`Workload`/`Machine` have exactly the C structs' keys (the source tree's `.pxi`)."""
    if not _PXI_MODEL.exists():
        pytest.skip("the Cython sources are not beside the tests")
    assert list(typed.__annotations__) == _struct_fields(typed.__name__)
    assert typed.__required_keys__ == frozenset(typed.__annotations__)


@pytest.mark.parametrize("key", [*Workload.__annotations__, *Machine.__annotations__])
def test_model_refuses_a_dict_without_a_typed_key(key: str) -> None:
    """The compiled model refuses inputs that lack any key the TypedDicts name."""
    w = dict.fromkeys(Workload.__annotations__, 1.0)
    m = dict.fromkeys(Machine.__annotations__, 1.0)
    assert core.model_process_seconds(w, m, 2.0, 1.0) > 0
    (w if key in w else m).pop(key)
    with pytest.raises(ValueError, match=key):
        core.model_process_seconds(w, m, 2.0, 1.0)
