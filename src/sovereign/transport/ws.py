"""picows glue: one :class:`Connection` listener per WebSocket (SPEC §1, §4).

A thin shell. Policy lives in ``sovereign.protocol`` (state machine, upgrade rules,
frame rules, dispatcher) and in the services; writes go through the outbox
(``transport/outbox.py``). Frames are borrowed: a picows frame's memory is valid only
inside ``on_ws_frame``, so the dispatcher parses the payload synchronously and handlers
copy what they keep.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
from collections.abc import Callable
from http import HTTPStatus
from ipaddress import IPv4Network, IPv6Network
from types import MappingProxyType
from typing import Any, Protocol

from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in the stub

from sovereign.errors import CloseCode
from sovereign.protocol import frames, static, upgrade
from sovereign.services.session import Session

log = logging.getLogger("sovereign.ws")

_DELIVER = frames.DELIVER
_NO_MESSAGE = frames.NO_MESSAGE
_REPLY_PONG = frames.REPLY_PONG
_FAIL = frames.FAIL
_ECHO_CLOSE = frames.ECHO_CLOSE
# What a finished upgrade's request and response keep: nothing (see on_ws_connected);
# read-only, so the one shared instance cannot be changed through any of them.
_NO_HEADERS: Any = MappingProxyType({})  # stands in for picows' CIMultiDict
_CLOSE = WSMsgType.CLOSE


class _AcceptHeader:
    """The one header picows sets on a 101 answer: ``Sec-WebSocket-Accept``."""

    __slots__ = ("value",)

    def __setitem__(self, name: str, value: str) -> None:
        if name != "Sec-WebSocket-Accept":  # picows 2.3 sets no other on a 101
            raise KeyError(name)
        self.value = value


class _Switching(WSUpgradeResponse):
    """A 101 Switching Protocols answer from bytes prepared once per subprotocol
    choice: the same bytes picows' ``create_101_response`` gives, without building a
    CIMultiDict and formatting each header at every accept (a resume storm is one
    upgrade per resume: docs/performance.md). Written once; ``on_ws_connected``
    drops its headers as for any answer."""

    __slots__ = ("_accept", "_head")

    def __init__(self, head: bytes) -> None:
        self.version = b"HTTP/1.1"
        self.status = HTTPStatus.SWITCHING_PROTOCOLS
        self._accept: _AcceptHeader | None = _AcceptHeader()
        self.headers = self._accept  # type: ignore[assignment]  # picows sets one key
        self.body = None
        self._head = head

    def to_bytes(self) -> bytearray:
        accept, self._accept = self._accept, None
        assert accept is not None, "a 101 answer is written once"
        return bytearray(b"%b%b\r\n\r\n" % (self._head, accept.value.encode()))


def _switching_head(subprotocol: str | None) -> bytes:
    extra = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        f"{extra}Connection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: "
    ).encode()


_SWITCHING_HEAD = {
    None: _switching_head(None),
    upgrade.SUBPROTOCOL: _switching_head(upgrade.SUBPROTOCOL),
}

#: SPEC §12.31, RFC 6455 §7.1.1: after its close frame the server keeps the socket
#: until the peer's close frame, or this long once the close frame has left.
CLOSE_TIMEOUT = 1.0
#: A slow reader's close frame queues behind up to ``send_buffer_limit`` of backlog:
#: the socket waits for it to drain at most this long, then is aborted.
CLOSE_FLUSH_LIMIT = 10.0


class ConnectionHandler(Protocol):
    """What the shell calls: implemented by the composition root (``server.App``)."""

    @property
    def max_frame_bytes(self) -> int: ...
    @property
    def max_envelope_bytes(self) -> int: ...
    @property
    def trusted_proxies(self) -> tuple[IPv4Network | IPv6Network, ...]: ...
    @property
    def send_buffer_limit(self) -> int: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def allowed_origins(self) -> frozenset[str]: ...
    @property
    def accepting(self) -> bool: ...
    @property
    def monotonic(self) -> Callable[[], float]: ...

    def opened(self, conn: Connection) -> Session: ...
    def received(self, s: Session, buf: memoryview, now: float) -> None: ...
    def closed(self, conn: Connection) -> None: ...
    def connection_count(self) -> int: ...
    def health_body(self) -> bytes: ...
    @property
    def static_site(self) -> static.StaticSite | None: ...
    def protocol_error(self, s: Session, code: int, reason: str) -> None: ...


class Connection(WSListener):
    """One client connection. Small (``__slots__``): tens of thousands may be idle.

    Fan-out contract (``_fast/fanout.pyx``): ``live`` is True exactly while the
    connection takes live events (READY, backlog out, not closed); ``out`` is the raw
    asyncio transport or None once closed; ``overflow()`` drops a slow reader.
    """

    __slots__ = (
        "agent",
        "drained",
        "forwarded",
        "frames",
        "handler",
        "linger",
        "live",
        "out",
        "paused",
        "session",
        "transport",
    )

    def __init__(self, handler: ConnectionHandler) -> None:
        self.handler = handler
        self.transport: WSTransport | None = None
        self.out: Any = None
        self.live = False
        # RFC 6455 rules and reassembly (sans-I/O, protocol/frames.py).
        # SPEC §12.31: before READY a fragmented message buffers max_envelope_bytes.
        self.frames = frames.FrameAssembler(handler.max_frame_bytes, handler.max_envelope_bytes)
        self.paused = False
        self.drained: asyncio.Future[None] | None = None
        self.session: Session = None  # type: ignore[assignment]  # set on connect
        self.agent = ""
        # X-Forwarded-For as the upgrade carried it, kept only behind trusted proxies
        # (the per-IP limits read it after the headers are dropped, SPEC §12.32).
        self.forwarded: list[str] | None = None
        self.linger: LingeringTransport | None = None

    # -- picows callbacks ---------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        # picows keeps the upgrade request and response on the transport for the whole
        # connection: ~2.5 KB of header strings per idle connection (tracemalloc).
        # Only the User-Agent is used later (session records), and X-Forwarded-For
        # behind a trusted proxy; keep those, drop the rest.
        req, resp = transport.request, transport.response
        if req is not None:
            self.agent = sys.intern(str(req.headers.get("User-Agent", ""))[:200])
            if self.handler.trusted_proxies:
                self.forwarded = list(req.headers.getall("X-Forwarded-For", []))
            req.headers = _NO_HEADERS
            # The request line's three slices are bytes objects of their own (~0.15 KB).
            req.method = req.path = req.version = b""
        if resp is not None:
            resp.headers = _NO_HEADERS
            resp.body = None
        lt = transport.underlying_transport
        if isinstance(lt, LingeringTransport):
            lt.conn = self
            self.linger = lt
            out = self.out = lt.raw
        else:  # a picows server not built by create_server (never in production)
            out = self.out = lt
        # pause_writing above half the send limit: a backlog writer waits there.
        limit = self.handler.send_buffer_limit
        out.set_write_buffer_limits(high=limit // 2, low=limit // 4)
        self.session = self.handler.opened(self)
        self.session.state.upgraded(self.handler.monotonic())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.live = False
        self.out = None
        s = self.session
        if s is None:
            return
        s.state.closing(s.state.close_code or CloseCode.GOING_AWAY)
        self.frames.close()
        self._wake_writer()
        if self.linger is not None:
            self.linger.cancel()
        self.handler.closed(self)
        self.transport = None  # picows' transport refers back to this listener

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        state = self.session.state
        if state.closed:
            # Closing (RFC 6455 §7.1.1): application data is dropped; the peer's
            # close frame completes the handshake and the TCP close follows at once.
            if frame.msg_type == _CLOSE:
                self._finish()
            return
        now = self.handler.monotonic()
        state.last_received = now  # SPEC §12.7: idle clock restarts on every frame
        fa = self.frames
        verdict = fa.receive(
            frame.msg_type,  # type: ignore[arg-type]  # an IntEnum at run time
            frame.fin,
            frame.rsv1 or frame.rsv2 or frame.rsv3,
            frame.get_payload_as_memoryview(),
            frame.payload_size,
        )
        if verdict == _DELIVER:
            # Not left in the assembler: an idle connection would keep its last
            # message's view (and picows' buffer object behind it, ~0.3 KB) for life.
            msg = fa.message
            fa.message = _NO_MESSAGE
            self.handler.received(self.session, msg, now)
        elif verdict == _REPLY_PONG:
            transport.send_pong(fa.pong_payload)
        elif verdict == _FAIL:
            self.handler.protocol_error(self.session, fa.close_code, fa.close_reason)
            self.close(fa.close_code, fa.close_reason)
        elif verdict == _ECHO_CLOSE:
            state.closing(fa.close_code)
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode(fa.close_code))
            self._finish()  # the peer closed first: the server closes TCP now
        # PENDING, IGNORE (PONG included): nothing more to do.

    # -- flow control (asyncio write-buffer watermarks) ------------------------
    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        fut, self.drained = self.drained, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait_writable(self) -> None:
        """Return once the send buffer is below its low-water mark (or closed)."""
        while self.paused and self.out is not None:
            fut = self.drained
            if fut is None:
                fut = self.drained = asyncio.get_running_loop().create_future()
            await fut

    # -- closing ----------------------------------------------------------------
    def overflow(self) -> None:
        """A reader that does not keep up: close it 1013 rather than buffer without bound.

        Its events stay in storage above its cursors and arrive on reconnect (SPEC §5).
        Nothing more is queued for it; the close frame follows the backlog already in
        the send buffer (bounded by ``send_buffer_limit``) and the socket is aborted if
        that has not drained within ``CLOSE_FLUSH_LIMIT`` (SPEC §12.31).
        """
        s = self.session
        if s.state.closed:
            return
        log.info("closing slow reader conn=%s user=%s", s.conn_id, s.user_id)
        self.close(CloseCode.TRY_AGAIN_LATER, "slow reader")

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake (SPEC §12.31, RFC 6455 §7.1.1): send the close
        frame, stop reading application data, keep the socket until the peer's close
        frame or ``CLOSE_TIMEOUT``. Closing at once would make the kernel answer the
        peer's unread input with a reset, and the peer would never see the code."""
        t = self.transport
        self.live = False
        if not self.session.state.closing(int(code)):
            return
        self.frames.close()
        self.out = None  # nothing more is queued for it
        self._wake_writer()  # a backlog writer waiting for the buffer to drain gives up
        if t is None:
            return
        if not t.is_close_frame_sent:
            if not frames.sendable_close_code(int(code)):
                code = CloseCode.INTERNAL_ERROR  # never 1005/1006 or a reserved code on the wire
            t.send_close(WSCloseCode(code), reason.encode()[:120] if reason else None)
        if self.linger is not None:
            self.linger.linger()
        else:
            t.disconnect()

    def authenticated(self) -> None:
        """READY: a fragmented message may now reach ``max_frame_bytes`` (an oversized
        Envelope is then the non-fatal 3003, SPEC §1)."""
        self.frames.set_fragment_limit(self.frames.max_message_bytes)

    def ping(self) -> None:
        """A WebSocket ping (SPEC §12.31); any frame back restarts the idle clock."""
        t = self.transport
        if t is not None and not self.session.state.closed:
            t.send_ping()

    def parser_failed(self) -> None:
        """picows failed the connection on a framing error of its own and sent its
        close frame (SPEC §12.32: logged, rate-limited, no payload)."""
        t = self.transport
        code = 1002
        if t is not None and t.close_handshake is not None and t.close_handshake.sent:
            sent: Any = t.close_handshake.sent.code
            code = int(getattr(sent, "value", sent))
        self.session.state.closing(code)
        self.live = False
        self.frames.close()
        self.handler.protocol_error(self.session, code, "framing error")

    def _finish(self) -> None:
        if self.linger is not None:
            self.linger.finish()
        elif self.transport is not None:
            self.transport.disconnect()

    def user_agent(self) -> str:
        return self.agent

    def source_ip(self) -> str:
        """The client's IP for the per-IP limits (SPEC §12.32): the socket's peer, or
        behind a trusted proxy the address it names in X-Forwarded-For."""
        t = self.transport
        if t is None:
            return "-"
        info = t.underlying_transport.get_extra_info("peername")
        peer_ip = str(info[0]) if info else "-"
        trusted = self.handler.trusted_proxies
        if not trusted:
            return peer_ip
        return upgrade.client_ip(peer_ip, self.forwarded or [], trusted)

    def peer(self) -> str:
        t = self.transport
        if t is None:
            return "-"
        info = t.underlying_transport.get_extra_info("peername")
        return f"{info[0]}:{info[1]}" if info else "-"


def make_listener_factory(
    handler: ConnectionHandler,
) -> Callable[[WSUpgradeRequest], WSUpgradeResponseWithListener]:
    """The picows router: HTTP upgrade policy (SPEC §1, §4) for ``/ws`` and ``/healthz``,
    and the web client's files (SPEC §12.30) when it is on."""

    def factory(request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        headers = request.headers
        site = handler.static_site
        if site is not None:
            path = request.path.decode("latin-1")
            if static.is_static_path(path):
                return serve_static(site, request.method.decode("latin-1"), path)
        decision = upgrade.decide(
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            origin=headers.get("Origin"),
            offered_subprotocols=upgrade.parse_subprotocols(
                headers.getall("Sec-WebSocket-Protocol", [])
            ),
            allowed_origins=handler.allowed_origins,
            active_connections=handler.connection_count(),
            max_connections=handler.max_connections,
            accepting=handler.accepting,
        )
        if decision.status == 101:
            return WSUpgradeResponseWithListener(
                _Switching(_SWITCHING_HEAD[decision.subprotocol]), Connection(handler)
            )
        if decision.status == 200:
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_ok_response(
                    handler.health_body(),
                    {"Content-Type": "application/json", "Cache-Control": "no-store"},
                ),
                None,
            )
        if decision.status in (403, 503):
            log.info("upgrade refused: %s %s", decision.status, decision.reason)
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_error_response(decision.status, decision.reason.encode()),
            None,
        )

    return factory


def serve_static(site: static.StaticSite, method: str, path: str) -> WSUpgradeResponseWithListener:
    answer = site.decide(method, path)
    if answer.status == 200:
        response = WSUpgradeResponse.create_ok_response(answer.body, dict(answer.headers or {}))
    else:
        response = WSUpgradeResponse.create_error_response(answer.status, answer.reason.encode())
    return WSUpgradeResponseWithListener(response, None)


# -- the closing handshake under picows -------------------------------------------------


class _Discard(asyncio.Protocol):
    """Reads and drops a failed connection's input until EOF (or the linger timer).

    picows cannot parse on after a framing error of its own (an unmasked frame, a bad
    length, a frame over ``max_frame_size``): its buffer would only grow. The socket
    still has to be read, or closing it answers the peer with a reset."""

    __slots__ = ("inner",)

    def __init__(self, inner: asyncio.BaseProtocol) -> None:
        self.inner = inner

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the peer is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)


class LingeringTransport:
    """The asyncio transport as picows sees it; only ``close`` differs (SPEC §12.31).

    picows closes a connection it failed itself (framing errors) 10 ms after its
    close frame, through ``close()`` here; the server's own closes call
    :meth:`linger`. Either way the socket stays open, its input read and dropped,
    until the peer's close frame (:meth:`finish`), the peer's EOF, or ``CLOSE_TIMEOUT``
    after the close frame left. Writes go straight to the real transport: ``write``
    and ``get_write_buffer_size`` are the real transport's bound methods, copied (picows
    keeps both for its own hot path anyway), so that path pays nothing for this
    object. The rest are rare calls and delegate: a copied bound method is 64-80 bytes
    per connection, ~0.5 KB for the seven (docs/performance.md, idle).
    """

    __slots__ = (
        "_deadline",
        "_protocol",
        "_timer",
        "conn",
        "get_write_buffer_size",
        "opening",
        "raw",
        "write",
    )

    def __init__(self, raw: Any, protocol: asyncio.BaseProtocol) -> None:
        self.raw = raw
        self._protocol = protocol
        self.conn: Connection | None = None  # set once upgraded
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self.write = raw.write
        self.get_write_buffer_size = raw.get_write_buffer_size
        #: While picows' connection_made runs: its socket (see :class:`OpeningSocket`).
        self.opening: OpeningSocket | None = None

    def writelines(self, data: Any) -> None:
        self.raw.writelines(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        opening = self.opening
        if opening is not None:
            if name == "socket":
                return opening
            if name == "sockname":
                return opening.sock.getsockname()
        return self.raw.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return bool(self.raw.is_closing())

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def abort(self) -> None:
        self.raw.abort()

    def close(self) -> None:
        """picows wants the socket closed: at once before the upgrade (an HTTP error,
        the handshake timeout); after it, a framing error picows failed itself."""
        conn = self.conn
        if conn is None or self.raw.is_closing():
            self.raw.close()
            return
        if not conn.session.state.closed:
            conn.parser_failed()
        self.raw.set_protocol(_Discard(self._protocol))
        self.linger()

    def linger(self) -> None:
        if self._timer is None and not self.raw.is_closing():
            loop = asyncio.get_running_loop()
            self._deadline = loop.time() + CLOSE_FLUSH_LIMIT
            self._timer = loop.call_later(CLOSE_TIMEOUT, self._expired)

    def finish(self) -> None:
        """The closing handshake is complete: close TCP (after the queued writes)."""
        self.cancel()
        self.raw.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def release(self) -> None:
        """The connection is gone: drop the links back to its protocol and listener."""
        self.cancel()
        self._protocol = None  # type: ignore[assignment]
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.linger = None

    def _expired(self) -> None:
        self._timer = None
        raw = self.raw
        if raw.is_closing():
            return
        if raw.get_write_buffer_size():
            # The close frame is still queued behind a backlog: wait for it to leave.
            loop = asyncio.get_running_loop()
            if loop.time() < self._deadline:
                self._timer = loop.call_later(CLOSE_TIMEOUT, self._expired)
                return
            raw.abort()
            return
        raw.close()


class OpeningSocket:
    """An accepted connection's socket, as picows' ``connection_made`` uses it: it sets
    TCP_NODELAY and TCP_QUICKACK, reads four options for a log line and asks for the
    socket's name. uvloop's socket stand-in builds a new ``socket.socket`` for each of
    those calls, and each one validates the descriptor with a ``getsockname``: seven
    objects and eight ``getsockname`` calls per accepted connection (strace of a resume
    storm). This is one socket object on the descriptor for the whole call, then
    :meth:`release`: it never owns the descriptor (uvloop's transport does), so it is
    detached, never closed. The options are set and read for real."""

    __slots__ = ("sock",)

    def __init__(self, fd: int) -> None:
        # The family comes from the getsockname that validates the descriptor; type and
        # protocol are given, so no getsockopt is spent finding them.
        self.sock = socket.socket(-1, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd)

    @classmethod
    def of(cls, transport: asyncio.BaseTransport) -> OpeningSocket | None:
        """For ``transport``'s socket; None when it has none to give or its descriptor
        is refused (picows then asks the transport itself, as before)."""
        stand_in = transport.get_extra_info("socket")
        fd = stand_in.fileno() if stand_in is not None else -1
        if fd < 0:
            return None
        try:
            return cls(fd)
        except OSError:
            return None

    def setsockopt(self, *args: Any) -> None:
        self.sock.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self.sock.getsockopt(*args)

    def fileno(self) -> int:
        return self.sock.fileno()

    def release(self) -> None:
        self.sock.detach()


class _Protocol(WSProtocol):  # type: ignore[misc]  # untyped (no stub)
    """picows's protocol over a :class:`LingeringTransport`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        lt = LingeringTransport(transport, self)
        self._lingering: LingeringTransport | None = lt
        lt.opening = OpeningSocket.of(transport)
        try:
            super().connection_made(lt)
        finally:
            if lt.opening is not None:
                lt.opening.release()
                lt.opening = None

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            # Break the reference cycles of a closed connection (protocol, transport
            # wrapper, listener), so it is freed when its last reference goes, not at
            # the next full collection: `serve` collects rarely (collector.tune_gc), and
            # a storm of short connections otherwise piles up tens of MB until then.
            lt, self._lingering = self._lingering, None
            if lt is not None:
                lt.release()


async def create_server(
    handler: ConnectionHandler,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    max_frame_size: int,
    handshake_timeout: float,
    backlog: int,
    reuse_port: bool = False,
) -> asyncio.Server:
    """``picows.ws_create_server`` with the closing handshake of SPEC §12.31.

    Builds picows's own protocol (its constructor as ``picows.api.ws_create_server``
    calls it, picows 2.3) with the transport wrapped; every other option is the one
    the server used before: we answer pings ourselves so they reset the idle clock.
    """
    factory = make_listener_factory(handler)
    # Not a logging.Logger on purpose: given one, picows builds a child Logger per
    # connection ("picows.transport.<fd>", with its own level cache, handler and filter
    # lists: ~0.6 KB per connection for its whole life, and CPU at every accept).
    # Given an adapter it logs through it as is: same records, one logger name for all.
    logger = logging.LoggerAdapter(logging.getLogger("picows.transport"), {})

    def protocol() -> _Protocol:
        return _Protocol(
            None,  # host+port: server side
            None,  # ws_path
            False,  # is_client_side
            factory,
            logger,
            True,  # disconnect_on_exception
            handshake_timeout,
            False,  # enable_auto_ping
            10.0,
            10.0,
            WSAutoPingStrategy.PING_WHEN_IDLE,  # unused without auto ping
            False,  # enable_auto_pong
            max_frame_size,
            None,  # extra_headers
            1024,  # read_buffer_init_size
        )

    loop = asyncio.get_running_loop()
    return await loop.create_server(
        protocol,
        host,
        port,
        ssl=ssl_context,
        reuse_address=True,
        reuse_port=reuse_port or None,  # serve --workers: the workers share the port
        backlog=backlog,
    )
