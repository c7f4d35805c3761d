"""The ``amorsize`` command line, run as a real subprocess (``python -m amorsize``)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from amorsize import cli

# A small user module, imported by the CLI from the current directory as MODULE.
JOBS = textwrap.dedent(
    """
    import os, time

    NOT_CALLABLE = 3
    _seen = set()

    def square(x):
        return x * x

    def echo(x):
        return x

    def bad(x):
        if x % 3 == 0:
            raise ValueError(f"bad item {x}")
        return x

    def flaky(x):
        # Fails the first time each item is seen in this process, then succeeds.
        if x not in _seen:
            _seen.add(x)
            raise ConnectionError(f"transient failure on {x}")
        return -x

    def counted(x):
        # Logs each real call, so that a test can see which items ran.
        with open(os.environ["JOBS_LOG"], "a") as f:
            f.write(f"{x}\\n")
        if os.path.exists(os.environ["JOBS_FAIL_FLAG"]) and x == 5:
            raise RuntimeError("item 5 fails while the flag file exists")
        return x + 100

    def hang_on_two(x):
        # Item 2 never answers (its thread is abandoned at the timeout; the process exits).
        if x == 2:
            __import__("threading").Event().wait(60)
        return x

    def noisy(x):
        print("chatter from func")
        return x

    def unjsonable(x):
        return {x}

    def block(x):
        # Signals that the run is under way, then waits for the test's SIGINT.
        open(os.environ["JOBS_STARTED"], "w").close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return x

    class Holder:
        @staticmethod
        def triple(x):
            return 3 * x
    """
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory holding the user module ``jobs.py`` and a module that fails to import."""
    (tmp_path / "jobs.py").write_text(JOBS)
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken at import')\n")
    return tmp_path


def run(cwd: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m amorsize ARGS`` in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "amorsize", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def lines(text: str) -> list[object]:
    """The JSON values of a JSON-lines text."""
    return [json.loads(line) for line in text.splitlines()]


def assert_usage_error(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit code 2, nothing on stdout, exactly one line on stderr naming the problem."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == ""
    err = p.stderr.strip()
    assert "\n" not in err, err
    assert err.startswith("amorsize: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


# --------------------------------------------------------------------------- basics
def test_help_lists_every_command(workdir: Path) -> None:
    """--help names every subcommand and exits 0."""
    p = run(workdir, "--help")
    assert p.returncode == 0
    for command in ("optimize", "execute", "dead-letter", "demo", "bench", "info"):
        assert command in p.stdout


def test_version(workdir: Path) -> None:
    """--version prints the package version."""
    p = run(workdir, "--version")
    assert p.returncode == 0
    assert p.stdout.strip() == f"amorsize {metadata.version('amorsize')}"


def test_console_script_is_main() -> None:
    """The installed ``amorsize`` console script points at ``cli.main``."""
    (ep,) = metadata.entry_points(group="console_scripts", name="amorsize")
    assert ep.load() is cli.main


def test_main_in_process_returns_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """main() returns the exit code instead of exiting, for usage errors and --help alike."""
    assert cli.main(["no-such-command"]) == 2
    assert "amorsize: error:" in capsys.readouterr().err
    assert cli.main(["info", "--help"]) == 0
    assert "--refresh" in capsys.readouterr().out


# --------------------------------------------------------------------------- info
def test_info_human(workdir: Path) -> None:
    """info prints the machine facts the optimizer uses."""
    p = run(workdir, "info")
    assert p.returncode == 0, p.stderr
    for needle in ("cores:", "available memory:", "start method:", "process worker:"):
        assert needle in p.stdout


def test_info_json_matches_system_module(workdir: Path) -> None:
    """info --json holds the same static facts as amorsize.system.get_system_info()."""
    from amorsize.system import get_system_info

    p = run(workdir, "info", "--json")
    assert p.returncode == 0, p.stderr
    facts = json.loads(p.stdout)
    mine = get_system_info()
    assert facts["logical_cores"] == mine.logical_cores
    assert facts["start_method"] == mine.start_method
    assert facts["usable_cores"] == mine.usable_cores
    assert set(facts["optional_packages"]) >= {"psutil", "tqdm", "cloudpickle"}


def test_info_refresh_measures_again(workdir: Path) -> None:
    """info --refresh re-measures the machine instead of reading the cache."""
    p = run(workdir, "info", "--json", "--refresh")
    assert p.returncode == 0, p.stderr
    facts = json.loads(p.stdout)
    assert facts["from_cache"] is False
    assert facts["process_startup_s"] > 0
    again = json.loads(run(workdir, "info", "--json").stdout)
    assert again["from_cache"] is True
    assert again["process_startup_s"] == facts["process_startup_s"]


# --------------------------------------------------------------------------- optimize
def test_optimize_human_report(workdir: Path) -> None:
    """optimize prints the plan, the reason and the machine line."""
    p = run(workdir, "optimize", "jobs:square", "--data-range", "1000")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("amorsize plan: ")
    assert "why: " in p.stdout
    assert "machine: " in p.stdout


def test_optimize_json(workdir: Path) -> None:
    """optimize --json is one JSON object describing a valid plan."""
    p = run(workdir, "optimize", "jobs:square", "--data-range", "5000", "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["backend"] in ("serial", "processes", "threads")
    assert plan["n_jobs"] >= 1 and plan["chunksize"] >= 1
    assert plan["n_items"] == 5000
    assert 0 < plan["profile"]["n_sampled"] <= 5000
    assert plan["alternatives"][0]["seconds"] <= plan["alternatives"][-1]["seconds"]
    assert plan["system"]["logical_cores"] >= 1


def test_optimize_respects_backends_and_n_jobs(workdir: Path) -> None:
    """--backends and --n-jobs reach the optimizer."""
    p = run(workdir, "optimize", "jobs:square", "--data-range", "100000", "--json",
            "--backends", "threads", "--n-jobs", "3")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert (plan["backend"], plan["n_jobs"]) == ("threads", 3)


def test_optimize_reports_a_function_that_raises(workdir: Path) -> None:
    """A function raising while sampled gives a plan with a warning naming the item."""
    p = run(workdir, "optimize", "jobs:bad", "--data-range", "10", "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["profile"]["error_index"] == 0
    assert "ValueError" in plan["profile"]["error"]
    assert any("item 0" in w for w in plan["warnings"])


# --------------------------------------------------------------------------- execute
@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("--backend", "serial"),
        ("--backend", "threads", "--n-jobs", "3", "--chunksize", "7"),
        ("--backend", "processes", "--n-jobs", "2", "--chunksize", "5"),
    ],
)
def test_execute_writes_results_in_order(workdir: Path, extra: tuple[str, ...]) -> None:
    """execute writes func(x) for every item, one JSON line each, in input order."""
    p = run(workdir, "execute", "jobs:square", "--data-range", "50", *extra)
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == [x * x for x in range(50)]


def test_execute_spawned_workers_import_the_module(workdir: Path) -> None:
    """--start-method spawn: fresh worker processes import MODULE from the caller's directory."""
    p = run(workdir, "execute", "jobs:square", "--data-range", "6", "--start-method", "spawn",
            "--n-jobs", "2", "--chunksize", "1")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == [x * x for x in range(6)]


def test_retry_options_build_the_policy() -> None:
    """Each retry option sets its RetryPolicy field; none given means no retrying."""
    parser = cli._build_parser()
    base = ["execute", "m:f", "--data-range", "1"]
    assert cli._retry_policy(parser.parse_args(base)) is None
    policy = cli._retry_policy(parser.parse_args([
        *base, "--retries", "5", "--retry-delay", "0.25", "--retry-max-delay", "9",
        "--retry-backoff", "3", "--retry-jitter", "full", "--retry-max-elapsed", "30",
    ]))
    assert (policy.max_retries, policy.initial_delay, policy.max_delay) == (5, 0.25, 9.0)
    assert (policy.exponential_base, policy.jitter, policy.max_elapsed) == (3.0, "full", 30.0)
    off = cli._retry_policy(parser.parse_args([*base, "--retry-jitter", "off"]))
    assert (off.jitter, off.max_retries) == (False, 3)


def test_retry_help_names_the_policy_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """execute --help states RetryPolicy's own defaults, read from its fields."""
    import dataclasses

    from amorsize.retry import RetryPolicy

    assert cli.main(["execute", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    d = {f.name: f.default for f in dataclasses.fields(RetryPolicy)}
    assert f"retries after the first attempt (default {d['max_retries']};" in text
    assert f"first delay (default {d['initial_delay']:g} s)" in text
    assert f"longest delay (default {d['max_delay']:g} s)" in text
    assert f"delay growth factor (default {d['exponential_base']:g})" in text
    assert "jitter strategy (default: on;" in text and d["jitter"] is True


def test_retry_help_follows_changed_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing in the help is written by hand: other defaults show as given."""
    fake = {"max_retries": 7, "initial_delay": 0.25, "max_delay": 9.0, "exponential_base": 3.0,
            "jitter": "full", "max_elapsed": 30.0}
    monkeypatch.setattr(cli, "_retry_defaults", lambda: fake)
    assert cli.main(["execute", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("(default 7;", "(default 0.25 s)", "(default 9 s)", "(default 3)",
                   "(default: full;", "(default: 30.00 s)"):
        assert needle in text, needle


def test_long_first_delay_alone_raises_the_default_cap() -> None:
    """--retry-delay above RetryPolicy's default max_delay alone means 'wait that long'."""
    parser = cli._build_parser()
    policy = cli._retry_policy(parser.parse_args(["execute", "m:f", "--data-range", "1",
                                                  "--retry-delay", "120"]))
    assert (policy.initial_delay, policy.max_delay) == (120.0, 120.0)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["execute", "--retries", "-3"], "--retries"),
        (["execute", "--retries", "1.5"], "--retries"),
        (["execute", "--retry-delay", "nan"], "--retry-delay"),
        (["execute", "--retry-max-elapsed", "0"], "--retry-max-elapsed"),
        (["execute", "--retry-backoff", "x"], "--retry-backoff"),
        (["execute", "--n-jobs", "0"], "--n-jobs"),
        (["execute", "--chunksize", "0"], "--chunksize"),
        (["execute", "--circuit-breaker", "-1"], "--circuit-breaker"),
        (["optimize", "--sample-size", "0"], "--sample-size"),
        (["optimize", "--n-jobs", "-1"], "--n-jobs"),
        (["execute", "--backend", "serial", "--n-jobs", "4"], "--n-jobs"),
        (["optimize", "--backends", "gpu"], "--backends"),
        (["optimize", "--data-range", "ten"], "--data-range"),
        (["execute", "--data-range", "0:9:0"], "--data-range"),
    ],
)
def test_option_errors_read_like_the_library(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad option value: '<command>: <option> must be <rule>; got <value>', exit code 2."""
    command, *rest = argv
    assert cli.main([command, "math:sqrt", "--data-range", "3", *rest]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"error: amorsize {command}: {option} must be " in err and "; got " in err, err


def test_execute_range_with_start_stop_step(workdir: Path) -> None:
    """--data-range accepts START:STOP:STEP like range()."""
    p = run(workdir, "execute", "jobs:square", "--data-range", "10:0:-3")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == [x * x for x in range(10, 0, -3)]


def test_execute_data_file_round_trips_json(workdir: Path) -> None:
    """Each non-blank line of the data file is one item; results keep their JSON types."""
    items = [{"a": [1, 2.5]}, "text", None, True, [], 7]
    (workdir / "items.jsonl").write_text(
        "\n".join(json.dumps(i) for i in items[:3]) + "\n\n" +
        "\n".join(json.dumps(i) for i in items[3:]) + "\n"
    )
    p = run(workdir, "execute", "jobs:echo", "--data-file", "items.jsonl")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == items


def test_execute_reads_stdin(workdir: Path) -> None:
    """--data-file - reads the items from stdin."""
    p = run(workdir, "execute", "jobs:square", "--data-file", "-", stdin="3\n4\n")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == [9, 16]


@pytest.mark.parametrize("backend", ["serial", "threads"])
def test_execute_stdin_malformed_line_stops_the_stream(workdir: Path, backend: str) -> None:
    """stdin is parsed as it streams: a malformed line stops the run with exit code 2."""
    p = run(workdir, "execute", "jobs:square", "--data-file", "-", "--backend", backend,
            "--chunksize", "1", stdin="1\n2\n{oops\n4\n")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "amorsize: error: stdin, line 3: not a JSON value (Expecting property name enclosed "
        "in double quotes at column 2); the data file needs one JSON value per line"
    )
    assert set(lines(p.stdout)) <= {1, 4}


def test_execute_empty_data(workdir: Path) -> None:
    """No items: no output, success."""
    (workdir / "empty.jsonl").write_text("")
    p = run(workdir, "execute", "jobs:square", "--data-file", "empty.jsonl")
    assert (p.returncode, p.stdout) == (0, ""), p.stderr


def test_execute_output_file(workdir: Path) -> None:
    """--output writes the JSON lines to a file and nothing to stdout."""
    p = run(workdir, "execute", "jobs:square", "--data-range", "20", "-o", "out.jsonl")
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    assert lines((workdir / "out.jsonl").read_text()) == [x * x for x in range(20)]


def test_execute_file_path_and_dotted_function(workdir: Path) -> None:
    """MODULE may be a .py path and FUNC a dotted attribute path."""
    p = run(workdir.parent, "execute", f"{workdir.name}/jobs.py:Holder.triple",
            "--data-range", "4")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == [0, 3, 6, 9]


SHADOW = textwrap.dedent(
    """
    import multiprocessing

    def dumps(x):
        return ["mine", x, multiprocessing.parent_process() is not None]
    """
)


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_path_spec_runs_that_file_not_an_imported_module(workdir: Path, start_method: str) -> None:
    """issue 12 item 18: /path/json.py:dumps runs that file's dumps in every worker, never json's."""
    (workdir / "sub").mkdir()
    (workdir / "sub" / "json.py").write_text(SHADOW)
    spec = f"{workdir / 'sub' / 'json.py'}:dumps"
    p = run(workdir, "execute", spec, "--data-range", "20", "--backend", "processes",
            "--n-jobs", "2", "--chunksize", "1", "--start-method", start_method)
    assert p.returncode == 0, p.stderr
    out = lines(p.stdout)
    assert [row[:2] for row in out] == [["mine", x] for x in range(20)]  # type: ignore[index]
    assert any(row[2] for row in out)  # type: ignore[index]  # some ran in a worker process


def test_path_spec_names_the_users_function(workdir: Path) -> None:
    """issue 12 item 18: a file loaded by path keeps its function's name in failure reports."""
    pytest.importorskip("amorsize.dlq")
    from amorsize.dlq import DeadLetterQueue

    p = run(workdir, "execute", "./jobs.py:bad", "--data-range", "4", "--backend", "processes",
            "--n-jobs", "2", "--start-method", "spawn", "--dead-letter", "failed.db")
    assert p.returncode == 1
    assert lines(p.stdout) == [None, 1, 2, None]
    assert [e.func.rsplit(".", 1)[-1] for e in DeadLetterQueue(workdir / "failed.db")] == ["bad"] * 2


def test_bare_name_shadowing_an_imported_module_is_refused(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """issue 12 item 18: json:dumps with ./json.py present is refused, naming both and the fix."""
    (workdir / "json.py").write_text(SHADOW)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = cli.main(["execute", "json:dumps", "--data-range", "2"])
    out, err = capsys.readouterr()
    assert_usage_error(
        subprocess.CompletedProcess([], code, out, err),
        "already imported from", "./json.py:dumps",
    )
    code = cli.main(["execute", "./json.py:dumps", "--data-range", "2", "--backend", "serial"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [row[:2] for row in lines(out)] == [["mine", 0], ["mine", 1]]  # type: ignore[index]


def test_execute_keeps_stdout_for_results(workdir: Path) -> None:
    """What func prints and the --verbose plan go to stderr; stdout holds only results."""
    p = run(workdir, "execute", "jobs:noisy", "--data-range", "5", "--verbose",
            "--backend", "serial")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == list(range(5))
    assert "chatter from func" in p.stderr
    assert "measured:" in p.stderr


def test_execute_progress_bar_on_stderr(workdir: Path) -> None:
    """--progress draws a bar on stderr, leaving stdout clean."""
    p = run(workdir, "execute", "jobs:square", "--data-range", "30", "--progress")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == [x * x for x in range(30)]
    assert "30/30" in p.stderr


def test_execute_unjsonable_result_is_written_as_repr(workdir: Path) -> None:
    """A result JSON cannot hold is written as its repr, with one warning."""
    p = run(workdir, "execute", "jobs:unjsonable", "--data-range", "3", "--backend", "serial")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == ["{0}", "{1}", "{2}"]
    assert p.stderr.count("not JSON-serialisable") == 1


def test_execute_failure_stops_the_run(workdir: Path) -> None:
    """A failing item stops the run: exit 1, one line naming the error, no traceback."""
    p = run(workdir, "execute", "jobs:bad", "--data-range", "10", "--backend", "serial")
    assert p.returncode == 1
    assert "ValueError: bad item 0" in p.stderr
    assert "Traceback" not in p.stderr


def test_execute_collect_mode_writes_null_for_failures(workdir: Path) -> None:
    """--on-error collect runs every item; failed ones are null and listed on stderr."""
    p = run(workdir, "execute", "jobs:bad", "--data-range", "8", "--on-error", "collect",
            "--backend", "processes", "--n-jobs", "2", "--chunksize", "3")
    assert p.returncode == 1
    assert lines(p.stdout) == [None if x % 3 == 0 else x for x in range(8)]
    for x in (0, 3, 6):
        assert f"item {x} failed after 1 attempt(s): ValueError: bad item {x}" in p.stderr
    assert "3 item(s) failed" in p.stderr


@pytest.mark.parametrize("backend", ["serial", "processes"])
def test_execute_retries_transient_failures(workdir: Path, backend: str) -> None:
    """--retries retries each item in the worker; without it the first failure stops the run."""
    p = run(workdir, "execute", "jobs:flaky", "--data-range", "6", "--backend", backend,
            "--retries", "2", "--retry-delay", "0")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == [-x for x in range(6)]
    p = run(workdir, "execute", "jobs:flaky", "--data-range", "6", "--backend", backend)
    assert p.returncode == 1
    assert "ConnectionError: transient failure" in p.stderr


def test_execute_checkpoint_of_another_key_needs_trust(workdir: Path) -> None:
    """Another user's checkpoint is refused (exit 2, naming --trust); --trust resumes it."""
    env = {"JOBS_LOG": str(workdir / "calls.log"), "JOBS_FAIL_FLAG": str(workdir / "flag")}
    args = ("execute", "jobs:counted", "--data-range", "4", "--backend", "serial",
            "--checkpoint", "run.db")
    assert run(workdir, *args, env=env).returncode == 0
    other = {**env, "AMORSIZE_CONFIG_DIR": str(workdir / "other-user")}
    refused = run(workdir, *args, env=other)
    assert_usage_error(refused, "trust")
    (workdir / "calls.log").write_text("")
    trusted = run(workdir, *args, "--trust", env=other)
    assert trusted.returncode == 0, trusted.stderr
    assert lines(trusted.stdout) == [x + 100 for x in range(4)]
    assert (workdir / "calls.log").read_text() == ""  # every result came from the file
    assert_usage_error(run(workdir, *args[:6], "--trust", env=env), "--checkpoint")


def test_execute_limits_for_service_jobs(workdir: Path) -> None:
    """--timeout fails the hanging item alone; --rate-limit and recycling keep every result."""
    p = run(workdir, "execute", "jobs:hang_on_two", "--data-range", "4", "--backend", "threads",
            "--timeout", "0.2", "--on-error", "collect")
    assert p.returncode == 1
    assert lines(p.stdout) == [0, 1, None, 3]
    assert "item 2 failed after 1 attempt(s): ItemTimeoutError" in p.stderr
    p = run(workdir, "execute", "jobs:square", "--data-range", "9", "--backend", "processes",
            "--n-jobs", "2", "--chunksize", "1", "--max-tasks-per-worker", "2",
            "--rate-limit", "100000")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == [x * x for x in range(9)]


@pytest.mark.parametrize(
    ("option", "value"),
    [("--timeout", "0"), ("--rate-limit", "-1"), ("--max-tasks-per-worker", "0")],
)
def test_execute_bad_limits_are_refused(workdir: Path, option: str, value: str) -> None:
    """A bad limit is exit 2 and one line naming the option, before anything runs."""
    p = run(workdir, "execute", "jobs:square", "--data-range", "3", option, value)
    assert p.returncode == 2
    assert option in p.stderr and "Traceback" not in p.stderr


def test_execute_retry_exhaustion_is_reported(workdir: Path) -> None:
    """An item that keeps failing reports its attempts (--retries 2: 3 attempts)."""
    p = run(workdir, "execute", "jobs:bad", "--data-range", "2", "--backend", "serial",
            "--retries", "2", "--retry-delay", "0", "--on-error", "collect")
    assert p.returncode == 1
    assert lines(p.stdout) == [None, 1]
    assert "item 0 failed after 3 attempt(s)" in p.stderr


def test_execute_checkpoint_resumes(workdir: Path) -> None:
    """--checkpoint: a second run computes only what the first one did not finish."""
    env = {"JOBS_LOG": str(workdir / "calls.log"), "JOBS_FAIL_FLAG": str(workdir / "flag")}
    (workdir / "flag").touch()
    args = ("execute", "jobs:counted", "--data-range", "8", "--backend", "serial",
            "--checkpoint", "run.db", "--on-error", "collect")
    first = run(workdir, *args, env=env)
    assert first.returncode == 1
    assert lines(first.stdout) == [None if x == 5 else x + 100 for x in range(8)]
    (workdir / "flag").unlink()
    (workdir / "calls.log").write_text("")
    second = run(workdir, *args, env=env)
    assert second.returncode == 0, second.stderr
    assert lines(second.stdout) == [x + 100 for x in range(8)]
    assert (workdir / "calls.log").read_text().split() == ["5"]
    other = run(workdir, *args[:3], "9", *args[4:], env=env)
    assert_usage_error(other, "does not match this run")


def test_execute_dead_letter_records_failures(workdir: Path) -> None:
    """--dead-letter records each failed item in SQLite and the run goes on."""
    pytest.importorskip("amorsize.dlq")
    from amorsize.dlq import DeadLetterQueue

    p = run(workdir, "execute", "jobs:bad", "--data-range", "7", "--backend", "serial",
            "--dead-letter", "failed.db")
    assert p.returncode == 1
    assert lines(p.stdout) == [None if x % 3 == 0 else x for x in range(7)]
    assert "failures recorded in failed.db" in p.stderr
    entries = DeadLetterQueue(workdir / "failed.db").entries()
    assert sorted((e.index, e.item, e.exc_type) for e in entries) == [
        (0, 0, "ValueError"), (3, 3, "ValueError"), (6, 6, "ValueError")
    ]


def test_dead_letter_command_lists_exports_replays_clears(workdir: Path) -> None:
    """dead-letter PATH lists the entries; --json exports them; --replay and --clear empty it."""
    p = run(workdir, "execute", "jobs:bad", "--data-range", "7", "--backend", "serial",
            "--dead-letter", "failed.db")
    assert p.returncode == 1
    listing = run(workdir, "dead-letter", "failed.db")
    assert listing.returncode == 0, listing.stderr
    assert "item 3 (3): ValueError: bad item 3" in listing.stdout
    assert listing.stdout.rstrip().endswith("3 entries in failed.db")
    exported = lines(run(workdir, "dead-letter", "failed.db", "--json").stdout)
    assert [(e["index"], e["item"], e["exc_type"]) for e in exported] == [  # type: ignore[index]
        (0, 0, "ValueError"), (3, 3, "ValueError"), (6, 6, "ValueError")
    ]
    again = run(workdir, "dead-letter", "failed.db", "--replay", "jobs:bad")
    assert again.returncode == 1
    assert "3 failed again" in again.stdout
    fixed = run(workdir, "dead-letter", "failed.db", "--replay", "jobs:square")
    assert fixed.returncode == 0, fixed.stderr
    assert "item 6: now succeeds -> 36" in fixed.stdout
    assert "0 left" in fixed.stdout
    run(workdir, "execute", "jobs:bad", "--data-range", "4", "--backend", "serial",
        "--dead-letter", "failed.db")
    cleared = run(workdir, "dead-letter", "failed.db", "--clear")
    assert (cleared.returncode, cleared.stdout.strip()) == (0, "removed 2 entries from failed.db")


def test_rerun_with_checkpoint_updates_dead_letters_and_replay_says_why(workdir: Path) -> None:
    """issue 12 item 12: the same command run twice records each failure once; replay says why."""
    args = ("execute", "jobs:bad", "--data-range", "7", "--backend", "serial",
            "--checkpoint", "run.db", "--dead-letter", "failed.db")
    for _ in range(2):
        assert run(workdir, *args).returncode == 1
    listing = run(workdir, "dead-letter", "failed.db")
    assert listing.stdout.rstrip().endswith("3 entries in failed.db"), listing.stdout
    assert listing.stdout.count("[2 attempt(s)") == 3
    again = run(workdir, "dead-letter", "failed.db", "--replay", "jobs:bad")
    assert again.returncode == 1
    assert "item 3: fails again: ValueError: bad item 3" in again.stdout


def test_crafted_dead_letter_file_runs_code_only_with_trust(workdir: Path) -> None:
    """issue 12 item 16: listing or exporting a crafted file runs nothing; replay needs --trust."""
    import pickle
    import sqlite3

    run(workdir, "execute", "jobs:bad", "--data-range", "1", "--dead-letter", "failed.db")
    marker = workdir / "owned"
    evil = pickle.dumps(_RunsCode(marker))
    with sqlite3.connect(workdir / "failed.db") as conn:
        conn.execute("UPDATE dead_letters SET item = ?, item_mac = NULL", (evil,))
    conn.close()
    for extra in ((), ("--json",)):
        p = run(workdir, "dead-letter", "failed.db", *extra)
        assert p.returncode == 0, p.stderr
    assert "item 0 (0): ValueError: bad item 0" in run(workdir, "dead-letter", "failed.db").stdout
    assert not marker.exists()
    refused = run(workdir, "dead-letter", "failed.db", "--replay", "jobs:echo")
    assert_usage_error(refused, "entry #1", "carries no signature", "--trust")
    assert not marker.exists()
    assert_usage_error(run(workdir, "dead-letter", "failed.db", "--trust"), "--trust")
    trusted = run(workdir, "dead-letter", "failed.db", "--replay", "jobs:echo", "--trust")
    assert trusted.returncode == 0, trusted.stderr
    assert marker.exists()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 64 KiB tmpfs that is already full (root only: it mounts)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    where = tmp_path / "full"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        with open(where / "filler", "wb") as f, contextlib.suppress(OSError):
            f.write(bytes(1 << 20))
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("option", ["--checkpoint", "--dead-letter"])
def test_store_on_a_full_disk_is_one_line_and_exit_2(
    workdir: Path, full_disk: Path, option: str
) -> None:
    """issue 12 item 14: a checkpoint or dead-letter file on a full disk: one line, exit 2."""
    target = full_disk / "store.db"
    p = run(workdir, "execute", "jobs:square", "--data-range", "3", option, str(target))
    assert_usage_error(p, str(target), "disk is full")


def test_replay_with_an_unusable_signing_key_is_one_line(workdir: Path) -> None:
    """A signing key that cannot be read or created is one line and exit 2, not a traceback."""
    run(workdir, "execute", "jobs:bad", "--data-range", "1", "--dead-letter", "failed.db")
    (workdir / "not-a-dir").write_text("x")
    env = {"AMORSIZE_CONFIG_DIR": str(workdir / "not-a-dir")}
    p = run(workdir, "dead-letter", "failed.db", "--replay", "jobs:echo", env=env)
    assert_usage_error(p, "signing key", "AMORSIZE_CONFIG_DIR")


class _RunsCode:
    """Pickles to a call that creates ``marker``: what a crafted file would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_execute_circuit_breaker_stops_dispatch(workdir: Path) -> None:
    """--circuit-breaker N stops dispatching after N consecutive failures."""
    (workdir / "all_bad.jsonl").write_text("0\n" * 40)
    p = run(workdir, "execute", "jobs:bad", "--data-file", "all_bad.jsonl", "--backend",
            "serial", "--chunksize", "1", "--circuit-breaker", "3", "--on-error", "collect")
    assert p.returncode == 1
    assert lines(p.stdout) == [None] * 40
    assert "3 item(s) failed, 37 not attempted" in p.stderr
    assert "37 item(s) not attempted: CircuitOpenError" in p.stderr


def test_execute_on_a_dask_scheduler(workdir: Path) -> None:
    """--scheduler plans for and runs on that cluster; its workers get MODULE's code by value."""
    distributed = pytest.importorskip("distributed", reason="dask is not installed")
    import logging

    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster:
        # The worker process cannot import jobs.py: it was started outside workdir.
        p = run(workdir, "execute", "jobs:square", "--data-range", "30", "--scheduler",
                cluster.scheduler_address, "--verbose")
        planned = run(workdir, "optimize", "jobs:square", "--data-range", "30000", "--json",
                      "--scheduler", cluster.scheduler_address)
        by_path = run(workdir, "execute", "./jobs.py:square", "--data-range", "5", "--scheduler",
                      cluster.scheduler_address)
    assert (by_path.returncode, lines(by_path.stdout)) == (0, [0, 1, 4, 9, 16]), by_path.stderr
    assert planned.returncode == 0, planned.stderr
    assert "dask" in {a["backend"] for a in json.loads(planned.stdout)["alternatives"]}
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == [x * x for x in range(30)]
    assert "execute: dask" in p.stderr


# --------------------------------------------------------------------------- bad input
BAD_INPUT = [
    (("optimize",), "MODULE:FUNC"),
    (("optimize", "jobs:square"), "--data-range"),
    (("optimize", "jobs", "--data-range", "3"), "MODULE:FUNC"),
    (("optimize", "nosuchmodule:f", "--data-range", "3"), "no module named 'nosuchmodule'"),
    (("optimize", "broken:f", "--data-range", "3"), "RuntimeError: broken at import"),
    (("optimize", "jobs:nothere", "--data-range", "3"), "no attribute 'nothere'"),
    (("optimize", "jobs:NOT_CALLABLE", "--data-range", "3"), "not callable"),
    (("optimize", "missing.py:f", "--data-range", "3"), "no such file"),
    (("optimize", "jobs:square", "--data-range", "-4"), "--data-range"),
    (("optimize", "jobs:square", "--data-range", "ten"), "--data-range"),
    (("optimize", "jobs:square", "--data-range", "0:9:0"), "STEP"),
    (("optimize", "jobs:square", "--data-range", "3", "--data-file", "x"), "not allowed"),
    (("optimize", "jobs:square", "--data-file", "absent.jsonl"), "cannot read data file"),
    (("optimize", "jobs:square", "--data-file", "."), "directory"),
    (("optimize", "jobs:square", "--data-file", "malformed.jsonl"), "line 2: not a JSON value"),
    (("optimize", "jobs:square", "--data-file", "binary.jsonl"), "not UTF-8"),
    (("execute", "jobs:square", "--data-file", "deep.jsonl"), "deep.jsonl, line 2: a JSON value nested too deeply"),
    (("execute", "jobs:square", "--data-file", "huge_int.jsonl"), "huge_int.jsonl, line 3: a JSON value Python cannot read"),
    (("optimize", "jobs:square", "--data-range", "3", "--backends", "gpu"), "--backends"),
    (("optimize", "jobs:square", "--data-range", "3", "--n-jobs", "0"), "--n-jobs"),
    (("execute", "jobs:square", "--data-range", "3", "--n-jobs", "many"), "--n-jobs"),
    (("execute", "jobs:square", "--data-range", "3", "--chunksize", "-1"), "--chunksize"),
    (("execute", "jobs:square", "--data-range", "3", "--backend", "gpu"), "--backend"),
    (("execute", "jobs:square", "--data-range", "3", "--retries", "-3"), "--retries"),
    (("execute", "jobs:square", "--data-range", "3", "--retry-delay", "-1"), "--retry-delay"),
    (("execute", "jobs:square", "--data-range", "3", "--retry-delay", "nan"), "--retry-delay"),
    (("execute", "jobs:square", "--data-range", "3", "--retry-backoff", "0.5"), "--retry-backoff"),
    (("execute", "jobs:square", "--data-range", "3", "--retry-delay", "5",
      "--retry-max-delay", "1"), "max_delay"),
    (("execute", "jobs:square", "--data-range", "3", "--backend", "serial", "--n-jobs", "4"),
     "--n-jobs"),
    (("execute", "jobs:square", "--data-range", "3", "-o", "no/such/dir/out"), "cannot write"),
    (("execute", "jobs:square", "--data-range", "3", "--backend", "threads",
      "--start-method", "spawn"), "--start-method"),
    (("execute", "jobs:square", "--data-range", "3", "--start-method", "vfork"), "--start-method"),
    (("execute", "jobs:square", "--data-range", "3", "--checkpoint", "malformed.jsonl"),
     "not a readable SQLite database"),
    (("execute", "jobs:square", "--data-range", "3", "--dead-letter", "nodir/f.db"), "nodir"),
    (("execute", "jobs:square", "--data-range", "3", "--checkpoint", "."), "directory"),
    (("execute", "jobs:square", "--data-range", "3", "--scheduler", "tcp://h:1", "--backend",
      "threads"), "--scheduler"),
    (("execute", "jobs:square", "--data-range", "3", "--bogus"), "--bogus"),
    (("dead-letter", "absent.db"), "no dead-letter file"),
    (("dead-letter", "malformed.jsonl"), "not a readable SQLite database"),
    (("dead-letter", "malformed.jsonl", "--json", "--clear"), "not allowed"),
    (("frobnicate",), "frobnicate"),
    ((), "COMMAND"),
]


# Malformed scheduler addresses are refused by dask's own parser: only with dask installed.
if importlib.util.find_spec("distributed") is not None:
    BAD_INPUT += [
        (("execute", "jobs:square", "--data-range", "3", "--scheduler", "tcp://nohost"),
         "missing port"),
        (("execute", "jobs:square", "--data-range", "3", "--scheduler", "bogus://h:1"),
         "unknown address scheme"),
    ]
else:
    BAD_INPUT += [
        (("execute", "jobs:square", "--data-range", "3", "--scheduler", "tcp://h:1"),
         "the dask backend is not available"),
    ]


@pytest.fixture
def bad_files(workdir: Path) -> Path:
    """``workdir`` plus a malformed and a non-UTF-8 data file."""
    (workdir / "malformed.jsonl").write_text('1\n{"a": \n3\n')
    (workdir / "binary.jsonl").write_bytes(b"1\n\xff\xfe\n")
    (workdir / "deep.jsonl").write_text("1\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    (workdir / "huge_int.jsonl").write_text("1\n2\n" + "7" * 5000 + "\n")
    return workdir


@pytest.mark.parametrize(("args", "needle"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(
    bad_files: Path, args: tuple[str, ...], needle: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bad input gives exit code 2 and one line on stderr naming the problem (in process)."""
    # main() imports MODULE from the current directory: keep that from leaking out.
    monkeypatch.chdir(bad_files)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("jobs", "broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    assert_usage_error(subprocess.CompletedProcess(args, code, out, err), needle)
    monkeypatch.delitem(sys.modules, "jobs", raising=False)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("execute", "nosuchmodule:f", "--data-range", "3"), "no module named"),
        (("execute", "jobs:square", "--data-file", "malformed.jsonl"), "line 2"),
        (("execute", "jobs:square", "--data-file", "deep.jsonl"), "line 2"),
        (("execute", "jobs:square", "--data-file", "huge_int.jsonl"), "line 3"),
        (("execute", "broken:f", "--data-range", "3"), "broken at import"),
        (("execute", "jobs:square", "--data-range", "3", "--n-jobs", "0"), "--n-jobs"),
    ],
)
def test_bad_input_in_a_real_process(bad_files: Path, args: tuple[str, ...], needle: str) -> None:
    """The process itself exits 2 with one line on stderr and no traceback."""
    assert_usage_error(run(bad_files, *args), needle)


# --------------------------------------------------------------------------- signals, pipes
POSIX_ONLY = pytest.mark.skipif(
    sys.platform == "win32", reason="process groups, SIGINT to a group and SIGPIPE are POSIX"
)


@POSIX_ONLY
@pytest.mark.parametrize("backend", ["serial", "processes"])
def test_ctrl_c_exits_130_without_traceback(workdir: Path, backend: str) -> None:
    """Ctrl-C (SIGINT to the whole process group) exits 130 with one line and no orphans."""
    started = workdir / "started"
    proc = subprocess.Popen(
        [sys.executable, "-m", "amorsize", "execute", "jobs:block", "--data-range", "4",
         "--backend", backend, "--n-jobs", "2" if backend == "processes" else "1",
         "--chunksize", "1"],
        cwd=workdir,
        env={**os.environ, "JOBS_STARTED": str(started)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job would be
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert started.exists(), proc.communicate(timeout=5)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "amorsize: interrupted" in err
    assert "Traceback" not in err, err
    # Nothing is left in its process group (workers stopped, not orphaned).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.005)
    else:
        left = subprocess.run(["ps", "-o", "pid,stat,pgid,args", "-g", str(proc.pid)],
                              capture_output=True, text=True, check=False).stdout
        pytest.fail(f"processes of the interrupted run are still alive:\n{left}")


@POSIX_ONLY
def test_broken_pipe_is_quiet(workdir: Path) -> None:
    """A reader that goes away (| head -1) ends the run quietly with exit code 141."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "amorsize", "execute", "jobs:square", "--data-range",
         "300000", "--backend", "serial", "--chunksize", "1000"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"0\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.wait(timeout=30)
    assert proc.returncode == 141, err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- demo, bench
def test_demo_runs_three_workloads_and_agrees_with_serial(workdir: Path) -> None:
    """demo runs the three workloads, each with a plan, a prediction and a measurement.

    Which plan each row gets depends on this machine's load at that moment, so it is not
    asserted here: planning is tested with injected profiles in test_optimizer.py.
    """
    import re

    p = run(workdir, "demo", "--no-baseline")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    sections = out.split("\n\n")
    for title in ("1. tiny items", "3. I/O-bound"):
        section = next(s for s in sections if s.startswith(title))
        assert re.search(r"plan: (?:serial|threads|processes|all ran in the sample)", section), section
    assert len(re.findall(r"predicted [\d.]+ m?s, measured [\d.]+ m?s", out)) == 3
    assert "RESULTS DIFFER" not in out


def test_demo_compares_medians_of_interleaved_rounds_and_serial_rows_tie(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each row compares medians of interleaved rounds; a serial plan says it ties serial."""
    import io

    from amorsize import demo

    small = [
        demo.Workload("tiny items (x * x)", demo.tiny_item, range(3000), "serial"),
        demo.Workload("I/O-bound (~10 ms waits)", abs, range(-40, 0), "anything"),
    ]
    monkeypatch.setattr(demo, "workloads", lambda: small)
    buf = io.StringIO()
    rows = demo.run_demo(out=buf)
    text = buf.getvalue()
    sections = text.split("\n\n")
    # Rows this short get the short rows' rounds (one preemption is a large share of them).
    assert [r.rounds for r in rows] == [demo._SHORT_ROUNDS] * 2
    for number, row in enumerate(rows, 1):
        assert row.correct and row.serial is not None
        section = next(s for s in sections if s.startswith(f"{number}. "))
        assert f"medians of {demo._SHORT_ROUNDS} interleaved rounds" in section
        if row.plan == "serial":
            assert row.versus_serial == "ties"
            assert "ties serial (the plan is serial" in section and "speedup" not in section
        else:
            assert "speedup" in section
    table = text[text.index("workload "):]
    assert "'ties': the plan is serial" in table


@pytest.mark.parametrize(
    ("plan", "serial", "measured", "shown"),
    [("serial", 1.0, 2.0, "ties"), ("serial", None, 2.0, "ties"),
     ("processes x2, chunks of 4", 2.0, 1.0, "2.0x"),
     ("threads x8, chunks of 1", 1.0, 2.0, "0.50x"), ("threads x8, chunks of 1", None, 1.0, ""),
     ("all ran in the sample", 2.0, 0.04, "50.0x")],
)  # fmt: skip
def test_demo_row_versus_serial(
    plan: str, serial: float | None, measured: float, shown: str
) -> None:
    """A serial plan ties serial whatever the timings; other plans show the speedup."""
    from amorsize.demo import DemoResult

    row = DemoResult("w", plan, "why", None, measured, serial, True, 3)
    assert row.versus_serial == shown


def test_demo_names_a_run_that_all_ran_in_the_sample() -> None:
    """Waiting items that all ran while sampling (started together on threads) are not
    called serial: the row shows its speedup over the serial loop."""
    from amorsize import demo, execute

    _, report = execute(abs, range(-20, 0), backend="serial", return_plan=True)
    assert demo._plan_name(report) == "serial"
    report.reused = report.items
    assert demo._plan_name(report) == demo.ALL_SAMPLED


def test_bench_json_lists_installed_peers(workdir: Path) -> None:
    """bench times amorsize beside every installed peer, each row with ns/call."""
    p = run(workdir, "bench", "--seconds", "0.02", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    names = [r["contender"] for r in report["rows"]]
    assert names[:3] == ["bare call", "hand-written try/except", "amorsize with_retry"]
    for peer in ("tenacity", "backoff", "stamina", "opnieuw"):
        try:
            metadata.version(peer)
        except metadata.PackageNotFoundError:
            assert any(peer in note for note in report["notes"])
        else:
            assert peer in names
    assert all(r["ns_per_call"] > 0 for r in report["rows"])
    ours = next(r for r in report["rows"] if r["contender"] == "amorsize with_retry")
    assert ours["x_amorsize"] == pytest.approx(1.0)


def test_bench_table() -> None:
    """bench prints a readable table with one row per contender (in process)."""
    import io

    from amorsize.demo import run_bench

    buf = io.StringIO()
    rows = run_bench(seconds=0.005, out=buf)
    text = buf.getvalue()
    assert "ns/call" in text
    for row in rows:
        assert row["contender"] in text


class _InterruptedFinalizer:
    """Its finalizer is where Ctrl-C happened to land."""

    def __del__(self) -> None:
        raise KeyboardInterrupt


def test_ctrl_c_inside_a_finalizer_is_not_lost(capsys: pytest.CaptureFixture[str]) -> None:
    """A KeyboardInterrupt raised in a __del__ is raised again in the main flow, unprinted."""
    from amorsize.cli import _interrupts_survive_finalizers

    woken = threading.Event()
    with pytest.raises(KeyboardInterrupt), _interrupts_survive_finalizers():
        _InterruptedFinalizer()  # finalized at once: the interrupt is "ignored" there
        woken.wait(10)  # blocked, as the run waits for its workers, until signalled again
    assert "Exception ignored" not in capsys.readouterr().err
