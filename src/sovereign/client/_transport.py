"""picows glue for the client: one :class:`Connection` per WebSocket.

Frames are handed to the client synchronously from picows' callbacks (a frame's
memory is only valid inside the callback, so payloads are copied to ``bytes``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping

import picows
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from sovereign.client.errors import ConnectError

__all__ = ["SUBPROTOCOL", "Connection", "open_connection"]

SUBPROTOCOL = "sovereign.v1"
ABNORMAL_CLOSURE = 1006  # RFC 6455 §7.1.5: closed without a close frame

log = logging.getLogger("sovereign.client")

MessageCallback = Callable[["Connection", bytes], None]
DisconnectCallback = Callable[["Connection"], None]


class Connection:
    """One WebSocket connection: send frames, close, remember how it closed.

    ``ready`` is set by the client once authentication succeeded. ``close_code`` is the
    code from the server's close frame, or None until one arrives; ``effective_close_code``
    falls back to 1006 (dropped without a close frame).
    """

    __slots__ = (
        "_on_disconnected",
        "_on_message",
        "close_code",
        "close_reason",
        "closed",
        "conn_id",
        "local_reason",
        "ready",
        "subprotocol",
        "transport",
    )

    _next_id = 0

    def __init__(self, on_message: MessageCallback, on_disconnected: DisconnectCallback) -> None:
        Connection._next_id += 1
        self.conn_id = Connection._next_id
        self._on_message = on_message
        self._on_disconnected = on_disconnected
        self.transport: WSTransport | None = None
        self.ready = False
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.local_reason = ""
        self.subprotocol = ""

    @property
    def effective_close_code(self) -> int:
        """The server's close code, or 1006 if the connection dropped without one."""
        return self.close_code if self.close_code is not None else ABNORMAL_CLOSURE

    def send(self, frame: bytes) -> bool:
        """Write one binary frame; False if the connection is already closed."""
        t = self.transport
        if t is None or self.closed or t.is_disconnected:
            return False
        try:
            t.send(WSMsgType.BINARY, frame)
        except Exception as exc:  # picows raises on a transport that is going away
            log.debug("send failed on connection %d: %s", self.conn_id, exc)
            return False
        return True

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start a graceful close (close frame, then disconnect)."""
        t = self.transport
        if t is None or t.is_disconnected:
            return
        if reason:
            self.local_reason = reason
        try:
            if not t.is_close_frame_sent:
                t.send_close(WSCloseCode(code), reason.encode()[:120] if reason else None)
            t.disconnect()
        except Exception as exc:
            log.debug("close failed on connection %d: %s", self.conn_id, exc)

    def abort(self, reason: str) -> None:
        """Drop the connection at once (the peer stopped answering)."""
        t = self.transport
        self.local_reason = reason
        if t is None or t.is_disconnected:
            return
        try:
            t.disconnect(graceful=False)
        except Exception as exc:
            log.debug("abort failed on connection %d: %s", self.conn_id, exc)

    async def wait_closed(self, timeout: float = 2.0) -> None:
        """Wait until the socket is gone (bounded by ``timeout``)."""
        t = self.transport
        if t is None or t.is_disconnected:
            return
        try:
            async with asyncio.timeout(timeout):
                await t.wait_disconnected()
        except TimeoutError:
            t.disconnect(graceful=False)

    # -- called by the listener ------------------------------------------------------
    def _frame(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._on_message(self, data)
        except Exception:  # never let a client bug tear down the transport
            log.exception("failed to handle a frame on connection %d", self.conn_id)

    def _disconnected(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._on_disconnected(self)
        except Exception:
            log.exception("failed to handle the end of connection %d", self.conn_id)


class _Listener(WSListener):
    """picows callbacks -> :class:`Connection`; reassembles fragmented messages."""

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self.conn = conn
        self.frag: bytearray | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.conn.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        mt = frame.msg_type
        if mt is WSMsgType.BINARY:
            if frame.fin:
                self.frag = None
                self.conn._frame(frame.get_payload_as_bytes())
            else:
                self.frag = bytearray(frame.get_payload_as_memoryview())
            return
        if mt is WSMsgType.CONTINUATION:
            if self.frag is None:
                return
            self.frag += frame.get_payload_as_memoryview()
            if frame.fin:
                data = bytes(self.frag)
                self.frag = None
                self.conn._frame(data)
            return
        if mt is WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.conn.close_code = int(code.value) or 1005
            self.conn.close_reason = frame.get_close_message().decode("utf-8", "replace")
            if not transport.is_close_frame_sent:
                transport.send_close(code if code.value else WSCloseCode.OK)
            transport.disconnect()
            return
        if mt is WSMsgType.TEXT:  # SPEC §1: binary frames only
            transport.send_close(WSCloseCode.UNSUPPORTED_DATA)
            transport.disconnect()
        # PING is answered by picows (enable_auto_pong); PONG needs nothing.

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.frag = None
        self.conn._disconnected()


async def open_connection(
    url: str,
    *,
    on_message: MessageCallback,
    on_disconnected: DisconnectCallback,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
    max_frame_size: int = 16 * 1024 * 1024,
) -> Connection:
    """Open a WebSocket offering ``sovereign.v1``; raises :class:`ConnectError`."""
    conn = Connection(on_message, on_disconnected)
    extra = {"Sec-WebSocket-Protocol": SUBPROTOCOL}
    if headers:
        extra.update(headers)
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await picows.ws_connect(
                lambda: _Listener(conn),
                url,
                ssl_context=ssl_context,
                websocket_handshake_timeout=timeout,
                extra_headers=extra,
                enable_auto_pong=True,
                max_frame_size=max_frame_size,
                logger_name="sovereign.client.ws",
            )
    except picows.WSHandshakeError as exc:
        status = exc.response.status if exc.response is not None else None
        code = int(status) if status is not None else None
        raise ConnectError(f"WebSocket upgrade refused: {exc}", status=code) from exc
    except TimeoutError as exc:
        raise ConnectError(f"connecting to {url} timed out after {timeout} s") from exc
    except (OSError, picows.WSError, ssl.SSLError) as exc:
        raise ConnectError(f"cannot connect to {url}: {exc}") from exc
    conn.transport = transport
    # RFC 6455 §4.1: a subprotocol the client did not offer fails the connection.
    response = transport.response
    chosen = response.headers.get("Sec-WebSocket-Protocol") if response is not None else None
    if chosen and chosen.strip() != SUBPROTOCOL:
        conn.close(1002, "unexpected subprotocol")
        raise ConnectError(f"server chose subprotocol {chosen!r}, not {SUBPROTOCOL!r}")
    conn.subprotocol = chosen.strip() if chosen else ""
    return conn
