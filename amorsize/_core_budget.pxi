# Retry budget and rate limiter state: C atomics on int64 slots that may live in shared
# memory, so that every worker process of a run updates the same counters.
#
# Python (amorsize/budget.py, amorsize/ratelimit.py) validates once, lowers the parameters
# into the C fields below and hands in the buffer that holds the slots: this process's
# memory, or a named shared-memory segment (amorsize/_shared.py) mapped by every worker.
# Nothing here locks: every update is one compare-and-swap on one 64-bit word, so processes
# need no common lock, and a process killed mid-update leaves no lock held.
#
# Clocks: CLOCK_MONOTONIC is one system-wide clock on Linux and macOS, and
# QueryPerformanceCounter on Windows, so slot times written by one process mean the same in
# another. The budget's deposit sits on every successful call, so it reads the coarse clock
# (CLOCK_MONOTONIC_COARSE: a few ns, ~4 ms resolution, far finer than its ttl/10 slices).
#
# Budget slots: 32 words, one per time slice of 2**shift ns (~ttl/10 .. ttl/20); a word packs
# the slice number (high 24 bits) and the slice's net units (low 40 bits, signed): each call
# deposits ``deposit`` units, each retry withdraws ``_BUDGET_UNIT``. Slices older than the
# window are ignored on reading and recycled on writing.

cimport cython
from libc.stdint cimport int64_t
from libc.string cimport memcpy

cdef extern from *:
    """
    #include <stdint.h>
    #if defined(_WIN32)
    #  include <windows.h>
    #  include <intrin.h>
    static int64_t amz_now_ns(void) {
        LARGE_INTEGER f, c;
        QueryPerformanceFrequency(&f);
        QueryPerformanceCounter(&c);
        return (int64_t)(c.QuadPart / f.QuadPart) * 1000000000LL
               + (int64_t)((c.QuadPart % f.QuadPart) * 1000000000LL / f.QuadPart);
    }
    static int64_t amz_coarse_ns(void) { return (int64_t)GetTickCount64() * 1000000LL; }
    #else
    #  include <time.h>
    static inline int64_t amz_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    static inline int64_t amz_coarse_ns(void) {
        struct timespec ts;
    #  if defined(CLOCK_MONOTONIC_COARSE)
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    #  else
        clock_gettime(CLOCK_MONOTONIC, &ts);
    #  endif
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    #endif

    /* A stale load only makes the compare-and-swap that follows fail and retry. */
    #if defined(_MSC_VER) && !defined(__clang__)
    static inline int64_t amz_load64(int64_t *p) { return *(volatile int64_t *)p; }
    static inline int amz_cas64(int64_t *p, int64_t expected, int64_t desired) {
        return _InterlockedCompareExchange64((volatile __int64 *)p, desired, expected)
               == expected;
    }
    static inline int64_t amz_add64(int64_t *p, int64_t d) {
        return _InterlockedExchangeAdd64((volatile __int64 *)p, d);
    }
    #else
    static inline int64_t amz_load64(int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline int amz_cas64(int64_t *p, int64_t expected, int64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL,
                                           __ATOMIC_RELAXED);
    }
    static inline int64_t amz_add64(int64_t *p, int64_t d) {
        return __atomic_fetch_add(p, d, __ATOMIC_ACQ_REL);
    }
    #endif

    #define AMZ_BUDGET_SLOTS 32
    #define AMZ_BUDGET_TAG 0xFFFFFFULL
    #define AMZ_BUDGET_MASK 0xFFFFFFFFFFULL
    #define AMZ_BUDGET_MAX 0x7FFFFFFFFFLL
    static inline int64_t amz_budget_count(int64_t w) {
        return ((int64_t)((uint64_t)w << 24)) >> 24;
    }
    static inline int amz_budget_live(int64_t w, int64_t slice) {
        return (((uint64_t)w >> 40) & AMZ_BUDGET_TAG) == ((uint64_t)slice & AMZ_BUDGET_TAG);
    }
    /* Add ``units`` to the net count of time slice ``slice``, recycling its word if it
       still holds an older slice; saturates instead of overflowing. */
    static inline void amz_budget_add(int64_t *slots, int64_t slice, int64_t units) {
        int64_t *p = slots + (slice & (AMZ_BUDGET_SLOTS - 1));
        uint64_t tag = ((uint64_t)slice & AMZ_BUDGET_TAG) << 40;
        for (;;) {
            int64_t w = amz_load64(p);
            int64_t n = amz_budget_live(w, slice) ? amz_budget_count(w) : 0;
            n += units;
            if (n > AMZ_BUDGET_MAX) n = AMZ_BUDGET_MAX;
            if (n < -AMZ_BUDGET_MAX) n = -AMZ_BUDGET_MAX;
            if (amz_cas64(p, w, (int64_t)(tag | ((uint64_t)n & AMZ_BUDGET_MASK)))) return;
        }
    }
    /* Net units of the ``live`` slices ending with ``slice``. */
    static inline int64_t amz_budget_sum(int64_t *slots, int64_t slice, int live) {
        int64_t total = 0;
        for (int i = 0; i < live; i++) {
            int64_t w = amz_load64(slots + ((slice - i) & (AMZ_BUDGET_SLOTS - 1)));
            if (amz_budget_live(w, slice - i)) total += amz_budget_count(w);
        }
        return total;
    }
    """
    int64_t amz_now_ns() nogil
    int64_t amz_coarse_ns() nogil
    int64_t amz_load64(int64_t* p) nogil
    bint amz_cas64(int64_t* p, int64_t expected, int64_t desired) nogil
    void amz_budget_add(int64_t* slots, int64_t slice, int64_t units) nogil
    int64_t amz_budget_sum(int64_t* slots, int64_t slice, int live) nogil
    int AMZ_BUDGET_SLOTS

# Units one retry withdraws; a call deposits ``ratio * _BUDGET_UNIT`` (ratio to 1/1000).
cdef int64_t _BUDGET_UNIT = 1000


cdef inline int64_t _budget_clock_ns(object clock) except? -1:
    # An injected clock (tests): seconds, like time.monotonic.
    return <int64_t>(<double>clock() * 1e9)


@cython.auto_pickle(False)
cdef class _SlotsCore:
    """int64 slots in a buffer this object does not own; ``_use_buffer`` moves them."""

    cdef int64_t* slots
    cdef Py_ssize_t n_slots
    cdef object buf          # the memoryview the pointer points into (kept alive)
    cdef public object clock  # None: the C clock; else a callable giving seconds

    def _use_buffer(self, buf, bint copy):
        """Point the slots at ``buf`` (a writable buffer), copying their values if ``copy``.

        Runs with the GIL held from start to end: no thread of this process sees a half move.
        """
        cdef unsigned char[::1] view = memoryview(buf).cast("B")
        if view.shape[0] < self.n_slots * 8:
            msg = f"buffer of {view.shape[0]} bytes, {self.n_slots * 8} needed"
            raise ValueError(msg)
        cdef int64_t* new = <int64_t*>&view[0]
        if copy and self.slots != NULL:
            memcpy(new, self.slots, self.n_slots * 8)
        self.slots = new
        self.buf = view

    def _slot(self, Py_ssize_t i):
        """The raw value of slot ``i`` (tests and diagnostics)."""
        if self.slots == NULL or not 0 <= i < self.n_slots:
            raise IndexError(i)
        return amz_load64(self.slots + i)


cdef inline int _budget_check_slots(_SlotsCore c) except -1:
    # Built through its Python class, an object always has slots; a bare core has none.
    if c.slots == NULL:
        raise RuntimeError(f"{type(c).__name__} has no slots: build it through its class")
    return 0


@cython.auto_pickle(False)
cdef class _RetryBudgetCore(_SlotsCore):
    """The C fields of a ``RetryBudget``: 32 time-slice slots, deposit and reserve in units."""

    cdef int64_t deposit, reserve
    cdef int shift, live

    def __cinit__(self):
        self.n_slots = 32

    def _lower(self, int64_t deposit, int64_t reserve, int shift, int live):
        if not 0 < shift < 63 or not 0 < live < 32:
            raise ValueError(f"slice shift {shift} or live slices {live} out of range")
        self.deposit = deposit
        self.reserve = reserve
        self.shift = shift
        self.live = live

    def _deposit(self):
        """Record one call (what every call of a retrying function does)."""
        _budget_deposit(self)

    def _withdraw(self):
        """Take one retry if the budget allows it; ``False``: refused, nothing taken."""
        return _budget_withdraw(self)

    def _available(self):
        """Retries the budget would allow now (a float: deposits are fractions of one)."""
        cdef int64_t slice = _budget_now(self) >> self.shift
        return (self.reserve + amz_budget_sum(self.slots, slice, self.live)) / <double>_BUDGET_UNIT


cdef inline int64_t _budget_now(_RetryBudgetCore b) except? -1:
    if b.clock is None:
        return amz_coarse_ns()
    return _budget_clock_ns(b.clock)


cdef inline int _budget_deposit(_RetryBudgetCore b) except -1:
    # On every call's success path: one coarse clock read and one compare-and-swap.
    if b.clock is None:
        amz_budget_add(b.slots, amz_coarse_ns() >> b.shift, b.deposit)
    else:
        amz_budget_add(b.slots, _budget_clock_ns(b.clock) >> b.shift, b.deposit)
    return 0


cdef bint _budget_withdraw(_RetryBudgetCore b) except -1:
    # Withdraw first, then look: two processes racing for the last retry cannot both get it
    # (one may be refused while the other refunds: a refusal too many, never a retry).
    cdef int64_t slice = _budget_now(b) >> b.shift
    amz_budget_add(b.slots, slice, -_BUDGET_UNIT)
    if b.reserve + amz_budget_sum(b.slots, slice, b.live) >= 0:
        return True
    amz_budget_add(b.slots, slice, _BUDGET_UNIT)
    return False
