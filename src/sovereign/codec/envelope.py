"""Pure-Python twin of ``sovereign._fast.envelope`` (the ``Envelope`` codec, SPEC §2).

``Envelope { MessageType type = 1; string request_id = 2; bytes payload = 3; }``

Decoding follows the protobuf runtime (upb) for proto3: fields in any order, the last
occurrence of a field wins, fields with an unknown number *or* an unexpected wire type
are skipped, ``type`` is the low 32 bits of its varint read as int32, every
``request_id`` occurrence must be valid UTF-8. Tags and length prefixes are at most 5
bytes (tag <= 2**32-1), other varints at most 10. One deliberate difference: groups
(wire types 3/4) are rejected, while upb skips well-formed ones as unknown fields.

The compiled module must give identical results and identical error reasons; the
parity tests in ``tests/unit/test_envelope_codec.py`` hold both to that.
"""

from __future__ import annotations

import operator

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


class EnvelopeError(ValueError):
    """The bytes are not a valid ``Envelope`` (SPEC §2 → Error 3005 InvalidEnvelope)."""


class PayloadError(ValueError):
    """The bytes are not a valid payload of the message type :func:`decode_fields`
    was asked for (the API answers 3001 MalformedMessage, or 1006 before READY)."""


# Error reasons, indexed by the status codes the compiled parser returns.
REASONS: tuple[str, ...] = (
    "",
    "truncated varint",
    "varint too long",
    "tag too long",
    "field number 0",
    "groups are not supported",
    "invalid wire type",
    "length prefix too long",
    "truncated field",
    "request_id is not valid UTF-8",
    "request_id too long",
    "a string field is not valid UTF-8",
)
_TRUNCATED_VARINT = 1
_VARINT_TOO_LONG = 2
_TAG_TOO_LONG = 3
_FIELD_ZERO = 4
_GROUP = 5
_BAD_WIRE_TYPE = 6
_LENGTH_TOO_LONG = 7
_TRUNCATED_FIELD = 8
_BAD_UTF8 = 9
_RID_TOO_LONG = 10
_BAD_UTF8_FIELD = 11

_U64 = 0xFFFF_FFFF_FFFF_FFFF
_EMPTY = b""


def _error(status: int) -> EnvelopeError:
    return EnvelopeError(REASONS[status])


def _byte_source(buf: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """Something indexable by byte offset: bytes/bytearray as-is, else a 1-D 'B' view."""
    if isinstance(buf, (bytes, bytearray)):
        return buf
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise BufferError("buffer is not C-contiguous")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def _varint(
    data: bytes | bytearray | memoryview, pos: int, end: int, limit: int, too_long: int
) -> tuple[int, int]:
    """Read a varint of at most ``limit`` bytes; returns (value mod 2**64, new pos)."""
    result = 0
    shift = 0
    count = 0
    while True:
        if pos >= end:
            raise _error(_TRUNCATED_VARINT)
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _U64, pos
        count += 1
        shift += 7
        if count == limit:
            raise _error(too_long)


def _field(data: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int, int, int]:
    """Read the field at ``pos``; returns (number, wire type, value, new pos). ``value`` is
    the varint of wire type 0 and the length of wire type 2, whose bytes end at the new
    pos. Fixed-size values are skipped; groups and wire types 6/7 are errors."""
    # Tag: a varint of at most 5 bytes whose value fits in uint32.
    tag = data[pos]
    if tag < 0x80:
        pos += 1
    else:
        tag, pos = _varint(data, pos, end, 5, _TAG_TOO_LONG)
        if tag > 0xFFFF_FFFF:
            raise _error(_TAG_TOO_LONG)
    field = tag >> 3
    wire = tag & 7
    if field == 0:
        raise _error(_FIELD_ZERO)
    if wire == 0:
        value, pos = _varint(data, pos, end, 10, _VARINT_TOO_LONG)
        return field, 0, value, pos
    if wire == 2:
        if pos < end and data[pos] < 0x80:
            length = data[pos]
            pos += 1
        else:
            length, pos = _varint(data, pos, end, 5, _LENGTH_TOO_LONG)
        if length > end - pos:
            raise _error(_TRUNCATED_FIELD)
        return field, 2, length, pos + length
    if wire == 1 or wire == 5:
        size = 8 if wire == 1 else 4
        if end - pos < size:
            raise _error(_TRUNCATED_FIELD)
        return field, wire, 0, pos + size
    raise _error(_GROUP if wire == 3 or wire == 4 else _BAD_WIRE_TYPE)


def _parse(data: bytes | bytearray | memoryview, end: int) -> tuple[int, int, int, int, int]:
    """Scan the whole message; returns (type, rid_off, rid_len, pay_off, pay_len)."""
    msg_type = 0
    rid_off = rid_len = -1
    pay_off = pay_len = 0
    pos = 0
    while pos < end:
        field, wire, value, pos = _field(data, pos, end)
        if wire == 0 and field == 1:
            value &= 0xFFFF_FFFF  # int32: low 32 bits, sign-interpreted
            msg_type = value - 0x1_0000_0000 if value >= 0x8000_0000 else value
        elif wire == 2:
            if field == 2:
                if rid_len > 0:
                    # upb validates every occurrence, not only the one that wins.
                    _check_utf8(data, rid_off, rid_len)
                rid_off, rid_len = pos - value, value
            elif field == 3:
                pay_off, pay_len = pos - value, value
    return msg_type, rid_off, rid_len, pay_off, pay_len


def _check_utf8(data: bytes | bytearray | memoryview, off: int, length: int) -> str:
    try:
        return str(data[off : off + length], "utf-8")
    except UnicodeDecodeError:
        raise _error(_BAD_UTF8) from None


def _payload(
    buf: bytes | bytearray | memoryview, source: bytes | bytearray | memoryview, off: int, n: int
) -> memoryview:
    if n == 0:
        return memoryview(_EMPTY)
    mv = source if isinstance(source, memoryview) else memoryview(buf)
    return mv[off : off + n]


def decode_envelope(
    buf: bytes | bytearray | memoryview, max_request_id: int = 64
) -> tuple[int, str, memoryview]:
    """Decode one serialized Envelope into ``(type, request_id, payload)``.

    ``payload`` is a zero-copy slice of ``buf`` (it keeps a bytearray from resizing
    while alive). Raises :class:`EnvelopeError` on malformed input, or when the
    request_id is longer than ``max_request_id`` UTF-8 bytes (SPEC §2).
    """
    data = _byte_source(buf)
    end = len(data)
    msg_type, rid_off, rid_len, pay_off, pay_len = _parse(data, end)
    if rid_len <= 0:
        request_id = ""
    else:
        if rid_len > max_request_id:
            raise _error(_RID_TOO_LONG)
        request_id = _check_utf8(data, rid_off, rid_len)
    return msg_type, request_id, _payload(buf, data, pay_off, pay_len)


def _put_varint(out: bytearray, value: int) -> None:
    value &= _U64
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def encode_envelope_into(
    out: bytearray, msg_type: int, request_id: str, payload: bytes | bytearray | memoryview
) -> None:
    """Append the serialized Envelope to ``out`` (byte-identical to protobuf)."""
    if not isinstance(out, bytearray):
        raise TypeError(f"out must be a bytearray, not {type(out).__name__}")
    msg_type = operator.index(msg_type)
    if not -0x8000_0000 <= msg_type <= 0x7FFF_FFFF:
        raise EnvelopeError("type out of int32 range")
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be str, not {type(request_id).__name__}")
    rid = request_id.encode("utf-8")
    pv = memoryview(payload)
    if not pv.c_contiguous:
        raise BufferError("payload is not C-contiguous")
    # Field order and default omission as protobuf's serializer (proto3).
    if msg_type:
        out.append(0x08)
        _put_varint(out, msg_type)  # negative: sign-extended, 10 bytes
    if rid:
        out.append(0x12)
        _put_varint(out, len(rid))
        out += rid
    if pv.nbytes:
        out.append(0x1A)
        _put_varint(out, pv.nbytes)
        out += pv


def encode_envelope(
    msg_type: int, request_id: str, payload: bytes | bytearray | memoryview
) -> bytes:
    """Serialize an Envelope; the bytes equal protobuf's ``SerializeToString()``."""
    out = bytearray()
    encode_envelope_into(out, msg_type, request_id, payload)
    return bytes(out)


# Hot payloads: MessageReceive (once per stored message) and MessageDelivered (once per
# sender an ack passes). The compiled twin writes them in one pass where protobuf's
# runtime took ~2 us and ~1.5 us (docs/performance.md).


def _utf8(name: str, value: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    return value.encode("utf-8")


def _uint64(name: str, value: int) -> int:
    v = operator.index(value)
    if not 0 <= v <= _U64:
        raise ValueError(f"{name} out of uint64 range")
    return v


def _put_len_field(out: bytearray, tag: int, data: bytes | memoryview) -> None:
    if len(data):
        out.append(tag)
        _put_varint(out, len(data))
        out += data


def _put_varint_field(out: bytearray, tag: int, value: int) -> None:
    if value:
        out.append(tag)
        _put_varint(out, value)  # negative: sign-extended, 10 bytes


def encode_message_receive(
    message_id: str,
    conversation_id: str,
    sender_id: str,
    encrypted_payload: bytes | bytearray | memoryview,
    server_timestamp: int,
    message_type: str,
    seq: int,
) -> bytes:
    """Serialize a MessageReceive; the bytes equal protobuf's ``SerializeToString()``."""
    ts = operator.index(server_timestamp)
    if not -(1 << 63) <= ts < 1 << 63:
        raise ValueError("server_timestamp out of int64 range")
    sq = _uint64("seq", seq)
    mid = _utf8("message_id", message_id)
    cid = _utf8("conversation_id", conversation_id)
    sid = _utf8("sender_id", sender_id)
    mtype = _utf8("message_type", message_type)
    pv = memoryview(encrypted_payload)
    if not pv.c_contiguous:
        raise BufferError("encrypted_payload is not C-contiguous")
    out = bytearray()
    # Field order and default omission as protobuf's serializer (proto3).
    _put_len_field(out, 0x0A, mid)
    _put_len_field(out, 0x12, cid)
    _put_len_field(out, 0x1A, sid)
    _put_len_field(out, 0x22, pv.cast("B"))
    _put_varint_field(out, 0x28, ts)
    _put_len_field(out, 0x32, mtype)
    _put_varint_field(out, 0x38, sq)
    return bytes(out)


def encode_message_delivered(
    message_id: str, delivered_to: str, conversation_id: str, up_to_seq: int
) -> bytes:
    """Serialize a MessageDelivered; the bytes equal protobuf's ``SerializeToString()``."""
    sq = _uint64("up_to_seq", up_to_seq)
    mid = _utf8("message_id", message_id)
    to = _utf8("delivered_to", delivered_to)
    cid = _utf8("conversation_id", conversation_id)
    out = bytearray()
    _put_len_field(out, 0x0A, mid)
    _put_len_field(out, 0x12, to)
    _put_len_field(out, 0x1A, cid)
    _put_varint_field(out, 0x20, sq)
    return bytes(out)


# Hot payloads, decoded: MessageSend and MessageAck, whose fields are all
# length-delimited. protobuf's runtime took ~1.1 us and ~1.8 us to parse them and hand
# out their fields (docs/performance.md).

_KINDS = frozenset(b"sbS")


def decode_fields(buf: bytes | bytearray | memoryview, kinds: bytes) -> tuple[object, ...]:
    """Decode a proto3 message whose fields 1..len(kinds) are all length-delimited:
    ``kinds[i]`` is ``s`` (string), ``b`` (bytes) or ``S`` (repeated string) for field
    ``i + 1``. Returns one value per field: str, bytes (a copy) or list[str]; absent
    ones are "", b"" and [].

    The rules are decode_envelope's (upb's for proto3): fields in any order, the last
    occurrence of a singular field wins, unknown numbers and unexpected wire types are
    skipped, every string occurrence must be valid UTF-8; groups are rejected.
    Raises :class:`PayloadError` (a ValueError) with the reason.
    """
    if not isinstance(kinds, bytes):
        raise TypeError(f"kinds must be bytes, not {type(kinds).__name__}")
    if len(kinds) > 8 or not _KINDS.issuperset(kinds):
        raise ValueError("kinds: at most 8 of b's', b'b', b'S'")
    try:
        return _decode_fields(_byte_source(buf), kinds)
    except EnvelopeError as exc:  # the shared scanner's reasons
        raise PayloadError(str(exc)) from None


def _decode_fields(data: bytes | bytearray | memoryview, kinds: bytes) -> tuple[object, ...]:
    # By field index: the last string, the last bytes' span, a repeated field's strings.
    texts: dict[int, str] = {}
    spans: dict[int, tuple[int, int]] = {}
    lists: dict[int, list[str]] = {}
    nk = len(kinds)
    end = len(data)
    pos = 0
    while pos < end:
        field, wire, length, pos = _field(data, pos, end)
        if wire != 2 or field > nk:
            continue  # unknown, or not the wire type its number has: skipped
        i, off = field - 1, pos - length
        kind = kinds[i]
        if kind == 0x62:  # b
            spans[i] = (off, length)
            continue
        try:
            text = str(data[off:pos], "utf-8")  # upb checks every occurrence
        except UnicodeDecodeError:
            raise _error(_BAD_UTF8_FIELD) from None
        if kind == 0x73:  # s: the last wins
            texts[i] = text
        else:
            lists.setdefault(i, []).append(text)
    out: list[object] = []
    for i, kind in enumerate(kinds):
        if kind == 0x73:
            out.append(texts.get(i, ""))
        elif kind == 0x62:
            off, n = spans.get(i, (0, 0))
            out.append(bytes(data[off : off + n]))
        else:
            out.append(lists.get(i, []))
    return tuple(out)
