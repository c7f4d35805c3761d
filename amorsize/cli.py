"""The ``amorsize`` command line: optimize, execute, dead-letter, report, demo, bench, info.

Run ``amorsize --help`` (or ``python -m amorsize --help``) for the options. ``MODULE:FUNC``
names a function: ``MODULE`` with a ``/`` or ending in ``.py`` is that file, loaded by path;
otherwise a module imported with the current directory first on ``sys.path``, like
``python -m`` (see :func:`load_function` for the exact rule). ``FUNC`` may be a dotted
attribute path. Data comes from ``--data-range N`` (the ints ``0 .. N-1``, or
``START:STOP[:STEP]``) or ``--data-file F`` (one JSON value per line; ``-`` reads stdin).

Data flow of ``amorsize execute``::

    --data-file / --data-range ──▶ items (parsed and checked before anything runs)
                                     │
    MODULE:FUNC ──▶ func ──▶ amorsize.execute_iter(func, items, ...)  (plan, run, retry,
                                     │                                 checkpoint, DLQ)
                                     ▼ results in input order, as they complete
                      one JSON line per item ──▶ stdout or --output F
                      (a failed item writes ``null`` and one line on stderr)

Exit codes: 0 success; 1 some items failed (or the run raised); 2 bad input (no such module,
not callable, bad range, unreadable or malformed file, bad option); 130 interrupted (Ctrl-C).

>>> main(["info", "--json"])   # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, NoReturn, TypeAlias

from amorsize._format import describe_error, format_bytes, format_seconds, safe_repr
from amorsize._validate import MAX_SECONDS, MAX_WORKERS, check_int, check_number, fail
from amorsize._version import read_version
from amorsize.backends import BACKEND_NAMES, DEFAULT_BACKENDS, REGISTRY

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "load_data",
    "load_function",
    "main",
]

EXIT_OK = 0
#: Some items failed for good, or the run raised.
EXIT_FAILED = 1
#: Bad input: the command line, the function or the data (the conventional usage code).
EXIT_USAGE = 2
#: 128 + SIGINT, what shells report for a program stopped by Ctrl-C.
EXIT_INTERRUPTED = 130
#: 128 + SIGPIPE: the reader of our stdout went away (``amorsize execute ... | head``).
EXIT_BROKEN_PIPE = 141

# Failed items listed one per line on stderr before the rest are summarised as a count.
_MAX_FAILURE_LINES = 10
_BACKENDS = ("auto", *BACKEND_NAMES)
_JITTER = {"on": True, "off": False, "full": "full", "equal": "equal",
           "decorrelated": "decorrelated"}


class CliError(Exception):
    """Bad input: printed as one line on stderr, and the exit code is 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so that ``main`` decides the exit code)."""

    def error(self, message: str) -> NoReturn:
        msg = f"{message} (see '{self.prog} --help')"
        raise CliError(msg)


# --------------------------------------------------------------------------- arguments
def _number(text: str) -> object:
    """The int or float that ``text`` spells, else ``text`` itself (which the check refuses)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


class _Checked(argparse.Action):
    """Stores an option's value as ``check(where, option, text)`` returns it.

    The checks raise through :mod:`amorsize._validate`, so a bad value reads like the
    library's own errors, with the command as the owner:
    ``amorsize execute: --retries must be an int in [-1, ...] (-1: no limit); got -3``.
    """

    def __init__(
        self,
        option_strings: list[str],
        dest: str,
        *,
        check: Callable[[str, str, str], Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.check = check

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        """Check the option's value and store it, or report it through ``parser.error``."""
        try:
            value = self.check(f"{parser.prog}: ", option_string or self.dest, values)
        except (TypeError, ValueError) as exc:
            parser.error(str(exc))
        setattr(namespace, self.dest, value)


def _number_option(check: Callable[..., Any], **rule: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a number checked by ``check(where, name, value, **rule)``."""

    def parse(where: str, name: str, text: str) -> Any:
        return check(where, name, _number(text), **rule)

    return {"action": _Checked, "check": parse}


def _check_jobs(where: str, name: str, value: object) -> int:
    """``execute``'s rule for ``n_jobs``: -1 (every CPU) or a worker count."""
    if type(value) is int and value == -1:
        return -1
    return check_int(where, name, value, 1, MAX_WORKERS, note=" (-1: every CPU)")


_COUNT = _number_option(check_int, low=1)
_SECONDS = _number_option(check_number, low=0, high=MAX_SECONDS, note=" (seconds)")


def _data_range(where: str, name: str, text: str) -> range:
    """``N`` (0 .. N-1) or ``START:STOP[:STEP]``, as for Python's ``range``."""
    parts = text.split(":")
    try:
        nums = [int(p) for p in parts] if len(parts) <= 3 else []
    except ValueError:
        nums = []
    if not nums:
        fail(ValueError, where, name, "N or START:STOP[:STEP], in integers", text)
    if len(nums) == 1 and nums[0] < 0:
        fail(ValueError, where, name, "N >= 0 (the items are 0 .. N-1)", text)
    if len(nums) == 3 and nums[2] == 0:
        fail(ValueError, where, name, "START:STOP:STEP with a STEP other than 0", text)
    return range(*nums)


def _retry_defaults() -> dict[str, Any]:
    """``RetryPolicy``'s field defaults: what a retry option means when it is not given."""
    from amorsize.retry import RetryPolicy

    return {f.name: f.default for f in dataclasses.fields(RetryPolicy)}


# --------------------------------------------------------------------------- the parser
_Commands: TypeAlias = "argparse._SubParsersAction[_Parser]"


def _build_parser() -> _Parser:
    """The ``amorsize`` parser: one sub-parser per command, each built by its own function."""
    parser = _Parser(
        prog="amorsize",
        description=(
            "Decide whether and how to parallelise map(func, data), run it, survive failures."
        ),
        epilog=(
            "Exit codes: 0 ok, 1 some items failed, 2 bad input, 130 interrupted. "
            "Start with: amorsize demo"
        ),
    )
    parser.add_argument("--version", action="version", version=f"amorsize {read_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in (_add_optimize, _add_execute, _add_dead_letter, _add_report, _add_demo,
                        _add_bench, _add_info):  # fmt: skip
        add_command(commands)
    return parser


def _add_function_and_data(p: argparse.ArgumentParser, *, stdin: str) -> None:
    p.add_argument(
        "function", metavar="MODULE:FUNC",
        help="the function applied to each item, e.g. mymodule:work or jobs.py:work",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data-range", metavar="N", action=_Checked, check=_data_range,
        help="the items are the integers 0 .. N-1 (or START:STOP[:STEP])",
    )
    src.add_argument(
        "--data-file", metavar="F",
        help=f"the items are the JSON values in F, one per line ('-': {stdin})",
    )


def _add_optimize(commands: _Commands) -> None:
    p = commands.add_parser(
        "optimize", help="print the plan for map(FUNC, data) without running it all",
        description=(
            "Sample FUNC on the first items, read this machine's costs and print the plan: "
            "serial, processes or threads, n_jobs and chunksize, with the reason."
        ),
    )
    _add_function_and_data(p, stdin="stdin")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument(
        "--n-jobs", metavar="N", help="fix the worker count",
        **_number_option(check_int, low=1, high=MAX_WORKERS),
    )
    p.add_argument(
        "--sample-size", metavar="N",
        help="sample exactly N items (default: adapt to the item cost)", **_COUNT,
    )
    p.add_argument(
        "--backends", default=",".join(DEFAULT_BACKENDS), metavar="LIST",
        help="comma-separated backends to choose from (default: %(default)s; also: "
        + ", ".join(
            b for b in BACKEND_NAMES if b not in DEFAULT_BACKENDS and not REGISTRY[b].coroutines
        ) + ")",
    )
    p.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="plan for this dask.distributed scheduler too (adds dask to --backends)",
    )
    p.add_argument(
        "--alternatives", type=int, default=8, metavar="K",
        help="list up to K ranked alternatives in the report (default: %(default)s)",
    )
    p.set_defaults(handler=_cmd_optimize)


def _add_execute(commands: _Commands) -> None:
    p = commands.add_parser(
        "execute", help="run FUNC on every item and write the results as JSON lines",
        description=(
            "Run FUNC on every item as planned (or as told), in input order, writing one "
            "JSON line per result. A failed item writes null and is reported on stderr."
        ),
    )
    _add_function_and_data(p, stdin="stdin, read as it arrives")
    p.add_argument("-o", "--output", metavar="F", help="write the results to F, not stdout")
    p.add_argument("--backend", choices=_BACKENDS, default="auto", help="default: auto (plan)")
    p.add_argument(
        "--n-jobs", metavar="N", help="worker count (-1: every CPU)", **_number_option(_check_jobs)
    )
    p.add_argument("--chunksize", metavar="N", help="items per task", **_COUNT)
    p.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="run on this dask.distributed scheduler (e.g. tcp://10.0.0.5:8786); implies dask",
    )
    p.add_argument(
        "--start-method", choices=("fork", "spawn", "forkserver"),
        help="how process workers start (default: the platform's); implies processes",
    )
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.add_argument(
        "-v", "--verbose", action="store_true",
        help="print the plan and predicted vs measured time on stderr",
    )
    p.add_argument(
        "--on-error", choices=("raise", "collect"), default="raise",
        help="raise: stop at the first failed item (default); collect: run every item",
    )
    _add_retry_options(p)
    _add_reliability_options(p)
    _add_limit_options(p)
    p.set_defaults(handler=_cmd_execute)


def _add_retry_options(p: argparse.ArgumentParser) -> None:
    """``execute``'s retry group; the defaults its help names are ``RetryPolicy``'s own."""
    d = _retry_defaults()
    jitter = {value: name for name, value in _JITTER.items()}[d["jitter"]]
    budget = "no limit" if d["max_elapsed"] is None else format_seconds(d["max_elapsed"])
    g = p.add_argument_group("retry (any of these turns retrying on, per item)")
    g.add_argument(
        "--retries", metavar="N",
        help=f"retries after the first attempt (default {d['max_retries']}; -1: no limit)",
        **_number_option(check_int, low=-1, note=" (-1: no limit)"),
    )
    g.add_argument(
        "--retry-delay", metavar="S", help=f"first delay (default {d['initial_delay']:g} s)",
        **_SECONDS,
    )
    g.add_argument(
        "--retry-max-delay", metavar="S", help=f"longest delay (default {d['max_delay']:g} s)",
        **_SECONDS,
    )
    g.add_argument(
        "--retry-backoff", metavar="B",
        help=f"delay growth factor (default {d['exponential_base']:g})",
        **_number_option(check_number, low=1, note=" (1: constant delay)"),
    )
    g.add_argument(
        "--retry-jitter", choices=tuple(_JITTER),
        help=f"jitter strategy (default: {jitter}; on: +-25%%)",
    )
    g.add_argument(
        "--retry-max-elapsed", metavar="S",
        help=f"give up on an item once retrying it would pass S seconds (default: {budget})",
        **_number_option(check_number, low=0, high=MAX_SECONDS, low_open=True, note=" (seconds)"),
    )


def _add_reliability_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reliability")
    g.add_argument(
        "--checkpoint", metavar="PATH",
        help="record results in this SQLite file; running again resumes where it stopped",
    )
    g.add_argument(
        "--dead-letter", metavar="PATH",
        help="record items that fail for good in this SQLite file, and go on",
    )
    g.add_argument(
        "--trust", action="store_true",
        help="resume from a --checkpoint file signed with another key (another user's or "
        "machine's); loading its results runs code, so only for files you trust like code",
    )
    g.add_argument(
        "--circuit-breaker", metavar="N",
        help="stop dispatching after N consecutive failures", **_COUNT,
    )
    g.add_argument(
        "--report", metavar="FILE",
        help="write a run report when the run ends: FILE.html (self-contained page) or "
        "FILE.png (needs the 'report' extra)",
    )


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits (for jobs that call a service)")
    g.add_argument(
        "--timeout", metavar="S",
        help="fail an item attempt that runs longer than S seconds (ItemTimeoutError)",
        **_number_option(check_number, low=0, high=MAX_SECONDS, low_open=True, note=" (seconds)"),
    )
    g.add_argument(
        "--rate-limit", metavar="N",
        help="start at most N calls of FUNC per second, retries included, across all workers",
        **_number_option(check_number, low=0, low_open=True, note=" (calls per second)"),
    )
    g.add_argument(
        "--max-tasks-per-worker", metavar="N",
        help="replace a worker process after N items (processes backend)", **_COUNT,
    )
    g.add_argument(
        "--max-worker-memory", metavar="BYTES",
        help="replace a worker process whose RSS passes BYTES after an item (processes backend)",
        **_COUNT,
    )


def _rate_limiter(rate: float | None) -> Any:
    """``--rate-limit``: a ``RateLimiter`` of ``rate`` calls per second, or None."""
    if rate is None:
        return None
    from amorsize.ratelimit import RateLimiter

    return RateLimiter(rate)


def _add_dead_letter(commands: _Commands) -> None:
    p = commands.add_parser(
        "dead-letter", help="list, export, replay or clear a dead-letter file",
        description=(
            "Show the items recorded by execute --dead-letter PATH, export them as JSON "
            "lines, run them again through a (fixed) function, or clear the file. Listing "
            "and exporting never unpickle; --replay loads only items signed with your key."
        ),
    )
    p.add_argument("path", metavar="PATH", help="the dead-letter SQLite file")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--json", action="store_true", help="export the entries as JSON lines")
    action.add_argument(
        "--replay", metavar="MODULE:FUNC",
        help="run the entries through FUNC; those that now succeed are removed",
    )
    action.add_argument("--clear", action="store_true", help="remove every entry")
    p.add_argument(
        "--trust", action="store_true",
        help="with --replay: load items not signed with your key (another user's or machine's "
        "file); unpickling runs code, so only for files you trust like code",
    )
    p.set_defaults(handler=_cmd_dead_letter)


def _add_report(commands: _Commands) -> None:
    p = commands.add_parser(
        "report", help="draw a checkpointed run: chunks per worker, throughput, failures",
        description=(
            "Write the run report of the last run recorded in a checkpoint file (execute "
            "--checkpoint PATH): a self-contained HTML page, or a PNG image (needs the "
            "'report' extra: matplotlib). Nothing is unpickled."
        ),
    )
    p.add_argument("path", metavar="CHECKPOINT", help="the checkpoint SQLite file")
    p.add_argument(
        "-o", "--output", metavar="FILE", required=True,
        help="where to write the report: a path ending .html or .png",
    )
    p.set_defaults(handler=_cmd_report)


def _add_demo(commands: _Commands) -> None:
    p = commands.add_parser(
        "demo", help="show the decision on three contrasting workloads, run them, time them",
        description=(
            "Optimize and execute three built-in workloads (tiny items: serial wins; "
            "CPU-bound items: processes; sleeping items: threads), printing predicted vs "
            "measured time. Takes about 10 seconds."
        ),
    )
    p.add_argument(
        "--no-baseline", action="store_true",
        help="skip timing the serial baseline of each workload (faster)",
    )
    p.set_defaults(handler=_cmd_demo)


def _add_bench(commands: _Commands) -> None:
    p = commands.add_parser(
        "bench", help="time amorsize's retry decorator against the installed peers",
        description=(
            "Per-call cost of a retry-decorated function that succeeds, for amorsize and "
            "whichever of tenacity, backoff, stamina and opnieuw are installed, side by side."
        ),
    )
    p.add_argument(
        "--seconds", default=1.0, metavar="S",
        help="measuring time per contender (default: %(default)s)", **_SECONDS,
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(handler=_cmd_bench)


def _add_info(commands: _Commands) -> None:
    p = commands.add_parser(
        "info", help="print the machine facts the optimizer uses",
        description="Cores, memory, start method and measured worker costs (cached).",
    )
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    p.add_argument("--refresh", action="store_true", help="measure again and rewrite the cache")
    p.set_defaults(handler=_cmd_info)


# --------------------------------------------------------------------------- inputs
def load_function(spec: str) -> Callable[[Any], Any]:
    """The function named by ``MODULE:FUNC``; ``CliError`` (one line) for any bad input.

    The rule, so that a spec never runs something else than what it names:

    * ``MODULE`` with a ``/`` (or the OS's separator) or ending in ``.py`` is a file: that
      file is loaded by path, under a private module name that cannot shadow or be
      shadowed by an imported module (``/tmp/json.py:dumps`` runs that file's ``dumps``,
      never the standard library's). Worker processes load the same file by path, whatever
      their start method; its directory is appended to ``sys.path`` for its own imports.
    * Otherwise ``MODULE`` is imported by name with the current directory first on
      ``sys.path``, like ``python -m``. A name already imported from elsewhere while the
      current directory holds a module of that name (``./json.py`` with ``json:dumps``) is
      refused: pass the file as ``./json.py:dumps``.

    >>> load_function("math:sqrt")(9.0)
    3.0
    """
    return _load(spec)[0]


def _ship_by_value(func: Callable[[Any], Any], module: Any, where: str) -> Callable[[Any], Any]:
    """Let cloudpickle send ``module``'s code by value when it lives in ``where``; returns
    the function to send.

    Dask workers run on other machines (or were started elsewhere): they cannot import a
    module that sits in the caller's directory, nor load a file by its path there.
    Installed modules still go by reference. Called once the dask backend imported, and
    with it cloudpickle (a dependency of dask).
    """
    import cloudpickle

    path = getattr(module, "__file__", None)
    if path and Path(path).resolve().is_relative_to(Path(where).resolve()):
        cloudpickle.register_pickle_by_value(module)
        if isinstance(func, _FileFunction):
            return func.func
    return func


# A module loaded from a file by path, by resolved path: loaded once per process.
_file_modules: dict[str, Any] = {}


def _is_path_spec(module_name: str) -> bool:
    seps = {"/", os.sep, os.altsep or "/"}
    return module_name.endswith(".py") or any(sep in module_name for sep in seps)


def _module_from_file(path: str) -> Any:
    """Execute the file at ``path`` (resolved) as a module with a private name, once."""
    module = _file_modules.get(path)
    if module is not None:
        return module
    import hashlib
    import importlib.util
    import re

    stem = re.sub(r"\W", "_", Path(path).stem)
    digest = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    name = f"_amorsize_file_{digest}_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        msg = f"cannot load {path!r} as a Python module"
        raise ImportError(msg)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs (as import does) so that its classes and functions pickle
    # by reference under this name, in the parent and in every worker alike.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _file_modules[path] = module
    return module


def _attribute(module: Any, attr_path: str) -> Any:
    obj: Any = module
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def _file_function(path: str, attr_path: str) -> _FileFunction:
    """Unpickling a :class:`_FileFunction` in a worker: load the file (once) and look up."""
    directory = str(Path(path).parent)
    if directory not in sys.path:
        sys.path.append(directory)
    return _FileFunction(path, attr_path, _attribute(_module_from_file(path), attr_path))


class _FileFunction:
    """A function from a file loaded by path. It pickles as (path, attribute), so that a
    worker started by fork, spawn or forkserver loads the same file (the file's module has
    a private name no worker could import)."""

    def __init__(self, path: str, attr_path: str, func: Callable[[Any], Any]) -> None:
        self.path, self.attr_path, self.func = path, attr_path, func
        # __module__, __qualname__, __doc__ and __wrapped__ of the function: reports and
        # the checkpoint's identity name the user's function, not this wrapper.
        functools.update_wrapper(self, func)

    def __call__(self, item: Any) -> Any:
        return self.func(item)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_file_function, (self.path, self.attr_path))


def _load(spec: str) -> tuple[Callable[[Any], Any], Any, str]:
    """``(func, its module, the directory it was found in)`` for ``MODULE:FUNC``."""
    # The last colon: a Windows path (C:\\jobs\\work.py:f) has one of its own.
    module_name, sep, attr_path = spec.rpartition(":")
    if not sep or not module_name or not attr_path:
        msg = f"the function must be given as MODULE:FUNC (e.g. mymodule:work); got {spec!r}"
        raise CliError(msg)
    if _is_path_spec(module_name):
        return _load_file(spec, module_name, attr_path)
    where = os.getcwd()
    _refuse_shadowed(spec, module_name, where)
    if where not in sys.path:
        # Like `python -m`: the caller's directory comes first. Spawned workers inherit
        # sys.path, so they import MODULE the same way.
        sys.path.insert(0, where)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            msg = f"no module named {module_name!r} (looked in {where} and on sys.path)"
        else:
            msg = f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        raise CliError(msg) from None
    except (Exception, SystemExit) as exc:
        msg = f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
        raise CliError(msg) from None
    return _checked(spec, module_name, attr_path, module), module, where


def _refuse_shadowed(spec: str, module_name: str, where: str) -> None:
    """A bare name already imported from elsewhere, while ``where`` holds a module of that
    name, would silently run the other one: refuse it."""
    top = module_name.partition(".")[0]
    loaded = sys.modules.get(top)
    if loaded is None:
        return
    local = [p for p in (Path(where) / f"{top}.py", Path(where) / top) if p.exists()]
    origin = getattr(loaded, "__file__", None)
    if not local or (origin and Path(origin).resolve().is_relative_to(Path(where).resolve())):
        return
    msg = (
        f"{module_name!r} (from {spec!r}) names the module {top!r} already imported from"
        f" {origin or 'Python itself'}, not {local[0].name!r} in the current directory;"
        f" give the file's path instead (e.g. ./{top}.py:{spec.rpartition(':')[2]}),"
        " or rename it"
    )
    raise CliError(msg)


def _load_file(spec: str, module_name: str, attr_path: str) -> tuple[Any, Any, str]:
    path = Path(module_name)
    if not path.is_file():
        msg = f"no such file {module_name!r} (from {spec!r})"
        raise CliError(msg)
    resolved = str(path.resolve())
    where = str(Path(resolved).parent)
    if where not in sys.path:
        sys.path.append(where)  # for the file's own imports; appended: it shadows nothing
    try:
        module = _module_from_file(resolved)
    except (Exception, SystemExit) as exc:
        msg = f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
        raise CliError(msg) from None
    func = _checked(spec, module_name, attr_path, module)
    return _FileFunction(resolved, attr_path, func), module, where


def _checked(spec: str, module_name: str, attr_path: str, module: Any) -> Callable[[Any], Any]:
    """``MODULE``'s attribute ``attr_path``, which must be callable."""
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            msg = f"{module_name!r} has no attribute {attr_path!r} (from {spec!r})"
            raise CliError(msg) from None
    if not callable(obj):
        msg = f"{spec!r} is not callable: it is a {type(obj).__name__} ({obj!r:.60})"
        raise CliError(msg)
    return obj  # type: ignore[no-any-return]


def _read_lines(path: str) -> Iterator[str]:
    if path == "-":
        yield from sys.stdin
        return
    try:
        with open(path, encoding="utf-8") as f:
            yield from f
    except IsADirectoryError:
        msg = f"cannot read data file {path!r}: it is a directory"
        raise CliError(msg) from None
    except OSError as exc:
        msg = f"cannot read data file {path!r}: {exc.strerror or exc}"
        raise CliError(msg) from None


def _parse_lines(data_file: str) -> Iterator[Any]:
    """The JSON value of each non-blank line, or ``CliError`` naming the bad line."""
    name = "stdin" if data_file == "-" else data_file
    lineno = 0
    try:
        for lineno, line in enumerate(_read_lines(data_file), 1):
            if not line.strip():
                continue
            yield _json_value(line, name, lineno)
    except UnicodeDecodeError:
        msg = f"{name}, line {lineno + 1}: not UTF-8 text; the data file needs JSON lines"
        raise CliError(msg) from None


def _json_value(line: str, name: str, lineno: int) -> Any:
    """One line's JSON value, or ``CliError`` naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        why = f"not a JSON value ({exc.msg} at column {exc.colno})"
    except RecursionError:
        why = "a JSON value nested too deeply for Python to read"
    except ValueError as exc:  # an integer with more digits than int() accepts (4300)
        why = f"a JSON value Python cannot read ({' '.join(str(exc).split())})"
    msg = f"{name}, line {lineno}: {why}; the data file needs one JSON value per line"
    raise CliError(msg)


def load_data(
    data_range: range | None, data_file: str | None, *, stream: bool = False
) -> Iterable[Any]:
    """The items: a ``range``, or the JSON values of a file, one per non-blank line.

    A file is parsed completely before anything runs, so a malformed line is reported
    (with its line number) before any work is done. ``stream=True`` instead returns an
    iterator that parses lines as they are consumed (for ``-``, stdin in a pipeline): a
    malformed line then stops the run when it is reached.

    >>> load_data(range(3), None)
    range(0, 3)
    """
    if data_range is not None:
        return data_range
    assert data_file is not None
    if stream:
        return _parse_lines(data_file)
    return list(_parse_lines(data_file))


# --------------------------------------------------------------------------- output
def _json_line(value: Any, index: int, state: dict[str, bool]) -> str:
    try:
        return json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        if not state.get("warned"):
            state["warned"] = True
            _err(
                f"result of item {index} is not JSON-serialisable ({type(value).__name__}); "
                "such results are written as their repr() string"
            )
        return json.dumps(safe_repr(value, limit=None))


def _err(message: str) -> None:
    print(f"amorsize: {message}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    return describe_error(exc, one_line=True)


def _describe_failure(f: Any) -> str:
    return f"item {f.index} failed after {f.attempts} attempt(s): {_one_line(f.exception)}"


@contextlib.contextmanager
def _stdout_to_stderr(active: bool) -> Iterator[None]:
    """While results go to stdout, whatever else prints (the plan, ``func``) goes to stderr."""
    if not active:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


# --------------------------------------------------------------------------- commands
def _cmd_optimize(args: argparse.Namespace) -> int:
    from amorsize.optimizer import optimize

    func, module, where = _load(args.function)
    data = load_data(args.data_range, args.data_file)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    bad = [b for b in backends if b not in _BACKENDS[1:]]
    if bad or not backends:
        rule = f"a comma-separated list of {', '.join(_BACKENDS[1:])}"
        fail(CliError, "amorsize optimize: ", "--backends", rule, args.backends)
    client = None
    if args.scheduler is not None:
        _require_dask()
        func = _ship_by_value(func, module, where)
        client = _dask_client(args.scheduler)
        if "dask" not in backends:
            backends += ("dask",)
    try:
        with _stdout_to_stderr(True):
            plan = optimize(func, data, n_jobs=args.n_jobs, sample_size=args.sample_size,
                            backends=backends, client=client)
    except (TypeError, ValueError, ImportError) as exc:
        # Option checks (func's own errors while sampled become warnings in the plan).
        raise CliError(_one_line(exc)) from None
    finally:
        if client is not None:
            client.close()
    if args.json:
        print(json.dumps(_plan_dict(plan), indent=2, default=repr))
    else:
        print(plan.report(alternatives=max(args.alternatives, 0)))
    return EXIT_OK


def _plan_dict(plan: Any) -> dict[str, Any]:
    p = plan.profile
    return {
        "backend": plan.backend,
        "n_jobs": plan.n_jobs,
        "chunksize": plan.chunksize,
        "estimated_speedup": plan.estimated_speedup,
        "estimated_seconds": {
            "serial": plan.estimated_seconds.serial,
            "chosen": plan.estimated_seconds.chosen,
        },
        "reason": plan.reason,
        "warnings": list(plan.warnings),
        "n_items": plan.n_items,
        "decision_seconds": plan.decision_seconds,
        "profile": {
            "n_sampled": p.n_sampled,
            "mean_seconds": p.mean_seconds,
            "std_seconds": p.std_seconds,
            "max_seconds": p.max_seconds,
            "cpu_ratio": p.cpu_ratio,
            "in_bytes": p.in_bytes,
            "out_bytes": p.out_bytes,
            "mem_per_item": p.mem_per_item,
            "picklable": p.picklable,
            "pickle_error": p.pickle_error,
            "error_index": p.error_index,
            "error": None if p.error is None else _one_line(p.error),
            "sample_seconds": p.sample_seconds,
        },
        "alternatives": [
            {"backend": c.backend, "n_jobs": c.n_jobs, "chunksize": c.chunksize,
             "seconds": c.seconds, "speedup": c.speedup}
            for c in plan.alternatives
        ],
        "system": plan.system.as_dict(),
    }


def _retry_policy(args: argparse.Namespace) -> Any:
    given = {
        "max_retries": args.retries,
        "initial_delay": args.retry_delay,
        "max_delay": args.retry_max_delay,
        "exponential_base": args.retry_backoff,
        "jitter": None if args.retry_jitter is None else _JITTER[args.retry_jitter],
        "max_elapsed": args.retry_max_elapsed,
    }
    kwargs = {k: v for k, v in given.items() if v is not None}
    if not kwargs:
        return None
    from amorsize.retry import RetryPolicy

    cap = _retry_defaults()["max_delay"]
    if "max_delay" not in kwargs and kwargs.get("initial_delay", 0.0) > cap:
        # `--retry-delay 120` alone means "wait 120 s", not "conflicts with the default cap".
        kwargs["max_delay"] = kwargs["initial_delay"]
    try:
        return RetryPolicy(**kwargs)
    except (TypeError, ValueError) as exc:
        msg = f"bad retry options: {exc}"
        raise CliError(msg) from None


def _circuit(args: argparse.Namespace) -> Any:
    if args.circuit_breaker is None:
        return None
    from amorsize.circuit import CircuitBreakerPolicy

    return CircuitBreakerPolicy(failure_threshold=args.circuit_breaker)


def _check_store_path(option: str, path: str | None) -> None:
    """The SQLite file of ``option`` can be created: its directory exists."""
    if path is None:
        return
    parent = Path(path).parent
    if not parent.is_dir():
        msg = f"argument {option}: directory {str(parent)!r} does not exist (for {path!r})"
        raise CliError(msg)
    if Path(path).is_dir():
        msg = f"argument {option}: {path!r} is a directory; give a file path"
        raise CliError(msg)


def _backend_option(args: argparse.Namespace) -> Any:
    """``--backend`` / ``--start-method`` as ``execute``'s ``backend=`` (a name or a backend)."""
    if args.backend == "serial" and args.n_jobs not in (None, 1):
        fail(CliError, "amorsize execute: ", "--n-jobs", "1 with --backend serial", args.n_jobs)
    if args.scheduler is not None and args.backend not in ("auto", "dask"):
        msg = f"argument --scheduler: runs on dask; got --backend {args.backend}"
        raise CliError(msg)
    if args.backend == "dask" or args.scheduler is not None:
        _require_dask()
        if args.scheduler is not None:
            return "dask"
    if args.start_method is None:
        return args.backend
    if args.backend not in ("auto", "processes"):
        msg = f"argument --start-method: applies to process workers only; got --backend {args.backend}"
        raise CliError(msg)
    import multiprocessing

    from amorsize.backends import get_backend

    methods = multiprocessing.get_all_start_methods()
    if args.start_method not in methods:
        msg = (
            f"argument --start-method: {args.start_method!r} is not available on this "
            f"platform (available: {', '.join(methods)})"
        )
        raise CliError(msg)
    return get_backend("processes", start_method=args.start_method)


def _require_dask() -> None:
    """Import the dask backend, or report (as bad input) why it is not available."""
    try:
        importlib.import_module("amorsize.backends.dask")
    except ImportError as exc:
        msg = f"the dask backend is not available: {_one_line(exc)}"
        raise CliError(msg) from None


#: Seconds to wait for a dask scheduler before reporting that it cannot be reached.
_SCHEDULER_TIMEOUT_S = 10


def _dask_client(address: str | None) -> Any:
    """A ``distributed.Client`` connected to ``address`` (None: no client)."""
    if address is None:
        return None
    import distributed
    from distributed.comm.addressing import get_address_host_port, parse_address
    from distributed.comm.registry import get_backend

    try:
        # A malformed address is refused here: a Client built on one fails only slowly, and
        # then complains again when it is garbage-collected.
        get_backend(parse_address(address)[0])
        get_address_host_port(address)
        client_cls: Any = distributed.Client
        return client_cls(address, timeout=_SCHEDULER_TIMEOUT_S, set_as_default=False)
    except (OSError, ValueError, TypeError) as exc:
        msg = f"argument --scheduler: cannot connect to {address!r}: {_one_line(exc)}"
        raise CliError(msg) from None


def _open_output(path: str | None) -> IO[str]:
    if path is None:
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")  # the caller closes it
    except OSError as exc:
        msg = f"cannot write output file {path!r}: {exc.strerror or exc}"
        raise CliError(msg) from None


@dataclasses.dataclass
class _Tally:
    """The items of a run that have no result: failed ones, and ones never dispatched."""

    failures: list[Any] = dataclasses.field(default_factory=list)
    skipped: list[Any] = dataclasses.field(default_factory=list)

    def add(self, failure: Any) -> None:
        """Count an ``ItemFailure``; the first failures get a stderr line each, at once."""
        if failure.attempts == 0:  # never dispatched: one line for all, at the end
            self.skipped.append(failure)
            return
        self.failures.append(failure)
        if len(self.failures) <= _MAX_FAILURE_LINES:
            _err(_describe_failure(failure))

    def summary(self, dead_letter: str | None) -> int:
        """The closing stderr lines about failed and never-attempted items; the exit code."""
        failures, skipped = self.failures, self.skipped
        if skipped:
            _err(f"{len(skipped)} item(s) not attempted: {_one_line(skipped[0].exception)}")
        if not failures and not skipped:
            return EXIT_OK
        what = f"{len(failures)} item(s) failed"
        more = len(failures) - _MAX_FAILURE_LINES
        if more > 0:
            what += f" ({more} not listed above)"
        if skipped:
            what += f", {len(skipped)} not attempted"
        where = f"; failures recorded in {dead_letter}" if dead_letter else ""
        _err(f"{what}; their result lines are null{where}")
        return EXIT_FAILED


def _cmd_execute(args: argparse.Namespace) -> int:
    """``amorsize execute``: check every input, run, write one JSON line per item."""
    from amorsize._store import StoreError

    func, data, options = _execute_inputs(args)
    client = _dask_client(args.scheduler)
    out = _open_output(args.output)
    tally = _Tally()
    try:
        with _stdout_to_stderr(args.output is None):
            results = _start_run(func, data, client=client, **options)
            _write_results(results, out, tally, flush_each=args.data_file == "-")
    except (CliError, BrokenPipeError):
        raise  # not "the run stopped": main gives them their own exit codes (2, 141)
    except StoreError as exc:
        # The checkpoint or dead-letter file is foreign, damaged, or from another run.
        raise CliError(_one_line(exc)) from None
    except Exception as exc:
        out.flush()
        _err(_stopped(exc, args.on_error))
        return EXIT_FAILED
    finally:
        if out is not sys.stdout:
            out.close()
        if client is not None:
            client.close()
    return tally.summary(args.dead_letter)


def _execute_inputs(
    args: argparse.Namespace,
) -> tuple[Callable[[Any], Any], Iterable[Any], dict[str, Any]]:
    """``func``, the items and ``execute_iter``'s options: all checked before anything runs."""
    _check_store_path("--checkpoint", args.checkpoint)
    _check_store_path("--dead-letter", args.dead_letter)
    func, module, where = _load(args.function)
    # stdin streams, so that `producer | amorsize execute ... -` starts work at once and
    # runs in bounded memory; a file is checked completely before anything runs.
    data = load_data(args.data_range, args.data_file, stream=args.data_file == "-")
    options = {
        "retry": _retry_policy(args),
        "circuit_breaker": _circuit(args),
        "backend": _backend_option(args),
        "n_jobs": args.n_jobs,
        "chunksize": args.chunksize,
        "on_error": args.on_error,
        "progress": args.progress,
        "verbose": args.verbose,
        "checkpoint": _checkpoint(args.checkpoint, args.trust),
        "dead_letter": args.dead_letter,
        "report": args.report,
        "timeout": args.timeout,
        "rate_limit": _rate_limiter(args.rate_limit),
        "max_tasks_per_worker": args.max_tasks_per_worker,
        "max_worker_memory": args.max_worker_memory,
    }
    if options["backend"] == "dask":
        func = _ship_by_value(func, module, where)
    return func, data, options


def _checkpoint(path: str | None, trust: bool) -> Any:
    """``--checkpoint`` (and ``--trust``) as ``execute``'s ``checkpoint=``."""
    if not trust:
        return path
    if path is None:
        raise CliError("argument --trust: only applies with --checkpoint")
    from amorsize.checkpoint import Checkpoint

    return Checkpoint(path, trust=True)


def _start_run(func: Callable[[Any], Any], data: Iterable[Any], **options: Any) -> Iterator[Any]:
    """``execute_iter``'s results; what it refuses before running anything is bad input."""
    import sqlite3

    from amorsize._store import StoreError
    from amorsize.executor import execute_iter

    try:
        return execute_iter(func, data, **options)
    except (
        TypeError, ValueError, ImportError, NotImplementedError, StoreError, OSError,
        sqlite3.Error,
    ) as exc:  # fmt: skip
        # Raised while checking the options and opening the files, before anything ran
        # (func runs only once the results are iterated).
        raise CliError(_one_line(exc)) from None


def _write_results(
    results: Iterator[Any], out: IO[str], tally: _Tally, *, flush_each: bool
) -> None:
    """One JSON line per item, in input order; ``null`` for an item without a result."""
    from amorsize.executor import ItemFailure

    write = out.write
    flush = out.flush if flush_each else None  # in a pipeline, pass each line on
    state: dict[str, bool] = {}
    for index, value in enumerate(results):
        if isinstance(value, ItemFailure):
            tally.add(value)
            write("null\n")
        else:
            write(_json_line(value, index, state) + "\n")
        if flush is not None:
            flush()
    out.flush()


def _stopped(exc: Exception, on_error: str) -> str:
    """The stderr line for a run that ``exc`` ended."""
    from amorsize.circuit import CircuitOpenError

    if isinstance(exc, CircuitOpenError):
        return f"run stopped: {_one_line(exc)}"
    hint = "" if on_error == "collect" else " (--on-error collect runs every item)"
    return f"run stopped by a failed item: {_one_line(exc)}{hint}"


def _cmd_dead_letter(args: argparse.Namespace) -> int:
    import sqlite3

    from amorsize._store import StoreError
    from amorsize.dlq import DeadLetterQueue

    if not Path(args.path).is_file():
        # Opening would create an empty queue: a typo would look like "no failures".
        msg = f"no dead-letter file {args.path!r}"
        raise CliError(msg)
    if args.trust and args.replay is None:
        msg = "argument --trust: only applies with --replay (listing never loads pickles)"
        raise CliError(msg)
    func = load_function(args.replay) if args.replay is not None else None
    try:
        dlq = DeadLetterQueue(args.path)
        if args.json:
            dlq.export_jsonl(sys.stdout)
            return EXIT_OK
        if args.clear:
            print(f"removed {dlq.clear()} entries from {args.path}")
            return EXIT_OK
        if func is not None:
            return _replay(dlq, func, trust=args.trust)
        entries = dlq.entries()
        for entry in entries:
            print(
                f"#{entry.id} item {entry.index} ({entry.item_repr:.60}): {entry.exc_type}: "
                f"{' '.join(entry.message.split()):.120} [{entry.attempts} attempt(s), "
                f"{entry.when:%Y-%m-%d %H:%M:%S} UTC]"
            )
        print(f"{len(entries)} entries in {args.path}")
        return EXIT_OK
    except (StoreError, sqlite3.Error, OSError) as exc:
        # The file (or the signing key) cannot be used: foreign, damaged, unwritable,
        # unsigned items. Replay collects func's own errors, so none of them end up here.
        raise CliError(_one_line(exc)) from None


def _cmd_report(args: argparse.Namespace) -> int:
    import sqlite3

    from amorsize._store import StoreError
    from amorsize.report import check_target, from_checkpoint, write_report

    if not Path(args.path).is_file():
        # Opening would create an empty checkpoint: a typo would look like "nothing ran".
        msg = f"no checkpoint file {args.path!r}"
        raise CliError(msg)
    try:
        out = check_target("", args.output, "-o/--output")
        write_report(out, from_checkpoint(args.path))
    except (ValueError, TypeError, ImportError, StoreError, sqlite3.Error, OSError) as exc:
        raise CliError(_one_line(exc)) from None
    print(f"wrote {out}", file=sys.stderr)
    return EXIT_OK


def _replay(dlq: Any, func: Callable[[Any], Any], *, trust: bool) -> int:
    """``dead-letter PATH --replay``: one line per entry, with the new error if it fails."""
    from amorsize.executor import execute

    with _stdout_to_stderr(True):
        report = dlq.replay(func, execute=execute, trust=trust)
    for entry, value in report.succeeded:
        result = _json_line(value, entry.index, {})
        print(f"#{entry.id} item {entry.index}: now succeeds -> {result}")
    for entry in report.failed:
        why = f"{entry.exc_type}: {' '.join(entry.message.split())}"
        print(f"#{entry.id} item {entry.index}: fails again: {why:.200}")
    for entry in report.skipped:
        print(f"#{entry.id} item {entry.index}: cannot be replayed (stored as its repr)")
    print(
        f"{len(report.succeeded)} succeeded and were removed, {len(report.failed)} "
        f"failed again, {len(report.skipped)} cannot be replayed; {dlq.count()} left"
    )
    return EXIT_FAILED if report.failed else EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from amorsize.demo import run_demo

    run_demo(baseline=not args.no_baseline)
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from amorsize.demo import run_bench

    run_bench(seconds=args.seconds, as_json=args.json)
    return EXIT_OK


def _optional_packages() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("psutil", "cloudpickle", "tqdm", "threadpoolctl", "platformdirs", "dask",
                 "distributed"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    from amorsize.system import get_system_info

    info = get_system_info(refresh=args.refresh)
    optional = _optional_packages()
    if args.json:
        d = info.as_dict()
        d["amorsize_version"] = read_version()
        d["python"] = platform.python_version()
        d["platform"] = platform.platform()
        d["optional_packages"] = optional
        print(json.dumps(d, indent=2))
        return EXIT_OK
    cache = (
        f"read from {info.cache_path}" if info.from_cache
        else f"measured now ({format_seconds(info.measured_seconds)}), "
        + (f"saved to {info.cache_path}" if info.cache_path else "not cached")
    )
    pools = ", ".join(
        f"{p.get('internal_api', p.get('user_api', '?'))}={p.get('num_threads', '?')}"
        for p in info.blas_pools
    ) or "none loaded"
    present = ", ".join(f"{k} {v}" for k, v in optional.items() if v) or "none"
    absent = ", ".join(k for k, v in optional.items() if not v) or "none"
    lines = [
        f"amorsize {read_version()} on {platform.system()} {platform.machine()}, "
        f"{platform.python_implementation()} {platform.python_version()}",
        f"cores: {info.logical_cores} logical, {info.physical_cores} physical, "
        f"{info.usable_cores:g} usable by this process (affinity and CPU quota)",
        f"available memory: {format_bytes(info.available_memory)}",
        f"start method: {info.start_method}",
        f"process worker: start-up {format_seconds(info.process_startup_s)} "
        f"(+{format_seconds(info.process_startup_per_worker_s)} per extra worker), round trip "
        f"{format_seconds(info.process_roundtrip_s)}, "
        f"{info.transfer_s_per_byte * (1 << 20) * 1e3:.3g} ms/MB through a pipe, "
        f"idle worker {format_bytes(info.worker_rss_bytes)}",
        f"thread worker: start-up {format_seconds(info.thread_startup_s)}, round trip "
        f"{format_seconds(info.thread_roundtrip_s)}",
        f"BLAS/OpenMP threads: {info.blas_threads} ({pools})",
        f"machine facts: {cache}",
        f"optional packages: {present}; missing: {absent}",
    ]
    print("\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    >>> main(["--version"])   # doctest: +SKIP
    amorsize 0.1.0
    0
    """
    parser = _build_parser()
    with _one_line_diagnostics(), _interrupts_survive_finalizers():
        return _main(parser, argv)


# How long after a Ctrl-C was lost in a finalizer it is delivered again: far longer than a
# finalizer runs, far shorter than anyone waits before pressing Ctrl-C again.
_REINTERRUPT_DELAY_S = 0.02


@contextlib.contextmanager
def _interrupts_survive_finalizers() -> Iterator[None]:
    """Ctrl-C that lands inside a finalizer (``__del__``) is delivered again, not lost.

    Python runs the SIGINT handler wherever the main thread is, a garbage-collected pipe's
    ``__del__`` included; there the ``KeyboardInterrupt`` is printed as "Exception ignored"
    and dropped, and the run goes on. This hook swallows that report and has a helper thread
    signal the main thread again, once it is out of the finalizer (a signal, not a flag: the
    main thread may be blocked waiting for workers), where ``_main`` exits with code 130.
    """
    import _thread
    import signal
    import threading
    import time

    previous = sys.unraisablehook
    main_ident = threading.main_thread().ident

    def interrupt_again() -> None:
        # Give the main thread time to leave the finalizer and this hook: a signal that
        # lands in either is lost again.
        time.sleep(_REINTERRUPT_DELAY_S)
        if hasattr(signal, "pthread_kill") and main_ident is not None:
            signal.pthread_kill(main_ident, signal.SIGINT)
        else:
            _thread.interrupt_main()

    def hook(unraisable: Any) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            # Not threading.Thread: its start() waits for the thread, in this hook.
            _thread.start_new_thread(interrupt_again, ())
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def _one_line_diagnostics() -> Iterator[None]:
    """Warnings and the ``amorsize`` logger's records as ``amorsize: ...`` lines on stderr."""
    import logging
    import warnings

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        _err(f"warning: {message}")

    logger = logging.getLogger("amorsize")
    handler: logging.Handler | None = None
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("amorsize: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            yield
        finally:
            if handler is not None:
                logger.removeHandler(handler)


def _main(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version exit through argparse
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except CliError as exc:
        _err("error: " + " ".join(str(exc).split()))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away: point stdout at /dev/null so the exit flush stays quiet.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
