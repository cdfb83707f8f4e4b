"""An echo server over the real transport, for the Autobahn|Testsuite (tests only).

The production listener (``transport.ws.create_server`` with ``server.App``) is used
as is: picows, the lingering close, ``protocol/frames.py`` rules and reassembly, the
upgrade policy. Only the ``ConnectionHandler`` differs: instead of authentication and
the protobuf dispatcher, every complete message goes straight back. It lives under
``tests/``: no configuration of the installed server can reach it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from picows import WSMsgType

from sovereign.services.session import Session
from sovereign.transport.ws import Connection, create_server


class _NoRejects:
    def reject(self, s: Session, code: int, request_id: str, retry_after_ms: int) -> None:
        raise AssertionError("the echo handler never dispatches")


class EchoHandler:
    """A ``transport.ws.ConnectionHandler`` that echoes messages (SPEC §1 limits kept)."""

    def __init__(self, max_frame_bytes: int = 1_048_576, max_envelope_bytes: int = 65_536) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_envelope_bytes = max_envelope_bytes
        self.send_buffer_limit = 16 * 1_048_576
        self.max_connections = 10_000
        self.allowed_origins: frozenset[str] = frozenset()
        self.accepting = True
        self.trusted_proxies = ()
        self.static_site = None  # no web client on the echo server
        self.monotonic: Callable[[], float] = time.monotonic
        self.conns: set[Connection] = set()
        self.protocol_errors: list[int] = []
        self._seq = 0

    def opened(self, conn: Connection) -> Session:
        self._seq += 1
        self.conns.add(conn)
        s = Session(self._seq, conn, _NoRejects(), None)
        return s

    def received(self, s: Session, buf: memoryview, now: float) -> None:
        conn: Connection = s.link
        if conn.transport is not None:
            conn.transport.send(WSMsgType.BINARY, bytes(buf))

    def closed(self, conn: Connection) -> None:
        self.conns.discard(conn)

    def connection_count(self) -> int:
        return len(self.conns)

    def health_body(self) -> bytes:
        return b"{}"

    def protocol_error(self, s: Session, code: int, reason: str) -> None:
        self.protocol_errors.append(code)


async def start_echo(handler: EchoHandler) -> tuple[asyncio.Server, int]:
    server = await create_server(
        handler,
        "127.0.0.1",
        0,
        ssl_context=None,
        max_frame_size=handler.max_frame_bytes,
        handshake_timeout=5.0,
        backlog=128,
    )
    return server, int(server.sockets[0].getsockname()[1])


class ReadyEcho(EchoHandler):
    """Connections start READY-sized: a fragmented message may reach max_frame_bytes."""

    def opened(self, conn: Connection) -> Session:
        s = super().opened(conn)
        conn.authenticated()
        return s
