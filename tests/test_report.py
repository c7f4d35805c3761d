"""The run report: the bounded chunk timeline, execute(report=...), the checkpoint's stored
timeline with `amorsize report`, and the HTML page opened in a real headless browser."""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from amorsize import RetryPolicy, RunObserver, execute, execute_iter, set_testing
from amorsize._timeline import ChunkSpan, Timeline, forget, stamp, take
from amorsize.backends.base import Task
from amorsize.checkpoint import Checkpoint
from amorsize.cli import main
from amorsize.report import BAR_COLOR, FAIL_COLOR, ReportData, write_report

EVIL = "<script>alert('x')</script>"


def ident(x: int) -> int:
    return x


def fail_at_7(x: int) -> int:
    if x == 7:
        raise ValueError(EVIL)
    return x


def nap(x: int) -> int:
    time.sleep(0.002)  # items that wait: chunk bars wide enough to see
    return x


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


# --------------------------------------------------------------------------- the timeline


def test_timeline_stays_bounded_and_keeps_totals() -> None:
    """An endless run keeps at most max_spans spans, exact totals and the whole time range."""
    tl = Timeline(0.0, max_spans=1000)
    for k in range(100_000):
        tl.add(ChunkSpan(k % 2, k * 1.0, k + 0.9, 3, k % 10 == 0, 3 * k))
    assert len(tl.spans) < 1000
    assert (tl.total_chunks, tl.total_items, tl.total_failed) == (100_000, 300_000, 10_000)
    assert sum(s.chunks for s in tl.spans) == 100_000
    assert sum(s.items for s in tl.spans) == 300_000
    assert min(s.start for s in tl.spans) == 0.0
    assert max(s.end for s in tl.spans) == 99_999.9
    for worker in (0, 1):
        mine = sorted((s for s in tl.spans if s.worker == worker), key=lambda s: s.start)
        assert all(a.end <= b.start for a, b in itertools.pairwise(mine))  # merged, never overlapping


def test_unplaced_chunks_share_slots_without_overlap() -> None:
    """Chunks with no worker id go to the first free slot, so no lane holds overlapping bars."""
    tl = Timeline(0.0)
    for start, end in [(0, 2), (1, 3), (2, 4), (2.5, 5), (3, 4)]:
        tl.add_unplaced(start, end, 1, 0, 0)
    assert [s.worker for s in tl.spans] == [-1, -2, -1, -3, -2]


def test_throughput_accounts_for_every_item() -> None:
    """Throughput bins, times their width, add up to the items recorded."""
    tl = Timeline(0.0)
    tl.add(ChunkSpan(1, 0.0, 1.0, 100, 0, 0))
    tl.add(ChunkSpan(2, 0.5, 3.0, 50, 0, 100))
    points = tl.throughput(bins=30)
    width = points[1][0] - points[0][0]
    assert sum(rate * width for _, rate in points) == pytest.approx(150)


# --------------------------------------------------------------------------- execute


class ChunkLog(RunObserver):
    """Records every span it is shown."""

    def __init__(self) -> None:
        self.spans: list[ChunkSpan] = []

    def on_chunk(self, span: Any) -> None:
        self.spans.append(span)


@pytest.mark.parametrize("backend", ["serial", "threads", "processes"])
def test_every_chunk_reaches_the_timeline_and_observers(backend: str) -> None:
    """Each dispatched chunk is one span, seen by an on_chunk observer and in the report."""
    log = ChunkLog()
    results, plan = execute(
        ident, range(200), backend=backend, n_jobs=1 if backend == "serial" else 2,
        chunksize=10, observers=[log], return_plan=True,
    )  # fmt: skip
    assert results == list(range(200))
    assert plan.timeline is not None
    assert sum(s.items for s in log.spans) == 200 == plan.timeline.total_items
    assert sorted(s.first for s in log.spans) == list(range(0, 200, 10))
    assert all(s.start <= s.end for s in log.spans)


def test_process_chunks_are_timed_in_the_workers() -> None:
    """With processes, each span names the worker process that ran it, on the parent's clock."""
    _, plan = execute(
        ident, range(100), backend="processes", n_jobs=2, chunksize=5, return_plan=True,
        observers=[ChunkLog()],
    )  # fmt: skip
    tl = plan.timeline
    assert tl is not None
    assert tl.spans and all(s.worker > 0 and s.worker != os.getpid() for s in tl.spans)
    assert all(tl.origin <= s.start <= s.end for s in tl.spans)


def test_thread_chunks_are_timed_in_their_threads() -> None:
    """With threads, each span names a pool thread (never the calling thread)."""
    _, plan = execute(
        ident, range(100), backend="threads", n_jobs=2, chunksize=5, return_plan=True,
        observers=[ChunkLog()],
    )  # fmt: skip
    assert plan.timeline is not None
    workers = {s.worker for s in plan.timeline.spans}
    assert workers and threading.get_native_id() not in workers and min(workers) > 0


def test_a_stamp_is_taken_once_and_only_for_its_own_task() -> None:
    """A stamp is taken by its task once; another task at the same id (start, count
    differ) or a task dispatched again (forget) gets none."""
    task, other = Task(0, [1, 2]), Task(2, [3])
    stamp(task, 1.0, 2.0, 7)
    assert take(other) is None and take(task) == (1.0, 2.0, 7) and take(task) is None
    stamp(task, 1.0, 2.0, 7)
    forget(task)
    assert take(task) is None


def test_stamps_left_by_an_earlier_run_are_not_taken(tmp_path: Path) -> None:
    """Chunk times a threads run left unclaimed never end up in a later serial run's timeline
    (its tasks may reuse the earlier tasks' ids)."""
    for _ in range(3):
        execute(ident, range(200), backend="threads", n_jobs=2, chunksize=10)
        _, plan = execute(
            ident, range(200), backend="serial", chunksize=10, return_plan=True,
            report=tmp_path / "run.html",
        )  # fmt: skip
        tl = plan.timeline
        assert tl is not None and tl.total_chunks == 20
        assert all(s.worker < 0 and s.start >= tl.origin for s in tl.spans)


@pytest.mark.parametrize("backend", ["serial", "threads", "processes"])
def test_html_report_is_self_contained_and_escaped(tmp_path: Path, backend: str) -> None:
    """The page holds its charts inline, fetches nothing, and escapes the user's strings."""
    out = tmp_path / "run.html"
    results = execute(
        fail_at_7, range(60), backend=backend, n_jobs=1 if backend == "serial" else 2,
        chunksize=4, on_error="collect", report=out,
    )  # fmt: skip
    assert results[8] == 8
    page = out.read_text("utf-8")
    assert "id='gantt'" in page and "id='throughput'" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count(f"fill='{FAIL_COLOR}'") == 1  # the chunk holding item 7
    assert page.count(f"fill='{BAR_COLOR}'") == 14  # the other 14 chunks of 4 items


def test_function_names_are_escaped(tmp_path: Path) -> None:
    """A lambda's name, <lambda>, is shown as text, not markup."""
    out = tmp_path / "run.html"
    execute(lambda x: x, range(5), backend="serial", report=str(out))
    page = out.read_text("utf-8")
    assert "&lt;lambda&gt;" in page and "<lambda>" not in page


def test_report_is_written_after_a_failed_run(tmp_path: Path) -> None:
    """A run that raises still leaves its report, failure listed."""
    out = tmp_path / "run.html"
    with pytest.raises(ValueError, match="alert"):
        execute(fail_at_7, range(20), backend="serial", chunksize=4, report=out)
    page = out.read_text("utf-8")
    assert "ValueError" in page and "&lt;script&gt;" in page


def test_execute_iter_writes_the_report_when_exhausted(tmp_path: Path) -> None:
    """execute_iter writes the report once its results are all read."""
    out = tmp_path / "run.html"
    it = execute_iter(ident, iter(range(30)), backend="threads", n_jobs=2, chunksize=3, report=out)
    assert not out.exists()
    assert list(it) == list(range(30))
    assert "id='gantt'" in out.read_text("utf-8")


class Flaky:
    """Fails the first call for each even item, then succeeds."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def __call__(self, x: int) -> int:
        if x % 2 == 0 and x not in self.seen:
            self.seen.add(x)
            raise ConnectionError(f"item {x}: first try")
        return x


def test_retries_counted_in_this_process_are_reported(tmp_path: Path) -> None:
    """Retries made by the retry policy in this process appear in the report."""
    out = tmp_path / "run.html"
    with set_testing(True):
        results, plan = execute(
            Flaky(), range(20), backend="threads", n_jobs=2, chunksize=5,
            retry=RetryPolicy(max_retries=2), report=out, return_plan=True,
        )  # fmt: skip
    assert results == list(range(20)) and plan.retries == 10
    assert "<b>10</b><span>retries</span>" in out.read_text("utf-8")


class Reported(RunObserver):
    """Keeps the RunReport it is handed."""

    report: Any = None

    def on_report(self, report: Any) -> None:
        self.report = report


def test_observers_get_the_complete_report_before_end(tmp_path: Path) -> None:
    """on_report receives the run's final RunReport, counts and timeline included."""
    seen = Reported()
    list(execute_iter(fail_at_7, range(30), ordered=False, backend="threads", n_jobs=2,
                      chunksize=3, on_error="collect", observers=[seen],
                      report=tmp_path / "run.html"))  # fmt: skip
    assert (seen.report.items, seen.report.failed) == (30, 1)
    assert seen.report.timeline.total_items == 30


def test_dead_lettered_items_are_marked(tmp_path: Path) -> None:
    """Items a dead-letter queue took are counted and marked in the failures table."""
    out = tmp_path / "run.html"
    _, plan = execute(
        fail_at_7, range(20), backend="serial", chunksize=4, report=out,
        dead_letter=tmp_path / "dlq.db", return_plan=True,
    )  # fmt: skip
    assert plan.dead_lettered == [7]
    page = out.read_text("utf-8")
    assert "<td>yes</td>" in page and "dead-lettered" in page


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        ("run.txt", ValueError, "ending .html or .png"),
        ("missing-dir/run.html", ValueError, "existing directory"),
        (3, TypeError, "a path"),
    ],
)
def test_report_option_is_checked_before_anything_runs(
    value: Any, error: type[Exception], words: str
) -> None:
    """A bad report= raises before func runs, naming the option and the rule."""
    calls: list[int] = []
    with pytest.raises(error, match=rf"execute\(\): report must be .*{words}"):
        execute(calls.append, range(3), backend="serial", report=value)
    assert calls == []


def test_png_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """report='run.png' without matplotlib says which extra to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"amorsize\[report\]"):
        execute(ident, range(3), backend="serial", report="run.png")


def test_png_report_shows_the_gantt_chart(tmp_path: Path) -> None:
    """A PNG report draws the chunks in the Gantt bar colour, the failed one in red."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "run.png"
    execute(ident, range(40), backend="threads", n_jobs=2, chunksize=4, report=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_report(str(out), _synthetic_report())
    _, _, pixels = _read_png(out.read_bytes())
    assert _count(pixels, _rgb(BAR_COLOR)) > 1000 and _count(pixels, _rgb(FAIL_COLOR)) > 50


# --------------------------------------------------------------------------- checkpoint


def _checkpointed_run(tmp_path: Path, backend: str = "threads") -> Path:
    db = tmp_path / "run.db"
    execute(
        fail_at_7, range(40), backend=backend, n_jobs=1 if backend == "serial" else 2,
        chunksize=4, on_error="collect", checkpoint=db,
    )  # fmt: skip
    return db


def test_checkpoint_report_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`amorsize report CHECKPOINT -o run.html` draws the run the checkpoint recorded."""
    db = _checkpointed_run(tmp_path)
    runs = Checkpoint(db).timeline()
    assert len(runs) == 1 and runs[0]["summary"]["failed"] == 1
    assert sum(int(r[3]) for r in runs[0]["spans"]) == runs[0]["summary"]["items"] - runs[0]["summary"]["reused"]
    out = tmp_path / "run.html"
    assert main(["report", str(db), "-o", str(out)]) == 0
    page = out.read_text("utf-8")
    assert "tests.test_report.fail_at_7" in page or "test_report.fail_at_7" in page
    assert page.count(f"fill='{FAIL_COLOR}'") == 1
    assert "&lt;script&gt;" in page and "<script" not in page
    assert "stored results" in page


def test_a_resumed_run_adds_its_own_timeline(tmp_path: Path) -> None:
    """Each run of a checkpoint records its own timeline; the report shows the last."""
    db = _checkpointed_run(tmp_path)
    execute(fail_at_7, range(40), backend="serial", chunksize=4, on_error="collect", checkpoint=db)
    runs = Checkpoint(db).timeline()
    assert len(runs) == 2
    assert runs[1]["summary"]["skipped"] == 39 and runs[1]["summary"]["failed"] == 1


def test_checkpoint_without_timeline_still_opens_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file from before run timelines (no timeline table) resumes and gives a report."""
    db = _checkpointed_run(tmp_path)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TABLE checkpoint_timeline")
    conn.close()
    assert Checkpoint(db).timeline() == []
    out = tmp_path / "run.html"
    assert main(["report", str(db), "-o", str(out)]) == 0
    page = out.read_text("utf-8")
    assert "holds no run timeline" in page and "39" in page
    results = execute(fail_at_7, range(40), backend="serial", on_error="collect", checkpoint=db)
    assert results[8] == 8 and len(Checkpoint(db).timeline()) == 1  # resumed, timeline added


def test_damaged_timeline_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A timeline row changed after it was written is refused, naming the file."""
    db = _checkpointed_run(tmp_path)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE checkpoint_timeline SET body = ? WHERE kind = 'summary'", (b'{"failed": 0}',))
    conn.close()
    assert main(["report", str(db), "-o", str(tmp_path / "run.html")]) == 2
    assert "is damaged: timeline" in capsys.readouterr().err
    assert not (tmp_path / "run.html").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [(["no-such.db", "-o", "run.html"], "no checkpoint file"), (["DB", "-o", "run.txt"], "ending .html")],
)
def test_report_command_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    """A missing checkpoint or a bad output name is one line on stderr and exit code 2."""
    db = _checkpointed_run(tmp_path, "serial")
    argv = [str(db) if a == "DB" else a for a in args]
    assert main(["report", *argv]) == 2
    assert words in capsys.readouterr().err


# --------------------------------------------------------------------------- the browser


def _browser() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("AMORSIZE_REQUIRE_BROWSER") == "1":
        pytest.fail("AMORSIZE_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
    return found


def _screenshot(browser: str, page: Path, out: Path, size: tuple[int, int]) -> bytes:
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", f"--user-data-dir={out.parent / 'profile'}",
        f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert out.exists(), done.stderr.decode(errors="replace")[-2000:]
    return out.read_bytes()


def _synthetic_report() -> ReportData:
    """Three workers with known chunks: the layout does not depend on any timing."""
    tl = Timeline(0.0)
    tl.dispatch_started = 0.2
    for worker in (101, 102, 103):
        for k in range(8):
            failed = 1 if (worker, k) == (102, 3) else 0
            tl.add(ChunkSpan(worker, 0.2 + k * 0.1, 0.28 + k * 0.1, 10, failed, 10 * k))
    return ReportData(
        title=EVIL, backend="processes", n_jobs=3, chunksize=10, reason="given",
        predicted_seconds=0.9, wall_seconds=1.0,
        counts={"items": 240, "completed": 239, "failed": 1}, timeline=tl,
    )  # fmt: skip


def test_report_renders_in_a_real_browser(tmp_path: Path) -> None:
    """Headless Chromium draws the Gantt chart: one band of bars per worker, right of the
    labels, with the failed chunk in red; the escaped title runs no script."""
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium on PATH (set AMORSIZE_REQUIRE_BROWSER=1 to require it)")
    page = tmp_path / "run.html"
    write_report(str(page), _synthetic_report())
    width, _height, pixels = _read_png(_screenshot(browser, page, tmp_path / "shot.png", (1100, 1200)))
    bar = _rgb(BAR_COLOR)
    bands = _row_bands(pixels, bar)
    assert len(bands) == 3, bands  # one lane per worker
    xs = [x for row in pixels for x, p in enumerate(row) if p == bar]
    assert min(xs) > 120 and max(xs) < width  # right of the worker labels
    assert _count(pixels, _rgb(FAIL_COLOR)) > 50  # the failed chunk
    assert "&lt;script&gt;" in page.read_text("utf-8")


def test_real_run_report_renders_in_a_real_browser(tmp_path: Path) -> None:
    """A report written by execute shows its chunk bars in the browser."""
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium on PATH (set AMORSIZE_REQUIRE_BROWSER=1 to require it)")
    page = tmp_path / "run.html"
    execute(nap, range(80), backend="threads", n_jobs=2, chunksize=8, report=page)
    _, _, pixels = _read_png(_screenshot(browser, page, tmp_path / "shot.png", (1100, 1200)))
    assert _row_bands(pixels, _rgb(BAR_COLOR))


# --------------------------------------------------------------------------- a PNG reader


def _read_png(data: bytes) -> tuple[int, int, list[list[tuple[int, int, int]]]]:
    """``(width, height, rows of RGB pixels)`` of an 8-bit RGB/RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            head = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", head)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[list[tuple[int, int, int]]] = []
    prev = bytearray(stride)
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        row = _unfilter(line[0], bytearray(line[1:]), prev, bpp)
        rows.append([(row[i], row[i + 1], row[i + 2]) for i in range(0, stride, bpp)])
        prev = row
    return width, height, rows


def _unfilter(kind: int, cur: bytearray, prev: bytearray, bpp: int) -> bytearray:
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if kind == 1:
            cur[i] = (cur[i] + a) & 255
        elif kind == 2:
            cur[i] = (cur[i] + b) & 255
        elif kind == 3:
            cur[i] = (cur[i] + (a + b) // 2) & 255
        elif kind == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (cur[i] + pred) & 255
    return cur


def _count(pixels: list[list[tuple[int, int, int]]], rgb: tuple[int, int, int]) -> int:
    return sum(row.count(rgb) for row in pixels)


def _row_bands(pixels: list[list[tuple[int, int, int]]], rgb: tuple[int, int, int]) -> list[tuple[int, int]]:
    """Runs of consecutive pixel rows holding at least 20 pixels of ``rgb``."""
    bands: list[tuple[int, int]] = []
    for y, row in enumerate(pixels):
        if row.count(rgb) >= 20:
            if bands and bands[-1][1] == y - 1:
                bands[-1] = (bands[-1][0], y)
            else:
                bands.append((y, y))
    return bands
