"""Dead-letter queue: bad records are set aside, the batch finishes, fix and replay later.

Run it with ``python examples/reliability_dead_letter.py`` (about 1 second).

1. ``execute(..., dead_letter=path)`` on worker processes: records that fail for good (after
   retries) are stored with the worker's traceback, and the run goes on.
2. The queue is listed and exported as JSON lines.
3. After a fix, ``replay`` runs the entries again and removes those that now succeed.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from amorsize import DeadLetterQueue, ItemFailure, RetryPolicy, execute

RECORDS = ["12", "7", "n/a", "40", "", "3.5", "18"]


def parse(record: str) -> int:
    """The first version: only plain integers."""
    return int(record)


def parse_fixed(record: str) -> int:
    """The fix: decimals are rounded, missing values count as 0 ("n/a" is still bad)."""
    return round(float(record)) if record else 0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dlq = DeadLetterQueue(Path(tmp) / "failed.db")

        print("1. the batch runs to the end")
        out = execute(
            parse,
            RECORDS,
            dead_letter=dlq,
            retry=RetryPolicy(max_retries=1, initial_delay=0.0),
            backend="processes",
            n_jobs=2,
        )
        print("  results:", [v if not isinstance(v, ItemFailure) else "FAILED" for v in out])

        print(f"2. {len(dlq)} entries in the queue")
        for e in dlq:
            print(f"  #{e.index} {e.item!r}: {e.exc_type}: {e.message} ({e.attempts} attempts)")
        buf = io.StringIO()
        dlq.export_jsonl(buf)
        first = json.loads(buf.getvalue().splitlines()[0])
        print("  exported, first line keys:", ", ".join(first))
        print("  worker traceback kept:", first["traceback"].strip().splitlines()[-1])

        print("3. replay with the fix")
        report = dlq.replay(parse_fixed, execute=execute, backend="serial")
        print("  now succeed:", [(e.item, value) for e, value in report.succeeded])
        print("  still failing:", [e.item for e in report.failed], f"(queue: {len(dlq)})")


if __name__ == "__main__":
    main()
