# Circuit breaker: the counters and the guarded call path.
#
# What lives here and why. A closed breaker is the common case, so its whole cost is the
# state check before the call and the counter update after it: that must stay within a few
# tens of nanoseconds. Everything rare (opening, the half-open probes, callbacks, errors)
# lives in ``amorsize/circuit.py`` behind a lock.
#
# Why the closed success path takes no lock. The counters below are C fields of one object
# and every read-modify-write of them below is plain C that makes no Python call, so under
# the GIL no other thread can run in the middle of one (the interpreter only switches
# threads between bytecodes or inside calls that release the GIL). Transitions are made by
# ``circuit.py`` under its lock and bump ``generation``; a call admitted in an older
# generation (for example, one that was in flight while another thread tripped the breaker)
# records nothing, so a late success cannot reset the counts of a breaker that has moved on.
# Free-threaded CPython builds (no GIL) are not supported by this module.
#
# The guarded wrapper implements the vectorcall protocol itself: a ``def __call__`` would
# pack ``*args``/``**kwargs`` into a tuple and a dict on every call (about 60 ns here),
# while vectorcall forwards the caller's argument array untouched.

from libc.stdlib cimport calloc, free
from libc.string cimport memset


# State codes, shared with circuit.py (CircuitState values).
cdef enum:
    _CIRCUIT_CLOSED = 0
    _CIRCUIT_OPEN = 1
    _CIRCUIT_HALF_OPEN = 2

CIRCUIT_CLOSED = _CIRCUIT_CLOSED
CIRCUIT_OPEN = _CIRCUIT_OPEN
CIRCUIT_HALF_OPEN = _CIRCUIT_HALF_OPEN


cdef class CircuitCore:
    """A breaker's state and counters, as C fields (no validation: ``circuit.py`` does it).

    ``failure_rate < 0`` selects the consecutive rule (trip at ``failure_threshold``
    consecutive failures); otherwise the last ``window`` outcomes are kept in a ring buffer
    and the rule is ``failures >= failure_rate * calls`` once ``calls >= minimum_calls``.

    >>> core = CircuitCore(2, -1.0, 1, 1)
    >>> core.record_failure(core.generation), core.record_failure(core.generation)
    (False, True)
    """

    cdef readonly int state
    cdef readonly long long generation
    cdef readonly long long consecutive_failures
    cdef readonly long long failure_threshold
    cdef readonly double failure_rate
    cdef readonly long long minimum_calls
    cdef readonly long long window
    cdef readonly long long window_calls
    cdef readonly long long window_failures
    cdef readonly long long total_successes
    cdef readonly long long total_failures
    cdef long long _pos
    cdef unsigned char* _ring

    def __cinit__(self, long long failure_threshold, double failure_rate,
                  long long window, long long minimum_calls):
        self.failure_threshold = failure_threshold
        self.failure_rate = failure_rate
        self.minimum_calls = minimum_calls
        self.window = window if window > 0 else 1
        self._ring = <unsigned char*>calloc(<size_t>self.window, 1)
        if self._ring == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._ring)

    cdef inline void _push(self, unsigned char failed) noexcept:
        if self.window_calls == self.window:
            self.window_failures -= self._ring[self._pos]
        else:
            self.window_calls += 1
        self._ring[self._pos] = failed
        self.window_failures += failed
        self._pos += 1
        if self._pos == self.window:
            self._pos = 0

    cpdef void record_success(self, long long generation) noexcept:
        """Count a success of a call admitted in ``generation`` (ignored if stale or not closed)."""
        self.total_successes += 1
        if self.state != _CIRCUIT_CLOSED or generation != self.generation:
            return
        self.consecutive_failures = 0
        if self.failure_rate >= 0.0:
            self._push(0)

    cpdef bint record_failure(self, long long generation) noexcept:
        """Count a failure; True when the closed breaker's trip rule is now met."""
        self.total_failures += 1
        if self.state != _CIRCUIT_CLOSED or generation != self.generation:
            return False
        self.consecutive_failures += 1
        if self.failure_rate < 0.0:
            return self.consecutive_failures >= self.failure_threshold
        self._push(1)
        return (self.window_calls >= self.minimum_calls
                and self.window_failures >= self.failure_rate * self.window_calls)

    cpdef long long transition(self, int state) noexcept:
        """Enter ``state`` with fresh counts; returns the new generation."""
        self.state = state
        self.generation += 1
        self.consecutive_failures = 0
        self.window_calls = 0
        self.window_failures = 0
        self._pos = 0
        memset(self._ring, 0, <size_t>self.window)
        return self.generation


cdef class CircuitGuarded:
    """A function guarded by a breaker; built by ``CircuitBreaker.__call__``.

    Closed: the call goes straight through and its outcome updates the C counters (a failure
    also calls ``breaker._closed_failure`` to decide whether to open). Open or half-open:
    ``breaker._admit()`` decides (raising ``CircuitOpenError`` or admitting a probe) and
    ``breaker._settle(token, exc)`` records the outcome.
    """

    cdef vectorcallfunc _vectorcall
    cdef readonly object func
    cdef CircuitCore core
    cdef readonly object circuit_breaker
    cdef object _admit
    cdef object _settle
    cdef dict __dict__
    cdef object __weakref__

    def __init__(self, func, CircuitCore core, breaker):
        self.func = func
        self.core = core
        self.circuit_breaker = breaker
        self._admit = breaker._admit
        self._settle = breaker._settle
        self._vectorcall = _circuit_vectorcall

    def __get__(self, instance, owner):
        # Decorated methods bind like plain functions.
        if instance is None:
            return self
        return _MethodType(self, instance)

    def __reduce__(self):
        # By reference when this object is what its module holds under its name (a decorated
        # module-level function or method), like the function it replaced. Otherwise (a
        # lambda, a closure) by value: the function and the breaker, which arrives in the
        # other process as a fresh breaker with the same policy and name.
        qualname = getattr(self, "__qualname__", "")
        if _importable_as(self, getattr(self, "__module__", ""), qualname):
            return qualname
        return (type(self.circuit_breaker)._reguard, (self.circuit_breaker, self.func))

    def __repr__(self):
        return (f"<circuit-guarded {getattr(self.func, '__qualname__', self.func)!r}"
                f" ({self.circuit_breaker!r})>")


cdef inline void _circuit_settle(CircuitGuarded self, long long token, PyObject* exc) noexcept:
    # Hand an outcome to ``breaker._settle(token, exc)``. It does not raise by design (it
    # logs callback errors); should it fail anyway, the error is reported as unraisable so
    # that the guarded call's own outcome is what the caller sees.
    cdef PyObject* argv[2]
    cdef PyObject* r
    argv[0] = PyLong_FromLongLong(token)
    if argv[0] == NULL:
        PyErr_WriteUnraisable(<PyObject*>self)
        return
    argv[1] = exc if exc != NULL else <PyObject*>None
    r = PyObject_Vectorcall(<PyObject*>self._settle, argv, 2, NULL)
    Py_XDECREF(argv[0])
    if r == NULL:
        PyErr_WriteUnraisable(<PyObject*>self)
    else:
        Py_XDECREF(r)


cdef PyObject* _circuit_call(CircuitGuarded self, long long token, PyObject* const* args,
                             size_t nargsf, PyObject* kwnames) noexcept:
    # One guarded call: ``token`` is the admission (generation << 1 | is_probe).
    cdef PyObject* result = PyObject_Vectorcall(<PyObject*>self.func, args, nargsf, kwnames)
    cdef PyObject* exc
    if result != NULL:
        if token & 1 == 0:
            self.core.record_success(token >> 1)
        else:
            _circuit_settle(self, token, NULL)
        return result
    exc = amz_fetch_exception()
    _circuit_settle(self, token, exc)
    amz_reraise(exc)
    Py_XDECREF(exc)
    return NULL


cdef PyObject* _circuit_vectorcall(PyObject* callable, PyObject* const* args, size_t nargsf,
                                   PyObject* kwnames) noexcept:
    cdef CircuitGuarded self = <CircuitGuarded>callable
    cdef long long token
    cdef PyObject* r
    if self.core.state == _CIRCUIT_CLOSED:
        return _circuit_call(self, self.core.generation << 1, args, nargsf, kwnames)
    # Open or half-open: the breaker decides under its lock (and may raise CircuitOpenError).
    r = PyObject_Vectorcall(<PyObject*>self._admit, NULL, 0, NULL)
    if r == NULL:
        return NULL
    token = PyLong_AsLongLong(r)
    Py_XDECREF(r)
    if token == -1 and PyErr_Occurred() != NULL:
        return NULL
    return _circuit_call(self, token, args, nargsf, kwnames)


cdef _circuit_enable_vectorcall():
    # Give CircuitGuarded the vectorcall slot before any instance exists; the offset of the
    # entry point is measured on a throwaway instance.
    cdef CircuitGuarded probe = CircuitGuarded.__new__(CircuitGuarded)
    amz_enable_vectorcall(CircuitGuarded, <char*>&probe._vectorcall - <char*><void*>probe)


_circuit_enable_vectorcall()
