"""Every script in examples/ runs to completion as a subprocess and prints what it promises."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py")) if EXAMPLES.is_dir() else []

# What a script must print, beyond exiting 0 with no traceback. Scripts not listed here
# must still print something.
EXPECTED: dict[str, tuple[str, ...]] = {
    "dask_quickstart.py": ("results equal the serial ones: yes",),
    "optimize_execute.py": ("amorsize plan:", "predicted", "item 2 ('three') failed", "done"),
    "reliability_checkpoint.py": ("identical to an uninterrupted run: yes",),
    "reliability_circuit_breaker.py": ("not attempted",),
    "reliability_dead_letter.py": ("still failing",),
    "retry_backoff_progression.py": ("no overflow",),
    "retry_basic_decorator.py": ("price: 101.25",),
    "retry_custom_policy_logging.py": ("{'id': 7, 'value': 70}",),
    "retry_jitter.py": ("jitter=decorrelated",),
    "retry_parallel_execution.py": ("items ok",),
    "retry_selective_exceptions.py": ("not retried: ValueError",),
    "retry_summary.py": ("async: async ok",),
    "service_job.py": (
        "39 items ok; retried after a 429: [0, 7, 14, 21, 28, 35]",
        "failed: item 13: ItemTimeoutError",
        "recycled",
    ),
}
# Scripts run two at a time (2-core CI machine); each has this long before it counts as hung.
PARALLEL = 2
TIMEOUT_S = 60


@cache
def _results() -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every example once (in parallel, each in a fresh temporary directory)."""

    def one(script: Path) -> subprocess.CompletedProcess[str]:
        with tempfile.TemporaryDirectory() as cwd:
            try:
                return subprocess.run(
                    [sys.executable, str(script)],
                    cwd=cwd,
                    capture_output=True,
                    text=True,
                    timeout=TIMEOUT_S,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                return subprocess.CompletedProcess(
                    exc.cmd, -1, str(exc.stdout or ""), f"timed out after {TIMEOUT_S} s"
                )

    runnable = [s for s in SCRIPTS if not _missing_imports(s)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        done = pool.map(one, runnable)
        return {s.name: r for s, r in zip(runnable, done, strict=True)}


def test_examples_exist() -> None:
    """examples/ holds runnable scripts, including the optimize/execute walkthrough."""
    assert "optimize_execute.py" in [s.name for s in SCRIPTS]


def _missing_imports(script: Path) -> list[str]:
    """Top-level packages the script imports that this environment lacks (optional extras)."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.partition(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_example_runs(script: Path) -> None:
    """The script exits 0, writes no traceback and prints its expected output."""
    missing = _missing_imports(script)
    if missing:
        pytest.skip(f"{script.name} needs {', '.join(missing)} (an optional extra)")
    result = _results()[script.name]
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.strip(), "the example printed nothing"
    for needle in EXPECTED.get(script.name, ()):
        assert needle in result.stdout, (needle, result.stdout)
