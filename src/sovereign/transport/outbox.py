"""The outbox: the only code that writes to a connection (SPEC §1, §5).

:class:`LocalOutbox` implements :class:`sovereign.services.ports.Outbox` over this
process's picows connections. It owns

- the registry of connections, and of READY ones by user (fan-out walks it);
- corking: while a commit's effects run, frames collect per connection and each
  connection then gets one write (a write is one syscall: the dominant cost);
- the write-with-limit rule: a write that would push a connection's send buffer past
  ``send_buffer_limit`` drops that slow reader instead (close 1013, SPEC §5; its events
  stay stored). The compiled fan-out (``_fast/fanout.pyx``) applies the same rule on
  the hot path; :meth:`LocalOutbox._write` is its only Python form;
- flow control for backlogs, driven by the transport's ``pause_writing`` /
  ``resume_writing`` (see :meth:`sovereign.transport.ws.Connection.wait_writable`);
- rendering of errors (the one error-response helper, SPEC §8).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

from google.protobuf.message import Message
from picows import WSMsgType

from sovereign import implementations
from sovereign.codec import encode_envelope
from sovereign.errors import REGISTRY, ErrorCode
from sovereign.protocol.types import MessageType
from sovereign.services.session import Session
from sovereign.stats import ServerStats
from sovereign.transport.ws import Connection
from sovereign.v1 import sovereign_pb2 as pb

log = logging.getLogger("sovereign.outbox")
#: SPEC §12.32: refusals and fatal errors, rate-limited by the composition root.
abuse = logging.getLogger("sovereign.abuse")

_BINARY = WSMsgType.BINARY
_fan = implementations.load("fanout")
_append_ws_frame = _fan.append_ws_frame

_REJECT_TEXT: dict[int, str] = {
    ErrorCode.AUTH_REQUIRED: "authenticate first: only AUTH_* and PING are accepted before READY",
    ErrorCode.UNKNOWN_MESSAGE_TYPE: "unknown message type",
    ErrorCode.MESSAGE_TOO_LARGE: "envelope exceeds max_envelope_bytes",
    ErrorCode.RATE_LIMITED: "rate limited",
    ErrorCode.INVALID_ENVELOPE: "invalid envelope",
}


K = TypeVar("K")


class Corking(Generic[K]):
    """What every outbox shares, whatever it writes to (this process's sockets, a test's
    lists, a benchmark's buffers): encode-once ephemeral pushes, and corking — while
    corked, frames collect per target (``K``: a connection, a session) and leave at
    :meth:`uncork` as one :meth:`_flush` each, in the order they were written."""

    frame: Callable[[bytes], bytes]
    _corked: dict[K, bytearray] | None = None

    def publish(self, frame: bytes, user_ids: Iterable[str], exclude: Session | None) -> None:
        raise NotImplementedError

    #: Write one target's corked frames (what it returns is ignored).
    _flush: Callable[[K, bytearray], object]

    def publish_message(
        self,
        user_ids: Iterable[str],
        msg_type: int,
        message: Message,
        exclude: Session | None = None,
    ) -> None:
        frame = self.frame(encode_envelope(msg_type, "", message.SerializeToString()))
        self.publish(frame, user_ids, exclude)

    def cork(self) -> None:
        if self._corked is None:
            self._corked = {}

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked:
            for target, buf in corked.items():
                self._flush(target, buf)  # not mutated after: no copy


class LocalOutbox(Corking[Connection]):
    frame = staticmethod(_fan.ws_frame)
    append_frame = staticmethod(_append_ws_frame)

    def __init__(self, send_buffer_limit: int, stats: ServerStats | None = None) -> None:
        self.limit = send_buffer_limit
        #: Counters read by /metrics (SPEC §12.25); None when metrics are off.
        self.stats = stats
        self._out = stats.envelopes_out if stats is not None else None
        self._conns: dict[int, Connection] = {}
        self._by_user: dict[str, list[Connection]] = {}
        self._corked: dict[Connection, bytearray] | None = None
        self._fanout = _fan.fanout
        self._collect = _fan.collect
        #: Envelope-level refusals by error code (SPEC §1, §2, §9).
        self.rejected: dict[int, int] = {}

    # -- registry -------------------------------------------------------------------
    def opened(self, conn: Connection) -> None:
        self._conns[id(conn)] = conn

    def closed(self, conn: Connection) -> None:
        self._conns.pop(id(conn), None)
        user_id = conn.session.user_id
        conns = self._by_user.get(user_id) if user_id else None
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._by_user[user_id]

    def attach(self, s: Session) -> Sequence[Session]:
        conns = self._by_user.setdefault(s.user_id, [])
        conns.append(s.link)
        s.link.authenticated()
        return [c.session for c in conns]

    def detach(self, s: Session) -> None:
        """Take ``s`` out of its user's index (closing over the per-user cap)."""
        conns = self._by_user.get(s.user_id)
        if conns is not None and s.link in conns:
            conns.remove(s.link)
            if not conns:
                del self._by_user[s.user_id]

    def sessions(self, user_id: str) -> Sequence[Session]:
        return [c.session for c in self._by_user.get(user_id, ())]

    def live_sessions(self, user_id: str) -> Iterable[Session]:
        return [c.session for c in self._by_user.get(user_id, ()) if c.live]

    def all_sessions(self) -> Iterable[Session]:
        return [c.session for c in self._conns.values()]

    def count(self) -> int:
        return len(self._conns)

    # -- one connection -------------------------------------------------------------
    def send_payload(self, s: Session, msg_type: int, request_id: str, payload: bytes) -> None:
        conn: Connection = s.link
        t = conn.transport
        if t is None or s.state.closed:
            return
        envelope = encode_envelope(msg_type, request_id, payload)
        out = self._out
        if out is not None:
            out[msg_type] = out.get(msg_type, 0) + 1
        corked = self._corked
        if corked is not None:  # inside a commit's effects: one write per connection
            buf = corked.get(conn)
            if buf is None:
                buf = corked[conn] = bytearray()
            _append_ws_frame(buf, envelope)
            return
        t.send(_BINARY, envelope)

    def send(self, s: Session, msg_type: int, request_id: str, message: Message) -> None:
        self.send_payload(s, msg_type, request_id, message.SerializeToString())

    def response_frame(self, msg_type: int, request_id: str, message: Message) -> bytes:
        out = self._out
        if out is not None:
            out[msg_type] = out.get(msg_type, 0) + 1
        envelope = encode_envelope(msg_type, request_id, message.SerializeToString())
        frame: bytes = _fan.ws_frame(envelope)
        return frame

    def send_error(
        self,
        s: Session,
        code: int,
        request_id: str = "",
        message: str = "",
        retry_after_ms: int = 0,
    ) -> None:
        info = REGISTRY[code]
        text = message or info.name
        if self.stats is not None:
            errs = self.stats.errors_sent
            errs[code] = errs.get(code, 0) + 1
        if info.auth:
            self.send(
                s, MessageType.AUTH_ERROR, request_id, pb.AuthError(error_code=code, message=text)
            )
        else:
            self.send(
                s,
                MessageType.ERROR,
                request_id,
                pb.Error(code=code, message=text, fatal=info.fatal, retry_after_ms=retry_after_ms),
            )
        if info.close_code is not None:
            s.link.close(info.close_code, info.name)

    def reject(self, s: Session, code: int, request_id: str, retry_after_ms: int) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        abuse.info("refused conn=%s user=%s error=%s", s.conn_id, s.user_id or "-", code)
        self.send_error(s, code, request_id, _REJECT_TEXT.get(code, ""), retry_after_ms)

    def close(self, s: Session, code: int, reason: str = "") -> None:
        s.link.close(code, reason)

    def go_live(self, s: Session) -> bool:
        if s.state.closed:
            return False
        s.link.live = True
        return True

    async def write_backlog(self, s: Session, data: bytes | bytearray) -> None:
        conn: Connection = s.link
        if not data or s.state.closed or conn.out is None:
            return
        await conn.wait_writable()
        if conn.out is not None and not s.state.closed:
            conn.out.write(bytes(data))

    # -- many connections -------------------------------------------------------------
    def publish(self, frame: bytes, user_ids: Iterable[str], exclude: Session | None) -> None:
        ex = exclude.link if exclude is not None else None
        corked = self._corked
        if corked is None:
            n = self._fanout(frame, self._by_user, user_ids, ex, self.limit)
        else:
            n = self._collect(frame, self._by_user, user_ids, ex, corked)
        stats = self.stats
        if stats is not None and n:
            stats.deliveries += n
            # The Envelope type, read from the server frame (unmasked, RFC 6455 §5.2)
            # without decoding: its first field (tag 0x08) is a varint.
            b = frame[1] & 0x7F
            i = 2 if b < 126 else 4 if b == 126 else 10
            t = frame[i + 1] if len(frame) > i + 1 and frame[i] == 0x08 else 0
            if t & 0x80 and len(frame) > i + 2:
                t = (t & 0x7F) | (frame[i + 2] << 7)
            out = stats.envelopes_out
            out[t] = out.get(t, 0) + n

    def _write(self, conn: Connection, data: bytes | bytearray) -> bool:
        """The write-with-limit rule (SPEC §5): over the limit, drop the slow reader."""
        out = conn.out
        if out is None or conn.session.state.closed:
            return False
        if out.get_write_buffer_size() + len(data) > self.limit:
            conn.overflow()
            return False
        out.write(data)
        return True

    #: Uncork's per-connection write is the write-with-limit rule itself (an alias,
    #: not a wrapper: no extra call per connection per commit).
    _flush = _write

    # -- closing ----------------------------------------------------------------------
    def close_user(self, user_id: str, code: int, reason: str) -> int:
        conns = list(self._by_user.get(user_id, ()))
        for c in conns:
            c.close(code, reason)
        return len(conns)

    def close_session_id(self, session_id: str, code: int, reason: str) -> int:
        # A scan, not an index: revocation is rare and an index costs every idle
        # connection a dict entry and a list.
        conns = [c for c in self._conns.values() if c.session.session_id == session_id]
        for c in conns:
            c.close(code, reason)
        return len(conns)

    def close_all(self, code: int, reason: str) -> None:
        for c in list(self._conns.values()):
            c.close(code, reason)
