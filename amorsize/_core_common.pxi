# Shared by the include files: the CPython API they call, declared once under its own C
# names, and the C helpers both call paths need (retry's and the circuit breaker's).
#
# Why these helpers exist. A wrapper that sits on every call of a user's function must
# (a) be called through vectorcall, so that no argument tuple or dict is built, and
# (b) on failure, take the exception out of the thread state, run Python code (a callback,
# a retry decision) and raise the same exception again, without a Cython ``except`` clause,
# which would record a frame of this module in the user's traceback.

from cpython.object cimport PyObject

import sys as _sys
from types import MethodType as _MethodType

cdef extern from "Python.h":
    ctypedef PyObject* (*vectorcallfunc)(
        PyObject* callable, PyObject* const* args, size_t nargsf, PyObject* kwnames)
    PyObject* PyObject_Vectorcall(
        PyObject* callable, PyObject* const* args, size_t nargsf, PyObject* kwnames)
    PyObject* PyObject_Call(PyObject* callable, PyObject* args, PyObject* kwargs)
    Py_ssize_t PyVectorcall_NARGS(size_t nargsf)
    bint PyLong_Check(object o)
    bint PyLong_CheckExact(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1
    PyObject* PyLong_FromLongLong(long long v)
    long long PyLong_AsLongLong(PyObject* v)
    bint PyCoro_CheckExact(object o)
    int PyIter_Send(object iter, object arg, PyObject** presult)
    tuple PyTuple_New(Py_ssize_t n)
    void PyTuple_SET_ITEM(tuple t, Py_ssize_t i, object o)
    void Py_INCREF(object o)
    void Py_DECREF(object o)
    void Py_XDECREF(PyObject* o)
    PyObject* PyErr_Occurred()
    void PyErr_WriteUnraisable(PyObject* obj)
    int PyErr_ExceptionMatches(PyObject* exc)
    PyObject* PyExc_Exception
    PyObject* PyIter_Next(PyObject* o)
    int PyList_Append(PyObject* lst, PyObject* item)
    Py_ssize_t PyList_GET_SIZE(object lst)
    size_t PY_VECTORCALL_ARGUMENTS_OFFSET

cdef extern from *:
    """
    /* The exception being raised, taken out of the thread state (new reference, with its
       traceback attached), or NULL when none is. */
    static PyObject *amz_fetch_exception(void) {
    #if PY_VERSION_HEX >= 0x030C0000
        return PyErr_GetRaisedException();
    #else
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        if (t == NULL) return NULL;
        PyErr_NormalizeException(&t, &v, &tb);
        if (tb != NULL) {
            PyException_SetTraceback(v, tb);
            Py_DECREF(tb);
        }
        Py_DECREF(t);
        return v;
    #endif
    }
    /* Raise `exc` again, unchanged (its own traceback continues); always returns -1. */
    static int amz_reraise(PyObject *exc) {
    #if PY_VERSION_HEX >= 0x030C0000
        Py_INCREF(exc);
        PyErr_SetRaisedException(exc);
    #else
        PyObject *tb = PyException_GetTraceback(exc);
        Py_INCREF(Py_TYPE(exc));
        Py_INCREF(exc);
        PyErr_Restore((PyObject *)Py_TYPE(exc), exc, tb);
    #endif
        return -1;
    }
    /* Cython has no syntax for vectorcall on a cdef class, so the slot is set by hand once
       at import: each instance stores its entry point at `offset`. */
    static int amz_enable_vectorcall(PyObject *type, Py_ssize_t offset) {
        PyTypeObject *tp = (PyTypeObject *)type;
        tp->tp_vectorcall_offset = offset;
        tp->tp_call = PyVectorcall_Call;
        tp->tp_flags |= Py_TPFLAGS_HAVE_VECTORCALL;
        PyType_Modified(tp);
        return 0;
    }
    """
    PyObject* amz_fetch_exception()
    int amz_reraise(PyObject* exc)
    int amz_enable_vectorcall(object tp, Py_ssize_t offset) except -1


cdef inline object _steal(PyObject* r):
    # Turn a new reference returned by the C API into an object without another INCREF.
    result = <object>r
    Py_DECREF(result)
    return result


cdef inline object _fetch_exception():
    # For code that handles objects; code that returns raw pointers calls amz_fetch_exception.
    cdef PyObject* exc = amz_fetch_exception()
    return None if exc == NULL else _steal(exc)


cdef inline int _reraise(object exc) except -1:
    # Returning the error value with the exception set adds no frame here; the caller's
    # error path then propagates it like any other.
    return amz_reraise(<PyObject*>exc)


cdef bint _importable_as(object obj, object module_name, object qualname):
    """Whether ``obj`` is what ``module_name.qualname`` names (so it pickles by reference).

    Wrappers of user functions pickle like the function they replaced when that holds (a
    decorated module-level function or method), and by value otherwise.
    """
    found = _sys.modules.get(module_name) if isinstance(module_name, str) else None
    if found is None or not isinstance(qualname, str) or not qualname:
        return False
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj
