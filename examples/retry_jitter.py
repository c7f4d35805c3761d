"""Demo 5: jitter keeps many clients from retrying in lockstep (the thundering herd).

Run it with ``python examples/retry_jitter.py`` (well under a second).

Ten clients fail at the same moment. Without jitter they all come back at exactly the
same time; each jitter strategy spreads the retries differently. Only delays are
computed here: nothing sleeps.
"""

from __future__ import annotations

from amorsize import RetryPolicy
from amorsize.retry import seed_jitter


def main() -> None:
    seed_jitter(2024)  # reproducible output; never needed in real code
    for jitter in (False, True, "full", "equal", "decorrelated"):
        p = RetryPolicy(initial_delay=1.0, max_delay=30.0, jitter=jitter)
        delays = sorted(p.calculate_delay(3) for _ in range(10))
        spread = delays[-1] - delays[0]
        shown = " ".join(f"{d:5.2f}" for d in delays)
        print(f"jitter={jitter!s:>12}: {shown}  (spread {spread:.2f} s)")


if __name__ == "__main__":
    main()
