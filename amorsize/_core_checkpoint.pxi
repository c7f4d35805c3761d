# Checkpoint: keyed 64-bit item hashes, one item or a block packed for the batch row.
#
# Why this is compiled. A checkpointed run hashes every input item in the parent, before the
# item runs (a function may mutate its argument), and on two cores that time is taken from
# the workers. Plain ints are the usual items (ids, indices); here an int costs one
# SipHash-2-4 of its 8 bytes, ~15 ns, where the same in Python costs microseconds
# (measured by benchmarks/bench_checkpoint.py, ``store`` rows). Other items are handed to
# ``hash_other`` (pickle + keyed BLAKE2b, in ``checkpoint.py``), whose cost is the pickle's.
#
# Why keyed. Someone who controls the input items but cannot read the checkpoint file must not
# be able to make two different items hash alike (a linear hash such as CRC + Adler can be
# collided in milliseconds, and a collision makes resume return the old item's result). Each
# file holds its own random 128-bit key; SipHash-2-4 (Aumasson & Bernstein, "SipHash: a fast
# short-input PRF", 2012) is a PRF under that key, written here from the paper.
#
# The rule, stated and applied here only (``checkpoint.item_hash`` and the checkpoint's
# observer call this class; tests check SipHash against a reference written from the paper):
#
# * an exact int in the int64 range hashes to ``siphash24(key, its 8 little-endian
#   two's-complement bytes) | 1``: odd;
# * anything else to the 64-bit ``hash_other(item)`` with its low bit cleared: even, and 2
#   where that would be 0;
# * 0 marks an item that has no hash (``hash_other`` returned None: it does not pickle).
#
# Odd and even keep the two families apart: no int can hash like a non-int item.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t


cdef inline uint64_t _ckpt_rotl(uint64_t x, int b) noexcept nogil:
    return (x << b) | (x >> (64 - b))


cdef inline void _ckpt_sip_rounds(uint64_t* v, int n) noexcept nogil:
    """``n`` SipRounds on the state ``v[0..3]`` (inlined: the state stays in registers)."""
    cdef int r
    for r in range(n):
        v[0] += v[1]
        v[1] = _ckpt_rotl(v[1], 13)
        v[1] ^= v[0]
        v[0] = _ckpt_rotl(v[0], 32)
        v[2] += v[3]
        v[3] = _ckpt_rotl(v[3], 16)
        v[3] ^= v[2]
        v[0] += v[3]
        v[3] = _ckpt_rotl(v[3], 21)
        v[3] ^= v[0]
        v[2] += v[1]
        v[1] = _ckpt_rotl(v[1], 17)
        v[1] ^= v[2]
        v[2] = _ckpt_rotl(v[2], 32)


cdef inline uint64_t _ckpt_siphash24_word(uint64_t k0, uint64_t k1, uint64_t m) noexcept nogil:
    """SipHash-2-4 of one 8-byte message whose little-endian value is ``m``."""
    cdef uint64_t v[4]
    v[0] = k0 ^ 0x736F6D6570736575ULL
    v[1] = k1 ^ 0x646F72616E646F6DULL
    v[2] = k0 ^ 0x6C7967656E657261ULL
    v[3] = k1 ^ 0x7465646279746573ULL
    # The final block of an 8-byte message holds only its length, in the top byte.
    cdef uint64_t last = (<uint64_t> 8) << 56
    v[3] ^= m
    _ckpt_sip_rounds(v, 2)  # c = 2 compression rounds per block
    v[0] ^= m
    v[3] ^= last
    _ckpt_sip_rounds(v, 2)
    v[0] ^= last
    v[2] ^= 0xFF
    _ckpt_sip_rounds(v, 4)  # d = 4 finalization rounds
    return v[0] ^ v[1] ^ v[2] ^ v[3]


cdef inline uint64_t _ckpt_le64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int b
    for b in range(8):
        v |= (<uint64_t> p[b]) << (8 * b)
    return v


def siphash24_int64(bytes key, long long value):
    """SipHash-2-4 under the 16-byte ``key`` of ``value``'s 8 little-endian bytes (for tests)."""
    if len(key) != 16:
        raise ValueError(f"a SipHash key has 16 bytes, got {len(key)}")
    cdef const unsigned char* k = <const unsigned char*> PyBytes_AS_STRING(key)
    return _ckpt_siphash24_word(_ckpt_le64(k), _ckpt_le64(k + 8), <uint64_t> value)


cdef class ItemHasher:
    """The keyed hash of input items for one checkpoint file (the rule above).

    ``hash_other(item)`` is a keyed 64-bit hash of any item that is not an int64 (an int
    in ``[0, 2**64)``), or None when the item has none. ``hasher(item)`` is the item's
    hash (None when it has none); ``hasher.pack(items)`` is ``(blob, missing)``: the items'
    hashes as little-endian uint64, 0 for the ``missing`` items that have none.
    """

    cdef uint64_t k0, k1
    cdef object hash_other

    def __init__(self, bytes key, object hash_other):
        if len(key) != 16:
            raise ValueError(f"an item-hash key has 16 bytes, got {len(key)}")
        cdef const unsigned char* k = <const unsigned char*> PyBytes_AS_STRING(key)
        self.k0 = _ckpt_le64(k)
        self.k1 = _ckpt_le64(k + 8)
        self.hash_other = hash_other

    cdef inline uint64_t _hash(self, object item) except? 0:
        # The rule above; 0 (no error set) for an item that has no hash.
        cdef int overflow = 0
        cdef long long v
        cdef uint64_t h
        if PyLong_CheckExact(item):
            v = PyLong_AsLongLongAndOverflow(item, &overflow)
            if not overflow:
                return _ckpt_siphash24_word(self.k0, self.k1, <uint64_t> v) | 1
        other = self.hash_other(item)
        if other is None:
            return 0
        h = (<uint64_t> other) & ~(<uint64_t> 1)
        return h if h != 0 else 2

    def __call__(self, item):
        cdef uint64_t h = self._hash(item)
        return h if h != 0 else None

    def pack(self, items):
        # A snapshot: hash_other runs Python code (an item's __reduce__) that could resize a
        # list under the loop; a tuple cannot change.
        cdef tuple snapshot = tuple(items)
        cdef Py_ssize_t n = len(snapshot)
        cdef Py_ssize_t k, missing = 0
        cdef int b
        cdef uint64_t h
        blob = PyBytes_FromStringAndSize(NULL, n * 8)
        cdef unsigned char* out = <unsigned char*> PyBytes_AS_STRING(blob)
        for k in range(n):
            h = self._hash(snapshot[k])
            if h == 0:
                missing += 1
            # Explicit little-endian bytes: the file format is the same on every machine.
            for b in range(8):
                out[k * 8 + b] = <unsigned char> (h >> (8 * b))
        return blob, missing
