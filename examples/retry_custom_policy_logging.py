"""Demo 2: a reusable production policy, with a logging callback.

Run it with ``python examples/retry_custom_policy_logging.py`` (well under a second).

``RetryPolicy`` is validated once and shared by several functions. ``on_retry`` runs
before each sleep; here it logs a warning. Turning on DEBUG for the ``amorsize`` logger
also shows the library's own record of every retry.
"""

from __future__ import annotations

import logging

from amorsize import RetryPolicy, with_retry

log = logging.getLogger("demo")

policy = RetryPolicy(
    max_retries=4,
    initial_delay=0.005,
    max_delay=0.05,
    exponential_base=2.0,
    jitter=True,
    retry_on_exceptions=(ConnectionError, TimeoutError),
    on_retry=lambda exc, attempt, delay: log.warning(
        "retry %d in %.3fs after %s: %s", attempt, delay, type(exc).__name__, exc
    ),
)

attempts: dict[int, int] = {}


@with_retry(policy=policy)
def production_api_call(item_id: int) -> dict[str, int]:
    """Times out on the first two attempts for each item, then answers."""
    attempts[item_id] = attempts.get(item_id, 0) + 1
    if attempts[item_id] <= 2:
        raise TimeoutError(f"item {item_id}: read timed out")
    return {"id": item_id, "value": item_id * 10}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("amorsize").setLevel(logging.DEBUG)  # the library's own retry records
    print(production_api_call(7))
    print(f"invalid policies fail at once, e.g. {_bad_policy_message()}")


def _bad_policy_message() -> str:
    try:
        RetryPolicy(initial_delay=2.0, max_delay=1.0)
    except ValueError as exc:
        return str(exc)
    return "(no error?)"


if __name__ == "__main__":
    main()
