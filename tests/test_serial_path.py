"""The serial fast path (amorsize.executor): the same results, failures and guarantees as the
per-chunk path, without its bookkeeping."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from amorsize import ItemFailure, RunObserver, execute, execute_iter
from amorsize.backends.serial import SerialBackend
from amorsize.retry import RetryPolicy

NO_WAIT = RetryPolicy(max_retries=2, initial_delay=0.0, max_delay=0.0, jitter=False)
N = 3000  # more than a sample of tiny items (256 to 2000): some items run after sampling


@pytest.fixture(autouse=True)
def _one_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-core machine: every plan is serial and every sampled item runs here, however
    busy the real machine is (under load, tiny items can look worth a worker process)."""
    import dataclasses

    import amorsize.executor
    import amorsize.optimizer
    from amorsize.system import get_system_info

    facts = dataclasses.replace(
        get_system_info(), logical_cores=1, physical_cores=1, usable_cores=1.0
    )
    for module in (amorsize.optimizer, amorsize.executor):
        monkeypatch.setattr(module, "get_system_info", lambda: facts)


class Counted:
    """``x * x``, recording every call; raises on the items in ``bad``."""

    def __init__(self, bad: Iterable[int] = ()) -> None:
        self.bad = set(bad)
        self.calls: list[int] = []

    def __call__(self, x: int) -> int:
        self.calls.append(x)
        if x in self.bad:
            raise ValueError(f"bad {x}")
        return x * x


def _inputs(kind: str, n: int = N) -> Iterable[int]:
    if kind == "list":
        return list(range(n))
    if kind == "tuple":
        return tuple(range(n))
    if kind == "range":
        return range(n)
    return (x for x in range(n))


KINDS = ["list", "tuple", "range", "generator"]


APIS = ["execute", "execute_iter", "execute_iter_unordered"]


def _run(api: str, func: Callable[[int], Any], data: Iterable[int], **kw: Any) -> list[Any]:
    if api == "execute":
        return execute(func, data, **kw)
    if api == "execute_iter":
        return list(execute_iter(func, data, **kw))
    pairs = list(execute_iter(func, data, ordered=False, **kw))
    assert sorted(i for i, _ in pairs) == list(range(len(pairs)))
    return [value for _, value in sorted(pairs, key=lambda p: p[0])]


def _collect(api: str, func: Callable[[int], Any], data: Iterable[int], **kw: Any) -> list[Any]:
    return _run(api, func, data, on_error="collect", **kw)


@pytest.fixture
def backend_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of SerialBackend.run: the per-chunk path; the fast path never calls it."""
    calls: list[int] = []
    original = SerialBackend.run

    def run(self: SerialBackend, *args: Any, **kwargs: Any) -> Iterator[Any]:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SerialBackend, "run", run)
    return calls


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["auto", "serial"])
def test_fast_path_results_equal_a_list_comprehension(
    api: str, kind: str, backend: str, backend_runs: list[int]
) -> None:
    """Every item runs once, results in input order, and the per-chunk path is not used."""
    func = Counted()
    got = _run(api, func, _inputs(kind), backend=backend)
    assert got == [x * x for x in range(N)]
    assert sorted(func.calls) == list(range(N))  # sampled items are reused, not rerun
    assert backend_runs == []


def test_execute_returns_a_plain_list() -> None:
    """The one-block result is handed over as the caller's list, not a backend's type."""
    got = execute(abs, range(-5, 5), backend="serial")
    assert type(got) is list and got == [abs(x) for x in range(-5, 5)]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [[0], [2500], [2999], [2100, 2101, 2900]])
def test_collect_mode_puts_failures_in_their_slots_and_runs_each_item_once(
    api: str, kind: str, bad: list[int]
) -> None:
    """Failures at index k: an ItemFailure there, the map goes on after it, no item rerun."""
    func = Counted(bad)
    got = _collect(api, func, _inputs(kind))
    assert sorted(func.calls) == list(range(N))
    for i, value in enumerate(got):
        if i in bad:
            assert isinstance(value, ItemFailure)
            assert (value.index, value.item, value.attempts) == (i, i, 1)
            assert str(value.exception) == f"bad {i}"
        else:
            assert value == i * i


@pytest.mark.parametrize("kind", KINDS)
def test_execute_iter_verbose_report_counts_on_the_fast_path(
    kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """execute_iter's closing report counts the items its own loop ran."""
    got = list(execute_iter(Counted([2500]), _inputs(kind), on_error="collect", verbose=True))
    assert len(got) == N
    out = capsys.readouterr().out
    assert f"items: {N} ({N - 1} ok, 1 failed, 0 not attempted;" in out


@pytest.mark.parametrize("kind", KINDS)
def test_collect_mode_report_counts_on_the_fast_path(kind: str) -> None:
    """The report counts completed, failed and reused items as the per-chunk path does."""
    func = Counted([2500, 2700])
    got, report = execute(func, _inputs(kind), on_error="collect", return_plan=True)
    assert report.backend == "serial"
    assert (report.items, report.completed, report.failed) == (N, N - 2, 2)
    assert [f.index for f in report.failures] == [2500, 2700]
    assert report.reused > 0
    assert got[2500] is report.failures[0]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", KINDS)
def test_raise_mode_stops_at_the_first_failure(api: str, kind: str) -> None:
    """The first failure is raised as itself, and nothing after it runs."""
    func = Counted([2500, 2600])
    with pytest.raises(ValueError, match="bad 2500"):
        _run(api, func, _inputs(kind))
    assert sorted(func.calls) == list(range(2501))


@pytest.mark.parametrize("api", APIS)
def test_an_error_of_the_input_itself_propagates(api: str) -> None:
    """A generator that raises is not an item failure, even in collect mode."""

    def source() -> Iterator[int]:
        yield from range(2500)
        raise KeyError("input broke")

    with pytest.raises(KeyError, match="input broke"):
        _collect(api, Counted(), source())


def test_execute_iter_streams_an_infinite_generator_on_the_fast_path() -> None:
    """Results come out before the input ends, reading ahead only a chunk."""
    source = itertools.count()
    got = list(itertools.islice(execute_iter(abs, source, backend="serial"), 10))
    assert got == list(range(10))
    assert next(source) < 10_000  # the sample and a chunk at most were read


def test_retry_policy_applies_on_the_fast_path() -> None:
    """A transient failure is retried per item; exhausted retries report their attempts."""
    seen: set[int] = set()

    def flaky(x: int) -> int:
        if x % 1000 == 7 and x not in seen:
            seen.add(x)
            raise OSError("transient")
        if x == 2999:
            raise ValueError("always")
        return x

    got = execute(flaky, range(N), retry=NO_WAIT, on_error="collect", backend="serial")
    assert got[:2999] == list(range(2999))
    failure = got[2999]
    assert isinstance(failure, ItemFailure) and failure.attempts == 3


class _Watcher(RunObserver):
    def __init__(self) -> None:
        self.ok = 0

    def on_success(self, index: int, item: Any, result: Any) -> None:
        self.ok += 1


@pytest.mark.parametrize(
    "kwargs",
    [{"observers": [_Watcher()]}, {"progress": True}],
    ids=["observer", "progress"],
)
def test_watched_runs_keep_the_per_chunk_path(
    kwargs: dict[str, Any], backend_runs: list[int]
) -> None:
    """Observers or a progress bar need per-chunk bookkeeping: the serial backend runs it."""
    assert execute(abs, range(-N, 0), backend="serial", **kwargs) == list(range(N, 0, -1))
    assert backend_runs == [1]
    watchers = kwargs.get("observers")
    if watchers:
        assert watchers[0].ok == N


# --------------------------------------------------------------------------- sampling tiny items
def _square(x: int) -> int:
    return x * x


def test_tiny_items_are_timed_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once items prove tiny, far fewer clock reads than items; one time per item still."""
    import time as time_module

    from amorsize.sampling import sample

    real = time_module.perf_counter
    calls: list[int] = []

    def counting() -> float:
        calls.append(1)
        return real()

    monkeypatch.setattr(time_module, "perf_counter", counting)
    s = sample(_square, list(range(N)), sample_size=2000)
    assert s.results == tuple(x * x for x in range(2000))
    assert len(s.profile.item_seconds) == s.profile.n_sampled == 2000
    assert len(calls) < 500


def _jumping_clock(real: Callable[[], float], jump: float) -> Callable[[], float]:
    """perf_counter that loses ``jump`` seconds on every 4th read inside a timed block,
    as a process preempted by others would."""
    state = {"reads": 0, "offset": 0.0}

    def clock() -> float:
        import sys

        if sys._getframe(1).f_code.co_name == "_run_blocks":
            state["reads"] += 1
            if state["reads"] % 4 == 0:
                state["offset"] += jump
        return real() + state["offset"]

    return clock


def test_a_preempted_block_counts_its_cpu_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Milliseconds lost to other processes do not make 0.1 us items look like 10 us."""
    import time as time_module

    from amorsize.sampling import sample

    monkeypatch.setattr(time_module, "perf_counter", _jumping_clock(time_module.perf_counter, 0.005))
    s = sample(_square, list(range(N)), sample_size=2000)
    assert s.profile.mean_seconds < 5e-6  # unprotected: > 10 us (5 ms every other block)


def test_a_block_that_waits_keeps_its_wall_time() -> None:
    """A wait inside a block (a voluntary switch) is the work's own time, not preemption."""
    from amorsize.sampling import sample

    def sometimes_waits(x: int) -> int:
        if x == 1000:
            import time

            time.sleep(0.002)
        return x

    s = sample(sometimes_waits, list(range(N)), sample_size=2000)
    assert s.profile.mean_seconds * s.profile.n_sampled >= 0.0019


@pytest.mark.parametrize("layout", [{}, {"cpu.max": "150000 100000\n"}], ids=["none", "v2"])
def test_a_cgroup_quota_reading_stands_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: dict[str, str]
) -> None:
    """Within _LIVE_FACTS_S the quota is not read again; after it, it is."""
    import builtins

    from amorsize import system

    for rel, text in layout.items():
        (tmp_path / rel).write_text(text)
    opened: list[str] = []
    real_open = builtins.open

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(system, "_LIVE_FACTS_S", 3600.0)
    first = system._cgroup_quota_cores(str(tmp_path))
    assert opened
    opened.clear()
    assert system._cgroup_quota_cores(str(tmp_path)) == first
    assert opened == []
    monkeypatch.setattr(system, "_LIVE_FACTS_S", 0.0)
    assert system._cgroup_quota_cores(str(tmp_path)) == first
    assert opened


# --------------------------------------------------------------------------- the stream's end
@pytest.mark.parametrize("kind", KINDS)
def test_execute_iter_stream_closes_and_is_spent_after_a_failure(kind: str) -> None:
    """close() ends the run; after a raised failure the stream yields nothing more."""
    func = Counted([2500])
    it = execute_iter(func, _inputs(kind))
    assert next(it) == 0
    it.close()  # type: ignore[attr-defined]
    with pytest.raises(StopIteration):
        next(it)
    it = execute_iter(func, _inputs(kind))
    with pytest.raises(ValueError, match="bad 2500"):
        list(it)
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("on_error", ["raise", "collect"])
def test_ctrl_c_in_func_ends_the_fast_path_as_it_is(api: str, on_error: str) -> None:
    """A KeyboardInterrupt is never an item's failure: it propagates, nothing after runs."""
    calls: list[int] = []

    def func(x: int) -> int:
        calls.append(x)
        if x == 2700:
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        _run(api, func, list(range(N)), on_error=on_error)
    assert calls == list(range(2701))


# --------------------------------------------------------------------------- sampling cost
@pytest.mark.parametrize(
    ("fixed", "ran", "lo", "hi", "enough"),
    [
        (False, 240, 40e-9, 60e-9, True),  # tiny and alike: the mean is known
        (False, 112, 40e-9, 60e-9, False),  # too few blocks yet
        (False, 240, 40e-9, 120e-9, False),  # blocks disagree: keep sampling
        (False, 240, 1e-6, 3e-6, False),  # not tiny
        (False, 240, 20e-9, 90e-9, True),  # below 50 ns, clock granularity: alike
        (False, 240, float("inf"), 0.0, False),  # no block of 64 yet
        (True, 2000, 40e-9, 60e-9, False),  # a fixed sample size runs in full
    ],
)
def test_a_sample_of_clearly_tiny_items_stops_early(
    fixed: bool, ran: int, lo: float, hi: float, enough: bool
) -> None:
    """Block-timed items that are tiny and agree end the sample (per-block numbers given)."""
    from amorsize.sampling import _clearly_tiny, _Rules

    rules = _Rules(fixed=fixed, budget_s=0.05, total=200_000, cores=2.0)
    assert _clearly_tiny(rules, ran, lo, hi) is enough


def test_machine_facts_stand_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within _LIVE_FACTS_S get_system_info returns the same record; after it, a new one."""
    from amorsize import system

    monkeypatch.setattr(system, "_LIVE_FACTS_S", 3600.0)
    first = system.get_system_info()
    assert system.get_system_info() is first
    monkeypatch.setattr(system, "_LIVE_FACTS_S", 0.0)
    again = system.get_system_info()
    assert again is not first and again.usable_cores == first.usable_cores


@pytest.mark.parametrize(("horizon", "enough"), [(1_000, True), (-1, False)])
def test_a_stream_of_unknown_length_is_sampled_for_a_shorter_horizon(
    horizon: int, enough: bool
) -> None:
    """16 items of 1 ms are 3 % of 1,000 such items on 2 cores, not of 10,000."""
    from amorsize.sampling import _Rules

    rules = _Rules(fixed=False, budget_s=0.05, total=10_000, cores=2.0, horizon=horizon)
    assert rules.enough(0.016, 16, 0.016, 0) is enough


@pytest.mark.parametrize(
    ("data", "horizon"),
    [(lambda: (x for x in range(50)), 1_000), (lambda: list(range(50)), -1)],
    ids=["generator", "list"],
)
def test_sample_uses_the_horizon_only_for_unknown_lengths(
    monkeypatch: pytest.MonkeyPatch, data: Callable[[], Iterable[int]], horizon: int
) -> None:
    """A generator is sampled for UNKNOWN_SAMPLE_HORIZON items; a list for its length."""
    from amorsize import sampling

    made: list[Any] = []
    real = sampling._Rules

    def spy(*args: Any) -> Any:
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(sampling, "_Rules", spy)
    sampling.sample(abs, data())
    assert made[0].horizon == horizon
    assert made[0].total == (10_000 if horizon > 0 else 50)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_reads_keep_one_descriptor_per_process() -> None:
    """_rss opens /proc/self/statm once; a forked child and a closed descriptor reopen."""
    import os

    from amorsize import sampling

    assert sampling._rss() > 0
    statm = sampling._statm
    assert statm is not None and statm[0] == os.getpid()
    assert sampling._rss() > 0 and sampling._statm is statm
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own file, not the parent's
        ok = sampling._rss() > 0 and sampling._statm is not None
        os.write(write, b"1" if ok and sampling._statm[0] == os.getpid() else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.waitpid(pid, 0)
    os.close(statm[1])  # closed behind its back: one read fails, the next reopens
    sampling._rss()
    assert sampling._rss() > 0 and sampling._statm is not None


def test_a_failure_is_raised_even_when_func_emptied_its_input() -> None:
    """The failed item's slot cannot be read back: the failure is still what is raised."""
    data = list(range(N))

    def func(x: int) -> int:
        if x == 2900:
            data.clear()
            raise ValueError("bad 2900")
        return x

    with pytest.raises(ValueError, match="bad 2900"):
        execute(func, data)
