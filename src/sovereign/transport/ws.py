"""picows glue: one :class:`Connection` listener per WebSocket (SPEC §1, §4).

Everything here is I/O glue. Policy lives in ``sovereign.protocol`` (state machine,
upgrade rules, dispatcher) and in the services. Frames are borrowed: a picows frame's
memory is valid only inside ``on_ws_frame``, so the dispatcher parses the payload
synchronously and handlers copy what they keep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from sovereign.codec import encode_envelope
from sovereign.errors import AUTH_ERROR_CODES, REGISTRY, CloseCode
from sovereign.protocol import upgrade
from sovereign.protocol.connection import ConnectionState
from sovereign.protocol.types import MessageType
from sovereign.transport.fanout import implementation as _fanout
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.server import App

log = logging.getLogger("sovereign.ws")
append_ws_frame = _fanout().append_ws_frame

_WS_PROTOCOL_ERROR = 1002  # RFC 6455 §7.4.1
_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION

# Fatal error codes and the close code that follows them (SPEC §4, §12.20).
_CLOSE_AFTER: dict[int, int] = {
    1002: CloseCode.SESSION_INVALID,
    1005: CloseCode.SESSION_INVALID,
    1006: CloseCode.PROTOCOL_ERROR,
    2004: CloseCode.ACCOUNT_DISABLED,
    9003: CloseCode.INTERNAL_ERROR,
}

_REJECT_TEXT: dict[int, str] = {
    1006: "authenticate first: only AUTH_* and PING are accepted before READY",
    3002: "unknown message type",
    3003: "envelope exceeds max_envelope_bytes",
    3004: "rate limited",
    3005: "invalid envelope",
}


class Connection(WSListener):
    """One client connection. Small (``__slots__``): tens of thousands may be idle."""

    __slots__ = (
        "app",
        "auth_busy",
        "bucket",
        "conn_id",
        "device_id",
        "frag",
        "is_admin",
        "live",
        "out",
        "pending",
        "presence",
        "ready_at",
        "session_id",
        "state",
        "transport",
        "typing_marks",
        "user_id",
        "username",
    )

    def __init__(self, app: App, conn_id: int) -> None:
        self.app = app
        self.conn_id = conn_id
        self.transport: WSTransport | None = None
        # Fan-out fast path (sovereign._fast.fanout): the raw asyncio transport and a
        # flag that is True exactly while the connection is READY and not closed.
        self.out: Any = None
        self.live = False
        self.state = ConnectionState()
        self.bucket = app.new_bucket()
        self.frag: bytearray | None = None
        self.user_id = ""
        self.username = ""
        self.session_id = ""
        self.device_id = ""
        self.is_admin = False
        self.ready_at = 0.0
        self.auth_busy = False
        self.pending: Any = None  # the messaging service's SyncState while syncing
        self.presence = "online"  # this connection's PRESENCE_UPDATE status
        self.typing_marks: dict[str, float] | None = None  # conversation -> last TYPING

    # -- picows callbacks ---------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.out = transport.underlying_transport
        self.state.upgraded(self.app.clock())
        self.app.connection_opened(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.live = False
        self.out = None
        self.state.closing(self.state.close_code or CloseCode.GOING_AWAY)
        self.frag = None
        self.app.connection_closed(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        state = self.state
        if state.closed:
            return
        now = self.app.clock()
        state.last_received = now  # SPEC §12.7: idle clock restarts on every frame
        mt = frame.msg_type
        # RFC 6455 §5.2: no extension is negotiated, so any RSV bit is an error.
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self.close(_WS_PROTOCOL_ERROR, "reserved bits set")
            return
        if mt is _BINARY:
            if self.frag is not None:  # RFC 6455 §5.4: a new message inside a fragmented one
                self.close(_WS_PROTOCOL_ERROR, "expected continuation frame")
                return
            if frame.fin:
                self.app.dispatch(self, frame.get_payload_as_memoryview(), now)
            else:
                self.frag = bytearray(frame.get_payload_as_memoryview())
            return
        if mt is _CONTINUATION:
            frag = self.frag
            if frag is None:
                self.close(_WS_PROTOCOL_ERROR, "continuation without a message")
                return
            # SPEC §1: a reassembled message over max_frame_bytes closes 1009 unbuffered.
            if len(frag) + frame.payload_size > self.app.config.max_frame_bytes:
                self.frag = None
                self.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
                return
            frag += frame.get_payload_as_memoryview()
            if frame.fin:
                self.frag = None
                self.app.dispatch(self, memoryview(frag), now)
            return
        if mt is WSMsgType.TEXT:
            self.close(CloseCode.UNSUPPORTED_DATA, "binary frames only")  # SPEC §1
            return
        if mt is WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())  # RFC 6455 §5.5.2
            return
        if mt is WSMsgType.CLOSE:
            # RFC 6455 §5.5.1: echo the peer's code, then close the TCP connection.
            code = frame.get_close_code()
            state.closing(code.value if code.value else CloseCode.NORMAL)
            if not transport.is_close_frame_sent:
                transport.send_close(code if code.value else WSCloseCode.OK)
            transport.disconnect()
            return
        # PONG: only refreshes the idle clock.

    def pause_writing(self) -> None:
        """Flow control is ours: writers check the buffer size against send_buffer_limit
        (overflow) or wait for it to drain (offline sync); picows need not log it."""

    def resume_writing(self) -> None:
        pass

    # -- output ---------------------------------------------------------------
    def send_payload(self, msg_type: int, request_id: str, payload: bytes) -> None:
        if self.transport is None or self.state.closed:
            return
        envelope = encode_envelope(msg_type, request_id, payload)
        corked = self.app.corked
        if corked is not None:  # inside a commit's effects: one write per connection
            buf = corked.get(self)
            if buf is None:
                buf = corked[self] = bytearray()
            append_ws_frame(buf, envelope)
            return
        self.transport.send(_BINARY, envelope)

    def send(self, msg_type: int, request_id: str, message: Any) -> None:
        self.send_payload(msg_type, request_id, message.SerializeToString())

    def send_error(
        self, code: int, request_id: str = "", message: str = "", retry_after_ms: int = 0
    ) -> None:
        """Render a registry error (SPEC §8): AuthError for auth codes, else Error.

        Fatal codes close the connection with the close code the SPEC pairs them with.
        """
        info = REGISTRY[code]
        text = message or info.name
        if code in AUTH_ERROR_CODES:
            self.send(
                MessageType.AUTH_ERROR, request_id, pb.AuthError(error_code=code, message=text)
            )
        else:
            self.send(
                MessageType.ERROR,
                request_id,
                pb.Error(code=code, message=text, fatal=info.fatal, retry_after_ms=retry_after_ms),
            )
        if info.fatal:
            self.close(_CLOSE_AFTER.get(code, CloseCode.PROTOCOL_ERROR), info.name)

    def reject(self, code: int, request_id: str, retry_after_ms: int) -> None:
        """Called by the dispatcher for envelope-level refusals (SPEC §1, §2, §12.7)."""
        self.app.metrics_rejected(code)
        self.send_error(code, request_id, _REJECT_TEXT.get(code, ""), retry_after_ms)

    def overflow(self) -> None:
        """A reader that does not keep up: drop it rather than buffer without bound.

        Its events stay in storage above its cursors and arrive on reconnect (SPEC §5).
        The close frame would queue behind the backlog, so the socket is aborted.
        """
        if not self.state.closing(CloseCode.TRY_AGAIN_LATER):
            return
        self.live = False
        self.frag = None
        log.info("closing slow reader conn=%s user=%s", self.conn_id, self.user_id)
        if self.transport is not None:
            self.transport.disconnect(graceful=False)

    def close(self, code: int, reason: str = "") -> None:
        t = self.transport
        self.live = False
        if not self.state.closing(int(code)):
            return
        self.frag = None
        if t is None:
            return
        if not t.is_close_frame_sent:
            t.send_close(WSCloseCode(code), reason.encode()[:120] if reason else None)
        t.disconnect()

    @property
    def ready(self) -> bool:
        return self.state.ready

    def peer(self) -> str:
        t = self.transport
        if t is None:
            return "-"
        info = t.underlying_transport.get_extra_info("peername")
        return f"{info[0]}:{info[1]}" if info else "-"


def make_listener_factory(
    app: App,
) -> Callable[[WSUpgradeRequest], WSUpgradeResponseWithListener]:
    """The picows router: HTTP upgrade policy (SPEC §1, §4) for ``/ws`` and ``/healthz``."""

    def factory(request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        headers = request.headers
        decision = upgrade.decide(
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            origin=headers.get("Origin"),
            offered_subprotocols=upgrade.parse_subprotocols(
                headers.getall("Sec-WebSocket-Protocol", [])
            ),
            allowed_origins=app.allowed_origins,
            active_connections=app.connection_count(),
            max_connections=app.config.max_connections,
            accepting=app.accepting,
        )
        if decision.status == 101:
            extra = (
                {"Sec-WebSocket-Protocol": decision.subprotocol} if decision.subprotocol else None
            )
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_101_response(extra), Connection(app, app.next_conn_id())
            )
        if decision.status == 200:
            body = app.health_body()
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_ok_response(
                    body, {"Content-Type": "application/json", "Cache-Control": "no-store"}
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
