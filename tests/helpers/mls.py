"""Structurally valid RFC 9420 messages with chosen group_id/epoch, for DS tests.

The DS reads only clear-text framing (group_id, epoch, content_type, wire_format), so
these carry dummy signatures and ciphertexts. Real end-to-end MLS runs in the ts-mls
interop test; KeyPackages here are really signed (sovereign.mls.testing).
"""

from __future__ import annotations

import time

from sovereign.mls.structs import (
    CONTENT_APPLICATION,
    CONTENT_COMMIT,
    MLS10,
    SENDER_MEMBER,
    WIRE_FORMAT_GROUP_INFO,
    WIRE_FORMAT_PRIVATE_MESSAGE,
    WIRE_FORMAT_PUBLIC_MESSAGE,
    WIRE_FORMAT_WELCOME,
    Commit,
    EncryptedGroupSecrets,
    FramedContent,
    FramedContentAuthData,
    GroupContext,
    GroupInfo,
    HPKECiphertext,
    MLSMessage,
    PrivateMessage,
    PublicMessage,
    Sender,
    Welcome,
)
from sovereign.mls.testing import build_key_package

SUITE = 1


def key_package(
    identity: str, *, last_resort: bool = False, suite: int = SUITE, lifetime: int = 86_400
) -> bytes:
    now = int(time.time())
    return build_key_package(
        suite,
        identity.encode(),
        not_before=now - 60,
        not_after=now + lifetime,
        last_resort=last_resort,
    )


def commit(
    group_id: bytes, epoch: int, *, private: bool = False, content_type: int = CONTENT_COMMIT
) -> bytes:
    if private:
        body = PrivateMessage(group_id, epoch, content_type, b"", b"\x01" * 16, b"\x02" * 48)
        return MLSMessage(MLS10, WIRE_FORMAT_PRIVATE_MESSAGE, body).encode()
    content = FramedContent(
        group_id,
        epoch,
        Sender(SENDER_MEMBER, 0),
        b"",
        content_type,
        Commit((), None) if content_type == CONTENT_COMMIT else b"app",
    )
    auth = FramedContentAuthData(
        b"\x03" * 64, b"\x04" * 32 if content_type == CONTENT_COMMIT else None
    )
    return MLSMessage(
        MLS10, WIRE_FORMAT_PUBLIC_MESSAGE, PublicMessage(content, auth, b"\x05" * 32)
    ).encode()


def application(group_id: bytes, epoch: int) -> bytes:
    return commit(group_id, epoch, private=True, content_type=CONTENT_APPLICATION)


def group_info(group_id: bytes, epoch: int) -> bytes:
    ctx = GroupContext(MLS10, SUITE, group_id, epoch, b"\x06" * 32, b"\x07" * 32, ())
    return MLSMessage(
        MLS10, WIRE_FORMAT_GROUP_INFO, GroupInfo(ctx, (), b"\x08" * 32, 0, b"\x09" * 64)
    ).encode()


def welcome() -> bytes:
    secret = EncryptedGroupSecrets(b"\x0a" * 32, HPKECiphertext(b"\x0b" * 32, b"\x0c" * 48))
    return MLSMessage(MLS10, WIRE_FORMAT_WELCOME, Welcome(SUITE, (secret,), b"\x0d" * 64)).encode()
