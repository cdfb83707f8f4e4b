"""The parse helpers the server calls (SPEC §7). Each raises only :class:`MLSDecodeError`."""

from __future__ import annotations

from dataclasses import dataclass

from sovereign.mls.structs import (
    WIRE_FORMAT_GROUP_INFO,
    WIRE_FORMAT_PRIVATE_MESSAGE,
    WIRE_FORMAT_PUBLIC_MESSAGE,
    WIRE_FORMAT_WELCOME,
    GroupInfo,
    KeyPackage,
    MLSMessage,
    PrivateMessage,
    PublicMessage,
    Welcome,
)
from sovereign.mls.wire import WRONG_WIRE_FORMAT, MLSDecodeError

__all__ = [
    "CommitInfo",
    "parse_commit_message",
    "parse_group_info_message",
    "parse_key_package",
    "parse_mls_message",
    "parse_welcome_message",
]

# MLSMessage{version = mls10, wire_format = mls_key_package}: also how a bare KeyPackage of
# cipher suite 5 begins (version mls10, cipher_suite 5).
_KP_MESSAGE_HEADER = b"\x00\x01\x00\x05"


def parse_mls_message(data: bytes | bytearray | memoryview) -> MLSMessage:
    """Any MLSMessage (mls10, a known wire_format), the whole input."""
    return MLSMessage.decode(data)


def _expect(msg: MLSMessage, *wire_formats: int) -> None:
    if msg.wire_format not in wire_formats:
        raise MLSDecodeError(
            "MLSMessage.wire_format",
            WRONG_WIRE_FORMAT,
            f"{msg.wire_format}, expected {' or '.join(map(str, wire_formats))}",
        )


def parse_key_package(data: bytes | bytearray | memoryview) -> KeyPackage:
    """A KeyPackage: an MLSMessage with wire_format mls_key_package, or a bare one.

    Bytes that start like the MLSMessage form are read as one first; only if that fails
    are they read as a bare KeyPackage (of cipher suite 5). If both fail, the
    MLSMessage error is raised."""
    view = memoryview(data)
    if view[:4] == _KP_MESSAGE_HEADER:
        try:
            msg = MLSMessage.decode(view)
        except MLSDecodeError as exc:
            try:
                return KeyPackage.decode(view)
            except MLSDecodeError:
                raise exc from None
        assert isinstance(msg.body, KeyPackage)
        return msg.body
    return KeyPackage.decode(view)


@dataclass(frozen=True, slots=True)
class CommitInfo:
    """What the Delivery Service reads from a handshake message's clear text."""

    group_id: bytes
    epoch: int
    wire_format: int
    content_type: int


def parse_commit_message(data: bytes | bytearray | memoryview) -> CommitInfo:
    """group_id, epoch, wire_format and content_type of a PublicMessage or PrivateMessage.

    The whole message must decode (a PublicMessage's content included). Checking that
    ``content_type`` is commit (3) is the caller's job."""
    msg = MLSMessage.decode(data)
    _expect(msg, WIRE_FORMAT_PUBLIC_MESSAGE, WIRE_FORMAT_PRIVATE_MESSAGE)
    body = msg.body
    if isinstance(body, PublicMessage):
        c = body.content
        return CommitInfo(c.group_id, c.epoch, msg.wire_format, c.content_type)
    assert isinstance(body, PrivateMessage)
    return CommitInfo(body.group_id, body.epoch, msg.wire_format, body.content_type)


def parse_welcome_message(data: bytes | bytearray | memoryview) -> Welcome:
    """The Welcome of an MLSMessage with wire_format mls_welcome."""
    msg = MLSMessage.decode(data)
    _expect(msg, WIRE_FORMAT_WELCOME)
    assert isinstance(msg.body, Welcome)
    return msg.body


def parse_group_info_message(data: bytes | bytearray | memoryview) -> GroupInfo:
    """The GroupInfo of an MLSMessage with wire_format mls_group_info (``.group_id``,
    ``.epoch`` come from its GroupContext)."""
    msg = MLSMessage.decode(data)
    _expect(msg, WIRE_FORMAT_GROUP_INFO)
    assert isinstance(msg.body, GroupInfo)
    return msg.body
