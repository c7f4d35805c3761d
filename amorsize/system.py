"""Machine facts the optimizer's cost model needs, measured once per machine and cached.

What is measured, and how (data flow of the one-off measurement)::

    parent                                   one echo worker (multiprocessing.Process,
    ------                                   default start method, Pipe + pickle)
    Process.start() + send(0) ──────────────▶ recv ─▶ send(b"")     start-up + first round trip
    send(0) x N ────────────────────────────▶ recv ─▶ send(b"")     per-message round trip
    send(bytes(k)) ─────────────────────────▶ recv ─▶ send(len)     parent -> worker bytes
    send(k) ────────────────────────────────▶ recv ─▶ send(bytes(k)) worker -> parent bytes
    start 2 more workers at once ───────────▶ ...                   marginal start-up per worker

The results are stored as plain JSON (never pickle) in the user cache directory, keyed by
the installed amorsize build (it changes with every version), host name, platform, Python
version, CPU count and start method. A missing, stale or corrupt file, or one holding any
implausible value (a negative or huge number, zero cores, a string), is simply measured
again. Facts that change while a program runs (available memory, BLAS pools loaded) are
read on each call, cheaply.

>>> info = get_system_info()          # doctest: +SKIP
>>> info.usable_cores, info.start_method   # doctest: +SKIP
(2.0, 'fork')

Relocate the cache with ``AMORSIZE_CACHE_DIR=/some/dir`` or :func:`set_cache_dir`; disable
it with ``AMORSIZE_NO_CACHE=1`` (the facts are then measured once per process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import queue
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from amorsize._threadpool import Pool

__all__ = [
    "SystemInfo",
    "available_cpus",
    "cache_file",
    "get_system_info",
    "set_cache_dir",
]

# Bump when the measured fields or their meaning change: older files are then re-measured.
_SCHEMA = 6
# Re-measure after this long even if nothing else changed (kernels and load change).
_MAX_AGE_S = 30 * 24 * 3600.0
# Transfer sizes for the per-byte cost: large enough that the fixed round trip is small
# beside them, small enough that the whole measurement stays well under a second.
_TRANSFER_SIZES = (256 * 1024, 2 * 1024 * 1024)
_ROUND_TRIPS = 25
# Threads started, and tasks handed out, to measure a thread pool's costs (~5 ms in all).
_THREADS_STARTED = 8
_THREAD_TASKS = 200
# Fallbacks when a measurement fails (e.g. no working multiprocessing on this platform).
# Typical Linux/fork values, measured on the 2-core CI machine by this module itself.
_FALLBACK_STARTUP_S = 0.02
_FALLBACK_ROUNDTRIP_S = 60e-6
_FALLBACK_PER_BYTE_S = 0.5e-9

_ENV_DIR = "AMORSIZE_CACHE_DIR"
_ENV_OFF = "AMORSIZE_NO_CACHE"

_cache_dir_override: Path | None = None
_lock = threading.Lock()
_static: dict[str, Any] | None = None
_static_meta: tuple[str | None, bool] = (None, False)
_blas_memo: tuple[tuple[bool, ...], tuple[dict[str, Any], ...], int] | None = None
_BLAS_MODULES = ("numpy", "scipy", "torch", "sklearn", "numexpr", "mkl")


@dataclass(frozen=True)
class SystemInfo:
    """Facts about this machine and process that the cost model uses.

    Times are seconds, sizes bytes. ``usable_cores`` is what this process may really use
    (CPU affinity and a container's CPU quota), which can be fractional under a quota.

    >>> get_system_info().usable_cores >= 1   # doctest: +SKIP
    True
    """

    logical_cores: int
    physical_cores: int
    usable_cores: float
    available_memory: int
    start_method: str
    # Start one worker process and get its first reply (fixed part + per-worker part).
    process_startup_s: float
    process_startup_per_worker_s: float
    # One small message to a process worker and back; bytes moved through a Pipe.
    process_roundtrip_s: float
    transfer_s_per_byte: float
    # Resident memory of an idle worker process (0 when unknown).
    worker_rss_bytes: int
    # Start one thread of a thread pool; the parent's time per task handed to a pool and
    # collected (the threads backend's per-task cost), with several tasks in flight.
    thread_startup_s: float
    thread_roundtrip_s: float
    blas_threads: int
    blas_pools: tuple[dict[str, Any], ...]
    cache_path: str | None
    from_cache: bool
    measured_seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The facts as plain JSON-compatible values."""
        d = dataclasses.asdict(self)
        d["blas_pools"] = [dict(p) for p in self.blas_pools]
        return d


# --------------------------------------------------------------------------- cache location
def set_cache_dir(path: str | os.PathLike[str] | None) -> None:
    """Store the machine-facts cache in ``path`` (``None`` goes back to the default).

    Takes precedence over ``AMORSIZE_CACHE_DIR``. Forgets facts already read in this process.

    >>> set_cache_dir("/tmp/amorsize-cache")   # doctest: +SKIP
    """
    global _cache_dir_override
    _cache_dir_override = None if path is None else Path(os.fspath(path))
    _reset_memo()


def _reset_memo() -> None:
    global _static, _blas_memo, _info_memo
    with _lock:
        _static = None
        _blas_memo = None
        _info_memo = None


def _default_cache_dir() -> Path:
    plat: str = sys.platform  # a plain str: every branch below is reachable somewhere
    if plat.startswith("linux"):
        # platformdirs answers exactly this on Linux; skipping its import saves ~5 ms on
        # the first call in a process.
        base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
        return Path(base) / "amorsize"
    try:
        import platformdirs
    except ImportError:
        pass
    else:
        return Path(platformdirs.user_cache_dir("amorsize", appauthor=False))
    if plat == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "amorsize" / "Cache"
    if plat == "darwin":
        return Path.home() / "Library" / "Caches" / "amorsize"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "amorsize"


def _cache_enabled() -> bool:
    return os.environ.get(_ENV_OFF, "").strip().lower() not in ("1", "true", "yes", "on")


def _cache_dir() -> Path:
    if _cache_dir_override is not None:
        return _cache_dir_override
    env = os.environ.get(_ENV_DIR)
    if env:
        return Path(env)
    return _default_cache_dir()


def _start_method() -> str:
    return multiprocessing.get_start_method(allow_none=False)


_key_memo: dict[str, Any] | None = None


def _build_id() -> str:
    """The installed amorsize build: size and mtime of this module and the compiled core.

    Every install or upgrade changes it (so a new version always re-measures), and unlike
    the distribution's version it needs no importlib.metadata, whose import alone costs
    50-80 ms: more than the whole first-call decision budget (10 ms).
    """
    import amorsize._core as core

    parts = []
    for f in (__file__, core.__file__ or ""):
        try:
            st = os.stat(f)
        except OSError:
            parts.append("?")
        else:
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "/".join(parts)


def _machine_key() -> dict[str, Any]:
    global _key_memo
    if _key_memo is None:
        try:
            uname = os.uname()
            plat = f"{uname.sysname}-{uname.release}-{uname.machine}"
        except AttributeError:  # Windows: platform.platform() is cheap enough there
            plat = platform.platform()
        _key_memo = {
            "schema": _SCHEMA,
            "build": _build_id(),
            "hostname": socket.gethostname(),
            "platform": plat,
            "python": platform.python_version(),
            "implementation": sys.implementation.name,
        }
    # These two can change while a program runs (set_start_method, CPU hotplug).
    return {**_key_memo, "cpu_count": os.cpu_count() or 1, "start_method": _start_method()}


def cache_file(_key: dict[str, Any] | None = None) -> Path | None:
    """The JSON file holding this machine's facts, or ``None`` when caching is disabled.

    >>> cache_file()   # doctest: +SKIP
    PosixPath('/home/me/.cache/amorsize/machine-3f2a9c0d1e4b5a67.json')
    """
    if not _cache_enabled():
        return None
    key = json.dumps(_key or _machine_key(), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return _cache_dir() / f"machine-{digest}.json"


# What a cached fact may be: its type and the plausible range (inclusive). Anything else —
# a huge integer, a negative or zero count, NaN, a string — means "measure again": a
# hand-edited or damaged file must never make planning fail (10**400 is valid JSON).
_PLAUSIBLE: dict[str, tuple[type, float, float]] = {
    "physical_cores": (int, 1, 1 << 16),
    "process_startup_s": (float, 1e-7, 60.0),
    "process_startup_per_worker_s": (float, 0.0, 60.0),
    "process_roundtrip_s": (float, 1e-9, 10.0),
    "transfer_s_per_byte": (float, 0.0, 1e-3),
    "worker_rss_bytes": (int, 0, 1 << 40),
    "thread_startup_s": (float, 0.0, 10.0),
    "thread_roundtrip_s": (float, 0.0, 10.0),
    "measured_seconds": (float, 0.0, 3600.0),
}


def _plausible(value: Any, typ: type, low: float, high: float) -> bool:
    """``value`` is a JSON number of the right kind within ``[low, high]``.

    Compared without converting: an int of any size compares exactly with a float (and
    NaN with nothing), so nothing here can overflow.
    """
    if isinstance(value, bool):
        return False
    if typ is int and type(value) is not int:
        return False
    if not isinstance(value, (int, float)):
        return False
    return bool(low <= value <= high)


def _read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached facts if the file exists, parses, matches ``key``, is fresh and every
    fact is plausible (see ``_PLAUSIBLE``); else None (the caller measures again)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(raw, dict) or raw.get("key") != key:
        return None
    facts = raw.get("facts")
    measured_at = raw.get("measured_at")
    now = time.time()
    if not isinstance(facts, dict) or not _plausible(measured_at, float, now - _MAX_AGE_S, now):
        return None
    out: dict[str, Any] = {}
    for name, (typ, low, high) in _PLAUSIBLE.items():
        value = facts.get(name)
        if not _plausible(value, typ, low, high):
            return None
        out[name] = typ(value)
    return out


def _write_cache(path: Path, key: dict[str, Any], facts: dict[str, Any]) -> bool:
    """Write atomically (temp file + rename) so a concurrent reader never sees half a file."""
    payload = {"key": key, "measured_at": time.time(), "facts": facts}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".machine-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- cheap live facts
def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the platform has one.

    A container's CPU quota is not applied here (``SystemInfo.usable_cores`` applies it):
    this is how many workers ``n_jobs=-1`` starts, and how a worker's BLAS pool is sized.

    >>> available_cpus() >= 1
    True
    """
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# How long a container's CPU quota, once read, stands for the live value: quotas change
# rarely (an operator's `docker update`), while reading the cgroup files costs ~0.1 ms of
# every decision, 1 % of a 10 ms serial run.
_LIVE_FACTS_S = 1.0
_quota_memo: dict[str, tuple[float, float | None]] = {}
# The last SystemInfo: (when, what it was built from, the record).
_info_memo: tuple[float, tuple[Any, ...], SystemInfo] | None = None


def _cgroup_quota_cores(root: str = "/sys/fs/cgroup") -> float | None:
    """CPU quota of this container in cores (cgroup v2, then v1), or None when unlimited;
    read again once the last reading is ``_LIVE_FACTS_S`` old."""
    now = time.monotonic()
    memo = _quota_memo.get(root)
    if memo is not None and now - memo[0] < _LIVE_FACTS_S:
        return memo[1]
    quota = _read_cgroup_quota(root)
    _quota_memo[root] = (now, quota)
    return quota


def _read_cgroup_quota(root: str) -> float | None:
    try:
        with open(f"{root}/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    for base in (f"{root}/cpu", f"{root}/cpu,cpuacct"):
        try:
            with open(f"{base}/cpu.cfs_quota_us", encoding="ascii") as f:
                q = float(f.read())
            with open(f"{base}/cpu.cfs_period_us", encoding="ascii") as f:
                p = float(f.read())
        except (OSError, ValueError):
            continue
        if q > 0 and p > 0:
            return q / p
        return None
    return None


def _usable_cores() -> float:
    cores = float(available_cpus())
    quota = _cgroup_quota_cores()
    if quota is not None:
        cores = min(cores, max(quota, 1.0))
    return max(cores, 1.0)


def _available_memory() -> int:
    """Bytes available for new allocations (MemAvailable), without importing psutil on Linux."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return 0
    return int(psutil.virtual_memory().available)


def _physical_cores() -> int:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    # /proc/cpuinfo: distinct (physical id, core id) pairs.
    try:
        pairs = set()
        phys = core = None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                elif not line.strip():
                    if core is not None:
                        pairs.add((phys, core))
                    phys = core = None
        if core is not None:
            pairs.add((phys, core))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def _blas_pools() -> tuple[tuple[dict[str, Any], ...], int]:
    """threadpoolctl's view of loaded BLAS/OpenMP pools and the largest pool size.

    Only asked when a module that loads such a pool is imported (asking costs milliseconds).
    """
    global _blas_memo
    key = tuple(m in sys.modules for m in _BLAS_MODULES)
    memo = _blas_memo
    if memo is not None and memo[0] == key:
        return memo[1], memo[2]
    pools: tuple[dict[str, Any], ...] = ()
    if any(key):
        try:
            from threadpoolctl import threadpool_info
        except ImportError:
            pass
        else:
            try:
                pools = tuple(
                    {
                        "user_api": str(p.get("user_api")),
                        "internal_api": str(p.get("internal_api")),
                        "num_threads": int(p.get("num_threads") or 1),
                    }
                    for p in threadpool_info()
                )
            except Exception:  # a broken native library must not break planning
                pools = ()
    threads = max((int(p["num_threads"]) for p in pools), default=1)
    _blas_memo = (key, pools, threads)
    return pools, threads


# --------------------------------------------------------------------------- measurement
def _echo_worker(conn: Connection) -> None:
    """Child side of the measurement: answer each message until ``None``.

    ``int k`` -> reply ``bytes(k)`` (worker-to-parent transfer);
    ``bytes`` -> reply its length (parent-to-worker transfer).
    """
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            if isinstance(msg, int):
                if msg < 0:
                    conn.send(_own_rss())
                else:
                    conn.send(bytes(msg))
            else:
                conn.send(len(msg))
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


def _own_rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return 0
    return int(psutil.Process().memory_info().rss)


def _rt(conn: Connection, msg: Any) -> float:
    t = time.perf_counter()
    conn.send(msg)
    conn.recv()
    return time.perf_counter() - t


def _start_workers(ctx: Any, n: int) -> tuple[list[Any], list[Connection], float]:
    """Start ``n`` echo workers at once; seconds until every one has answered once."""
    procs, conns = [], []
    t = time.perf_counter()
    for _ in range(n):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_echo_worker, args=(child,), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    for c in conns:
        c.send(0)
    for c in conns:
        c.recv()
    return procs, conns, time.perf_counter() - t


def _stop_workers(procs: list[Any], conns: list[Connection]) -> None:
    for c in conns:
        with contextlib.suppress(OSError):
            c.send(None)
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=1.0)
    for c in conns:
        c.close()


def _measure_processes() -> dict[str, float]:
    ctx = multiprocessing.get_context()
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        procs, conns, startup1 = _start_workers(ctx, 1)
        conn = conns[0]
        rts = sorted(_rt(conn, 0) for _ in range(_ROUND_TRIPS))
        roundtrip = statistics.median(rts[: max(3, len(rts) // 2)])
        per_byte = []
        for size in _TRANSFER_SIZES:
            payload = bytes(size)
            down = min(_rt(conn, payload) for _ in range(2))
            up = min(_rt(conn, size) for _ in range(2))
            per_byte.append(max(down - roundtrip, 0.0) / size)
            per_byte.append(max(up - roundtrip, 0.0) / size)
        conn.send(-1)
        rss = int(conn.recv())
        _stop_workers(procs, conns)
        procs, conns = [], []
        # Once more alone (the lower of two is less disturbed by a busy machine), then two
        # workers started together: the extra time over one is the per-worker part.
        procs, conns, again = _start_workers(ctx, 1)
        startup1 = min(startup1, again)
        _stop_workers(procs, conns)
        procs, conns = [], []
        procs, conns, startup2 = _start_workers(ctx, 2)
        _stop_workers(procs, conns)
        procs, conns = [], []
    finally:
        if procs:
            _stop_workers(procs, conns)
    per_worker = min(max(startup2 - startup1, 0.1 * startup1), startup1)
    return {
        "process_startup_s": startup1,
        "process_startup_per_worker_s": per_worker,
        "process_roundtrip_s": roundtrip,
        "transfer_s_per_byte": statistics.median(per_byte),
        "worker_rss_bytes": float(rss),
    }


def _pool_start_s(n: int) -> float:
    """Seconds per thread to start a fresh pool of ``n`` and have every thread run its
    first task, as the threads backend does: each task submitted while no thread is idle
    starts one, and the new thread then takes the GIL to reach its task."""
    gate, running = threading.Event(), threading.Event()
    lock = threading.Lock()
    started = [0]

    def first_task() -> None:
        with lock:
            started[0] += 1
            if started[0] == n:
                running.set()
        gate.wait()

    pool = Pool(n)
    try:
        t = time.perf_counter()
        for _ in range(n):
            pool.submit(first_task)
        running.wait()
        spent = time.perf_counter() - t
    finally:
        gate.set()
        pool.shutdown()
    return spent / n


def _pool_task_s(pool: Pool, n_tasks: int, in_flight: int) -> float:
    """Parent seconds per task handed to ``pool`` and collected, several in flight, in
    the threads backend's loop (``submit``, completions through one queue, ``result``)."""
    finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
    pending = sent = done = 0
    t = time.perf_counter()
    while done < n_tasks:
        while pending < in_flight and sent < n_tasks:
            pool.submit(int, sent).add_done_callback(finished.put)
            pending += 1
            sent += 1
        finished.get().result()
        pending -= 1
        done += 1
    return (time.perf_counter() - t) / n_tasks


def _measure_threads() -> dict[str, float]:
    """Thread start-up and the per-task cost of a thread pool.

    A busy machine adds to them in bursts (one try in three took milliseconds per thread
    beside other test runs): start-up is the median of five pools, the task cost the lower
    of two runs.
    """
    startup = statistics.median(_pool_start_s(_THREADS_STARTED) for _ in range(5))
    pool = Pool(4)
    try:
        _pool_task_s(pool, 8, 8)  # start its threads
        task = min(_pool_task_s(pool, _THREAD_TASKS, 8) for _ in range(2))
    finally:
        pool.shutdown()
    return {"thread_startup_s": startup, "thread_roundtrip_s": task}


def _measure() -> dict[str, Any]:
    t0 = time.perf_counter()
    facts: dict[str, Any] = {"physical_cores": _physical_cores()}
    try:
        facts.update(_measure_processes())
    except Exception:  # no working multiprocessing here: plan with typical values
        facts.update(
            process_startup_s=_FALLBACK_STARTUP_S,
            process_startup_per_worker_s=_FALLBACK_STARTUP_S,
            process_roundtrip_s=_FALLBACK_ROUNDTRIP_S,
            transfer_s_per_byte=_FALLBACK_PER_BYTE_S,
            worker_rss_bytes=0.0,
        )
    facts["worker_rss_bytes"] = int(facts["worker_rss_bytes"])
    facts.update(_measure_threads())
    facts["measured_seconds"] = time.perf_counter() - t0
    return facts


def _load_static(refresh: bool) -> tuple[dict[str, Any], str | None, bool]:
    key = _machine_key()
    path = cache_file(key)
    if path is not None and not refresh:
        facts = _read_cache(path, key)
        if facts is not None:
            return facts, str(path), True
    facts = _measure()
    if path is not None and _write_cache(path, key, facts):
        return facts, str(path), False
    return facts, None, False


def get_system_info(*, refresh: bool = False) -> SystemInfo:
    """This machine's facts: cached measurements plus live cores, memory and BLAS pools.

    The first call ever on a machine measures (well under a second); later calls read the
    JSON cache once per process. ``refresh=True`` measures again and rewrites the cache.

    >>> info = get_system_info()                      # doctest: +SKIP
    >>> info.process_startup_s < 1.0                  # doctest: +SKIP
    True
    """
    global _static, _static_meta
    with _lock:
        if _static is None or refresh:
            facts, path, cached = _load_static(refresh)
            _static = facts
            _static_meta = (path, cached)
        static = _static
        path, cached = _static_meta
        pools, blas_threads = _blas_pools()
    global _info_memo
    # Within _LIVE_FACTS_S the live facts stand (reading them and building the record cost
    # ~50 us warm, ~0.2 ms with cold caches: 1-2 % of a 10 ms serial run, every call).
    key = (static, pools, blas_threads, _start_method())
    now = time.monotonic()
    memo = _info_memo
    if memo is not None and now - memo[0] < _LIVE_FACTS_S and memo[1] == key:
        return memo[2]
    logical = os.cpu_count() or 1
    info = SystemInfo(
        logical_cores=logical,
        physical_cores=min(int(static["physical_cores"]), logical),
        usable_cores=_usable_cores(),
        available_memory=_available_memory(),
        start_method=_start_method(),
        process_startup_s=float(static["process_startup_s"]),
        process_startup_per_worker_s=float(static["process_startup_per_worker_s"]),
        process_roundtrip_s=float(static["process_roundtrip_s"]),
        transfer_s_per_byte=float(static["transfer_s_per_byte"]),
        worker_rss_bytes=int(static["worker_rss_bytes"]),
        thread_startup_s=float(static["thread_startup_s"]),
        thread_roundtrip_s=float(static["thread_roundtrip_s"]),
        blas_threads=blas_threads,
        blas_pools=pools,
        cache_path=path,
        from_cache=cached,
        measured_seconds=float(static["measured_seconds"]),
    )
    _info_memo = (now, key, info)
    return info
