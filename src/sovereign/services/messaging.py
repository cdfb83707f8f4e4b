"""Messaging, groups, delivery, sync, receipts, typing and presence (SPEC §4 READY,
§5, §6, §12.1-§12.4, §12.11-§12.14, §12.22).

Policy lives here; SQL in ``sovereign.storage.messaging``; batching and seq allocation
in ``sovereign.services.eventlog``; frames leave through the compiled fan-out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from sovereign.codec import encode_envelope
from sovereign.errors import CloseCode, ErrorCode, SovereignError
from sovereign.protocol.types import MessageType as T
from sovereign.services.eventlog import Conv, Event, EventLog, Member, Op, load_state
from sovereign.services.ids import new_ulid, ulid_floor
from sovereign.storage import messaging as sql
from sovereign.storage.database import Conn
from sovereign.transport.fanout import implementation as _fanout_impl
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.server import App
    from sovereign.transport.ws import Connection

log = logging.getLogger("sovereign.messaging")

_fan = _fanout_impl()
ws_frame = _fan.ws_frame
append_ws_frame = _fan.append_ws_frame
fanout = _fan.fanout
write_frame = _fan.write_frame
collect = _fan.collect

IDEMPOTENCY_US = 24 * 3600 * 1_000_000
IDEMPOTENCY_MEMORY = 500_000
EVENT_INDEX_MAX = 200_000
HISTORY_DEFAULT, HISTORY_MAX = 50, 200
SYNC_PAGE = 500
SYNC_CHUNK_BYTES = 64 * 1024
TYPING_INTERVAL = 2.0
PRESENCE_RANK = {"offline": 0, "away": 1, "online": 2}
DURABLE_TYPES = frozenset(
    {T.MESSAGE_RECEIVE, T.MLS_COMMIT_BROADCAST, T.GROUP_MEMBER_ADDED, T.GROUP_MEMBER_REMOVED}
)


def _err(code: ErrorCode, message: str) -> SovereignError:
    return SovereignError(int(code), message)


def _now_us() -> int:
    return time.time_ns() // 1000


class Device:
    """Delivery state of one device while at least one of its connections is open."""

    __slots__ = ("conns", "created_at_us", "cursors", "device_id", "user_id")
    conns: list[Connection]  # a list: smaller than a set, and rarely more than one

    def __init__(self, device_id: str, user_id: str, created_at_us: int) -> None:
        self.device_id = device_id
        self.user_id = user_id
        self.created_at_us = created_at_us
        self.cursors: dict[str, int] = {}
        self.conns = []


class SyncState:
    """A connection receiving its backlog: live events wait here (SPEC §4 READY order)."""

    __slots__ = ("buffer", "synced_upto", "synced_welcomes")

    def __init__(self) -> None:
        # (conversation_id, seq, welcome event_id, frame); welcomes have no conversation seq
        self.buffer: list[tuple[str, int, str, bytes]] = []
        self.synced_upto: dict[str, int] = {}
        self.synced_welcomes: set[str] = set()


class DeliveryWriter:
    """Coalesces cursor, delivered-position, welcome-ack and read-marker writes: everything
    that accumulates while one transaction commits goes into the next (SPEC §5)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.cursors: dict[tuple[str, str], int] = {}
        self.dropped: set[tuple[str, str]] = set()
        self.delivery: dict[tuple[str, str], int] = {}
        self.welcome_acks: set[tuple[str, str]] = set()
        self.read_markers: dict[tuple[str, str], int] = {}
        self._waiters: list[Callable[[BaseException | None], None]] = []
        self._busy = False

    def cursor(self, device_id: str, conv_id: str, seq: int) -> None:
        # Cursors only move forward: two acks of one device may interleave across an
        # await, and the older one must not overwrite the newer pending value.
        key = (device_id, conv_id)
        self.dropped.discard(key)
        prev = self.cursors.get(key)
        if prev is None or seq > prev:
            self.cursors[key] = seq

    def drop_cursor(self, device_id: str, conv_id: str) -> None:
        self.cursors.pop((device_id, conv_id), None)
        self.dropped.add((device_id, conv_id))

    def after(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(None)`` once everything recorded so far is committed, or
        ``callback(error)`` if that write failed. No task or future per caller."""
        self._waiters.append(callback)
        if not self._busy:
            self._busy = True
            self.app.background(self._drain())

    async def flush(self) -> None:
        """Resolve once everything recorded so far is committed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(exc: BaseException | None) -> None:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(_err(ErrorCode.DATABASE_ERROR, "could not store"))

        self.after(done)
        await fut

    async def _drain(self) -> None:
        try:
            while self._waiters:
                waiters, self._waiters = self._waiters, []
                cursors = [(d, c, s) for (d, c), s in self.cursors.items()]
                dropped = list(self.dropped)
                delivery = [(c, u, s) for (c, u), s in self.delivery.items()]
                acks = list(self.welcome_acks)
                now = _now_us()
                marks = [(c, u, s, now) for (c, u), s in self.read_markers.items()]
                self.cursors, self.dropped, self.delivery = {}, set(), {}
                self.welcome_acks, self.read_markers = set(), {}
                error: BaseException | None = None
                try:
                    if cursors or dropped or delivery or acks or marks:
                        # Not durable: losing an ack in a power cut only redelivers.
                        await self.app.storage.db.write(
                            partial(
                                sql.save_delivery_state_txn,
                                cursors=cursors,
                                dropped_cursors=dropped,
                                delivery=delivery,
                                welcome_acks=acks,
                                read_markers=marks,
                            ),
                            durable=False,
                        )
                except Exception as exc:
                    log.error("delivery state write failed: %s", exc)
                    error = exc
                self.app.cork()  # the acks' responses: one write per connection
                try:
                    for cb in waiters:
                        try:
                            cb(error)
                        except Exception:
                            log.exception("ack completion failed")
                finally:
                    self.app.uncork()
        finally:
            self._busy = False


class MessagingService:
    def __init__(self, app: App) -> None:
        self.app = app
        self.config = app.config
        self.db = app.storage.db
        self.log = EventLog(self.db, app.cork, app.uncork)
        self.delivery_writer = DeliveryWriter(app)
        self.convs: dict[str, Conv] = {}
        self.user_convs: dict[str, set[str]] = {}  # current memberships
        self.user_former: dict[str, set[str]] = {}  # conversations a user was removed from
        self.devices: dict[str, Device] = {}
        self.delivered: dict[tuple[str, str], int] = {}
        self.read_marks: dict[tuple[str, str], int] = {}
        self.event_index: OrderedDict[str, tuple[str, int, int, str]] = OrderedDict()
        self.idempotent: dict[tuple[str, str], tuple[int, str] | Op] = {}
        self.profiles: dict[str, tuple[str, str]] = {}
        self.syncing: set[Connection] = set()
        self.presence: dict[str, str] = {}
        self._retention_task: asyncio.Task[None] | None = None
        # True when the idempotency window is larger than what memory holds: then a
        # request_id not found in memory is also looked up in storage.
        self.idempotency_partial = False

    # -- start-up -------------------------------------------------------------------
    async def load(self) -> None:
        self.convs = load_state(await self.db.read(sql.load_conversations_txn))
        since = _now_us() - IDEMPOTENCY_US
        rows = await self.db.read(
            lambda c: sql.recent_send_requests_txn(c, since, IDEMPOTENCY_MEMORY + 1)
        )
        self.idempotency_partial = len(rows) > IDEMPOTENCY_MEMORY
        for user_id, request_id, event_id, created in rows[:IDEMPOTENCY_MEMORY]:
            self.idempotent[(user_id, request_id)] = (created, event_id)
        for conv in self.convs.values():
            for uid in conv.members:
                self.user_convs.setdefault(uid, set()).add(conv.conversation_id)
            for uid in conv.former:
                self.user_former.setdefault(uid, set()).add(conv.conversation_id)
        log.info("loaded %d conversations", len(self.convs))

    def start_background(self) -> None:
        self._retention_task = asyncio.get_running_loop().create_task(self._retention_loop())

    async def stop(self) -> None:
        if self._retention_task is not None:
            self._retention_task.cancel()
        await self.log.wait_idle()
        await self.delivery_writer.flush()

    # -- helpers ------------------------------------------------------------------
    def conv_for_member(self, conv_id: str, user_id: str) -> Conv:
        conv = self.convs.get(conv_id)
        if conv is None:
            raise _err(ErrorCode.GROUP_NOT_FOUND, "unknown conversation")
        if user_id not in conv.members:
            raise _err(ErrorCode.NOT_GROUP_MEMBER, "not a member of this conversation")
        return conv

    async def profile(self, user_id: str) -> tuple[str, str] | None:
        p = self.profiles.get(user_id)
        if p is None:
            user = await self.app.storage.users.get_by_id(user_id)
            if user is None:
                return None
            p = self.profiles[user_id] = (user.username, user.display_name)
        return p

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

    def _index(self, ev: Event) -> None:
        self._index_put(ev.event_id, (ev.conv.conversation_id, ev.seq, ev.type, ev.sender_id))

    def _index_put(self, event_id: str, info: tuple[str, int, int, str]) -> None:
        """event id -> (conversation, seq, type, sender) for acks; bounded, oldest out."""
        idx = self.event_index
        idx[event_id] = info
        if len(idx) > EVENT_INDEX_MAX:
            idx.popitem(last=False)

    def _publish(self, ev: Event, exclude: Connection | None) -> None:
        """Fan one committed event out: encode once, write to every live connection of
        every recipient except ``exclude`` (the requester, who gets its echo)."""
        frame = ws_frame(encode_envelope(ev.type, "", ev.payload))
        corked = self.app.corked
        if corked is None:
            fanout(frame, self.app.by_user, ev.recipients, exclude, self.config.send_buffer_limit)
        else:
            collect(frame, self.app.by_user, ev.recipients, exclude, corked)
        if self.syncing:
            conv_id = ev.conv.conversation_id
            for c in self.syncing:
                if c is not exclude and c.user_id in ev.recipients and c.pending is not None:
                    c.pending.buffer.append((conv_id, ev.seq, "", frame))

    def _send_to_users(
        self,
        user_ids: Iterable[str],
        msg_type: int,
        message: Any,
        exclude: Connection | None = None,
    ) -> None:
        """Ephemeral push (receipts, typing, presence): best effort, never queued."""
        frame = ws_frame(encode_envelope(msg_type, "", message.SerializeToString()))
        corked = self.app.corked
        if corked is None:
            fanout(frame, self.app.by_user, user_ids, exclude, self.config.send_buffer_limit)
        else:
            collect(frame, self.app.by_user, user_ids, exclude, corked)

    # -- MESSAGE_SEND (SPEC §5, §12.1, §12.16) -------------------------------------------
    def send_message(self, conn: Connection, rid: str, req: pb.MessageSend) -> None:
        """Idempotency is checked first: a retry of a stored send returns the original
        echo even if the sender has since left the conversation (docs/decisions.md)."""
        user_id = conn.user_id
        if rid:
            key = (user_id, rid)
            prior = self.idempotent.get(key)
            if isinstance(prior, Op):  # the original is still committing: answer with it
                prev_finish = prior.finish
                prev_fail = prior.fail
                echo_ev = prior.events[0]

                def finish_both() -> None:
                    if prev_finish is not None:
                        prev_finish()
                    conn.send_payload(T.MESSAGE_RECEIVE, rid, echo_ev.payload)

                def fail_both(exc: BaseException) -> None:
                    if prev_fail is not None:
                        prev_fail(exc)
                    conn.send_error(9002, rid, "could not store the message")

                prior.finish, prior.fail = finish_both, fail_both
                return
            if prior is not None:
                self.app.spawn(conn, rid, self._replay_send(conn, rid, prior[1]))
                return
        conv = self.conv_for_member(req.conversation_id, user_id)
        if len(req.encrypted_payload) > self.config.max_message_size_bytes:
            raise _err(
                ErrorCode.MESSAGE_TOO_LARGE, "encrypted_payload exceeds max_message_size_bytes"
            )
        if rid and self.idempotency_partial:
            self.app.spawn(conn, rid, self._send_checked(conn, rid, req, conv))
            return
        self._send_now(conn, rid, req, conv)

    async def _send_checked(
        self, conn: Connection, rid: str, req: pb.MessageSend, conv: Conv
    ) -> None:
        """A request_id not in memory may still be in storage (from before a restart)."""
        since = _now_us() - IDEMPOTENCY_US
        event_id = await self.db.read(lambda c: sql.send_request_txn(c, conn.user_id, rid, since))
        if event_id is not None:
            await self._replay_send(conn, rid, event_id)
            return
        prior = self.idempotent.get((conn.user_id, rid))
        if prior is not None:  # raced with a duplicate while we looked
            self.send_message(conn, rid, req)
            return
        self._send_now(conn, rid, req, self.conv_for_member(conv.conversation_id, conn.user_id))

    async def _replay_send(self, conn: Connection, rid: str, event_id: str) -> None:
        row = await self.db.read(lambda c: sql.event_payload_txn(c, event_id))
        if row is None:
            raise _err(ErrorCode.INTERNAL_ERROR, "original message no longer stored")
        conn.send_payload(T.MESSAGE_RECEIVE, rid, row[2])

    def _send_now(self, conn: Connection, rid: str, req: pb.MessageSend, conv: Conv) -> None:
        user_id = conn.user_id
        op = Op()
        ev = op.allocate(conv, T.MESSAGE_RECEIVE, user_id)
        ev.recipients = conv.recipients
        ev.payload = pb.MessageReceive(
            message_id=ev.event_id,
            conversation_id=conv.conversation_id,
            sender_id=user_id,
            encrypted_payload=req.encrypted_payload,
            server_timestamp=ev.ts_us,
            message_type=req.message_type,
            seq=ev.seq,
        ).SerializeToString()
        if rid:
            key = (user_id, rid)
            self.idempotent[key] = op
            op.send_request = (user_id, rid, ev.event_id, ev.ts_us)
            op.on_undo(lambda: self.idempotent.pop(key, None))

        def finish() -> None:
            if rid:
                self.idempotent[(user_id, rid)] = (ev.ts_us, ev.event_id)
            self._index(ev)
            conn.send_payload(T.MESSAGE_RECEIVE, rid, ev.payload)  # the echo = the response
            self._publish(ev, conn)

        op.finish = finish
        op.fail = lambda exc: conn.send_error(9002, rid, "could not store the message")
        self.log.submit(op)

    # -- groups (SPEC §6, §12.2) --------------------------------------------------------
    async def create_group(self, conn: Connection, rid: str, req: pb.GroupCreate) -> None:
        creator = conn.user_id
        others: list[str] = []
        for uid in req.member_ids:
            if uid != creator and uid not in others:
                others.append(uid)
        for uid in others:
            if await self.profile(uid) is None:
                raise _err(ErrorCode.USER_NOT_FOUND, f"unknown user {uid}")
        if 1 + len(others) > self.config.max_group_members:
            raise _err(ErrorCode.GROUP_FULL, "more members than max_group_members")
        for uid in [creator, *others]:
            if len(self.user_convs.get(uid, ())) >= self.config.max_groups_per_user:
                raise _err(ErrorCode.GROUP_FULL, f"user {uid} is in too many conversations")
        members = []
        for uid in [creator, *others]:  # every await happens before memory changes
            username, display = await self.profile(uid) or ("", "")
            role = "admin" if uid == creator else "member"
            members.append(
                pb.GroupMember(user_id=uid, username=username, display_name=display, role=role)
            )
        if any(
            len(self.user_convs.get(m.user_id, ())) >= self.config.max_groups_per_user
            for m in members
        ):
            raise _err(ErrorCode.GROUP_FULL, "a member is in too many conversations")
        now = _now_us()
        conv = Conv(new_ulid(now // 1000), req.title, creator, now)
        rec = sql.ConversationRecord(conv.conversation_id, conv.title, creator, now)
        op = Op()
        self.convs[conv.conversation_id] = conv
        op.txns.append(lambda c: sql.insert_conversation_txn(c, rec))
        op.on_undo(lambda: self.convs.pop(conv.conversation_id, None))
        before = {m.user_id: self._contacts(m.user_id) for m in members}
        events = [self._add_member(op, conv, m.user_id, creator, m.role) for m in members]

        def finish() -> None:
            conn.send(
                T.GROUP_CREATED,
                rid,
                pb.GroupCreated(
                    conversation_id=conv.conversation_id, title=conv.title, members=members
                ),
            )
            for ev in events:
                self._index(ev)
                self._publish(ev, None)  # the requesting connection too (§12.2)
            self._introduce(before)

        op.finish = finish
        op.fail = lambda exc: conn.send_error(9002, rid, "could not store the group")
        self.log.submit(op)

    def _add_member(self, op: Op, conv: Conv, user_id: str, added_by: str, role: str) -> Event:
        """GROUP_MEMBER_ADDED: membership, the user's device cursors (seq - 1) and the
        delivered position start together, in the same transaction."""
        ev = op.allocate(conv, T.GROUP_MEMBER_ADDED, added_by)
        member = Member(user_id, role, ev.seq, ev.ts_us)
        former = conv.former.pop(user_id, None)
        conv.members[user_id] = member
        conv.membership_changed()
        self.user_convs.setdefault(user_id, set()).add(conv.conversation_id)
        self.user_former.get(user_id, set()).discard(conv.conversation_id)
        ev.recipients = conv.recipients
        ev.payload = pb.GroupMemberAdded(
            conversation_id=conv.conversation_id,
            user_id=user_id,
            added_by=added_by,
            event_id=ev.event_id,
            seq=ev.seq,
            server_timestamp=ev.ts_us,
        ).SerializeToString()
        conv_id, seq, ts = conv.conversation_id, ev.seq, ev.ts_us

        def txn(c: Conn) -> None:
            sql.upsert_member_txn(c, conv_id, user_id, role, seq, ts)
            sql.start_join_cursors_txn(c, conv_id, user_id, seq - 1)

        op.txns.append(txn)
        # Connected devices of the user start at seq - 1 in memory too.
        moved: list[tuple[Device, int | None]] = []
        for dev in self.devices.values():
            if dev.user_id == user_id:
                moved.append((dev, dev.cursors.get(conv_id)))
                dev.cursors[conv_id] = seq - 1
        prev_delivered = self.delivered.get((conv_id, user_id))
        self.delivered[(conv_id, user_id)] = seq - 1

        def undo() -> None:
            conv.members.pop(user_id, None)
            if former is not None:
                conv.former[user_id] = former
                self.user_former.setdefault(user_id, set()).add(conv_id)
            conv.membership_changed()
            convs = self.user_convs.get(user_id)
            if convs is not None:
                convs.discard(conv_id)
            for dev, old in moved:
                if old is None:
                    dev.cursors.pop(conv_id, None)
                else:
                    dev.cursors[conv_id] = old
            if prev_delivered is None:
                self.delivered.pop((conv_id, user_id), None)
            else:
                self.delivered[(conv_id, user_id)] = prev_delivered

        op.on_undo(undo)
        return ev

    def _remove_member(self, op: Op, conv: Conv, user_id: str, removed_by: str) -> Event:
        ev = op.allocate(conv, T.GROUP_MEMBER_REMOVED, removed_by)
        member = conv.members.pop(user_id)
        old_role, old_left = member.role, member.left_seq
        member.left_seq = ev.seq
        member.role = "member"
        conv.former[user_id] = member
        conv.membership_changed()
        convs = self.user_convs.get(user_id)
        if convs is not None:
            convs.discard(conv.conversation_id)
        self.user_former.setdefault(user_id, set()).add(conv.conversation_id)
        # The removed user's devices get this event too, then nothing more (§12.2).
        ev.recipients = (*conv.recipients, user_id)
        ev.payload = pb.GroupMemberRemoved(
            conversation_id=conv.conversation_id,
            user_id=user_id,
            removed_by=removed_by,
            event_id=ev.event_id,
            seq=ev.seq,
            server_timestamp=ev.ts_us,
        ).SerializeToString()
        conv_id, seq = conv.conversation_id, ev.seq
        op.txns.append(lambda c: sql.mark_member_left_txn(c, conv_id, user_id, seq))

        def undo() -> None:
            conv.former.pop(user_id, None)
            self.user_former.get(user_id, set()).discard(conv_id)
            member.left_seq, member.role = old_left, old_role
            # restore join order: rebuild with the member at its joined_seq position
            items = sorted([*conv.members.values(), member], key=lambda m: m.joined_seq)
            conv.members.clear()
            conv.members.update((m.user_id, m) for m in items)
            conv.membership_changed()
            self.user_convs.setdefault(user_id, set()).add(conv_id)

        op.on_undo(undo)
        return ev

    def _promote_if_no_admin(self, op: Op, conv: Conv) -> None:
        """SPEC §6: the longest-standing member (earliest join) becomes admin."""
        if not conv.members or any(m.role == "admin" for m in conv.members.values()):
            return
        heir = min(conv.members.values(), key=lambda m: m.joined_seq)
        heir.role = "admin"
        conv_id, uid = conv.conversation_id, heir.user_id
        op.txns.append(lambda c: sql.set_role_txn(c, conv_id, uid, "admin"))

        def undo() -> None:
            heir.role = "member"

        op.on_undo(undo)

    def _membership_op(
        self,
        conn: Connection,
        rid: str,
        op: Op,
        events: list[Event],
        contacts_before: dict[str, set[str]] | None = None,
    ) -> None:
        def finish() -> None:
            for ev in events:
                self._index(ev)
                self._publish(ev, None)  # requesting connection included (§12.2)
            if contacts_before:
                self._introduce(contacts_before)
            if rid:
                conn.send(T.ACK, rid, pb.Ack(count=1))

        op.finish = finish
        op.fail = lambda exc: conn.send_error(9002, rid, "could not store the change")
        self.log.submit(op)

    async def invite(self, conn: Connection, rid: str, req: pb.GroupInvite) -> None:
        conv = self.conv_for_member(req.conversation_id, conn.user_id)
        if conv.members[conn.user_id].role != "admin":
            raise _err(ErrorCode.NOT_GROUP_ADMIN, "only a group admin can invite")
        if await self.profile(req.user_id) is None:
            raise _err(ErrorCode.USER_NOT_FOUND, "unknown user")
        conv = self.conv_for_member(req.conversation_id, conn.user_id)  # re-check after await
        if req.user_id in conv.members:
            raise _err(ErrorCode.ALREADY_MEMBER, "already a member")
        if len(conv.members) >= self.config.max_group_members:
            raise _err(ErrorCode.GROUP_FULL, "the group is full")
        if len(self.user_convs.get(req.user_id, ())) >= self.config.max_groups_per_user:
            raise _err(ErrorCode.GROUP_FULL, "the user is in too many conversations")
        op = Op()
        before = {u: self._contacts(u) for u in (*conv.recipients, req.user_id)}
        ev = self._add_member(op, conv, req.user_id, conn.user_id, "member")
        self._membership_op(conn, rid, op, [ev], before)

    def remove(self, conn: Connection, rid: str, req: pb.GroupRemove) -> None:
        conv = self.conv_for_member(req.conversation_id, conn.user_id)
        if conv.members[conn.user_id].role != "admin":
            raise _err(ErrorCode.NOT_GROUP_ADMIN, "only a group admin can remove")
        if req.user_id == conn.user_id:
            raise _err(ErrorCode.CANNOT_REMOVE_SELF, "use GROUP_LEAVE to leave")
        if req.user_id not in conv.members:
            raise _err(ErrorCode.NOT_MEMBER, "not a member")
        op = Op()
        ev = self._remove_member(op, conv, req.user_id, conn.user_id)
        self._membership_op(conn, rid, op, [ev])

    def leave(self, conn: Connection, rid: str, req: pb.GroupLeave) -> None:
        conv = self.conv_for_member(req.conversation_id, conn.user_id)
        op = Op()
        ev = self._remove_member(op, conv, conn.user_id, conn.user_id)
        self._promote_if_no_admin(op, conv)
        self._membership_op(conn, rid, op, [ev])

    async def remove_user_everywhere(self, user_id: str) -> None:
        """Admin deletion: remove the user from every group (members get REMOVED)."""
        for conv_id in list(self.user_convs.get(user_id, ())):
            conv = self.convs[conv_id]
            if user_id not in conv.members:
                continue
            op = Op()
            ev = self._remove_member(op, conv, user_id, user_id)
            self._promote_if_no_admin(op, conv)
            done = asyncio.get_running_loop().create_future()

            def finish(ev: Event = ev, done: asyncio.Future[None] = done) -> None:
                self._index(ev)
                self._publish(ev, None)
                done.set_result(None)

            op.finish = finish
            op.fail = done.set_exception
            self.log.submit(op)
            await done

    async def list_conversations(self, conn: Connection, rid: str) -> None:
        out = []
        for conv_id in sorted(self.user_convs.get(conn.user_id, ())):
            conv = self.convs[conv_id]
            out.append(
                pb.Conversation(
                    conversation_id=conv_id,
                    title=conv.title,
                    members=await self.group_members(conv),
                    last_seq=conv.committed_seq,
                    mls_epoch=conv.epoch,
                )
            )
        conn.send(T.CONVERSATION_LIST, rid, pb.ConversationList(conversations=out))

    # -- devices and sync (SPEC §4 READY, §5, §12.12) -----------------------------------
    async def device_created(self, device_id: str, user_id: str) -> None:
        """A device created after its user joined starts at the current last seq."""
        pairs = [(cid, self.convs[cid].committed_seq) for cid in self.user_convs.get(user_id, ())]
        if pairs:
            await self.db.write(lambda c: sql.start_device_cursors_txn(c, device_id, pairs))

    async def _device(self, conn: Connection) -> Device:
        """The device's delivery state, loading its cursors on first use."""
        dev = self.devices.get(conn.device_id)
        if dev is None:
            created, cursors = await self.db.read(
                partial(sql.load_device_txn, session_id=conn.session_id, device_id=conn.device_id)
            )
            dev = self.devices.get(conn.device_id)  # another connection may have won
            if dev is None:
                dev = Device(conn.device_id, conn.user_id, created)
                dev.cursors = cursors
                self.devices[conn.device_id] = dev
        return dev

    def detach(self, conn: Connection) -> None:
        self.syncing.discard(conn)
        dev = self.devices.get(conn.device_id)
        if dev is not None:
            if conn in dev.conns:
                dev.conns.remove(conn)
            if not dev.conns:
                del self.devices[conn.device_id]
        self._presence_changed(conn.user_id)

    def on_ready(self, conn: Connection) -> None:
        conn.pending = SyncState()
        self.syncing.add(conn)
        self.app.background(self._sync_or_close(conn))

    async def _sync_or_close(self, conn: Connection) -> None:
        try:
            await self._sync(conn)
        except Exception:
            # A device must never sit READY without its backlog: drop the connection so
            # the client reconnects and the sync starts over from its cursors.
            log.exception("offline sync failed for device %s", conn.device_id)
            conn.close(CloseCode.INTERNAL_ERROR, "sync failed")

    async def _sync(self, conn: Connection) -> None:
        """Backlog above the device's cursors, per conversation in seq order, then its
        welcomes, then SYNC_COMPLETE; then presence and buffered live events (SPEC §4)."""
        state: SyncState = conn.pending
        try:
            dev = await self._device(conn)
            dev.conns.append(conn)
            delivered = 0
            truncated: list[str] = []
            out = bytearray()
            for conv_id, conv, start, upto in self._sync_ranges(conn.user_id, dev):
                if conv.purged_seq > start:
                    truncated.append(conv_id)
                after = start
                while after < upto:
                    rows = await self.db.read(
                        partial(
                            sql.events_after_txn,
                            conversation_id=conv_id,
                            after_seq=after,
                            up_to_seq=upto,
                            limit=SYNC_PAGE,
                        )
                    )
                    if not rows:
                        break
                    for seq, _eid, type_, _s, _ts, payload in rows:
                        append_ws_frame(out, encode_envelope(type_, "", payload))
                        delivered += 1
                        after = seq
                    if len(out) >= SYNC_CHUNK_BYTES:
                        await self._write_chunk(conn, out)
                        out = bytearray()
                state.synced_upto[conv_id] = upto
            welcomes = await self.db.read(
                lambda c: sql.pending_welcomes_txn(
                    c, conn.user_id, dev.device_id, dev.created_at_us
                )
            )
            for event_id, _conv, _sender, _ts, payload in welcomes:
                append_ws_frame(out, encode_envelope(T.MLS_WELCOME_RECEIVE, "", payload))
                state.synced_welcomes.add(event_id)
                delivered += 1
            append_ws_frame(
                out,
                encode_envelope(
                    T.SYNC_COMPLETE,
                    "",
                    pb.SyncComplete(
                        delivered=delivered, truncated_conversation_ids=truncated
                    ).SerializeToString(),
                ),
            )
            # Presence of online contacts (SPEC §4, §12.11).
            for uid in self._contacts(conn.user_id):
                status = self.presence.get(uid)
                if status is not None and status != "offline":
                    append_ws_frame(
                        out,
                        encode_envelope(
                            T.PRESENCE_NOTIFY,
                            "",
                            pb.PresenceNotify(user_id=uid, status=status).SerializeToString(),
                        ),
                    )
            await self._write_chunk(conn, out)
            for hook in self.app.sync_hooks:  # MLS_KEY_PACKAGE_LOW
                await hook(conn)
            # Live events committed meanwhile, minus what the backlog already carried.
            tail = bytearray()
            for conv_id, seq, welcome_id, frame in state.buffer:
                if welcome_id:
                    if welcome_id in state.synced_welcomes:
                        continue
                elif seq <= state.synced_upto.get(conv_id, 0):
                    continue
                tail += frame
            if tail:
                await self._write_chunk(conn, tail)
        finally:
            self.syncing.discard(conn)
            conn.pending = None
        if not conn.state.closed:
            conn.live = True
            self._presence_changed(conn.user_id)

    def _sync_ranges(self, user_id: str, dev: Device) -> list[tuple[str, Conv, int, int]]:
        ranges = []
        for conv_id in (*self.user_convs.get(user_id, ()), *self.user_former.get(user_id, ())):
            conv = self.convs[conv_id]
            m = conv.member_view(user_id)
            if m is None:
                continue
            cursor = dev.cursors.get(conv.conversation_id)
            if cursor is None and m.left_seq is not None:
                continue  # acked its own removal: the cursor was dropped (§12.14)
            if cursor is None:
                # §12.12: a device created after its user joined starts at the last seq
                # (normally written at device creation; this covers older devices).
                cursor = (
                    conv.committed_seq if dev.created_at_us > m.joined_at_us else m.joined_seq - 1
                )
                dev.cursors[conv.conversation_id] = cursor
                self.delivery_writer.cursor(dev.device_id, conv.conversation_id, cursor)
            cursor = max(cursor, m.joined_seq - 1)
            upto = conv.committed_seq if m.left_seq is None else min(m.left_seq, conv.committed_seq)
            if upto > cursor:
                ranges.append((conv.conversation_id, conv, cursor, upto))
            elif conv.purged_seq > cursor:
                ranges.append((conv.conversation_id, conv, cursor, cursor))
        return ranges

    async def _write_chunk(self, conn: Connection, data: bytearray) -> None:
        """Write a batch of frames in one call; wait while the socket is backed up."""
        if not data or conn.state.closed or conn.out is None:
            return
        limit = self.config.send_buffer_limit
        while conn.out is not None and conn.out.get_write_buffer_size() > limit // 2:
            await asyncio.sleep(0.005)
            if conn.state.closed:
                return
        if conn.out is not None:
            conn.out.write(bytes(data))

    # -- acks and delivered (SPEC §5, §12.14, §12.15, §12.22) ----------------------------
    def ack(self, conn: Connection, rid: str, req: pb.MessageAck) -> None:
        """MESSAGE_ACK. Fast path with everything in memory: no task, no disk read; the
        response follows the coalesced cursor write (DeliveryWriter.after)."""
        ids: list[str] = []
        for i in (req.message_id, *req.message_ids):
            if i and i not in ids:
                ids.append(i)
        dev = self.devices.get(conn.device_id)
        index, delivered, user_id = self.event_index, self.delivered, conn.user_id
        if dev is None or any(
            i not in index or (index[i][0], user_id) not in delivered for i in ids
        ):
            self.app.spawn(conn, rid, self._ack_slow(conn, rid, ids))
            return
        self._ack_apply(conn, rid, dev, ids, {})

    async def _ack_slow(self, conn: Connection, rid: str, ids: list[str]) -> None:
        """Load what the fast path lacks (older events, welcomes, delivered positions)."""
        dev = await self._device(conn)
        owners: dict[str, str | None] = {}
        for event_id in ids:
            info = self.event_index.get(event_id)
            if info is None:
                info = await self.db.read(partial(sql.event_by_id_txn, event_id=event_id))
            if info is None:
                owners[event_id] = await self.db.read(
                    partial(sql.welcome_owner_txn, event_id=event_id)
                )
                continue
            self._index_put(event_id, info)
            conv = self.convs.get(info[0])
            if conv is not None:
                await self._delivered_position(conv, conn.user_id)
        self._ack_apply(conn, rid, dev, ids, owners)

    def _ack_apply(
        self,
        conn: Connection,
        rid: str,
        dev: Device,
        ids: list[str],
        welcome_owners: dict[str, str | None],
    ) -> None:
        user_id = conn.user_id
        writer = self.delivery_writer
        moved = 0
        touched: dict[str, int] = {}
        for event_id in ids:
            info = self.event_index.get(event_id)
            if info is None:
                key = (dev.device_id, event_id)
                if welcome_owners.get(event_id) == user_id and key not in writer.welcome_acks:
                    writer.welcome_acks.add(key)  # welcomes are acked one by one (§12.15)
                    moved += 1
                continue
            conv_id, seq = info[0], info[1]
            conv = self.convs.get(conv_id)
            m = conv.member_view(user_id) if conv is not None else None
            if m is None or seq < m.joined_seq or (m.left_seq is not None and seq > m.left_seq):
                continue  # §12.14: ids the user may not see are ignored
            cur = dev.cursors.get(conv_id)
            if cur is None:
                if m.left_seq is not None:
                    continue  # its cursor there was dropped after it acked its removal
                cur = m.joined_seq - 1
            if seq > cur:
                dev.cursors[conv_id] = seq
                touched[conv_id] = seq
                moved += 1
        delivered_msgs: list[tuple[str, pb.MessageDelivered]] = []
        for conv_id, seq in touched.items():
            conv = self.convs[conv_id]
            m = conv.member_view(user_id)
            assert m is not None
            if m.left_seq is not None and seq >= m.left_seq:
                # Acked its own GROUP_MEMBER_REMOVED: the cursor there is dropped (§12.14).
                dev.cursors.pop(conv_id, None)
                writer.drop_cursor(dev.device_id, conv_id)
            else:
                writer.cursor(dev.device_id, conv_id, dev.cursors[conv_id])
            delivered_msgs.extend(self._advance_delivered(conv, user_id, seq))

        def done(error: BaseException | None) -> None:
            if error is not None:
                conn.send_error(9002, rid, "could not store the acknowledgement")
                return
            for sender, msg in delivered_msgs:
                self._send_to_users((sender,), T.MESSAGE_DELIVERED, msg)
            if rid:
                conn.send(T.ACK, rid, pb.Ack(count=moved))

        writer.after(done)

    async def _delivered_position(self, conv: Conv, user_id: str) -> int:
        key = (conv.conversation_id, user_id)
        pos = self.delivered.get(key)
        if pos is None:
            stored = await self.db.read(
                partial(sql.load_delivery_txn, conversation_id=key[0], user_id=user_id)
            )
            m = conv.member_view(user_id)
            pos = stored if stored is not None else (m.joined_seq - 1 if m else 0)
            pos = self.delivered.setdefault(key, pos)
        return pos

    def _advance_delivered(
        self, conv: Conv, user_id: str, seq: int
    ) -> list[tuple[str, pb.MessageDelivered]]:
        """The first device of a user to pass messages moves its delivered position; each
        sender passed gets one MESSAGE_DELIVERED naming its last message (§12.14)."""
        key = (conv.conversation_id, user_id)
        pos = self.delivered[key]  # loaded by ack / _ack_slow
        if seq <= pos:
            return []
        self.delivered[key] = seq
        self.delivery_writer.delivery[key] = seq
        recent = conv.recent
        if not recent or recent[0][0] > pos + 1:
            # Older than the in-memory window: look the senders up in storage.
            self.app.background(self._delivered_from_storage(conv, user_id, pos, seq))
            return []
        last_by_sender: dict[str, str] = {}
        for s, event_id, type_, sender in reversed(recent):  # newest first: stop early
            if s <= pos:
                break
            if s <= seq and type_ == T.MESSAGE_RECEIVE and sender != user_id:
                last_by_sender.setdefault(sender, event_id)
        return self._delivered_msgs(conv, user_id, seq, last_by_sender)

    async def _delivered_from_storage(self, conv: Conv, user_id: str, pos: int, seq: int) -> None:
        rows = await self.db.read(
            partial(
                sql.events_after_txn,
                conversation_id=conv.conversation_id,
                after_seq=pos,
                up_to_seq=seq,
                limit=1_000_000,
            )
        )
        last_by_sender: dict[str, str] = {}
        for _s, event_id, type_, sender, _ts, _p in rows:
            if type_ == T.MESSAGE_RECEIVE and sender != user_id:
                last_by_sender[sender] = event_id
        msgs = self._delivered_msgs(conv, user_id, seq, last_by_sender)
        await self.delivery_writer.flush()
        for sender, msg in msgs:
            self._send_to_users((sender,), T.MESSAGE_DELIVERED, msg)

    @staticmethod
    def _delivered_msgs(
        conv: Conv, user_id: str, seq: int, last_by_sender: dict[str, str]
    ) -> list[tuple[str, pb.MessageDelivered]]:
        return [
            (
                sender,
                pb.MessageDelivered(
                    message_id=event_id,
                    delivered_to=user_id,
                    conversation_id=conv.conversation_id,
                    up_to_seq=seq,
                ),
            )
            for sender, event_id in last_by_sender.items()
        ]

    # -- history (SPEC §5, §12.4, §12.13) --------------------------------------------------
    async def history(self, conn: Connection, rid: str, req: pb.HistoryRequest) -> None:
        conv = self.convs.get(req.conversation_id)
        if conv is None:
            raise _err(ErrorCode.GROUP_NOT_FOUND, "unknown conversation")
        m = conv.members.get(conn.user_id)
        if m is None:
            raise _err(ErrorCode.NOT_GROUP_MEMBER, "not a member of this conversation")
        limit = req.limit or HISTORY_DEFAULT
        limit = min(limit, HISTORY_MAX)
        first, last = m.joined_seq, conv.committed_seq  # visible range (§12.13)
        conv_id, cursor = conv.conversation_id, req.cursor_seq
        if req.direction == pb.HISTORY_FORWARD:
            after = max(cursor, first - 1)
            rows = await self.db.read(
                lambda c: sql.events_after_txn(c, conv_id, after, last, limit)
            )
            next_cursor = rows[-1][0] if rows else cursor
            has_more = len(rows) == limit and next_cursor < last
        else:
            before = last + 1 if cursor == 0 else min(cursor, last + 1)
            rows = await self.db.read(
                lambda c: sql.events_before_txn(c, conv_id, before, first, limit)
            )
            next_cursor = rows[0][0] if rows else cursor
            has_more = len(rows) == limit and next_cursor > first
        events = [
            pb.Envelope(type=cast(Any, type_), request_id="", payload=payload)
            for _seq, _eid, type_, _s, _ts, payload in rows
        ]
        conn.send(
            T.MESSAGE_HISTORY_RESPONSE,
            rid,
            pb.HistoryResponse(events=events, next_cursor_seq=next_cursor, has_more=has_more),
        )

    # -- read markers, typing, presence (SPEC §5 ephemeral, §12.11) ----------------------
    async def mark_read(self, conn: Connection, rid: str, req: pb.ReadMarker) -> None:
        conv = self.conv_for_member(req.conversation_id, conn.user_id)
        key = (conv.conversation_id, conn.user_id)
        seq = min(req.up_to_seq, conv.committed_seq)
        prev = self.read_marks.get(key)
        if prev is None:
            prev = await self.db.read(lambda c: sql.read_marker_txn(c, *key))
            prev = self.read_marks.setdefault(key, prev)
        moved = seq > prev
        if moved:
            self.read_marks[key] = seq
            self.delivery_writer.read_markers[key] = seq
            await self.delivery_writer.flush()
            self._send_to_users(
                conv.recipients,
                T.MESSAGE_READ_RECEIPT,
                pb.ReadReceipt(
                    conversation_id=conv.conversation_id, user_id=conn.user_id, up_to_seq=seq
                ),
                exclude=conn,
            )
        if rid:
            conn.send(T.ACK, rid, pb.Ack(count=1 if moved else 0))

    def typing(self, conn: Connection, rid: str, req: pb.Typing) -> None:
        conv = self.conv_for_member(req.conversation_id, conn.user_id)
        now = self.app.clock()
        marks = conn.typing_marks
        if marks is None:
            marks = conn.typing_marks = {}
        last = marks.get(conv.conversation_id, 0.0)
        # Rate-limited: a repeated "typing" within TYPING_INTERVAL is not forwarded.
        forward = not req.typing or now - last >= TYPING_INTERVAL
        if req.typing and forward:
            marks[conv.conversation_id] = now
        elif not req.typing:
            marks.pop(conv.conversation_id, None)
        if forward:
            others = tuple(u for u in conv.recipients if u != conn.user_id)
            self._send_to_users(
                others,
                T.TYPING_NOTIFY,
                pb.TypingNotify(
                    conversation_id=conv.conversation_id, user_id=conn.user_id, typing=req.typing
                ),
            )
        if rid:
            conn.send(T.ACK, rid, pb.Ack(count=1 if forward else 0))

    def set_presence(self, conn: Connection, rid: str, req: pb.PresenceUpdate) -> None:
        if req.status not in PRESENCE_RANK:
            raise _err(ErrorCode.MALFORMED_MESSAGE, "status must be online, away or offline")
        conn.presence = req.status
        self._presence_changed(conn.user_id)
        if rid:
            conn.send(T.ACK, rid, pb.Ack(count=1))

    def _contacts(self, user_id: str) -> set[str]:
        out: set[str] = set()
        for conv_id in self.user_convs.get(user_id, ()):
            out.update(self.convs[conv_id].recipients)
        out.discard(user_id)
        return out

    def _introduce(self, contacts_before: dict[str, set[str]]) -> None:
        """Users who now share a conversation for the first time learn each other's
        presence (if not offline), as a newly connected device would on READY."""
        for uid, before in contacts_before.items():
            for other in self._contacts(uid) - before:
                status = self.presence.get(other)
                if status is not None:
                    self._send_to_users(
                        (uid,), T.PRESENCE_NOTIFY, pb.PresenceNotify(user_id=other, status=status)
                    )

    def _presence_changed(self, user_id: str) -> None:
        """Aggregate across the user's connections (online > away > offline); notify
        users sharing a conversation only when the aggregate changes (SPEC §12.11)."""
        best = "offline"
        for c in self.app.by_user.get(user_id, ()):
            if c.live and PRESENCE_RANK[c.presence] > PRESENCE_RANK[best]:
                best = c.presence
        if self.presence.get(user_id, "offline") == best:
            return
        if best == "offline":
            self.presence.pop(user_id, None)
        else:
            self.presence[user_id] = best
        contacts = self._contacts(user_id)
        if contacts:
            self._send_to_users(
                contacts, T.PRESENCE_NOTIFY, pb.PresenceNotify(user_id=user_id, status=best)
            )

    # -- retention (SPEC §5, §9) ----------------------------------------------------------
    async def _retention_loop(self) -> None:
        while True:
            try:
                if self.config.retention_days > 0:
                    cutoff_ms = int(time.time() * 1000) - self.config.retention_days * 86_400_000
                    await self.run_retention(cutoff_ms)
                since = _now_us() - IDEMPOTENCY_US
                await self.db.write(partial(sql.purge_send_requests_txn, before_us=since))
                for key, value in list(self.idempotent.items()):
                    if isinstance(value, tuple) and value[0] < since:
                        del self.idempotent[key]
                if len(self.idempotent) > IDEMPOTENCY_MEMORY:
                    self.idempotency_partial = True
                    for key in list(self.idempotent)[: len(self.idempotent) - IDEMPOTENCY_MEMORY]:
                        if isinstance(self.idempotent[key], tuple):
                            del self.idempotent[key]
            except Exception:
                log.exception("retention pass failed")
            await asyncio.sleep(3600)

    async def run_retention(self, cutoff_ms: int) -> dict[str, int]:
        """Delete events older than ``cutoff_ms``; devices that had not acked them see the
        conversation in SYNC_COMPLETE.truncated_conversation_ids."""
        floor = ulid_floor(cutoff_ms)
        purged = await self.db.write(lambda c: sql.purge_events_txn(c, floor))
        for conv_id, seq in purged.items():
            conv = self.convs.get(conv_id)
            if conv is not None and seq > conv.purged_seq:
                conv.purged_seq = seq
        if purged:
            log.info("retention removed events from %d conversations", len(purged))
        return purged
