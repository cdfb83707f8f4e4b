"""One device's session across WebSocket connections (SPEC §1, §4).

The :class:`Session` owns the client's current :class:`Connection` and its life cycle
(:class:`ClientState`): opening a connection for an auth ceremony, marking it READY,
the heartbeat, losing it, the reconnect loop with backoff, and the end (``close()`` or
a close code after which reconnecting is pointless). It knows nothing about requests
or events: at each of those moments it calls one of its :class:`SessionHooks`, which
the :class:`~sovereign.client.client.Client` wires to the request table, the delivery
tracker and the auth ceremonies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol

from google.protobuf.message import DecodeError

from sovereign.client._transport import Connection, open_connection
from sovereign.client.backoff import Backoff
from sovereign.client.errors import (
    ClientClosed,
    ClientError,
    ConnectError,
    ConnectionLost,
    ProtocolViolation,
    RequestTimeout,
    SessionEnded,
    SovereignClientError,
)
from sovereign.client.events import Device
from sovereign.codec import encode_envelope
from sovereign.errors import CloseCode
from sovereign.protocol.types import MessageType
from sovereign.v1 import sovereign_pb2 as pb

__all__ = ["FATAL_CLOSE_CODES", "ClientState", "Session", "SessionHooks", "SessionSettings"]

log = logging.getLogger("sovereign.client")

#: Close codes after which the client does not reconnect (SPEC §4): auth failed, too
#: many connections (reconnecting would only close another of this user's devices),
#: session expired or revoked, account disabled.
FATAL_CLOSE_CODES: Final = frozenset(
    {
        CloseCode.AUTH_FAILED,
        CloseCode.TOO_MANY_CONNECTIONS,
        CloseCode.SESSION_INVALID,
        CloseCode.ACCOUNT_DISABLED,
    }
)


class ClientState(Enum):
    """Where the client is in its life cycle."""

    IDLE = "idle"  # no session yet (or an auth attempt failed)
    CONNECTING = "connecting"  # opening the WebSocket
    AUTHENTICATING = "authenticating"  # socket open, auth ceremony in progress
    READY = "ready"  # authenticated: requests flow, events arrive
    RECONNECTING = "reconnecting"  # lost the connection, waiting to resume
    CLOSED = "closed"  # close() was called, or the session ended (terminal)


class SessionSettings(Protocol):
    """The client options the session reads (live: changing them on the client counts)."""

    @property
    def url(self) -> str: ...
    @property
    def origin(self) -> str: ...
    @property
    def send_origin(self) -> bool: ...
    @property
    def extra_headers(self) -> Mapping[str, str]: ...
    @property
    def ssl_context(self) -> ssl.SSLContext | None: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def ping_interval(self) -> float | None: ...
    @property
    def pong_timeout(self) -> float: ...
    @property
    def auto_reconnect(self) -> bool: ...
    @property
    def backoff(self) -> Backoff: ...
    @property
    def fatal_close_codes(self) -> frozenset[int]: ...


@dataclass(frozen=True, slots=True)
class SessionHooks:
    """What the session asks of the rest of the client."""

    #: A frame arrived on the current connection.
    on_frame: Callable[[Connection, bytes], None]
    #: The connection is authenticated: send what waited for it.
    on_ready: Callable[[Connection], None]
    #: The connection is gone: forget what was bound to it.
    on_detached: Callable[[Connection, ConnectionLost], None]
    #: The session is over (None: closed by the application): fail whatever still waits.
    on_end: Callable[[ClientError | None], None]
    #: One PING/PONG round trip on the connection within the timeout (RequestTimeout).
    ping: Callable[[Connection, float], Awaitable[object]]
    #: Resume the session with the token on a new connection (the reconnect loop);
    #: raises SessionEnded when the server refuses it for good.
    resume: Callable[[str], Awaitable[object]]


class Session:
    """The connection and life cycle of one device. See the module docstring."""

    def __init__(self, settings: SessionSettings, hooks: SessionHooks, token: str | None) -> None:
        self._settings = settings
        self._hooks = hooks
        self._token = token
        self._device: Device | None = None
        self._state = ClientState.IDLE
        self._conn: Connection | None = None
        self._closing = False
        self._finished = False
        self._terminal: ClientError | None = None
        self._change_waiters: list[asyncio.Future[None]] = []
        self._state_listeners: list[Callable[[ClientState], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._reconnects = 0
        self._ever_ready = False
        self._last_close: tuple[int, str] | None = None

    # -- what the client can read -------------------------------------------------------
    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def connection(self) -> Connection | None:
        """The current connection (READY or still authenticating), if any."""
        return self._conn

    @property
    def device(self) -> Device | None:
        return self._device

    @property
    def token(self) -> str | None:
        """The session token to resume with: the authenticated one, else the configured."""
        return self._token

    @property
    def user_id(self) -> str:
        return self._device.user_id if self._device is not None else ""

    @property
    def reconnects(self) -> int:
        return self._reconnects

    @property
    def last_close(self) -> tuple[int, str] | None:
        return self._last_close

    @property
    def terminal(self) -> ClientError | None:
        """Why the session ended on its own, if it did."""
        return self._terminal

    @property
    def closing(self) -> bool:
        """close() was called (it may still be flushing acks)."""
        return self._closing

    @property
    def finished(self) -> bool:
        """Closed or ended: nothing will happen any more."""
        return self._finished

    def is_current(self, conn: Connection) -> bool:
        """True if ``conn`` is the live connection of this session."""
        return conn is self._conn and not conn.closed

    def check_open(self) -> None:
        """Raise why the client can not be used any more, if it can not."""
        if self._terminal is not None:
            raise self._terminal
        if self._finished or self._closing:
            raise ClientClosed()

    # -- change notification ------------------------------------------------------------
    def notify(self) -> None:
        """Wake everyone waiting in :meth:`changed` (state, sync or session changed)."""
        waiters, self._change_waiters = self._change_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def changed(self) -> None:
        """Wait for the next :meth:`notify`."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._change_waiters.append(fut)
        await fut

    def on_state_change(self, listener: Callable[[ClientState], None]) -> Callable[[], None]:
        self._state_listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._state_listeners.remove(listener)

        return remove

    def _set_state(self, state: ClientState) -> None:
        if state is self._state or (self._finished and state is not ClientState.CLOSED):
            return
        self._state = state
        for listener in list(self._state_listeners):
            try:
                listener(state)
            except Exception:
                log.exception("state listener failed")
        self.notify()

    def _set_disconnected(self) -> None:
        """No usable connection: IDLE before the first authentication, else RECONNECTING."""
        if not self._finished:
            self._set_state(ClientState.IDLE if self._device is None else ClientState.RECONNECTING)

    # -- background tasks ---------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the session cancels when the client closes."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("client task failed", exc_info=task.exception())

    async def cancel_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- connections --------------------------------------------------------------------
    async def open(self) -> Connection:
        """A new connection for an auth ceremony (it replaces the current one)."""
        old = self._conn
        if old is not None:
            self._detach(old, CloseCode.NORMAL, "replaced")
            old.close(CloseCode.NORMAL, "replaced")
        self._set_state(ClientState.CONNECTING)
        s = self._settings
        headers = dict(s.extra_headers)
        if s.send_origin:
            headers["Origin"] = s.origin
        try:
            conn = await open_connection(
                s.url,
                on_message=self._on_frame,
                on_disconnected=self._on_disconnected,
                headers=headers,
                ssl_context=s.ssl_context,
                timeout=s.connect_timeout,
            )
        except BaseException:
            self._set_disconnected()
            raise
        if self._closing or self._finished:
            conn.close(CloseCode.NORMAL, "client closed")
            raise ClientClosed()
        if conn.closed:  # dropped during the handshake
            raise ConnectionLost(conn.effective_close_code, conn.close_reason)
        self._conn = conn
        self._set_state(ClientState.AUTHENTICATING)
        return conn

    def mark_ready(self, conn: Connection, device: Device) -> None:
        """The auth ceremony on ``conn`` succeeded (``conn`` must be current).

        Runs synchronously on AUTH_SUCCESS / AUTH_REGISTER_SUCCESS, before any event of
        the new connection is processed (the sync backlog follows right behind).
        """
        self._device = device
        self._token = device.token
        conn.ready = True
        if self._ever_ready:
            self._reconnects += 1
        self._ever_ready = True
        self._set_state(ClientState.READY)
        if self._settings.ping_interval:
            self._heartbeat_task = self.spawn(self._heartbeat(conn))
        self._hooks.on_ready(conn)
        log.info("ready as user %s (%s)", device.user_id, device.username or "-")

    def abandon(self, conn: Connection) -> None:
        """An auth attempt on ``conn`` failed: close it (the server may already have)."""
        if conn is self._conn and not conn.ready:
            self._detach(conn, CloseCode.NORMAL, "authentication failed")
            conn.close(CloseCode.NORMAL, "authentication failed")
            self._set_disconnected()

    def answer_ping(self, conn: Connection, request_id: str, payload: bytes) -> None:
        """SPEC §3: the server may PING too; answer with a PONG echoing its timestamp."""
        try:
            ts = pb.Ping.FromString(payload).timestamp
        except DecodeError:
            ts = 0
        pong = pb.Pong(timestamp=ts).SerializeToString()
        conn.send(encode_envelope(MessageType.PONG, request_id, pong))

    def _on_frame(self, conn: Connection, data: bytes) -> None:
        if conn is self._conn:  # a replaced connection's late frames are dropped
            self._hooks.on_frame(conn, data)

    def _detach(self, conn: Connection, code: int, reason: str) -> None:
        """Forget ``conn``: stop its heartbeat and let the client drop what was bound to it."""
        if self._conn is conn:
            self._conn = None
        self._last_close = (code, reason)
        hb = self._heartbeat_task
        if hb is not None and hb is not asyncio.current_task():
            hb.cancel()
        self._heartbeat_task = None
        self._hooks.on_detached(conn, ConnectionLost(code, reason))
        self.notify()

    def _on_disconnected(self, conn: Connection) -> None:
        if conn is not self._conn:
            return
        was_ready = conn.ready
        code = conn.effective_close_code
        reason = conn.close_reason or conn.local_reason
        self._detach(conn, code, reason)
        if self._closing or self._finished:
            return
        log.info("connection closed: %d %s", code, reason)
        if self._device is None:
            self._set_state(ClientState.IDLE)
            return
        if code in self._settings.fatal_close_codes:
            self.terminate(SessionEnded(code, reason))
            return
        if not was_ready and self._reconnect_task is not None:
            self._set_state(ClientState.RECONNECTING)
            return  # a resume attempt failed: the reconnect loop goes on
        if not self._settings.auto_reconnect:
            self.terminate(ConnectionLost(code, reason))
            return
        self._start_reconnect()

    # -- reconnect and heartbeat --------------------------------------------------------
    def _start_reconnect(self) -> None:
        old = self._reconnect_task
        if old is not None and not old.done():
            old.cancel()  # finished its job: the connection it made was READY
        self._set_state(ClientState.RECONNECTING)
        self._reconnect_task = self.spawn(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        attempt = 0
        me = asyncio.current_task()
        try:
            while not self._closing and not self._finished:
                delay = self._settings.backoff.delay(attempt)
                attempt += 1
                self._set_state(ClientState.RECONNECTING)
                log.info("reconnecting in %.2f s (attempt %d)", delay, attempt)
                await asyncio.sleep(delay)
                if self._closing or self._finished:
                    return
                token = self._token
                if not token:
                    self.terminate(SessionEnded(None, "no session token to resume"))
                    return
                try:
                    await self._hooks.resume(token)
                    return
                except SessionEnded as ended:
                    self.terminate(ended)
                    return
                except SovereignClientError as exc:
                    log.warning("resume attempt %d refused: %s", attempt, exc)
                except (ConnectError, ConnectionLost, RequestTimeout, ProtocolViolation) as exc:
                    log.info("reconnect attempt %d failed: %s", attempt, exc)
        finally:
            if self._reconnect_task is me:
                self._reconnect_task = None

    async def _heartbeat(self, conn: Connection) -> None:
        while True:
            interval = self._settings.ping_interval
            assert interval is not None
            await asyncio.sleep(interval)
            if conn is not self._conn or conn.closed:
                return
            timeout = self._settings.pong_timeout
            try:
                await self._hooks.ping(conn, timeout)
            except RequestTimeout:
                log.warning("no PONG within %.1f s: dropping the connection", timeout)
                if conn is self._conn:
                    self._heartbeat_task = None  # do not cancel ourselves in _detach
                    conn.abort("pong timeout")
                return
            except ClientError:
                return

    # -- the end --------------------------------------------------------------------------
    def begin_close(self) -> None:
        """close() started: no new requests, no more reconnect attempts."""
        self._closing = True
        task = self._reconnect_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def close_connection(self) -> None:
        """Close the current connection (if any) and wait until the socket is gone."""
        conn = self._conn
        if conn is not None:
            self._detach(conn, CloseCode.NORMAL, "client closed")
            conn.close(CloseCode.NORMAL, "client closed")
            await conn.wait_closed()

    def terminate(self, error: ClientError) -> None:
        """The session is over (fatal close or refused resume): stop everything."""
        if self._finished or self._terminal is not None:
            return
        self._terminal = error
        log.warning("%s", error)
        task = self._reconnect_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        conn = self._conn
        if conn is not None:
            self._detach(conn, conn.effective_close_code, "session ended")
            conn.close(CloseCode.NORMAL, "session ended")
        self.finish(error)

    def finish(self, error: ClientError | None) -> None:
        """Enter CLOSED for good (``error``: why the session ended; None: close())."""
        self._finished = True
        self._hooks.on_end(error)
        self._set_state(ClientState.CLOSED)
        self.notify()
