"""The pending-request table (SPEC §3, §5, §8).

Every request is an Envelope with a fresh ``request_id`` (uuid4 hex); the server answers
it on the same connection with that request_id: a typed response, an ``Ack``, or
``Error``/``AuthError``. :class:`RequestTable` keeps one entry per request in flight:

* :meth:`~RequestTable.resolve` completes it with its response; ``Error``/``AuthError``
  is raised as :class:`SovereignClientError`, no answer within the timeout as
  :class:`RequestTimeout`;
* a request made while no connection is READY waits in the table (within its timeout)
  and :meth:`~RequestTable.resend` sends it once one is;
* when a connection drops (:meth:`~RequestTable.connection_lost`), what was sent on it
  fails with :class:`ConnectionLost`, except idempotent requests
  (:data:`IDEMPOTENT_TYPES`), which wait to go out again with the *same* request_id
  (MESSAGE_SEND: the server returns the original echo for 24 h, SPEC §5);
* 3004 RateLimited is retried after ``retry_after_ms`` when the caller asks for it.

Whether the client may still send, and on which connection, the table asks its
:class:`Gate` (the session).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

from sovereign.client._transport import Connection
from sovereign.client.errors import (
    ClientError,
    ConnectionLost,
    NotAuthenticated,
    ProtocolViolation,
    RequestTimeout,
    SovereignClientError,
)
from sovereign.client.events import Device, decode_payload
from sovereign.codec import encode_envelope
from sovereign.errors import ErrorCode
from sovereign.protocol.types import MessageType
from sovereign.v1 import sovereign_pb2 as pb

__all__ = [
    "IDEMPOTENT_TYPES",
    "Gate",
    "RequestSettings",
    "RequestTable",
    "error_from",
    "parse_response",
    "type_name",
]

log = logging.getLogger("sovereign.client")

T = MessageType
M = TypeVar("M", bound=Message)

#: Requests that are safe to send again after a reconnect (same request_id).
IDEMPOTENT_TYPES: Final = frozenset(
    {
        T.MESSAGE_SEND,  # SPEC §5: the server dedupes by (user, request_id) for 24 h
        T.MESSAGE_HISTORY_REQUEST,
        T.CONVERSATION_LIST_REQUEST,
        T.MLS_GROUP_INFO_FETCH,
        T.MESSAGE_READ,
        T.PRESENCE_UPDATE,
        T.USER_LOOKUP,  # reads
        T.DEVICE_LIST_REQUEST,
        T.PROFILE_UPDATE,  # setting the same name twice is the same as once
    }
)
_MIN_RATE_LIMIT_DELAY = 0.01


class Gate(Protocol):
    """What the table needs to know about the session."""

    @property
    def connection(self) -> Connection | None:
        """The current connection (READY or still authenticating), if any."""
        ...

    @property
    def device(self) -> Device | None:
        """Set once authenticated: requests may wait for a connection from then on."""
        ...

    def check_open(self) -> None:
        """Raise if the client was closed or its session ended."""
        ...


class RequestSettings(Protocol):
    """The client options the table reads (live: changing them on the client counts)."""

    @property
    def request_timeout(self) -> float: ...
    @property
    def retry_rate_limited(self) -> bool: ...
    @property
    def max_rate_limit_retries(self) -> int: ...


@dataclass(eq=False, slots=True)
class _Pending:
    request_id: str
    msg_type: int
    frame: bytes
    future: asyncio.Future[tuple[int, bytes]]
    retry: bool  # idempotent: survives a dropped connection
    bound: bool  # only valid on the connection it was sent on (auth steps, PING, acks)
    conn: Connection | None = None  # where it was sent; None: waiting for READY
    on_response: Callable[[int, bytes], None] | None = None


class RequestTable:
    """The requests in flight, keyed by request_id. See the module docstring."""

    def __init__(self, settings: RequestSettings, gate: Gate) -> None:
        self._settings = settings
        self._gate = gate
        self._pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    async def request(
        self,
        msg_type: MessageType | int,
        message: Message | bytes | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        idempotent: bool | None = None,
        retry_rate_limited: bool = False,
    ) -> Any:
        """Any request; returns its parsed response (see :meth:`Client.request`)."""
        if message is None:
            payload = b""
        elif isinstance(message, bytes | bytearray | memoryview):
            payload = bytes(message)
        else:
            payload = message.SerializeToString()
        retry = (int(msg_type) in IDEMPOTENT_TYPES) if idempotent is None else idempotent
        rtype, rpayload = await self.call(
            int(msg_type),
            payload,
            timeout=timeout,
            request_id=request_id,
            retry=retry,
            retry_rate_limited=retry_rate_limited,
        )
        try:
            return decode_payload(rtype, rpayload)
        except DecodeError as exc:
            raise ProtocolViolation(f"unparseable {type_name(rtype)} payload") from exc

    async def typed(
        self,
        msg_type: MessageType,
        message: Message,
        expect: MessageType,
        cls: type[M],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> M:
        """A request whose answer must be ``expect`` (else ProtocolViolation), parsed as
        ``cls``; idempotent types are sent again after a reconnect, 3004 is retried
        if the client is configured to."""
        rtype, payload = await self.call(
            msg_type,
            message.SerializeToString(),
            timeout=timeout,
            request_id=request_id,
            retry=msg_type in IDEMPOTENT_TYPES,
            retry_rate_limited=self._settings.retry_rate_limited,
        )
        return parse_response(msg_type, rtype, payload, expect, cls)

    async def call(
        self,
        msg_type: int,
        payload: bytes,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        retry: bool = False,
        bound: Connection | None = None,
        retry_rate_limited: bool = False,
        on_response: Callable[[int, bytes], None] | None = None,
        internal: bool = False,
    ) -> tuple[int, bytes]:
        """Send one request and wait for its answer: ``(type, payload)`` of a response
        other than Error/AuthError.

        ``bound``: send on that connection only (it fails with it, never resent).
        ``retry``: resend after a reconnect (ignored when bound). ``on_response`` runs
        synchronously when the answer arrives, before any later frame is processed.
        ``internal``: allowed while the client is closing (the final ack flush).
        """
        loop = asyncio.get_running_loop()
        budget = self._settings.request_timeout if timeout is None else timeout
        deadline = loop.time() + budget
        rid = request_id or uuid.uuid4().hex
        frame = encode_envelope(int(msg_type), rid, payload)
        rate_limited = 0
        while True:
            p = self._submit(rid, int(msg_type), frame, retry, bound, on_response, internal)
            try:
                async with asyncio.timeout_at(deadline):
                    rtype, rpayload = await p.future
            except TimeoutError:
                self._forget(p)
                raise RequestTimeout(
                    f"{type_name(msg_type)} got no response within {budget:g} s"
                ) from None
            except BaseException:
                self._forget(p)
                raise
            if rtype == T.ERROR or rtype == T.AUTH_ERROR:
                err = error_from(msg_type, rtype, rpayload)
                if (
                    err.code == ErrorCode.RATE_LIMITED
                    and retry_rate_limited
                    and rate_limited < self._settings.max_rate_limit_retries
                ):
                    delay = max(err.retry_after_ms / 1000.0, _MIN_RATE_LIMIT_DELAY)
                    if loop.time() + delay < deadline:
                        rate_limited += 1
                        log.debug("%s rate limited; retrying in %.3f s", type_name(msg_type), delay)
                        await asyncio.sleep(delay)
                        continue
                raise err
            return rtype, rpayload

    def _submit(
        self,
        rid: str,
        msg_type: int,
        frame: bytes,
        retry: bool,
        bound: Connection | None,
        on_response: Callable[[int, bytes], None] | None,
        internal: bool,
    ) -> _Pending:
        if not internal:
            self._gate.check_open()
        if rid in self._pending:
            raise ValueError(f"request_id {rid!r} is already in flight")
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        p = _Pending(rid, msg_type, frame, fut, retry, bound is not None, None, on_response)
        if bound is not None:
            if bound is not self._gate.connection or bound.closed or not bound.send(frame):
                raise ConnectionLost(bound.effective_close_code, "connection is gone")
            p.conn = bound
        else:
            if self._gate.device is None:
                raise NotAuthenticated("not authenticated: register, login or resume first")
            conn = self._gate.connection
            if conn is not None and conn.ready and conn.send(frame):
                p.conn = conn
            # else: queued, sent when the client is READY again
        self._pending[rid] = p
        return p

    def _forget(self, p: _Pending) -> None:
        if self._pending.get(p.request_id) is p:
            del self._pending[p.request_id]

    def resolve(
        self, conn: Connection, request_id: str, msg_type: int, payload: bytes
    ) -> int | None:
        """Complete the request ``request_id`` sent on ``conn`` with this answer; returns
        the request's type, or None if no request waits for it (it timed out, or the
        frame is not an answer)."""
        p = self._pending.get(request_id)
        if p is None or p.conn is not conn:
            return None
        del self._pending[request_id]
        if p.on_response is not None:
            try:
                p.on_response(msg_type, payload)
            except Exception as exc:
                if not p.future.done():
                    p.future.set_exception(ProtocolViolation(f"bad {type_name(msg_type)}: {exc}"))
                return p.msg_type
        if not p.future.done():
            p.future.set_result((msg_type, payload))
        return p.msg_type

    def resend(self, conn: Connection) -> None:
        """``conn`` is READY: send the requests that waited for a connection (queued while
        disconnected, or idempotent ones whose connection dropped)."""
        for p in list(self._pending.values()):
            if p.conn is None and conn.send(p.frame):
                p.conn = conn

    def connection_lost(self, conn: Connection, lost: ConnectionLost) -> None:
        """``conn`` is gone: fail what was sent on it, except idempotent requests, which
        wait for :meth:`resend` (same request_id)."""
        for rid, p in list(self._pending.items()):
            if p.conn is not conn:
                continue
            if p.retry and not p.bound:
                p.conn = None
            else:
                del self._pending[rid]
                if not p.future.done():
                    p.future.set_exception(lost)

    def fail_all(self, error: ClientError) -> None:
        """Fail every request in the table (the client closed or the session ended)."""
        pending = list(self._pending.values())
        self._pending.clear()
        for p in pending:
            if not p.future.done():
                p.future.set_exception(error)


# -- reading answers -------------------------------------------------------------------


def type_name(msg_type: int) -> str:
    """``MESSAGE_SEND`` for a known message type, else the number."""
    try:
        return MessageType(msg_type).name
    except ValueError:
        return str(msg_type)


def error_from(request_type: int, rtype: int, payload: bytes) -> SovereignClientError:
    """The exception for an ``Error`` / ``AuthError`` answer to ``request_type``."""
    try:
        if rtype == T.AUTH_ERROR:
            a = pb.AuthError.FromString(payload)
            return SovereignClientError(a.error_code, a.message, request_type=request_type)
        e = pb.Error.FromString(payload)
        return SovereignClientError(
            e.code, e.message, e.retry_after_ms, fatal=e.fatal, request_type=request_type
        )
    except DecodeError:
        return SovereignClientError(
            ErrorCode.INTERNAL_ERROR, "unparseable error", request_type=request_type
        )


def parse_response(request: int, rtype: int, payload: bytes, expect: int, cls: type[M]) -> M:
    """``payload`` parsed as ``cls``; ProtocolViolation unless ``rtype`` is ``expect``."""
    if rtype != expect:
        raise ProtocolViolation(
            f"{type_name(request)} was answered with {type_name(rtype)}, "
            f"expected {type_name(expect)}"
        )
    try:
        return cls.FromString(payload)
    except DecodeError as exc:
        raise ProtocolViolation(f"unparseable {type_name(rtype)} payload") from exc
