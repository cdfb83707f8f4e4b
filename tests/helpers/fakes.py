"""Fakes for the service ports (``sovereign.services.ports``): a clock tests move by
hand and an outbox that records, per session, the frames it would have written.

Only ports are faked; services, the event log and storage stay real. The fake outbox
keeps the rules of ``sovereign.transport.outbox.LocalOutbox`` that services rely on:

- a closed session gets nothing;
- while corked, frames collect per session and leave at uncork as ONE write each, in
  the order they were produced;
- ``publish`` reaches only sessions that are attached (READY, indexed by user) and
  live (``go_live``: their backlog is out), never ``exclude``;
- errors render as ``AuthError`` for registry ``auth`` codes and ``Error`` otherwise,
  and a fatal code closes with the registry's close code.

Frames are real WebSocket frames (the pure-Python fan-out twin builds them), so what
a test reads back went through the same framing and envelope codec as production.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from sovereign.client.events import PAYLOAD_CLASSES
from sovereign.clock import Clock
from sovereign.codec import decode_envelope, encode_envelope
from sovereign.errors import REGISTRY, CloseCode
from sovereign.protocol.types import MessageType
from sovereign.services.session import Session
from sovereign.transport import fanout
from sovereign.transport.outbox import Corking
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.frames import parse_frames

#: 2030-01-01T00:00:00Z: far from the real time, so code that reads the system clock
#: instead of the injected one stands out in any comparison with stored times.
WALL_START_US = 1_893_456_000 * 1_000_000


class FakeClock(Clock):
    """Monotonic and wall time that move only when a test says so."""

    __slots__ = ("_mono", "_wall_us")

    def __init__(self, monotonic: float = 1_000.0, wall_us: int = WALL_START_US) -> None:
        self._mono = monotonic
        self._wall_us = wall_us

    def monotonic(self) -> float:
        return self._mono

    def now_us(self) -> int:
        return self._wall_us

    def advance(self, seconds: float) -> None:
        """Both clocks move forward together."""
        if seconds < 0:
            raise ValueError("monotonic time never goes back; use set_wall_us")
        self._mono += seconds
        self._wall_us += round(seconds * 1_000_000)

    def set_wall_us(self, wall_us: int) -> None:
        """Step the wall clock (backwards too, as NTP may); monotonic time stays."""
        self._wall_us = wall_us


class Hold:
    """Something a test holds up: ``entered`` once the first caller waits, callers go
    on after ``release()``. Event-driven: no polling, no sleeping."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.released = asyncio.Event()

    async def wait(self) -> None:
        self.entered.set()
        await self.released.wait()

    def release(self) -> None:
        self.released.set()


@dataclass(frozen=True, slots=True)
class Sent:
    """One decoded frame as the client would read it."""

    type: MessageType
    request_id: str
    msg: Any  # the payload, parsed with its protobuf class

    def __repr__(self) -> str:
        body = str(self.msg).replace("\n", " ")
        return f"<{self.type.name} rid={self.request_id!r} {body}>"


@dataclass(frozen=True, slots=True)
class Write:
    """One write to a session's socket: ``via`` is send | publish | flush (uncork) |
    backlog; ``data`` holds one or more frames."""

    via: str
    data: bytes

    def frames(self) -> list[Sent]:
        return [decode(env) for env in parse_frames(self.data)]


def decode(envelope: bytes) -> Sent:
    msg_type, rid, payload = decode_envelope(envelope)
    cls = PAYLOAD_CLASSES.get(msg_type)
    assert cls is not None, f"the server sent type {msg_type}, which has no payload class"
    return Sent(MessageType(msg_type), rid, cls.FromString(bytes(payload)))


class FakeOutbox(Corking[Session]):
    """:class:`sovereign.services.ports.Outbox` in memory (see the module docstring)."""

    def __init__(self) -> None:
        self.frame: Callable[[bytes], bytes] = fanout.ws_frame
        self.append_frame: Callable[[bytearray, bytes], None] = fanout.append_ws_frame
        self._open: list[Session] = []
        self._by_user: dict[str, list[Session]] = {}
        self._live: set[Session] = set()
        self._corked: dict[Session, bytearray] | None = None
        self._writes: dict[Session, list[Write]] = {}
        self._taken: dict[Session, int] = {}
        #: (session, close code, reason), in the order the closes happened.
        self.closes: list[tuple[Session, int, str]] = []
        self._backlog_hold: Hold | None = None

    # -- what tests read --------------------------------------------------------------
    def writes(self, s: Session) -> list[Write]:
        return list(self._writes.get(s, ()))

    def frames(self, s: Session) -> list[Sent]:
        return [f for w in self._writes.get(s, ()) for f in w.frames()]

    def take(self, s: Session) -> list[Sent]:
        """The frames ``s`` received since the previous take."""
        frames = self.frames(s)
        start, self._taken[s] = self._taken.get(s, 0), len(frames)
        return frames[start:]

    def response(self, s: Session, rid: str) -> Sent:
        """The one response to request ``rid`` (SPEC §2: exactly one per request_id)."""
        assert rid, "only a request with a request_id has a response to find"
        found = [f for f in self.frames(s) if f.request_id == rid]
        assert len(found) == 1, f"{len(found)} responses to {rid!r}: {found}"
        return found[0]

    def hold_backlog(self) -> Hold:
        """Backlog writes wait until released: a sync "in flight" while a test commits
        events (a slow client's send buffer, without the socket)."""
        self._backlog_hold = Hold()
        return self._backlog_hold

    def is_live(self, s: Session) -> bool:
        return s in self._live and not s.state.closed

    # -- the transport's side (LocalOutbox.opened / closed) -------------------------
    def opened(self, s: Session) -> None:
        self._open.append(s)

    def closed(self, s: Session) -> None:
        """The socket is gone (the transport's on_ws_disconnected)."""
        s.state.closing(s.state.close_code or CloseCode.GOING_AWAY)
        self._live.discard(s)
        if s in self._open:
            self._open.remove(s)
        self.detach(s)

    # -- one connection ---------------------------------------------------------------
    def _write(self, s: Session, via: str, data: bytes) -> None:
        if not s.state.closed:
            self._writes.setdefault(s, []).append(Write(via, data))

    def send_payload(self, s: Session, msg_type: int, request_id: str, payload: bytes) -> None:
        if s.state.closed:
            return
        envelope = encode_envelope(msg_type, request_id, payload)
        if self._corked is not None:
            self.append_frame(self._corked.setdefault(s, bytearray()), envelope)
        else:
            self._write(s, "send", self.frame(envelope))

    def send(self, s: Session, msg_type: int, request_id: str, message: Message) -> None:
        self.send_payload(s, msg_type, request_id, message.SerializeToString())

    def response_frame(self, msg_type: int, request_id: str, message: Message) -> bytes:
        return self.frame(encode_envelope(msg_type, request_id, message.SerializeToString()))

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
        if info.auth:
            err: Message = pb.AuthError(error_code=code, message=text)
            self.send(s, MessageType.AUTH_ERROR, request_id, err)
        else:
            err = pb.Error(code=code, message=text, fatal=info.fatal, retry_after_ms=retry_after_ms)
            self.send(s, MessageType.ERROR, request_id, err)
        if info.close_code is not None:
            self.close(s, info.close_code, info.name)

    def reject(self, s: Session, code: int, request_id: str, retry_after_ms: int) -> None:
        self.send_error(s, code, request_id, "", retry_after_ms)

    def close(self, s: Session, code: int, reason: str = "") -> None:
        self._live.discard(s)
        if s.state.closing(int(code)):
            self.closes.append((s, int(code), reason))

    async def write_backlog(self, s: Session, data: bytes | bytearray) -> None:
        if not data or s.state.closed:
            return
        hold = self._backlog_hold
        if hold is not None:
            await hold.wait()
        self._write(s, "backlog", bytes(data))

    def go_live(self, s: Session) -> bool:
        if s.state.closed:
            return False
        self._live.add(s)
        return True

    # -- many connections -------------------------------------------------------------
    def publish(self, frame: bytes, user_ids: Iterable[str], exclude: Session | None) -> None:
        assert type(frame) is bytes  # shared by every recipient: immutable
        for uid in user_ids:
            for s in list(self._by_user.get(uid, ())):
                if s is exclude or not self.is_live(s):
                    continue
                if self._corked is not None:
                    self._corked.setdefault(s, bytearray()).extend(frame)
                else:
                    self._write(s, "publish", frame)

    def _flush(self, s: Session, data: bytearray) -> None:
        self._write(s, "flush", bytes(data))

    # -- registry ---------------------------------------------------------------------
    def attach(self, s: Session) -> Sequence[Session]:
        sessions = self._by_user.setdefault(s.user_id, [])
        sessions.append(s)
        return list(sessions)

    def detach(self, s: Session) -> None:
        sessions = self._by_user.get(s.user_id)
        if sessions is not None and s in sessions:
            sessions.remove(s)
            if not sessions:
                del self._by_user[s.user_id]

    def sessions(self, user_id: str) -> Sequence[Session]:
        return list(self._by_user.get(user_id, ()))

    def live_sessions(self, user_id: str) -> Iterable[Session]:
        return [s for s in self._by_user.get(user_id, ()) if self.is_live(s)]

    def all_sessions(self) -> Iterable[Session]:
        return list(self._open)

    def count(self) -> int:
        return len(self._open)

    def close_user(self, user_id: str, code: int, reason: str) -> int:
        sessions = list(self._by_user.get(user_id, ()))
        for s in sessions:
            self.close(s, code, reason)
        return len(sessions)

    def close_session_id(self, session_id: str, code: int, reason: str) -> int:
        sessions = [s for s in self._open if s.session_id == session_id]
        for s in sessions:
            self.close(s, code, reason)
        return len(sessions)
