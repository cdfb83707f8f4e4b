"""The asyncio Sovereign client (SPEC §1-§5, §12): the public :class:`Client`.

Theory of operation
-------------------
One :class:`Client` is one *device* (one session). It owns at most one WebSocket at a
time (picows, subprotocol ``sovereign.v1``) and survives its loss. ``Client`` itself is
a facade: the work is done by four parts with one concern each, which know each other
only through small protocols declared next to the part that uses them.

* **Connection life cycle** (:mod:`sovereign.client.session`). The session owns the
  current connection and the :class:`ClientState`. *Reconnect*: after an unexpected
  close (1006, 4006 shutdown, 4008 idle, …) it waits ``backoff.delay(n)`` (1, 2, 4, 8,
  16, 30, 30 … s, times a jitter in 0.5-1.0) and resumes with the session token. 4002,
  4003, 4004 and 4005 end the session for good (:class:`SessionEnded`), as does
  :meth:`Client.close`. *Heartbeat*: PING every ``ping_interval`` (30 s); no PONG
  within ``pong_timeout`` (10 s) drops the connection, which then reconnects.
* **Auth ceremonies** (:mod:`sovereign.client.auth`): register, login and resume, each
  on a fresh connection; success marks it READY before any later frame of it is
  processed. When the server refuses the reconnect loop's resume for good (1001, 1002,
  1005, 2004, or a fatal error), the session ends.
* **Requests** (:mod:`sovereign.client.requests`) are Envelopes with a fresh
  ``request_id`` (uuid4 hex). A pending table keyed by request_id resolves each one
  with its typed response, an ``Ack``, or raises ``Error``/``AuthError`` as
  :class:`SovereignClientError`. Requests made while the client is reconnecting wait
  (within their timeout) and go out once READY. When a connection drops, requests
  already sent fail with :class:`ConnectionLost`, except idempotent ones (MESSAGE_SEND:
  same request_id within 24 h returns the original echo, SPEC §5; reads) which are
  sent again, *with the same request_id*, after the client resumed. 3004 RateLimited
  is retried after ``retry_after_ms`` by the high-level helpers.
* **Events and acks** (:mod:`sovereign.client.delivery`). Server pushes pass through
  dedupe and gap detection (per conversation ``seq``, SPEC §5) and are delivered in
  order to callbacks (:meth:`Client.on`) and iterators (:meth:`Client.events`). A seq
  jump pauses that conversation, pages MESSAGE_HISTORY_REQUEST forward from the last
  seq, delivers the missing events, then the held live ones. Until the first consumer
  registers, events wait in a backlog (so nothing of the sync burst right after login
  is lost); :meth:`Client.wait_for` takes from it too. Once the application is done
  with a durable event (its callbacks returned, or the iterator was asked for the next
  event), its id is queued; at most every ``ack_interval`` (50 ms) one MESSAGE_ACK
  carries the newest id per conversation (acks are cumulative) plus each welcome id.
  An ack never passes an event the application still holds. Duplicates the server
  sends again (our ack was lost) are acked again without being delivered twice.

Underneath: :mod:`sovereign.client._transport` (one picows WebSocket),
:mod:`sovereign.client.tracking` (the pure seq and ack bookkeeping delivery drives)
and :mod:`sovereign.client.events` (what the application receives).

The client wires the parts together (the bottom of :class:`Client`): every frame of
the current connection is the answer to a pending request (our own MESSAGE_SEND /
MLS_COMMIT echo also goes to delivery), a server PING the session answers, or, once
READY, an event for delivery. When a connection becomes READY, is lost, or the session
ends, the session tells the client, which tells the request table and delivery.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import weakref
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar, overload

from google.protobuf.message import Message

from sovereign.client._transport import Connection
from sovereign.client.auth import TERMINAL_AUTH_CODES, Auth, Authenticator
from sovereign.client.backoff import Backoff
from sovereign.client.delivery import Delivery, EventHandler, StreamState
from sovereign.client.errors import (
    ClientClosed,
    ClientError,
    ConnectError,
    ConnectionLost,
    NotAuthenticated,
    RequestTimeout,
    SovereignClientError,
)
from sovereign.client.events import (
    Device,
    Event,
    HistoryPage,
    decode_event,
)
from sovereign.client.requests import (
    IDEMPOTENT_TYPES,
    RequestTable,
    error_from,
)
from sovereign.client.session import FATAL_CLOSE_CODES, ClientState, Session, SessionHooks
from sovereign.codec import EnvelopeError, decode_envelope
from sovereign.protocol.types import MessageType
from sovereign.v1 import sovereign_pb2 as pb

__all__ = [
    "FATAL_CLOSE_CODES",
    "IDEMPOTENT_TYPES",
    "Authenticator",
    "Client",
    "ClientState",
    "EventHandler",
    "EventStream",
]

log = logging.getLogger("sovereign.client")

T = MessageType
H = TypeVar("H", bound=EventHandler)
TypeFilter = MessageType | int | Iterable[MessageType | int] | None


def _type_set(types: TypeFilter) -> frozenset[int] | None:
    if types is None:
        return None
    if isinstance(types, int):
        return frozenset({int(types)})
    return frozenset(int(t) for t in types)


def _now_us() -> int:
    return time.time_ns() // 1000


class EventStream:
    """``async for event in client.events(): …`` — events in arrival order.

    An event counts as processed (and is acknowledged) when the loop asks for the next
    one, or when the stream is closed (``async with``, :meth:`aclose`, or dropping the
    last reference). Events still queued in a closed stream go back to the client's
    backlog if no other consumer exists, so the next stream (or wait_for) gets them.
    The iteration ends after :meth:`Client.close` and raises :class:`SessionEnded`
    when the session ended. Iterate one stream from one task at a time.
    """

    def __init__(self, client: Client, state: StreamState) -> None:
        self._client = client  # the client lives as long as any of its streams
        self._state = state
        self._finalizer = weakref.finalize(self, client._delivery.drop_stream, state)
        self._finalizer.atexit = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        return await self._state.next_event()

    async def next(self, timeout: float | None = None) -> Event:
        """The next event, waiting at most ``timeout`` seconds (TimeoutError)."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    def close(self) -> None:
        """Stop receiving; the current event counts as processed."""
        self._finalizer()

    async def aclose(self) -> None:
        """Same as :meth:`close` (for ``contextlib.aclosing``)."""
        self.close()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Client:
    """An asyncio client for one Sovereign device. See the module docstring.

    Typical use::

        async with Client("ws://127.0.0.1:8080/ws", token=TOKEN) as client:
            async for event in client.events(MessageType.MESSAGE_RECEIVE):
                ...

    Parameters (all keyword-only except ``url``):

    * ``authenticator`` — anything with ``create``/``get`` (:class:`Authenticator`),
      needed for :meth:`register` and :meth:`login`.
    * ``origin`` — the WebAuthn origin put into clientDataJSON (must be in the server's
      ``rp_origins``). ``send_origin=True`` also sends it as the HTTP ``Origin`` header.
    * ``token`` / ``username`` — used by :meth:`connect` (and ``async with``): resume
      with the token; failing that (or without one) log in as ``username``.
    * ``ssl_context`` — for ``wss://`` (e.g. a context trusting a private CA).
    * ``request_timeout`` (30 s), ``connect_timeout`` (10 s), ``ping_interval`` (30 s),
      ``pong_timeout`` (10 s): ``ping_interval=None`` disables the heartbeat.
    * ``auto_reconnect`` (True), ``backoff`` (:class:`Backoff`, 1…30 s, jitter 0.5-1.0).
    * ``auto_ack`` (True), ``ack_interval`` (0.05 s).
    * ``retry_rate_limited`` (True): helpers retry 3004 after ``retry_after_ms``, at most
      ``max_rate_limit_retries`` (5) times.
    * ``history_page_limit`` (200): page size of gap repair.
    * ``dedupe_capacity`` (10,000 ids), ``max_backlog`` (10,000 unclaimed events).
    """

    def __init__(
        self,
        url: str,
        *,
        authenticator: Authenticator | None = None,
        origin: str = "http://localhost:8080",
        token: str | None = None,
        username: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        send_origin: bool = False,
        extra_headers: Mapping[str, str] | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        ping_interval: float | None = 30.0,
        pong_timeout: float = 10.0,
        auto_reconnect: bool = True,
        backoff: Backoff | None = None,
        auto_ack: bool = True,
        ack_interval: float = 0.05,
        retry_rate_limited: bool = True,
        max_rate_limit_retries: int = 5,
        history_page_limit: int = 200,
        dedupe_capacity: int = 10_000,
        max_backlog: int = 10_000,
        fatal_close_codes: Iterable[int] = FATAL_CLOSE_CODES,
    ) -> None:
        self.url = url
        self.authenticator = authenticator
        self.origin = origin
        self.ssl_context = ssl_context
        self.send_origin = send_origin
        self.extra_headers: dict[str, str] = dict(extra_headers or {})
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.auto_reconnect = auto_reconnect
        self.backoff = backoff if backoff is not None else Backoff()
        self.auto_ack = auto_ack
        self.ack_interval = ack_interval
        self.retry_rate_limited = retry_rate_limited
        self.max_rate_limit_retries = max_rate_limit_retries
        self.history_page_limit = history_page_limit
        self.max_backlog = max_backlog
        self.fatal_close_codes = frozenset(fatal_close_codes)

        self._username = username
        # The parts read their options from this object (live, as before the split:
        # ``client.auto_ack = False`` still takes effect). The session's hooks are bound
        # late because the parts they reach are built after it.
        self._session = Session(
            self,
            SessionHooks(
                on_frame=self._on_frame,
                on_ready=self._on_ready,
                on_detached=self._on_detached,
                on_end=self._on_end,
                ping=self._ping,
                resume=lambda token: self._auth.resume_after_drop(token),
            ),
            token,
        )
        self._requests = RequestTable(self, self._session)
        self._delivery = Delivery(self, self._session, self._requests, dedupe_capacity)
        self._auth = Auth(self, self._session, self._requests)

    # -- properties --------------------------------------------------------------------
    @property
    def state(self) -> ClientState:
        """The current :class:`ClientState`."""
        return self._session.state

    @property
    def ready(self) -> bool:
        """True while authenticated on a live connection."""
        return self._session.state is ClientState.READY

    @property
    def device(self) -> Device | None:
        """This device's session (user id, token, …) once authenticated."""
        return self._session.device

    @property
    def token(self) -> str | None:
        """The session token (persist it to come back as the same device)."""
        return self._session.token

    @property
    def user_id(self) -> str:
        """The authenticated user's id, or ``""``."""
        return self._session.user_id

    @property
    def username(self) -> str:
        """The authenticated user's name (or the configured one), or ``""``."""
        device = self._session.device
        if device is not None and device.username:
            return device.username
        return self._username or ""

    @property
    def reconnects(self) -> int:
        """How many times the client resumed its session after losing the connection."""
        return self._session.reconnects

    @property
    def last_close(self) -> tuple[int, str] | None:
        """(close code, reason) of the last connection that ended, if any."""
        return self._session.last_close

    @property
    def terminal_error(self) -> ClientError | None:
        """Why the session ended (:class:`SessionEnded`, …), if it ended on its own."""
        return self._session.terminal

    @property
    def last_sync(self) -> pb.SyncComplete | None:
        """The SYNC_COMPLETE of the current connection, once it arrived."""
        return self._delivery.last_sync

    @property
    def truncated_conversation_ids(self) -> tuple[str, ...]:
        """Conversations whose unacknowledged history retention removed (SPEC §5),
        from the latest SYNC_COMPLETE."""
        return self._delivery.truncated_conversation_ids

    def last_seq(self, conversation_id: str) -> int | None:
        """The highest seq this client has seen in ``conversation_id`` (None: none yet)."""
        return self._delivery.last_seq(conversation_id)

    def __repr__(self) -> str:
        device = self._session.device
        who = f" user={device.user_id}" if device is not None else ""
        return f"<Client {self.url} {self._session.state.value}{who}>"

    # -- life cycle --------------------------------------------------------------------
    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, *, retry: bool = False) -> Device | None:
        """Authenticate with what the constructor was given.

        With ``token``: resume that session; if the server rejects the token for good
        (1001 unknown, 1002 expired, 1005 revoked) and ``username`` + ``authenticator``
        are set, log in again (a new device: read :attr:`token` afterwards). Without a
        token: log in as ``username``. With neither nothing happens (returns None): call
        :meth:`register`, :meth:`login` or :meth:`resume` yourself.

        ``retry=True`` keeps trying with the reconnect backoff while the server can not
        be reached (bots that start before their server).
        """
        if self._session.device is not None:
            await self.wait_ready()
            return self._session.device
        attempt = 0
        while True:
            try:
                return await self._connect_once()
            except (ConnectError, ConnectionLost, RequestTimeout) as exc:
                if not retry or self._session.closing:
                    raise
                delay = self.backoff.delay(attempt)
                attempt += 1
                log.info("connect failed (%s); retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)

    async def _connect_once(self) -> Device | None:
        can_login = bool(self._username) and self.authenticator is not None
        token = self._session.token
        if token:
            try:
                return await self.resume(token)
            except SovereignClientError as exc:
                if exc.code not in TERMINAL_AUTH_CODES or not can_login:
                    raise
                log.warning("session token rejected (%s); logging in again", exc.code)
        if can_login:
            assert self._username is not None
            return await self.login(self._username)
        return None

    async def close(self) -> None:
        """Flush pending acks, close the connection and stop for good.

        Pending requests fail with :class:`ClientClosed`; event iterators end.
        Safe to call more than once, and after the session ended.
        """
        session = self._session
        if session.finished:
            await session.cancel_tasks()
            return
        if session.closing:
            await self.wait_closed_quietly()
            return
        session.begin_close()
        await self._delivery.flush_before_close()
        # Before the connection goes: requests in flight fail as ClientClosed, not as
        # ConnectionLost.
        self._requests.fail_all(ClientClosed())
        await session.close_connection()
        session.finish(None)
        await session.cancel_tasks()

    async def wait_closed_quietly(self) -> None:
        """Wait until the client is closed or its session ended; never raises."""
        while not self._session.finished:
            await self._session.changed()

    async def wait_closed(self) -> None:
        """Wait until the client is closed; raises the reason if the session ended
        on its own (:class:`SessionEnded`, or :class:`ConnectionLost` with
        ``auto_reconnect=False``)."""
        await self.wait_closed_quietly()
        terminal = self._session.terminal
        if terminal is not None:
            raise terminal

    async def run_forever(self) -> None:
        """For bots: run until :meth:`close` (returns) or the session ends (raises)."""
        await self.wait_closed()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the client is READY (e.g. after a reconnect)."""
        async with asyncio.timeout(timeout):
            while self._session.state is not ClientState.READY:
                self._session.check_open()
                if self._session.device is None and self._session.state is ClientState.IDLE:
                    raise NotAuthenticated("not authenticated: register, login or resume first")
                await self._session.changed()

    async def synced(self, timeout: float | None = None) -> pb.SyncComplete:
        """Wait for SYNC_COMPLETE on the current connection (the backlog was delivered
        and gap repairs finished); returns it. After a reconnect this waits for the new
        connection's SYNC_COMPLETE."""
        async with asyncio.timeout(timeout):
            while True:
                self._session.check_open()
                sync = self._delivery.last_sync
                if sync is not None:
                    return sync
                await self._session.changed()

    def on_state_change(self, listener: Callable[[ClientState], None]) -> Callable[[], None]:
        """Call ``listener(state)`` on every state change; returns an unsubscribe function."""
        return self._session.on_state_change(listener)

    # -- authentication ----------------------------------------------------------------
    async def register(
        self, username: str, display_name: str = "", invite_code: str = ""
    ) -> Device:
        """Create an account with a new passkey (AUTH_REGISTER_*); the client is READY
        afterwards. Raises :class:`SovereignClientError` (1003 taken name or refused
        attestation, 1004 challenge) on failure."""
        device = await self._auth.register(username, display_name, invite_code)
        self._username = username
        return device

    async def login(self, username: str | None = None) -> Device:
        """Sign in with a passkey (AUTH_REQUEST{username} → assertion). Every login is a
        new device with its own session token and delivery cursors."""
        name = username or self._username
        if not name:
            raise ValueError("login needs a username")
        device = await self._auth.login(name)
        self._username = device.username or name
        return device

    async def resume(self, token: str | None = None) -> Device:
        """Resume a session by token (AUTH_REQUEST{session_token}): the same device,
        same cursors; the server slides the expiry. Raises 1001/1002/1005/2004."""
        tok = token or self._session.token
        if not tok:
            raise ValueError("resume needs a session token")
        return await self._auth.resume(tok)

    # -- requests ----------------------------------------------------------------------
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
        """Send any request and return its parsed response (``pb.Ack`` for an Ack).

        Raises :class:`SovereignClientError` for Error/AuthError, :class:`RequestTimeout`
        after ``timeout`` (default ``request_timeout``), :class:`ConnectionLost` if the
        connection drops after sending (unless ``idempotent`` — default: the type is in
        :data:`IDEMPOTENT_TYPES` — in which case it is sent again with the same
        request_id after the client resumed). ``retry_rate_limited`` retries 3004.
        """
        return await self._requests.request(
            msg_type,
            message,
            timeout=timeout,
            request_id=request_id,
            idempotent=idempotent,
            retry_rate_limited=retry_rate_limited,
        )

    # -- consuming events --------------------------------------------------------------
    def events(self, *types: MessageType | int) -> EventStream:
        """An async iterator over pushed events (all, or only ``types``), in order.

        Events that arrived before any consumer existed (e.g. the sync right after
        login) are delivered first. See :class:`EventStream` for when an event counts
        as processed (and gets acknowledged).
        """
        state = self._delivery.open_stream(frozenset(int(t) for t in types) if types else None)
        return EventStream(self, state)

    @overload
    def on(self, types: TypeFilter, handler: EventHandler) -> Callable[[], None]: ...

    @overload
    def on(self, types: TypeFilter) -> Callable[[H], H]: ...

    def on(
        self, types: TypeFilter, handler: EventHandler | None = None
    ) -> Callable[[], None] | Callable[[H], H]:
        """Call ``handler(event)`` for events of ``types`` (None: every type).

        Handlers run one at a time, in event order, sync or ``async``; an event is
        acknowledged after every handler for it returned (an exception is logged and
        counts as handled). ``client.on(types, handler)`` returns an unsubscribe
        function; ``@client.on(types)`` is the decorator form.
        """
        type_set = _type_set(types)
        if handler is None:

            def decorator(fn: H) -> H:
                self._delivery.add_callback(type_set, fn)
                return fn

            return decorator
        return self._delivery.add_callback(type_set, handler)

    def off(self, handler: EventHandler) -> None:
        """Remove every registration of ``handler``."""
        self._delivery.remove_handler(handler)

    async def wait_for(
        self,
        types: TypeFilter = None,
        predicate: Callable[[Event], bool] | None = None,
        *,
        timeout: float | None = None,
    ) -> Event:
        """The first event of ``types`` matching ``predicate`` — from the backlog of
        unconsumed events, else the next one to arrive. Handy in tests. Raises
        TimeoutError after ``timeout`` (default ``request_timeout``)."""
        self._session.check_open()
        return await self._delivery.wait_for(
            _type_set(types), predicate, self.request_timeout if timeout is None else timeout
        )

    # -- acks ----------------------------------------------------------------------------
    async def ack(self, *events: Event | str) -> int:
        """Acknowledge events now (for ``auto_ack=False``): one MESSAGE_ACK with their ids.

        Acks are cumulative per conversation (SPEC §5): acking seq N acknowledges every
        earlier event of that conversation too. Returns ``Ack.count`` (ids that moved
        a cursor).
        """
        ids = [e.event_id if isinstance(e, Event) else e for e in events]
        ids = [i for i in ids if i]
        if not ids:
            return 0
        result = await self._requests.typed(
            T.MESSAGE_ACK, pb.MessageAck(message_ids=ids), T.ACK, pb.Ack
        )
        return int(result.count)

    # -- high-level API ------------------------------------------------------------------
    async def send_message(
        self,
        conversation_id: str,
        payload: bytes,
        message_type: str = "text",
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.MessageReceive:
        """Send (MLS ciphertext) ``payload`` to a conversation; returns the stored
        MessageReceive (the echo, with message_id, seq and server_timestamp).

        Safe across reconnects: the request is re-sent with the same request_id, which
        the server dedupes for 24 h. Pass your own ``request_id`` to make a retry from
        a new process idempotent too.
        """
        return await self._requests.typed(
            T.MESSAGE_SEND,
            pb.MessageSend(
                conversation_id=conversation_id,
                encrypted_payload=payload,
                message_type=message_type,
            ),
            T.MESSAGE_RECEIVE,
            pb.MessageReceive,
            request_id=request_id,
            timeout=timeout,
        )

    async def create_group(self, title: str, member_ids: Sequence[str] = ()) -> pb.GroupCreated:
        """Create a conversation with you as admin plus ``member_ids`` (1:1 = one other
        member). Every member's devices then get GROUP_MEMBER_ADDED events."""
        return await self._requests.typed(
            T.GROUP_CREATE,
            pb.GroupCreate(title=title, member_ids=list(member_ids)),
            T.GROUP_CREATED,
            pb.GroupCreated,
        )

    async def invite(self, conversation_id: str, user_id: str) -> None:
        """Add a user to a conversation (group admins only: 2001; 4002 AlreadyMember)."""
        await self._requests.typed(
            T.GROUP_INVITE,
            pb.GroupInvite(conversation_id=conversation_id, user_id=user_id),
            T.ACK,
            pb.Ack,
        )

    async def remove(self, conversation_id: str, user_id: str) -> None:
        """Remove a member (group admins only: 2001; 4003 NotMember; 4004 for yourself)."""
        await self._requests.typed(
            T.GROUP_REMOVE,
            pb.GroupRemove(conversation_id=conversation_id, user_id=user_id),
            T.ACK,
            pb.Ack,
        )

    async def leave(self, conversation_id: str) -> None:
        """Leave a conversation."""
        await self._requests.typed(
            T.GROUP_LEAVE, pb.GroupLeave(conversation_id=conversation_id), T.ACK, pb.Ack
        )

    async def list_conversations(self) -> list[pb.Conversation]:
        """Every conversation you are a member of (with members, last_seq, mls_epoch)."""
        result = await self._requests.typed(
            T.CONVERSATION_LIST_REQUEST,
            pb.ConversationListRequest(),
            T.CONVERSATION_LIST,
            pb.ConversationList,
        )
        return list(result.conversations)

    async def history(
        self,
        conversation_id: str,
        cursor_seq: int = 0,
        limit: int = 50,
        forward: bool = False,
    ) -> HistoryPage:
        """One page of history (SPEC §12.4): ``cursor_seq`` is exclusive; 0 means "from
        the newest" backward or "from the start" forward; at most 200 events, in
        ascending seq order. These events are *not* delivered to consumers or acked."""
        result = await self._requests.typed(
            T.MESSAGE_HISTORY_REQUEST,
            pb.HistoryRequest(
                conversation_id=conversation_id,
                cursor_seq=cursor_seq,
                limit=limit,
                direction=pb.HISTORY_FORWARD if forward else pb.HISTORY_BACKWARD,
            ),
            T.MESSAGE_HISTORY_RESPONSE,
            pb.HistoryResponse,
        )
        events = [decode_event(e.type, e.payload, replayed=True) for e in result.events]
        return HistoryPage(events, int(result.next_cursor_seq), bool(result.has_more))

    async def iter_history(
        self,
        conversation_id: str,
        *,
        forward: bool = True,
        cursor_seq: int = 0,
        page_size: int = 200,
    ) -> AsyncIterator[Event]:
        """Every event of a conversation, page by page (forward: oldest first; backward:
        newest page first, each page ascending)."""
        cursor = cursor_seq
        while True:
            page = await self.history(conversation_id, cursor, page_size, forward)
            for event in page.events:
                yield event
            if not page.has_more or not page.events:
                return
            cursor = page.next_cursor_seq

    async def mark_read(self, conversation_id: str, up_to_seq: int) -> None:
        """Store your read marker; members get MESSAGE_READ_RECEIPT."""
        await self._requests.typed(
            T.MESSAGE_READ,
            pb.ReadMarker(conversation_id=conversation_id, up_to_seq=up_to_seq),
            T.ACK,
            pb.Ack,
        )

    async def typing(self, conversation_id: str, typing: bool = True) -> None:
        """Tell the conversation you are (not) typing (ephemeral)."""
        await self._requests.typed(
            T.TYPING,
            pb.Typing(conversation_id=conversation_id, typing=typing),
            T.ACK,
            pb.Ack,
        )

    async def set_presence(self, status: str) -> None:
        """Set your presence: ``"online"``, ``"away"`` or ``"offline"``."""
        await self._requests.typed(
            T.PRESENCE_UPDATE, pb.PresenceUpdate(status=status), T.ACK, pb.Ack
        )

    async def upload_key_packages(
        self, key_packages: Sequence[bytes], *, last_resort: bool = False
    ) -> int:
        """Upload MLS KeyPackages for this device (all or nothing); returns how many
        were stored. ``last_resort=True`` uploads exactly one last-resort package."""
        result = await self._requests.typed(
            T.MLS_KEY_PACKAGE_UPLOAD,
            pb.MLSKeyPackageUpload(key_packages=list(key_packages), last_resort=last_resort),
            T.ACK,
            pb.Ack,
        )
        return int(result.count)

    async def fetch_key_packages(self, user_id: str) -> pb.MLSKeyPackageResponse:
        """One KeyPackage per device of ``user_id`` (consumed; 5005 if none)."""
        return await self._requests.typed(
            T.MLS_KEY_PACKAGE_FETCH,
            pb.MLSKeyPackageFetch(user_id=user_id),
            T.MLS_KEY_PACKAGE_RESPONSE,
            pb.MLSKeyPackageResponse,
        )

    async def send_welcome(
        self, conversation_id: str, recipient_id: str, welcome_data: bytes
    ) -> None:
        """Deliver an MLS Welcome to a member (durable to each of its devices)."""
        await self._requests.typed(
            T.MLS_WELCOME,
            pb.MLSWelcome(
                conversation_id=conversation_id,
                recipient_id=recipient_id,
                welcome_data=welcome_data,
            ),
            T.ACK,
            pb.Ack,
        )

    async def commit(
        self,
        conversation_id: str,
        commit_data: bytes,
        *,
        group_info: bytes = b"",
        welcomes: Iterable[tuple[str, bytes]] = (),
    ) -> pb.MLSCommitBroadcast:
        """Send an MLS commit bundle (commit, optional GroupInfo, Welcomes as
        ``(recipient_id, welcome_data)``), accepted or rejected atomically; returns the
        broadcast echo. 5004 EpochMismatch if another commit won the epoch."""
        return await self._requests.typed(
            T.MLS_COMMIT,
            pb.MLSCommit(
                conversation_id=conversation_id,
                commit_data=commit_data,
                group_info=group_info,
                welcomes=[
                    pb.MLSWelcome(
                        conversation_id=conversation_id, recipient_id=rid, welcome_data=data
                    )
                    for rid, data in welcomes
                ],
            ),
            T.MLS_COMMIT_BROADCAST,
            pb.MLSCommitBroadcast,
        )

    async def group_info(self, conversation_id: str) -> pb.GroupInfo:
        """The latest stored GroupInfo of a conversation (5006 if none)."""
        return await self._requests.typed(
            T.MLS_GROUP_INFO_FETCH,
            pb.GroupInfoFetch(conversation_id=conversation_id),
            T.MLS_GROUP_INFO,
            pb.GroupInfo,
        )

    # -- directory, devices, profile (SPEC §12.29) ------------------------------------
    async def lookup_user(self, username: str) -> pb.UserInfo:
        """The enabled user with exactly this username (case-insensitive); raises
        :class:`SovereignClientError` 4006 otherwise (there is no search)."""
        return await self._requests.typed(
            T.USER_LOOKUP, pb.UserLookup(username=username), T.USER_INFO, pb.UserInfo
        )

    async def devices(self) -> list[pb.Device]:
        """Your active devices, newest first: ``current`` marks this one, ``online`` a
        device with a live connection; ``created_at`` / ``last_seen_at`` in Unix ms."""
        result = await self._requests.typed(
            T.DEVICE_LIST_REQUEST, pb.DeviceListRequest(), T.DEVICE_LIST, pb.DeviceList
        )
        return list(result.devices)

    async def revoke_device(self, device_id: str) -> None:
        """Sign one of your devices out for good: its session is revoked, its
        connections close with 4004, its KeyPackages and pending welcomes are gone.
        Revoking this device ends this client's session. 4006 for any other id."""
        await self._requests.typed(
            T.DEVICE_REVOKE, pb.DeviceRevoke(device_id=device_id), T.ACK, pb.Ack
        )

    async def update_profile(self, display_name: str) -> None:
        """Change your display name (1-64 characters, else 3001)."""
        await self._requests.typed(
            T.PROFILE_UPDATE, pb.ProfileUpdate(display_name=display_name), T.ACK, pb.Ack
        )

    async def ping(self, *, timeout: float | None = None) -> float:
        """PING the server; returns the round-trip time in seconds."""
        start = time.perf_counter()
        await self._requests.typed(
            T.PING, pb.Ping(timestamp=_now_us()), T.PONG, pb.Pong, timeout=timeout
        )
        return time.perf_counter() - start

    # -- wiring: what the session asks of the other parts ------------------------------
    def _on_frame(self, conn: Connection, data: bytes) -> None:
        """Route one frame of the current connection: the answer to one of our requests,
        a server PING, or an event (only once the connection is READY)."""
        try:
            msg_type, rid, view = decode_envelope(data)
        except EnvelopeError as exc:
            log.warning("dropping an invalid envelope from the server: %s", exc)
            return
        payload = bytes(view)
        if rid:
            answered = self._requests.resolve(conn, rid, msg_type, payload)
            if answered is not None:
                self._delivery.response_received(answered, msg_type, payload, rid)
                return
        if msg_type == T.PING:
            self._session.answer_ping(conn, rid, payload)
            return
        if msg_type in (T.PONG, T.ACK) or not conn.ready:
            if msg_type in (T.ERROR, T.AUTH_ERROR):
                log.warning("server error before READY: %s", error_from(0, msg_type, payload))
            return
        self._delivery.receive(msg_type, payload, rid)

    def _on_ready(self, conn: Connection) -> None:
        self._requests.resend(conn)
        self._delivery.connection_ready()

    def _on_detached(self, conn: Connection, lost: ConnectionLost) -> None:
        self._delivery.connection_lost()
        self._requests.connection_lost(conn, lost)

    def _on_end(self, error: ClientError | None) -> None:
        # After a fatal close this fails the idempotent requests the drop had kept for
        # a resend; after close() the table is already empty.
        self._requests.fail_all(error if error is not None else ClientClosed())
        self._delivery.end(error)

    async def _ping(self, conn: Connection, timeout: float) -> None:
        await self._requests.call(
            T.PING, pb.Ping(timestamp=_now_us()).SerializeToString(), bound=conn, timeout=timeout
        )
