"""The run report: one picture of what a run did, as a self-contained HTML file or a PNG.

``execute(func, data, report="run.html")`` writes it when the run ends (also after an
error); ``amorsize report CHECKPOINT.db -o run.html`` writes it for a checkpointed run from
what the checkpoint recorded. Data flow::

    RunReport + its Timeline (execute)  ─┐
                                         ├─▶ ReportData ─▶ render_html ─▶ run.html
    checkpoint: summary + spans (cli)   ─┘              └─▶ render_png  ─▶ run.png (matplotlib)

The HTML file needs no network to open: CSS and SVG charts are inline, no script, no font
or library from elsewhere. Every string that comes from the user (the function's name,
error messages, the plan's reason) is HTML-escaped.

Sections: the plan (backend, workers, chunk size, why) with predicted vs measured time; the
counts (completed, failed, dead-lettered, retries, throughput); a Gantt chart with one lane
per worker and one bar per chunk (red when a chunk held a failure); throughput over time;
the failures, first ones first.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amorsize._format import format_seconds, safe_repr
from amorsize._timeline import ChunkSpan, Timeline
from amorsize._validate import fail

__all__ = [
    "BAR_COLOR",
    "FAIL_COLOR",
    "ReportData",
    "check_target",
    "from_checkpoint",
    "from_run",
    "render_html",
    "render_png",
    "write_report",
    "write_run_report",
]

#: The Gantt bar of a chunk whose items all succeeded (only the Gantt chart uses it: the
#: browser test finds the chart by this colour).
BAR_COLOR = "#2f6fde"
#: The bar of a chunk that held a failure.
FAIL_COLOR = "#d9463b"
_PLAN_COLOR = "#d5d9e0"
_LINE_COLOR = "#0f9d58"
_SUFFIXES = (".html", ".htm", ".png")
_MAX_FAILURE_ROWS = 50
_MAX_MESSAGE = 400
_INSTALL = "pip install 'amorsize[report]'"
# Counts shown only when they are not zero (the others say "all is well" when zero).
_HIDE_ZERO = ("not attempted", "reused from sampling", "from a checkpoint")


@dataclass
class Failure:
    """One failed item as the report shows it (text only: nothing to unpickle)."""

    index: int
    error: str  # the exception's type name
    message: str
    attempts: int
    dead_lettered: bool = False


@dataclass
class ReportData:
    """Everything a report shows; built by :func:`from_run` or from a checkpoint."""

    title: str
    backend: str = "-"
    n_jobs: int = 0
    chunksize: int = 0
    reason: str = ""
    predicted_seconds: float | None = None
    wall_seconds: float = 0.0
    counts: dict[str, int | None] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    timeline: Timeline | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the target


def check_target(where: str, value: Any, name: str = "report") -> str:
    """``report=``'s path, checked before the run: a ``str`` or path ending ``.html``,
    ``.htm`` or ``.png`` in a directory that exists; ``.png`` needs matplotlib."""
    if not isinstance(value, (str, os.PathLike)):
        fail(TypeError, where, name, "a path (str or os.PathLike) ending .html or .png", value)
    path = os.fspath(value)
    if not isinstance(path, str) or not path.lower().endswith(_SUFFIXES):
        fail(ValueError, where, name, "a path ending .html or .png", value,
             fix="name the file run.html (a self-contained page) or run.png (an image)")  # fmt: skip
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(ValueError, where, name, "a path in an existing directory", value,
             fix=f"create {folder!r} first, or pass a path in an existing directory")  # fmt: skip
    if path.lower().endswith(".png"):
        _matplotlib(where)
    return path


def _matplotlib(where: str) -> Any:
    """matplotlib's ``Figure`` class, or an ``ImportError`` naming the extra.

    A bare ``Figure`` draws with Agg on its own: pyplot, and with it the caller's choice of
    matplotlib backend (a notebook's), is left alone."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        msg = (
            f"{where}report=...png needs matplotlib, which is not installed: {_INSTALL} "
            "(the 'report' extra), or write report='run.html' (no dependency)"
        )
        raise ImportError(msg) from exc
    return Figure


# --------------------------------------------------------------------------- data


def _name(func: Callable[..., Any]) -> str:
    inner = getattr(func, "__wrapped__", func)
    qual = getattr(inner, "__qualname__", None) or type(inner).__name__
    module = getattr(inner, "__module__", None)
    return f"{module}.{qual}" if module else str(qual)


def from_run(report: Any, func: Callable[..., Any]) -> ReportData:
    """The report of an ``execute`` run from its ``RunReport``."""
    dead = set(report.dead_lettered)
    failures = [
        Failure(f.index, type(f.exception).__name__, _message(f.exception), f.attempts,
                f.index in dead)
        for f in report.failures[:_MAX_FAILURE_ROWS]
    ]  # fmt: skip
    counts: dict[str, int | None] = {
        "items": report.items,
        "completed": report.completed,
        "failed": report.failed,
        "dead-lettered": len(report.dead_lettered),
        "not attempted": report.not_attempted,
        "reused from sampling": report.reused,
        "from a checkpoint": report.skipped,
        "retries": report.retries,
    }
    return ReportData(
        title=_name(func), backend=report.backend, n_jobs=report.n_jobs,
        chunksize=report.chunksize, reason=report.reason,
        predicted_seconds=report.predicted_seconds, wall_seconds=report.wall_seconds,
        counts=counts, failures=failures, timeline=report.timeline,
    )  # fmt: skip


def from_checkpoint(path: str | os.PathLike[str]) -> ReportData:
    """The report of the last run recorded in the checkpoint at ``path``.

    Older checkpoint files (or runs stopped before any chunk finished) hold no timeline:
    the report then shows what the file holds (the function, its stored results).
    Raises ``CheckpointError`` for a file that is not a checkpoint or is damaged.
    """
    from amorsize.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    head = ckpt.header()
    stored = len(ckpt)
    runs = ckpt.timeline()
    title = f"{head.get('func_module', '?')}.{head.get('func_qualname', '?')}"
    n_items = head.get("n_items") or None
    notes = [f"checkpoint {os.fspath(path)}: {stored:,} result(s) stored"
             + (f" of {n_items} input items" if n_items else "")
             + f"; {len(runs)} run(s) recorded a timeline"]  # fmt: skip
    data = ReportData(title=title, notes=notes)
    if not runs:
        notes.append(
            "This checkpoint holds no run timeline (it was written by an amorsize version "
            "without run reports, or no chunk finished): only its stored results are shown."
        )
        data.counts = {"stored results": stored}
    else:
        _fill_from_run(data, runs[-1], stored)
        if len(runs) > 1:
            notes.append(f"showing the last of {len(runs)} runs (earlier runs were resumed)")
    return data


def _fill_from_run(data: ReportData, run: dict[str, Any], stored: int) -> None:
    """``data`` from one run's timeline record of a checkpoint (``Checkpoint.timeline``)."""
    summary = run["summary"] or {}
    spans = run["spans"]
    origin = summary.get("origin")
    if not isinstance(origin, (int, float)):
        origin = min((r[1] for r in spans), default=0.0)
    tl = Timeline.from_rows((r[0], r[1] - origin, r[2] - origin, *r[3:]) for r in spans)
    started = summary.get("dispatch_started")
    tl.dispatch_started = started - origin if isinstance(started, (int, float)) else None
    data.timeline = tl
    data.backend = str(summary.get("backend", "-"))
    data.n_jobs = int(summary.get("n_jobs") or 0)
    data.chunksize = int(summary.get("chunksize") or 0)
    data.reason = str(summary.get("reason", ""))
    pred = summary.get("predicted_seconds")
    data.predicted_seconds = float(pred) if isinstance(pred, (int, float)) else None
    wall = summary.get("wall_seconds")
    if not isinstance(wall, (int, float)):
        wall = max((r[2] for r in spans), default=origin) - origin
    data.wall_seconds = float(wall)
    keys = (("items", "items"), ("completed", "completed"), ("failed", "failed"),
            ("dead-lettered", "dead_lettered"), ("not attempted", "not_attempted"),
            ("from a checkpoint", "skipped"), ("retries", "retries"))  # fmt: skip
    data.counts = {label: _int_or_none(summary.get(key)) for label, key in keys}
    if not summary:
        data.counts = {"items": tl.total_items, "failed": tl.total_failed}
        data.notes.append("the run ended before it reported (crash or kill): its chunks only")
    data.counts["stored results"] = stored
    data.failures = [
        Failure(int(f.get("index", -1)), str(f.get("error", "")), str(f.get("message", "")),
                int(f.get("attempts", 0)), bool(f.get("dead_lettered")))
        for f in summary.get("failures", []) if isinstance(f, dict)
    ]  # fmt: skip


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def _message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = safe_repr(exc)
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def write_run_report(path: str, report: Any, func: Callable[..., Any]) -> None:
    """Write ``execute(report=path)``'s file for the run ``report`` of ``func``."""
    write_report(path, from_run(report, func))


def write_report(path: str, data: ReportData) -> None:
    """Write ``data`` as HTML or PNG (by ``path``'s suffix), atomically (a temporary file
    renamed), so that a reader never sees half a report. ``OSError`` names the path."""
    if path.lower().endswith(".png"):
        _write_atomic(path, lambda tmp: render_png(data, tmp))
        return
    page = render_html(data).encode("utf-8")
    _write_atomic(path, lambda tmp: _write_bytes(tmp, page))


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    try:
        fd, tmp = tempfile.mkstemp(prefix=".amorsize-report-", suffix=suffix, dir=folder)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        msg = f"cannot write the run report {path!r}: {exc.strerror or exc}; pass a writable path"
        raise OSError(exc.errno, msg) from exc


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.sub{color:#57606a;margin:0 0 16px}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;min-width:110px}
.card b{display:block;font-size:18px}.card span{color:#57606a;font-size:12px}
.bad b{color:#b42318}table{border-collapse:collapse}td,th{border-bottom:1px solid #eaeef2;
padding:4px 10px;text-align:left;vertical-align:top}th{color:#57606a;font-weight:600}
code{font:12px ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
svg{display:block;max-width:100%}.note{color:#57606a;font-size:12px}
"""


def _e(value: Any) -> str:
    """Any value as escaped HTML text (quotes too: safe in attributes)."""
    return html.escape(str(value), quote=True)


def render_html(data: ReportData) -> str:
    """The report as one self-contained HTML page (no script, nothing fetched)."""
    parts = [
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>",
        f"<title>amorsize run report: {_e(data.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Run report: <code>{_e(data.title)}</code></h1>",
        f"<p class='sub'>{_e(data.backend)} with n_jobs={_e(data.n_jobs)}, "
        f"chunksize={_e(data.chunksize)} &middot; {_e(format_seconds(data.wall_seconds))} "
        f"measured</p>",
        _cards(data),
        "<h2>Plan</h2>",
        _plan(data),
        "<h2>Chunks per worker</h2>",
        _gantt(data),
        "<h2>Throughput</h2>",
        _throughput(data),
        _failures(data),
        "".join(f"<p class='note'>{_e(n)}</p>" for n in data.notes),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def _cards(data: ReportData) -> str:
    rate = (data.counts.get("items") or 0) / data.wall_seconds if data.wall_seconds > 0 else 0
    cards = [(f"{rate:,.0f}", "items/s", False)]
    for label, value in data.counts.items():
        if value is None or (value == 0 and label in _HIDE_ZERO):
            continue
        bad = label in ("failed", "dead-lettered", "not attempted") and value > 0
        cards.append((f"{value:,}", label, bad))
    return "<div class='cards'>" + "".join(
        f"<div class='card{' bad' if bad else ''}'><b>{_e(v)}</b><span>{_e(k)}</span></div>"
        for v, k, bad in cards
    ) + "</div>"


def _plan(data: ReportData) -> str:
    rows = [("backend", data.backend), ("workers (n_jobs)", data.n_jobs),
            ("chunk size", data.chunksize), ("why", data.reason or "-")]  # fmt: skip
    table = "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    table += "</table>"
    pred, meas = data.predicted_seconds, data.wall_seconds
    if pred is None:
        return table + "<p class='note'>No prediction: the plan was given, not optimized.</p>"
    top = max(pred, meas, 1e-12)
    bars = []
    for k, (label, value, color) in enumerate(
        (("predicted", pred, "#afb8c1"), ("measured", meas, "#57606a"))
    ):
        w = max(1.0, 600 * value / top)
        y = 6 + 26 * k
        bars.append(
            f"<text x='0' y='{y + 14}' font-size='12'>{label}</text>"
            f"<rect x='80' y='{y}' width='{w:.1f}' height='18' fill='{color}'/>"
            f"<text x='{86 + w:.1f}' y='{y + 14}' font-size='12'>"
            f"{_e(format_seconds(value))}</text>"
        )
    ratio = pred / meas if meas > 0 else math.nan
    return (
        table + "<svg width='760' height='62' role='img' aria-label='predicted vs measured'>"
        + "".join(bars) + "</svg>"
        + f"<p class='note'>predicted / measured = {ratio:.2f}</p>"
    )


_LANE = 22
_LABEL_W = 120
_PLOT_W = 820


def _ticks(top: float, n: int = 6) -> list[float]:
    """Round tick values from 0 to ``top``."""
    if top <= 0:
        return [0.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [k * step for k in range(int(top / step) + 1)]


def _worker_labels(timeline: Timeline, backend: str) -> dict[int, str]:
    kind = {"processes": "process", "dask": "process", "threads": "thread"}.get(backend, "slot")
    labels: dict[int, str] = {}
    for k, w in enumerate(timeline.workers()):
        labels[w] = f"{kind} {k + 1}" if w >= 0 else ("caller" if backend == "serial" else f"slot {-w}")
    return labels


def _gantt(data: ReportData) -> str:
    tl = data.timeline
    if tl is None or not tl.spans:
        return "<p class='note'>No chunk timeline was recorded for this run.</p>"
    origin = tl.origin
    end = max(s.end for s in tl.spans) - origin
    scale = _PLOT_W / max(end, 1e-9)
    labels = _worker_labels(tl, data.backend)
    lanes = {w: k for k, w in enumerate(labels)}
    plan_row = 1 if tl.dispatch_started is not None else 0
    height = _LANE * (len(lanes) + plan_row) + 30
    out = [f"<svg width='{_LABEL_W + _PLOT_W + 20}' height='{height}' role='img' "
           "aria-label='chunks per worker over time' id='gantt' shape-rendering='crispEdges'>"]  # fmt: skip
    if plan_row:
        w = max(1.0, (tl.dispatch_started - origin) * scale)  # type: ignore[operator]
        out.append(f"<text x='0' y='15' font-size='12'>plan + sample</text>"
                   f"<rect x='{_LABEL_W}' y='3' width='{w:.1f}' height='16' fill='{_PLAN_COLOR}'>"
                   "<title>planning and sampling</title></rect>")  # fmt: skip
    for w, k in lanes.items():
        y = _LANE * (k + plan_row)
        out.append(f"<text x='0' y='{y + 15}' font-size='12'>{_e(labels[w])}</text>")
    for s in tl.spans:
        out.append(_bar(s, origin, scale, _LANE * (lanes[s.worker] + plan_row), labels[s.worker]))
    out.append(_axis(end, scale, height - 26))
    out.append("</svg>")
    note = (f"{tl.total_chunks:,} chunks, {tl.total_items:,} items"
            + (f"; neighbouring chunks merged {tl.merges} time(s) to bound memory" if tl.merges else "")
            + ". Hover a bar for its items and times.")  # fmt: skip
    return "".join(out) + f"<p class='note'>{_e(note)}</p>"


def _bar(s: ChunkSpan, origin: float, scale: float, y: int, label: str) -> str:
    x = _LABEL_W + (s.start - origin) * scale
    w = max(3.0 if s.failed else 1.0, (s.end - s.start) * scale)  # a failure stays visible
    color = FAIL_COLOR if s.failed else BAR_COLOR
    what = f"{s.chunks} chunks" if s.chunks > 1 else "chunk"
    tip = (f"{label}: {what} from item {s.first}, {s.items} items ({s.failed} failed), "
           f"{s.start - origin:.4f}-{s.end - origin:.4f} s")  # fmt: skip
    return (f"<rect x='{x:.2f}' y='{y + 3}' width='{w:.2f}' height='16' fill='{color}'>"
            f"<title>{_e(tip)}</title></rect>")  # fmt: skip


def _axis(top: float, scale: float, y: float) -> str:
    out = [f"<line x1='{_LABEL_W}' y1='{y}' x2='{_LABEL_W + _PLOT_W}' y2='{y}' stroke='#8c959f'/>"]
    for t in _ticks(top):
        x = _LABEL_W + t * scale
        out.append(f"<line x1='{x:.1f}' y1='{y}' x2='{x:.1f}' y2='{y + 4}' stroke='#8c959f'/>"
                   f"<text x='{x:.1f}' y='{y + 16}' font-size='11' text-anchor='middle'>"
                   f"{_e(format_seconds(t) if t else '0')}</text>")  # fmt: skip
    return "".join(out)


def _throughput(data: ReportData) -> str:
    tl = data.timeline
    points = tl.throughput() if tl is not None else []
    if not points:
        return "<p class='note'>No chunk timeline was recorded for this run.</p>"
    h = 160
    t_end = points[-1][0] + (points[-1][0] - points[-2][0] if len(points) > 1 else 0) / 2
    top = max(r for _, r in points) or 1.0
    sx = _PLOT_W / max(t_end, 1e-9)
    sy = (h - 20) / top
    xy = " ".join(f"{_LABEL_W + t * sx:.1f},{h - r * sy:.1f}" for t, r in points)
    return (
        f"<svg width='{_LABEL_W + _PLOT_W + 20}' height='{h + 30}' role='img' "
        "aria-label='items per second over time' id='throughput'>"
        f"<text x='0' y='16' font-size='12'>{_e(f'{top:,.0f}')} items/s</text>"
        f"<text x='0' y='{h}' font-size='12'>0</text>"
        f"<polyline points='{xy}' fill='none' stroke='{_LINE_COLOR}' stroke-width='2'/>"
        + _axis(t_end, sx, h + 4) + "</svg>"
    )


def _failures(data: ReportData) -> str:
    failed = data.counts.get("failed") or 0
    if not data.failures:
        return "<h2>Failures</h2><p class='note'>None.</p>" if not failed else ""
    rows = "".join(
        f"<tr><td>{f.index}</td><td><code>{_e(f.error)}</code></td>"
        f"<td><code>{_e(f.message)}</code></td><td>{f.attempts}</td>"
        f"<td>{'yes' if f.dead_lettered else 'no'}</td></tr>"
        for f in data.failures
    )
    more = failed - len(data.failures)
    tail = f"<p class='note'>and {more:,} more</p>" if more > 0 else ""
    return (
        "<h2>Failures</h2><table><tr><th>item</th><th>error</th><th>message</th>"
        f"<th>attempts</th><th>dead-lettered</th></tr>{rows}</table>{tail}"
    )


# --------------------------------------------------------------------------- PNG


def render_png(data: ReportData, path: str) -> None:
    """The Gantt chart and the throughput as a PNG image (matplotlib, Agg)."""
    fig = _matplotlib("")(figsize=(10, 6), layout="constrained")
    ax_g, ax_t = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    pred = format_seconds(data.predicted_seconds)
    fig.suptitle(
        f"{data.title}: {data.backend}, n_jobs={data.n_jobs}, chunksize={data.chunksize}; "
        f"measured {format_seconds(data.wall_seconds)}, predicted {pred}; "
        f"{data.counts.get('failed') or 0} failed",
        fontsize=10,
    )
    _png_gantt(ax_g, data)
    points = data.timeline.throughput() if data.timeline is not None else []
    if points:
        ax_t.plot([t for t, _ in points], [r for _, r in points], color=_LINE_COLOR)
    ax_t.set_xlabel("seconds since the run started")
    ax_t.set_ylabel("items/s")
    ax_t.set_xlim(left=0)
    ax_t.set_ylim(bottom=0)
    fig.savefig(path, format="png", dpi=100)


def _png_gantt(ax: Any, data: ReportData) -> None:
    tl = data.timeline
    if tl is None or not tl.spans:
        ax.text(0.5, 0.5, "no chunk timeline recorded", ha="center", transform=ax.transAxes)
        return
    labels = _worker_labels(tl, data.backend)
    lanes = {w: k for k, w in enumerate(labels)}
    if tl.dispatch_started is not None:
        ax.axvspan(0, tl.dispatch_started - tl.origin, color=_PLAN_COLOR, label="plan + sample")
        ax.legend(loc="upper right", fontsize=8)
    for s in tl.spans:
        ax.broken_barh(
            [(s.start - tl.origin, max(s.end - s.start, 1e-9))], (lanes[s.worker] - 0.4, 0.8),
            facecolors=FAIL_COLOR if s.failed else BAR_COLOR,
        )
    ax.set_yticks(range(len(lanes)), [labels[w] for w in lanes])
    ax.invert_yaxis()
    ax.set_title("chunks per worker", fontsize=10)

