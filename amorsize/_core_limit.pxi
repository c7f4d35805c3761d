# Rate limiter: GCRA (the generic cell rate algorithm), one "theoretical arrival time" (TAT)
# in one int64 slot updated by compare-and-swap, so that threads and worker processes mapping
# the same slot (amorsize/_shared.py) draw from one bucket without a lock.
#
# With interval T = per / rate and tolerance tau = burst * T, a call arriving at ``now`` may
# start at ``max(now, TAT - tau)``, and the TAT becomes ``max(TAT, now) + T``. A call that
# must wait reserves its start time in the same CAS, then sleeps exactly until it: callers
# are served in the order they asked, and none sleeps longer than its own turn.
# Slot time is amz_now_ns (CLOCK_MONOTONIC, system-wide; see _core_budget.pxi).

cdef extern from *:
    """
    /* Reserve the next start: returns the ns to wait from ``now`` (0: start at once). */
    static inline int64_t amz_gcra_reserve(int64_t *tat_p, int64_t now, int64_t interval,
                                           int64_t tolerance) {
        for (;;) {
            int64_t tat = amz_load64(tat_p);
            int64_t start = tat - tolerance > now ? tat - tolerance : now;
            int64_t base = tat > now ? tat : now;
            if (amz_cas64(tat_p, tat, base + interval)) return start - now;
        }
    }
    /* Take a start only if it is due now: 1 taken, 0 not (nothing reserved). */
    static inline int amz_gcra_try(int64_t *tat_p, int64_t now, int64_t interval,
                                   int64_t tolerance) {
        for (;;) {
            int64_t tat = amz_load64(tat_p);
            if (tat - tolerance > now) return 0;
            int64_t base = tat > now ? tat : now;
            if (amz_cas64(tat_p, tat, base + interval)) return 1;
        }
    }
    """
    int64_t amz_gcra_reserve(int64_t* tat_p, int64_t now, int64_t interval,
                             int64_t tolerance) nogil
    bint amz_gcra_try(int64_t* tat_p, int64_t now, int64_t interval, int64_t tolerance) nogil


@cython.auto_pickle(False)
cdef class _RateLimiterCore(_SlotsCore):
    """The C fields of a ``RateLimiter``: one TAT slot, interval and tolerance in ns."""

    cdef int64_t interval, tolerance

    def __cinit__(self):
        self.n_slots = 1

    def _lower(self, int64_t interval, int64_t tolerance):
        self.interval = interval
        self.tolerance = tolerance

    def _reserve(self):
        """Reserve the next start; the seconds to wait until it (``0.0``: start now)."""
        _budget_check_slots(self)
        cdef int64_t now = amz_now_ns() if self.clock is None else _budget_clock_ns(self.clock)
        return amz_gcra_reserve(self.slots, now, self.interval, self.tolerance) / 1e9

    def try_acquire(self):
        """Take a start if one is due now, without waiting: ``True`` if taken.

        >>> from amorsize import RateLimiter
        >>> lim = RateLimiter(1, per=60.0, burst=0)
        >>> lim.try_acquire(), lim.try_acquire()
        (True, False)
        """
        _budget_check_slots(self)
        cdef int64_t now = amz_now_ns() if self.clock is None else _budget_clock_ns(self.clock)
        return amz_gcra_try(self.slots, now, self.interval, self.tolerance)
