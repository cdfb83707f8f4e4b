"""Ephemeral signals: read receipts, typing and presence (SPEC §5 ephemeral, §12.11).

Nothing here is a conversation event: typing and presence are never stored, read
markers are stored (coalesced with the acks) but never replayed as events. Pushes are
best effort to the live connections of the users concerned.
"""

from __future__ import annotations

from google.protobuf.message import Message

from sovereign.clock import Clock
from sovereign.codec import encode_envelope
from sovereign.errors import ErrorCode, SovereignError
from sovereign.protocol.types import MessageType as T
from sovereign.services.delivery import DeliveryWriter
from sovereign.services.ports import NullPeers, Outbox, Peers
from sovereign.services.session import Session
from sovereign.services.state import PRESENCE_RANK, ConversationState
from sovereign.storage import messaging as sql
from sovereign.storage.database import Database
from sovereign.v1 import sovereign_pb2 as pb

TYPING_INTERVAL = 2.0


class EphemeralService:
    def __init__(
        self,
        db: Database,
        state: ConversationState,
        outbox: Outbox,
        clock: Clock,
        writer: DeliveryWriter,
        peers: Peers | None = None,
    ) -> None:
        self.db = db
        self.state = state
        self.outbox = outbox
        self.clock = clock
        self.writer = writer
        # Cluster mode (SPEC §12.27): signals reach the users' connections on every
        # node; presence aggregates this node's connections with the other nodes'.
        self.peers: Peers = peers if peers is not None else NullPeers()

    def _push(self, user_ids: tuple[str, ...], msg_type: int, message: Message) -> None:
        """To the other nodes' live connections of ``user_ids`` (cluster mode)."""
        if self.peers.clustered and user_ids:
            self.peers.push(user_ids, encode_envelope(msg_type, "", message.SerializeToString()))

    # -- read receipts ------------------------------------------------------------------
    async def mark_read(self, s: Session, rid: str, req: pb.ReadMarker) -> None:
        conv = self.state.conv_for_member(req.conversation_id, s.user_id)
        marks = self.state.read_marks
        key = (conv.conversation_id, s.user_id)
        seq = min(req.up_to_seq, conv.committed_seq)
        prev = marks.get(key)
        if prev is None:
            prev = await self.db.read(lambda c: sql.read_marker_txn(c, *key))
            prev = marks.setdefault(key, prev)
        moved = seq > prev
        if moved:
            marks[key] = seq
            self.writer.read_markers[key] = seq
            await self.writer.flush()
            receipt = pb.ReadReceipt(
                conversation_id=conv.conversation_id, user_id=s.user_id, up_to_seq=seq
            )
            self.outbox.publish_message(conv.recipients, T.MESSAGE_READ_RECEIPT, receipt, exclude=s)
            if self.peers.clustered:
                self._push(conv.recipients, T.MESSAGE_READ_RECEIPT, receipt)
                self.peers.position(1, conv.conversation_id, s.user_id, seq)
        if rid:
            self.outbox.send(s, T.ACK, rid, pb.Ack(count=1 if moved else 0))

    # -- typing -------------------------------------------------------------------------
    def typing(self, s: Session, rid: str, req: pb.Typing) -> None:
        conv = self.state.conv_for_member(req.conversation_id, s.user_id)
        now = self.clock.monotonic()
        marks = s.typing_marks
        if marks is None:
            marks = s.typing_marks = {}
        last = marks.get(conv.conversation_id, 0.0)
        # Rate-limited: a repeated "typing" within TYPING_INTERVAL is not forwarded.
        forward = not req.typing or now - last >= TYPING_INTERVAL
        if req.typing and forward:
            marks[conv.conversation_id] = now
        elif not req.typing:
            marks.pop(conv.conversation_id, None)
        if forward:
            others = tuple(u for u in conv.recipients if u != s.user_id)
            note = pb.TypingNotify(
                conversation_id=conv.conversation_id, user_id=s.user_id, typing=req.typing
            )
            self.outbox.publish_message(others, T.TYPING_NOTIFY, note)
            self._push(others, T.TYPING_NOTIFY, note)
        if rid:
            self.outbox.send(s, T.ACK, rid, pb.Ack(count=1 if forward else 0))

    # -- presence -----------------------------------------------------------------------
    def set_presence(self, s: Session, rid: str, req: pb.PresenceUpdate) -> None:
        if req.status not in PRESENCE_RANK:
            raise SovereignError(
                ErrorCode.MALFORMED_MESSAGE, "status must be online, away or offline"
            )
        s.presence = req.status
        self.presence_changed(s.user_id)
        if rid:
            self.outbox.send(s, T.ACK, rid, pb.Ack(count=1))

    def on_live(self, s: Session) -> None:
        self.presence_changed(s.user_id)

    def on_closed(self, s: Session) -> None:
        if s.user_id:
            self.presence_changed(s.user_id)

    def presence_changed(self, user_id: str) -> None:
        """Aggregate across the user's live connections (online > away > offline); notify
        users sharing a conversation only when the aggregate changes (SPEC §12.11)."""
        best = "offline"
        for other in self.outbox.live_sessions(user_id):
            if PRESENCE_RANK[other.presence] > PRESENCE_RANK[best]:
                best = other.presence
        peers = self.peers
        if peers.clustered:
            # Each node announces its own aggregate and notifies only its own
            # connections: every node computes the same cluster-wide aggregate.
            peers.presence(user_id, best)
            remote = peers.remote_presence(user_id)
            if PRESENCE_RANK[remote] > PRESENCE_RANK[best]:
                best = remote
        presence = self.state.presence
        if presence.get(user_id, "offline") == best:
            return
        if best == "offline":
            presence.pop(user_id, None)
        else:
            presence[user_id] = best
        contacts = self.state.contacts(user_id)
        if contacts:
            self.outbox.publish_message(
                contacts, T.PRESENCE_NOTIFY, pb.PresenceNotify(user_id=user_id, status=best)
            )

    def introduce(self, contacts_before: dict[str, set[str]]) -> None:
        """Users who now share a conversation for the first time learn each other's
        presence (if not offline), as a newly connected device would on READY.

        A group of n members created at once is n * (n - 1) introductions: each user's
        PRESENCE_NOTIFY is encoded once (not once per pair), and users with no live
        connection here are skipped before their contacts are computed (their devices
        get presence at the end of their offline sync, SPEC §4)."""
        presence = self.state.presence
        outbox = self.outbox
        frames: dict[str, bytes] = {}
        for uid, before in contacts_before.items():
            if not outbox.live_sessions(uid):
                continue
            for other in self.state.contacts(uid) - before:
                frame = frames.get(other)
                if frame is None:
                    status = presence.get(other)
                    if status is None:
                        continue
                    note = pb.PresenceNotify(user_id=other, status=status)
                    frame = frames[other] = outbox.frame(
                        encode_envelope(T.PRESENCE_NOTIFY, "", note.SerializeToString())
                    )
                outbox.publish(frame, (uid,), None)
