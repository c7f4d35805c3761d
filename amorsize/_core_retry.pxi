# Retry hot path: backoff delay math (the jitter and the call loop join it here).

from libc.math cimport isfinite, pow


cpdef double backoff_delay(double initial_delay, double exponential_base,
                           double max_delay, long long attempt) noexcept:
    """Capped exponential backoff for ``attempt`` (numbered from 1), without jitter.

    ``min(initial_delay * exponential_base ** (attempt - 1), max_delay)``, computed so that
    huge attempts saturate at ``max_delay`` instead of overflowing.

    >>> backoff_delay(0.1, 2.0, 60.0, 3)
    0.4
    """
    cdef double d
    if attempt <= 1:
        d = initial_delay
    else:
        d = initial_delay * pow(exponential_base, <double>(attempt - 1))
    # pow() saturates to +inf, and 0 * inf is nan: both mean "past the cap" or "no delay".
    if d != d:
        return 0.0
    if not isfinite(d) or d > max_delay:
        return max_delay
    return d
