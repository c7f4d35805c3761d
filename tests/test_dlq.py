"""Dead-letter queue: real SQLite files, real worker processes, replay and export."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from amorsize import ItemFailure, execute
from amorsize.dlq import (
    DeadLetter,
    DeadLetterError,
    DeadLetterQueue,
    DeadLetterWarning,
    dead_letter_observer,
)
from amorsize.retry import RetryPolicy


class Unlucky(Exception):
    """The failure the tests inject."""


def reject_multiples_of_3(x: int) -> int:
    if x % 3 == 0:
        raise Unlucky(f"{x} is a multiple of 3")
    return x


class Unpicklable:
    """An item pickle refuses (it holds a lock), with a readable repr."""

    def __init__(self, n: int) -> None:
        import threading

        self.n = n
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Unpicklable({self.n})"


# --- recording through execute --------------------------------------------------------------
@pytest.mark.parametrize("backend", ["serial", "threads", "processes"])
def test_failures_are_recorded_and_the_run_goes_on(tmp_path: Path, backend: str) -> None:
    """With on_error='raise', recorded failures do not stop the run; each is stored."""
    path = tmp_path / "failed.db"
    n_jobs = 1 if backend == "serial" else 2
    t0 = time.time()
    out = execute(reject_multiples_of_3, range(10), dead_letter=path, backend=backend, n_jobs=n_jobs)
    assert [v for v in out if not isinstance(v, ItemFailure)] == [1, 2, 4, 5, 7, 8]
    entries = DeadLetterQueue(path).entries()
    assert sorted(e.index for e in entries) == [0, 3, 6, 9]
    for e in entries:
        assert e.item == e.index and e.item_pickled
        assert e.exc_type == f"{__name__}.Unlucky"
        assert e.message == f"{e.index} is a multiple of 3"
        assert "reject_multiples_of_3" in e.traceback and "Unlucky" in e.traceback
        assert e.attempts == 1
        assert t0 - 1 <= e.timestamp <= time.time() + 1
        assert e.func.endswith("reject_multiples_of_3")


def test_attempts_include_retries(tmp_path: Path) -> None:
    """An item that exhausted its retries is recorded with the attempts it took."""
    path = tmp_path / "failed.db"
    policy = RetryPolicy(max_retries=2, initial_delay=0.0)
    execute(reject_multiples_of_3, [3, 4], dead_letter=path, retry=policy, backend="serial")
    (entry,) = DeadLetterQueue(path).entries()
    assert entry.index == 0 and entry.attempts == 3


def test_unpicklable_item_is_stored_as_repr(tmp_path: Path) -> None:
    """An item pickle refuses is stored as its repr with a flag; the run does not crash."""
    path = tmp_path / "failed.db"

    def fail(x: Unpicklable) -> int:
        raise Unlucky(str(x.n))

    out = execute(fail, [Unpicklable(1)], dead_letter=path, backend="threads", n_jobs=1)
    assert isinstance(out[0], ItemFailure)
    (entry,) = DeadLetterQueue(path).entries()
    assert entry.item_pickled is False
    assert entry.item == entry.item_repr == "Unpicklable(1)"


def test_repr_that_raises_is_survived(tmp_path: Path) -> None:
    """Even an item whose repr raises is recorded."""

    class Hostile(Unpicklable):
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    dlq = DeadLetterQueue(tmp_path / "failed.db")
    dlq.record(0, Hostile(1), Unlucky("x"))
    assert "repr raised RuntimeError" in dlq.entries()[0].item_repr


def test_queue_is_shared_across_runs(tmp_path: Path) -> None:
    """A DeadLetterQueue object passed to several runs accumulates their failures."""
    dlq = DeadLetterQueue(tmp_path / "failed.db")
    execute(reject_multiples_of_3, range(4), dead_letter=dlq, backend="serial")
    execute(reject_multiples_of_3, range(7), dead_letter=dlq, backend="serial")
    assert dlq.count() == len(dlq) == 2 + 3
    assert [e.index for e in dlq.entries(limit=2)] == [0, 3]


def test_dead_letter_with_checkpoint_resume_retries_failures(tmp_path: Path) -> None:
    """Failures are dead-lettered, not checkpointed: a resumed run tries them again."""
    ck, dl = tmp_path / "run.db", tmp_path / "failed.db"
    kw: dict[str, Any] = {"backend": "serial", "checkpoint": ck, "dead_letter": dl}
    execute(reject_multiples_of_3, range(6), **kw)
    assert DeadLetterQueue(dl).count() == 2
    execute(reject_multiples_of_3, range(6), **kw)
    assert DeadLetterQueue(dl).count() == 4  # the same two failed again


def test_write_failure_warns_and_falls_back_to_on_error(tmp_path: Path) -> None:
    """If the queue cannot be written, the failure is handled as without a queue."""
    obs = dead_letter_observer(tmp_path / "failed.db")
    obs.begin(reject_multiples_of_3)
    assert obs.conn is not None
    obs.conn.close()  # a real SQLite error on the next write
    with pytest.warns(DeadLetterWarning, match="could not be recorded"):
        assert obs.on_failure(0, 0, Unlucky("x"), 1) is False
    obs.end(False)


# --- export ---------------------------------------------------------------------------------
def test_export_jsonl_to_a_path_and_a_file(tmp_path: Path) -> None:
    """Export writes one JSON object per entry, to a path (mode 0o600) or an open file."""
    dlq = DeadLetterQueue(tmp_path / "failed.db")
    dlq.record(4, {"id": 4}, Unlucky("four"), 2, "job.step")
    dlq.record(5, Unpicklable(5), ValueError("five"))
    dest = tmp_path / "out.jsonl"
    assert dlq.export_jsonl(dest) == 2
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert rows[0]["item"] == {"id": 4} and rows[0]["attempts"] == 2 and rows[0]["func"] == "job.step"
    assert rows[0]["exc_type"].endswith("Unlucky") and rows[0]["message"] == "four"
    assert rows[1]["item"] is None and rows[1]["item_repr"] == "Unpicklable(5)"
    assert rows[1]["item_pickled"] is False
    assert rows[1]["timestamp"].endswith("+00:00")
    buf = io.StringIO()
    assert dlq.export_jsonl(buf) == 2
    assert buf.getvalue() == dest.read_text()


# --- replay ---------------------------------------------------------------------------------
def test_replay_removes_successes_and_updates_failures(tmp_path: Path) -> None:
    """replay() runs entries again: successes leave the queue, failures are updated."""
    dlq = DeadLetterQueue(tmp_path / "failed.db")
    execute(reject_multiples_of_3, range(10), dead_letter=dlq, backend="serial")
    dlq.record(99, Unpicklable(99), Unlucky("x"))

    def only_odd(x: int) -> int:
        if x % 2 == 0:
            raise Unlucky(f"still failing on {x}")
        return x * 10

    report = dlq.replay(only_odd, backend="serial")
    assert sorted((e.index, r) for e, r in report.succeeded) == [(3, 30), (9, 90)]
    assert sorted(e.index for e in report.failed) == [0, 6]
    assert [e.index for e in report.skipped] == [99]
    left = {e.index: e for e in dlq.entries()}
    assert sorted(left) == [0, 6, 99]
    assert left[0].attempts == 2 and left[0].message == "still failing on 0"
    assert left[99].attempts == 1


def test_replay_runs_through_worker_processes(tmp_path: Path) -> None:
    """replay() accepts execute's options, here a real process pool."""
    dlq = DeadLetterQueue(tmp_path / "failed.db")
    for i in range(6):
        dlq.record(i, i, Unlucky("x"))
    report = dlq.replay(abs, backend="processes", n_jobs=2)
    assert sorted(r for _, r in report.succeeded) == list(range(6))
    assert len(dlq) == 0


def test_replay_refuses_options_it_owns(tmp_path: Path) -> None:
    """on_error, dead_letter and checkpoint are replay's own business."""
    dlq = DeadLetterQueue(tmp_path / "failed.db")
    with pytest.raises(TypeError, match="on_error"):
        dlq.replay(abs, on_error="raise")


def test_replay_of_an_empty_queue_does_nothing(tmp_path: Path) -> None:
    """An empty queue replays to an empty report."""
    report = DeadLetterQueue(tmp_path / "failed.db").replay(abs)
    assert (report.succeeded, report.failed, report.skipped) == ([], [], [])


def test_remove_and_clear(tmp_path: Path) -> None:
    """Entries can be removed by id, or all at once."""
    dlq = DeadLetterQueue(tmp_path / "failed.db")
    ids = [dlq.record(i, i, Unlucky("x")) for i in range(5)]
    assert dlq.remove(ids[:2]) == 2
    assert [e.index for e in dlq] == [2, 3, 4]
    assert dlq.clear() == 3 and len(dlq) == 0


# --- files ----------------------------------------------------------------------------------
def test_file_is_owner_only(tmp_path: Path) -> None:
    """The dead-letter database is created with mode 0o600."""
    path = tmp_path / "failed.db"
    DeadLetterQueue(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_foreign_or_garbage_file_is_refused_and_untouched(tmp_path: Path) -> None:
    """Not an amorsize dead-letter file: DeadLetterError, the bytes unchanged."""
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 500)
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    for path in (garbage, foreign):
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        with pytest.raises(DeadLetterError):
            DeadLetterQueue(path)
        with pytest.raises(DeadLetterError):
            execute(abs, [1], dead_letter=path, backend="serial")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def _record_many(path: str, start: int, n: int) -> None:
    dlq = DeadLetterQueue(path)
    for i in range(start, start + n):
        dlq.record(i, i, Unlucky(str(i)))


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """Three processes recording at once: every entry is stored."""
    path = str(tmp_path / "failed.db")
    DeadLetterQueue(path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(path, k * 100, 100)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(e.index for e in DeadLetterQueue(path)) == list(range(300))


def test_dead_letter_observer_rejects_other_types(tmp_path: Path) -> None:
    """dead_letter= takes a path or a DeadLetterQueue."""
    with pytest.raises(TypeError, match="dead_letter must be"):
        dead_letter_observer(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"str or os\.PathLike"):
        DeadLetterQueue(None)  # type: ignore[arg-type]
    assert isinstance(dead_letter_observer(os.fspath(tmp_path / "a.db")).queue, DeadLetterQueue)


def test_entry_when_is_utc() -> None:
    """DeadLetter.when is an aware UTC datetime."""
    e = DeadLetter(1, 0, 1, "1", True, "E", "m", "tb", 1, 0.0, "f")
    assert e.when.isoformat() == "1970-01-01T00:00:00+00:00"
