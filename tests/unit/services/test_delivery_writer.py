"""The cursor writer's own write (no riding: the harness default). Acks read in one loop
iteration share one write; a write is a chain of callbacks, not a task; a failed write
answers its ackers 9002 and leaves the writer free for the next. Real services and SQLite.
"""

from __future__ import annotations

import asyncio

from sovereign.errors import ErrorCode
from sovereign.protocol.types import MessageType as T
from sovereign.services.session import Session
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.fakes import Sent
from tests.helpers.services import Harness, World
from tests.unit.services.test_delivery_acks import refuse_cursor_writes, stored_cursor


def ack_request(h: Harness, s: Session, message_id: str) -> str:
    rid = h.rid()
    h.request(s, T.MESSAGE_ACK, pb.MessageAck(message_ids=[message_id]), rid)
    return rid


async def answered(h: Harness, s: Session, rid: str, timeout: float = 5.0) -> Sent:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = [f for f in h.outbox.frames(s) if f.request_id == rid]
        if found:
            assert len(found) == 1, found
            return found[0]
        assert loop.time() < deadline, "the ack was never answered"
        await asyncio.sleep(0.005)


async def two_messages(h: Harness, w: World) -> tuple[pb.MessageReceive, pb.MessageReceive, int]:
    """alice sends two messages to bob; everything settles. Returns them and the
    count of committed writes so far."""
    m1 = await h.send(w.a1, w.conv)
    m2 = await h.send(w.a1, w.conv)
    await h.settle()
    return m1, m2, h.db.stats().writes_committed


async def settled_after(h: Harness, w: World, writes: int, n: int, seq: int) -> None:
    """``n`` writes committed since ``writes``, the writer is free, and bob's cursor
    is stored at ``seq``."""
    assert h.db.stats().writes_committed - writes == n
    assert not h.delivery.writer.busy
    assert await stored_cursor(h, w.bob.device_id, w.conv) == seq


async def test_acks_read_in_one_iteration_share_one_write_and_no_task(
    h: Harness, world: World
) -> None:
    w = world
    m1, m2, writes = await two_messages(h, w)
    writer = h.delivery.writer
    # Two acks in one iteration, as two frames of one read: each moves bob's cursor.
    first = ack_request(h, w.b1, m1.message_id)
    second = ack_request(h, w.b1, m2.message_id)
    assert writer.busy
    assert not h.tasks.pending  # the write is callbacks on the loop, no task to await
    for rid in (first, second):
        ack = await answered(h, w.b1, rid)
        assert (ack.type, ack.msg.count) == (T.ACK, 1)
    await settled_after(h, w, writes, 1, m2.seq)


async def test_an_ack_recorded_while_a_write_commits_goes_in_the_next_one(
    h: Harness, world: World
) -> None:
    w = world
    m1, m2, writes = await two_messages(h, w)
    writer = h.delivery.writer
    first = ack_request(h, w.b1, m1.message_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while writer.positions:  # the first write has taken what was recorded
        assert loop.time() < deadline
        await asyncio.sleep(0)
    second = ack_request(h, w.b1, m2.message_id)
    assert (await answered(h, w.b1, first)).msg.count == 1
    assert (await answered(h, w.b1, second)).msg.count == 1
    await settled_after(h, w, writes, 2, m2.seq)


async def test_a_failed_write_answers_the_acker_9002_and_the_next_ack_is_stored(
    h: Harness, world: World
) -> None:
    w = world
    m1 = await h.send(w.a1, w.conv)
    await refuse_cursor_writes(h)
    before = await stored_cursor(h, w.bob.device_id, w.conv)
    ack = await answered(h, w.b1, ack_request(h, w.b1, m1.message_id))
    assert (ack.type, ack.msg.code) == (T.ERROR, ErrorCode.DATABASE_ERROR)
    assert await stored_cursor(h, w.bob.device_id, w.conv) == before
    assert not h.delivery.writer.busy
    await refuse_cursor_writes(h, False)
    m2 = await h.send(w.a1, w.conv)
    ack = await answered(h, w.b1, ack_request(h, w.b1, m2.message_id))
    assert (ack.type, ack.msg.count) == (T.ACK, 1)
    assert await stored_cursor(h, w.bob.device_id, w.conv) == m2.seq
