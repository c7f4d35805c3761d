"""Checkpoint/resume: a run that crashes half-way picks up where it stopped.

Run it with ``python examples/reliability_checkpoint.py`` (about 1 second).

The first run dies at item 600 (standing in for a crash, a reboot or Ctrl-C). Running the
same call again with the same ``checkpoint=`` file skips the items already done and returns
the full result list, identical to an uninterrupted run. A changed input is refused with a
clear error instead of mixing results. The file holds pickles, signed with your per-user key:
a file written by someone else is refused unless you pass ``Checkpoint(path, trust=True)``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from amorsize import Checkpoint, CheckpointMismatchError, execute

# A set, not a plain int: the checkpoint identifies `enrich` by its code and the constants it
# uses, and a module-level int that changes between runs would count as a change of code.
CRASH_AT: set[int] = {600}
RUNS: list[int] = []


def enrich(x: int) -> dict[str, int]:
    """About 0.2 ms of work per item."""
    if x in CRASH_AT:
        raise RuntimeError(f"simulated crash at item {x}")
    RUNS.append(x)
    t = time.perf_counter() + 0.0002
    while time.perf_counter() < t:
        pass
    return {"id": x, "score": x * 37 % 101}


def main() -> None:
    data = list(range(2000))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "enrich.db"
        # An explicit plan keeps the example deterministic; any plan works with checkpoints.
        plan = {"backend": "threads", "n_jobs": 2, "chunksize": 50}

        print("1. first run, crashes part-way")
        try:
            execute(enrich, data, checkpoint=path, **plan)
        except RuntimeError as exc:
            print(f"  run died: {exc}; {len(Checkpoint(path))} results were saved")

        print("2. same call again: resumes")
        CRASH_AT.clear()
        RUNS.clear()
        results = execute(enrich, data, checkpoint=path, **plan)
        print(f"  ran {len(RUNS)} items this time, returned {len(results)} results")
        assert results == [{"id": x, "score": x * 37 % 101} for x in data]
        print("  identical to an uninterrupted run: yes")

        print("3. a changed input is refused")
        try:
            execute(enrich, [*data[:10], -1, *data[11:]], checkpoint=path, **plan)
        except CheckpointMismatchError as exc:
            print(f"  {exc}")


if __name__ == "__main__":
    main()
