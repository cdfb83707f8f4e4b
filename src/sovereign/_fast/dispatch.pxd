# C-level API of the compiled dispatcher and token bucket (SPEC §1, §2, §4, §9).
# Twin: sovereign.protocol.dispatch. A module that cimports this can take a token
# (TokenBucket._take) without a Python call.

from cpython.ref cimport PyObject

cdef enum:
    _N_TYPES = 128  # handler table size (types 0..127); Python sees it as MAX_TYPES


cdef class TokenBucket:
    cdef double _rate
    cdef double _burst
    cdef double _tokens
    cdef double _last

    # Consume one token at ``now``: 0 if one was available, else the ms until one is
    # (>= 1, capped at 2**32-1: Error.retry_after_ms is a uint32). Bit-identical to
    # the twin's take().
    cdef unsigned int _take(self, double now) noexcept


cdef class Dispatcher:
    cdef tuple _table                      # owns the handlers (and is GC-traversed)
    cdef PyObject* _handlers[_N_TYPES]     # borrowed from _table; NULL = no handler
    cdef unsigned char _pre_auth[_N_TYPES]  # 1 = accepted before READY (SPEC §12.7)
    cdef Py_ssize_t _max_envelope_bytes
    cdef Py_ssize_t _max_request_id_bytes
