# cython: language_level=3
"""The per-send part of the idempotency keys, compiled. Twin:
``sovereign.services.keyfilter`` (the documentation is there); the same state in the
same attributes, the same bits in the same filter arrays.

A key's three filter bits come from its Python ``hash`` (cached in its two strings),
as in the twin: bit ``i1 = h & mask``, then two steps of ``(h >> 32) | 1``. The twin
computes on Python ints, whose ``&`` and ``>>`` act as on a two's-complement 64-bit
``h``; here ``h`` is that signed 64-bit value and the sums wrap modulo 2^64, which the
mask (below 2^64) cannot tell apart.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.object cimport PyObject, PyObject_Hash
from libc.stdint cimport int64_t, uint64_t

from collections import OrderedDict


cdef class KeyFilter:
    cdef public Py_ssize_t recent_max
    cdef public object period_us
    cdef public Py_ssize_t gen_keys
    cdef public dict pending
    cdef public object recent
    cdef public Py_ssize_t _mask
    cdef public Py_ssize_t _bytes
    cdef public dict _periods
    cdef public list _filters
    cdef public object _newest_p
    cdef public bytearray _newest
    cdef public dict _counts
    cdef public dict _watching
    cdef public dict _committed
    cdef public bint fold
    cdef public dict unfolded
    cdef public object folding

    def __init__(self, recent_max, filter_bits, period_us, gen_keys):
        if filter_bits < 8 or filter_bits & (filter_bits - 1):
            raise ValueError("filter_bits must be a power of two >= 8")
        if recent_max < 0 or period_us <= 0 or gen_keys <= 0:
            raise ValueError("bad idempotency sizes")
        self.recent_max = recent_max
        self.period_us = period_us
        self.gen_keys = gen_keys
        self.pending = {}
        self.recent = OrderedDict()
        self._mask = filter_bits - 1
        self._bytes = filter_bits // 8
        self._periods = {}
        self._filters = []
        self._newest_p = None
        self._newest = bytearray()
        self._counts = {}
        self._watching = {}
        self._committed = {}
        self.fold = False
        self.unfolded = {}
        self.folding = None

    def maybe_stored(self, key):
        cdef int64_t h = PyObject_Hash(key)
        cdef uint64_t mask = <uint64_t>self._mask
        cdef uint64_t step = <uint64_t>((h >> 32) | 1)
        cdef uint64_t i1 = <uint64_t>h & mask
        cdef uint64_t i2 = (i1 + step) & mask
        cdef uint64_t i3 = (i2 + step) & mask
        cdef const unsigned char* b
        for bits in self._filters:
            b = <const unsigned char*>PyByteArray_AS_STRING(bits)
            if (
                (b[i1 >> 3] >> (i1 & 7)) & 1
                and (b[i2 >> 3] >> (i2 & 7)) & 1
                and (b[i3 >> 3] >> (i3 & 7)) & 1
            ):
                return True
        return False

    cdef inline void _set(self, key, ts_us) except *:
        p = ts_us // self.period_us
        counts = self._counts
        cdef PyObject* n = PyDict_GetItem(counts, p)
        PyDict_SetItem(counts, p, (<object>n + 1) if n is not NULL else 1)
        cdef bytearray bits
        if p == self._newest_p:
            bits = self._newest
        else:
            found = self._periods.get(p)
            bits = found if found else self._period(p)
        cdef int64_t h = PyObject_Hash(key)
        cdef uint64_t mask = <uint64_t>self._mask
        cdef uint64_t step = <uint64_t>((h >> 32) | 1)
        cdef uint64_t i = <uint64_t>h & mask
        cdef unsigned char* b = <unsigned char*>PyByteArray_AS_STRING(bits)
        b[i >> 3] |= <unsigned char>(1 << (i & 7))
        i = (i + step) & mask
        b[i >> 3] |= <unsigned char>(1 << (i & 7))
        i = (i + step) & mask
        b[i >> 3] |= <unsigned char>(1 << (i & 7))

    def add(self, key, ts_us):
        self._set(key, ts_us)

    def begin(self, key, op, ts_us):
        PyDict_SetItem(self.pending, key, op)
        self._set(key, ts_us)

    def undo(self, key):
        self.pending.pop(key, None)

    def committed(self, key, event_id):
        self.pending.pop(key, None)
        recent = self.recent
        recent[key] = event_id
        if len(recent) > self.recent_max:
            recent.popitem(last=False)
        if self._watching and key in self._watching:
            self._committed[key] = event_id
        if self.fold:
            unfolded = self.unfolded
            unfolded[key] = event_id
            return len(unfolded) >= self.gen_keys and self.folding is None
        return False

    def _period(self, p):
        periods = self._periods
        if periods and p < min(periods):
            return periods[min(periods)]
        bits = periods[p] = bytearray(self._bytes)
        self._filters_changed()
        return bits

    def _filters_changed(self):
        periods = self._periods
        self._filters = list(periods.values())
        if periods:
            self._newest_p = max(periods)
            self._newest = periods[self._newest_p]
        else:
            self._newest_p, self._newest = None, bytearray()
