"""What the decision itself costs, sampling excluded (targets: <= 10 ms first, <= 1 ms after).

* first call in a fresh interpreter, machine facts already cached on disk: read the JSON,
  read live cores/memory, run the model;
* later calls in the same process: live facts + model only.

``OptimizationResult.decision_seconds`` is the optimizer's own clock around everything but
sampling. Run: ``pytest benchmarks/bench_optimizer.py -m benchmark -s``, or
``python benchmarks/bench_optimizer.py``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

import amorsize

_FIRST_CALL = """
import json, time
t = time.perf_counter()
import amorsize
t_import = time.perf_counter() - t
def inc(x):
    return x + 1
r = amorsize.optimize(inc, list(range(10_000)), sample_size=50)
print(json.dumps({"decision": r.decision_seconds, "import": t_import,
                  "from_cache": r.system.from_cache}))
"""


def inc(x: int) -> int:
    return x + 1


def first_call(runs: int = 7) -> dict[str, float]:
    """Median decision and import seconds of the first optimize() in a fresh interpreter."""
    amorsize.get_system_info()  # make sure the cache file exists
    out = []
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-c", _FIRST_CALL], capture_output=True, text=True, check=True
        )
        out.append(json.loads(proc.stdout))
    assert all(o["from_cache"] for o in out), "the machine-facts cache was not used"
    return {
        "decision_s": statistics.median(o["decision"] for o in out),
        "import_s": statistics.median(o["import"] for o in out),
    }


def later_calls(runs: int = 200) -> dict[str, float]:
    """Median and 95th-percentile decision seconds of optimize() calls after the first."""
    data = list(range(10_000))
    amorsize.optimize(inc, data, sample_size=50)
    ds = sorted(amorsize.optimize(inc, data, sample_size=50).decision_seconds for _ in range(runs))
    return {"decision_s": statistics.median(ds), "p95_s": ds[int(0.95 * len(ds))]}


def report() -> str:
    f = first_call()
    later = later_calls()
    return (
        "| call | decision time (sampling excluded) | target |\n|---|---|---|\n"
        f"| first in a fresh process (facts cached on disk) | {f['decision_s'] * 1e3:.2f} ms"
        f" (import amorsize: {f['import_s'] * 1e3:.0f} ms) | <= 10 ms |\n"
        f"| later calls | {later['decision_s'] * 1e3:.3f} ms (p95 {later['p95_s'] * 1e3:.3f} ms)"
        " | <= 1 ms |"
    )


def test_decision_cost(benchmark: Any, capsys: Any) -> None:
    """Report decision times; pytest-benchmark times a whole cached optimize() call."""
    data = list(range(10_000))
    result = benchmark(amorsize.optimize, inc, data, sample_size=50)
    assert result.backend == "serial"
    text = report()
    with capsys.disabled():
        print("\n" + text)


if __name__ == "__main__":
    print(report())
