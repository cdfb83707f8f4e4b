"""In-memory conversation state shared by the messaging services and the MLS service.

One :class:`ConversationState` per process, loaded at start-up: conversations with
their members, seqs and MLS epochs (the :class:`~sovereign.services.eventlog.Conv`
objects), who is in what, the delivery state of connected devices, delivered and read
positions, the recent-event index for acks, profiles and aggregated presence. The hot
path reads nothing from disk. Changes go through :class:`~sovereign.services.eventlog.Op`
so a failed commit is undone exactly.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from sovereign.errors import ErrorCode, SovereignError
from sovereign.services.eventlog import Conv, Event, EventInfo, load_state
from sovereign.services.session import Session
from sovereign.storage import messaging as sql
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.storage import Database, UserStore

log = logging.getLogger("sovereign.state")

#: Recent events whose acks need no storage read (~0.3 KB each: ~6 MB at the cap). Acks
#: of older events are resolved in one query per MESSAGE_ACK (DeliveryService._ack_slow).
#: Was 200,000 (~60 MB, filled after ~17 min at 200 msgs/s, so RSS kept rising for that
#: long); acks almost always name an event seconds old (docs/performance.md).
EVENT_INDEX_MAX = 20_000
PRESENCE_RANK = {"offline": 0, "away": 1, "online": 2}


class Device:
    """Delivery state of one device while at least one of its connections is open."""

    __slots__ = ("created_at_us", "cursors", "device_id", "sessions", "user_id")
    sessions: list[Session]  # a list: smaller than a set, and rarely more than one

    def __init__(self, device_id: str, user_id: str, created_at_us: int) -> None:
        self.device_id = device_id
        self.user_id = user_id
        self.created_at_us = created_at_us
        self.cursors: dict[str, int] = {}
        self.sessions = []


class ConversationState:
    def __init__(self, db: Database, users: UserStore) -> None:
        self.db = db
        self.users = users
        self.convs: dict[str, Conv] = {}
        self.user_convs: dict[str, set[str]] = {}  # current memberships
        self.user_former: dict[str, set[str]] = {}  # conversations a user was removed from
        self.devices: dict[str, Device] = {}
        self.delivered: dict[tuple[str, str], int] = {}  # (conv, user) -> first device's seq
        self.read_marks: dict[tuple[str, str], int] = {}
        # event id -> EventInfo (conversation, seq, type, sender) for acks; bounded, oldest out
        self.event_index: OrderedDict[str, EventInfo] = OrderedDict()
        self.profiles: dict[str, tuple[str, str]] = {}
        self.presence: dict[str, str] = {}  # user -> aggregate status, when not offline

    async def load(self) -> None:
        self.convs = load_state(await self.db.read(sql.load_conversations_txn))
        for conv in self.convs.values():
            for uid in conv.members:
                self.user_convs.setdefault(uid, set()).add(conv.conversation_id)
            for uid in conv.former:
                self.user_former.setdefault(uid, set()).add(conv.conversation_id)
        log.info("loaded %d conversations", len(self.convs))

    # -- lookups ------------------------------------------------------------------------
    def conv_for_member(self, conv_id: str, user_id: str) -> Conv:
        conv = self.convs.get(conv_id)
        if conv is None:
            raise SovereignError(ErrorCode.GROUP_NOT_FOUND, "unknown conversation")
        if user_id not in conv.members:
            raise SovereignError(ErrorCode.NOT_GROUP_MEMBER, "not a member of this conversation")
        return conv

    def contacts(self, user_id: str) -> set[str]:
        """Users who share a current conversation with ``user_id``."""
        out: set[str] = set()
        for conv_id in self.user_convs.get(user_id, ()):
            out.update(self.convs[conv_id].recipients)
        out.discard(user_id)
        return out

    def groups_of(self, user_id: str) -> int:
        return len(self.user_convs.get(user_id, ()))

    # -- profiles -----------------------------------------------------------------------
    async def profile(self, user_id: str) -> tuple[str, str] | None:
        """(username, display_name), cached; None for an unknown user."""
        p = self.profiles.get(user_id)
        if p is None:
            user = await self.users.get_by_id(user_id)
            if user is None:
                return None
            # setdefault: a PROFILE_UPDATE during the read wins over the older row.
            p = self.profiles.setdefault(user_id, (user.username, user.display_name))
        return p

    async def load_profiles(self, user_ids: list[str]) -> None:
        """Cache the profiles of ``user_ids`` not cached yet, in one read (unknown users
        stay uncached: ``profile`` answers None for them)."""
        missing = [u for u in dict.fromkeys(user_ids) if u not in self.profiles]
        if not missing:
            return
        for uid, user in (await self.users.get_many(missing)).items():
            # setdefault: a PROFILE_UPDATE during the read wins over the older row.
            self.profiles.setdefault(uid, (user.username, user.display_name))

    def set_profile(self, user_id: str, username: str, display_name: str) -> None:
        """A profile that just changed (SPEC §12.29): replaced, not just forgotten, so a
        load that started before the change cannot put the old name back."""
        self.profiles[user_id] = (username, display_name)

    def forget_profile(self, user_id: str) -> None:
        self.profiles.pop(user_id, None)

    async def group_members(self, conv: Conv) -> list[pb.GroupMember]:
        out = []
        for m in list(conv.members.values()):
            p = await self.profile(m.user_id) or ("", "")
            out.append(
                pb.GroupMember(user_id=m.user_id, username=p[0], display_name=p[1], role=m.role)
            )
        return out

    # -- the recent-event index (acks without a disk read) ------------------------------
    def index(self, ev: Event) -> None:
        self.index_put(ev.event_id, ev.record())

    def index_put(self, event_id: str, info: EventInfo) -> None:
        idx = self.event_index
        idx[event_id] = info
        if len(idx) > EVENT_INDEX_MAX:
            idx.popitem(last=False)
