"""Worker recycling (issue 15 item 5): ``max_tasks_per_worker`` and ``max_worker_memory``
replace worker processes between chunks, with real pools; every call is counted in a file,
so a lost or duplicated item shows."""

from __future__ import annotations

import builtins
import collections
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from amorsize import execute
from amorsize._timeout import rss_bytes
from amorsize.backends.processes import ProcessesBackend

# Spawned and forkserver workers cannot import this file (importlib mode): ship by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def logged_pid(log: str, x: int) -> tuple[int, int]:
    """``(x, the worker's pid)``, logged."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{x}\n".encode())
    finally:
        os.close(fd)
    return x, os.getpid()


def _calls(path: Path) -> collections.Counter[int]:
    return collections.Counter(int(line) for line in path.read_text().split())


@pytest.fixture
def pool() -> Any:
    backend = ProcessesBackend()
    yield backend
    backend.close()


@pytest.mark.parametrize(("n", "chunksize", "cap"), [(60, 4, 10), (45, 7, 5), (20, 1, 3)])
def test_a_worker_runs_at_most_max_tasks_items(
    tmp_path: Path, pool: Any, n: int, chunksize: int, cap: int
) -> None:
    """No worker runs more than N items; each item runs exactly once; the report counts
    the workers replaced."""
    log = tmp_path / "calls"
    out, report = execute(
        functools.partial(logged_pid, str(log)), range(n), backend=pool, n_jobs=2,
        chunksize=chunksize, max_tasks_per_worker=cap, return_plan=True,
    )  # fmt: skip
    assert [x for x, _ in out] == list(range(n))
    per_worker = collections.Counter(pid for _, pid in out)
    assert max(per_worker.values()) <= cap
    assert len(per_worker) >= -(-n // cap)
    assert report.workers_recycled == sum(1 for c in per_worker.values() if c == cap)
    assert _calls(log) == collections.Counter(range(n))
    assert "workers recycled" in str(report)


def test_a_worker_over_its_memory_limit_is_replaced(tmp_path: Path, pool: Any) -> None:
    """Every worker is over a 1-byte limit after its first chunk: each runs at most that
    chunk and the one prefetched with it, and nothing is lost or run twice."""
    log = tmp_path / "calls"
    out, report = execute(
        functools.partial(logged_pid, str(log)), range(24), backend=pool, n_jobs=2,
        chunksize=3, max_worker_memory=1, return_plan=True,
    )  # fmt: skip
    per_worker = collections.Counter(pid for _, pid in out)
    assert max(per_worker.values()) <= 2 * 3
    assert report.workers_recycled == len(per_worker) >= 4
    assert _calls(log) == collections.Counter(range(24))


def leak(store: list[bytes], x: int) -> int:
    store.append(b"x" * (4 << 20))  # 4 MB kept for the worker's life: a leak
    return os.getpid()


def test_a_leaking_worker_is_replaced_before_it_grows_far(pool: Any) -> None:
    """A function that leaks 4 MB an item, a limit 24 MB above a worker's size: workers are
    replaced, each after a handful of items."""
    limit = rss_bytes() + (24 << 20)  # a forked worker starts at about the parent's size
    pids = execute(
        functools.partial(leak, []), range(40), backend=pool, n_jobs=2, chunksize=1,
        max_worker_memory=limit,
    )  # fmt: skip
    per_worker = collections.Counter(pids)
    assert len(per_worker) >= 3
    assert max(per_worker.values()) <= 40 - 2


def test_the_warm_pool_survives_recycling(tmp_path: Path, pool: Any) -> None:
    """After a recycling run the same pool runs a plain run, with live workers."""
    log = tmp_path / "calls"
    func = functools.partial(logged_pid, str(log))
    execute(func, range(30), backend=pool, n_jobs=2, chunksize=2, max_tasks_per_worker=4)
    assert pool.warm_workers() >= 1
    out = execute(func, range(30), backend=pool, n_jobs=2, chunksize=2)
    assert [x for x, _ in out] == list(range(30))
    assert _calls(log) == collections.Counter({x: 2 for x in range(30)})


def test_warm_workers_past_the_limit_are_replaced_first(tmp_path: Path, pool: Any) -> None:
    """A worker counts its items over its life: one warm from a run of 20 items is
    replaced before a run with max_tasks_per_worker=5 gives it any."""
    func = functools.partial(logged_pid, str(tmp_path / "calls"))
    first = {pid for _, pid in execute(func, range(20), backend=pool, n_jobs=1, chunksize=20)}
    out, report = execute(
        func, range(5), backend=pool, n_jobs=1, chunksize=5, max_tasks_per_worker=5,
        return_plan=True,
    )  # fmt: skip
    assert {pid for _, pid in out}.isdisjoint(first)
    assert report.workers_recycled == 2  # the warm one, then the one that ran these five


def test_recycling_with_timeouts(tmp_path: Path, pool: Any) -> None:
    """Both limits at once: the timeout's replacement and recycling lose nothing."""
    log = tmp_path / "calls"
    out = execute(
        functools.partial(logged_pid, str(log)), range(30), backend=pool, n_jobs=2,
        chunksize=3, max_tasks_per_worker=6, timeout=30.0,
    )  # fmt: skip
    assert [x for x, _ in out] == list(range(30))
    assert max(collections.Counter(pid for _, pid in out).values()) <= 6
    assert _calls(log) == collections.Counter(range(30))


@pytest.mark.parametrize("backend", ["threads", "serial", "auto"])
@pytest.mark.parametrize("option", ["max_tasks_per_worker", "max_worker_memory"])
def test_recycling_needs_the_processes_backend(backend: str, option: str) -> None:
    """Elsewhere it is refused before anything runs, naming the option and the backend."""
    calls: list[int] = []
    with pytest.raises(ValueError, match=rf"{option} must be None unless backend='processes'"
                       rf".*backend here is '{backend}'.*pass backend='processes'"):  # fmt: skip
        execute(calls.append, [1], backend=backend, **{option: 10})
    assert calls == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_tasks_per_worker": 0}, ValueError),
        ({"max_tasks_per_worker": 2.5}, TypeError),
        ({"max_tasks_per_worker": True}, TypeError),
        ({"max_worker_memory": -1}, ValueError),
        ({"max_worker_memory": "1GB"}, TypeError),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """The parameter, the rule and the value given."""
    (name, value), = kwargs.items()
    with pytest.raises(error, match=rf"execute\(\): {name} must be an int in \[1, .*; got "):
        execute(abs, [1], backend="processes", **kwargs)
    del value


def test_rss_falls_back_without_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without psutil: /proc/self/statm, then the peak RSS of getrusage; all agree roughly."""
    with_psutil = rss_bytes()
    real_import = builtins.__import__

    def no_psutil(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "psutil":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    from_proc = rss_bytes()
    real_open = builtins.open

    def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/proc/"):
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    peak = rss_bytes()
    assert 0.5 < from_proc / with_psutil < 2.0
    assert peak >= 0.5 * from_proc  # the peak is never below the current size


def test_each_recycled_worker_is_logged(
    tmp_path: Path, pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Every replaced worker is one INFO record on amorsize.processes, naming the limit."""
    caplog.set_level(logging.INFO, logger="amorsize.processes")
    _, report = execute(
        functools.partial(logged_pid, str(tmp_path / "calls")), range(30), backend=pool,
        n_jobs=2, chunksize=2, max_tasks_per_worker=4, return_plan=True,
    )  # fmt: skip
    recycled = [r for r in caplog.records if r.name == "amorsize.processes"]
    assert report.workers_recycled > 0 and len(recycled) == report.workers_recycled
    for r in recycled:
        assert (r.levelno, r.reason, r.tasks_done) == (logging.INFO, "max_tasks_per_worker", 4)  # type: ignore[attr-defined]
        assert isinstance(r.pid, int) and r.run_id is not None  # type: ignore[attr-defined]
