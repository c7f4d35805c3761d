"""The docs: every public name has an API reference entry; README links point at pages; the
README examples that say they run as they are do."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import amorsize

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _docs_or_skip() -> Path:
    if not (DOCS / "api").is_dir():
        pytest.skip("no docs/ beside the tests (an sdist ships none)")
    return DOCS


def test_every_public_name_has_an_api_entry() -> None:
    """Each name in `amorsize.__all__` has a `::: amorsize.NAME` entry on an API page.

    An alias (another public name for a documented object) is covered by that entry.
    """
    pages = sorted(_docs_or_skip().glob("api/*.md"))
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages)
    documented = set(re.findall(r"^::: amorsize\.(\w+)\s*$", text, flags=re.MULTILINE))
    objects = [getattr(amorsize, name) for name in documented if name in amorsize.__all__]
    missing = sorted(
        name
        for name in set(amorsize.__all__) - documented - {"__version__"}
        if not any(getattr(amorsize, name) is obj for obj in objects)
    )
    assert not missing, f"add `::: amorsize.NAME` to a page of docs/api/ for: {missing}"


def test_readme_links_point_at_existing_pages() -> None:
    """Every relative link in README.md names a file that exists."""
    _docs_or_skip()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    relative = [t for t in targets if "://" not in t]
    assert relative, "README.md links to no page"
    missing = [t for t in relative if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_service_job_example_runs_as_it_is(tmp_path: Path) -> None:
    """The README's "Jobs that call a service" block runs to completion as a script."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Jobs that call a service", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    script = tmp_path / "service_job.py"
    script.write_text(code + "\n    print('done', sum(1 for r in results if r is not None))\n")
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("done ")
