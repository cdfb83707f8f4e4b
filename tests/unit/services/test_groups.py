"""Groups (SPEC §6, §12.2): create, invite, remove, leave; membership events to the
right recipients; limits; admin promotion; a failed change undone in memory."""

from __future__ import annotations

from sovereign.errors import ErrorCode
from sovereign.protocol.types import MessageType as T
from sovereign.services.session import Session
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.fakes import Sent
from tests.helpers.services import Harness, HarnessWith, World, build_world

MEMBERSHIP = (T.GROUP_MEMBER_ADDED, T.GROUP_MEMBER_REMOVED)


def membership(frames: list[Sent]) -> list[tuple[T, str, int]]:
    """(type, user_id, seq) of the membership events among ``frames``."""
    return [(f.type, f.msg.user_id, f.msg.seq) for f in frames if f.type in MEMBERSHIP]


async def invite_call(h: Harness, s: Session, conv_id: str, user_id: str) -> Sent:
    return await h.call(s, T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv_id, user_id=user_id))


async def remove_call(h: Harness, s: Session, conv_id: str, user_id: str) -> Sent:
    return await h.call(s, T.GROUP_REMOVE, pb.GroupRemove(conversation_id=conv_id, user_id=user_id))


async def roles(h: Harness, s: Session, conv_id: str) -> dict[str, str]:
    listed = await h.call(s, T.CONVERSATION_LIST_REQUEST, pb.ConversationListRequest())
    [conv] = [c for c in listed.msg.conversations if c.conversation_id == conv_id]
    return {m.user_id: m.role for m in conv.members}


async def test_create_answers_group_created_and_adds_every_member_in_order(h: Harness) -> None:
    alice, bob, carol = [await h.register(n) for n in ("alice", "bob", "carol")]
    a2_login = await h.another_device(alice)
    a1, a2, b1, c1 = [await h.connect(who) for who in (alice, a2_login, bob, carol)]
    for s in (a1, a2, b1, c1):
        h.outbox.take(s)  # their (empty) syncs
    req = pb.GroupCreate(title="trip", member_ids=[carol.user_id, bob.user_id, alice.user_id])
    h.request(a1, T.GROUP_CREATE, req, "create")
    await h.settle()
    frames = h.outbox.take(a1)
    created = frames[0]
    assert (created.type, created.request_id) == (T.GROUP_CREATED, "create")
    conv_id = created.msg.conversation_id
    assert created.msg.title == "trip"
    assert [(m.user_id, m.username, m.role) for m in created.msg.members] == [
        (alice.user_id, "alice", "admin"),  # the creator, always, as admin
        (carol.user_id, "carol", "member"),  # then member_ids in order
        (bob.user_id, "bob", "member"),
    ]
    # §12.2: one ADDED per member, creator first, seqs 1..3, added_by the creator; the
    # requesting connection gets them too.
    everyone = [
        (T.GROUP_MEMBER_ADDED, alice.user_id, 1),
        (T.GROUP_MEMBER_ADDED, carol.user_id, 2),
        (T.GROUP_MEMBER_ADDED, bob.user_id, 3),
    ]
    assert membership(frames) == everyone
    assert {f.msg.added_by for f in frames[1:] if f.type in MEMBERSHIP} == {alice.user_id}
    assert membership(h.outbox.take(a2)) == everyone
    # Each member sees events from its own GROUP_MEMBER_ADDED on (§12.13).
    assert membership(h.outbox.take(c1)) == everyone[1:]
    assert membership(h.outbox.take(b1)) == everyone[2:]
    assert h.conv(conv_id).committed_seq == 3


async def test_create_refusals_leave_nothing_behind(harness_with: HarnessWith) -> None:
    async with harness_with(max_group_members=2, max_groups_per_user=1) as h:
        w = await build_world(h)  # alice and bob are already in one conversation each
        before = set(h.state.convs)
        refusals = [
            (w.c1, ["no-such-user"], ErrorCode.USER_NOT_FOUND),
            (w.c1, [w.alice.user_id, w.bob.user_id], ErrorCode.GROUP_FULL),  # 3 > 2 members
            (w.a1, [], ErrorCode.GROUP_FULL),  # alice: over max_groups_per_user
            (w.c1, [w.bob.user_id], ErrorCode.GROUP_FULL),  # so is bob
        ]
        for s, members, code in refusals:
            err = await h.call(s, T.GROUP_CREATE, pb.GroupCreate(member_ids=members))
            assert (err.type, err.msg.code, err.msg.fatal) == (T.ERROR, code, False)
        assert set(h.state.convs) == before
        assert [f.type for f in h.outbox.take(w.c1)] == [T.ERROR] * 3
        assert [f.type for f in h.outbox.take(w.a1)] == [T.ERROR]
        assert h.outbox.take(w.b1) == []


async def test_invite_is_for_admins_and_adds_the_user_from_its_own_event_on(
    harness_with: HarnessWith,
) -> None:
    async with harness_with(max_group_members=3) as h:
        w = await build_world(h)
        dave = await h.register("dave")
        d1 = await h.connect(dave)
        for user_id, s, code in (
            (w.carol.user_id, w.b1, ErrorCode.NOT_GROUP_ADMIN),
            (w.bob.user_id, w.a1, ErrorCode.ALREADY_MEMBER),
            ("no-such-user", w.a1, ErrorCode.USER_NOT_FOUND),
        ):
            err = await invite_call(h, s, w.conv, user_id)
            assert (err.type, err.msg.code) == (T.ERROR, code)
        for s in (w.a1, w.b1, w.c1):
            h.outbox.take(s)
        ack = await invite_call(h, w.a1, w.conv, w.carol.user_id)
        assert (ack.type, ack.msg.count) == (T.ACK, 1)
        added = [(T.GROUP_MEMBER_ADDED, w.carol.user_id, 3)]
        for s in (w.a1, w.b1, w.c1):  # the requester, the members, the new member
            assert membership(h.outbox.take(s)) == added
        err = await invite_call(h, w.a1, w.conv, dave.user_id)  # 3 members: full
        assert err.msg.code == ErrorCode.GROUP_FULL
        assert membership(h.outbox.take(d1)) == []


async def test_remove_is_for_admins_and_the_removed_user_gets_its_removal_then_nothing(
    h: Harness, world: World
) -> None:
    w = world
    for s, user_id, code in (
        (w.b1, w.alice.user_id, ErrorCode.NOT_GROUP_ADMIN),
        (w.a1, w.alice.user_id, ErrorCode.CANNOT_REMOVE_SELF),
        (w.a1, w.carol.user_id, ErrorCode.NOT_MEMBER),
    ):
        err = await remove_call(h, s, w.conv, user_id)
        assert (err.type, err.msg.code) == (T.ERROR, code)
    for s in (w.a1, w.b1):
        h.outbox.take(s)
    ack = await remove_call(h, w.a1, w.conv, w.bob.user_id)
    assert (ack.type, ack.msg.count) == (T.ACK, 1)
    removed = [(T.GROUP_MEMBER_REMOVED, w.bob.user_id, 3)]
    assert membership(h.outbox.take(w.a1)) == removed
    [gone] = h.outbox.take(w.b1)
    assert (gone.type, gone.msg.user_id, gone.msg.removed_by) == (
        T.GROUP_MEMBER_REMOVED,
        w.bob.user_id,
        w.alice.user_id,
    )
    await h.send(w.a1, w.conv)  # seq 4
    assert h.outbox.take(w.b1) == []  # nothing more from that conversation
    err = await h.call(w.b1, T.MESSAGE_SEND, pb.MessageSend(conversation_id=w.conv))
    assert err.msg.code == ErrorCode.NOT_GROUP_MEMBER
    # Offline sync agrees: up to and including its removal (never acked), then nothing.
    h.disconnect(w.b1)
    b1 = await h.connect(w.bob)
    frames = h.outbox.take(b1)
    assert membership(frames) == [(T.GROUP_MEMBER_ADDED, w.bob.user_id, 2), *removed]
    assert [f.type for f in frames[2:]] == [T.SYNC_COMPLETE]  # no seq 4, no presence


async def test_the_last_admin_leaving_promotes_the_longest_standing_member(
    h: Harness,
) -> None:
    alice, bob, carol = [await h.register(n) for n in ("alice", "bob", "carol")]
    a1, b1, c1 = [await h.connect(who) for who in (alice, bob, carol)]
    conv = await h.create_group(a1, bob, carol)  # bob joins at seq 2, carol at 3
    await remove_call(h, a1, conv, bob.user_id)
    await invite_call(h, a1, conv, bob.user_id)  # bob's membership now starts at seq 5
    for s in (a1, b1, c1):
        h.outbox.take(s)
    ack = await h.call(a1, T.GROUP_LEAVE, pb.GroupLeave(conversation_id=conv))
    assert (ack.type, ack.msg.count) == (T.ACK, 1)
    left = [(T.GROUP_MEMBER_REMOVED, alice.user_id, 6)]
    for s in (a1, b1, c1):  # the leaver gets its own removal too
        assert membership(h.outbox.take(s)) == left
    # Longest-standing = earliest current membership: carol, not bob (SPEC §6, §12.2).
    assert await roles(h, c1, conv) == {carol.user_id: "admin", bob.user_id: "member"}
    assert (await invite_call(h, c1, conv, alice.user_id)).type == T.ACK
    assert (await remove_call(h, b1, conv, alice.user_id)).msg.code == ErrorCode.NOT_GROUP_ADMIN


async def test_a_failed_membership_change_is_undone_in_memory(h: Harness, world: World) -> None:
    w = world
    conv = h.conv(w.conv)
    await h.refuse_events()
    err = await invite_call(h, w.a1, w.conv, w.carol.user_id)
    assert (err.type, err.msg.code) == (T.ERROR, ErrorCode.DATABASE_ERROR)
    err = await h.call(w.a1, T.GROUP_LEAVE, pb.GroupLeave(conversation_id=w.conv))
    assert (err.type, err.msg.code) == (T.ERROR, ErrorCode.DATABASE_ERROR)
    # Nobody joined or left, nobody was promoted, no seq was spent.
    assert [(m.user_id, m.role) for m in conv.members.values()] == [
        (w.alice.user_id, "admin"),
        (w.bob.user_id, "member"),
    ]
    assert conv.former == {} and (conv.last_seq, conv.committed_seq) == (2, 2)
    assert w.conv not in h.state.user_convs.get(w.carol.user_id, set())
    assert w.conv in h.state.user_convs[w.alice.user_id]
    assert h.outbox.take(w.b1) == h.outbox.take(w.c1) == []
    await h.refuse_events(False)
    assert (await invite_call(h, w.a1, w.conv, w.carol.user_id)).type == T.ACK
    assert membership(h.outbox.take(w.c1)) == [(T.GROUP_MEMBER_ADDED, w.carol.user_id, 3)]
