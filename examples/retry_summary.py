"""Demo 7: the whole retry toolbox in one place.

Run it with ``python examples/retry_summary.py`` (well under a second).

``retry_call`` (no decorator), ``create_batch_retry_wrapper`` (per-item retries that
collect failures), ``retry_on_result``, ``max_elapsed``, async functions, and
``set_testing`` for your own test suite.
"""

from __future__ import annotations

import asyncio

from amorsize import (
    RetryExhaustedError,
    RetryPolicy,
    create_batch_retry_wrapper,
    retry_call,
    set_testing,
    with_retry,
)


def parse(s: str) -> int:
    return int(s)


def main() -> None:
    # 1. retry_call: retries without decorating.
    print("retry_call:", retry_call(parse, args=("42",), max_retries=2))

    # 2. Batch wrapper: bad items become RetryFailure records instead of stopping the batch.
    wrapper = create_batch_retry_wrapper(parse, RetryPolicy(max_retries=1, initial_delay=0.001))
    print("batch:", [wrapper(s) for s in ["1", "two", "3"]])
    print("failures:", [(f.item, type(f.exception).__name__, f.attempts) for f in wrapper.failures])

    # 3. retry_on_result: retry while the answer is "not ready".
    answers = iter([None, None, "ready"])
    poll = with_retry(
        lambda: next(answers), initial_delay=0.001, retry_on_result=lambda r: r is None
    )
    print("poll:", poll())

    # 4. Async: the same decorator on a coroutine function; sleeps are asyncio.sleep.
    state = {"n": 0}

    @with_retry(initial_delay=0.001)
    async def afetch() -> str:
        state["n"] += 1
        if state["n"] < 2:
            raise ConnectionError
        return "async ok"

    print("async:", asyncio.run(afetch()))

    # 5. Testing mode: long delays, but no waiting and at most one retry.
    @with_retry(max_retries=10, initial_delay=30.0)
    def always_down() -> None:
        raise ConnectionError("down")

    with set_testing(True, max_retries=1):
        try:
            always_down()
        except RetryExhaustedError as exc:
            print("testing mode:", exc)


if __name__ == "__main__":
    main()
