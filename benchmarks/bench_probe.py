"""How often the two-thread probe misreads GIL-releasing work on a first call.

``execute(pack, blobs)`` (bench_oracle.py's gil_zlib: zlib + sha256 of 400 blobs of
16-200 KB, code that releases the GIL) is called ``--calls`` times, each a first call (warm
pools closed) after ``--idle`` seconds of idling, which lets the machine's second core go
idle as it does between a program's calls. Each call's ``profile.thread_overlap`` is
read: under 0.5 is a misreading (the plan then prices threads as serialised and runs the
job serially, twice as slow). Prints the count, the overlaps and the plans.

Run: ``python benchmarks/bench_probe.py [--calls 40] [--idle 0.05]``; to compare with
another build, put its source first on the path (``PYTHONPATH=/other/clone``).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import ISSUE14

import amorsize
from amorsize import backends


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--idle", type=float, default=0.05)
    a = ap.parse_args()
    w = ISSUE14["gil_zlib"]
    data = w.make_data()
    overlaps: list[float] = []
    plans: collections.Counter[str] = collections.Counter()
    seconds: list[float] = []
    for _ in range(a.calls):
        time.sleep(a.idle)
        for be in list(backends._SHARED.values()):
            be.close()
        t = time.perf_counter()
        _, plan = amorsize.execute(w.func, data, return_plan=True)
        seconds.append(time.perf_counter() - t)
        overlaps.append(plan.optimization.profile.thread_overlap)
        plans[f"{plan.backend} x{plan.n_jobs}"] += 1
    misread = sum(1 for o in overlaps if not o >= 0.5)
    print(f"amorsize from {Path(amorsize.__file__).parent}")
    print(f"misread (overlap < 0.5): {misread} of {a.calls} first calls")
    print("overlaps:", " ".join(f"{o:.2f}" for o in overlaps))
    print("plans:", dict(plans), f"median {statistics.median(seconds) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
