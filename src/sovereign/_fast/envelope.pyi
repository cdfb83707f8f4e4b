"""Stub for the compiled Envelope codec (twin: sovereign.codec.envelope)."""

from sovereign.codec.envelope import REASONS as REASONS
from sovereign.codec.envelope import EnvelopeError as EnvelopeError
from sovereign.codec.envelope import PayloadError as PayloadError

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

def decode_envelope(
    buf: bytes | bytearray | memoryview, max_request_id: int = 64
) -> tuple[int, str, memoryview]: ...
def encode_envelope(
    msg_type: int, request_id: str, payload: bytes | bytearray | memoryview
) -> bytes: ...
def encode_envelope_into(
    out: bytearray, msg_type: int, request_id: str, payload: bytes | bytearray | memoryview
) -> None: ...
def encode_message_receive(
    message_id: str,
    conversation_id: str,
    sender_id: str,
    encrypted_payload: bytes | bytearray | memoryview,
    server_timestamp: int,
    message_type: str,
    seq: int,
) -> bytes: ...
def encode_message_delivered(
    message_id: str, delivered_to: str, conversation_id: str, up_to_seq: int
) -> bytes: ...
def decode_fields(buf: bytes | bytearray | memoryview, kinds: bytes) -> tuple[object, ...]: ...
