"""A raw RFC 6455 client on asyncio streams: any frame, however wrong, on a real socket.

The picows test client (``wsclient.py``) refuses to build most malformed frames and
hides how a connection ended. This one writes bytes as given and reports what the
server did: which frames it sent, the close code, and whether the socket then ended
with EOF or a reset. Loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
import time
from dataclasses import dataclass

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One client frame. ``length`` overrides the header's payload length (a lie)."""
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode & 0xF])
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 65536:
        head.append(bit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(bit | 127)
        head += struct.pack(">Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + key + body


def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    body = b"" if code is None else struct.pack(">H", code) + reason
    return frame(OP_CLOSE, body)


@dataclass
class Ending:
    """How the server ended the connection, as the client saw it."""

    code: int | None  # the close frame's code (1005 for an empty body), None if none came
    frames: list[tuple[int, bytes]]  # every frame before it (opcode, payload)
    eof: bool  # the socket then ended with EOF (False: reset or still open)
    reset: bool
    code_at: float = 0.0  # time.perf_counter() when the close frame was read


class RawWs:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.response = b""

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        subprotocol: str | None = "sovereign.v1",
        host: str = "127.0.0.1",
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> RawWs:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        ws = cls(reader, writer)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        ws.response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if not ws.response.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(f"upgrade refused: {ws.response[:80]!r}")
        return ws

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next server frame; IncompleteReadError on EOF, ConnectionResetError on RST."""
        r = self.reader
        head = await asyncio.wait_for(r.readexactly(2), timeout)
        assert head[1] & 0x80 == 0, "server frames are never masked"
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", await r.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", await r.readexactly(8))[0]
        payload = await asyncio.wait_for(r.readexactly(n), timeout)
        return head[0] & 0x0F, payload

    async def ending(
        self, timeout: float = 5.0, *, answer: bool = True, wait_eof: bool = True
    ) -> Ending:
        """Read until the server's close frame, answer it (unless ``answer`` is False),
        then wait for the end of the socket (unless ``wait_eof`` is False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        frames: list[tuple[int, bytes]] = []
        code: int | None = None
        try:
            while True:
                op, payload = await self.read_frame(max(0.01, deadline - loop.time()))
                if op == OP_CLOSE:
                    code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                    code_at = time.perf_counter()
                    break
                frames.append((op, payload))
        except asyncio.IncompleteReadError:
            return Ending(None, frames, eof=True, reset=False)
        except ConnectionResetError:
            return Ending(None, frames, eof=False, reset=True)
        if answer:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.writer.write(close_frame(code if code not in (1005, 1006) else 1000))
        eof = reset = False
        if not wait_eof:
            return Ending(code, frames, eof=False, reset=False, code_at=code_at)
        try:
            await asyncio.wait_for(self.reader.read(), max(0.01, deadline - loop.time()))
            eof = True
        except ConnectionResetError:
            reset = True
        except TimeoutError:
            pass
        return Ending(code, frames, eof=eof, reset=reset, code_at=code_at)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
