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
import sys
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Protocol

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from sovereign.errors import CloseCode
from sovereign.protocol import frames, static, upgrade
from sovereign.services.session import Session

log = logging.getLogger("sovereign.ws")

_DELIVER = frames.DELIVER
_REPLY_PONG = frames.REPLY_PONG
_FAIL = frames.FAIL
_ECHO_CLOSE = frames.ECHO_CLOSE
# What a finished upgrade's request and response keep: nothing (see on_ws_connected);
# read-only, so the one shared instance cannot be changed through any of them.
_NO_HEADERS: Any = MappingProxyType({})  # stands in for picows' CIMultiDict


class ConnectionHandler(Protocol):
    """What the shell calls: implemented by the composition root (``server.App``)."""

    @property
    def max_frame_bytes(self) -> int: ...
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


class Connection(WSListener):
    """One client connection. Small (``__slots__``): tens of thousands may be idle.

    Fan-out contract (``_fast/fanout.pyx``): ``live`` is True exactly while the
    connection takes live events (READY, backlog out, not closed); ``out`` is the raw
    asyncio transport or None once closed; ``overflow()`` drops a slow reader.
    """

    __slots__ = (
        "agent",
        "drained",
        "frames",
        "handler",
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
        self.frames = frames.FrameAssembler(handler.max_frame_bytes)
        self.paused = False
        self.drained: asyncio.Future[None] | None = None
        self.session: Session = None  # type: ignore[assignment]  # set on connect
        self.agent = ""

    # -- picows callbacks ---------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        # picows keeps the upgrade request and response on the transport for the whole
        # connection: ~2.5 KB of header strings per idle connection (tracemalloc).
        # Only the User-Agent is used later (session records); keep it, drop the rest.
        req, resp = transport.request, transport.response
        if req is not None:
            self.agent = sys.intern(str(req.headers.get("User-Agent", ""))[:200])
            req.headers = _NO_HEADERS
        if resp is not None:
            resp.headers = _NO_HEADERS
            resp.body = None
        out = self.out = transport.underlying_transport
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
        self.handler.closed(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        state = self.session.state
        if state.closed:
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
            self.handler.received(self.session, fa.message, now)
        elif verdict == _REPLY_PONG:
            transport.send_pong(fa.pong_payload)
        elif verdict == _FAIL:
            self.close(fa.close_code, fa.close_reason)
        elif verdict == _ECHO_CLOSE:
            state.closing(fa.close_code)
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode(fa.close_code))
            transport.disconnect()
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
        """A reader that does not keep up: drop it rather than buffer without bound.

        Its events stay in storage above its cursors and arrive on reconnect (SPEC §5).
        The close frame would queue behind the backlog, so the socket is aborted.
        """
        s = self.session
        if not s.state.closing(CloseCode.TRY_AGAIN_LATER):
            return
        self.live = False
        self.frames.close()
        log.info("closing slow reader conn=%s user=%s", s.conn_id, s.user_id)
        if self.transport is not None:
            self.transport.disconnect(graceful=False)

    def close(self, code: int, reason: str = "") -> None:
        t = self.transport
        self.live = False
        if not self.session.state.closing(int(code)):
            return
        self.frames.close()
        if t is None:
            return
        if not t.is_close_frame_sent:
            t.send_close(WSCloseCode(code), reason.encode()[:120] if reason else None)
        t.disconnect()

    def user_agent(self) -> str:
        return self.agent

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
            extra = (
                {"Sec-WebSocket-Protocol": decision.subprotocol} if decision.subprotocol else None
            )
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_101_response(extra), Connection(handler)
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
