"""The processes backend's promises under abuse: parent death, results and items that do not
travel (issue 12 items 1, 7 and 8), with real worker processes and real signals."""

from __future__ import annotations

import contextlib
import copyreg
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from amorsize import ItemFailure, execute
from amorsize.backends.base import RemoteTraceback, Task, as_outcomes
from amorsize.backends.processes import ProcessesBackend

psutil = pytest.importorskip("psutil")

# Spawned and forkserver workers cannot import this file (importlib mode): ship by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

START_METHODS = ["fork", "spawn", "forkserver"]


def _gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until every pid has exited (a zombie counts as gone); return those still alive."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    deadline = time.monotonic() + timeout
    alive = procs
    while alive and time.monotonic() < deadline:
        _, alive = psutil.wait_procs(alive, timeout=min(0.2, max(deadline - time.monotonic(), 0)))
        alive = [p for p in alive if _running(p)]
    return [p.pid for p in alive if _running(p)]


def _running(proc: Any) -> bool:
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------- item 1: parent death

_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading
    from amorsize import execute
    from amorsize.backends import get_backend

    def work(x):
        os.write(1, f"busy {os.getpid()}\\n".encode())  # one write: lines never interleave
        threading.Event().wait()  # never returns: the worker is mid-item when the parent dies

    if __name__ == "__main__":
        how = sys.argv[2]
        if how == "exit":
            def exit_on_request():
                os.read(0, 1)  # not sys.stdin: a forked worker would inherit its held lock
                os._exit(3)
            threading.Thread(target=exit_on_request, daemon=True).start()
        backend = get_backend("processes", start_method=sys.argv[1])
        execute(work, range(5000), backend=backend, n_jobs=2, chunksize=1)
    """
)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "exit"])
@pytest.mark.parametrize("start_method", START_METHODS)
def test_workers_exit_when_the_parent_dies(tmp_path: Path, start_method: str, how: str) -> None:
    """issue 12 item 1: busy workers exit within seconds of their parent's death, any way."""
    script = tmp_path / "orphans.py"
    script.write_text(_ORPHAN_SCRIPT)
    parent = subprocess.Popen(
        [sys.executable, str(script), start_method, how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    workers: set[int] = set()
    try:
        assert parent.stdout is not None
        while len(workers) < 2:
            line = parent.stdout.readline()
            assert line.startswith("busy "), f"the parent ended or said {line!r}"
            workers.add(int(line.split()[1]))
        if how == "exit":
            assert parent.stdin is not None
            parent.stdin.write("now\n")
            parent.stdin.flush()
        else:
            parent.send_signal(getattr(signal, how))
        parent.wait(timeout=60)
        left = _gone(sorted(workers), timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        for stream in (parent.stdin, parent.stdout):
            if stream is not None:
                stream.close()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert left == [], f"workers {left} outlived their parent ({how}, {start_method})"


def _pipe_ends(pid: int) -> set[tuple[str, int]]:
    """(pipe inode, access mode) of every pipe fd that process ``pid`` holds."""
    ends = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
        except (OSError, IndexError):
            continue
        if target.startswith("pipe:"):
            ends.add((target, int(flags, 8) & os.O_ACCMODE))
    return ends


def _pid(_: Any) -> int:
    return os.getpid()


@pytest.mark.skipif(not Path("/proc/self/fdinfo").exists(), reason="needs Linux /proc")
def test_forked_workers_hold_no_write_end_of_the_parents_pipes() -> None:
    """issue 12 item 1: a forked worker drops the parent's pipe ends, its own task pipe's too."""
    from amorsize.backends import processes as mod

    backend = ProcessesBackend("fork")
    try:
        list(backend.run(_pid, iter([Task(0, [0]), Task(1, [1])]), n_jobs=2, max_in_flight=4))
        task_pipes = {os.readlink(f"/proc/self/fd/{w.out.fileno()}") for w in backend._workers}
        lifeline = os.readlink(f"/proc/self/fd/{mod._LIFELINE[1].fileno()}")
        for w in backend._workers:
            held = {inode for inode, mode in _pipe_ends(w.process.pid) if mode != os.O_RDONLY}
            assert not held & task_pipes, f"worker {w.process.pid} can write to a task pipe"
            assert lifeline not in held, f"worker {w.process.pid} holds the lifeline's write end"
    finally:
        backend.close()


def test_a_pool_started_by_a_thread_that_ended_keeps_working() -> None:
    """issue 12 item 1: workers are tied to the parent process, not to the thread that made them."""
    backend = ProcessesBackend("fork")
    first: list[int] = []
    try:
        starter = threading.Thread(
            target=lambda: first.extend(
                execute(_pid, range(4), backend=backend, n_jobs=2, chunksize=1)
            )
        )
        starter.start()
        starter.join()
        again = execute(_pid, range(4), backend=backend, n_jobs=2, chunksize=1)
        assert set(again) == set(first) and len(set(first)) == 2
        assert backend.warm_workers() == 2
    finally:
        backend.close()


# ---------------------------------------------------------------- items 7 and 8: bad payloads


class TwoArgError(Exception):
    """Pickles, but does not load: its ``__init__`` takes other arguments than ``.args``."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


class LoadsBadly:
    """Pickles anywhere, raises wherever it is unpickled."""

    def __reduce__(self) -> Any:
        return (int, ("not a number",))


class Unpicklable:
    """Cannot be pickled, and its repr raises too."""

    def __reduce__(self) -> Any:
        raise TypeError("not picklable")

    def __repr__(self) -> str:
        raise RuntimeError("repr is broken")


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


class HalfReduced:
    """Its ``__reduce__`` forgets an argument its ``__init__`` needs: pickles, does not load."""

    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b

    def __reduce__(self) -> Any:
        return (HalfReduced, (self.a,))


class StateRefused:
    """Pickles its ``__dict__``; its ``__setstate__`` refuses it on load."""

    def __init__(self) -> None:
        self.x = 1

    def __setstate__(self, state: Any) -> None:
        raise ValueError("state refused")


def _class_only_in_the_worker() -> Any:
    """An instance of a class from a module that exists only in the worker process."""
    module = types.ModuleType("amorsize_worker_only")
    exec("class Here:\n    pass\n", module.__dict__)
    sys.modules[module.__name__] = module
    return module.Here()


BAD_RESULTS = {
    "setstate raises": StateRefused,
    "class missing in the parent": _class_only_in_the_worker,
    "exception as a value": lambda: TwoArgError(1, 2),
    "init needs more than reduce gives": lambda: HalfReduced(1, 2),
    "reduce fails on load": LoadsBadly,
    "nested in a good value": lambda: {"ok": [1, 2], "bad": (LoadsBadly(),)},
}


def _returns_bad_on_three(kind: str, log: str, x: int) -> Any:
    with open(log, "a") as f:
        f.write(f"{x}\n")
    if x == 3:
        return BAD_RESULTS[kind]() if kind in BAD_RESULTS else _BAD_8[kind]()
    if x == 5:
        raise KeyError(x)  # an ordinary failure in the same chunk stays what it is
    return x * 10


_BAD_8 = {"unpicklable, repr raises": Unpicklable, "nested 100,000 deep": lambda: _nested(100_000)}


def _runs(log: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in log.read_text().split():
        counts[int(line)] = counts.get(int(line), 0) + 1
    return counts


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[ProcessesBackend]:
    """A private fork pool started inside the test, so its workers' stderr is captured."""
    # tblib (imported by dask) registers a reducer for every exception class that exists when
    # it is imported, which makes TwoArgError load; the workers fork after this removal.
    monkeypatch.delitem(copyreg.dispatch_table, TwoArgError, raising=False)
    backend = ProcessesBackend("fork")
    yield backend
    backend.close()


def _check_only_item_three_failed(out: list[Any], log: Path, attempts: int) -> ItemFailure:
    assert [o for i, o in enumerate(out) if i not in (3, 5)] == [
        i * 10 for i in range(8) if i not in (3, 5)
    ]
    assert isinstance(out[5], ItemFailure) and isinstance(out[5].exception, KeyError)
    bad = out[3]
    assert isinstance(bad, ItemFailure) and bad.index == 3 and bad.attempts == attempts
    runs = _runs(log)
    assert all(runs.get(i, 0) == 1 for i in range(8) if i != 3), runs
    assert runs.get(3, 0) == attempts, "the bad item ran more than once"
    return bad


@pytest.mark.parametrize("kind", sorted(BAD_RESULTS))
def test_result_that_does_not_unpickle_fails_alone(
    fresh: ProcessesBackend, tmp_path: Path, capfd: pytest.CaptureFixture[str], kind: str
) -> None:
    """issue 12 item 7: a result that pickles but does not load fails its item, named, once."""
    import functools

    log = tmp_path / "runs"
    func = functools.partial(_returns_bad_on_three, kind, str(log))
    out = execute(func, range(8), backend=fresh, n_jobs=2, chunksize=4, on_error="collect")
    bad = _check_only_item_three_failed(out, log, attempts=1)
    assert isinstance(bad.exception, pickle.UnpicklingError)
    text = str(bad.exception)
    assert text.startswith("item 3:") and "cannot be unpickled" in text
    assert capfd.readouterr().err == ""


def test_result_that_does_not_unpickle_raises_its_own_error(fresh: ProcessesBackend) -> None:
    """issue 12 item 7: in raise mode the item's own error is raised, naming it."""
    import functools

    with pytest.raises(pickle.UnpicklingError, match=r"^item 3: .*TwoArgError\('1/2'\)"):
        execute(
            functools.partial(_returns_bad_on_three, "exception as a value", os.devnull),
            range(4),
            backend=fresh,
            n_jobs=2,
            chunksize=4,
        )


def test_raised_exception_that_does_not_unpickle_keeps_the_workers_traceback(
    fresh: ProcessesBackend,
) -> None:
    """issue 12 item 7: a raised exception that does not load keeps the worker's traceback."""
    out = as_outcomes(
        next(iter(fresh.run(_raise_two_arg, iter([Task(0, [0, 1])]), n_jobs=1, max_in_flight=2)))[1]
    )
    assert out[0].ok and out[0].value == 0
    err = out[1].value
    assert isinstance(err, pickle.UnpicklingError) and "TwoArgError('1/2')" in str(err)
    assert isinstance(err.__cause__, RemoteTraceback) and "_raise_two_arg" in err.__cause__.tb


def _raise_two_arg(x: int) -> int:
    if x:
        raise TwoArgError(1, 2)
    return x


@pytest.mark.parametrize("kind", sorted(_BAD_8))
def test_result_that_does_not_pickle_is_an_item_failure_not_a_crash(
    fresh: ProcessesBackend, tmp_path: Path, capfd: pytest.CaptureFixture[str], kind: str
) -> None:
    """issue 12 item 8: an unpicklable or too deep result fails once, quietly; the worker lives."""
    import functools

    log = tmp_path / "runs"
    func = functools.partial(_returns_bad_on_three, kind, str(log))
    execute(_pid, range(2), backend=fresh, n_jobs=2, chunksize=1)
    workers = {w.process.pid for w in fresh._workers}
    out = execute(func, range(8), backend=fresh, n_jobs=2, chunksize=4, on_error="collect")
    bad = _check_only_item_three_failed(out, log, attempts=1)
    assert isinstance(bad.exception, pickle.PicklingError)
    assert str(bad.exception).startswith("item 3: its result cannot be pickled back")
    assert {w.process.pid for w in fresh._workers} == workers, "a worker died"
    assert capfd.readouterr().err == ""


class ItemLoadsBadly:
    """An input item that pickles in the parent and fails to load in the worker."""

    def __reduce__(self) -> Any:
        return (int, ("not a number",))


def _log_item(log: str, x: Any) -> Any:
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return x * 10


def test_item_that_does_not_unpickle_in_the_worker_fails_alone(
    fresh: ProcessesBackend, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """issue 12 item 8: an input item the worker cannot load fails alone, never run; no crash."""
    import functools

    log = tmp_path / "runs"
    execute(_pid, range(2), backend=fresh, n_jobs=2, chunksize=1)
    workers = {w.process.pid for w in fresh._workers}
    data: list[Any] = list(range(8))
    data[3] = ItemLoadsBadly()
    func = functools.partial(_log_item, str(log))
    out = execute(func, data, backend=fresh, n_jobs=2, chunksize=4, on_error="collect")
    assert [o for i, o in enumerate(out) if i != 3] == [i * 10 for i in range(8) if i != 3]
    bad = out[3]
    assert isinstance(bad, ItemFailure) and bad.attempts == 0
    assert isinstance(bad.exception, pickle.UnpicklingError)
    assert str(bad.exception).startswith("item 3 cannot be unpickled in the worker process")
    assert "invalid literal for int()" in str(bad.exception)
    assert _runs(log) == {i: 1 for i in range(8) if i != 3}
    assert {w.process.pid for w in fresh._workers} == workers, "a worker died"
    assert capfd.readouterr().err == ""


class Payload:
    """A plain result, to watch for being kept alive."""


def test_a_reload_failure_keeps_no_other_result_alive() -> None:
    """issue 12 item 7: the failure of a bad result does not pin its chunk's good results."""
    import gc
    import weakref

    from amorsize.backends._wire import reload_outcomes
    from amorsize.backends.base import Outcome

    blob = pickle.dumps((0, [Payload(), HalfReduced(1, 2), Payload()]), protocol=5)
    with pytest.raises(TypeError) as info:
        pickle.loads(blob)
    out = reload_outcomes(
        blob,
        Task(0, [0, 1, 2]),
        info.value,
        "here",
        lambda m: [(v, Outcome(True, v)) for v in m[1]],
    )
    assert [o.ok for o in out] == [True, False, True]
    good = [weakref.ref(o.value) for o in out if o.ok]
    failure = out[1].value
    del out
    gc.collect()
    assert [ref() for ref in good] == [None, None]
    assert str(failure).startswith("item 1:") and "HalfReduced(1)" in str(failure)
