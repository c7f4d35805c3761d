"""Server hints for retries: how long a failed call asks to be left alone.

``retry_after`` is a ready ``RetryPolicy(wait_from=...)``: it reads the delay a server
asked for from the exception of a failed attempt, so that a throttled call retries when
the server said it may, not when an exponential backoff happens to end::

    policy = RetryPolicy(max_retries=5, wait_from=retry_after)

Where it looks, in order (the first answer found wins):

1. ``exc.retry_after``: seconds (``int``/``float``), a ``datetime.timedelta``, or a
   ``Retry-After`` header value (an application's own exception can set it);
2. the ``Retry-After`` header of ``exc.response.headers`` (``requests.HTTPError``,
   ``httpx.HTTPStatusError``) or of ``exc.headers`` (``aiohttp.ClientResponseError``),
   looked up case-insensitively, as ``delay-seconds`` or an ``HTTP-date`` (RFC 9110
   section 10.2.3); a date in the past means "now" (0 seconds).

Anything else, or a value that does not parse, gives ``None``: the policy then uses its
backoff. Nothing here imports an HTTP library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

__all__ = ["retry_after"]

_HEADER = "retry-after"


def retry_after(exc: BaseException, *, now: datetime | None = None) -> float | None:
    """Seconds the server asked to wait before retrying ``exc``'s call, or ``None``.

    ``now`` (an aware ``datetime``; default: the current UTC time) is what an
    ``HTTP-date`` is measured from.

    >>> class Throttled(Exception):
    ...     retry_after = 2.5
    >>> retry_after(Throttled()), retry_after(ValueError())
    (2.5, None)
    """
    own = getattr(exc, "retry_after", None)
    if own is not None:
        seconds = _seconds(own, now)
        if seconds is not None:
            return seconds
    value = _header(_headers_of(exc))
    return None if value is None else _parse(value, now)


def _seconds(value: object, now: datetime | None) -> float | None:
    """An ``exc.retry_after`` value as seconds: a number, a timedelta or a header value."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return _finite(float(value))
    if isinstance(value, timedelta):
        return _finite(value.total_seconds())
    if isinstance(value, str | bytes):
        return _parse(value, now)
    return None


def _headers_of(exc: BaseException) -> object:
    """The response headers an HTTP client's exception carries, or ``None``."""
    try:
        response = getattr(exc, "response", None)
        # `is not None`, never truthiness: a requests.Response with status >= 400 is falsy.
        if response is not None:
            headers = getattr(response, "headers", None)
            if headers is not None:
                return headers
        return getattr(exc, "headers", None)  # aiohttp.ClientResponseError
    except Exception:  # a property that raises (httpx without a request)
        return None


def _header(headers: object) -> str | bytes | None:
    """The ``Retry-After`` value of a headers object, matched case-insensitively."""
    if headers is None:
        return None
    try:
        # requests, httpx and aiohttp (multidict) headers are case-insensitive mappings.
        value = headers.get("Retry-After")  # type: ignore[attr-defined]
        if value is None and isinstance(headers, Mapping):
            # A plain dict: its keys keep whatever case the server sent.
            value = next((v for k, v in headers.items() if _is_header(k)), None)
    except Exception:  # a headers object without .get or one that fails
        return None
    return value if isinstance(value, str | bytes) else None


def _is_header(key: object) -> bool:
    if isinstance(key, bytes):
        key = key.decode("latin-1")
    return isinstance(key, str) and key.strip().lower() == _HEADER


def _parse(value: str | bytes, now: datetime | None) -> float | None:
    """``delay-seconds`` or an ``HTTP-date`` as seconds from ``now``; ``None`` if neither."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text:
        return None
    try:
        return _finite(float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as RFC 5322 reads it
        when = when.replace(tzinfo=timezone.utc)
    base = now if now is not None else datetime.now(timezone.utc)
    return max(0.0, (when - base).total_seconds())


def _finite(seconds: float) -> float | None:
    """A finite number of seconds, negatives as 0; ``None`` for nan or infinity."""
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
