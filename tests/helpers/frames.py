"""An independent RFC 6455 §5.2 reader for server->client frames: the fan-out parity
tests check frames with it, and the fake outbox decodes what it recorded with it."""

from __future__ import annotations


def parse_frames(data: bytes) -> list[bytes]:
    """Independent RFC 6455 §5.2 parser for server->client frames.

    Asserts every frame is final, binary, unmasked, RSV-free and uses the minimal
    length encoding; returns the payloads.
    """
    payloads = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 2, "truncated header"
        b0, b1 = data[pos], data[pos + 1]
        pos += 2
        assert b0 & 0x80, "FIN not set"
        assert b0 & 0x70 == 0, "RSV bits set"
        assert b0 & 0x0F == 0x2, "not a binary frame"
        assert not b1 & 0x80, "server frames must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
            assert n >= 126, "non-minimal 16-bit length"
        elif n == 127:
            n = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
            assert 0xFFFF < n < 1 << 63, "non-minimal or too large 64-bit length"
        assert len(data) - pos >= n, "truncated payload"
        payloads.append(data[pos : pos + n])
        pos += n
    return payloads
