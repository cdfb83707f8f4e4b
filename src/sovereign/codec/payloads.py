"""The hot request payloads, decoded by the envelope codec instead of protobuf's runtime.

MESSAGE_SEND and MESSAGE_ACK arrive once per message each. Parsing them with protobuf's
runtime and reading their fields cost 0.60 us and (with the ack's id handling) 1.84 us;
through :func:`decode_fields` and these classes, 0.36 us and 1.03 us
(docs/performance.md). Each class below has the message's field names, types and
defaults, and a ``FromString`` as the generated class has, so the API's ``parse`` takes
either. The decoding rules are protobuf's for proto3, except that groups (absent from
proto3) are refused: see :func:`sovereign.codec.decode_fields`.
"""

from __future__ import annotations

from typing import NamedTuple

from sovereign.codec import decode_fields

__all__ = ["MessageAck", "MessageSend"]

_new = tuple.__new__  # ``_make`` less its length check (decode_fields's is exact): -0.15 us


class MessageSend(NamedTuple):
    """``MessageSend { string conversation_id = 1; bytes encrypted_payload = 2;
    string message_type = 3; }``"""

    conversation_id: str = ""
    encrypted_payload: bytes = b""
    message_type: str = ""

    @classmethod
    def FromString(cls, data: bytes | bytearray | memoryview) -> MessageSend:
        return _new(cls, decode_fields(data, b"sbs"))


class MessageAck(NamedTuple):
    """``MessageAck { string message_id = 1; repeated string message_ids = 2; }``"""

    message_id: str = ""
    message_ids: list[str] = []  # never mutated: a fresh list per decode

    @classmethod
    def FromString(cls, data: bytes | bytearray | memoryview) -> MessageAck:
        return _new(cls, decode_fields(data, b"sS"))
