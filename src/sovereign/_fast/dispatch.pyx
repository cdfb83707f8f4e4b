"""Compiled envelope dispatch and token bucket. Twin: ``sovereign.protocol.dispatch``.

Same API, verdicts and arithmetic as the twin (see its docstrings). The decoder is
called at C level (cimported from envelope.pxd); handlers sit in a C array by type.
"""

import operator

from cpython.ref cimport PyObject
from libc.math cimport ceil

from sovereign._fast.envelope cimport (
    ENV_BAD_UTF8,
    ENV_OK,
    ENV_RID_TOO_LONG,
    EnvelopeView,
    acquire_bytes,
    parse_envelope,
    payload_slice,
    release_bytes,
)
from cpython.unicode cimport PyUnicode_DecodeUTF8

__all__ = ["MAX_TYPES", "Dispatcher", "TokenBucket"]

MAX_TYPES = _N_TYPES  # declared in dispatch.pxd
cdef double _MAX_RETRY_MS = 4294967295.0  # Error.retry_after_ms is a uint32

# Error codes (SPEC §8).
cdef enum:
    _AUTH_REQUIRED = 1006
    _UNKNOWN_TYPE = 3002
    _TOO_LARGE = 3003
    _RATE_LIMITED = 3004
    _INVALID_ENVELOPE = 3005


cdef tuple _check_bucket(rate_per_s, burst):
    cdef double rate = float(rate_per_s)
    if not (0.0 < rate < float("inf")):
        raise ValueError("rate_per_s must be a positive finite number")
    b = operator.index(burst)
    if b < 1:
        raise ValueError("burst must be at least 1")
    return rate, float(b)


cdef class TokenBucket:
    """Per-connection token bucket (SPEC §9). 32 bytes of state, no GC tracking.

    Attributes and ``_take`` are declared in dispatch.pxd.
    """

    def __init__(self, rate_per_s, burst, double now):
        self._rate, self._burst = _check_bucket(rate_per_s, burst)
        self._tokens = self._burst
        self._last = now

    cdef unsigned int _take(self, double now) noexcept:
        # Operation for operation the twin's arithmetic, so results are bit-identical.
        cdef double elapsed = now - self._last
        cdef double tokens, wait, ms
        if elapsed > 0.0:
            tokens = self._tokens + elapsed * self._rate
            if tokens > self._burst:
                tokens = self._burst
            self._tokens = tokens
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0
        wait = (1.0 - self._tokens) / self._rate * 1000.0
        if wait >= _MAX_RETRY_MS:
            return <unsigned int>_MAX_RETRY_MS
        ms = ceil(wait)
        return <unsigned int>ms if ms >= 1.0 else 1

    def take(self, double now):
        """Consume one token: 0 if one was available, else the ms until one is (>= 1)."""
        return self._take(now)

    def reconfigure(self, rate_per_s, burst):
        """Apply new settings; tokens above the new burst are dropped."""
        self._rate, self._burst = _check_bucket(rate_per_s, burst)
        if self._tokens > self._burst:
            self._tokens = self._burst

    @property
    def rate_per_s(self):
        return self._rate

    @property
    def burst(self):
        return int(self._burst)

    @property
    def tokens(self):
        return self._tokens


cdef int _type_key(value, str what) except -1:
    t = operator.index(value)
    if not 0 <= t < _N_TYPES:
        raise ValueError(f"{what} {t} is outside 0..{_N_TYPES - 1}")
    return t


cdef Py_ssize_t _check_size(value, str what) except -1:
    n = operator.index(value)
    if n < 0:
        raise ValueError(f"{what} must be >= 0")
    return n


cdef object _decode_utf8(const unsigned char* s, Py_ssize_t n):
    try:
        return PyUnicode_DecodeUTF8(<char*>s, n, NULL)
    except UnicodeDecodeError:
        return None


cdef class Dispatcher:
    """Routes one received Envelope to its handler, or reports why it cannot.

    Attributes are declared in dispatch.pxd.
    """

    def __init__(
        self, handlers, pre_auth_types, max_envelope_bytes, max_request_id_bytes=64
    ):
        cdef int i, t
        table = [None] * _N_TYPES
        for key, handler in handlers.items():
            if handler is not None:
                table[_type_key(key, "handler type")] = handler
        pre_auth = [_type_key(x, "pre-auth type") for x in pre_auth_types]
        self._max_envelope_bytes = _check_size(max_envelope_bytes, "max_envelope_bytes")
        self._max_request_id_bytes = _check_size(max_request_id_bytes, "max_request_id_bytes")
        self._table = tuple(table)
        for i in range(_N_TYPES):
            self._handlers[i] = NULL if self._table[i] is None else <PyObject*>self._table[i]
            self._pre_auth[i] = 0
        for t in pre_auth:
            self._pre_auth[t] = 1

    def set_max_envelope_bytes(self, n):
        self._max_envelope_bytes = _check_size(n, "max_envelope_bytes")

    @property
    def max_envelope_bytes(self):
        return self._max_envelope_bytes

    @property
    def max_request_id_bytes(self):
        return self._max_request_id_bytes

    def dispatch(self, conn, TokenBucket bucket not None, buf, bint ready, double now):
        """Handle one Envelope; returns 0 if a handler ran, else the rejection code."""
        cdef Py_buffer view
        cdef EnvelopeView v
        cdef int st, code
        cdef unsigned int retry
        cdef const unsigned char* p
        cdef object rid = ""
        cdef object payload
        cdef object handler
        cdef PyObject* entry
        cdef int acquired = acquire_bytes(buf, &view)
        try:
            # a. Size (SPEC §1: 3003, non-fatal; before READY anything odd is 1006, §12.7).
            if view.len > self._max_envelope_bytes:
                code = _TOO_LARGE if ready else _AUTH_REQUIRED
                conn.reject(code, "", 0)
                return code
            # b. Parse, request_id <= 64 bytes (SPEC §2: 3005; §12.8: empty request_id).
            p = <const unsigned char*>view.buf
            st = parse_envelope(p, view.len, &v)
            if st == ENV_OK and v.rid_len > 0:
                if v.rid_len > self._max_request_id_bytes:
                    st = ENV_RID_TOO_LONG
                else:
                    rid = _decode_utf8(p + v.rid_off, v.rid_len)
                    if rid is None:
                        st = ENV_BAD_UTF8
            if st != ENV_OK:
                code = _INVALID_ENVELOPE if ready else _AUTH_REQUIRED
                conn.reject(code, "", 0)
                return code
            # c. Before READY only the pre-auth types (SPEC §4, §12.7).
            if not ready and not (0 <= v.msg_type < _N_TYPES and self._pre_auth[v.msg_type]):
                conn.reject(_AUTH_REQUIRED, rid, 0)
                return _AUTH_REQUIRED
            # d. Rate limit (SPEC §9: 3004 with retry_after_ms).
            retry = bucket._take(now)
            if retry:
                conn.reject(_RATE_LIMITED, rid, retry)
                return _RATE_LIMITED
            # e. Unknown type (SPEC §2: 3002).
            entry = self._handlers[v.msg_type] if 0 <= v.msg_type < _N_TYPES else NULL
            if entry == NULL:
                conn.reject(_UNKNOWN_TYPE, rid, 0)
                return _UNKNOWN_TYPE
            handler = <object>entry
            payload = payload_slice(buf, v.pay_off, v.pay_len)
        finally:
            release_bytes(&view, acquired)
        # f. Run it (the payload view holds its own export); exceptions propagate.
        handler(conn, v.msg_type, rid, payload)
        return 0
