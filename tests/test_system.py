"""Machine facts: live values, the on-disk JSON cache and its failure modes."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amorsize.system as system
from amorsize.system import SystemInfo, cache_file, get_system_info, set_cache_dir


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh cache directory for one test; the in-process memo is reset around it."""
    monkeypatch.setenv("AMORSIZE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AMORSIZE_NO_CACHE", raising=False)
    set_cache_dir(None)
    yield tmp_path
    set_cache_dir(None)


def _fresh() -> SystemInfo:
    system._reset_memo()
    return get_system_info()


def test_facts_are_sane(cache_dir: Path) -> None:
    """Core counts, memory, start method and measured costs are in plausible ranges."""
    info = _fresh()
    assert 1 <= info.physical_cores <= info.logical_cores
    assert 1.0 <= info.usable_cores <= info.logical_cores
    assert info.start_method in multiprocessing.get_all_start_methods()
    if Path("/proc/meminfo").exists():
        assert info.available_memory > 0
    for name in (
        "process_startup_s",
        "process_startup_per_worker_s",
        "process_roundtrip_s",
        "transfer_s_per_byte",
        "thread_startup_s",
        "thread_roundtrip_s",
    ):
        value = getattr(info, name)
        assert math.isfinite(value) and 0 < value < 5, (name, value)
    assert info.process_startup_per_worker_s <= info.process_startup_s


def test_first_call_measures_and_writes_json(cache_dir: Path) -> None:
    """A missing cache is measured and written as plain JSON under the cache dir."""
    info = _fresh()
    path = cache_file()
    assert path is not None and path.parent == cache_dir
    assert info.from_cache is False and info.cache_path == str(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["key"]["build"] == system._build_id()
    assert raw["key"]["start_method"] == info.start_method
    assert raw["facts"]["process_roundtrip_s"] == info.process_roundtrip_s


def test_second_process_reads_the_cache(cache_dir: Path) -> None:
    """A later read (memo cleared, as in a new process) uses the file without measuring."""
    first = _fresh()
    second = _fresh()
    assert second.from_cache is True
    assert second.process_startup_s == first.process_startup_s
    assert second.transfer_s_per_byte == first.transfer_s_per_byte


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'{"key": {}, "facts": {}, "measured_at": 0}',
    ],
    ids=["empty", "truncated", "binary", "wrong-shape", "wrong-key"],
)
def test_corrupt_cache_is_remeasured(cache_dir: Path, content: bytes) -> None:
    """Unreadable or foreign content is replaced by a fresh measurement, never a crash."""
    path = cache_file()
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    info = _fresh()
    assert info.from_cache is False
    assert json.loads(path.read_text(encoding="utf-8"))["facts"]["physical_cores"] >= 1


def _rewrite(path: Path, **changes: object) -> None:
    raw = json.loads(path.read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        section, _, field = dotted.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    path.write_text(json.dumps(raw), encoding="utf-8")


@pytest.mark.parametrize(
    "changes",
    [
        {"key__build": "0:0/0:0"},
        {"key__start_method": "not-a-method"},
        {"facts__process_startup_s": -1.0},
        {"facts__transfer_s_per_byte": "fast"},
        {"facts__thread_roundtrip_s": float("nan")},
        {"facts__physical_cores": True},
    ],
    ids=["old-version", "other-start-method", "negative", "string", "nan", "bool"],
)
def test_stale_or_invalid_cache_is_remeasured(
    cache_dir: Path, changes: dict[str, object]
) -> None:
    """A cache from another version/machine, or with invalid values, is measured again."""
    _fresh()
    path = cache_file()
    assert path is not None
    _rewrite(path, **changes)
    assert _fresh().from_cache is False
    assert _fresh().from_cache is True


@pytest.mark.parametrize(
    "changes",
    [
        {"facts__process_startup_s": 10**400},
        {"facts__physical_cores": 10**400},
        {"measured_at": 10**400},
        {"facts__physical_cores": 0},
        {"facts__physical_cores": 2.5},
        {"facts__worker_rss_bytes": 10**30},
        {"facts__process_roundtrip_s": 1e300},
        {"facts__thread_startup_s": float("inf")},
        {"facts__transfer_s_per_byte": [1]},
        {"facts__measured_seconds": None},
    ],
    ids=["huge-int", "huge-cores", "huge-time", "zero-cores", "fractional-cores",
         "absurd-memory", "absurd-seconds", "infinite", "list", "null"],
)
def test_implausible_cache_is_remeasured_and_rewritten(
    cache_dir: Path, changes: dict[str, object]
) -> None:
    """issue 12 item 17: an implausible cached value means measure again, and rewrite."""
    _fresh()
    path = cache_file()
    assert path is not None
    _rewrite(path, **changes)
    assert _fresh().from_cache is False
    assert _fresh().from_cache is True  # the cache was rewritten with sane values


def test_info_command_survives_a_huge_integer_in_the_cache(cache_dir: Path) -> None:
    """issue 12 item 17: `amorsize info` with 10**400 in the cache measures again, exit 0."""
    import subprocess

    _fresh()
    path = cache_file()
    assert path is not None
    _rewrite(path, facts__physical_cores=10**400)
    p = subprocess.run([sys.executable, "-m", "amorsize", "info", "--json"], capture_output=True,
                       text=True, check=False, timeout=120, env=os.environ.copy())  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["from_cache"] is False
    assert _fresh().from_cache is True


_JSON_NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
)
_JSON_VALUES = st.one_of(_JSON_NUMBERS, st.booleans(), st.none(), st.text(max_size=5),
                         st.lists(_JSON_NUMBERS, max_size=2))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from([*sorted(system._PLAUSIBLE), "measured_at"]), value=_JSON_VALUES)
def test_any_cached_value_is_used_only_if_plausible(
    tmp_path_factory: pytest.TempPathFactory, field: str, value: object
) -> None:
    """issue 12 item 17: any JSON value in any field: never an exception; used only if sane."""
    path = tmp_path_factory.getbasetemp() / "hypothesis-machine.json"
    key = system._machine_key()
    facts = dict(_SANE)
    raw: dict[str, object] = {"key": key, "measured_at": time.time(), "facts": facts}
    if field == "measured_at":
        raw["measured_at"] = value
    else:
        facts[field] = value
    try:
        path.write_text(json.dumps(raw), encoding="utf-8")
    except ValueError:  # json cannot write it (an int too long for str): not a cache case
        return
    got = system._read_cache(path, key)
    if got is None:
        return
    for name, (typ, low, high) in system._PLAUSIBLE.items():
        assert type(got[name]) is typ and low <= got[name] <= high, (name, got[name])
    assert 1 <= got["physical_cores"] <= 1 << 16


_SANE = {
    "physical_cores": 2, "process_startup_s": 0.02, "process_startup_per_worker_s": 0.005,
    "process_roundtrip_s": 6e-5, "transfer_s_per_byte": 5e-10, "worker_rss_bytes": 10**7,
    "thread_startup_s": 5e-5, "thread_roundtrip_s": 1e-5, "measured_seconds": 0.3,
}  # fmt: skip


def test_old_cache_is_remeasured(cache_dir: Path) -> None:
    """A cache older than the maximum age is measured again."""
    _fresh()
    path = cache_file()
    assert path is not None
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["measured_at"] -= system._MAX_AGE_S + 60
    path.write_text(json.dumps(raw), encoding="utf-8")
    assert _fresh().from_cache is False


def test_cache_can_be_disabled(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AMORSIZE_NO_CACHE=1 measures in memory and writes nothing."""
    monkeypatch.setenv("AMORSIZE_NO_CACHE", "1")
    assert cache_file() is None
    info = _fresh()
    assert info.cache_path is None and info.from_cache is False
    assert list(cache_dir.iterdir()) == []


def test_set_cache_dir_overrides_env(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """set_cache_dir() relocates the cache ahead of AMORSIZE_CACHE_DIR."""
    other = tmp_path_factory.mktemp("elsewhere")
    set_cache_dir(other)
    info = get_system_info()
    assert info.cache_path is not None and Path(info.cache_path).parent == other


def test_unwritable_cache_dir_still_works(cache_dir: Path) -> None:
    """A cache location that cannot be created degrades to an in-memory measurement."""
    blocker = cache_dir / "file"
    blocker.write_text("x")
    set_cache_dir(blocker / "sub")
    info = get_system_info()
    assert info.cache_path is None and info.process_roundtrip_s > 0


def test_refresh_remeasures(cache_dir: Path) -> None:
    """refresh=True measures again even with a valid cache."""
    _fresh()
    assert get_system_info(refresh=True).from_cache is False


def test_as_dict_is_json(cache_dir: Path) -> None:
    """as_dict() holds only JSON-compatible values."""
    d = _fresh().as_dict()
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
    ids=["v2", "v2-unlimited", "v1", "v1-unlimited", "v1-combined", "v2-garbage", "none"],
)
def test_cgroup_quota(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    """Container CPU quotas are read from cgroup v2 and v1 layouts."""
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    assert system._cgroup_quota_cores(str(tmp_path)) == expected


def test_usable_cores_respects_affinity(cache_dir: Path) -> None:
    """Usable cores never exceed the CPUs this process may run on."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert _fresh().usable_cores <= len(os.sched_getaffinity(0))


def test_default_cache_dir_without_platformdirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without platformdirs the cache still has a sane home (the XDG cache home on Linux)."""
    import builtins

    real_import = builtins.__import__

    def no_platformdirs(name: str, *args: object, **kwargs: object) -> object:
        if name == "platformdirs":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_platformdirs)
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg-cache")
    if sys.platform.startswith("linux"):
        assert system._default_cache_dir() == Path("/xdg-cache/amorsize")
    else:
        assert system._default_cache_dir().name in ("amorsize", "Cache")


def test_available_cpus_is_the_affinity_mask() -> None:
    """available_cpus() counts the CPUs this process may run on; usable cores never exceed it."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert system.available_cpus() == len(os.sched_getaffinity(0))
    assert 1.0 <= system._usable_cores() <= system.available_cpus()


def test_thread_pool_costs_are_measured_as_the_backend_pays_them() -> None:
    """Thread start-up and per-task cost come from a real pool, and leave no thread."""
    before = threading.active_count()
    facts = system._measure_threads()
    assert 0 < facts["thread_startup_s"] < 1.0 and 0 < facts["thread_roundtrip_s"] < 1.0
    assert threading.active_count() == before
