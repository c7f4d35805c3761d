"""Benchmarks: peers measured side by side with amorsize in one run.

Run with ``pytest benchmarks -m benchmark`` (the default test run excludes them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Workload modules in this folder must be importable here and in spawned workers.
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder is a benchmark, so ``-m "not benchmark"`` skips it."""
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.benchmark)
