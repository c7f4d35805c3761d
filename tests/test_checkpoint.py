"""Checkpoint/resume: real SQLite files, real processes, a real SIGKILL."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amorsize import execute
from amorsize._core import ItemHasher
from amorsize.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWarning,
    StoreError,
    _expand_runs,
    _hasher,
    _runs_of,
    checkpoint_observer,
    function_identity,
    item_hash,
)
from amorsize.dlq import DeadLetterQueue


def square(x: int) -> int:
    return x * x


class Stop(Exception):
    """Ends a run early, standing in for a crash."""


# The item index at which `stopping_square` fails (None: never). Module level, so the function
# keeps the same identity (module, name, code) between the interrupted and the resumed run.
STOP_AT: set[int] = set()
CALLS: list[int] = []


def stopping_square(x: int) -> int:
    CALLS.append(x)
    if x in STOP_AT:
        raise Stop(x)
    return x * x


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    STOP_AT.clear()
    CALLS.clear()


# --- basic run and resume -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["serial", "threads", "processes"])
def test_first_run_records_every_result(tmp_path: Path, backend: str) -> None:
    """A complete run stores one result per item and marks the run completed."""
    path = tmp_path / "run.db"
    data = list(range(300))
    n_jobs = 1 if backend == "serial" else 2
    assert execute(square, data, checkpoint=path, backend=backend, n_jobs=n_jobs) == [
        x * x for x in data
    ]
    ck = Checkpoint(path)
    assert ck.results() == {x: x * x for x in data}
    assert len(ck) == 300
    head = ck.header()
    assert head["func_qualname"] == "square" and head["n_items"] == "300"
    assert "completed_at" in head


def test_second_run_reuses_results_without_calling(tmp_path: Path) -> None:
    """Running the same call again returns the full list and runs nothing."""
    path = tmp_path / "run.db"
    data = list(range(200))
    execute(stopping_square, data, checkpoint=path, backend="serial")
    CALLS.clear()
    results, plan = execute(
        stopping_square, data, checkpoint=path, backend="serial", return_plan=True
    )
    assert results == [x * x for x in data]
    assert CALLS == []
    assert plan.skipped == 200


@pytest.mark.parametrize("backend", ["serial", "threads"])
def test_interrupted_run_resumes_only_missing_items(tmp_path: Path, backend: str) -> None:
    """After a failure ends a run, the resumed run computes only what was not stored."""
    path = tmp_path / "run.db"
    data = list(range(500))
    # An explicit plan: the optimizer's sampling would make the call counts plan-dependent.
    kw: dict[str, Any] = {"backend": backend, "n_jobs": 1 if backend == "serial" else 2, "chunksize": 16}
    STOP_AT.add(321)
    with pytest.raises(Stop):
        execute(stopping_square, data, checkpoint=path, **kw)
    stored = set(Checkpoint(path).results())
    assert stored and 321 not in stored and "completed_at" not in Checkpoint(path).header()
    STOP_AT.clear()
    CALLS.clear()
    assert execute(stopping_square, data, checkpoint=path, **kw) == [x * x for x in data]
    assert sorted(CALLS) == sorted(set(data) - stored)


def test_resume_with_the_optimizer_runs_no_stored_item(tmp_path: Path) -> None:
    """Letting the optimizer plan a resumed run does not run stored items while sampling."""
    path = tmp_path / "run.db"
    data = list(range(500))
    execute(stopping_square, data, checkpoint=path, backend="serial")
    CALLS.clear()
    assert execute(stopping_square, data, checkpoint=path) == [x * x for x in data]
    assert CALLS == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.lists(st.integers(-1000, 1000), max_size=150),
    stop=st.integers(0, 160),
    commit_every=st.integers(1, 40),
)
def test_resume_equals_uninterrupted_run(
    tmp_path: Path, data: list[int], stop: int, commit_every: int
) -> None:
    """For any input, interruption point and batch size: resumed results == serial results."""
    STOP_AT.clear()
    path = tmp_path / f"h{uuid.uuid4().hex}.db"
    ck = Checkpoint(path, commit_every=commit_every)
    if stop < len(data):
        STOP_AT.add(data[stop])
        with pytest.raises(Stop):
            execute(stopping_square, data, checkpoint=ck, backend="serial")
        STOP_AT.clear()
    assert execute(stopping_square, data, checkpoint=ck, backend="serial") == [x * x for x in data]
    assert Checkpoint(path).results() == {i: x * x for i, x in enumerate(data)}


def test_generator_input_resumes(tmp_path: Path) -> None:
    """Inputs of unknown length (generators) checkpoint and resume too."""
    path = tmp_path / "gen.db"
    STOP_AT.add(70)
    with pytest.raises(Stop):
        execute(stopping_square, (x for x in range(100)), checkpoint=path, backend="serial")
    STOP_AT.clear()
    out = execute(stopping_square, (x for x in range(100)), checkpoint=path, backend="serial")
    assert out == [x * x for x in range(100)]
    assert Checkpoint(path).header()["n_items"] == ""


def test_failed_items_are_not_stored_and_run_again(tmp_path: Path) -> None:
    """With on_error='collect', failures are not checkpointed; the next run retries them."""
    path = tmp_path / "run.db"
    STOP_AT.update({3, 7})
    first = execute(stopping_square, range(10), checkpoint=path, backend="serial", on_error="collect")
    assert [type(v).__name__ for v in first].count("ItemFailure") == 2
    assert set(Checkpoint(path).results()) == set(range(10)) - {3, 7}
    assert "completed_at" not in Checkpoint(path).header()
    STOP_AT.clear()
    CALLS.clear()
    assert execute(stopping_square, range(10), checkpoint=path, backend="serial") == [
        x * x for x in range(10)
    ]
    assert sorted(CALLS) == [3, 7]


# --- mismatches -----------------------------------------------------------------------------
def test_changed_item_is_a_clear_error(tmp_path: Path) -> None:
    """A different item at a stored index raises CheckpointMismatchError naming it."""
    path = tmp_path / "run.db"
    execute(square, [1, 2, 3, 4], checkpoint=path, backend="serial")
    with pytest.raises(CheckpointMismatchError, match=r"index 2 \(99\)"):
        execute(square, [1, 2, 99, 4], checkpoint=path, backend="serial")


def test_changed_length_is_a_clear_error(tmp_path: Path) -> None:
    """A different input length is reported before anything runs."""
    path = tmp_path / "run.db"
    execute(square, [1, 2, 3], checkpoint=path, backend="serial")
    with pytest.raises(CheckpointMismatchError, match="3 input items, this run has 4"):
        execute(square, [1, 2, 3, 4], checkpoint=path, backend="serial")


def test_other_function_is_a_clear_error(tmp_path: Path) -> None:
    """Another function (module.qualname) cannot reuse the checkpoint."""
    path = tmp_path / "run.db"
    execute(square, [1, 2], checkpoint=path, backend="serial")
    with pytest.raises(CheckpointMismatchError, match=r"square, this run calls .*stopping_square"):
        execute(stopping_square, [1, 2], checkpoint=path, backend="serial")


def _same_name_other_code(body: str) -> Any:
    ns: dict[str, Any] = {}
    exec(f"def square(x):\n    return {body}\n", ns)
    f = ns["square"]
    f.__module__ = __name__
    return f


def test_changed_code_is_an_error_unless_check_code_is_off(tmp_path: Path) -> None:
    """Same name, edited code: refused by default, accepted with check_code=False."""
    path = tmp_path / "run.db"
    v1, v2 = _same_name_other_code("x * x"), _same_name_other_code("x * x + 0")
    execute(v1, [1, 2], checkpoint=path, backend="serial")
    with pytest.raises(CheckpointMismatchError, match=r"code of .*square changed"):
        execute(v2, [1, 2], checkpoint=path, backend="serial")
    assert execute(v2, [1, 2], checkpoint=Checkpoint(path, check_code=False), backend="serial") == [1, 4]


def test_function_identity_looks_through_wrappers() -> None:
    """Retry and circuit wrappers do not change the identity; partial arguments do."""
    import functools

    from amorsize import with_circuit_breaker, with_retry

    base = function_identity(square)
    assert function_identity(with_retry(max_retries=1)(square)) == base
    assert function_identity(with_circuit_breaker(square)) == base
    p1 = function_identity(functools.partial(pow, exp=2))
    p2 = function_identity(functools.partial(pow, exp=3))
    assert p1["func_qualname"] == "pow" and p1 != p2


KEY = bytes(range(16))


def test_item_hash_is_stable_across_processes(tmp_path: Path) -> None:
    """Item hashes depend on the file's key only, not on the process (no PYTHONHASHSEED)."""
    items = [1, "a", (1, "b"), {"k": [1, 2]}, 2.5, None, True, "1", 1.0, -1, 2**70]
    here = [item_hash(x, KEY) for x in items]
    code = (
        "from amorsize.checkpoint import item_hash;"
        "print([item_hash(x, bytes(range(16))) for x in [1, 'a', (1, 'b'), {'k': [1, 2]}, 2.5,"
        " None, True, '1', 1.0, -1, 2**70]])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == repr(here)
    assert len(set(here)) == len(here)
    assert item_hash(lambda: 1, KEY) is None


_ITEMS = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([-(2**63) - 1, -(2**63), 2**63 - 1, 2**63, 0, -1, True, False]),
    st.text(max_size=5),
    st.floats(allow_nan=False),
    st.none(),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.just(lambda: 0),  # does not pickle: no hash
)


@given(st.lists(_ITEMS, max_size=40))
def test_packed_hashes_are_item_hash(items: list[Any]) -> None:
    """The compiled block hasher gives item_hash's values, little-endian, 0 for no hash."""
    blob, missing = _hasher(KEY).pack(items)
    hashes = [item_hash(x, KEY) for x in items]
    assert blob == b"".join((h or 0).to_bytes(8, "little") for h in hashes)
    assert missing == hashes.count(None)
    assert 0 not in hashes


def test_packed_hashes_survive_an_item_that_resizes_the_list() -> None:
    """Hashing runs item code (pickling); a list it resizes cannot make the loop overrun."""
    items: list[Any] = []

    class Grower:
        def __reduce__(self) -> Any:
            items.extend(range(1000))
            return (int, (7,))

    items += [1, Grower(), 3]
    blob, missing = _hasher(KEY).pack(items)
    assert len(blob) == 3 * 8 and missing == 0


@pytest.mark.parametrize(("digest", "expected"), [(0, 2), (1, 2), (6, 6), (7, 6), (2**64 - 1, 2**64 - 2)])
def test_item_hasher_alone_makes_non_int_hashes_even_and_nonzero(digest: int, expected: int) -> None:
    """The int-hash rule lives in ItemHasher: it tags any other hash even and never 0."""
    hasher = ItemHasher(KEY, lambda item: digest)
    assert hasher("x") == expected
    assert hasher.pack(["x", 2**70]) == (expected.to_bytes(8, "little") * 2, 0)
    assert hasher(5) % 2 == 1 and hasher(-(2**63)) % 2 == 1


@given(st.lists(st.integers(min_value=-5, max_value=10**6), max_size=60))
def test_index_runs_round_trip(indices: list[int]) -> None:
    """The (start, count) runs a batch stores stand for exactly its indices, in order."""
    runs = _runs_of(indices)
    assert _expand_runs(runs) == indices
    assert len(runs) <= 2 * len(indices)
    assert all(count >= 1 for count in runs[1::2])


# --- unusable files: clear errors, nothing overwritten --------------------------------------
def test_garbage_file_is_refused_and_untouched(tmp_path: Path) -> None:
    """A file that is not SQLite gives CheckpointError and keeps its bytes."""
    path = tmp_path / "notes.db"
    path.write_bytes(os.urandom(8192))
    before = file_digest(path)
    with pytest.raises(CheckpointError, match="not a readable SQLite database"):
        execute(square, [1, 2], checkpoint=path, backend="serial")
    assert file_digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_foreign_database_is_refused_and_untouched(tmp_path: Path) -> None:
    """Another application's SQLite database is not taken over."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()
    before = file_digest(path)
    with pytest.raises(CheckpointError, match=r"another application's database.*users"):
        execute(square, [1], checkpoint=path, backend="serial")
    assert file_digest(path) == before
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


def test_dead_letter_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    """Mixing up a dead-letter file and a checkpoint is caught, both ways."""
    dlq_path, ck_path = tmp_path / "failed.db", tmp_path / "run.db"
    DeadLetterQueue(dlq_path)
    with pytest.raises(CheckpointError, match="'amorsize-dead-letter' file"):
        execute(square, [1], checkpoint=dlq_path, backend="serial")
    execute(square, [1], checkpoint=ck_path, backend="serial")
    with pytest.raises(StoreError, match="'amorsize-checkpoint' file"):
        DeadLetterQueue(ck_path)


@pytest.mark.parametrize("kind", ["checkpoint", "dead-letter"])
def test_other_format_version_is_refused_and_untouched(tmp_path: Path, kind: str) -> None:
    """A file written in another format version is refused, not misread or migrated."""
    path = tmp_path / f"{kind}.db"
    if kind == "checkpoint":
        execute(square, [1, 2], checkpoint=path, backend="serial")
    else:
        DeadLetterQueue(path)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE amorsize_meta SET value = '0' WHERE key = 'version'")
    conn.close()
    before = file_digest(path)
    with pytest.raises(StoreError, match=r"format version '0'.*reads version") as info:
        if kind == "checkpoint":
            execute(square, [1, 2], checkpoint=path, backend="serial")
        else:
            DeadLetterQueue(path)
    assert str(path) in str(info.value) and "left unchanged" in str(info.value)
    assert file_digest(path) == before


def test_corrupted_checkpoint_is_a_clear_error_and_untouched(tmp_path: Path) -> None:
    """A checkpoint damaged on disk gives CheckpointError; its bytes are not rewritten."""
    path = tmp_path / "run.db"
    execute(square, list(range(3000)), checkpoint=Checkpoint(path, commit_every=50), backend="serial")
    raw = bytearray(path.read_bytes())
    assert len(raw) > 4 * 4096
    raw[4096 : len(raw) - 4096] = os.urandom(len(raw) - 8192)  # pages past the schema page
    path.write_bytes(bytes(raw))
    before = file_digest(path)
    with pytest.raises(CheckpointError):
        execute(square, list(range(3000)), checkpoint=path, backend="serial")
    assert file_digest(path) == before


def test_directory_path_is_refused(tmp_path: Path) -> None:
    """A directory is not a checkpoint file."""
    with pytest.raises(CheckpointError, match="directory"):
        execute(square, [1], checkpoint=tmp_path, backend="serial")


# --- files and permissions ------------------------------------------------------------------
def test_files_are_owner_only(tmp_path: Path) -> None:
    """The database and its WAL/shared-memory files are created with mode 0o600."""
    path = tmp_path / "run.db"
    old = os.umask(0o000)  # even with a permissive umask
    try:
        obs = checkpoint_observer(path, square, [1, 2])
        obs.begin(square)
        assert obs.known(0, 1) == (False, None)
        obs.on_success(0, 1, 1)
        obs.flush()
        assert mode(path) == 0o600
        for suffix in ("-wal", "-shm"):
            side = Path(str(path) + suffix)
            assert side.exists() and mode(side) == 0o600, suffix
        obs.end(False)
    finally:
        os.umask(old)


def test_existing_file_permissions_are_kept(tmp_path: Path) -> None:
    """An existing (empty) file the user created keeps the mode the user chose."""
    path = tmp_path / "run.db"
    path.touch()
    path.chmod(0o640)
    execute(square, [1], checkpoint=path, backend="serial")
    assert mode(path) == 0o640


def test_wal_mode_and_durability_setting(tmp_path: Path) -> None:
    """The file uses the WAL journal; synchronous follows the option."""
    path = tmp_path / "run.db"
    for level, code in (("NORMAL", 1), ("FULL", 2)):
        obs = checkpoint_observer(Checkpoint(path, synchronous=level), square, None)  # type: ignore[arg-type]
        obs.begin(square)
        assert obs.conn is not None
        assert obs.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert obs.conn.execute("PRAGMA synchronous").fetchone()[0] == code
        obs.end(True)


# --- concurrency ----------------------------------------------------------------------------
def _writer(path: str, start: int, n: int) -> None:
    ck = Checkpoint(path, commit_every=5)
    obs = checkpoint_observer(ck, square, None)
    obs.begin(square)
    for i in range(start, start + n):
        hit, _ = obs.known(i, i)
        if not hit:
            obs.on_success(i, i, i * i)
    obs.end(False)


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """Four processes writing overlapping ranges at once: every result stored, once."""
    path = str(tmp_path / "shared.db")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, k * 150, 300)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert Checkpoint(path).results() == {i: i * i for i in range(750)}


# --- what cannot be pickled -----------------------------------------------------------------
def test_unpicklable_item_warns_once_and_runs_again(tmp_path: Path) -> None:
    """An unpicklable item is not checkpointed (warned once); the rest is."""
    path = tmp_path / "run.db"
    data: list[Any] = [1, lambda: 2, 3, lambda: 4]

    def call(x: Any) -> Any:
        return x() if callable(x) else x

    with pytest.warns(CheckpointWarning, match="cannot be pickled") as rec:
        assert execute(call, data, checkpoint=path, backend="threads") == [1, 2, 3, 4]
    assert len(rec) == 1
    assert set(Checkpoint(path).results()) == {0, 2}


def test_unpicklable_result_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """A result that cannot be pickled is dropped from the batch; the others are saved."""
    path = tmp_path / "run.db"

    def make(x: int) -> Any:
        return (lambda: x) if x == 2 else x

    with pytest.warns(CheckpointWarning, match="result of item 2"):
        out = execute(make, [0, 1, 2, 3], checkpoint=path, backend="serial")
    assert out[:2] == [0, 1] and out[2]() == 2
    assert Checkpoint(path).results() == {0: 0, 1: 1, 3: 3}


# --- arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"synchronous": "OFF"}, ValueError),
        ({"commit_every": 0}, ValueError),
        ({"commit_every": True}, TypeError),  # True is not a count (amorsize._validate)
        ({"commit_interval": -1}, ValueError),
    ],
)
def test_checkpoint_rejects_bad_options(tmp_path: Path, kwargs: dict[str, Any], error: type) -> None:
    """Bad options raise at construction, naming the option."""
    with pytest.raises(error, match=next(iter(kwargs))):
        Checkpoint(tmp_path / "x.db", **kwargs)


def test_checkpoint_observer_rejects_other_types() -> None:
    """checkpoint= takes a path or a Checkpoint."""
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        checkpoint_observer(42, square, [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"str or os\.PathLike"):
        Checkpoint(3.5)  # type: ignore[arg-type]


# --- the real thing: SIGKILL of the parent and its workers ----------------------------------
KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from amorsize import execute
    from amorsize.checkpoint import Checkpoint

    def work(x):
        t = time.perf_counter() + 0.0004
        while time.perf_counter() < t:
            pass
        return (x, x * 7 % 1000)

    if __name__ == "__main__":
        ck = Checkpoint(sys.argv[1], commit_every=20, commit_interval=0.02)
        out = execute(work, list(range(int(sys.argv[2]))), checkpoint=ck,
                      backend="processes", n_jobs=2, chunksize=4)
        print("done", len(out))
    """
)


def _stored_count(path: Path) -> int:
    try:
        return len(Checkpoint(path))
    except (StoreError, sqlite3.Error):
        return 0


def _children_of_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(sys.platform != "linux", reason="uses process groups and /proc")
def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    """SIGKILL of a running execute and its workers at random moments; resume is exact."""
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT)
    n = 3000
    ns: dict[str, Any] = {}
    exec(compile(KILL_SCRIPT, str(script), "exec"), ns)
    expected = [(x, x * 7 % 1000) for x in range(n)]
    rng = random.Random()
    path = tmp_path / "run.db"
    kills = 0
    for _round in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), str(n)],
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # Wait until this round has committed something new, then a random extra moment.
        before = _stored_count(path)
        deadline = time.monotonic() + 30
        while _stored_count(path) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        for _ in range(100):  # reaped by init: wait until the group is gone
            if not _children_of_group(proc.pid):
                break
            time.sleep(0.02)
        assert _children_of_group(proc.pid) == []
    assert kills >= 1, "the job always finished before the kill: make it longer"
    stored = Checkpoint(path).results()
    assert all(stored[i] == expected[i] for i in stored)  # nothing half-written
    # The resumed run: same results as an uninterrupted one, nothing missing or duplicated.
    work = types.FunctionType(ns["work"].__code__, ns, "work")
    work.__module__ = "__main__"
    ck = Checkpoint(path)
    results, plan = execute(work, list(range(n)), checkpoint=ck, backend="threads", return_plan=True)
    assert results == expected
    assert plan.skipped == len(stored)
    assert Checkpoint(path).results() == dict(enumerate(expected))


# --- interruptions and combinations ---------------------------------------------------------
INTERRUPT_AT: set[int] = set()


def interruptible_square(x: int) -> int:
    if x in INTERRUPT_AT:
        raise KeyboardInterrupt
    CALLS.append(x)
    return x * x


def test_ctrl_c_keeps_the_finished_results(tmp_path: Path) -> None:
    """KeyboardInterrupt ends the run, the results finished before it are committed."""
    path = tmp_path / "run.db"
    INTERRUPT_AT.add(150)
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(interruptible_square, range(300), checkpoint=path, backend="serial", chunksize=10)
    finally:
        INTERRUPT_AT.clear()
    stored = Checkpoint(path).results()
    assert set(stored) == set(range(150))
    CALLS.clear()
    assert execute(interruptible_square, range(300), checkpoint=path, backend="serial") == [
        x * x for x in range(300)
    ]
    assert sorted(CALLS) == list(range(150, 300))


def test_empty_input(tmp_path: Path) -> None:
    """An empty input makes an empty, completed checkpoint."""
    path = tmp_path / "run.db"
    assert execute(square, [], checkpoint=path, backend="serial") == []
    assert execute(square, [], checkpoint=path, backend="serial") == []
    head = Checkpoint(path).header()
    assert head["n_items"] == "0" and "completed_at" in head and len(Checkpoint(path)) == 0


SERVICE_DOWN_FROM: list[int] = []


def flaky_service(x: int) -> int:
    if SERVICE_DOWN_FROM and x >= SERVICE_DOWN_FROM[0]:
        raise ConnectionError("down")
    CALLS.append(x)
    return x + 1000


def test_circuit_stop_then_resume_completes_the_run(tmp_path: Path) -> None:
    """The circuit stops a run part-way; once the service is back, resume finishes it."""
    from amorsize import CircuitBreakerPolicy, CircuitOpenError

    path = tmp_path / "run.db"
    kw: dict[str, Any] = {"checkpoint": path, "backend": "serial", "chunksize": 1}
    SERVICE_DOWN_FROM.append(40)
    try:
        with pytest.raises(CircuitOpenError) as info:
            execute(
                flaky_service, range(100), circuit_breaker=CircuitBreakerPolicy(failure_threshold=3),
                dead_letter=tmp_path / "failed.db", **kw,
            )
    finally:
        SERVICE_DOWN_FROM.clear()
    assert info.value.completed == 40 and info.value.not_attempted == 57
    assert set(Checkpoint(path).results()) == set(range(40))
    CALLS.clear()
    assert execute(flaky_service, range(100), **kw) == [x + 1000 for x in range(100)]
    assert sorted(CALLS) == list(range(40, 100))


# --- block hooks (one call per chunk instead of per item) ------------------------------------
def _observer(path: Path, n: int | None) -> Any:
    obs = checkpoint_observer(path, square, list(range(n)) if n is not None else None)
    obs.begin(square)
    return obs


def test_block_hooks_record_and_resume(tmp_path: Path) -> None:
    """known_block/on_success_block store results that a later run (any hooks) reads back."""
    path = tmp_path / "run.db"
    obs = _observer(path, 10)
    assert obs.known_block(0, list(range(6))) == {}
    obs.on_success_block(0, list(range(6)), [x * x for x in range(6)])
    obs.end(False)
    obs = _observer(path, 10)
    assert obs.known_block(4, [4, 5, 6, 7]) == {0: 16, 1: 25}
    assert obs.known(2, 2) == (True, 4)
    obs.end(False)


def test_block_hashes_are_taken_before_the_items_run(tmp_path: Path) -> None:
    """An item mutated by the function is recorded under its original hash, on any path."""
    path = tmp_path / "run.db"
    original = [{"n": i} for i in range(6)]
    items = [dict(x) for x in original]
    obs = _observer(path, 6)
    obs.known_block(0, items)
    for item in items:
        item["seen"] = True  # the function mutated its input
    obs.on_success_block(0, items[:2], [0, 1])  # the executor split the block
    obs.on_success(2, items[2], 2)
    obs.on_failure(3, items[3], Stop(3), 1)
    obs.on_success(4, items[4], 4)
    obs.on_success(5, items[5], 5)
    obs.end(False)
    assert obs._block_hashes == {} and obs._pending == {}
    obs = _observer(path, 6)
    hits = [obs.known(i, x) for i, x in enumerate(original)]
    assert hits == [(True, 0), (True, 1), (True, 2), (False, None), (True, 4), (True, 5)]
    obs.end(False)


def test_block_with_an_unpicklable_item_keeps_the_others(tmp_path: Path) -> None:
    """A block whose hashes miss one item records the rest, item by item."""
    path = tmp_path / "run.db"
    items: list[Any] = [0, 1, lambda: 2, 3]
    obs = _observer(path, 4)
    obs.known_block(0, items)
    with pytest.warns(CheckpointWarning, match="item 2 cannot be pickled"):
        obs.on_success_block(0, items, [0, 1, 4, 9])
    obs.end(False)
    assert Checkpoint(path).results() == {0: 0, 1: 1, 3: 9}


def test_batches_with_gaps_resume_at_the_right_indices(tmp_path: Path) -> None:
    """Results from scattered chunks (runs with gaps, out of order) resume by index."""
    path = tmp_path / "run.db"
    obs = _observer(path, 30)
    for start in (20, 0, 10):
        obs.known_block(start, list(range(start, start + 5)))
    obs.on_success_block(20, list(range(20, 25)), [x * x for x in range(20, 25)])
    obs.on_success_block(0, list(range(5)), [x * x for x in range(5)])
    obs.on_success(10, 10, 100)
    obs.on_failure(11, 11, Stop(11), 1)
    obs.on_success(12, 12, 144)
    obs.end(False)
    expected = {i: i * i for i in [*range(5), 10, 12, *range(20, 25)]}
    assert Checkpoint(path).results() == expected
    assert len(Checkpoint(path)) == len(expected)
    obs = _observer(path, 30)
    assert obs.known_block(8, list(range(8, 14))) == {2: 100, 4: 144}
    obs.end(False)


def test_execute_iter_resumes_too(tmp_path: Path) -> None:
    """execute_iter with a checkpoint: an abandoned stream resumes without rerunning items."""
    from amorsize import execute_iter

    path = tmp_path / "run.db"
    kw: dict[str, Any] = {"checkpoint": path, "backend": "serial", "chunksize": 10}
    stream = execute_iter(stopping_square, range(100), **kw)
    first = [next(stream) for _ in range(35)]
    stream.close()  # the consumer stops early: finished results are committed
    assert first == [x * x for x in range(35)]
    stored = set(Checkpoint(path).results())
    assert set(range(35)) <= stored
    CALLS.clear()
    assert list(execute_iter(stopping_square, range(100), **kw)) == [x * x for x in range(100)]
    assert sorted(CALLS) == sorted(set(range(100)) - stored)


# --- issue 12: identity covers the values a function uses (item 4) --------------------------
def _load_module(path: Path, name: str) -> types.ModuleType:
    """Import ``path`` afresh as module ``name`` (a new version of the same module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


_HELPERS = "def helper(x):\n    return x + {v}\n\n\n"
_VERSIONS = {
    "default": "def work(x, scale={v}):\n    return x * scale\n",
    "keyword default": "def work(x, *, scale={v}):\n    return x * scale\n",
    "closure": "def make(k):\n    def work(x):\n        return x * k\n    return work\n\n\nwork = make({v})\n",
    "lambda": "work = (lambda k: lambda x: x * k)({v})\n",
    "module constant": "FACTOR = ({v}, 'units')\n\n\ndef work(x):\n    return x * FACTOR[0]\n",
    "helper function": _HELPERS + "def work(x):\n    return helper(x) * 2\n",
    "nested constant": "T = frozenset({{'a', 'b', {v}}})\n\n\ndef work(x):\n    return [x for _ in T]\n",
}


@pytest.mark.parametrize("edit", list(_VERSIONS))
def test_edited_value_is_a_mismatch(tmp_path: Path, edit: str) -> None:
    """issue 12 item 4: editing a default, closure value, lambda capture or constant is refused."""
    source = tmp_path / "workmod.py"
    path = tmp_path / "run.db"
    name = f"workmod_{uuid.uuid4().hex}"
    source.write_text(_VERSIONS[edit].format(v=2))
    v1 = _load_module(source, name)
    first = execute(v1.work, [1, 2, 3], checkpoint=path, backend="serial")
    # The same source imported again is the same identity: resume works.
    again = _load_module(source, name)
    assert execute(again.work, [1, 2, 3], checkpoint=path, backend="serial") == first
    source.write_text(_VERSIONS[edit].format(v=3))
    v2 = _load_module(source, name)
    with pytest.raises(CheckpointMismatchError, match=r"(values|code) .*work.* changed"):
        execute(v2.work, [1, 2, 3], checkpoint=path, backend="serial")
    relaxed = Checkpoint(path, check_code=False)
    assert execute(v2.work, [1, 2, 3], checkpoint=relaxed, backend="serial") == first


def test_identity_is_the_same_in_another_process(tmp_path: Path) -> None:
    """issue 12 item 4: the values digest does not depend on the process (hash seeds, ids)."""
    source = tmp_path / "seedmod.py"
    source.write_text(
        "NAMES = frozenset({'alpha', 'beta', 'gamma', 'delta'})\nLIMIT = (1.5, b'x', None)\n\n\n"
        "def helper(x):\n    return x in NAMES\n\n\n"
        "def work(x, opts=(('a', 1), ('b', 2))):\n    return helper(x), LIMIT\n"
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import seedmod;"
        "from amorsize.checkpoint import function_identity;"
        "print(sorted(function_identity(seedmod.work).items()))"
    )
    outs = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
            check=True, cwd=tmp_path,
        )
        outs.add(run.stdout)
    assert len(outs) == 1


def test_mutable_state_is_not_identity() -> None:
    """issue 12 item 4: lists, dicts and sets a function uses are state, not identity."""
    cache: dict[int, int] = {}

    def work(x: int) -> int:
        cache[x] = x
        return x

    before = function_identity(work)
    cache[5] = 5
    STOP_AT.add(3)
    assert function_identity(work) == before
    assert function_identity(stopping_square) == function_identity(stopping_square)


HUGE = 10**20000  # past int->str's digit limit: must not break the identity


def add_huge(x: int) -> int:
    return x + HUGE


def test_identity_survives_huge_and_odd_values() -> None:
    """issue 12 item 4: huge ints, self-reference and objects never make identity raise."""
    ident = function_identity(add_huge)
    assert ident == function_identity(add_huge) and ident["func_values"]

    class Odd:
        def __call__(self, x: int) -> int:
            return x

    obj = Odd()
    obj.me = obj  # type: ignore[attr-defined]
    assert function_identity(obj)["func_qualname"].endswith("Odd")


# --- issue 12: keyed item hashes (item 5) ---------------------------------------------------
def _siphash24(key: bytes, msg: bytes) -> int:
    """SipHash-2-4, written from the paper (Aumasson & Bernstein 2012), for reference."""
    mask = (1 << 64) - 1

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & mask

    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261,
         k1 ^ 0x7465646279746573]

    def rounds(n: int) -> None:
        for _ in range(n):
            v[0] = (v[0] + v[1]) & mask; v[1] = rotl(v[1], 13) ^ v[0]; v[0] = rotl(v[0], 32)  # noqa: E702
            v[2] = (v[2] + v[3]) & mask; v[3] = rotl(v[3], 16) ^ v[2]  # noqa: E702
            v[0] = (v[0] + v[3]) & mask; v[3] = rotl(v[3], 21) ^ v[0]  # noqa: E702
            v[2] = (v[2] + v[1]) & mask; v[1] = rotl(v[1], 17) ^ v[2]; v[2] = rotl(v[2], 32)  # noqa: E702

    tail = len(msg) % 8
    blocks = [msg[i : i + 8] for i in range(0, len(msg) - tail, 8)]
    blocks.append(msg[len(msg) - tail :] + bytes(7 - tail) + bytes([len(msg) & 0xFF]))
    for block in blocks:
        m = int.from_bytes(block, "little")
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    v[2] ^= 0xFF
    rounds(4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.binary(min_size=16, max_size=16))
def test_compiled_siphash_matches_the_paper(value: int, key: bytes) -> None:
    """issue 12 item 5: the compiled SipHash-2-4 equals the reference (itself checked below)."""
    from amorsize._core import siphash24_int64

    assert _siphash24(bytes(range(16)), bytes(range(15))) == 0xA129CA6149BE45E5  # paper, App. A
    msg = (value % 2**64).to_bytes(8, "little")
    assert siphash24_int64(key, value) == _siphash24(key, msg)
    assert item_hash(value, key) == _siphash24(key, msg) | 1


def _old_hash(item: Any) -> int:
    """The format-2 item hash: CRC-32 and Adler-32 of the pickle, side by side."""
    import pickle
    import zlib

    data = pickle.dumps(item, 5)
    return zlib.crc32(data) << 32 | zlib.adler32(data)


def _crc_kernel(width: int) -> int:
    """A nonzero ``width``-byte bit pattern that leaves CRC-32 unchanged when XORed in."""
    import zlib

    base = zlib.crc32(bytes(width))
    pivots: dict[int, tuple[int, int]] = {}
    for b in range(8 * width):
        vec, combo = zlib.crc32((1 << b).to_bytes(width, "little")) ^ base, 1 << b
        for bit in reversed(range(32)):
            if vec >> bit & 1:
                if bit not in pivots:
                    pivots[bit] = (vec, combo)
                    break
                vec, combo = vec ^ pivots[bit][0], combo ^ pivots[bit][1]
        if vec == 0:
            return combo
    raise AssertionError("no kernel")  # pragma: no cover


def _colliding_items(size: int = 144) -> tuple[bytes, bytes]:
    """Two different ``size``-byte items with equal format-2 hashes (CRC and Adler linear).

    The kernel pattern is XORed in at byte offsets 0, 8, 16, 24 with signs +, -, -, + (bits
    0 -> 1 add, 1 -> 0 subtract): CRC-32 sees kernel elements, Adler-32's sum and weighted
    sum both cancel.
    """
    kernel = _crc_kernel(8)
    x1 = bytearray(random.Random(12).randbytes(size))
    x2 = bytearray(x1)
    for offset, sign in ((0, 1), (8, -1), (16, -1), (24, 1)):
        word = int.from_bytes(x1[offset : offset + 8], "little")
        word = word & ~kernel if sign > 0 else word | kernel
        x1[offset : offset + 8] = word.to_bytes(8, "little")
        x2[offset : offset + 8] = (word ^ kernel).to_bytes(8, "little")
    return bytes(x1), bytes(x2)


def sha_prefix(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:12]


def test_crafted_collision_no_longer_collides(tmp_path: Path) -> None:
    """issue 12 item 5: items built to collide under CRC+Adler differ under the keyed hash."""
    x1, x2 = _colliding_items()
    assert x1 != x2 and len(x1) == 144 and _old_hash(x1) == _old_hash(x2)
    assert sha_prefix(x1) != sha_prefix(x2)
    key = os.urandom(16)
    assert item_hash(x1, key) != item_hash(x2, key)
    path = tmp_path / "run.db"
    assert execute(sha_prefix, [x1], checkpoint=path, backend="serial") == [sha_prefix(x1)]
    with pytest.raises(CheckpointMismatchError, match="index 0"):
        execute(sha_prefix, [x2], checkpoint=path, backend="serial")


def test_each_file_has_its_own_hash_key(tmp_path: Path) -> None:
    """issue 12 item 5: the item-hash key is random per file, recorded in its header."""
    keys = set()
    for k in range(3):
        path = tmp_path / f"run{k}.db"
        execute(square, [1], checkpoint=path, backend="serial")
        keys.add(Checkpoint(path).header()["hash_key"])
    assert len(keys) == 3 and all(len(bytes.fromhex(k)) == 16 for k in keys)


# --- issue 12: checksums and signatures (items 6 and 16) ------------------------------------
def tag(x: int) -> str:
    return f"{x}-ok"


def _tagged_file(tmp_path: Path, n: int = 40) -> tuple[Path, list[str]]:
    path = tmp_path / "run.db"
    expected = [tag(x) for x in range(n)]
    ck = Checkpoint(path, commit_every=10)
    assert execute(tag, list(range(n)), checkpoint=ck, backend="serial", chunksize=10) == expected
    assert [bid for bid, _, _, _ in _batches(path)] == [1, 2, 3, 4]
    assert not Path(f"{path}-wal").exists()  # everything is in the main file
    return path, expected


def _batches(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)  # read-write: closing it folds the WAL back into the file
    try:
        return conn.execute("SELECT id, results, digest, mac FROM checkpoint_batches").fetchall()
    finally:
        conn.close()


def _blob_offsets(path: Path) -> list[int]:
    """The file offsets of every byte of the stored results, digests and MACs."""
    raw = path.read_bytes()
    blobs = [b for row in _batches(path) for b in row[1:]]
    offsets = []
    for blob in blobs:
        at = raw.find(blob)
        assert at > 0
        offsets += range(at, at + len(blob))
    return offsets


def _outcome(path: Path, expected: list[str]) -> str:
    """'refused' (CheckpointError) or 'ok' (exact results); anything else fails the test."""
    try:
        stored = Checkpoint(path).results()
    except CheckpointError:
        stored = None
    if stored is not None:
        assert stored == dict(enumerate(expected))
    try:
        out = execute(tag, list(range(len(expected))), checkpoint=path, backend="serial")
    except CheckpointError:
        return "refused"
    assert out == expected
    return "ok" if stored is not None else "refused"


def test_every_flipped_byte_is_refused_or_harmless(tmp_path: Path) -> None:
    """issue 12 item 6: a flipped byte anywhere gives CheckpointError (file unchanged) or the
    exact results, never another exception or a wrong result; in stored data always an error."""
    path, expected = _tagged_file(tmp_path)
    original = path.read_bytes()
    # Every 3rd byte of the stored data (results, digests, MACs), every 37th of the file.
    stored = set(_blob_offsets(path)[::3])
    positions = sorted(stored | set(range(0, len(original), 37)))
    outcomes: dict[str, int] = {}
    for pos in positions:
        damaged = bytearray(original)
        damaged[pos] ^= 1 << (pos % 8)
        path.write_bytes(bytes(damaged))
        for side in ("-wal", "-shm"):
            Path(f"{path}{side}").unlink(missing_ok=True)
        what = _outcome(path, expected)
        outcomes[what] = outcomes.get(what, 0) + 1
        if what == "refused":
            assert path.read_bytes() == bytes(damaged), pos
        elif pos in stored:
            raise AssertionError(f"a flipped bit in stored data at {pos} was not detected")
    assert outcomes["refused"] >= len(stored)


def test_flipped_result_bit_names_file_and_batch(tmp_path: Path) -> None:
    """issue 12 item 6: '...-ok' turned into '...-nk' is refused, naming the file and batch."""
    path, _ = _tagged_file(tmp_path)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"17-ok")
    raw[at + 3] ^= ord("o") ^ ord("n")
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{path}.* is damaged: batch \d+ .*move it aside"):
        execute(tag, list(range(40)), checkpoint=path, backend="serial")
    assert path.read_bytes() == bytes(raw)


@pytest.fixture
def other_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """Call it to become a user with another signing key."""
    from amorsize import _signing

    def switch() -> None:
        monkeypatch.setenv("AMORSIZE_CONFIG_DIR", str(tmp_path / "other-user"))
        _signing._reset()

    yield switch
    monkeypatch.undo()
    _signing._reset()


def test_file_signed_by_another_key_needs_trust(tmp_path: Path, other_user: Callable[[], None]) -> None:
    """issue 12 item 16: another user's checkpoint is refused, unchanged, unless trust=True."""
    path, expected = _tagged_file(tmp_path)
    other_user()
    before = file_digest(path)
    for attempt in (lambda: Checkpoint(path).results(), lambda: execute(tag, range(40), checkpoint=path, backend="serial")):
        with pytest.raises(CheckpointError, match=r"signed by another key.*trust=True"):
            attempt()
    assert file_digest(path) == before
    assert Checkpoint(path).header()["func_qualname"] == "tag"  # no pickle: readable
    trusted = Checkpoint(path, trust=True)
    assert execute(tag, list(range(40)), checkpoint=trusted, backend="serial") == expected


PWNED: list[str] = []


def _pwn() -> list[str]:
    PWNED.append("code ran")
    return ["x"] * 10


class _Payload:
    def __reduce__(self) -> Any:
        return (_pwn, ())


def _tamper(path: Path, change: Callable[[sqlite3.Connection], None]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        change(conn)
    finally:
        conn.close()


def test_forged_batch_is_refused_before_unpickling(tmp_path: Path) -> None:
    """issue 12 item 16: a batch replaced by a crafted pickle (valid digest) never loads."""
    import pickle

    from amorsize._store import block_digest

    path, _ = _tagged_file(tmp_path)

    def forge(conn: sqlite3.Connection) -> None:
        bid, n, runs, hashes = conn.execute("SELECT id, n, runs, hashes FROM checkpoint_batches").fetchone()
        evil = pickle.dumps(_Payload())
        digest = block_digest(n.to_bytes(8, "little"), runs, hashes, evil)
        conn.execute("UPDATE checkpoint_batches SET results = ?, digest = ? WHERE id = ?", (evil, digest, bid))

    _tamper(path, forge)
    PWNED.clear()
    with pytest.raises(CheckpointError, match="batch 1 does not match its checksum or signature"):
        execute(tag, list(range(40)), checkpoint=path, backend="serial")
    with pytest.raises(CheckpointError, match="batch 1"):
        Checkpoint(path).results()
    assert PWNED == []


def test_unsigned_file_is_refused(tmp_path: Path) -> None:
    """issue 12 item 16: a file without a signature (key id removed) is refused unless trusted."""
    from amorsize._store import block_digest
    from amorsize.checkpoint import _header_parts

    path, expected = _tagged_file(tmp_path)

    def unsign(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM amorsize_meta WHERE key IN ('key_id', 'header_mac')")
        head = dict(conn.execute("SELECT key, value FROM amorsize_meta").fetchall())
        digest = block_digest(_header_parts(head)).hex()
        conn.execute("UPDATE amorsize_meta SET value = ? WHERE key = 'header_digest'", (digest,))

    _tamper(path, unsign)
    with pytest.raises(CheckpointError, match="carries no signature"):
        execute(tag, list(range(40)), checkpoint=path, backend="serial")
    assert Checkpoint(path, trust=True).results() == dict(enumerate(expected))


@pytest.mark.parametrize("move", ["swap rows", "other file"])
def test_batches_cannot_be_moved(tmp_path: Path, move: str) -> None:
    """issue 12 item 16: a genuine batch moved to another row or file fails its signature."""
    path, _ = _tagged_file(tmp_path)
    if move == "swap rows":

        def swap(conn: sqlite3.Connection) -> None:
            rows = conn.execute(
                "SELECT * FROM checkpoint_batches WHERE id IN (1, 2) ORDER BY id"
            ).fetchall()
            conn.execute("DELETE FROM checkpoint_batches WHERE id IN (1, 2)")
            for (_, *rest), (other, *_) in zip(rows, reversed(rows), strict=True):
                conn.execute("INSERT INTO checkpoint_batches VALUES (?,?,?,?,?,?,?)", (other, *rest))

        _tamper(path, swap)
    else:
        donor = tmp_path / "donor"
        donor.mkdir()
        donor_path, _ = _tagged_file(donor)
        donor_db = sqlite3.connect(donor_path)
        row = donor_db.execute(
            "SELECT n, runs, hashes, results, digest, mac FROM checkpoint_batches WHERE id = 1"
        ).fetchone()
        donor_db.close()  # (an unclosed connection is a ResourceWarning from CPython 3.13)
        _tamper(path, lambda conn: conn.execute(
            "UPDATE checkpoint_batches SET n=?, runs=?, hashes=?, results=?, digest=?, mac=? WHERE id = 1", row
        ))
    with pytest.raises(CheckpointError, match=r"batch [12] does not match"):
        execute(tag, list(range(40)), checkpoint=path, backend="serial")


# --- issue 12: a result that pickles but does not load (item 7) -----------------------------
class Unloadable:
    """Pickles as a call with one argument too few, so loading it raises TypeError (like an
    exception whose __init__ takes other arguments than its .args; not an exception here,
    because distributed's tblib patches exception pickling once imported)."""

    def __init__(self, a: str, b: str) -> None:
        self.a, self.b = a, b

    def __reduce__(self) -> Any:
        return (Unloadable, (self.a,))


def maybe_unloadable(x: int) -> Any:
    CALLS.append(x)
    return Unloadable("a", "b") if x == 3 else x


def test_result_that_does_not_unpickle_is_not_stored(tmp_path: Path) -> None:
    """issue 12 item 7: such a result never enters the checkpoint; resume reruns only it."""
    path = tmp_path / "run.db"
    with pytest.warns(CheckpointWarning, match=r"item 3 pickles but does not unpickle \(TypeError"):
        out = execute(maybe_unloadable, range(6), checkpoint=path, backend="serial")
    assert out[:3] == [0, 1, 2] and out[4:] == [4, 5] and isinstance(out[3], Unloadable)
    assert Checkpoint(path).results() == {0: 0, 1: 1, 2: 2, 4: 4, 5: 5}
    CALLS.clear()
    with pytest.warns(CheckpointWarning, match="item 3"):
        again = execute(maybe_unloadable, range(6), checkpoint=path, backend="serial")
    assert again[:3] == [0, 1, 2] and isinstance(again[3], Unloadable)
    assert CALLS == [3]


# --- issue 12: unusable places give clear errors, lose nothing (item 14) --------------------
def _mount_tmpfs(folder: Path, size: str) -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    folder.mkdir()
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
        capture_output=True, text=True, check=False,
    )
    if run.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only; the test is skipped otherwise), unmounted afterwards."""
    folder = tmp_path / "disk"
    _mount_tmpfs(folder, "256k")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def lockable_dir(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A directory and a function making it read-only: a remounted tmpfs as root (root
    ignores permission bits), permission bits otherwise."""
    folder = tmp_path / "lockable"
    if sys.platform == "win32":
        pytest.skip("POSIX permissions")
    if os.geteuid() == 0:
        _mount_tmpfs(folder, "4m")

        def lock() -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)

        yield folder, lock
        subprocess.run(["umount", "-l", str(folder)], check=False)
        return
    folder.mkdir()

    def lock_bits() -> None:
        for p in folder.iterdir():
            p.chmod(0o444)
        folder.chmod(0o555)

    yield folder, lock_bits
    folder.chmod(0o755)


def fat(x: int) -> bytes:
    return bytes([x % 256]) * 1500


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "clijob.py").write_text("def fat(x):\n    return str(x % 10) * 1500\n")
    return subprocess.run(
        [sys.executable, "-m", "amorsize", "execute", "clijob:fat", "--backend", "serial", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
    )


def test_disk_full_is_a_clear_error_and_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    """issue 12 item 14: a full disk is a CheckpointError naming path, cause and fix; what was
    committed stays, and once there is room the run resumes to the exact result."""
    path = small_disk / "run.db"
    expected = [fat(x) for x in range(1000)]
    ck = Checkpoint(path, commit_every=10)
    with pytest.raises(CheckpointError, match=rf"{path}.*disk is full.*free space") as info:
        execute(fat, range(1000), checkpoint=ck, backend="serial", chunksize=10)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    stored = Checkpoint(path).results()
    assert stored and all(stored[i] == expected[i] for i in stored)
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    assert execute(fat, range(1000), checkpoint=path, backend="serial") == expected


def test_disk_full_in_the_cli_exits_2_with_one_line(tmp_path: Path, small_disk: Path) -> None:
    """issue 12 item 14: the CLI reports a full disk as one line, exit code 2."""
    run = _cli(tmp_path, "--data-range", "1000", "--checkpoint", str(small_disk / "run.db"), "-o", os.devnull)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "disk is full" in run.stderr and "run.db" in run.stderr


def test_read_only_directory_is_a_clear_error(
    tmp_path: Path, lockable_dir: tuple[Path, Callable[[], None]]
) -> None:
    """issue 12 item 14: a checkpoint in a read-only directory: CheckpointError, CLI exit 2."""
    folder, lock = lockable_dir
    lock()
    path = folder / "new.db"
    with pytest.raises(CheckpointError, match=rf"{path}.*(Read-only file system|Permission denied)"):
        execute(square, [1, 2], checkpoint=path, backend="serial")
    run = _cli(tmp_path, "--data-range", "3", "--checkpoint", str(path))
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "new.db" in run.stderr, run.stderr


def test_read_only_complete_checkpoint_is_used(
    tmp_path: Path, lockable_dir: tuple[Path, Callable[[], None]]
) -> None:
    """issue 12 item 14: a read-only complete checkpoint resumes (nothing to write); a run
    that would have to write more is a clear error; the file is never called damaged."""
    folder, lock = lockable_dir
    path, partial = folder / "run.db", folder / "partial.db"
    data = list(range(50))
    execute(stopping_square, data, checkpoint=path, backend="serial")
    STOP_AT.add(7)
    execute(stopping_square, data, checkpoint=partial, backend="serial", on_error="collect")
    STOP_AT.clear()
    lock()
    before = file_digest(path), file_digest(partial)
    CALLS.clear()
    assert execute(stopping_square, data, checkpoint=path, backend="serial") == [x * x for x in data]
    assert CALLS == []
    assert Checkpoint(path).results() == {x: x * x for x in data} and len(Checkpoint(path)) == 50
    for more in (data, iter(data)):
        with pytest.raises(CheckpointError, match=rf"{partial}.* is read-only .*writable") as info:
            execute(stopping_square, more, checkpoint=partial, backend="serial")
        assert "damaged" not in str(info.value)
    assert "holds 49 of the 50 results" in str(info.value) or "cannot be stored" in str(info.value)
    assert (file_digest(path), file_digest(partial)) == before


def _lock_file(path: Path) -> Callable[[], None]:
    """Make ``path`` read-only in a writable directory; returns the undo."""
    if sys.platform == "win32":
        pytest.skip("POSIX permissions")
    if os.geteuid() != 0:
        path.chmod(0o444)
        return lambda: path.chmod(0o600)
    for args in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,ro,bind", str(path)]):
        run = subprocess.run(args, capture_output=True, text=True, check=False)
        if run.returncode:
            subprocess.run(["umount", str(path)], check=False, capture_output=True)
            pytest.skip(f"cannot bind-mount a file read-only here: {run.stderr.strip()}")
    return lambda: subprocess.run(["umount", str(path)], check=True) and None


def test_read_only_file_in_a_writable_directory_is_used(tmp_path: Path) -> None:
    """issue 12 item 14: a read-only checkpoint file (writable directory) resumes when complete."""
    path = tmp_path / "run.db"
    execute(square, list(range(20)), checkpoint=path, backend="serial")
    unlock = _lock_file(path)
    try:
        assert execute(square, list(range(20)), checkpoint=path, backend="serial") == [x * x for x in range(20)]
        with pytest.raises(CheckpointError, match=r"is read-only .*cannot be stored"):
            execute(square, iter(range(25)), checkpoint=path, backend="serial")
    finally:
        unlock()


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    """issue 12 item 14: a checkpoint path in a missing directory names it and the fix."""
    path = tmp_path / "nowhere" / "run.db"
    with pytest.raises(CheckpointError, match=r"nowhere.* does not exist; create it"):
        execute(square, [1], checkpoint=path, backend="serial")
    assert not path.parent.exists()


# --- issue 12: files through a dangling symlink are private (item 15) -----------------------
def test_dangling_symlink_target_is_created_private(tmp_path: Path) -> None:
    """issue 12 item 15: the target of a dangling link, its -wal and -shm are all 0o600."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "run.db"
    link = tmp_path / "link.db"
    link.symlink_to(target)
    old = os.umask(0o000)
    try:
        obs = checkpoint_observer(link, square, [1, 2])
        obs.begin(square)
        obs.known(0, 1)
        obs.on_success(0, 1, 1)
        obs.flush()
        modes = {p.name: mode(p) for p in (tmp_path / "real").iterdir()}
        obs.end(False)
    finally:
        os.umask(old)
    assert modes == {"run.db": 0o600, "run.db-wal": 0o600, "run.db-shm": 0o600}
    assert Checkpoint(link).results() == {0: 1}


def test_dangling_symlink_for_a_dead_letter_file_is_private(tmp_path: Path) -> None:
    """issue 12 item 15: the shared store does the same for a dead-letter path."""
    target = tmp_path / "real-failed.db"
    link = tmp_path / "failed.db"
    link.symlink_to(target)
    old = os.umask(0o000)
    try:
        DeadLetterQueue(link)
    finally:
        os.umask(old)
    assert mode(target) == 0o600
    assert all(mode(p) == 0o600 for p in tmp_path.iterdir() if p.name.startswith("real-failed"))


# --- issue 12: empty files are taken over, others refused (item 20) -------------------------
def test_empty_file_is_taken_over(tmp_path: Path) -> None:
    """issue 12 item 20: an empty (0-byte) file at the path becomes the checkpoint."""
    path = tmp_path / "run.db"
    path.touch()
    assert execute(square, [1, 2], checkpoint=path, backend="serial") == [1, 4]
    assert Checkpoint(path).results() == {0: 1, 1: 4}


def test_table_less_sqlite_file_is_refused(tmp_path: Path) -> None:
    """issue 12 item 20: an SQLite file with no tables is not empty and not ours: refused."""
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    before = file_digest(path)
    with pytest.raises(CheckpointError, match=rf"{path}.* no tables.*left unchanged"):
        execute(square, [1], checkpoint=path, backend="serial")
    assert file_digest(path) == before


@pytest.mark.parametrize(
    "field",
    ["huge count", "negative start", "short hashes", "not a list", "wrong length", "text runs"],
)
def test_crafted_batch_with_a_valid_digest_is_refused_even_when_trusted(tmp_path: Path, field: str) -> None:
    """issue 12 item 6: with trust=True (no signature check) a consistent digest over a broken
    index or payload still gives CheckpointError, never MemoryError/IndexError/TypeError."""
    import pickle

    from amorsize._store import block_digest

    path, _ = _tagged_file(tmp_path)

    def craft(conn: sqlite3.Connection) -> None:
        n, runs, hashes, results = conn.execute(
            "SELECT n, runs, hashes, results FROM checkpoint_batches WHERE id = 1"
        ).fetchone()
        if field == "huge count":
            runs = (0).to_bytes(8, "little") + (10**18).to_bytes(8, "little")
        elif field == "negative start":
            runs = (-5).to_bytes(8, "little", signed=True) + n.to_bytes(8, "little")
        elif field == "short hashes":
            hashes = hashes[:-8]
        elif field == "not a list":
            results = pickle.dumps({"a": 1})
        elif field == "wrong length":
            results = pickle.dumps(["x"] * (n + 1))
        if field == "text runs":
            conn.execute("UPDATE checkpoint_batches SET runs = 'abc' WHERE id = 1")
            return
        digest = block_digest(n.to_bytes(8, "little"), runs, hashes, results)
        conn.execute(
            "UPDATE checkpoint_batches SET runs = ?, hashes = ?, results = ?, digest = ? WHERE id = 1",
            (runs, hashes, results, digest),
        )

    _tamper(path, craft)
    before = file_digest(path)
    trusted = Checkpoint(path, trust=True)
    with pytest.raises(CheckpointError, match="batch 1"):
        execute(tag, list(range(40)), checkpoint=trusted, backend="serial")
    with pytest.raises(CheckpointError, match="batch 1"):
        trusted.results()
    assert file_digest(path) == before
