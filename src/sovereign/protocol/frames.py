"""RFC 6455 frame rules and message reassembly (SPEC §1). No I/O.

The transport hands every received WebSocket frame to a :class:`FrameAssembler`
(one per connection) and carries out the verdict it returns: deliver a complete
message, wait for more fragments, answer a PING, fail the connection, or echo the
peer's CLOSE. Opcodes are plain ints (RFC 6455 §5.2); so are the verdicts, so the
common case -- one unfragmented binary frame -- allocates nothing.

Rules, in the order they are applied (the first that matches wins):

1. Once the assembler has failed the connection, seen a CLOSE or been ``close()``-d,
   every frame is ``IGNORE``-d: the shell is already closing.
2. Any RSV bit set -> ``FAIL`` 1002: no extension is negotiated (§5.2).
3. TEXT -> ``FAIL`` 1003: the SPEC allows binary frames only (SPEC §1), in any state.
4. BINARY while a fragmented message is open -> ``FAIL`` 1002 (§5.4).
5. BINARY larger than ``max_message_bytes`` -> ``FAIL`` 1009 (SPEC §1).
6. BINARY with FIN -> ``DELIVER`` the payload itself: zero-copy, and as borrowed as
   the payload the shell passed in. This is the hot path.
7. BINARY without FIN -> copy it into the reassembly buffer, ``PENDING`` (§5.4); over
   ``fragment_limit`` -> ``FAIL`` 1009 (below, rule 9).
8. CONTINUATION with no message open -> ``FAIL`` 1002 (§5.4).
9. CONTINUATION that would take the message past ``fragment_limit`` -> ``FAIL``
   1009, checked *before* copying: the buffer never holds more than the limit (SPEC §1).
   The limit is ``max_message_bytes`` unless lowered: before READY the server holds
   at most ``max_envelope_bytes`` for a fragmented message (SPEC §12.31).
10. CONTINUATION -> append; with FIN ``DELIVER`` the reassembled message, else
    ``PENDING``.
11. A control frame (CLOSE, PING, PONG) without FIN or with more than 125 bytes of
    payload -> ``FAIL`` 1002 (§5.5). Control frames may arrive between the fragments
    of a message (§5.4); they leave it open.
12. PING -> ``REPLY_PONG`` with the same payload (§5.5.2, §5.5.3).
13. PONG -> ``IGNORE``: an unsolicited PONG needs no answer (§5.5.3). The shell still
    restarts its idle clock, as it does for every frame (SPEC §12.7).
14. CLOSE (§5.5.1, §7.4) -> ``ECHO_CLOSE`` with the peer's status code, or 1000 when
    the body is empty. A 1-byte body or a code an endpoint may not send (§7.4.1,
    §7.4.2: below 1000, 1004-1006, 1015-2999, 5000 and up) -> ``FAIL`` 1002; a reason
    that is not UTF-8 -> ``FAIL`` 1007 (§5.5.1, §8.1).
15. Any other opcode is reserved -> ``FAIL`` 1002 (§5.2).

``FAIL`` and ``ECHO_CLOSE`` drop the partial message and end the assembler (rule 1).
picows already enforces rules 11, 15, the CLOSE body checks of rule 14 and a
per-frame ``max_frame_size``; they are here too so the rules hold whatever shell
feeds this module, and cost nothing on the hot path.

Borrowed memory: ``message`` is the caller's own ``payload`` for an unfragmented
frame (a picows payload is valid only inside ``on_ws_frame``) and a view of the
assembler's buffer after reassembly. Either way it is valid until the shell's
callback returns; whoever keeps bytes copies them. The assembler may hold a
reference to the last message until the next :meth:`FrameAssembler.receive` or
:meth:`FrameAssembler.close`; it never reads it again.

Intended use, in the picows shell (``transport.ws.Connection``)::

    from sovereign.protocol import frames

    # __init__:            self.frames = frames.FrameAssembler(app.config.max_frame_bytes)
    # close()/overflow()/on_ws_disconnected():  self.frames.close()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        state = self.state
        if state.closed:
            return
        now = self.app.clock()
        state.last_received = now  # SPEC §12.7: every frame restarts the idle clock
        fa = self.frames
        verdict = fa.receive(
            frame.msg_type,  # type: ignore[arg-type]  # an IntEnum at run time
            frame.fin,
            frame.rsv1 or frame.rsv2 or frame.rsv3,
            frame.get_payload_as_memoryview(),
            frame.payload_size,
        )
        if verdict == frames.DELIVER:
            self.app.dispatch(self, fa.message, now)
        elif verdict == frames.REPLY_PONG:
            transport.send_pong(fa.pong_payload)
        elif verdict == frames.FAIL:
            self.close(fa.close_code, fa.close_reason)
        elif verdict == frames.ECHO_CLOSE:
            state.closing(fa.close_code)
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode(fa.close_code))
            transport.disconnect()
        # PENDING, IGNORE: nothing to do.

(picows's stub declares ``WSMsgType`` a plain ``Enum``; at run time it is an
``IntEnum``, so ``frame.msg_type`` compares equal to these ints without a conversion.)
"""

from __future__ import annotations

import operator
from typing import Final

from sovereign.errors import CloseCode

__all__ = [
    "DELIVER",
    "ECHO_CLOSE",
    "FAIL",
    "IGNORE",
    "INVALID_PAYLOAD",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "PENDING",
    "PROTOCOL_ERROR",
    "REPLY_PONG",
    "VERDICT_NAMES",
    "FrameAssembler",
    "sendable_close_code",
]

# Opcodes (RFC 6455 §5.2).
OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

# Verdicts: what the shell must do with the frame it just passed in.
DELIVER: Final = 0  # dispatch ``message`` (borrowed, see the module docstring)
PENDING: Final = 1  # a fragment was buffered; nothing to do until the last one
IGNORE: Final = 2  # nothing to do (a PONG, or a frame after the end)
REPLY_PONG: Final = 3  # send a PONG carrying ``pong_payload``
FAIL: Final = 4  # close with ``close_code`` and ``close_reason``, then disconnect
ECHO_CLOSE: Final = 5  # the peer closed: answer CLOSE with ``close_code``, disconnect
VERDICT_NAMES: Final = ("DELIVER", "PENDING", "IGNORE", "REPLY_PONG", "FAIL", "ECHO_CLOSE")

# Close codes that CloseCode (SPEC §4) does not name (RFC 6455 §7.4.1).
PROTOCOL_ERROR: Final = 1002
INVALID_PAYLOAD: Final = 1007

_MAX_CONTROL_PAYLOAD: Final = 125  # RFC 6455 §5.5
_NO_MESSAGE: Final = memoryview(b"")  # ``message`` when there is none
#: What the shell puts back into ``message`` once it has handed the message on.
NO_MESSAGE: Final = _NO_MESSAGE

# Assembler states.
_IDLE: Final = 0  # no message open
_FRAGMENTED: Final = 1  # a fragmented binary message is open (``_buffer``)
_ENDED: Final = 2  # failed or closed: every frame is ignored


def sendable_close_code(code: int) -> bool:
    """A status code an endpoint may put in a CLOSE frame (RFC 6455 §7.4.1, §7.4.2).

    1012-1014 are IANA-registered since RFC 6455 (1013 is ours: a slow reader).
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameAssembler:
    """One connection's frame rules and reassembly buffer. Small: one per socket.

    After ``DELIVER`` read :attr:`message`; after ``REPLY_PONG``, :attr:`pong_payload`;
    after ``FAIL`` or ``ECHO_CLOSE``, :attr:`close_code` (and :attr:`close_reason`).
    """

    __slots__ = (
        "_buffer",
        "_fragmax",
        "_max",
        "_state",
        "close_code",
        "close_reason",
        "message",
        "pong_payload",
    )

    def __init__(self, max_message_bytes: int, fragment_limit: int | None = None) -> None:
        limit = operator.index(max_message_bytes)
        if limit < 0:
            raise ValueError("max_message_bytes must be >= 0")
        self._max = limit
        self._fragmax = limit
        if fragment_limit is not None:
            self.set_fragment_limit(fragment_limit)
        self._state = _IDLE
        self._buffer: bytearray | None = None
        self.message = _NO_MESSAGE
        self.pong_payload = b""
        self.close_code = 0
        self.close_reason = ""

    @property
    def max_message_bytes(self) -> int:
        return self._max

    @property
    def fragment_limit(self) -> int:
        return self._fragmax

    def set_fragment_limit(self, limit: int) -> None:
        """Cap what a fragmented message may buffer (never above ``max_message_bytes``)."""
        limit = operator.index(limit)
        if limit < 0:
            raise ValueError("fragment_limit must be >= 0")
        self._fragmax = min(limit, self._max)

    @property
    def buffered(self) -> int:
        """Bytes held for the fragmented message that is open (0 when none)."""
        return 0 if self._buffer is None else len(self._buffer)

    @property
    def ended(self) -> bool:
        """True once the connection failed, the peer closed, or :meth:`close` ran."""
        return self._state == _ENDED

    def close(self) -> None:
        """The shell is closing for its own reasons: drop everything, ignore the rest."""
        self._state = _ENDED
        self._buffer = None
        self.message = _NO_MESSAGE

    def receive(
        self,
        opcode: int,
        fin: bool,
        rsv: bool,
        payload: memoryview,
        payload_size: int,
    ) -> int:
        """Apply the rules to one frame; returns the verdict (see the module docstring).

        ``payload_size`` is ``len(payload)``; size limits are checked against it before
        ``payload`` is touched. ``fin`` and ``rsv`` need only be truthy (picows gives 0/1).
        """
        # The hot path: BINARY + FIN, no RSV, no message open, within the limit, so
        # rules 1-5 pass and rule 6 delivers the frame's own payload.
        if (
            opcode == OP_BINARY
            and fin
            and not self._state
            and not rsv
            and payload_size <= self._max
        ):
            self.message = payload
            return DELIVER
        self.message = _NO_MESSAGE
        state = self._state
        if state == _ENDED:  # 1
            return IGNORE
        if rsv:  # 2
            return self._fail(PROTOCOL_ERROR, "reserved bits set")
        if opcode == OP_TEXT:  # 3
            return self._fail(CloseCode.UNSUPPORTED_DATA, "binary frames only")
        if opcode == OP_BINARY:
            if state == _FRAGMENTED:  # 4
                return self._fail(PROTOCOL_ERROR, "expected continuation frame")
            if payload_size > self._max:  # 5
                return self._fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
            # 6 is the hot path above: FIN is clear here.
            if payload_size > self._fragmax:  # 7, 9
                return self._fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
            self._buffer = bytearray(payload)  # 7
            self._state = _FRAGMENTED
            return PENDING
        if opcode == OP_CONTINUATION:
            buffer = self._buffer
            if buffer is None:  # 8
                return self._fail(PROTOCOL_ERROR, "continuation without a message")
            if len(buffer) + payload_size > self._fragmax:  # 9
                return self._fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
            buffer += payload  # 10
            if not fin:
                return PENDING
            self._buffer = None
            self._state = _IDLE
            self.message = memoryview(buffer)
            return DELIVER
        if OP_CLOSE <= opcode <= OP_PONG:  # CLOSE, PING, PONG
            if not fin:  # 11
                return self._fail(PROTOCOL_ERROR, "fragmented control frame")
            if payload_size > _MAX_CONTROL_PAYLOAD:
                return self._fail(PROTOCOL_ERROR, "control frame too long")
            if opcode == OP_PING:  # 12
                self.pong_payload = bytes(payload)
                return REPLY_PONG
            if opcode == OP_PONG:  # 13
                return IGNORE
            return self._peer_closed(payload, payload_size)  # 14
        return self._fail(PROTOCOL_ERROR, "reserved opcode")  # 15

    # -- endings ---------------------------------------------------------------
    def _fail(self, code: int, reason: str) -> int:
        """_Fail the WebSocket Connection_ (RFC 6455 §7.1.7) with ``code``."""
        self.close()
        self.close_code = int(code)
        self.close_reason = reason
        return FAIL

    def _peer_closed(self, payload: memoryview, payload_size: int) -> int:
        if payload_size == 0:
            code = int(CloseCode.NORMAL)  # no status code: answer 1000
        elif payload_size == 1:
            return self._fail(PROTOCOL_ERROR, "close frame with a 1-byte body")
        else:
            body = bytes(payload)
            code = int.from_bytes(body[:2], "big")
            if not sendable_close_code(code):
                return self._fail(PROTOCOL_ERROR, "invalid close code")
            try:
                body[2:].decode("utf-8")
            except UnicodeDecodeError:
                return self._fail(INVALID_PAYLOAD, "close reason is not UTF-8")
        self.close()
        self.close_code = code
        self.close_reason = ""
        return ECHO_CLOSE
