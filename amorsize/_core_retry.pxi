# Retry hot path: backoff delay math, jitter sampling, the retry decision and the call loop.
#
# Python (amorsize/retry.py) validates a RetryPolicy once and lowers it into the C fields
# of ``_RetryPolicyCore`` (its base class); everything below reads only those fields.
#
# Call path of a decorated function ``g = with_retry(f)``::
#
#     g(x) --vectorcall--> _retry_vectorcall --PyObject_Vectorcall--> f(x) --> result
#                                 | f raised (exception taken out with the C API)
#                                 v
#                          _retry_run: _retry_after_failure (decide, delay, stats, log,
#                          on_retry), time.sleep, call f again ...
#
# On the success path only a counter increment and a flag test sit between the caller and
# ``f``: no tuple or dict is built, no Python frame is pushed, no exception state saved.
# Coroutine functions get ``RetryCoroutine``, a hand-written coroutine with ``am_send``.
#
# Thread safety: every statement here runs with the GIL held and never releases it between
# reading and writing shared state, so the plain C counter increments in ``RetryStats``
# are atomic on CPython with the GIL (not on free-threaded builds, which are not shipped).
# Decorrelated-jitter state is a local of ``_retry_run``: per call, never shared.

cimport cython
from libc.math cimport isfinite, pow
from libc.stdint cimport uint64_t

import collections.abc as _collections_abc
import logging as _logging
import os as _os
import time as _time

cdef extern from *:
    """
    #include <stdint.h>
    #if defined(_MSC_VER)
    #  define AMZ_TLS __declspec(thread)
    #else
    #  define AMZ_TLS __thread
    #endif
    /* xoshiro256** (Blackman & Vigna), one state per thread, seeded by splitmix64.
       A thread (re)seeds itself lazily when its generation differs from the global one:
       on first use, after amz_rng_reseed() (seed_jitter, and in every child after fork). */
    typedef struct { uint64_t s[4]; uint64_t gen; } amz_rng_t;
    static AMZ_TLS amz_rng_t amz_rng_tls;             /* gen 0: never seeded */
    static uint64_t amz_rng_seed_base = 0x9E3779B97F4A7C15ULL;
    static uint64_t amz_rng_generation = 1;
    static uint64_t amz_rng_threads = 0;

    static inline uint64_t amz_splitmix64(uint64_t *x) {
        uint64_t z = (*x += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
    static inline uint64_t amz_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

    static void amz_rng_seed_state(amz_rng_t *r, uint64_t seed) {
        uint64_t x = seed;
        for (int i = 0; i < 4; i++) r->s[i] = amz_splitmix64(&x);
        r->gen = amz_rng_generation;
    }
    /* Uniform double in [0, 1) with 53 random bits. */
    static inline double amz_rng_uniform(void) {
        amz_rng_t *r = &amz_rng_tls;
        if (r->gen != amz_rng_generation) {
            uint64_t k = amz_rng_threads++;
            amz_rng_seed_state(r, amz_rng_seed_base ^ (k * 0xD1B54A32D192ED03ULL));
        }
        uint64_t *s = r->s;
        uint64_t result = amz_rotl(s[1] * 5, 7) * 9;
        uint64_t t = s[1] << 17;
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
        s[2] ^= t; s[3] = amz_rotl(s[3], 45);
        return (double)(result >> 11) * (1.0 / 9007199254740992.0);
    }
    /* Give a type with __await__ the am_send slot (3.10+), so that `await` and PyIter_Send
       drive it without a StopIteration per call. */
    static int amz_set_am_send(PyObject *type, void *fn) {
        PyTypeObject *tp = (PyTypeObject *)type;
        if (tp->tp_as_async == NULL) {
            PyErr_SetString(PyExc_SystemError, "type has no async slots");
            return -1;
        }
        tp->tp_as_async->am_send = (sendfunc)fn;
    #ifdef Py_TPFLAGS_HAVE_AM_SEND
        tp->tp_flags |= Py_TPFLAGS_HAVE_AM_SEND;
    #endif
        PyType_Modified(tp);
        return 0;
    }
    static void amz_rng_reseed(uint64_t seed) {
        amz_rng_seed_base = seed;
        amz_rng_threads = 0;
        amz_rng_generation++;
    }
    """
    double amz_rng_uniform() nogil
    void amz_rng_reseed(uint64_t seed) nogil
    int amz_set_am_send(object tp, void* fn) except -1


# Jitter strategies, as lowered by amorsize.retry (RetryPolicy.jitter).
cdef enum:
    _RETRY_JITTER_NONE = 0
    _RETRY_JITTER_PROPORTIONAL = 1  # the seed's +-25 %
    _RETRY_JITTER_FULL = 2          # AWS "full": U(0, d)
    _RETRY_JITTER_EQUAL = 3         # AWS "equal": d/2 + U(0, d/2)
    _RETRY_JITTER_DECORRELATED = 4  # AWS "decorrelated": min(cap, U(initial, 3 * previous))

# What _retry_after_failure tells the loop (any value >= 0 is the delay before a retry).
cdef double _RETRY_PROPAGATE = -1.0   # not retryable: re-raise unchanged
cdef double _RETRY_EXHAUSTED = -2.0   # retryable, but out of attempts (reason "attempts")
cdef double _RETRY_ELAPSED = -4.0     # retryable, but the sleep would pass max_elapsed
cdef double _RETRY_NO_BUDGET = -5.0   # retryable, but the policy's RetryBudget refused
# (-3.0 is _retry_after_failure's error value.)


cdef inline str _retry_stop_reason(double code):
    # RetryExhaustedError.reason for a stop code of _retry_after_failure.
    if code == _RETRY_ELAPSED:
        return "elapsed"
    if code == _RETRY_NO_BUDGET:
        return "budget"
    return "attempts"

_retry_logger = _logging.getLogger("amorsize.retry")
# Set by amorsize.retry when opentelemetry is installed (amorsize._telemetry.retry_event):
# called after a failed attempt with (func, exc, attempt, delay), delay < 0 when the call
# gave up: then it is the stop code (_RETRY_EXHAUSTED, _RETRY_ELAPSED, _RETRY_NO_BUDGET).
# Never on the success path: only _retry_after_failure reads it.
cdef object _retry_event_hook = None
# Argument checks of the diagnostic methods (calculate_delay, should_retry), never per call.
from amorsize._validate import MAX_SECONDS as _MAX_SECONDS
from amorsize._validate import check_int as _check_int
from amorsize._validate import check_number as _check_number
# Set by amorsize.retry at import: the exception class raised on exhaustion.
_retry_exhausted_error = RuntimeError

# Testing mode (amorsize.set_testing): no real sleeps, optionally fewer attempts.
cdef bint _retry_testing = False
cdef long long _retry_testing_cap = -1

# Never retried, whatever retry_on_exceptions says: they mean "stop", not "failed"
# (asyncio.CancelledError too, checked where asyncio is loaded).
cdef tuple _retry_never = (KeyboardInterrupt, SystemExit, GeneratorExit)


def seed_jitter(uint64_t seed):
    """Reseed the jitter generator: the calling thread's next draws become reproducible.

    Other threads reseed from the same base on their next draw. Forked children reseed
    themselves from fresh entropy automatically.

    >>> seed_jitter(42); a = jitter_uniform(); seed_jitter(42); a == jitter_uniform()
    True
    """
    amz_rng_reseed(seed)


def jitter_uniform():
    """One draw in ``[0, 1)`` from the jitter generator (for tests and diagnostics)."""
    return amz_rng_uniform()


def _retry_reseed_after_fork():
    # Fresh entropy per child, so that forked workers do not sleep in lockstep.
    amz_rng_reseed(int.from_bytes(_os.urandom(8), "little") ^ <uint64_t>_os.getpid())


_retry_reseed_after_fork()
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_retry_reseed_after_fork)


def _set_testing_state(bint enabled, long long max_retries):
    """Set the process-wide testing mode; returns the previous ``(enabled, max_retries)``."""
    global _retry_testing, _retry_testing_cap
    previous = (_retry_testing, _retry_testing_cap)
    _retry_testing = enabled
    _retry_testing_cap = max_retries
    return previous


def _set_exhausted_error(cls):
    global _retry_exhausted_error
    _retry_exhausted_error = cls


def _set_retry_event_hook(hook):
    """Install ``hook(func, exc, attempt, delay)`` (None: none); returns the previous one."""
    global _retry_event_hook
    previous = _retry_event_hook
    _retry_event_hook = hook
    return previous


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


cdef inline double _retry_jittered(_RetryPolicyCore p, long long attempt,
                                   double previous) noexcept:
    cdef double d, u, lo, hi
    if p.jitter_mode == _RETRY_JITTER_DECORRELATED:
        lo = p.initial_delay
        hi = 3.0 * previous
        if hi < lo:
            hi = lo
        d = lo + amz_rng_uniform() * (hi - lo)
    else:
        d = backoff_delay(p.initial_delay, p.exponential_base, p.max_delay, attempt)
        if p.jitter_mode == _RETRY_JITTER_PROPORTIONAL:
            d = d * (0.75 + 0.5 * amz_rng_uniform())
        elif p.jitter_mode == _RETRY_JITTER_FULL:
            d = d * amz_rng_uniform()
        elif p.jitter_mode == _RETRY_JITTER_EQUAL:
            d = 0.5 * d + 0.5 * d * amz_rng_uniform()
    # Keep every strategy inside [0, max_delay] (proportional jitter can overshoot the cap).
    if not d <= p.max_delay:
        d = p.max_delay
    if not d >= 0.0:
        d = 0.0
    return d


cdef inline long long _retry_attempt_from(object attempt) except? -2:
    # Python ints of any size: huge attempts saturate instead of raising OverflowError.
    cdef int overflow = 0
    cdef long long a
    if PyLong_Check(attempt) and not isinstance(attempt, bool):
        a = PyLong_AsLongLongAndOverflow(attempt, &overflow)
        if overflow > 0:
            return 0x7FFFFFFFFFFFFFFF
        if overflow == 0 and a >= 1:
            return a
    # Another integer type (numpy's) is converted; anything else raises the usual message.
    return _check_int("", "attempt", attempt, 1, note=" (attempts are numbered from 1)")


cdef inline bint _retry_may(_RetryPolicyCore p, long long attempt) noexcept:
    cdef long long limit = p.max_retries
    if _retry_testing and _retry_testing_cap >= 0:
        if limit < 0 or _retry_testing_cap < limit:
            limit = _retry_testing_cap
    return limit < 0 or attempt <= limit


@cython.auto_pickle(False)
cdef class _RetryPolicyCore:
    """The C fields of a ``RetryPolicy``; set once by ``_lower`` and never changed after."""

    cdef readonly bint _lowered
    cdef long long max_retries
    cdef double initial_delay, max_delay, exponential_base, max_elapsed
    cdef int jitter_mode
    cdef bint reraise
    cdef bint simple   # no clock, no result check: the call path may skip the Cython loop
    cdef tuple exc_types
    cdef tuple exc_excluded   # subclasses of exc_types that are still not retried
    cdef object on_retry_cb
    cdef object result_pred
    cdef object wait_from_cb   # exception -> seconds or None; consulted only after a failure
    cdef object hedge_cb       # async only: awaited instead of func (amorsize._hedge.attempt)
    cdef double hedge_after
    cdef _RetryBudgetCore budget   # None: no budget (calls deposit, retries withdraw)

    def _lower(self, long long max_retries, double initial_delay, double max_delay,
               double exponential_base, int jitter_mode, tuple exc_types, on_retry,
               double max_elapsed, retry_on_result, bint reraise, tuple exc_excluded=(),
               wait_from=None, hedge=None, double hedge_after=0.0,
               _RetryBudgetCore budget=None):
        if self._lowered:
            raise AttributeError("a RetryPolicy is immutable: build a new one instead")
        if budget is not None:
            _budget_check_slots(budget)
        self.max_retries = max_retries
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.exponential_base = exponential_base
        self.jitter_mode = jitter_mode
        self.exc_types = exc_types
        self.exc_excluded = exc_excluded
        self.on_retry_cb = on_retry
        self.max_elapsed = max_elapsed
        self.result_pred = retry_on_result
        self.wait_from_cb = wait_from
        self.hedge_cb = hedge
        self.hedge_after = hedge_after
        self.reraise = reraise
        self.budget = budget
        self.simple = max_elapsed < 0.0 and retry_on_result is None
        self._lowered = True

    def calculate_delay(self, attempt, previous_delay=None):
        """Seconds to sleep after ``attempt`` (numbered from 1) failed, jitter included.

        Always finite and within ``[0, max_delay]``. For decorrelated jitter,
        ``previous_delay`` is the previous sleep (default: the un-jittered backoff delay of
        the previous attempt, ``initial_delay`` for attempt 1).

        >>> from amorsize import RetryPolicy
        >>> RetryPolicy(initial_delay=0.1, jitter=False).calculate_delay(3)
        0.4
        """
        cdef long long a = _retry_attempt_from(attempt)
        cdef double prev
        if previous_delay is not None:
            prev = _check_number("", "previous_delay", previous_delay, 0, _MAX_SECONDS,
                                 note=" (seconds)")
        elif a <= 1:
            prev = self.initial_delay
        else:
            prev = backoff_delay(self.initial_delay, self.exponential_base, self.max_delay,
                                 a - 1)
        return _retry_jittered(self, a, prev)

    def should_retry(self, exception, attempt):
        """Whether to retry after ``attempt`` (numbered from 1) failed with ``exception``.

        >>> from amorsize import RetryPolicy
        >>> RetryPolicy(max_retries=2).should_retry(ValueError(), 2)
        True
        >>> RetryPolicy(max_retries=2).should_retry(ValueError(), 3)
        False
        """
        cdef long long a = _retry_attempt_from(attempt)
        return _retry_is_retryable(self, exception) and _retry_may(self, a)


cdef inline bint _retry_is_retryable(_RetryPolicyCore p, object exc) except -1:
    if exc is None:   # a result rejected by retry_on_result
        return True
    if not isinstance(exc, Exception):
        # Stop signals are never retried, even by a policy that names BaseException.
        if isinstance(exc, _retry_never):
            return False
        aio = _sys.modules.get("asyncio")   # imported by whoever can be cancelled
        if aio is not None and isinstance(exc, aio.CancelledError):
            return False
    if not isinstance(exc, p.exc_types):
        return False
    return not (p.exc_excluded and isinstance(exc, p.exc_excluded))


cdef double _retry_after_failure(_RetryPolicyCore p, object func, object exc,
                                 long long attempt, double* previous, double start,
                                 RetryStats stats) except? -3.0:
    """Decide after a failed attempt: a delay >= 0 to retry, or a stop code (_RETRY_*).

    Runs the retry's side effects (stats, DEBUG log, on_retry) before returning a delay.
    """
    cdef double delay = -1.0
    if not _retry_is_retryable(p, exc):
        return _RETRY_PROPAGATE
    if not _retry_may(p, attempt):
        if stats is not None:
            stats.exhausted += 1
        _retry_gave_up(func, exc, attempt, _RETRY_EXHAUSTED)
        return _RETRY_EXHAUSTED
    if p.wait_from_cb is not None and exc is not None:
        delay = _retry_hinted_delay(p, func, exc)
    if delay < 0.0:
        delay = _retry_jittered(p, attempt, previous[0])
    # A hinted delay counts against the time budget like a computed one.
    if p.max_elapsed >= 0.0 and _time.monotonic() + delay - start > p.max_elapsed:
        if stats is not None:
            stats.exhausted += 1
        _retry_gave_up(func, exc, attempt, _RETRY_ELAPSED)
        return _RETRY_ELAPSED
    if p.budget is not None and not _budget_withdraw(p.budget):
        if stats is not None:
            stats.exhausted += 1
        _retry_gave_up(func, exc, attempt, _RETRY_NO_BUDGET)
        return _RETRY_NO_BUDGET
    previous[0] = delay
    if stats is not None:
        stats.retries += 1
    if _retry_event_hook is not None:
        _retry_event_hook(func, exc, attempt, delay)
    if _retry_logger.isEnabledFor(10):
        _retry_log_retry(func, exc, attempt, delay)
    if p.on_retry_cb is not None:
        try:
            p.on_retry_cb(exc, attempt, delay)
        except Exception:
            # The callback is monitoring: its failure must not stop the retries, nor vanish.
            _retry_logger.warning(
                "on_retry callback %r raised while retrying %s; retrying anyway",
                p.on_retry_cb, getattr(func, "__qualname__", func), exc_info=True)
    return delay


cdef double _retry_hinted_delay(_RetryPolicyCore p, object func, object exc) except? -3.0:
    """The delay ``wait_from(exc)`` asks for, clamped to ``[0, max_delay]``; -1.0: backoff.

    A ``wait_from`` that raises or answers something other than seconds is logged (it is a
    hint reader: its failure must not end the retries) and the backoff delay is used.
    """
    cdef double s
    try:
        hint = p.wait_from_cb(exc)
        if hint is None:
            return -1.0
        s = _retry_hint_seconds(hint, p.max_delay)
    except Exception:
        _retry_logger.warning(
            "wait_from %r failed on %s while retrying %s; using the backoff delay",
            p.wait_from_cb, type(exc).__name__, getattr(func, "__qualname__", func),
            exc_info=True)
        return -1.0
    return s


cdef double _retry_hint_seconds(object hint, double cap) except? -3.0:
    # int, float or datetime.timedelta -> seconds within [0, cap]; anything else raises.
    if isinstance(hint, bool) or not isinstance(hint, (int, float)):
        # A timedelta exists only if datetime was imported: no import on this path.
        dt = _sys.modules.get("datetime")
        if dt is None or not isinstance(hint, dt.timedelta):
            msg = (f"wait_from must return seconds (int, float or datetime.timedelta) or "
                   f"None, got {hint!r} ({type(hint).__name__})")
            raise TypeError(msg)
        hint = hint.total_seconds()
    if hint != hint:
        raise ValueError("wait_from returned NaN; return None to use the backoff delay")
    # Compared as Python numbers first: a huge int must saturate, not overflow a double.
    if hint >= cap:
        return cap
    if hint <= 0:
        return 0.0
    return <double>hint


cdef _retry_log_retry(object func, object exc, long long attempt, double delay):
    # Lazy %-formatting: a failing __str__ is then the logging handler's problem. The extra
    # fields are amorsize._log's (function, attempt, delay, error_type).
    name = callable_name(func)
    extra = {"function": name, "attempt": attempt, "delay": delay,
             "error_type": None if exc is None else type(exc).__qualname__}
    if exc is None:
        _retry_logger.debug(
            "retrying %s: attempt %d failed (result rejected by retry_on_result); "
            "next attempt in %.3f s", name, attempt, delay, extra=extra)
    else:
        _retry_logger.debug(
            "retrying %s: attempt %d failed (%s: %s); next attempt in %.3f s",
            name, attempt, type(exc).__name__, exc, delay, extra=extra)


cdef _retry_gave_up(object func, object exc, long long attempt, double code):
    # A retryable call out of attempts, time or budget (``code``): after its last failure,
    # never on success.
    if _retry_event_hook is not None:
        _retry_event_hook(func, exc, attempt, code)
    if _retry_logger.isEnabledFor(20):
        name = callable_name(func)
        reason = _retry_stop_reason(code)
        extra = {"function": name, "attempt": attempt, "delay": None, "reason": reason,
                 "error_type": None if exc is None else type(exc).__qualname__}
        why = "its result rejected by retry_on_result" if exc is None else type(exc).__name__
        _retry_logger.info("%s gave up after %d attempt(s) (%s); last: %s", name, attempt,
                           reason, why, extra=extra)


def callable_name(func):
    """The name an error should show for ``func``: ``module.qualname`` where it has one.

    A ``functools.partial`` names the function it wraps, any other callable its type, so that
    a message never names a wrapper amorsize built around the user's function.

    >>> import functools, os.path
    >>> callable_name(os.path.join), callable_name(functools.partial(len))
    ('posixpath.join', 'functools.partial(len)')
    """
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(qualname, str):
        inner = getattr(func, "func", None)
        if type(func).__name__ == "partial" and inner is not None:
            return f"functools.partial({callable_name(inner)})"
        return f"{type(func).__qualname__} object"
    module = getattr(func, "__module__", None)
    if isinstance(module, str) and module != "builtins":
        return f"{module}.{qualname}"
    return qualname


cdef inline _retry_raise_exhausted(_RetryPolicyCore p, object func, object exc,
                                   long long attempt, object result, str reason):
    err = _retry_exhausted_error(exc, attempt, result, callable_name(func), reason=reason)
    if exc is None:
        raise err
    raise err from exc


cdef inline double _retry_start_clock(_RetryPolicyCore p) except? -1.0:
    if p.max_elapsed >= 0.0:
        return _time.monotonic()
    return 0.0


cdef inline _retry_sleep(double delay):
    # time.sleep is looked up now, not at import, so that users' tests can patch it.
    if delay > 0.0 and not _retry_testing:
        _time.sleep(delay)


cdef object _retry_run(object func, _RetryPolicyCore p, RetryStats stats,
                       PyObject* const* vargs, size_t nargsf, PyObject* kwnames,
                       tuple targs, dict tkwargs, long long* attempts_out, object exc):
    """The call-and-retry loop, for vectorcall arguments or (``targs``, ``tkwargs``).

    ``exc``: the first attempt already ran (in ``_retry_vectorcall``) and raised it.
    Exceptions are taken from the C API rather than a Cython ``except`` clause, which
    would add a frame to every failed attempt.
    """
    cdef long long attempt = 1
    cdef double previous = p.initial_delay
    cdef double start = 0.0
    cdef double delay
    cdef PyObject* r
    cdef PyObject* kw = NULL if tkwargs is None else <PyObject*>tkwargs
    result = None
    if p.max_elapsed >= 0.0:
        start = _time.monotonic()
    while True:
        attempts_out[0] = attempt
        if exc is None:
            if targs is None:
                r = PyObject_Vectorcall(<PyObject*>func, vargs, nargsf, kwnames)
            else:
                r = PyObject_Call(<PyObject*>func, <PyObject*>targs, kw)
            if r == NULL:
                exc = _fetch_exception()
            else:
                result = _steal(r)
                if p.result_pred is None or not p.result_pred(result):
                    return result
        delay = _retry_after_failure(p, func, exc, attempt, &previous, start, stats)
        if delay == _RETRY_PROPAGATE:
            _reraise(exc)
        if delay < 0.0:   # a stop: out of attempts, or of time
            if exc is not None and p.reraise:
                _reraise(exc)
            _retry_raise_exhausted(p, func, exc, attempt, result if exc is None else None,
                                   _retry_stop_reason(delay))
        _retry_sleep(delay)
        attempt += 1
        exc = None


cdef class RetryStats:
    """Counters of one decorated function, in this process: ``calls``, ``retries``,
    ``exhausted``.

    ``calls`` counts logical calls (not attempts), ``retries`` the retries made (sleeps,
    zero-length ones included) and ``exhausted`` the calls that gave up. Increments happen
    in C with the GIL held, so they are atomic on CPython; each worker process counts its
    own calls.

    >>> from amorsize import with_retry
    >>> @with_retry(max_retries=1)
    ... def f(x): return x
    >>> f(1); f.retry_stats.calls
    1
    1
    """

    cdef readonly unsigned long long calls, retries, exhausted

    def reset(self):
        """Set every counter back to zero."""
        self.calls = self.retries = self.exhausted = 0

    def as_dict(self):
        """The counters as a plain dict."""
        return {"calls": self.calls, "retries": self.retries, "exhausted": self.exhausted}

    def __repr__(self):
        return (f"RetryStats(calls={self.calls}, retries={self.retries}, "
                f"exhausted={self.exhausted})")


cdef class _RetryingBase:
    """What ``with_retry`` returns: looks like the wrapped function, retries on failure."""

    cdef vectorcallfunc vectorcall
    cdef object func
    cdef _RetryPolicyCore policy
    cdef RetryStats stats
    cdef dict __dict__
    cdef object __weakref__

    def __init__(self, func, _RetryPolicyCore policy not None):
        if not callable(func):
            msg = f"func must be callable, got {func!r} ({type(func).__name__})"
            raise TypeError(msg)
        if not policy._lowered:
            msg = "policy must be a RetryPolicy (built by amorsize.retry.RetryPolicy)"
            raise TypeError(msg)
        if policy.hedge_cb is not None and type(self) is not AsyncRetryingFunction:
            _retry_refuse_hedge(func)
        self.func = func
        self.policy = policy
        self.stats = RetryStats()
        # functools.update_wrapper, minus __annotations__ (a read-only view onto func's).
        attrs = vars(self)
        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            try:
                attrs[name] = getattr(func, name)
            except AttributeError:
                pass
        attrs.update(getattr(func, "__dict__", {}))
        attrs["__wrapped__"] = func

    @property
    def retry_policy(self):
        """The ``RetryPolicy`` this function retries with."""
        return self.policy

    @property
    def retry_stats(self):
        """Thread-safe counters for this function: ``calls``, ``retries``, ``exhausted``."""
        return self.stats

    # Read through to the wrapped function, so that inspect treats this object as the
    # function itself (inspect.iscoroutinefunction on 3.10/3.11 reads __code__'s flags).
    @property
    def __code__(self):
        return self.func.__code__

    @property
    def __defaults__(self):
        return self.func.__defaults__

    @property
    def __kwdefaults__(self):
        return self.func.__kwdefaults__

    @property
    def __annotations__(self):
        return self.func.__annotations__

    def __get__(self, instance, owner):
        if instance is None:
            return self
        return _MethodType(self, instance)

    def __reduce__(self):
        # By reference when importable as module.qualname (workers import it themselves);
        # otherwise by value, so that cloudpickle can still ship a local function.
        attrs = vars(self)
        if _importable_as(self, attrs.get("__module__"), attrs.get("__qualname__")):
            return attrs["__qualname__"]
        return (_rebuild_retrying, (type(self), self.func, self.policy))

    def __repr__(self):
        name = vars(self).get("__qualname__", repr(self.func))
        return f"<retrying function {name} at {id(self):#x}>"


def _rebuild_retrying(cls, func, policy):
    return cls(func, policy)


@cython.final
cdef class RetryingFunction(_RetryingBase):
    """A synchronous function decorated by ``with_retry``."""

    def __cinit__(self):
        self.vectorcall = <vectorcallfunc><void*>_retry_vectorcall

    def call_outcome(self, *args, **kwargs):
        """Run with retries and report instead of raising: ``(ok, value, attempts)``.

        ``value`` is the result, or the exception that ended the call (the last attempt's
        exception when retries ran out). ``BaseException`` that is not an ``Exception``
        still propagates. Counts in ``retry_stats`` like a normal call.
        """
        cdef long long attempts = 0
        self.stats.calls += 1
        if self.policy.budget is not None:
            _budget_deposit(self.policy.budget)
        try:
            result = _retry_run(self.func, self.policy, self.stats, NULL, 0, NULL,
                                args, kwargs, &attempts, None)
        except Exception as exc:
            cause = exc.__cause__
            if (isinstance(exc, _retry_exhausted_error) and cause is not None
                    and exc.original_exception is cause):
                return (False, cause, attempts)
            return (False, exc, attempts)
        return (True, result, attempts)


cdef PyObject* _retry_vectorcall(RetryingFunction self, PyObject* const* args,
                                 size_t nargsf, PyObject* kwnames) noexcept:
    # The success path: one counter increment, then straight into the function. Only a
    # failure (or a policy needing a clock or a result check) goes on to the Cython loop.
    cdef PyObject* r
    self.stats.calls += 1
    if self.policy.budget is not None and _retry_deposit_failed(self.policy.budget):
        return NULL
    if self.policy.simple:
        r = PyObject_Vectorcall(<PyObject*>self.func, args, nargsf, kwnames)
        if r != NULL:
            return r
        return _retry_slow_ptr(self, args, nargsf, kwnames, True)
    return _retry_slow_ptr(self, args, nargsf, kwnames, False)


cdef inline bint _retry_deposit_failed(_RetryBudgetCore b) noexcept:
    # The deposit from a noexcept vectorcall entry. Only an injected clock (tests) can
    # raise: the call then fails with that exception set (the pointer below passes the -1
    # and the exception through, as _retry_slow_ptr does).
    if b.clock is None:
        amz_budget_add(b.slots, amz_coarse_ns() >> b.shift, b.deposit)
        return False
    return _retry_deposit_clocked_ptr(b) != 0


ctypedef int (*_retry_deposit_t)(_RetryBudgetCore) noexcept
cdef _retry_deposit_t _retry_deposit_clocked_ptr = <_retry_deposit_t><void*>_budget_deposit


cdef object _retry_slow(RetryingFunction self, PyObject* const* args, size_t nargsf,
                        PyObject* kwnames, bint failed):
    cdef long long attempts
    exc = _fetch_exception() if failed else None
    return _retry_run(self.func, self.policy, self.stats, args, nargsf, kwnames, None, None,
                      &attempts, exc)


# _retry_slow returns NULL with an exception set on failure, exactly what a vectorcall entry
# must return; this pointer lets the noexcept entry hand that NULL on unchanged.
ctypedef PyObject* (*_retry_slow_t)(RetryingFunction, PyObject* const*, size_t, PyObject*,
                                    bint) noexcept
cdef _retry_slow_t _retry_slow_ptr = <_retry_slow_t><void*>_retry_slow


@cython.final
cdef class RetryingItemFunction(_RetryingBase):
    """``func(item)`` with retries, for ``execute(retry=...)``: what workers call per item.

    The success path is ``RetryingFunction``'s (straight into ``func``). A final failure is
    raised as the policy says (``RetryExhaustedError`` naming ``func`` itself, or the
    exception) and carries ``attempts``, the calls made, which the worker reports with it.
    Picklable by value (``func`` and the policy), so every worker rebuilds its own.
    """

    def __cinit__(self):
        self.vectorcall = <vectorcallfunc><void*>_retry_item_vectorcall


cdef PyObject* _retry_item_vectorcall(RetryingItemFunction self, PyObject* const* args,
                                      size_t nargsf, PyObject* kwnames) noexcept:
    # As _retry_vectorcall; only the failure path differs (it records the attempts).
    cdef PyObject* r
    self.stats.calls += 1
    if self.policy.budget is not None and _retry_deposit_failed(self.policy.budget):
        return NULL
    if self.policy.simple:
        r = PyObject_Vectorcall(<PyObject*>self.func, args, nargsf, kwnames)
        if r != NULL:
            return r
        return _retry_item_slow_ptr(self, args, nargsf, kwnames, True)
    return _retry_item_slow_ptr(self, args, nargsf, kwnames, False)


cdef object _retry_item_slow(RetryingItemFunction self, PyObject* const* args, size_t nargsf,
                             PyObject* kwnames, bint failed):
    cdef long long attempts = 1
    exc = _fetch_exception() if failed else None
    try:
        return _retry_run(self.func, self.policy, self.stats, args, nargsf, kwnames, None,
                          None, &attempts, exc)
    except Exception as err:
        if not isinstance(getattr(err, "attempts", None), int):
            try:
                err.attempts = attempts
            except AttributeError:   # an exception class with __slots__
                pass
        raise


ctypedef PyObject* (*_retry_item_slow_t)(RetryingItemFunction, PyObject* const*, size_t,
                                         PyObject*, bint) noexcept
cdef _retry_item_slow_t _retry_item_slow_ptr = <_retry_item_slow_t><void*>_retry_item_slow


@cython.final
cdef class AsyncRetryingFunction(_RetryingBase):
    """An ``async def`` function decorated by ``with_retry``: calling it gives a coroutine."""

    def __cinit__(self):
        self.vectorcall = <vectorcallfunc><void*>_retry_async_vectorcall

    # asyncio.iscoroutinefunction() also accepts this marker (inspect reads __code__).
    @property
    def _is_coroutine(self):
        import asyncio.coroutines
        return getattr(asyncio.coroutines, "_is_coroutine", None)


cdef object _retry_async_vectorcall(AsyncRetryingFunction self, PyObject* const* args,
                                    size_t nargsf, PyObject* kwnames):
    cdef Py_ssize_t n = PyVectorcall_NARGS(nargsf)
    cdef Py_ssize_t i, nk
    cdef RetryCoroutine c = RetryCoroutine.__new__(RetryCoroutine)
    cdef tuple targs = PyTuple_New(n)
    cdef object o
    for i in range(n):
        o = <object>args[i]
        Py_INCREF(o)
        PyTuple_SET_ITEM(targs, i, o)
    if kwnames is not NULL:
        names = <tuple><object>kwnames
        nk = len(names)
        c.kwargs = {names[i]: <object>args[n + i] for i in range(nk)}
    c.func = self.func
    c.p = self.policy
    c.stats = self.stats
    c.args = targs
    self.stats.calls += 1
    return c


@cython.final
@cython.freelist(16)
@cython.auto_pickle(False)
cdef class RetryCoroutine:
    """The coroutine returned by an ``async def`` function decorated by ``with_retry``.

    A hand-written coroutine (``__await__``, ``send``, ``throw``, ``close``; registered as a
    ``collections.abc.Coroutine``), because a compiled ``async def`` costs a few hundred
    nanoseconds more per call. Each attempt awaits a fresh ``func(*args, **kwargs)``;
    between attempts it awaits ``asyncio.sleep(delay)``, looked up when the sleep starts.
    """

    cdef object func
    cdef _RetryPolicyCore p
    cdef RetryStats stats
    cdef tuple args
    cdef dict kwargs
    cdef object inner          # what is being awaited: an attempt, or a sleep
    cdef long long attempt     # 0 until the first send
    cdef double previous, start
    cdef bint sleeping, done

    def __await__(self):
        return self

    def __next__(self):
        return self.send(None)

    def send(self, value):
        """Resume with ``value`` (the coroutine protocol)."""
        cdef PyObject* r = NULL
        cdef int st = _retry_coro_step(self, value, None, &r)
        res = <object>r
        Py_DECREF(res)
        if st == 1:
            return res
        raise StopIteration(res)

    def throw(self, typ, val=None, tb=None):
        """Raise an exception inside the coroutine (the coroutine protocol)."""
        cdef PyObject* r = NULL
        cdef int st
        if self.inner is None:
            # Not started or already finished: like a native coroutine, it just raises.
            self.done = True
            if val is None and tb is None:
                raise typ
            raise typ(val).with_traceback(tb) if isinstance(typ, type) else typ
        throw_args = (typ,) if val is None and tb is None else (typ, val, tb)
        st = _retry_coro_step(self, None, throw_args, &r)
        res = <object>r
        Py_DECREF(res)
        if st == 1:
            return res
        raise StopIteration(res)

    def close(self):
        """Stop the coroutine (the coroutine protocol)."""
        inner = self.inner
        self.inner = None
        self.done = True
        if inner is not None:
            inner.close()

    @property
    def __name__(self):
        return getattr(self.func, "__name__", type(self).__name__)

    @property
    def __qualname__(self):
        return getattr(self.func, "__qualname__", type(self).__qualname__)

    def __repr__(self):
        return f"<retrying coroutine {self.__qualname__} attempt={self.attempt} at {id(self):#x}>"


cdef inline object _retry_coro_iter(object aw):
    # What PyIter_Send can drive: a native coroutine as is, any other awaitable's __await__().
    if PyCoro_CheckExact(aw):
        return aw
    return aw.__await__()


cdef int _retry_coro_throw_in(object inner, tuple throw_args, PyObject** out) except -1:
    # inner.throw(...): 1 with the yielded value, 0 with the return value, or raises.
    try:
        r = inner.throw(*throw_args)
    except StopIteration as e:
        v = e.value
        Py_INCREF(v)
        out[0] = <PyObject*>v
        return 0
    Py_INCREF(r)
    out[0] = <PyObject*>r
    return 1


cdef int _retry_coro_step(RetryCoroutine self, object value, tuple throw_args,
                          PyObject** out) except -1:
    """Advance the retry loop; 1: ``*out`` is yielded, 0: ``*out`` is the return value.

    The same contract as ``am_send`` (PYGEN_NEXT / PYGEN_RETURN / PYGEN_ERROR).
    """
    cdef _RetryPolicyCore p = self.p
    cdef PyObject* r = NULL
    cdef int st = -1
    out[0] = NULL
    if self.attempt == 0:
        if self.done:
            raise RuntimeError("cannot reuse already awaited coroutine")
        self.attempt = 1
        self.previous = p.initial_delay
        if p.budget is not None:
            _budget_deposit(p.budget)
        if p.max_elapsed >= 0.0:
            self.start = _time.monotonic()
    while True:
        exc = None
        if self.inner is None:
            if self.done:
                raise RuntimeError("cannot reuse already awaited coroutine")
            exc = _retry_coro_start_attempt(self)
        if exc is None:
            exc = _retry_coro_resume(self, value, throw_args, &r, &st)
            throw_args = None
        value = None
        result = None
        if exc is None:
            if st == 1:
                out[0] = r
                return 1
            # The awaited thing returned.
            result = _steal(r)
            self.inner = None
            if self.sleeping:
                self.sleeping = False
                self.attempt += 1
                continue
            if p.result_pred is None or not p.result_pred(result):
                self.done = True
                self.attempt = 0
                Py_INCREF(result)
                out[0] = <PyObject*>result
                return 0
        else:
            self.inner = None
            if self.sleeping:
                # Cancelled (or failed) while sleeping: that is not an attempt failing.
                self.done = True
                _reraise(exc)
        _retry_coro_give_up_or_sleep(self, exc, result)


cdef _retry_refuse_hedge(object func):
    msg = (f"RetryPolicy(hedge_after=...) hedges async def functions only (a second "
           f"attempt must be cancellable), and {func!r} is not one: drop hedge_after, or "
           f"make the function async def")
    raise TypeError(msg)


cdef inline object _retry_coro_start_attempt(RetryCoroutine self):
    # Call func for a fresh attempt and keep what it returned to await; returns the
    # exception if that failed, else None.
    cdef PyObject* r
    if self.p.hedge_cb is not None:
        try:
            self.inner = self.p.hedge_cb(self.func, self.args, self.kwargs, self.p.hedge_after)
        except BaseException as e:
            return e
        return None
    r = PyObject_Call(<PyObject*>self.func, <PyObject*>self.args,
                      NULL if self.kwargs is None else <PyObject*>self.kwargs)
    if r == NULL:
        return _fetch_exception()
    aw = _steal(r)
    if PyCoro_CheckExact(aw):
        self.inner = aw
        return None
    try:
        self.inner = aw.__await__()
    except BaseException as e:
        return e
    return None


cdef inline object _retry_coro_resume(RetryCoroutine self, object value, tuple throw_args,
                                      PyObject** r, int* st):
    # Send ``value`` (or throw ``throw_args``) into what is being awaited; ``*st`` and ``*r``
    # as in _retry_coro_step. Returns the exception it raised, else None.
    r[0] = NULL
    if throw_args is not None:
        try:
            st[0] = _retry_coro_throw_in(self.inner, throw_args, r)
        except BaseException as e:
            return e
        return None
    st[0] = PyIter_Send(self.inner, value, r)
    if st[0] == -1:
        return _fetch_exception()
    return None


cdef int _retry_coro_give_up_or_sleep(RetryCoroutine self, object exc,
                                      object result) except -1:
    # After a failed attempt (``exc``; None when retry_on_result rejected ``result``): raise
    # what the policy says, or start the sleep before the next attempt.
    cdef _RetryPolicyCore p = self.p
    cdef double delay = _retry_after_failure(p, self.func, exc, self.attempt, &self.previous,
                                             self.start, self.stats)
    if delay == _RETRY_PROPAGATE:
        self.done = True
        return _reraise(exc)
    if delay < 0.0:   # a stop: out of attempts, or of time
        self.done = True
        if exc is not None and p.reraise:
            return _reraise(exc)
        _retry_raise_exhausted(p, self.func, exc, self.attempt, result,
                               _retry_stop_reason(delay))
    return _retry_coro_begin_sleep(self, delay)


cdef inline int _retry_coro_begin_sleep(RetryCoroutine self, double delay) except -1:
    if delay > 0.0 and not _retry_testing:
        import asyncio
        # asyncio.sleep is looked up now, so that users' tests can patch it.
        self.inner = _retry_coro_iter(asyncio.sleep(delay))
        self.sleeping = True
    else:
        self.attempt += 1
    return 0


cdef int _retry_coro_am_send(RetryCoroutine self, PyObject* arg, PyObject** out) except -1:
    return _retry_coro_step(self, <object>arg, None, out)


def retry_call_core(func, _RetryPolicyCore policy not None, tuple args, dict kwargs):
    """``func(*args, **kwargs)`` with retries under ``policy`` (no stats kept)."""
    cdef long long attempts = 0
    if not policy._lowered:
        msg = "policy must be a RetryPolicy (built by amorsize.retry.RetryPolicy)"
        raise TypeError(msg)
    if policy.hedge_cb is not None:
        _retry_refuse_hedge(func)
    if policy.budget is not None:
        _budget_deposit(policy.budget)
    return _retry_run(func, policy, None, NULL, 0, NULL, args, kwargs, &attempts, None)


cdef _retry_enable_vectorcall():
    cdef RetryingFunction probe = RetryingFunction.__new__(RetryingFunction)
    cdef Py_ssize_t offset = <char*>&probe.vectorcall - <char*><void*>probe
    amz_enable_vectorcall(RetryingFunction, offset)
    amz_enable_vectorcall(RetryingItemFunction, offset)
    amz_enable_vectorcall(AsyncRetryingFunction, offset)
    amz_set_am_send(RetryCoroutine, <void*>_retry_coro_am_send)
    _collections_abc.Coroutine.register(RetryCoroutine)


_retry_enable_vectorcall()
