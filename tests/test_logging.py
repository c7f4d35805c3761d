"""Structured logging (issue 16 item 3): one ``amorsize`` logger hierarchy, facts as record
attributes, nothing on the success path."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import pytest

from amorsize import (
    CircuitBreaker,
    CircuitBreakerPolicy,
    RetryPolicy,
    _core,
    _log,
    execute,
    set_testing,
    with_retry,
)
from amorsize.backends import get_backend


class Flaky:
    """Raises ConnectionError for its first ``failures`` calls, then returns ``x``."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def __call__(self, x: int = 1) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("transient")
        return x


def fail_on_three(x: int) -> int:
    if x % 10 == 3:
        raise ValueError(f"bad {x}")
    return x


def exit_on_two(x: int) -> int:
    if x == 2:
        os._exit(5)
    return x


def records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


def test_root_logger_has_a_null_handler() -> None:
    """Library etiquette: amorsize prints nothing unless the application sets logging up."""
    root = logging.getLogger("amorsize")
    assert any(type(h) is logging.NullHandler for h in root.handlers)
    assert _log.retry_logger.parent is root and _log.processes_logger.parent is root


def test_retries_and_giving_up_carry_their_fields(caplog: pytest.LogCaptureFixture) -> None:
    """Each retry: DEBUG with function, attempt, delay; the call that gives up: INFO."""
    flaky = with_retry(Flaky(10), max_retries=2, initial_delay=0.5, jitter=False)
    name = _core.callable_name(flaky.__wrapped__)
    debug = caplog.at_level(logging.DEBUG, logger="amorsize")
    with set_testing(True), debug, pytest.raises(Exception, match="gave up"):
        flaky()
    got = [
        (r.levelno, r.function, r.attempt, r.delay, r.error_type)  # type: ignore[attr-defined]
        for r in records(caplog, "amorsize.retry")
    ]
    assert got == [
        (logging.DEBUG, name, 1, 0.5, "ConnectionError"),
        (logging.DEBUG, name, 2, 1.0, "ConnectionError"),
        (logging.INFO, name, 3, None, "ConnectionError"),
    ]


def test_breaker_transitions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Open (WARNING, with the reason), half-open and closed (INFO), each with both states."""
    now = [0.0]
    policy = CircuitBreakerPolicy(failure_threshold=1, success_threshold=1, timeout=5.0)
    breaker = CircuitBreaker(policy, name="db", clock=lambda: now[0])
    guarded = breaker(Flaky(1))
    with caplog.at_level(logging.INFO, logger="amorsize"):
        with pytest.raises(ConnectionError):
            guarded()
        now[0] = 5.0
        guarded()
    got = [
        (r.levelno, r.breaker, r.previous_state, r.state)  # type: ignore[attr-defined]
        for r in records(caplog, "amorsize.circuit")
    ]
    assert got == [
        (logging.WARNING, "db", "closed", "open"),
        (logging.INFO, "db", "open", "half-open"),
        (logging.INFO, "db", "half-open", "closed"),
    ]
    assert "ConnectionError" in records(caplog, "amorsize.circuit")[0].reason  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", ["serial", "threads"])
def test_failed_items_name_run_and_index(caplog: pytest.LogCaptureFixture, backend: str) -> None:
    """An item that failed for good: INFO with the run id, its index and its attempts."""
    with caplog.at_level(logging.INFO, logger="amorsize"):
        execute(fail_on_three, range(25), backend=backend, chunksize=5, on_error="collect")
    recs = records(caplog, "amorsize.executor")
    assert [r.item_index for r in recs] == [3, 13, 23]  # type: ignore[attr-defined]
    assert {r.attempt for r in recs} == {1}  # type: ignore[attr-defined]
    assert {r.function for r in recs} == {f"{__name__}.fail_on_three"}  # type: ignore[attr-defined]
    run_ids = {r.run_id for r in recs}  # type: ignore[attr-defined]
    assert len(run_ids) == 1 and None not in run_ids
    assert _log.RUN_ID.get() is None  # the run's id does not outlive it


def test_a_worker_crash_names_its_run(caplog: pytest.LogCaptureFixture) -> None:
    """A worker that dies: WARNING on amorsize.processes with the run id, pid, exit code."""
    backend = get_backend("processes")
    with caplog.at_level(logging.INFO, logger="amorsize"):
        out = execute(exit_on_two, range(4), backend=backend, n_jobs=1, chunksize=1,
                      on_error="collect")  # fmt: skip
    crashes = records(caplog, "amorsize.processes")
    (failed,) = records(caplog, "amorsize.executor")
    assert [x for x in out if isinstance(x, int)] == [0, 1, 3]
    assert len(crashes) == backend.crash_retries + 1  # type: ignore[attr-defined]
    for r in crashes:
        assert (r.levelno, r.exitcode, r.item_index, r.items) == (  # type: ignore[attr-defined]
            logging.WARNING, 5, 2, 1,
        )  # fmt: skip
        assert isinstance(r.pid, int) and r.run_id == failed.run_id  # type: ignore[attr-defined]


def test_worker_recycled_hook() -> None:
    """log_worker_recycled (wired by the worker-recycling feature): INFO with its fields."""
    logger = _log.processes_logger
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        _log.log_worker_recycled(1234, "max_tasks_per_worker=100 reached", 100)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    (r,) = seen
    assert (r.levelno, r.pid, r.reason, r.tasks_done, r.run_id) == (  # type: ignore[attr-defined]
        logging.INFO, 1234, "max_tasks_per_worker=100 reached", 100, None,
    )  # fmt: skip


def test_nothing_is_logged_on_the_success_path(caplog: pytest.LogCaptureFixture) -> None:
    """Runs, retried calls and a closed breaker that all succeed log nothing, even at DEBUG."""
    breaker = CircuitBreaker(name="quiet")
    guarded = breaker(with_retry(abs, max_retries=2))
    with caplog.at_level(logging.DEBUG, logger="amorsize"):
        assert [guarded(-i) for i in range(50)] == list(range(50))
        execute(abs, range(50), backend="threads", n_jobs=2, retry=RetryPolicy(max_retries=2))
        execute(abs, range(50), backend="serial", circuit_breaker=breaker)
    assert [r for r in caplog.records if r.name.startswith("amorsize")] == []


def test_a_forked_child_names_its_runs_with_its_own_pid(
    in_forked_child: Callable[[Callable[[], int]], int],
) -> None:
    """Run ids start with the process id in hex, a forked child's own (read once, at fork)."""
    from amorsize._log import new_run_id

    assert new_run_id().split("-")[0] == f"{os.getpid():x}"
    assert in_forked_child(lambda: int(new_run_id().split("-")[0] != f"{os.getpid():x}")) == 0
