"""Cursor writes that ride with the next event batch (DeliveryWriter, EventLog.ride):
in a stream of sends an ack's write is queued to storage just before the next event
batch, so the writer thread takes both in one wake-up and commits them in one
transaction; with no batch coming, a timer sends it alone. Real services and SQLite.

The harness builds the services as tests do (no gathering, no riding); each test here
turns riding on, with a stream window long enough that the test's own pace is a stream.
"""

from __future__ import annotations

import asyncio

from sovereign.errors import ErrorCode
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.fakes import Sent
from tests.helpers.services import Harness, World
from tests.unit.services.test_delivery_acks import refuse_cursor_writes, stored_cursor


def ride(h: Harness, ride_s: float) -> None:
    h.eventlog.stream_s = 60.0  # every batch of the test is "a moment ago"
    h.delivery.writer.ride_s = ride_s


def ack_request(h: Harness, world: World, message_id: str) -> str:
    rid = h.rid()
    h.request(world.b1, T.MESSAGE_ACK, pb.MessageAck(message_ids=[message_id]), rid)
    return rid


def responses(h: Harness, world: World, rid: str) -> list[Sent]:
    return [f for f in h.outbox.frames(world.b1) if f.request_id == rid]


async def answered(h: Harness, world: World, rid: str, timeout: float = 5.0) -> Sent:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not responses(h, world, rid):
        assert loop.time() < deadline, "the ack was never answered"
        await asyncio.sleep(0.005)
    found = responses(h, world, rid)
    assert len(found) == 1, found
    return found[0]


async def test_an_ack_in_a_stream_commits_with_the_next_event_batch(
    h: Harness, world: World
) -> None:
    w = world
    ride(h, 30.0)  # only the next event batch can start the write within the test
    m1 = await h.send(w.a1, w.conv)
    before = await stored_cursor(h, w.bob.device_id, w.conv)
    assert before is not None and before < m1.seq
    rid = ack_request(h, w, m1.message_id)
    await asyncio.sleep(0.05)
    # Waiting for the batch: nothing written, nothing answered yet.
    assert responses(h, w, rid) == []
    assert await stored_cursor(h, w.bob.device_id, w.conv) == before
    batches = h.db.stats().batches_committed
    writes = h.db.stats().writes_committed
    m2 = await h.send(w.a1, w.conv)
    ack = await answered(h, w, rid)
    assert (ack.type, ack.msg.count) == (T.ACK, 1)
    # The event and the cursor write: two writes, one writer batch, one COMMIT.
    assert h.db.stats().writes_committed - writes == 2
    assert h.db.stats().batches_committed - batches == 1
    assert h.delivery.writer.rides == 1
    assert await stored_cursor(h, w.bob.device_id, w.conv) == m1.seq
    assert [f.msg.message_id for f in h.outbox.take(w.b1) if f.type == T.MESSAGE_RECEIVE] == [
        m1.message_id,
        m2.message_id,
    ]
    delivered = [f for f in h.outbox.take(w.a1) if f.type == T.MESSAGE_DELIVERED]
    assert [d.msg.message_id for d in delivered] == [m1.message_id]


async def test_with_no_event_batch_the_timer_writes_it_alone(h: Harness, world: World) -> None:
    w = world
    ride(h, 0.05)
    m1 = await h.send(w.a1, w.conv)
    batches = h.db.stats().batches_committed
    rid = ack_request(h, w, m1.message_id)
    ack = await answered(h, w, rid)
    assert (ack.type, ack.msg.count) == (T.ACK, 1)
    assert h.db.stats().batches_committed - batches == 1
    assert h.delivery.writer.rides == 1
    assert await stored_cursor(h, w.bob.device_id, w.conv) == m1.seq
    # The writer is free again: the next ack goes the same way.
    m2 = await h.send(w.a1, w.conv)
    ack = await answered(h, w, ack_request(h, w, m2.message_id))
    assert (ack.type, ack.msg.count) == (T.ACK, 1)
    assert await stored_cursor(h, w.bob.device_id, w.conv) == m2.seq


async def test_acks_recorded_while_a_ride_commits_go_in_the_next_write(
    h: Harness, world: World
) -> None:
    w = world
    ride(h, 0.05)
    m = [await h.send(w.a1, w.conv) for _ in range(3)]
    first = ack_request(h, w, m[0].message_id)
    await h.send(w.a1, w.conv)  # the batch that takes the first ack's write with it
    # Recorded while nothing is pending, then while that write may still commit.
    second = ack_request(h, w, m[1].message_id)
    third = ack_request(h, w, m[2].message_id)
    for rid in (first, second, third):
        ack = await answered(h, w, rid)
        assert (ack.type, ack.msg.count) == (T.ACK, 1)
    assert await stored_cursor(h, w.bob.device_id, w.conv) == m[2].seq


async def test_a_failed_ride_answers_the_acker_9002_and_leaves_the_events_alone(
    h: Harness, world: World
) -> None:
    w = world
    ride(h, 30.0)
    m1 = await h.send(w.a1, w.conv)
    await refuse_cursor_writes(h)
    before = await stored_cursor(h, w.bob.device_id, w.conv)
    rid = ack_request(h, w, m1.message_id)
    m2 = await h.send(w.a1, w.conv)  # commits; the cursor write with it fails alone
    ack = await answered(h, w, rid)
    assert (ack.type, ack.msg.code) == (T.ERROR, ErrorCode.DATABASE_ERROR)
    assert (await h.stored_seqs(w.conv))[-2:] == [m1.seq, m2.seq]
    assert await stored_cursor(h, w.bob.device_id, w.conv) == before
    await refuse_cursor_writes(h, False)
    # The writer carries on: the retried ack is stored.
    h.delivery.writer.ride_s = 0.05
    ack = await answered(h, w, ack_request(h, w, m2.message_id))
    assert (ack.type, ack.msg.count) == (T.ACK, 1)
    assert await stored_cursor(h, w.bob.device_id, w.conv) == m2.seq


async def test_a_flush_sends_a_pending_ride_at_once(h: Harness, world: World) -> None:
    w = world
    ride(h, 30.0)  # shutdown and the slow DELIVERED path flush: they never wait for it
    m1 = await h.send(w.a1, w.conv)
    rid = ack_request(h, w, m1.message_id)
    await asyncio.wait_for(h.delivery.writer.flush(), 5.0)
    assert await stored_cursor(h, w.bob.device_id, w.conv) == m1.seq
    assert responses(h, w, rid)[0].msg.count == 1


async def test_no_riding_without_a_recent_batch(h: Harness, world: World) -> None:
    w = world
    h.delivery.writer.ride_s = 30.0
    h.eventlog.stream_s = 0.0  # no batch is ever "recent": the write goes at once
    m1 = await h.send(w.a1, w.conv)
    ack = await h.ack(w.b1, m1.message_id)
    assert (ack.type, ack.msg.count) == (T.ACK, 1)
    assert h.delivery.writer.rides == 0
    assert await stored_cursor(h, w.bob.device_id, w.conv) == m1.seq


async def test_a_flush_while_a_ride_commits_does_not_wait_for_another_ride(
    h: Harness, world: World
) -> None:
    w = world
    ride(h, 30.0)
    m1 = await h.send(w.a1, w.conv)
    first = ack_request(h, w, m1.message_id)
    h.request(w.a1, T.MESSAGE_SEND, pb.MessageSend(conversation_id=w.conv, encrypted_payload=b"x"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while h.delivery.writer.rides == 0:  # the batch has taken the first ack's write
        assert loop.time() < deadline
        await asyncio.sleep(0)
    second = ack_request(h, w, m1.message_id)  # recorded while that write commits
    await asyncio.wait_for(h.delivery.writer.flush(), 5.0)
    assert (await answered(h, w, first)).msg.count == 1
    assert (await answered(h, w, second)).msg.count == 0
    assert await stored_cursor(h, w.bob.device_id, w.conv) == m1.seq


async def test_a_rider_that_fails_to_queue_costs_the_event_batch_nothing(
    h: Harness, world: World
) -> None:
    w = world
    h.eventlog.stream_s = 60.0
    await h.send(w.a1, w.conv)  # a batch: the stream is on

    def broken() -> None:
        raise RuntimeError("a rider's bug")

    assert h.eventlog.ride(broken)
    m = await h.send(w.a1, w.conv)  # answered with its echo, and stored
    assert (await h.stored_seqs(w.conv))[-1] == m.seq
