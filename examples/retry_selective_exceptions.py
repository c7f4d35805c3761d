"""Demo 4: retry only transient errors.

Run it with ``python examples/retry_selective_exceptions.py`` (well under a second).

``retry_on_exceptions`` lists what is worth retrying. A ``ValueError`` (a bug or bad
input) propagates at once, unchanged; a ``ConnectionError`` is retried.
"""

from __future__ import annotations

from amorsize import with_retry


class RateLimitError(Exception):
    """The service asked us to slow down."""


attempts = {"transient": 0, "permanent": 0}


@with_retry(
    max_retries=5, initial_delay=0.001, retry_on_exceptions=(ConnectionError, RateLimitError)
)
def api_call(kind: str) -> str:
    attempts[kind] += 1
    if kind == "transient" and attempts[kind] < 3:
        raise RateLimitError("429 Too Many Requests")
    if kind == "permanent":
        raise ValueError("400 Bad Request: malformed id")
    return f"{kind}: ok"


def main() -> None:
    print(api_call("transient"), f"(after {attempts['transient']} attempts)")
    try:
        api_call("permanent")
    except ValueError as exc:
        print(f"not retried: {exc!r} after {attempts['permanent']} attempt")


if __name__ == "__main__":
    main()
