"""Compiled Envelope codec (SPEC §2). Twin: ``sovereign.codec.envelope``.

Same API, results and error reasons as the twin; see its docstring for the decoding
rules (upb-compatible proto3, groups rejected).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_Check,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.memoryview cimport PyMemoryView_FromObject, PyMemoryView_GET_BUFFER
from cpython.number cimport PyNumber_Index
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM

cdef bytes _EMPTY = b""


# ---------------------------------------------------------------- decoding

cdef inline int _read_varint(
    const unsigned char* p, Py_ssize_t n, Py_ssize_t* pos, int limit, int too_long,
    uint64_t* out,
) noexcept nogil:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef int count = 0
    cdef Py_ssize_t i = pos[0]
    cdef unsigned char b
    while True:
        if i >= n:
            return ENV_TRUNCATED_VARINT
        b = p[i]
        i += 1
        result |= (<uint64_t>(b & 0x7F)) << shift  # shift <= 63 (limit <= 10)
        if b < 0x80:
            out[0] = result
            pos[0] = i
            return ENV_OK
        count += 1
        shift += 7
        if count == limit:
            return too_long


cdef inline bint _cont(unsigned char c) noexcept nogil:
    return (c & 0xC0) == 0x80


cdef bint _utf8_valid(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8 as Python's decoder (no overlongs, surrogates, > U+10FFFF)."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, c1
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
        elif c < 0xC2:
            return False
        elif c < 0xE0:
            if i + 1 >= n or not _cont(s[i + 1]):
                return False
            i += 2
        elif c < 0xF0:
            if i + 2 >= n:
                return False
            c1 = s[i + 1]
            if not _cont(c1) or not _cont(s[i + 2]):
                return False
            if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 >= 0xA0):
                return False
            i += 3
        elif c < 0xF5:
            if i + 3 >= n:
                return False
            c1 = s[i + 1]
            if not _cont(c1) or not _cont(s[i + 2]) or not _cont(s[i + 3]):
                return False
            if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 >= 0x90):
                return False
            i += 4
        else:
            return False
    return True


cdef inline int _next_field(
    const unsigned char* p, Py_ssize_t n, Py_ssize_t* pos,
    uint32_t* field, uint32_t* wire, uint64_t* value,
) noexcept nogil:
    """Read the field at pos[0] (the twin's _field): its number and wire type; value is
    the varint of wire type 0 and the length of wire type 2, whose bytes end at the new
    pos[0]. Fixed-size values are skipped; groups and wire types 6/7 are errors."""
    cdef uint64_t tag
    cdef int st
    # Tag: at most 5 bytes, value <= 2**32-1 (as upb).
    tag = p[pos[0]]
    if tag < 0x80:
        pos[0] += 1
    else:
        st = _read_varint(p, n, pos, 5, ENV_TAG_TOO_LONG, &tag)
        if st:
            return st
        if tag > 0xFFFFFFFFULL:
            return ENV_TAG_TOO_LONG
    field[0] = <uint32_t>(tag >> 3)
    wire[0] = <uint32_t>(tag & 7)
    if field[0] == 0:
        return ENV_FIELD_ZERO
    if wire[0] == 2:
        if pos[0] < n and p[pos[0]] < 0x80:
            value[0] = p[pos[0]]
            pos[0] += 1
        else:
            st = _read_varint(p, n, pos, 5, ENV_LENGTH_TOO_LONG, value)
            if st:
                return st
        if value[0] > <uint64_t>(n - pos[0]):
            return ENV_TRUNCATED_FIELD
        pos[0] += <Py_ssize_t>value[0]
    elif wire[0] == 0:
        return _read_varint(p, n, pos, 10, ENV_VARINT_TOO_LONG, value)
    elif wire[0] == 1:
        if n - pos[0] < 8:
            return ENV_TRUNCATED_FIELD
        pos[0] += 8
    elif wire[0] == 5:
        if n - pos[0] < 4:
            return ENV_TRUNCATED_FIELD
        pos[0] += 4
    elif wire[0] == 3 or wire[0] == 4:
        return ENV_GROUP
    else:
        return ENV_BAD_WIRE_TYPE
    return ENV_OK


cdef int parse_envelope(const unsigned char* p, Py_ssize_t n, EnvelopeView* v) noexcept nogil:
    cdef Py_ssize_t pos = 0
    cdef uint64_t value
    cdef uint32_t field, wire
    cdef int st
    v.msg_type = 0
    v.rid_off = 0
    v.rid_len = -1
    v.pay_off = 0
    v.pay_len = 0
    while pos < n:
        st = _next_field(p, n, &pos, &field, &wire, &value)
        if st:
            return st
        if wire == 2:
            if field == 2:
                # upb validates every occurrence, not only the one that wins.
                if v.rid_len > 0 and not _utf8_valid(p + v.rid_off, v.rid_len):
                    return ENV_BAD_UTF8
                v.rid_off = pos - <Py_ssize_t>value
                v.rid_len = <Py_ssize_t>value
            elif field == 3:
                v.pay_off = pos - <Py_ssize_t>value
                v.pay_len = <Py_ssize_t>value
        elif wire == 0 and field == 1:
            v.msg_type = <int32_t><uint32_t>value  # int32: low 32 bits
    return ENV_OK


cdef int acquire_bytes(object buf, Py_buffer* view) except -1:
    if PyBytes_CheckExact(buf):
        view.buf = <void*>PyBytes_AS_STRING(buf)
        view.len = PyBytes_GET_SIZE(buf)
        return 0
    PyObject_GetBuffer(buf, view, PyBUF_SIMPLE)  # C-contiguous or BufferError
    return 1


cdef void release_bytes(Py_buffer* view, int acquired) noexcept:
    if acquired:
        PyBuffer_Release(view)


cdef object payload_slice(object buf, Py_ssize_t off, Py_ssize_t length):
    cdef object mv
    cdef Py_buffer* vb
    if length <= 0:
        return PyMemoryView_FromObject(_EMPTY)
    mv = PyMemoryView_FromObject(buf)  # a fresh view nobody else has seen
    vb = PyMemoryView_GET_BUFFER(mv)
    if vb.ndim != 1 or vb.itemsize != 1 or (
        vb.format != NULL and not (vb.format[0] == b"B" and vb.format[1] == 0)
    ):
        mv = mv.cast("B")  # also fresh
        vb = PyMemoryView_GET_BUFFER(mv)
    # Narrow it in place to [off, off + length): exactly what mv[off:off + length] does
    # to its new view (1-D, stride 1, still contiguous), minus a slice object and a
    # second view. Bounds were checked by parse_envelope.
    vb.buf = <char*>vb.buf + off
    vb.len = length
    vb.shape[0] = length
    return mv


cdef object _decode_utf8(const unsigned char* s, Py_ssize_t n):
    try:
        return PyUnicode_DecodeUTF8(<char*>s, n, NULL)
    except UnicodeDecodeError:
        return None


def decode_envelope(buf, Py_ssize_t max_request_id=64):
    """Decode one serialized Envelope into ``(type, request_id, payload)``.

    ``payload`` is a zero-copy memoryview slice of ``buf``. Raises EnvelopeError on
    malformed input or a request_id over ``max_request_id`` UTF-8 bytes (SPEC §2).
    """
    cdef Py_buffer view
    cdef EnvelopeView v
    cdef int st
    cdef const unsigned char* p
    cdef object rid = ""
    cdef int acquired = acquire_bytes(buf, &view)
    try:
        p = <const unsigned char*>view.buf
        st = parse_envelope(p, view.len, &v)
        if st == ENV_OK and v.rid_len > 0:
            if v.rid_len > max_request_id:
                st = ENV_RID_TOO_LONG
            else:
                rid = _decode_utf8(p + v.rid_off, v.rid_len)
                if rid is None:
                    st = ENV_BAD_UTF8
        if st != ENV_OK:
            raise EnvelopeError(REASONS[st])
        return (v.msg_type, rid, payload_slice(buf, v.pay_off, v.pay_len))
    finally:
        release_bytes(&view, acquired)


# ---------------------------------------------------------------- encoding

cdef inline Py_ssize_t _varint_size(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline unsigned char* _put_varint(unsigned char* q, uint64_t v) noexcept nogil:
    while v >= 0x80:
        q[0] = <unsigned char>((v & 0x7F) | 0x80)
        q += 1
        v >>= 7
    q[0] = <unsigned char>v
    return q + 1


cdef int32_t _check_type(object msg_type) except? -1:
    cdef int overflow = 0
    cdef long long t = PyLong_AsLongLongAndOverflow(PyNumber_Index(msg_type), &overflow)
    if overflow or t < -0x80000000LL or t > 0x7FFFFFFFLL:
        raise EnvelopeError("type out of int32 range")
    return <int32_t>t


cdef Py_ssize_t _size(int32_t t, Py_ssize_t rid_len, Py_ssize_t pay_len) noexcept nogil:
    cdef Py_ssize_t total = 0
    if t != 0:
        total += 1 + _varint_size(<uint64_t><int64_t>t)  # negative: sign-extended
    if rid_len:
        total += 1 + _varint_size(<uint64_t>rid_len) + rid_len
    if pay_len:
        total += 1 + _varint_size(<uint64_t>pay_len) + pay_len
    return total


cdef void _write(
    unsigned char* q, int32_t t, const char* rid, Py_ssize_t rid_len,
    const void* pay, Py_ssize_t pay_len,
) noexcept nogil:
    # Field order and default omission as protobuf's serializer (proto3).
    if t != 0:
        q[0] = 0x08
        q = _put_varint(q + 1, <uint64_t><int64_t>t)
    if rid_len:
        q[0] = 0x12
        q = _put_varint(q + 1, <uint64_t>rid_len)
        memcpy(q, rid, rid_len)
        q += rid_len
    if pay_len:
        q[0] = 0x1A
        q = _put_varint(q + 1, <uint64_t>pay_len)
        memcpy(q, pay, pay_len)


def encode_envelope(msg_type, str request_id not None, payload):
    """Serialize an Envelope; the bytes equal protobuf's ``SerializeToString()``."""
    cdef int32_t t = _check_type(msg_type)
    cdef Py_ssize_t rid_len
    cdef const char* rid = PyUnicode_AsUTF8AndSize(request_id, &rid_len)
    cdef Py_buffer pv
    cdef bytes out
    cdef int acquired = acquire_bytes(payload, &pv)
    try:
        out = PyBytes_FromStringAndSize(NULL, _size(t, rid_len, pv.len))
        _write(<unsigned char*>PyBytes_AS_STRING(out), t, rid, rid_len, pv.buf, pv.len)
        return out
    finally:
        release_bytes(&pv, acquired)


def encode_envelope_into(out, msg_type, str request_id not None, payload):
    """Append the serialized Envelope to the bytearray ``out`` (for batched writes)."""
    if not PyByteArray_Check(out):
        raise TypeError(f"out must be a bytearray, not {type(out).__name__}")
    cdef int32_t t = _check_type(msg_type)
    cdef Py_ssize_t rid_len
    cdef const char* rid = PyUnicode_AsUTF8AndSize(request_id, &rid_len)
    cdef Py_buffer pv
    cdef Py_ssize_t old
    cdef int acquired = acquire_bytes(payload, &pv)
    try:
        old = PyByteArray_GET_SIZE(out)
        PyByteArray_Resize(out, old + _size(t, rid_len, pv.len))
        _write(
            <unsigned char*>PyByteArray_AS_STRING(out) + old, t, rid, rid_len, pv.buf, pv.len
        )
    finally:
        release_bytes(&pv, acquired)


# ---------------------------------------------------------------- hot payloads
# MessageReceive is built once per stored message (the echo, every recipient's copy
# and the backlog share it), MessageDelivered once per sender an ack passes. protobuf's
# runtime spent ~2 us and ~1.5 us on them (constructor, attributes, SerializeToString);
# these write the same bytes in one pass.

cdef inline Py_ssize_t _len_field_size(Py_ssize_t n) noexcept nogil:
    return 0 if n == 0 else 1 + _varint_size(<uint64_t>n) + n


cdef inline unsigned char* _put_len_field(
    unsigned char* q, unsigned char tag, const void* p, Py_ssize_t n
) noexcept nogil:
    if n:
        q[0] = tag
        q = _put_varint(q + 1, <uint64_t>n)
        memcpy(q, p, n)
        q += n
    return q


cdef inline unsigned char* _put_varint_field(
    unsigned char* q, unsigned char tag, uint64_t v
) noexcept nogil:
    if v:
        q[0] = tag
        q = _put_varint(q + 1, v)
    return q


cdef int64_t _check_int64(object value, str name) except? -1:
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(PyNumber_Index(value), &overflow)
    if overflow:
        raise ValueError(f"{name} out of int64 range")
    return <int64_t>v


cdef uint64_t _check_uint64(object value, str name) except? 0xFFFFFFFFFFFFFFFF:
    value = PyNumber_Index(value)
    if value < 0 or value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{name} out of uint64 range")
    return <uint64_t>value


def encode_message_receive(
    str message_id not None,
    str conversation_id not None,
    str sender_id not None,
    encrypted_payload,
    server_timestamp,
    str message_type not None,
    seq,
):
    """Serialize a MessageReceive; the bytes equal protobuf's ``SerializeToString()``."""
    cdef int64_t ts = _check_int64(server_timestamp, "server_timestamp")
    cdef uint64_t sq = _check_uint64(seq, "seq")
    cdef Py_ssize_t mid_len, cid_len, sid_len, mt_len
    cdef const char* mid = PyUnicode_AsUTF8AndSize(message_id, &mid_len)
    cdef const char* cid = PyUnicode_AsUTF8AndSize(conversation_id, &cid_len)
    cdef const char* sid = PyUnicode_AsUTF8AndSize(sender_id, &sid_len)
    cdef const char* mt = PyUnicode_AsUTF8AndSize(message_type, &mt_len)
    cdef Py_buffer pv
    cdef bytes out
    cdef unsigned char* q
    cdef Py_ssize_t size
    cdef int acquired = acquire_bytes(encrypted_payload, &pv)
    try:
        size = (
            _len_field_size(mid_len)
            + _len_field_size(cid_len)
            + _len_field_size(sid_len)
            + _len_field_size(pv.len)
            + (0 if ts == 0 else 1 + _varint_size(<uint64_t>ts))
            + _len_field_size(mt_len)
            + (0 if sq == 0 else 1 + _varint_size(sq))
        )
        out = PyBytes_FromStringAndSize(NULL, size)
        # Field order and default omission as protobuf's serializer (proto3).
        q = <unsigned char*>PyBytes_AS_STRING(out)
        q = _put_len_field(q, 0x0A, mid, mid_len)
        q = _put_len_field(q, 0x12, cid, cid_len)
        q = _put_len_field(q, 0x1A, sid, sid_len)
        q = _put_len_field(q, 0x22, pv.buf, pv.len)
        q = _put_varint_field(q, 0x28, <uint64_t>ts)  # negative: sign-extended
        q = _put_len_field(q, 0x32, mt, mt_len)
        _put_varint_field(q, 0x38, sq)
        return out
    finally:
        release_bytes(&pv, acquired)


def encode_message_delivered(
    str message_id not None,
    str delivered_to not None,
    str conversation_id not None,
    up_to_seq,
):
    """Serialize a MessageDelivered (one per sender passed by an ack); the bytes equal
    protobuf's ``SerializeToString()``."""
    cdef uint64_t sq = _check_uint64(up_to_seq, "up_to_seq")
    cdef Py_ssize_t mid_len, to_len, cid_len
    cdef const char* mid = PyUnicode_AsUTF8AndSize(message_id, &mid_len)
    cdef const char* to = PyUnicode_AsUTF8AndSize(delivered_to, &to_len)
    cdef const char* cid = PyUnicode_AsUTF8AndSize(conversation_id, &cid_len)
    cdef bytes out = PyBytes_FromStringAndSize(
        NULL,
        _len_field_size(mid_len)
        + _len_field_size(to_len)
        + _len_field_size(cid_len)
        + (0 if sq == 0 else 1 + _varint_size(sq)),
    )
    cdef unsigned char* q = <unsigned char*>PyBytes_AS_STRING(out)
    q = _put_len_field(q, 0x0A, mid, mid_len)
    q = _put_len_field(q, 0x12, to, to_len)
    q = _put_len_field(q, 0x1A, cid, cid_len)
    _put_varint_field(q, 0x20, sq)
    return out


# ---------------------------------------------------------------- hot payloads, decoded
# MessageSend and MessageAck: every field length-delimited. protobuf's runtime took
# ~1.1 us and ~1.8 us to parse them and hand out their fields.

cdef int _scan_fields(
    const unsigned char* p, Py_ssize_t n, const unsigned char* kinds, Py_ssize_t nk,
    Py_ssize_t* offs, Py_ssize_t* lens, list lists,
) except -1:
    """Scan a whole message (rules as parse_envelope's); returns a status code. String
    occurrences are UTF-8-checked as met; repeated ones are appended to ``lists``."""
    cdef Py_ssize_t pos = 0, off, length
    cdef uint64_t value
    cdef uint32_t field, wire
    cdef unsigned char kind
    cdef int st
    while pos < n:
        st = _next_field(p, n, &pos, &field, &wire, &value)
        if st:
            return st
        if wire != 2 or field > <uint32_t>nk:
            continue  # unknown, or not the wire type its number has: skipped
        length = <Py_ssize_t>value
        off = pos - length
        kind = kinds[field - 1]
        if kind != b"b" and not _utf8_valid(p + off, length):
            return ENV_BAD_UTF8_FIELD  # upb checks every occurrence
        if kind == b"S":
            (<list>lists[field - 1]).append(PyUnicode_DecodeUTF8(<char*>(p + off), length, NULL))
        else:
            offs[field - 1] = off
            lens[field - 1] = length
    return ENV_OK


def decode_fields(buf, bytes kinds not None):
    """Decode a proto3 message whose fields 1..len(kinds) are all length-delimited
    (``s`` string, ``b`` bytes, ``S`` repeated string); see the twin's docstring."""
    cdef Py_ssize_t nk = len(kinds)
    cdef const unsigned char* k = kinds
    cdef Py_ssize_t offs[8]
    cdef Py_ssize_t lens[8]
    cdef Py_ssize_t i
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef int st
    cdef list lists
    cdef tuple out
    cdef object value
    if nk > 8:
        raise ValueError("kinds: at most 8 of b's', b'b', b'S'")
    for i in range(nk):
        if k[i] != b"s" and k[i] != b"b" and k[i] != b"S":
            raise ValueError("kinds: at most 8 of b's', b'b', b'S'")
        offs[i] = 0
        lens[i] = 0
    lists = [[] if k[i] == b"S" else None for i in range(nk)]
    cdef int acquired = acquire_bytes(buf, &view)
    try:
        p = <const unsigned char*>view.buf
        st = _scan_fields(p, view.len, k, nk, offs, lens, lists)
        if st != ENV_OK:
            raise PayloadError(REASONS[st])
        out = PyTuple_New(nk)
        for i in range(nk):
            if k[i] == b"S":
                value = lists[i]
            elif k[i] == b"s":
                value = PyUnicode_DecodeUTF8(<char*>(p + offs[i]), lens[i], NULL)
            else:
                value = PyBytes_FromStringAndSize(<char*>(p + offs[i]), lens[i])
            Py_INCREF(value)
            PyTuple_SET_ITEM(out, i, value)
        return out
    finally:
        release_bytes(&view, acquired)


# Imported last: importing sovereign.codec.envelope runs sovereign/codec/__init__.py,
# which picks up this (then partially initialised) module and needs its functions.
from sovereign.codec.envelope import REASONS, EnvelopeError, PayloadError  # noqa: E402

__all__ = [
    "REASONS",
    "EnvelopeError",
    "PayloadError",
    "decode_envelope",
    "decode_fields",
    "encode_envelope",
    "encode_envelope_into",
    "encode_message_delivered",
    "encode_message_receive",
]
