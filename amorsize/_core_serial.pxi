# The serial fast path's per-item loop: what runs a serial plan that nobody watches item by
# item (no observers, no progress bar, no checkpoint; see executor._run_serial_fast).
#
# Why compiled. On 0.1 us items the loop is the whole run. A Python generator between the
# caller and ``func`` (execute_iter's, before) cost ~15-20 % over a generator expression;
# ``SerialStream``/``SerialMap`` hand items out from C slots at the expression's speed.
# ``serial_extend`` (execute in collect mode, or on an iterator) is about as fast as a
# guarded Python loop, ~5 % over ``[f(x) for x in data]`` (a Python function called from C
# pays a frame entry that the comprehension's inline call does not), and no ``try`` runs
# per item: the NULL result is the only check. Where the first failure ends the run,
# execute uses a list comprehension instead (executor._listed). What a failure means (its
# slot, or raised) stays the executor's policy: the ``on_failure(index, item, exc)``
# callback it hands in.
#
#   execute:       serial_extend(func, it, values, start, on_failure) -> failures
#   execute_iter:  SerialStream(parts) ── a list ──▶ its items
#                                      └─ SerialMap(func, it, ...) ──▶ func(x) per item
#
# The stream runs a SerialMap part's loop itself (``_pull``): going through the map's own
# iterator slot, one more C hop per item, cost ~7 % on 0.1 us items (bench_serial.py).

cimport cython


cdef int _serial_raise() except -1:
    # The exception is set already: the error value makes Cython propagate it.
    return -1


cdef object _serial_failed(object on_failure, Py_ssize_t index, object item):
    # func raised: an Exception is the item's failure (the policy's value, or raised by
    # on_failure); anything else (KeyboardInterrupt, SystemExit) ends the run as it is.
    if not PyErr_ExceptionMatches(PyExc_Exception):
        _serial_raise()
    exc = _fetch_exception()
    return on_failure(index, item, exc)


def serial_extend(
    object func, object it, list values, Py_ssize_t start, object on_failure
) -> int:
    """Append ``func(x)`` for each ``x`` of the iterator ``it`` to ``values``, where
    ``values[k]`` is input ``start + k``; a failure of ``func`` takes its slot with
    ``on_failure(index, x, exc)``'s value (which may raise instead). An error of the
    iterator itself propagates. Returns the number of failures."""
    cdef PyObject* item
    cdef PyObject* r
    cdef PyObject* args[2]
    cdef Py_ssize_t failures = 0
    cdef PyObject* f = <PyObject*>func
    cdef PyObject* source = <PyObject*>it
    args[0] = NULL
    while True:
        item = PyIter_Next(source)
        if item == NULL:
            if PyErr_Occurred() != NULL:
                _serial_raise()
            return failures
        args[1] = item
        r = PyObject_Vectorcall(f, &args[1], 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL)
        if r == NULL:
            x = _steal(item)
            value = _serial_failed(on_failure, start + PyList_GET_SIZE(values), x)
            failures += 1
            values.append(value)
            continue
        Py_XDECREF(item)
        if PyList_Append(<PyObject*>values, r) < 0:
            Py_XDECREF(r)
            _serial_raise()
        Py_XDECREF(r)


@cython.final
@cython.auto_pickle(False)
cdef class SerialMap:
    """``func(x)`` for each ``x`` of the iterator ``it``, as an iterator: input ``start``
    comes first; a failure of ``func`` yields ``on_failure(index, x, exc)``'s value (which
    may raise instead). With ``pairs``, yields ``(index, value)``. ``count`` is the number of
    items taken from ``it`` so far."""

    cdef object func
    cdef object it
    cdef object on_failure
    cdef Py_ssize_t start
    cdef bint pairs
    cdef readonly Py_ssize_t count

    def __init__(
        self, object func, object it, Py_ssize_t start, object on_failure, bint pairs=False
    ) -> None:
        self.func = func
        self.it = it
        self.start = start
        self.on_failure = on_failure
        self.pairs = pairs
        self.count = 0

    def __iter__(self) -> SerialMap:
        return self

    def __next__(self) -> object:
        cdef PyObject* args[2]
        cdef PyObject* item = PyIter_Next(<PyObject*>self.it)
        cdef PyObject* r
        if item == NULL:
            if PyErr_Occurred() != NULL:
                _serial_raise()
            raise StopIteration
        cdef Py_ssize_t index = self.start + self.count
        self.count += 1
        args[0] = NULL
        args[1] = item
        r = PyObject_Vectorcall(
            <PyObject*>self.func, &args[1], 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL
        )
        if r == NULL:
            value = _serial_failed(self.on_failure, index, _steal(item))
        else:
            Py_XDECREF(item)
            value = _steal(r)
        return (index, value) if self.pairs else value


@cython.final
@cython.auto_pickle(False)
cdef class SerialStream:
    """The items of each iterable that ``parts`` (a generator) yields, in turn, with the
    generator's ``close``. An error from a part closes ``parts`` before it propagates, as
    a generator ends when it raises: the run finishes then, and the stream is spent."""

    cdef object parts
    cdef object current
    cdef SerialMap rest  # a part that is a SerialMap: its loop runs here

    def __init__(self, object parts) -> None:
        self.parts = parts
        self.current = None
        self.rest = None

    def __iter__(self) -> SerialStream:
        return self

    def __next__(self) -> object:
        cdef PyObject* r
        while True:
            if self.rest is not None:
                r = self._pull()
                if r != NULL:
                    return _steal(r)
                self.rest = None
                if PyErr_Occurred() != NULL:
                    self._fail()
            elif self.current is not None:
                r = PyIter_Next(<PyObject*>self.current)
                if r != NULL:
                    return _steal(r)
                self.current = None
                if PyErr_Occurred() != NULL:
                    self._fail()
            part = next(self.parts)
            if type(part) is SerialMap:
                self.rest = <SerialMap>part
            else:
                self.current = iter(part)

    cdef inline PyObject* _pull(self) noexcept:
        # SerialMap.__next__'s success path, without its iterator slot: a new reference, or
        # NULL at the end of the input or with an error set (the failure path may set one).
        cdef SerialMap m = self.rest
        cdef PyObject* args[2]
        cdef PyObject* r
        cdef PyObject* item = PyIter_Next(<PyObject*>m.it)
        if item == NULL:
            return NULL
        args[0] = NULL
        args[1] = item
        r = PyObject_Vectorcall(
            <PyObject*>m.func, &args[1], 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL
        )
        m.count += 1
        if r != NULL and not m.pairs:
            Py_XDECREF(item)
            return r
        return _serial_pair_or_failure(m, m.start + m.count - 1, item, r)

    cdef int _fail(self) except -1:
        # A part raised: the run ends as a generator that raises (parts closed first).
        exc = _fetch_exception()
        self.rest = None
        self.current = None
        self.parts.close()
        _reraise(exc)

    def close(self) -> None:
        """Stop: the run finishes as a closed generator does."""
        self.current = None
        self.rest = None
        self.parts.close()


cdef PyObject* _serial_pair_or_failure(
    SerialMap m, Py_ssize_t index, PyObject* item, PyObject* r
) noexcept:
    # SerialStream._pull's rarer outcomes: ``(index, value)`` for a map of pairs, or the
    # failure's value (``r`` NULL: func raised). A new reference, or NULL with an error set.
    try:
        if r == NULL:
            value = _serial_failed(m.on_failure, index, _steal(item))
        else:
            Py_XDECREF(item)
            value = _steal(r)
        out = (index, value) if m.pairs else value
    except BaseException as exc:
        amz_reraise(<PyObject*>exc)  # set again: the stream sees NULL with it set
        return NULL
    Py_INCREF(out)
    return <PyObject*>out
