"""The ports the services are built from (explicit dependencies, no service locator).

A service receives exactly what it uses, chosen from:

- ``config``   — :class:`sovereign.config.Config` (typed, validated at start-up);
- ``db``       — :class:`sovereign.storage.Database`, or the stores over it;
- ``eventlog`` — :class:`sovereign.services.eventlog.EventLog` (seq allocation, group
  commit, undo);
- ``outbox``   — :class:`Outbox` below: every frame to a client goes through it;
- ``clock``    — :class:`sovereign.clock.Clock` (monotonic + wall, injected);
- ``tasks``    — :class:`Tasks` below (request tasks with exactly one response,
  background work awaited at shutdown);
- ``bus``      — :class:`Bus` below: cluster notifications between nodes (SPEC §12.27);
  :class:`NullBus` on a single node.

The outbox is an interface so the transport can change under the services: today
``sovereign.transport.outbox.LocalOutbox`` writes to this process's sockets; a
cross-node implementation can fan out through another process without any service
changing. Services never import ``sovereign.transport``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol

from google.protobuf.message import Message

from sovereign.services.session import Session


class Outbox(Protocol):
    """Where frames for clients go: one connection, a set of users, or a backlog.

    Frames written while *corked* (between :meth:`cork` and :meth:`uncork`) collect per
    connection and leave in one write each (SPEC §5: a commit's effects). A write that
    would push a connection's send buffer past ``send_buffer_limit`` drops that
    connection instead (close 1013; its events stay stored, SPEC §5).
    """

    #: ``frame(envelope) -> bytes``: one complete server WebSocket frame, built once
    #: and shareable by every recipient (encode once, write many).
    frame: Callable[[bytes], bytes]
    #: ``append_frame(buf, envelope)``: append one frame to a backlog buffer.
    append_frame: Callable[[bytearray, bytes], None]

    # -- one connection -----------------------------------------------------------
    def send(self, s: Session, msg_type: int, request_id: str, message: Message) -> None: ...
    def send_payload(self, s: Session, msg_type: int, request_id: str, payload: bytes) -> None: ...
    def send_error(
        self,
        s: Session,
        code: int,
        request_id: str = "",
        message: str = "",
        retry_after_ms: int = 0,
    ) -> None:
        """The one error response (SPEC §8): AuthError for auth codes, else Error; a
        fatal code is followed by its registry close code."""
        ...

    def reject(self, s: Session, code: int, request_id: str, retry_after_ms: int) -> None: ...
    def response_frame(self, msg_type: int, request_id: str, message: Message) -> bytes:
        """One response as a complete frame, counted as sent, for a caller that writes
        it with others in one :meth:`write_backlog` (a READY's AUTH_SUCCESS)."""
        ...

    def close(self, s: Session, code: int, reason: str = "") -> None: ...
    async def write_backlog(self, s: Session, data: bytes | bytearray) -> None:
        """Write a batch of frames in one call, first waiting while the connection's
        send buffer is over its high-water mark (flow control, no polling)."""
        ...

    def go_live(self, s: Session) -> bool:
        """From now on fan-out writes reach ``s`` directly (its backlog is out)."""
        ...

    # -- many connections ---------------------------------------------------------
    def publish(self, frame: bytes, user_ids: Iterable[str], exclude: Session | None) -> None:
        """Write ``frame`` to every live connection of ``user_ids`` except ``exclude``."""
        ...

    def publish_message(
        self,
        user_ids: Iterable[str],
        msg_type: int,
        message: Message,
        exclude: Session | None = None,
    ) -> None:
        """Encode ``message`` once and :meth:`publish` it (ephemeral pushes)."""
        ...

    def cork(self) -> None: ...
    def uncork(self) -> None: ...

    # -- registry -----------------------------------------------------------------
    def attach(self, s: Session) -> Sequence[Session]:
        """Index a READY session under its user (and lift the pre-READY reassembly cap,
        SPEC §12.31); returns that user's sessions, oldest
        first (the caller enforces the per-user cap)."""
        ...

    def detach(self, s: Session) -> None:
        """Take ``s`` out of its user's index (it is being closed)."""
        ...

    def sessions(self, user_id: str) -> Sequence[Session]: ...
    def live_sessions(self, user_id: str) -> Iterable[Session]: ...
    def all_sessions(self) -> Iterable[Session]: ...
    def count(self) -> int: ...
    def close_user(self, user_id: str, code: int, reason: str) -> int: ...
    def close_session_id(self, session_id: str, code: int, reason: str) -> int: ...


class Tasks(Protocol):
    """Async work the server owns (kept referenced; awaited at shutdown)."""

    def spawn(self, s: Session, request_id: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request; any failure becomes exactly one error response."""
        ...

    def background(self, coro: Coroutine[Any, Any, None]) -> None: ...


class Bus(Protocol):
    """Notifications between the nodes of a cluster (SPEC §12.27). Never the store.

    Delivery is best effort and at most once: a notification published while the link
    is down, or dropped by it, is simply lost. That is safe because every durable fact
    is in the database first (a node publishes only after COMMIT), and because after
    every (re)connection the bus calls ``on_resync``: the services then catch their
    live connections up from the database by seq. A node never receives its own
    notifications. Payloads are opaque bytes owned by the services.
    """

    #: This process's id in the cluster (unique per process start).
    node_id: str

    def publish(self, payload: bytes) -> None:
        """Queue ``payload`` for every other node; never blocks, never raises."""
        ...

    def set_handlers(
        self,
        on_message: Callable[[bytes], None],
        on_resync: Callable[[], Awaitable[None]],
    ) -> None:
        """``on_message(payload)`` runs on the event loop for each notification from
        another node; ``on_resync()`` after each (re)connection (not before the first
        ``start`` returns: the caller loads state itself then)."""
        ...

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...


class NullBus:
    """The single-node bus: there is no other node to tell."""

    node_id = "single"

    def publish(self, payload: bytes) -> None:
        return None

    def set_handlers(
        self,
        on_message: Callable[[bytes], None],
        on_resync: Callable[[], Awaitable[None]],
    ) -> None:
        return None

    @property
    def connected(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Peers(Protocol):
    """What a service tells the other nodes of a cluster (SPEC §12.27), beside doing the
    same for this node's connections. ``sovereign.services.cluster.ClusterService``
    implements it over a :class:`Bus`; :class:`NullPeers` on a single node.

    Only ephemeral signals and invalidations go this way: committed conversation
    events reach other nodes through the cluster service's ordered event feed.
    """

    #: False on a single node: callers may skip building what they would send.
    clustered: bool
    #: This node's id (the bus's).
    node_id: str

    def push(self, user_ids: Iterable[str], envelope: bytes) -> None:
        """``envelope`` to the live connections of ``user_ids`` on the other nodes."""
        ...

    def push_device(self, device_id: str, envelope: bytes) -> None:
        """``envelope`` to the connections of one device on the other nodes."""
        ...

    def welcome(self, user_id: str, event_id: str, payload: bytes) -> None:
        """A stored MLS welcome for ``user_id``'s connections on the other nodes."""
        ...

    def close_user(self, user_id: str, code: int, reason: str) -> None: ...
    def close_session(self, session_id: str, code: int, reason: str) -> None: ...

    def position(self, kind: int, conversation_id: str, user_id: str, seq: int) -> None:
        """A delivered (kind 0) or read (kind 1) position moved to ``seq``: other
        nodes raise their cached copy."""
        ...

    def presence(self, user_id: str, status: str) -> None:
        """This node's aggregate status of ``user_id`` changed."""
        ...

    def remote_presence(self, user_id: str) -> str:
        """The best status of ``user_id`` on the other nodes ("offline" if none)."""
        ...

    def remote_connections(self, user_id: str) -> list[tuple[int, str]]:
        """(ready time µs, node id) of ``user_id``'s connections on other nodes."""
        ...

    def remote_sessions(self, user_id: str) -> set[str]:
        """Session ids of ``user_id``'s READY connections on other nodes."""
        ...

    def connections_changed(self, user_id: str) -> None:
        """This node's READY connections of ``user_id`` changed (the per-user cap)."""
        ...

    def forget_profile(self, user_id: str) -> None:
        """``user_id``'s profile changed: other nodes drop their cached copy."""
        ...

    def settings_changed(self) -> None:
        """The stored runtime settings changed (SPEC §12.23): other nodes re-read them."""
        ...

    def purged(self, conversation_ids: Sequence[str]) -> None:
        """Retention removed events of these conversations: other nodes re-read their
        ``purged_seq``."""
        ...


class NullPeers:
    """A single node has no peers."""

    clustered = False
    node_id = "single"

    def push(self, user_ids: Iterable[str], envelope: bytes) -> None:
        return None

    def push_device(self, device_id: str, envelope: bytes) -> None:
        return None

    def welcome(self, user_id: str, event_id: str, payload: bytes) -> None:
        return None

    def close_user(self, user_id: str, code: int, reason: str) -> None:
        return None

    def close_session(self, session_id: str, code: int, reason: str) -> None:
        return None

    def position(self, kind: int, conversation_id: str, user_id: str, seq: int) -> None:
        return None

    def presence(self, user_id: str, status: str) -> None:
        return None

    def remote_presence(self, user_id: str) -> str:
        return "offline"

    def remote_connections(self, user_id: str) -> list[tuple[int, str]]:
        return []

    def remote_sessions(self, user_id: str) -> set[str]:
        return set()

    def connections_changed(self, user_id: str) -> None:
        return None

    def forget_profile(self, user_id: str) -> None:
        return None

    def settings_changed(self) -> None:
        return None

    def purged(self, conversation_ids: Sequence[str]) -> None:
        return None
