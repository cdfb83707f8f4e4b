"""MESSAGE_ACK and MESSAGE_DELIVERED (SPEC §5, §12.14, §12.22): cumulative cursors,
ignored ids, Ack.count, and one MESSAGE_DELIVERED per sender per recipient user."""

from __future__ import annotations

from typing import Any

import pytest

from sovereign.protocol.types import MessageType as T
from sovereign.services import state as state_mod
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.services import Harness, World


async def stored_cursor(h: Harness, device_id: str, conv_id: str) -> int | None:
    row = await h.db.read(
        lambda c: c.execute(
            "SELECT acked_seq FROM cursors WHERE device_id = ? AND conversation_id = ?",
            (device_id, conv_id),
        ).fetchone()
    )
    return None if row is None else int(row[0])


async def refuse_cursor_writes(h: Harness, refuse: bool = True) -> None:
    """Every cursor write fails in SQLite (a trigger) until called with False."""
    if refuse:
        sql = (
            "CREATE TRIGGER refuse_cursors BEFORE INSERT ON cursors"
            " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    else:
        sql = "DROP TRIGGER refuse_cursors"
    await h.db.write(lambda c: c.execute(sql))


async def test_ack_is_cumulative_and_answers_how_many_ids_moved_the_cursor(
    h: Harness, world: World
) -> None:
    w = world
    m = [await h.send(w.a1, w.conv) for _ in range(4)]  # seqs 3..6
    h.outbox.take(w.b1)
    ack = await h.ack(w.b1, m[0].message_id, m[2].message_id)
    assert (ack.type, ack.msg.count) == (T.ACK, 2)
    # The response follows the cursor write (it is in storage when the Ack is out).
    assert await stored_cursor(h, w.bob.device_id, w.conv) == 5
    # m[1] is below the cursor already: acknowledged by m[2] (SPEC §5 cumulative).
    assert (await h.ack(w.b1, m[1].message_id)).msg.count == 0
    assert (await h.ack(w.b1, m[1].message_id, m[3].message_id)).msg.count == 1
    assert await stored_cursor(h, w.bob.device_id, w.conv) == 6
    # Acking again never moves a cursor back.
    assert (await h.ack(w.b1, m[0].message_id)).msg.count == 0
    assert await stored_cursor(h, w.bob.device_id, w.conv) == 6


async def test_ids_the_user_may_not_see_are_ignored(h: Harness, world: World) -> None:
    w = world
    m = await h.send(w.a1, w.conv)
    # carol never belonged to the conversation; "nope" is no event at all (§12.14).
    ack = await h.ack(w.c1, m.message_id, "nope")
    assert (ack.type, ack.msg.count) == (T.ACK, 0)
    assert await stored_cursor(h, w.carol.device_id, w.conv) is None
    assert [f.type for f in h.outbox.take(w.a1)] == [T.MESSAGE_RECEIVE]  # no DELIVERED


async def test_a_removed_member_acks_up_to_its_removal_and_then_its_cursor_is_dropped(
    h: Harness, world: World
) -> None:
    w = world
    await h.call(
        w.a1, T.GROUP_REMOVE, pb.GroupRemove(conversation_id=w.conv, user_id=w.bob.user_id)
    )
    [removed] = h.outbox.take(w.b1)
    assert removed.type == T.GROUP_MEMBER_REMOVED and removed.msg.seq == 3
    after = await h.send(w.a1, w.conv)  # seq 4: bob may not see it
    assert (await h.ack(w.b1, after.message_id)).msg.count == 0
    assert (await h.ack(w.b1, removed.msg.event_id)).msg.count == 1
    assert await stored_cursor(h, w.bob.device_id, w.conv) is None  # dropped
    h.disconnect(w.b1)
    b1 = await h.connect(w.bob)
    [done] = h.outbox.take(b1)  # nothing more from that conversation, ever
    assert (done.type, done.msg.delivered) == (T.SYNC_COMPLETE, 0)


async def test_delivered_goes_to_each_sender_once_per_recipient_user(h: Harness) -> None:
    alice, bob, carol = [await h.register(n) for n in ("alice", "bob", "carol")]
    a1, a2, b1, b2, c1 = [
        await h.connect(who)
        for who in (alice, await h.another_device(alice), bob, await h.another_device(bob), carol)
    ]
    conv = await h.create_group(a1, bob, carol)  # ADDED seqs 1..3
    await h.send(a1, conv)
    m2 = await h.send(a1, conv)
    m3 = await h.send(c1, conv)  # seqs 4, 5, 6
    for s in (a1, a2, b1, b2, c1):
        h.outbox.take(s)

    # bob's first device passes all three: each sender hears of its last message passed.
    ack = await h.ack(b1, m3.message_id)
    assert (ack.type, ack.msg.count) == (T.ACK, 1)
    for s in (a1, a2):  # every connection of the sender
        [d] = h.outbox.take(s)
        assert (d.type, d.request_id, d.msg) == (
            T.MESSAGE_DELIVERED,
            "",
            pb.MessageDelivered(
                message_id=m2.message_id,
                delivered_to=bob.user_id,
                conversation_id=conv,
                up_to_seq=6,
            ),
        )
    [d] = h.outbox.take(c1)
    assert (d.msg.message_id, d.msg.delivered_to, d.msg.up_to_seq) == (
        m3.message_id,
        bob.user_id,
        6,
    )
    assert h.outbox.take(b1) == [ack] and h.outbox.take(b2) == []

    # bob's other device moves its own cursor, but bob's delivered position has passed.
    assert (await h.ack(b2, m3.message_id)).msg.count == 1
    assert [f.type for f in h.outbox.take(b2)] == [T.ACK]
    for s in (a1, a2, c1):
        assert h.outbox.take(s) == []

    # alice's device passes carol's message (and her own, which owe nobody anything).
    await h.ack(a2, m3.message_id)
    [d] = h.outbox.take(c1)
    assert (d.msg.message_id, d.msg.delivered_to, d.msg.up_to_seq) == (
        m3.message_id,
        alice.user_id,
        6,
    )
    assert h.outbox.take(a1) == [] and h.outbox.take(b1) == [] and h.outbox.take(b2) == []


async def test_delivered_names_the_new_position_when_a_recipient_acks_in_steps(
    h: Harness, world: World
) -> None:
    w = world
    m1 = await h.send(w.a1, w.conv)
    m2 = await h.send(w.a1, w.conv)
    h.outbox.take(w.a1)
    await h.ack(w.b1, m1.message_id)
    await h.ack(w.b1, m2.message_id)
    assert [(f.msg.message_id, f.msg.up_to_seq) for f in h.outbox.take(w.a1)] == [
        (m1.message_id, 3),
        (m2.message_id, 4),
    ]
    await h.ack(w.b1, m1.message_id, m2.message_id)  # nothing new passed: no DELIVERED
    assert h.outbox.take(w.a1) == []


async def test_ack_of_an_event_the_bounded_index_let_go_is_resolved_from_storage(
    h: Harness, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recent-event index keeps the newest EVENT_INDEX_MAX ids; an ack naming an
    older one is resolved in one storage read and moves the cursor all the same."""
    monkeypatch.setattr(state_mod, "EVENT_INDEX_MAX", 3)
    w = world
    m = [await h.send(w.a1, w.conv) for _ in range(5)]  # seqs 3..7
    index = h.state.event_index
    assert list(index) == [x.message_id for x in m[2:]]  # the oldest went first
    reads = 0
    real = h.db.read

    async def read(fn: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real(fn)

    h.db.read = read  # type: ignore[method-assign]
    ack = await h.ack(w.b1, m[0].message_id, m[1].message_id)
    assert (ack.type, ack.msg.count) == (T.ACK, 2)
    assert reads == 1  # both unknown ids in one query (the delivered position is known)
    assert await stored_cursor(h, w.bob.device_id, w.conv) == 4
    assert len(index) == 3  # what the slow path looked up went in, bounded still
    before = reads
    ack = await h.ack(w.b1, m[4].message_id)  # the newest: from memory, no read
    assert (ack.msg.count, reads) == (1, before)
    assert await stored_cursor(h, w.bob.device_id, w.conv) == 7


@pytest.mark.parametrize("count", [0, 1, 127, 128, 1000])
def test_ack_payloads_are_protobufs(count: int) -> None:
    from sovereign.services.delivery import _ack_payload

    assert _ack_payload(count) == pb.Ack(count=count).SerializeToString()
