"""Groups: create, invite, remove, leave, list (SPEC §6, §12.2).

Every membership change is an :class:`~sovereign.services.eventlog.Op`: validated and
applied in memory at once, committed by the event log, undone exactly if the commit
fails. GROUP_MEMBER_ADDED / GROUP_MEMBER_REMOVED are durable conversation events and
go to the requesting connection too (§12.2).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sovereign.clock import Clock
from sovereign.config import Config
from sovereign.errors import ErrorCode, SovereignError
from sovereign.protocol.types import MessageType as T
from sovereign.services.delivery import DeliveryService
from sovereign.services.eventlog import PENDING_SEQ, Conv, Event, EventLog, Member, Op, new_ulid
from sovereign.services.ports import Outbox
from sovereign.services.session import Session
from sovereign.services.state import ConversationState, Device
from sovereign.storage import cluster as csql
from sovereign.storage import messaging as sql
from sovereign.storage.database import Conn
from sovereign.v1 import sovereign_pb2 as pb

# contacts of each user before a change -> presence introductions after it
Introduce = Callable[[dict[str, set[str]]], None]


class GroupService:
    def __init__(
        self,
        config: Config,
        state: ConversationState,
        eventlog: EventLog,
        outbox: Outbox,
        clock: Clock,
        delivery: DeliveryService,
        introduce: Introduce,
    ) -> None:
        self.config = config
        self.state = state
        self.eventlog = eventlog
        self.outbox = outbox
        self.clock = clock
        self.delivery = delivery
        self.introduce = introduce

    def _check_room(self, user_id: str, what: str) -> None:
        if self.state.groups_of(user_id) >= self.config.max_groups_per_user:
            raise SovereignError(ErrorCode.GROUP_FULL, what)

    async def create_group(self, s: Session, rid: str, req: pb.GroupCreate) -> None:
        state = self.state
        creator = s.user_id
        others: list[str] = []
        for uid in req.member_ids:
            if uid != creator and uid not in others:
                others.append(uid)
        await state.load_profiles([creator, *others])  # one read, not one per member
        for uid in others:
            if await state.profile(uid) is None:
                raise SovereignError(ErrorCode.USER_NOT_FOUND, f"unknown user {uid}")
        if 1 + len(others) > self.config.max_group_members:
            raise SovereignError(ErrorCode.GROUP_FULL, "more members than max_group_members")
        for uid in [creator, *others]:
            self._check_room(uid, f"user {uid} is in too many conversations")
        members = []
        for uid in [creator, *others]:  # every await happens before memory changes
            username, display = await state.profile(uid) or ("", "")
            role = "admin" if uid == creator else "member"
            members.append(
                pb.GroupMember(user_id=uid, username=username, display_name=display, role=role)
            )
        for m in members:  # re-checked: the awaits above let other requests run
            self._check_room(m.user_id, "a member is in too many conversations")
        now = self.clock.now_us()
        conv = Conv(new_ulid(now // 1000), req.title, creator, now)
        rec = sql.ConversationRecord(conv.conversation_id, conv.title, creator, now)
        op = Op()
        state.convs[conv.conversation_id] = conv
        op.before = [lambda c: sql.insert_conversation_txn(c, rec)]
        op.on_undo(lambda: state.convs.pop(conv.conversation_id, None))
        before = {m.user_id: state.contacts(m.user_id) for m in members}
        joins: list[tuple[str, str, Event]] = []
        events = [self._add_member(op, conv, m.user_id, creator, m.role, joins) for m in members]
        self._store_joins(op, conv.conversation_id, joins)
        created = pb.GroupCreated(
            conversation_id=conv.conversation_id, title=conv.title, members=members
        )

        def finish() -> None:
            self.outbox.send(s, T.GROUP_CREATED, rid, created)
            self._published(events)
            self.introduce(before)

        self.delivery.submit(s, rid, op, finish, "could not store the group")

    def _published(self, events: list[Event]) -> None:
        for ev in events:
            self.state.index(ev)
            self.delivery.publish(ev, None)  # the requesting connection too (§12.2)

    @staticmethod
    def _store_joins(op: Op, conv_id: str, joins: list[tuple[str, str, Event]]) -> None:
        """One transaction step for every member of ``joins`` (a few statements, not a
        few per member: GROUP_CREATE may add 1,000)."""

        def txn(c: Conn) -> None:
            # ev.seq, read here: in cluster mode the database assigns it in this
            # transaction, just before.
            rows = [(uid, role, ev.seq, ev.ts_us) for uid, role, ev in joins]
            sql.join_members_txn(c, conv_id, rows)

        op.txns.append(txn)

    def _add_member(
        self,
        op: Op,
        conv: Conv,
        user_id: str,
        added_by: str,
        role: str,
        joins: list[tuple[str, str, Event]],
    ) -> Event:
        """GROUP_MEMBER_ADDED: membership, the user's device cursors (seq - 1) and the
        delivered position start together, in the same transaction (the caller stores
        ``joins`` with :meth:`_store_joins`)."""
        state = self.state
        ev = op.allocate(conv, T.GROUP_MEMBER_ADDED, added_by, self.clock.now_us())
        clustered = self.eventlog.clustered
        member = Member(user_id, role, PENDING_SEQ if clustered else ev.seq, ev.ts_us)
        former = conv.former.pop(user_id, None)
        conv.members[user_id] = member
        conv.membership_changed()
        state.user_convs.setdefault(user_id, set()).add(conv.conversation_id)
        state.user_former.get(user_id, set()).discard(conv.conversation_id)
        ev.recipients = conv.recipients
        ev.payload = pb.GroupMemberAdded(
            conversation_id=conv.conversation_id,
            user_id=user_id,
            added_by=added_by,
            event_id=ev.event_id,
            seq=ev.seq,
            server_timestamp=ev.ts_us,
        ).SerializeToString()
        conv_id, seq = conv.conversation_id, ev.seq
        joins.append((user_id, role, ev))
        # Connected devices of the user start at seq - 1 in memory too.
        moved: list[tuple[Device, int | None]] = []
        for dev in state.devices.values():
            if dev.user_id == user_id:
                moved.append((dev, dev.cursors.get(conv_id)))
                dev.cursors[conv_id] = seq - 1
        prev_delivered = state.delivered.get((conv_id, user_id))
        state.delivered[(conv_id, user_id)] = seq - 1

        def undo() -> None:
            conv.members.pop(user_id, None)
            if former is not None:
                conv.former[user_id] = former
                state.user_former.setdefault(user_id, set()).add(conv_id)
            conv.membership_changed()
            convs = state.user_convs.get(user_id)
            if convs is not None:
                convs.discard(conv_id)
            for dev, old in moved:
                if old is None:
                    dev.cursors.pop(conv_id, None)
                else:
                    dev.cursors[conv_id] = old
            if prev_delivered is None:
                state.delivered.pop((conv_id, user_id), None)
            else:
                state.delivered[(conv_id, user_id)] = prev_delivered

        op.on_undo(undo)
        return ev

    def _remove_member(self, op: Op, conv: Conv, user_id: str, removed_by: str) -> Event:
        state = self.state
        ev = op.allocate(conv, T.GROUP_MEMBER_REMOVED, removed_by, self.clock.now_us())
        member = conv.members.pop(user_id)
        old_role, old_left = member.role, member.left_seq
        member.left_seq = PENDING_SEQ if self.eventlog.clustered else ev.seq
        member.role = "member"
        conv.former[user_id] = member
        conv.membership_changed()
        convs = state.user_convs.get(user_id)
        if convs is not None:
            convs.discard(conv.conversation_id)
        state.user_former.setdefault(user_id, set()).add(conv.conversation_id)
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
        conv_id = conv.conversation_id
        op.txns.append(lambda c: sql.mark_member_left_txn(c, conv_id, user_id, ev.seq))

        def undo() -> None:
            conv.former.pop(user_id, None)
            state.user_former.get(user_id, set()).discard(conv_id)
            member.left_seq, member.role = old_left, old_role
            # restore join order: rebuild with the member at its joined_seq position
            items = sorted([*conv.members.values(), member], key=lambda m: m.joined_seq)
            conv.members.clear()
            conv.members.update((m.user_id, m) for m in items)
            conv.membership_changed()
            state.user_convs.setdefault(user_id, set()).add(conv_id)

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
        s: Session,
        rid: str,
        op: Op,
        events: list[Event],
        contacts_before: dict[str, set[str]] | None = None,
    ) -> None:
        def finish() -> None:
            self._published(events)
            if contacts_before:
                self.introduce(contacts_before)
            if rid:
                self.outbox.send(s, T.ACK, rid, pb.Ack(count=1))

        self.delivery.submit(s, rid, op, finish, "could not store the change")

    def _admin_conv(self, s: Session, conv_id: str, what: str) -> Conv:
        conv = self.state.conv_for_member(conv_id, s.user_id)
        if conv.members[s.user_id].role != "admin":
            raise SovereignError(ErrorCode.NOT_GROUP_ADMIN, f"only a group admin can {what}")
        return conv

    async def invite(self, s: Session, rid: str, req: pb.GroupInvite) -> None:
        self._admin_conv(s, req.conversation_id, "invite")
        if await self.state.profile(req.user_id) is None:
            raise SovereignError(ErrorCode.USER_NOT_FOUND, "unknown user")
        conv = self._admin_conv(s, req.conversation_id, "invite")  # re-check after await
        if req.user_id in conv.members:
            raise SovereignError(ErrorCode.ALREADY_MEMBER, "already a member")
        if len(conv.members) >= self.config.max_group_members:
            raise SovereignError(ErrorCode.GROUP_FULL, "the group is full")
        self._check_room(req.user_id, "the user is in too many conversations")
        op = Op()
        before = {u: self.state.contacts(u) for u in (*conv.recipients, req.user_id)}
        joins: list[tuple[str, str, Event]] = []
        ev = self._add_member(op, conv, req.user_id, s.user_id, "member", joins)
        self._store_joins(op, conv.conversation_id, joins)
        self._guard(s, rid, op, conv.conversation_id, req.user_id, want_member=False)
        self._membership_op(s, rid, op, [ev], before)

    def remove(self, s: Session, rid: str, req: pb.GroupRemove) -> None:
        conv = self._admin_conv(s, req.conversation_id, "remove")
        if req.user_id == s.user_id:
            raise SovereignError(ErrorCode.CANNOT_REMOVE_SELF, "use GROUP_LEAVE to leave")
        if req.user_id not in conv.members:
            raise SovereignError(ErrorCode.NOT_MEMBER, "not a member")
        op = Op()
        ev = self._remove_member(op, conv, req.user_id, s.user_id)
        self._guard(s, rid, op, conv.conversation_id, req.user_id, want_member=True)
        self._membership_op(s, rid, op, [ev])

    def leave(self, s: Session, rid: str, req: pb.GroupLeave) -> None:
        conv = self.state.conv_for_member(req.conversation_id, s.user_id)
        op = Op()
        ev = self._remove_member(op, conv, s.user_id, s.user_id)
        self._promote_if_no_admin(op, conv)
        self._guard(s, rid, op, conv.conversation_id, s.user_id, want_member=True)
        self._membership_op(s, rid, op, [ev])

    def _guard(
        self, s: Session, rid: str, op: Op, conv_id: str, user_id: str, *, want_member: bool
    ) -> None:
        """Cluster mode: membership as the database has it decides (another node may
        have changed it since this node's memory); memory only fast-failed."""
        if not self.eventlog.clustered:
            return

        def guard(c: Conn) -> object:
            member, _role = csql.member_state_txn(c, conv_id, user_id)
            if member == want_member:
                return None
            return ErrorCode.NOT_MEMBER if want_member else ErrorCode.ALREADY_MEMBER

        def conflict(code: object) -> None:
            assert isinstance(code, ErrorCode)
            text = "not a member" if code == ErrorCode.NOT_MEMBER else "already a member"
            self.outbox.send_error(s, code, rid, text)

        op.guard, op.conflict = guard, conflict

    async def remove_user_everywhere(self, user_id: str) -> None:
        """Admin deletion: remove the user from every group (members get REMOVED)."""
        state = self.state
        for conv_id in list(state.user_convs.get(user_id, ())):
            conv = state.convs[conv_id]
            if user_id not in conv.members:
                continue
            op = Op()
            ev = self._remove_member(op, conv, user_id, user_id)
            self._promote_if_no_admin(op, conv)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def finish(ev: Event = ev, done: asyncio.Future[None] = done) -> None:
                self._published([ev])
                done.set_result(None)

            op.finish = finish
            op.fail = done.set_exception
            self.eventlog.submit(op)
            await done

    async def list_conversations(self, s: Session, rid: str) -> None:
        state = self.state
        out = []
        for conv_id in sorted(state.user_convs.get(s.user_id, ())):
            conv = state.convs[conv_id]
            out.append(
                pb.Conversation(
                    conversation_id=conv_id,
                    title=conv.title,
                    members=await state.group_members(conv),
                    last_seq=conv.committed_seq,
                    mls_epoch=conv.epoch,
                )
            )
        self.outbox.send(s, T.CONVERSATION_LIST, rid, pb.ConversationList(conversations=out))
