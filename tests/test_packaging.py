"""Release plumbing that can be checked without GitHub: workflows and build identifiers."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
PYTHONS = ("cp310", "cp311", "cp312", "cp313", "cp314", "cp315")

EXPECTED_IDENTIFIERS = {
    "linux": {
        f"{py}-{libc}_{arch}"
        for py in PYTHONS
        for libc in ("manylinux", "musllinux")
        for arch in ("x86_64", "aarch64")
    },
    "macos": {f"{py}-macosx_{arch}" for py in PYTHONS for arch in ("x86_64", "arm64")},
    "windows": {f"{py}-win_{arch}" for py in PYTHONS for arch in ("amd64", "arm64")},
}


@pytest.mark.parametrize("name", ["wheels.yml", "ci.yml"])
def test_workflow_parses(name: str) -> None:
    """Each workflow is valid YAML with jobs that have steps or reuse an action."""
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(doc, dict)
    assert doc["jobs"], name
    for job_name, job in doc["jobs"].items():
        assert job.get("steps"), f"{name}: job {job_name} has no steps"


def test_wheels_workflow_publishes_only_on_tags_with_trusted_publishing() -> None:
    """Publishing needs both builds, runs on version tags, and uses an OIDC token."""
    yaml = pytest.importorskip("yaml")
    jobs = yaml.safe_load((WORKFLOWS / "wheels.yml").read_text())["jobs"]
    publish = jobs["publish"]
    assert set(publish["needs"]) == {"wheels", "sdist"}
    assert "refs/tags/v" in publish["if"]
    assert publish["permissions"]["id-token"] == "write"
    runners = {entry["os"]: entry["archs"] for entry in jobs["wheels"]["strategy"]["matrix"]["include"]}
    assert runners["ubuntu-24.04-arm"] == "aarch64", "aarch64 must build on a native ARM runner"
    assert runners["windows-11-arm"] == "ARM64", "Windows ARM64 must build on a native ARM runner"


@pytest.mark.parametrize("platform", sorted(EXPECTED_IDENTIFIERS))
def test_cibuildwheel_builds_exactly_the_intended_wheels(platform: str) -> None:
    """`cibuildwheel --print-build-identifiers` lists CPython 3.10-3.15 on every target, no free-threaded build."""
    exe = shutil.which("cibuildwheel") or str(Path(sys.executable).with_name("cibuildwheel"))
    if not Path(exe).exists():
        pytest.skip("cibuildwheel is not installed (it is in the `dev` extra; .ci/run installs it)")
    out = subprocess.run(
        [exe, "--print-build-identifiers", "--platform", platform],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    assert set(out.split()) == EXPECTED_IDENTIFIERS[platform]


def _classifier_versions() -> set[str]:
    """The `Programming Language :: Python :: 3.X` classifiers of pyproject.toml, as "3.X"."""
    text = (ROOT / "pyproject.toml").read_text()
    return set(re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text))


def test_classifiers_wheels_and_ci_name_the_same_pythons() -> None:
    """The classifiers, the wheel matrix and the CI test matrix list the same CPythons."""
    yaml = pytest.importorskip("yaml")
    wheels = {f"3.{py[3:]}" for py in PYTHONS}
    job = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())["jobs"]["test"]
    tested = set(job["strategy"]["matrix"]["python"])
    assert _classifier_versions() == wheels == tested
