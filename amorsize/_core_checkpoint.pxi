# Checkpoint: the item hashes of a block of input items, packed for the batch row.
#
# Why this is compiled. A checkpointed run hashes every input item in the parent, before the
# item runs (a function may mutate its argument), and on two cores that time is taken from
# the workers. Plain ints are the usual items (ids, indices); in Python their hash rule and
# the packing into bytes cost about 140 ns per item, here a few nanoseconds
# (measured by benchmarks/bench_checkpoint.py, ``store`` rows). Other items are handed to
# ``hash_other`` (``checkpoint.item_hash``: pickle + CRC), whose cost is the pickle's anyway.
#
# The rule must stay the one ``checkpoint.item_hash`` applies (tests compare the two): an
# exact int in [-2**30, 2**30) hashes to ``(x + 2**30) * 2 + 1``; 0 marks an item that has
# no hash (``hash_other`` returned None: it does not pickle).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize


cdef extern from "Python.h":
    bint PyLong_CheckExact(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1


cdef long long _HASH_INT_LIMIT = 1LL << 30


def pack_item_hashes(items, object hash_other):
    """``(blob, missing)``: the items' 64-bit hashes as little-endian uint64, and how many
    are 0 because ``hash_other`` returned None for them."""
    # A snapshot: hash_other runs Python code (an item's __reduce__) that could resize a list
    # under the loop; a tuple cannot change.
    cdef tuple snapshot = tuple(items)
    cdef Py_ssize_t n = len(snapshot)
    cdef Py_ssize_t k, missing = 0
    cdef int overflow, b
    cdef long long v
    cdef unsigned long long h
    blob = PyBytes_FromStringAndSize(NULL, n * 8)
    cdef unsigned char* out = <unsigned char*> PyBytes_AS_STRING(blob)
    for k in range(n):
        x = snapshot[k]
        h = 0
        if PyLong_CheckExact(x):
            v = PyLong_AsLongLongAndOverflow(x, &overflow)
            if not overflow and -_HASH_INT_LIMIT <= v < _HASH_INT_LIMIT:
                h = <unsigned long long> ((v + _HASH_INT_LIMIT) * 2 + 1)
        if h == 0:
            other = hash_other(x)
            if other is None:
                missing += 1
            else:
                h = other
        # Explicit little-endian bytes: the file format is the same on every machine.
        for b in range(8):
            out[k * 8 + b] = <unsigned char> (h >> (8 * b))
    return blob, missing
