"""Cluster mode: the services of one node among several sharing one database (SPEC §12.27).

Theory of operation
-------------------
The database is the only store; the :class:`~sovereign.services.ports.Bus` carries
notifications, best effort. Three rules make that enough:

1. **Seqs come from the database.** :class:`~sovereign.services.eventlog.ClusterEventLog`
   allocates each event's seq in the transaction that stores it (the conversation row's
   lock serialises writers across nodes), and decides conflicts there: an idempotent
   send's request row, the MLS epoch, a membership. Memory only fast-fails.
2. **Each node delivers each conversation in seq order, exactly once.** Per
   conversation, ``Conv.committed_seq`` is the highest seq this node has processed (its
   live connections got it, or their offline sync reads up to it). An event — this
   node's own after COMMIT, or another node's from the bus — waits in the
   conversation's :class:`Feed` until every lower seq is processed. A hole (a lost
   notification, ``n+2`` after ``n``) is read from the database by seq (:meth:`repair`),
   so nothing is lost, reordered or delivered twice to a connection.
3. **After a reconnection the node catches up from the database** (``on_resync``): the
   head of every conversation it knows, missing conversations of its users, and closes
   it may have missed (disabled users, revoked sessions), the rows the invalidations
   below name (all of them: any note may have been lost), then its peers' presence and
   connection counts (a Hello exchange).

Notifications are msgpack arrays (msgspec), one :class:`Packet` per publish: the
sender's node id and one note. Events carry their payloads, so a node that hears every
notification reads nothing from the database to fan out; membership and epoch changes
are applied from the event payloads themselves (the group rules are deterministic), a
new conversation and a commit's GroupInfo are read from the database.

What changes without a conversation event travels as an *invalidation*: the note only
names what changed and every node re-reads it from the database — the runtime settings
an admin stored (:class:`SettingsNote`), the ``purged_seq`` of conversations retention
cut (:class:`PurgeNote`), a user's profile (:class:`ProfileNote`; the cache is dropped
and re-read on next use). Disables and revocations close sockets (:class:`CloseNote`);
the admin API reads the caller's user row (``is_admin``, ``enabled``) at each request.

What is kept per peer node (presence, READY connections per user for the per-user cap)
expires when the node has not been heard for ``PEER_EXPIRY_S`` (nodes beat every
``BEAT_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import msgspec

from sovereign.clock import Clock
from sovereign.codec import encode_envelope
from sovereign.errors import CloseCode
from sovereign.mls.api import parse_commit_message
from sovereign.mls.wire import MLSDecodeError
from sovereign.protocol.types import MessageType as T
from sovereign.services.eventlog import PENDING_SEQ, Conv, Event, EventLog, Member, Op
from sovereign.services.ports import Bus, Outbox, Tasks
from sovereign.services.state import PRESENCE_RANK, ConversationState
from sovereign.storage import cluster as csql
from sovereign.storage import messaging as sql
from sovereign.storage.database import Database
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.services.delivery import DeliveryService

log = logging.getLogger("sovereign.cluster")

BEAT_S = 1.0
PEER_EXPIRY_S = 5.0
#: How often a node compares the heads of its conversations with the database even
#: when the bus is up: the backstop for a notification lost without a reconnection and
#: with nothing after it in that conversation.
HEAD_CHECK_S = 5.0
REPAIR_PAGE = 500
#: How long a request naming a conversation this node does not (yet) show its sender in
#: waits for the node to catch up with the database before it is decided again.
CATCH_UP_WAIT_S = 1.0

MEMBERSHIP = (T.GROUP_MEMBER_ADDED, T.GROUP_MEMBER_REMOVED)


# -- the notification format ---------------------------------------------------------


class EventsNote(msgspec.Struct, array_like=True, tag=1):
    """Events one op committed in one conversation: (seq, event_id, type, sender,
    ts_us, payload)."""

    conv: str
    events: list[tuple[int, str, int, str, int, bytes]]


class WelcomeNote(msgspec.Struct, array_like=True, tag=2):
    user: str
    event_id: str
    payload: bytes


class PushNote(msgspec.Struct, array_like=True, tag=3):
    users: list[str]
    envelope: bytes


class DeviceNote(msgspec.Struct, array_like=True, tag=4):
    device: str
    envelope: bytes


class PresenceNote(msgspec.Struct, array_like=True, tag=5):
    user: str
    status: str


class CloseNote(msgspec.Struct, array_like=True, tag=6):
    user: str  # "" when closing one session
    session: str
    code: int
    reason: str


class ConnsNote(msgspec.Struct, array_like=True, tag=7):
    """The sender's READY connections of one user: their ready times (µs) and session
    ids (for "online" in DEVICE_LIST and the admin API; absent from older nodes)."""

    user: str
    stamps: list[int]
    sessions: list[str] = []


class HelloNote(msgspec.Struct, array_like=True, tag=8):
    """The sender's whole peer state (on start and after a reconnection)."""

    reply: bool  # the receivers answer with their own Hello
    presence: dict[str, str]
    conns: dict[str, list[int]]
    sessions: dict[str, list[str]] = {}


class BeatNote(msgspec.Struct, array_like=True, tag=9):
    pass


class PositionNote(msgspec.Struct, array_like=True, tag=10):
    kind: int  # 0 delivered, 1 read
    conv: str
    user: str
    seq: int


class ProfileNote(msgspec.Struct, array_like=True, tag=11):
    user: str


class SettingsNote(msgspec.Struct, array_like=True, tag=12):
    """The stored runtime settings changed (SPEC §12.23): re-read them all."""


class PurgeNote(msgspec.Struct, array_like=True, tag=13):
    """Retention removed events of these conversations: re-read their ``purged_seq``."""

    convs: list[str]


Note = (
    EventsNote
    | WelcomeNote
    | PushNote
    | DeviceNote
    | PresenceNote
    | CloseNote
    | ConnsNote
    | HelloNote
    | BeatNote
    | PositionNote
    | ProfileNote
    | SettingsNote
    | PurgeNote
)


class Packet(msgspec.Struct, array_like=True):
    node: str
    note: Note


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Packet).decode


class Feed:
    """One conversation's events waiting for their turn on this node."""

    __slots__ = ("hw", "pending", "repairing")

    def __init__(self) -> None:
        # seq -> (op to finish after this event or None, event, local)
        self.pending: dict[int, tuple[Op | None, Event, bool]] = {}
        self.repairing = False
        self.hw: int | None = None  # highest membership seq (None: recompute)


class Peer:
    __slots__ = ("conns", "presence", "seen", "sessions")

    def __init__(self, now: float) -> None:
        self.seen = now
        self.presence: dict[str, str] = {}
        self.conns: dict[str, list[int]] = {}
        self.sessions: dict[str, list[str]] = {}


class ClusterService:
    """The node's side of the cluster (see the module docstring); implements
    :class:`~sovereign.services.ports.Peers`."""

    def __init__(
        self,
        db: Database,
        state: ConversationState,
        eventlog: EventLog,
        outbox: Outbox,
        clock: Clock,
        tasks: Tasks,
        bus: Bus,
    ) -> None:
        self.db = db
        self.state = state
        self.eventlog = eventlog
        self.outbox = outbox
        self.clock = clock
        self.tasks = tasks
        self.bus = bus
        self.node_id = bus.node_id
        self.clustered = True
        self.feeds: dict[str, Feed] = {}
        self.peers: dict[str, Peer] = {}
        self._announced: dict[str, str] = {}  # user -> this node's announced status
        self._loading: dict[str, list[EventsNote]] = {}  # conversations being loaded
        # user -> welcome event ids pushed live here (a resync re-sends only others)
        self._welcomed: dict[str, set[str]] = {}
        self._timer: asyncio.Task[None] | None = None
        self._stopped = False
        self.delivery: DeliveryService | None = None
        #: (user_id) -> re-aggregate presence (the ephemeral service)
        self.presence_hooks: list[Callable[[str], None]] = []
        #: (user_id) -> re-check the per-user cap (the connection service)
        self.cap_hooks: list[Callable[[str], None]] = []
        #: () -> re-read the stored runtime settings (the admin service)
        self.settings_hooks: list[Callable[[], Awaitable[None]]] = []
        self._settings_stale = False
        self._settings_reading = False
        #: (contacts of each user before another node's membership change) -> presence
        #: introductions here (the ephemeral service; SPEC §12.11)
        self.introduce_hooks: list[Callable[[dict[str, set[str]]], None]] = []
        # counters for tests and /metrics
        self.repairs = 0
        self.repaired_events = 0
        self.remote_events = 0
        bus.set_handlers(self._on_packet, self.resync)

    def bind(self, delivery: DeliveryService) -> None:
        self.delivery = delivery

    # -- lifecycle ------------------------------------------------------------------------
    async def load(self) -> None:
        """Start-up, after ``state.load``: make ``conversations.last_seq`` exact (a
        database used single-node keeps it only as a floor), then join the bus."""
        heads = [
            (c.committed_seq, c.last_ts_us, c.conversation_id, c.committed_seq)
            for c in self.state.convs.values()
        ]
        if heads:
            await self.db.write(partial(csql.exact_heads_txn, heads=heads))
        await self.bus.start()
        self._hello(reply=True)
        self._timer = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        await self.bus.close()

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        last_check = loop.time()
        while not self._stopped:
            await asyncio.sleep(BEAT_S)
            try:
                self._send(BeatNote())
                self._expire(loop.time())
                if loop.time() - last_check >= HEAD_CHECK_S:
                    last_check = loop.time()
                    await self.catch_up()
            except Exception:
                log.exception("cluster beat failed")

    def _expire(self, now: float) -> None:
        for node, peer in list(self.peers.items()):
            if now - peer.seen > PEER_EXPIRY_S:
                log.warning(
                    "cluster node %s not heard for %.0f s: forgotten", node, now - peer.seen
                )
                del self.peers[node]
                for uid in peer.presence:
                    for hook in self.presence_hooks:
                        hook(uid)

    # -- sending ----------------------------------------------------------------------------
    def _send(self, note: Note) -> None:
        self.bus.publish(_encode(Packet(self.node_id, note)))

    def push(self, user_ids: Iterable[str], envelope: bytes) -> None:
        users = list(user_ids)
        if users:
            self._send(PushNote(users, envelope))

    def push_device(self, device_id: str, envelope: bytes) -> None:
        self._send(DeviceNote(device_id, envelope))

    def welcome(self, user_id: str, event_id: str, payload: bytes) -> None:
        self._welcomed.setdefault(user_id, set()).add(event_id)
        self._send(WelcomeNote(user_id, event_id, payload))

    def close_user(self, user_id: str, code: int, reason: str) -> None:
        self._send(CloseNote(user_id, "", code, reason))

    def close_session(self, session_id: str, code: int, reason: str) -> None:
        self._send(CloseNote("", session_id, code, reason))

    def position(self, kind: int, conversation_id: str, user_id: str, seq: int) -> None:
        self._send(PositionNote(kind, conversation_id, user_id, seq))

    def forget_profile(self, user_id: str) -> None:
        self._send(ProfileNote(user_id))

    def settings_changed(self) -> None:
        self._send(SettingsNote())

    def purged(self, conversation_ids: Sequence[str]) -> None:
        if conversation_ids:
            self._send(PurgeNote(list(conversation_ids)))

    def presence(self, user_id: str, status: str) -> None:
        if self._announced.get(user_id, "offline") == status:
            return
        if status == "offline":
            self._announced.pop(user_id, None)
        else:
            self._announced[user_id] = status
        self._send(PresenceNote(user_id, status))

    def remote_presence(self, user_id: str) -> str:
        best = "offline"
        for peer in self.peers.values():
            status = peer.presence.get(user_id)
            if status is not None and PRESENCE_RANK[status] > PRESENCE_RANK[best]:
                best = status
        return best

    def remote_connections(self, user_id: str) -> list[tuple[int, str]]:
        return [
            (stamp, node)
            for node, peer in self.peers.items()
            for stamp in peer.conns.get(user_id, ())
        ]

    def remote_sessions(self, user_id: str) -> set[str]:
        return {sid for peer in self.peers.values() for sid in peer.sessions.get(user_id, ())}

    def connections_changed(self, user_id: str) -> None:
        live = [s for s in self.outbox.sessions(user_id) if not s.closed]
        if not live:
            self._welcomed.pop(user_id, None)
        self._send(ConnsNote(user_id, [s.ready_at_us for s in live], [s.session_id for s in live]))

    def _hello(self, reply: bool) -> None:
        conns: dict[str, list[int]] = {}
        sessions: dict[str, list[str]] = {}
        for s in self.outbox.all_sessions():
            if s.user_id and s.ready and not s.closed:
                conns.setdefault(s.user_id, []).append(s.ready_at_us)
                sessions.setdefault(s.user_id, []).append(s.session_id)
        self._send(HelloNote(reply, dict(self._announced), conns, sessions))

    # -- receiving ------------------------------------------------------------------------
    def _on_packet(self, data: bytes) -> None:
        try:
            packet = _decode(data)
        except msgspec.DecodeError:
            log.warning("undecodable cluster notification (%d bytes) ignored", len(data))
            return
        if packet.node == self.node_id:
            return
        now = asyncio.get_running_loop().time()
        peer = self.peers.get(packet.node)
        if peer is None:
            peer = self.peers[packet.node] = Peer(now)
            if not isinstance(packet.note, HelloNote):
                self._hello(reply=True)  # a node we did not know: exchange state
        peer.seen = now
        note = packet.note
        try:
            if isinstance(note, EventsNote):
                self._on_events(note)
            elif isinstance(note, PushNote):
                self.outbox.publish(self.outbox.frame(note.envelope), note.users, None)
            elif isinstance(note, PositionNote):
                self._on_position(note)
            elif isinstance(note, WelcomeNote):
                self._on_welcome(note)
            elif isinstance(note, DeviceNote):
                dev = self.state.devices.get(note.device)
                if dev is not None:
                    for s in list(dev.sessions):
                        self.outbox.send_payload(s, *_split(note.envelope))
            elif isinstance(note, PresenceNote):
                if note.status == "offline":
                    peer.presence.pop(note.user, None)
                else:
                    peer.presence[note.user] = note.status
                for hook in self.presence_hooks:
                    hook(note.user)
            elif isinstance(note, CloseNote):
                if note.user:
                    self.outbox.close_user(note.user, note.code, note.reason)
                else:
                    self.outbox.close_session_id(note.session, note.code, note.reason)
            elif isinstance(note, ConnsNote):
                self._on_conns(peer, note.user, note.stamps, note.sessions)
            elif isinstance(note, HelloNote):
                self._on_hello(peer, note)
            elif isinstance(note, ProfileNote):
                self.state.forget_profile(note.user)
            elif isinstance(note, SettingsNote):
                self.reload_settings()
            elif isinstance(note, PurgeNote):
                self.tasks.background(self._reload_purged(note.convs))
        except Exception:
            log.exception("cluster notification %s failed", type(note).__name__)

    def _on_hello(self, peer: Peer, note: HelloNote) -> None:
        old_presence = peer.presence
        peer.presence = dict(note.presence)
        for uid in set(old_presence) | set(peer.presence):
            if old_presence.get(uid) != peer.presence.get(uid):
                for hook in self.presence_hooks:
                    hook(uid)
        old_conns, peer.conns, peer.sessions = peer.conns, {}, {}
        for uid in set(old_conns) | set(note.conns):
            self._on_conns(peer, uid, note.conns.get(uid, []), note.sessions.get(uid, []))
        if note.reply:
            self._hello(reply=False)

    def _on_conns(self, peer: Peer, user_id: str, stamps: list[int], sessions: list[str]) -> None:
        if stamps:
            peer.conns[user_id] = list(stamps)
            peer.sessions[user_id] = list(sessions)
        else:
            peer.conns.pop(user_id, None)
            peer.sessions.pop(user_id, None)
        for hook in self.cap_hooks:
            hook(user_id)

    def _on_position(self, note: PositionNote) -> None:
        marks = self.state.delivered if note.kind == 0 else self.state.read_marks
        key = (note.conv, note.user)
        prev = marks.get(key)
        if prev is not None and note.seq > prev:
            marks[key] = note.seq  # not cached here: the next use reads storage

    def _on_welcome(self, note: WelcomeNote) -> None:
        delivery = self.delivery
        assert delivery is not None
        frame = self.outbox.frame(encode_envelope(T.MLS_WELCOME_RECEIVE, "", note.payload))
        self._welcomed.setdefault(note.user, set()).add(note.event_id)
        delivery.push_welcome(note.user, frame, note.event_id)

    # -- committed events: this node's ----------------------------------------------------
    def committed(self, batch: list[Op]) -> None:
        """ClusterEventLog's hook, on the loop after COMMIT (corked): tell the other
        nodes, then deliver here in seq order."""
        for op in batch:
            events = op.events
            if not events:
                if op.finish is not None:
                    op.finish()
                continue
            conv = events[0].conv
            self._send(
                EventsNote(
                    conv.conversation_id,
                    [
                        (ev.seq, ev.event_id, ev.type, ev.sender_id, ev.ts_us, ev.payload)
                        for ev in events
                    ],
                )
            )
            feed = self._feed(conv.conversation_id)
            last = events[-1]
            for ev in events:
                feed.pending[ev.seq] = (op if ev is last else None, ev, True)
            self._advance(conv, feed)

    def conflicted(self, op: Op) -> None:
        """The database refused ``op`` (another node changed the conversation first):
        this node's copy of it was stale, so it is read again."""
        if op.events:
            self.tasks.background(self.reload(op.events[0].conv))

    async def reload(self, conv: Conv) -> None:
        """Membership and MLS state of ``conv`` as the database has it now. Safe ahead
        of the feed: a member whose GROUP_MEMBER_ADDED is not processed yet here has a
        joined_seq above it, and the feed skips what is already applied."""
        records = await self.db.read(
            partial(csql.load_one_txn, conversation_id=conv.conversation_id)
        )
        if not records[0]:
            return
        rec = records[0][0]
        if rec.mls_epoch >= conv.epoch:
            conv.group_id, conv.epoch = rec.mls_group_id, rec.mls_epoch
            conv.group_info, conv.group_info_epoch = rec.group_info, rec.group_info_epoch
        state = self.state
        conv_id = conv.conversation_id
        users = set(conv.members) | set(conv.former)
        conv.members.clear()
        conv.former.clear()
        for m in records[1]:
            member = Member(m.user_id, m.role, m.joined_seq, m.joined_at_us, m.left_seq)
            (conv.former if m.left_seq is not None else conv.members)[m.user_id] = member
            users.add(m.user_id)
        conv.membership_changed()
        self._feed(conv_id).hw = None
        for uid in users:
            current = state.user_convs.setdefault(uid, set())
            former = state.user_former.setdefault(uid, set())
            current.discard(conv_id)
            former.discard(conv_id)
            if uid in conv.members:
                current.add(conv_id)
            elif uid in conv.former:
                former.add(conv_id)

    # -- committed events: other nodes' ---------------------------------------------------
    def _on_events(self, note: EventsNote) -> None:
        conv = self.state.convs.get(note.conv)
        if conv is None:
            waiting = self._loading.get(note.conv)
            if waiting is not None:
                waiting.append(note)
                return
            self._loading[note.conv] = [note]
            self.tasks.background(self._load_conv(note.conv))
            return
        self.remote_events += len(note.events)
        feed = self._feed(conv.conversation_id)
        for seq, event_id, type_, sender, ts, payload in note.events:
            if seq <= conv.committed_seq or seq in feed.pending:
                continue
            ev = Event(conv, type_, sender, seq, event_id, ts)
            ev.payload = payload
            feed.pending[seq] = (None, ev, False)
        self.outbox.cork()
        try:
            self._advance(conv, feed)
        finally:
            self.outbox.uncork()

    async def _load_conv(self, conv_id: str) -> None:
        """A conversation this node has not seen (created on another node): its row
        and members now, then every event from seq 1 through the feed (members' own
        GROUP_MEMBER_ADDED included)."""
        try:
            records = await self.db.read(partial(csql.load_one_txn, conversation_id=conv_id))
            notes = self._loading.pop(conv_id, [])
            if not records[0]:
                log.warning("notified of unknown conversation %s", conv_id)
                return
            state = self.state
            conv = state.convs.get(conv_id)
            if conv is None:
                from sovereign.services.eventlog import load_state

                conv = load_state(records)[conv_id]
                conv.committed_seq = 0  # its events go through the feed from seq 1
                before = {uid: state.contacts(uid) for uid in conv.members}
                state.convs[conv_id] = conv
                for uid in conv.members:
                    state.user_convs.setdefault(uid, set()).add(conv_id)
                for uid in conv.former:
                    state.user_former.setdefault(uid, set()).add(conv_id)
                self._introduce(before)
            for note in notes:
                self._on_events(note)
            self._repair_to(conv, conv.last_seq)
        except Exception:
            self._loading.pop(conv_id, None)
            log.exception("loading conversation %s failed", conv_id)

    # -- the ordered feed -----------------------------------------------------------------
    def _feed(self, conv_id: str) -> Feed:
        feed = self.feeds.get(conv_id)
        if feed is None:
            feed = self.feeds[conv_id] = Feed()
        return feed

    def _advance(self, conv: Conv, feed: Feed) -> None:
        pending = feed.pending
        while pending:
            item = pending.pop(conv.committed_seq + 1, None)
            if item is None:
                break
            self._process(conv, feed, *item)
        if pending and not feed.repairing:
            # A hole before what is waiting: read it from the database (it is
            # committed: a higher seq was allocated under the row lock after it).
            self._repair_to(conv, max(pending) - 1)

    def _repair_to(self, conv: Conv, upto: int) -> None:
        feed = self._feed(conv.conversation_id)
        if feed.repairing or upto <= conv.committed_seq:
            return
        feed.repairing = True
        self.tasks.background(self._repair(conv, feed, upto))

    async def _repair(self, conv: Conv, feed: Feed, upto: int) -> None:
        self.repairs += 1
        conv_id = conv.conversation_id
        inflight = getattr(self.eventlog, "inflight", {})
        try:
            while conv.committed_seq < upto:
                after = conv.committed_seq
                rows = await self.db.read(
                    partial(
                        sql.events_after_txn,
                        conversation_id=conv_id,
                        after_seq=after,
                        up_to_seq=upto,
                        limit=REPAIR_PAGE,
                    )
                )
                if conv.committed_seq != after:
                    continue  # the feed moved meanwhile: read again from where it is
                if not rows:
                    # Removed by retention: nothing left to deliver below ``upto``.
                    conv.committed_seq = upto
                    break
                stop = False
                self.outbox.cork()
                try:
                    for seq, event_id, type_, sender, ts, payload in rows:
                        if seq <= conv.committed_seq:
                            continue
                        item = feed.pending.pop(seq, None)
                        if item is None:
                            if event_id in inflight:
                                stop = True  # this node's own: its op delivers it
                                break
                            ev = Event(conv, type_, sender, seq, event_id, ts)
                            ev.payload = payload
                            item = (None, ev, False)
                            self.repaired_events += 1
                        if seq != conv.committed_seq + 1:
                            conv.committed_seq = seq - 1  # a hole left by retention
                        self._process(conv, feed, *item)
                finally:
                    self.outbox.uncork()
                if stop:
                    break
        except Exception:
            log.exception("catching up conversation %s failed", conv_id)
        finally:
            feed.repairing = False
        if feed.pending and not self._stopped:
            self.outbox.cork()
            try:
                self._advance(conv, feed)
            finally:
                self.outbox.uncork()

    def _process(self, conv: Conv, feed: Feed, op: Op | None, ev: Event, local: bool) -> None:
        """Seq ``ev.seq`` is next: this node's connections get it now."""
        conv.committed_seq = ev.seq
        if ev.seq > conv.last_seq:
            conv.last_seq, conv.last_ts_us = ev.seq, ev.ts_us
        conv.recent.append(ev.record())
        type_ = ev.type
        if local:
            if type_ in MEMBERSHIP:
                self._membership(conv, feed, ev, local=True)
            if op is not None and op.finish is not None:
                try:
                    op.finish()
                except Exception:
                    log.exception("post-commit effect failed")
            return
        if type_ in MEMBERSHIP:
            self._membership(conv, feed, ev, local=False)
        elif type_ == T.MLS_COMMIT_BROADCAST:
            self._remote_commit(conv, ev)
        ev.recipients = self._recipients(conv, feed, ev)
        self.state.index(ev)
        delivery = self.delivery
        assert delivery is not None
        delivery.publish(ev, None)

    def _recipients(self, conv: Conv, feed: Feed, ev: Event) -> tuple[str, ...]:
        """Who may see seq ``ev.seq`` (SPEC §12.13): members from their own
        GROUP_MEMBER_ADDED on, removed ones through their GROUP_MEMBER_REMOVED."""
        hw = feed.hw
        if hw is None:
            hw = feed.hw = max(
                [m.joined_seq for m in conv.members.values()]
                + [m.left_seq or 0 for m in conv.former.values()]
                + [0]
            )
        seq = ev.seq
        if seq > hw:
            return conv.recipients
        out = [u for u, m in conv.members.items() if m.joined_seq <= seq]
        out += [
            u
            for u, m in conv.former.items()
            if m.joined_seq <= seq and m.left_seq is not None and seq <= m.left_seq
        ]
        return tuple(out)

    def _membership(self, conv: Conv, feed: Feed, ev: Event, *, local: bool) -> None:
        """Apply GROUP_MEMBER_ADDED / REMOVED at its real seq. This node's own change
        was applied when its op was built, with PENDING_SEQ: it gets the real seq. Another
        node's is applied here, idempotently (a node that loaded the conversation after
        the change finds it already there)."""
        state = self.state
        conv_id = conv.conversation_id
        feed.hw = None
        if ev.type == T.GROUP_MEMBER_ADDED:
            uid = pb.GroupMemberAdded.FromString(ev.payload).user_id
            added_by = ev.sender_id
            m = conv.members.get(uid)
            if m is None and local:
                return  # removed again by a later op of this node
            if not local and m is not None and m.joined_seq >= ev.seq:
                return
            before: dict[str, set[str]] | None = None
            if m is None:
                before = {u: state.contacts(u) for u in (*conv.recipients, uid)}
                # Only a creator adds itself (as admin, SPEC §12.2); invitees are members.
                m = Member(uid, "admin" if uid == added_by else "member", ev.seq, ev.ts_us)
                conv.former.pop(uid, None)
                conv.members[uid] = m
                conv.membership_changed()
                state.user_convs.setdefault(uid, set()).add(conv_id)
                former = state.user_former.get(uid)
                if former is not None:
                    former.discard(conv_id)
            m.joined_seq, m.joined_at_us, m.left_seq = ev.seq, ev.ts_us, None
            for dev in state.devices.values():
                if dev.user_id == uid:
                    dev.cursors[conv_id] = ev.seq - 1
            state.delivered[(conv_id, uid)] = ev.seq - 1
            if before is not None:
                self._introduce(before)
            return
        uid = pb.GroupMemberRemoved.FromString(ev.payload).user_id
        if local:
            f = conv.former.get(uid)
            if f is not None and f.left_seq == PENDING_SEQ:
                f.left_seq = ev.seq
            return
        m = conv.members.get(uid)
        if m is None or m.joined_seq >= ev.seq:
            return  # already applied, or an older removal (added again since)
        del conv.members[uid]
        m.left_seq, m.role = ev.seq, "member"
        conv.former[uid] = m
        conv.membership_changed()
        convs = state.user_convs.get(uid)
        if convs is not None:
            convs.discard(conv_id)
        state.user_former.setdefault(uid, set()).add(conv_id)
        # SPEC §6: with no admin left, the longest-standing member becomes admin (the
        # node that committed the removal stored the same choice).
        if conv.members and not any(x.role == "admin" for x in conv.members.values()):
            min(conv.members.values(), key=lambda x: x.joined_seq).role = "admin"

    def _introduce(self, contacts_before: dict[str, set[str]]) -> None:
        """New contacts made by another node's change meet here too (SPEC §12.11): that
        node introduces only its own connections."""
        for hook in self.introduce_hooks:
            try:
                hook(contacts_before)
            except Exception:
                log.exception("presence introduction failed")

    def _remote_commit(self, conv: Conv, ev: Event) -> None:
        """Another node's accepted commit: the epoch moves on here at once; the
        GroupInfo it stored (or cleared) is read from the database."""
        msg = pb.MLSCommitBroadcast.FromString(ev.payload)
        if msg.epoch + 1 > conv.epoch:
            conv.epoch = msg.epoch + 1
            with contextlib.suppress(MLSDecodeError):
                conv.group_id = parse_commit_message(msg.commit_data).group_id
            conv.group_info = None
            conv.group_info_epoch = None
        self.tasks.background(self._reload_mls(conv))

    async def _reload_mls(self, conv: Conv) -> None:
        row = await self.db.read(partial(csql.mls_txn, conversation_id=conv.conversation_id))
        if row is None:
            return
        group_id, epoch, group_info, gi_epoch = row
        if epoch >= conv.epoch:
            conv.group_id, conv.epoch = group_id, epoch
            conv.group_info, conv.group_info_epoch = group_info, gi_epoch

    # -- invalidations: rows another node changed, re-read from the database -----------
    def reload_settings(self) -> None:
        """Re-read the stored settings. Reads may finish out of order (several reader
        threads), so they never overlap: a note that arrives during one marks it stale
        and one more read follows, which sees every change committed before the note."""
        self._settings_stale = True
        if not self._settings_reading:
            self._settings_reading = True
            self.tasks.background(self._read_settings())

    async def _read_settings(self) -> None:
        try:
            while self._settings_stale and not self._stopped:
                self._settings_stale = False
                for hook in self.settings_hooks:
                    await hook()
        except Exception:
            log.exception("re-reading the runtime settings failed")
        finally:
            self._settings_reading = False

    async def _reload_purged(self, conv_ids: list[str] | None) -> None:
        """``purged_seq`` only rises (``greatest`` in SQL), so any read order is fine."""
        try:
            purged = await self.db.read(partial(csql.purged_txn, conversation_ids=conv_ids))
        except Exception:
            log.exception("re-reading purged seqs failed")
            return
        for conv_id, seq in purged.items():
            conv = self.state.convs.get(conv_id)
            if conv is not None and seq > conv.purged_seq:
                conv.purged_seq = seq

    # -- catching up ----------------------------------------------------------------------
    async def resync(self) -> None:
        """After a bus reconnection: what this node may have missed, from the database
        (invalidations included: settings, retention and profiles are re-read)."""
        log.info("cluster bus reconnected: catching up from the database")
        self._hello(reply=True)
        self.reload_settings()
        self.state.profiles.clear()
        await self._reload_purged(None)
        await self.catch_up()
        await self._recheck_closes()
        await self._resend_welcomes()

    async def _resend_welcomes(self) -> None:
        """Welcomes are durable too: those stored for a live device here since it
        became READY (its offline sync had the older ones) that were not pushed to it
        live, because their notification was lost."""
        delivery = self.delivery
        assert delivery is not None
        for s in list(self.outbox.all_sessions()):
            if not s.user_id or s.closed or not s.ready_at_us:
                continue
            rows = await self.db.read(
                partial(
                    sql.pending_welcomes_txn,
                    user_id=s.user_id,
                    device_id=s.device_id,
                    since_us=s.ready_at_us,
                )
            )
            seen = self._welcomed.setdefault(s.user_id, set())
            for event_id, _conv, _sender, _ts, payload in rows:
                if event_id in seen:
                    continue
                seen.add(event_id)
                frame = self.outbox.frame(encode_envelope(T.MLS_WELCOME_RECEIVE, "", payload))
                delivery.push_welcome(s.user_id, frame, event_id)

    async def catch_up(self) -> None:
        """Every conversation of a user connected here whose database head is past
        this node's (known or not yet known to this node) is read from the database by
        seq and delivered in order."""
        local_users = sorted(
            {s.user_id for s in self.outbox.all_sessions() if s.user_id and not s.closed}
        )
        if not local_users:
            return  # nobody here to deliver to; notifications still repair holes
        heads, theirs = await self.db.read(partial(csql.heads_txn, users=local_users))
        state = self.state
        for conv_id, head in heads.items():
            conv = state.convs.get(conv_id)
            if conv is None:
                if conv_id in theirs and conv_id not in self._loading:
                    self._loading[conv_id] = []
                    self.tasks.background(self._load_conv(conv_id))
                continue
            if head > conv.last_seq:
                conv.last_seq = head
            if head > conv.committed_seq:
                self._repair_to(conv, head)

    async def catch_up_conversation(self, conv_id: str, user_id: str) -> None:
        """A client here named ``conv_id``, which this node's memory does not show
        ``user_id`` in: the bus may not have brought the change yet (a group just created
        on another node, an invite made there). If the database has ``user_id`` in it,
        load or repair the conversation and wait (at most ``CATCH_UP_WAIT_S``) until this
        node has processed it through the database's head. Memory may fast-fail only
        what the database agrees with."""
        heads, _ = await self.db.read(partial(csql.heads_txn, users=[user_id]))
        head = heads.get(conv_id)
        if head is None:
            return  # never a member: memory was right
        state = self.state
        conv = state.convs.get(conv_id)
        if conv is None:
            if conv_id not in self._loading:
                self._loading[conv_id] = []
                self.tasks.background(self._load_conv(conv_id))
        else:
            conv.last_seq = max(conv.last_seq, head)
            self._repair_to(conv, head)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CATCH_UP_WAIT_S
        while loop.time() < deadline:
            conv = state.convs.get(conv_id)
            if conv is not None and conv.committed_seq >= head:
                return
            await asyncio.sleep(0.005)

    async def _recheck_closes(self) -> None:
        """Disables and revocations whose notification was lost: from the database."""
        sessions = [
            s for s in self.outbox.all_sessions() if s.user_id and s.session_id and not s.closed
        ]
        if not sessions:
            return
        gone_users, gone_sessions = await self.db.read(
            partial(
                csql.closed_txn,
                users=sorted({s.user_id for s in sessions}),
                sessions=sorted({s.session_id for s in sessions}),
            )
        )
        for uid in gone_users:
            self.outbox.close_user(uid, CloseCode.ACCOUNT_DISABLED, "account disabled")
        for sid in gone_sessions:
            self.outbox.close_session_id(sid, CloseCode.SESSION_INVALID, "session revoked")


def _split(envelope: bytes) -> tuple[int, str, bytes]:
    from sovereign.codec import decode_envelope

    msg_type, rid, payload = decode_envelope(envelope)
    return msg_type, rid, bytes(payload)
