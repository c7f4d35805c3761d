"""The optimizer's workload suite, shared by the optimize, execute and dask benchmarks.

Each workload is a module-level function (so that every process start method can import it
in a worker) and a data builder. Sizes aim at 0.3-1.5 s of serial work on the 2-core CI
machine; ``scale`` shrinks or grows the item count for quicker or steadier runs.

>>> from workloads import WORKLOADS
>>> w = WORKLOADS["small_10us"]
>>> data = w.make_data(0.001)
>>> [w.func(x) for x in data[:2]] == [w.func(data[0]), w.func(data[1])]
True
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ISSUE14", "WORKLOADS", "Workload"]


def spin(n: int) -> int:
    """Pure-Python CPU work: about 45 ns per unit of ``n`` on the CI machine."""
    s = 0
    for i in range(n):
        s += i * i
    return s


def tiny(x: int) -> int:
    """~1 us of CPU work."""
    return spin(20) + x


def small(x: int) -> int:
    """~10 us of CPU work."""
    return spin(220) + x


def medium(x: int) -> int:
    """~1 ms of CPU work."""
    return spin(22_000) + x


def slow(x: int) -> int:
    """~50 ms of CPU work."""
    return spin(1_100_000) + x


def skewed(n: int) -> int:
    """CPU work proportional to ``n``: the data carries a heavy-tailed cost per item."""
    return spin(n)


def big_output(x: int) -> bytes:
    """~0.4 ms of CPU work returning a 1 MB result."""
    spin(9_000)
    return bytes([x % 256]) * (1 << 20)


def big_input(blob: bytes) -> int:
    """~0.15 ms of pure-Python work on a 200 KB input (it holds the GIL throughout:
    zlib.crc32, say, would release it and make this a threads workload instead)."""
    return sum(blob[::1024]) ^ spin(3_000)


def sleepy(x: int) -> int:
    """5 ms waiting (I/O stand-in), almost no CPU."""
    time.sleep(0.005)
    return x


def sleep10(x: int) -> int:
    """10 ms waiting (an HTTP-like call), almost no CPU."""
    time.sleep(0.01)
    return x


def square(x: int) -> int:
    """The smallest work a function can do: ~0.04 us here, under the issue's 0.1 us."""
    return x * x


def mix(x: int) -> int:
    """~0.1 us: a multiplicative hash, issue 14's tiny item (0.10 us on the CI machine)."""
    return (x * 2654435761 & 0xFFFFFFFF) % 1000003 ^ x


def pack(blob: bytes) -> tuple[int, bytes]:
    """zlib + sha256 of a 16-200 KB blob: C code that releases the GIL."""
    return len(zlib.compress(blob, 1)), hashlib.sha256(blob).digest()


async def asleep20(x: int) -> int:
    """``async def``: 20 ms awaiting (an async HTTP-like call)."""
    await asyncio.sleep(0.02)
    return x


def _ints(n: int) -> list[int]:
    return list(range(n))


def _skewed_costs(n: int) -> list[int]:
    # 95% of items ~0.1 ms, 5% ~10 ms, shuffled with a fixed seed: the sample sees the spread.
    rng = random.Random(1234)
    costs = [220_000 if rng.random() < 0.05 else 2_200 for _ in range(n)]
    rng.shuffle(costs)
    return costs


def _bimodal_costs(n: int) -> list[int]:
    # Two modes, shuffled with a fixed seed: 70% of items ~0.1 ms, 30% ~3 ms.
    rng = random.Random(4321)
    return [66_000 if rng.random() < 0.3 else 2_200 for _ in range(n)]


def _gil_blobs(n: int) -> list[bytes]:
    # 16-200 KB, half-compressible (random bytes repeated), fixed seed.
    rng = random.Random(99)
    sizes = [rng.randrange(16 << 10, 200 << 10) for _ in range(n)]
    chunk = rng.randbytes(4096)
    return [bytes([i % 256]) + (chunk * (s // 4096 + 1))[: s - 1] for i, s in enumerate(sizes)]


def _blobs(n: int) -> list[bytes]:
    base = bytes(range(256)) * 800  # 200 KB
    return [bytes([i % 256]) + base[1:] for i in range(n)]


@dataclass(frozen=True)
class Workload:
    """A named benchmark workload: ``func`` over ``make_data(scale)``."""

    name: str
    func: Callable[[Any], Any]
    n: int
    build: Callable[[int], list[Any]]
    description: str

    def make_data(self, scale: float = 1.0) -> list[Any]:
        """The input list, ``scale`` times the default item count (at least 1 item)."""
        return self.build(max(int(self.n * scale), 1))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("tiny_1us", tiny, 600_000, _ints, "600k items of ~1 us"),
        Workload("small_10us", small, 60_000, _ints, "60k items of ~10 us"),
        Workload("medium_1ms", medium, 600, _ints, "600 items of ~1 ms"),
        Workload("slow_50ms", slow, 16, _ints, "16 items of ~50 ms"),
        Workload("skewed", skewed, 1_000, _skewed_costs, "1000 items, 95% ~0.1 ms, 5% ~10 ms"),
        Workload("big_output_1mb", big_output, 400, _ints, "400 items of ~0.4 ms, 1 MB results"),
        Workload("big_input_200kb", big_input, 2_500, _blobs, "2500 items of ~0.15 ms, 200 KB inputs"),
        Workload("sleep_5ms", sleepy, 200, _ints, "200 items sleeping 5 ms"),
    )
}

# Issue 14's suite (benchmarks/bench_oracle.py): the work people bring most often.
ISSUE14: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("sleep_10ms", sleep10, 200, _ints, "200 items sleeping 10 ms"),
        Workload("tiny_0.1us", mix, 200_000, _ints, "200k items of a hash (~0.1 us)"),
        Workload("tiny_xx", square, 200_000, _ints, "200k items of x*x (~0.04 us)"),
        Workload("gil_zlib", pack, 400, _gil_blobs, "400 zlib+sha256 of 16-200 KB (GIL released)"),
        Workload("async_20ms", asleep20, 1_000, _ints, "1000 async def items awaiting 20 ms"),
        Workload("generator_1ms", medium, 400, _ints, "400 items of ~1 ms from a generator"),
        Workload("skewed", skewed, 1_000, _skewed_costs, "1000 items, 95% ~0.1 ms, 5% ~10 ms"),
        Workload("bimodal", skewed, 400, _bimodal_costs, "400 items, 70% ~0.1 ms, 30% ~3 ms"),
    )
}
