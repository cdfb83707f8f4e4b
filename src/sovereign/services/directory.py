"""Directory, devices and profile (SPEC §12.29).

- USER_LOOKUP: one exact username (case-insensitive, the same key that makes usernames
  unique) among *enabled* users -> USER_INFO. Anything else -- unknown, disabled, not
  even a well-formed username -- is the same 4006, so the answer says nothing beyond
  "no such user"; there is no listing or prefix search.
- DEVICE_LIST: the caller's own active devices (sessions neither revoked nor expired),
  newest first. ``online`` = a READY connection of that device now; times are Unix ms;
  ``last_seen_at`` is now for an online device, else the last login or resume stored.
- DEVICE_REVOKE: one active device of the caller (another user's, unknown, revoked or
  expired -> 4006): session revoked, KeyPackages deleted and pending welcomes dropped in
  one transaction; then its connections close with 4004 -- after the Ack, so revoking
  the asking device ("sign out") still gets its answer.
- PROFILE_UPDATE: display name of 1-64 characters, not blank, no control characters
  (else 3001); the profile cache is replaced so GROUP_CREATED / CONVERSATION_LIST show it.
- DEVICE_ADDED: sent when a device uploads KeyPackages for the first time (the MLS
  service calls :meth:`DirectoryService.device_announced`), to the user's other live
  connections and to every user sharing a conversation with the user.
"""

from __future__ import annotations

import logging
import unicodedata
from functools import partial

from sovereign.clock import Clock
from sovereign.codec import encode_envelope
from sovereign.errors import CloseCode, ErrorCode, SovereignError
from sovereign.protocol.types import MessageType as T
from sovereign.services.auth import USERNAME_RE
from sovereign.services.connections import ConnectionService
from sovereign.services.ports import Outbox
from sovereign.services.session import Session
from sovereign.services.state import ConversationState
from sovereign.storage import SessionStore, UserStore
from sovereign.storage import devices as devsql
from sovereign.storage.database import Database
from sovereign.v1 import sovereign_pb2 as pb

log = logging.getLogger("sovereign.directory")

MAX_DISPLAY_NAME = 64
MAX_DEVICES_LISTED = 100


def check_display_name(name: str) -> str:
    """SPEC §12.29: 1-64 characters; blank or control characters are malformed (3001)."""
    if not 1 <= len(name) <= MAX_DISPLAY_NAME:
        raise SovereignError(
            ErrorCode.MALFORMED_MESSAGE, f"display_name must be 1-{MAX_DISPLAY_NAME} characters"
        )
    if not name.strip() or any(unicodedata.category(ch) == "Cc" for ch in name):
        raise SovereignError(
            ErrorCode.MALFORMED_MESSAGE, "display_name must not be blank or hold control characters"
        )
    return name


class DirectoryService:
    def __init__(
        self,
        db: Database,
        users: UserStore,
        sessions: SessionStore,
        state: ConversationState,
        connections: ConnectionService,
        outbox: Outbox,
        clock: Clock,
    ) -> None:
        self.db = db
        self.users = users
        self.sessions = sessions
        self.state = state
        self.connections = connections
        self.outbox = outbox
        self.clock = clock

    # -- USER_LOOKUP -----------------------------------------------------------------
    async def lookup(self, s: Session, rid: str, req: pb.UserLookup) -> None:
        user = None
        if USERNAME_RE.match(req.username):
            user = await self.users.get_by_username(req.username)
        if user is None or not user.enabled:
            raise SovereignError(ErrorCode.USER_NOT_FOUND, "no such user")
        self.outbox.send(
            s,
            T.USER_INFO,
            rid,
            pb.UserInfo(
                user_id=user.user_id, username=user.username, display_name=user.display_name
            ),
        )

    # -- DEVICE_LIST -----------------------------------------------------------------
    async def list_devices(self, s: Session, rid: str, _req: pb.DeviceListRequest) -> None:
        now = self.clock.now_us()
        rows = await self.sessions.list(s.user_id, 0, MAX_DEVICES_LISTED, active_at_us=now)
        online = {o.device_id for o in self.outbox.sessions(s.user_id) if o.ready}
        # ... or on another node (SPEC §12.27)
        remote = self.connections.peers.remote_sessions(s.user_id)
        online.update(r.device_id for r in rows if r.session_id in remote)
        devices = [
            pb.Device(
                device_id=r.device_id,
                created_at=r.created_at_us // 1000,
                last_seen_at=(now if r.device_id in online else r.last_seen_at_us) // 1000,
                current=r.device_id == s.device_id,
                online=r.device_id in online,
            )
            for r in rows
            if r.kind == "device"  # an admin panel sign-in is not a device (SPEC §12.28)
        ]
        self.outbox.send(s, T.DEVICE_LIST, rid, pb.DeviceList(devices=devices))

    # -- DEVICE_REVOKE ---------------------------------------------------------------
    async def revoke_device(self, s: Session, rid: str, req: pb.DeviceRevoke) -> None:
        session_id = None
        if req.device_id:
            session_id = await self.db.write(
                partial(
                    devsql.revoke_device_txn,
                    user_id=s.user_id,
                    device_id=req.device_id,
                    now_us=self.clock.now_us(),
                )
            )
        if session_id is None:
            raise SovereignError(ErrorCode.USER_NOT_FOUND, "no such device")
        log.info("user %s revoked device %s", s.user_id, req.device_id)
        if rid:
            self.outbox.send(s, T.ACK, rid, pb.Ack(count=1))
        self.connections.close_session(session_id, CloseCode.SESSION_INVALID, "device revoked")

    # -- PROFILE_UPDATE --------------------------------------------------------------
    async def update_profile(self, s: Session, rid: str, req: pb.ProfileUpdate) -> None:
        name = check_display_name(req.display_name)
        user = await self.users.set_display_name(s.user_id, name)
        self.state.set_profile(user.user_id, user.username, user.display_name)
        self.connections.peers.forget_profile(user.user_id)  # other nodes' caches
        if rid:
            self.outbox.send(s, T.ACK, rid, pb.Ack(count=1))

    # -- DEVICE_ADDED ----------------------------------------------------------------
    def device_announced(self, s: Session) -> None:
        """``s``'s device uploaded KeyPackages for the first time (SPEC §12.29)."""
        users = self.state.contacts(s.user_id)
        users.add(s.user_id)
        added = pb.DeviceAdded(user_id=s.user_id, device_id=s.device_id)
        self.outbox.publish_message(users, T.DEVICE_ADDED, added, s)
        peers = self.connections.peers
        if peers.clustered:  # the users' connections on the other nodes (SPEC §12.27)
            peers.push(users, encode_envelope(T.DEVICE_ADDED, "", added.SerializeToString()))
