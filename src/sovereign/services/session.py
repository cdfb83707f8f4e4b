"""Per-connection state owned by the services (SPEC §4).

One :class:`Session` exists per WebSocket from the upgrade on. It is what handlers and
services receive: who is on the other end once authenticated (user, device, auth
session), the protocol phase, the rate-limit bucket, and the delivery and ephemeral
state of this connection (offline sync in progress, presence, typing marks).

The transport keeps its own object (socket, write buffer, frame reassembly) and links
the two: ``session.link`` is that object, opaque here and touched only by the outbox
(``sovereign.services.ports.Outbox``). Small on purpose (``__slots__``): tens of
thousands may be idle at once.
"""

from __future__ import annotations

from typing import Any, Protocol

from sovereign.protocol.connection import ConnectionState


class Link(Protocol):
    """What services may ask of the transport's connection object directly."""

    def user_agent(self) -> str: ...
    def peer(self) -> str: ...
    def source_ip(self) -> str: ...


class Rejects(Protocol):
    """The part of the outbox a session needs (the dispatcher's reject callback)."""

    def reject(self, s: Session, code: int, request_id: str, retry_after_ms: int) -> None: ...


class SyncState:
    """A connection receiving its backlog: live events wait here (SPEC §4 READY order)."""

    __slots__ = (
        "buffer",
        "device",
        "head",
        "key_packages",
        "low_checked",
        "synced_upto",
        "synced_welcomes",
        "welcome_mark",
    )

    def __init__(self, welcome_mark: int = 0) -> None:
        # (conversation_id, seq, welcome event_id, frame); welcomes have no conversation seq
        self.buffer: list[tuple[str, int, str, bytes]] = []
        self.synced_upto: dict[str, int] = {}
        self.synced_welcomes: set[str] = set()
        # The MLS service's (generation, ordinary KeyPackage count), read with the
        # device when it was not in memory (MlsService.sync_read); None otherwise.
        self.key_packages: tuple[int, int] | None = None
        # The MLS service's KeyPackage write count when it decided MLS_KEY_PACKAGE_LOW
        # in the sync's own write (MlsService.sync_tail); -1: not decided there.
        self.low_checked = -1
        # What a READY needs of a device not in memory (created_at_us, cursors, pending
        # welcomes), read with the session token (DeliveryService.resume_read); the
        # welcomes stand only if no welcome was pushed since ``welcome_mark``.
        self.device: tuple[int, dict[str, int], list[tuple[str, str, str, int, bytes]]] | None = (
            None
        )
        self.welcome_mark = welcome_mark
        # Frames that go ahead of the backlog, in the sync's first write: the
        # AUTH_SUCCESS that made the session READY. With nothing to read, AUTH_SUCCESS,
        # SYNC_COMPLETE and presence leave in one write; before any read it goes alone,
        # so it never waits for storage. (A request the client sent before it received
        # AUTH_SUCCESS may be answered ahead of it: SPEC §4 has clients wait for it.)
        self.head = b""


class Session:
    __slots__ = (
        "bucket",
        "conn_id",
        "device_id",
        "is_admin",
        "link",
        "outbox",
        "presence",
        "ready_at",
        "ready_at_us",
        "session_id",
        "state",
        "sync",
        "typing_marks",
        "user_id",
        "username",
    )

    def __init__(self, conn_id: int, link: Any, outbox: Rejects, bucket: Any) -> None:
        self.conn_id = conn_id
        # The transport's connection (a Link for services; writes go through the outbox).
        self.link: Any = link
        self.outbox = outbox
        self.bucket = bucket  # the dispatcher's TokenBucket (SPEC §9)
        self.state = ConnectionState()
        self.user_id = ""
        self.username = ""
        self.session_id = ""
        self.device_id = ""
        self.is_admin = False
        self.ready_at = 0.0
        self.ready_at_us = 0  # wall clock: orders a user's connections across nodes
        self.sync: SyncState | None = None  # set while the offline backlog streams
        self.presence = "online"  # this connection's PRESENCE_UPDATE status
        self.typing_marks: dict[str, float] | None = None  # conversation -> last TYPING

    @property
    def ready(self) -> bool:
        return self.state.ready

    @property
    def closed(self) -> bool:
        return self.state.closed

    def reject(self, code: int, request_id: str, retry_after_ms: int) -> None:
        """The dispatcher's callback for envelope-level refusals (SPEC §1, §2, §12.7)."""
        self.outbox.reject(self, code, request_id, retry_after_ms)

    def __repr__(self) -> str:
        return f"<Session conn={self.conn_id} user={self.user_id or '-'}>"
