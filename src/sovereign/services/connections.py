"""Connection lifecycle policy (SPEC §4): READY, the per-user cap, and the live effects
of disabling an account or revoking a session.

The transport reports opens and closes; this service decides what they mean and tells
the other services through explicit hooks (no service reaches into another):

- ``ready_hooks`` run once a connection is READY and its success response is out
  (delivery starts the offline sync);
- ``closed_hooks`` run when an authenticated connection is gone (delivery forgets the
  device's connection, presence is re-aggregated).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sovereign.clock import Clock
from sovereign.config import Config
from sovereign.errors import CloseCode
from sovereign.services.ports import NullPeers, Outbox, Peers
from sovereign.services.session import Session
from sovereign.storage import SessionStore, UserStore

log = logging.getLogger("sovereign.connections")


class ConnectionService:
    def __init__(
        self,
        config: Config,
        users: UserStore,
        sessions: SessionStore,
        outbox: Outbox,
        clock: Clock,
        peers: Peers | None = None,
    ) -> None:
        self.config = config
        self.users = users
        self.sessions = sessions
        self.outbox = outbox
        self.clock = clock
        # Cluster mode (SPEC §12.27): the cap counts connections on every node, and
        # closes reach every node.
        self.peers: Peers = peers if peers is not None else NullPeers()
        self.ready_hooks: list[Callable[[Session], None]] = []
        self.closed_hooks: list[Callable[[Session], None]] = []

    def authenticated(
        self,
        s: Session,
        *,
        user_id: str,
        username: str,
        session_id: str,
        device_id: str,
        is_admin: bool,
    ) -> bool:
        """AUTHENTICATING -> READY; enforces max_connections_per_user (SPEC §4)."""
        if s.state.closed:
            return False
        s.state.authenticated()
        s.user_id = user_id
        s.username = username
        s.session_id = session_id
        s.device_id = device_id
        s.is_admin = is_admin
        s.ready_at = self.clock.monotonic()
        # Fan-out reaches the connection only once its offline backlog is out
        # (delivery calls outbox.go_live): live events meanwhile wait in its SyncState.
        siblings = self.outbox.attach(s)
        if self.peers.clustered:
            s.ready_at_us = self.clock.now_us()
            self.enforce_cap(user_id)
            self.peers.connections_changed(user_id)
            return True
        for oldest in siblings[: max(0, len(siblings) - self.config.max_connections_per_user)]:
            self._close_over_cap(oldest)
        return True

    def _close_over_cap(self, s: Session) -> None:
        log.info("user %s over connection cap: closing oldest connection", s.user_id)
        self.outbox.detach(s)
        self.outbox.close(s, CloseCode.TOO_MANY_CONNECTIONS, "too many connections")

    def enforce_cap(self, user_id: str) -> None:
        """Cluster mode: the user's connections on every node, oldest first (ready
        time, then node id); this node closes those of its own that are beyond the
        cap. Every node decides the same from the same announcements, so the oldest
        connection is closed wherever it is (SPEC §4, §12.27)."""
        node = self.peers.node_id
        entries: list[tuple[int, str, int, Session | None]] = [
            (s.ready_at_us, node, s.conn_id, s) for s in self.outbox.sessions(user_id)
        ]
        entries += [
            (stamp, other, 0, None) for stamp, other in self.peers.remote_connections(user_id)
        ]
        excess = len(entries) - self.config.max_connections_per_user
        if excess <= 0:
            return
        entries.sort(key=lambda e: (e[0], e[1], e[2]))
        closed = False
        for _stamp, _node, _cid, local in entries[: max(0, excess)]:
            if local is not None:
                self._close_over_cap(local)
                closed = True
        if closed:
            self.peers.connections_changed(user_id)

    def ready(self, s: Session) -> None:
        for hook in self.ready_hooks:
            hook(s)

    def closed(self, s: Session) -> None:
        if s.user_id:
            for hook in self.closed_hooks:
                hook(s)
            if self.peers.clustered and s.ready_at_us:
                self.peers.connections_changed(s.user_id)

    # -- live effects of account changes (SPEC §4) ----------------------------------
    def close_user(self, user_id: str, code: int, reason: str) -> int:
        """Closes on this node; in a cluster the other nodes close theirs too."""
        self.peers.close_user(user_id, code, reason)
        return self.outbox.close_user(user_id, code, reason)

    def close_session(self, session_id: str, code: int, reason: str) -> int:
        self.peers.close_session(session_id, code, reason)
        return self.outbox.close_session_id(session_id, code, reason)

    async def set_user_enabled(self, user_id: str, enabled: bool) -> None:
        """Disabling closes the user's live connections with 4005 (SPEC §4)."""
        await self.users.set_enabled(user_id, enabled)
        if not enabled:
            self.close_user(user_id, CloseCode.ACCOUNT_DISABLED, "account disabled")

    async def revoke_session(self, session_id: str) -> bool:
        """Revoking closes the session's live connections with 4004 (SPEC §4)."""
        revoked = await self.sessions.revoke(session_id, self.clock.now_us())
        self.close_session(session_id, CloseCode.SESSION_INVALID, "session revoked")
        return revoked
