"""Dead-letter queue: real SQLite files, real worker processes, replay and export."""

from __future__ import annotations

import contextlib
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
    dlq = DeadLetterQueue(path)
    (entry,) = dlq.entries()
    assert entry.item_pickled is False and entry.item is None and entry.item_json is False
    assert entry.item_repr == "Unpicklable(1)"
    with pytest.raises(DeadLetterError, match="repr only"):
        dlq.load_item(entry)


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
    execute(reject_multiples_of_3, [10, 12, 15, 18], dead_letter=dlq, backend="serial")
    assert dlq.count() == len(dlq) == 2 + 3
    assert [(e.index, e.item) for e in dlq.entries(limit=3)] == [(0, 0), (3, 3), (1, 12)]


def test_dead_letter_with_checkpoint_resume_retries_failures(tmp_path: Path) -> None:
    """issue 12 item 12: a resumed run tries failures again and updates, not duplicates, them."""
    ck, dl = tmp_path / "run.db", tmp_path / "failed.db"
    kw: dict[str, Any] = {"backend": "serial", "checkpoint": ck, "dead_letter": dl}
    execute(reject_multiples_of_3, range(6), **kw)
    first = DeadLetterQueue(dl).entries()
    assert [(e.index, e.attempts) for e in first] == [(0, 1), (3, 1)]
    execute(reject_multiples_of_3, range(6), **kw)
    again = DeadLetterQueue(dl).entries()
    assert [(e.id, e.index, e.attempts) for e in again] == [(first[0].id, 0, 2), (first[1].id, 3, 2)]
    assert all(b.timestamp >= a.timestamp for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("backend", ["serial", "processes"])
def test_same_failure_is_one_entry_per_function_index_and_item(tmp_path: Path, backend: str) -> None:
    """issue 12 item 12: an entry is keyed by function, index and item; the rest is updated."""
    dlq = DeadLetterQueue(tmp_path / "failed.db")
    policy = RetryPolicy(max_retries=1, initial_delay=0.0)
    for _ in range(3):
        execute(reject_multiples_of_3, [3, 1], dead_letter=dlq, backend=backend, n_jobs=1)
    execute(reject_multiples_of_3, [3], dead_letter=dlq, backend="serial", retry=policy)
    execute(reject_multiples_of_3, [6, 3], dead_letter=dlq, backend="serial")  # new index, item
    dlq.record(0, 3, Unlucky("by hand"), 1, "other.func")  # another function
    got = [(e.func.rsplit(".", 1)[-1], e.index, e.item, e.attempts) for e in dlq]
    assert got == [
        ("reject_multiples_of_3", 0, 3, 5),
        ("reject_multiples_of_3", 0, 6, 1),
        ("reject_multiples_of_3", 1, 3, 1),
        ("func", 0, 3, 1),
    ]


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

    report = dlq.replay(only_odd, execute=execute, backend="serial")
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
    report = dlq.replay(abs, execute=execute, backend="processes", n_jobs=2)
    assert sorted(r for _, r in report.succeeded) == list(range(6))
    assert len(dlq) == 0


def test_replay_refuses_options_it_owns(tmp_path: Path) -> None:
    """on_error, dead_letter and checkpoint are replay's own business."""
    dlq = DeadLetterQueue(tmp_path / "failed.db")
    with pytest.raises(TypeError, match="on_error"):
        dlq.replay(abs, execute=execute, on_error="raise")


def test_replay_of_an_empty_queue_does_nothing(tmp_path: Path) -> None:
    """An empty queue replays to an empty report."""
    report = DeadLetterQueue(tmp_path / "failed.db").replay(abs, execute=execute)
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
    e = DeadLetter(1, 0, 1, True, "1", True, "E", "m", "tb", 1, 0.0, "f")
    assert e.when.isoformat() == "1970-01-01T00:00:00+00:00"


# --- security: listing never unpickles, loading verifies the signature ----------------------
class RunsCode:
    """Pickles to a call that creates ``marker``: what a crafted file would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _forge(path: Path, entry_id: int, blob: bytes, *, keep_mac: bool) -> None:
    """Put ``blob`` in the entry as someone without the signing key would."""
    conn = sqlite3.connect(path)
    if keep_mac:
        conn.execute("UPDATE dead_letters SET item = ? WHERE id = ?", (blob, entry_id))
    else:
        conn.execute(
            "UPDATE dead_letters SET item = ?, item_mac = NULL, key_id = NULL WHERE id = ?",
            (blob, entry_id),
        )
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("keep_mac", "why"), [(False, "carries no signature.*trust=True"), (True, "is damaged")]
)
def test_crafted_item_runs_only_with_trust(
    tmp_path: Path, keep_mac: bool, why: str
) -> None:
    """issue 12 item 16: listing a crafted file runs nothing; replay refuses it unless trusted."""
    import pickle

    path, marker = tmp_path / "failed.db", tmp_path / "owned"
    dlq = DeadLetterQueue(path)
    entry_id = dlq.record(0, 7, Unlucky("x"), 1, "job")
    _forge(path, entry_id, pickle.dumps(RunsCode(marker)), keep_mac=keep_mac)
    (entry,) = dlq.entries()
    assert (entry.item, entry.item_repr) == (7, "7")  # the text stored at write time
    dlq.export_jsonl(io.StringIO())
    assert not marker.exists()
    for load in (
        lambda: dlq.replay(abs, execute=execute, backend="serial"),
        lambda: dlq.load_item(entry),
    ):
        with pytest.raises(DeadLetterError, match=why):
            load()
        assert not marker.exists()
    assert len(dlq) == 1
    dlq.replay(str, execute=execute, backend="serial", trust=True)
    assert marker.exists()  # trust=True means: run what the file holds


def test_item_signed_by_another_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 12 item 16: an entry written by another user (another key) loads only with trust."""
    from amorsize import _signing

    dlq = DeadLetterQueue(tmp_path / "failed.db")
    monkeypatch.setenv("AMORSIZE_CONFIG_DIR", str(tmp_path / "someone-else"))
    _signing._reset()
    entry_id = dlq.record(0, {"id": 1}, Unlucky("x"))
    assert dlq.load_item(entry_id) == {"id": 1}
    monkeypatch.setenv("AMORSIZE_CONFIG_DIR", str(tmp_path / "me"))
    _signing._reset()
    try:
        with pytest.raises(DeadLetterError, match="signed by another key"):
            dlq.load_item(entry_id)
        assert dlq.load_item(entry_id, trust=True) == {"id": 1}
    finally:
        _signing._reset()


def test_every_flipped_byte_is_a_dead_letter_error(tmp_path: Path) -> None:
    """issue 12 item 16: a damaged item is a DeadLetterError, never a raw exception."""
    path = tmp_path / "failed.db"
    dlq = DeadLetterQueue(path)
    entry_id = dlq.record(0, ("payload", 12345, [1.5, None]), Unlucky("x"))
    conn = sqlite3.connect(path)
    (blob,) = conn.execute("SELECT item FROM dead_letters").fetchone()
    conn.close()
    for pos in range(len(blob)):
        for bit in (0x01, 0x80):
            damaged = bytearray(blob)
            damaged[pos] ^= bit
            _forge(path, entry_id, bytes(damaged), keep_mac=True)
            with pytest.raises(DeadLetterError, match="damaged"):
                dlq.load_item(entry_id)
            # Trusted: may load some other value, or say it is damaged, nothing else.
            with contextlib.suppress(DeadLetterError):
                dlq.load_item(entry_id, trust=True)


def test_forged_columns_are_a_dead_letter_error(tmp_path: Path) -> None:
    """issue 12 item 16: a listed column of the wrong type or range is a DeadLetterError."""
    path = tmp_path / "failed.db"
    dlq = DeadLetterQueue(path)
    dlq.record(0, 1, Unlucky("x"))
    for column, value in [("timestamp", 1e300), ("idx", "zero"), ("item_json", "[[[")]:
        conn = sqlite3.connect(path)
        conn.execute(f"UPDATE dead_letters SET {column} = ?", (value,))
        conn.commit()
        conn.close()
        if column == "item_json":
            (entry,) = dlq.entries()  # damaged JSON copy: listed by its repr
            assert (entry.item, entry.item_json, entry.item_repr) == (None, False, "1")
        else:
            with pytest.raises(DeadLetterError, match="wrong type or out of range"):
                dlq.entries()
            path.unlink()
            dlq = DeadLetterQueue(path)
            dlq.record(0, 1, Unlucky("x"))


def test_format_version_1_file_is_refused(tmp_path: Path) -> None:
    """A file in the old format (items unsigned, one row per failure) is refused unchanged."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE amorsize_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO amorsize_meta VALUES ('format', 'amorsize-dead-letter'), ('version', '1')")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(DeadLetterError, match="format version '1'"):
        DeadLetterQueue(path)
    assert path.read_bytes() == before


def test_json_copy_only_when_exact(tmp_path: Path) -> None:
    """Entries list the item itself only when JSON gives it back exactly."""
    dlq = DeadLetterQueue(tmp_path / "failed.db")
    items: list[Any] = ["a", 1, 2.5, None, {"k": [1, "x"]}, (1, 2), {1: "a"}, {1}, 10**5000]
    for i, item in enumerate(items):
        dlq.record(i, item, Unlucky("x"))
    got = [(e.item_json, e.item) for e in dlq]
    assert got[:5] == [(True, item) for item in items[:5]]
    assert got[5:] == [(False, None)] * 4
    assert [dlq.load_item(e) for e in dlq] == items
