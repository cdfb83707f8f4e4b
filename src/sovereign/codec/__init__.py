"""Envelope codec (SPEC §2), compiled when available.

The implementation -- ``sovereign._fast.envelope`` (Cython) or its pure-Python twin
``sovereign.codec.envelope`` -- is chosen by :mod:`sovereign.implementations` at import
(``SOVEREIGN_PURE=1`` forces the twin; ``SOVEREIGN_REQUIRE_FAST=1`` turns a missing
compiled module into an ImportError instead of a silent fallback).
"""

from __future__ import annotations

from types import ModuleType

from sovereign import implementations as _implementations
from sovereign.codec import envelope as _python

__all__ = [
    "IMPLEMENTATION",
    "EnvelopeError",
    "PayloadError",
    "decode_envelope",
    "decode_fields",
    "encode_envelope",
    "encode_envelope_into",
    "encode_message_delivered",
    "encode_message_receive",
    "implementations",
]

_active = _implementations.select("envelope")
IMPLEMENTATION: str = _active.kind

EnvelopeError = _python.EnvelopeError  # one class: the compiled module raises it too
PayloadError = _python.PayloadError  # likewise
decode_envelope = _python.decode_envelope
decode_fields = _python.decode_fields
encode_envelope = _python.encode_envelope
encode_envelope_into = _python.encode_envelope_into
encode_message_receive = _python.encode_message_receive
encode_message_delivered = _python.encode_message_delivered
if _active.kind == _implementations.COMPILED:
    decode_envelope = _active.module.decode_envelope
    decode_fields = _active.module.decode_fields
    encode_envelope = _active.module.encode_envelope
    encode_envelope_into = _active.module.encode_envelope_into
    encode_message_receive = _active.module.encode_message_receive
    encode_message_delivered = _active.module.encode_message_delivered


def implementations() -> dict[str, ModuleType]:
    """The available codec modules by name ("compiled", "python"), for parity tests."""
    return _implementations.available("envelope")
