"""Delivery tracking (sovereign.client.delivery) without a server: a fake session and a
fake request table that answers history pages and records acks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from sovereign.client.delivery import Delivery
from sovereign.client.errors import ClientError
from sovereign.client.events import Event
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

CONV = "c1"


@dataclass(eq=False)
class FakeHost:
    connection: Any = field(default_factory=lambda: SimpleNamespace(ready=True))
    user_id: str = "me"
    closing: bool = False
    finished: bool = False
    terminal: ClientError | None = None

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(coro)

    def notify(self) -> None:
        pass


@dataclass(eq=False)
class FakeRequests:
    """The server's log of CONV, paged like MESSAGE_HISTORY_REQUEST; acks recorded."""

    log: dict[int, bytes] = field(default_factory=dict)
    history_requests: list[pb.HistoryRequest] = field(default_factory=list)
    acked: list[list[str]] = field(default_factory=list)

    async def call(self, msg_type: int, payload: bytes, **_: Any) -> tuple[int, bytes]:
        if msg_type == T.MESSAGE_ACK:
            self.acked.append(list(pb.MessageAck.FromString(payload).message_ids))
            return T.ACK, b""
        assert msg_type == T.MESSAGE_HISTORY_REQUEST
        req = pb.HistoryRequest.FromString(payload)
        self.history_requests.append(req)
        seqs = sorted(s for s in self.log if s > req.cursor_seq)[: req.limit]
        page = pb.HistoryResponse(
            events=[pb.Envelope(type=T.MESSAGE_RECEIVE, payload=self.log[s]) for s in seqs],
            next_cursor_seq=seqs[-1] if seqs else req.cursor_seq,
            has_more=bool(seqs) and seqs[-1] < max(self.log),
        )
        return T.MESSAGE_HISTORY_RESPONSE, page.SerializeToString()


def message(seq: int) -> bytes:
    return pb.MessageReceive(
        message_id=f"m{seq}", conversation_id=CONV, seq=seq, sender_id="bob"
    ).SerializeToString()


def make(requests: FakeRequests | None = None, **settings: Any) -> tuple[Delivery, FakeRequests]:
    values = {"auto_ack": True, "ack_interval": 0.001, "history_page_limit": 2, "max_backlog": 100}
    reqs = requests or FakeRequests()
    return Delivery(SimpleNamespace(**(values | settings)), FakeHost(), reqs, 1000), reqs


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events]


async def eventually(check: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.001)


async def test_duplicates_are_delivered_once_and_acked_again() -> None:
    delivery, requests = make()
    got: list[Event] = []
    delivery.add_callback(None, got.append)
    for seq in (1, 2, 1):
        delivery.receive(T.MESSAGE_RECEIVE, message(seq), "")
    # Cumulative per conversation: one id, the newest processed.
    await eventually(lambda: requests.acked == [["m2"]])
    delivery.receive(T.MESSAGE_RECEIVE, message(2), "")  # as if our ack had been lost
    await eventually(lambda: requests.acked == [["m2"], ["m2"]])
    assert seqs(got) == [1, 2]


async def test_a_gap_is_repaired_from_history_before_later_events() -> None:
    requests = FakeRequests(log={s: message(s) for s in range(1, 7)})
    delivery, _ = make(requests)
    got: list[Event] = []
    delivery.add_callback(None, got.append)
    delivery.receive(T.MESSAGE_RECEIVE, message(1), "")
    delivery.receive(T.MESSAGE_RECEIVE, message(5), "")  # 2..4 missing: repair starts
    delivery.receive(T.MESSAGE_RECEIVE, message(6), "")  # held until the repair is done
    sync = pb.SyncComplete(delivered=3).SerializeToString()
    delivery.receive(T.SYNC_COMPLETE, sync, "")  # waits for the repair too
    await eventually(lambda: len(got) == 7)
    # History is paged (2 per page) up to the newest held event; the held live copies
    # are then duplicates. Each event is delivered once, in order, SYNC_COMPLETE last.
    assert [(e.type, e.seq, e.replayed) for e in got] == [
        (T.MESSAGE_RECEIVE, 1, False),
        *((T.MESSAGE_RECEIVE, seq, True) for seq in range(2, 7)),
        (T.SYNC_COMPLETE, 0, False),
    ]
    assert [r.cursor_seq for r in requests.history_requests] == [1, 3, 5]
    assert delivery.last_sync is not None and delivery.last_seq(CONV) == 6


async def test_events_wait_in_the_backlog_and_are_acked_when_processed() -> None:
    delivery, requests = make()
    delivery.receive(T.MESSAGE_RECEIVE, message(1), "")
    delivery.receive(T.MESSAGE_RECEIVE, message(2), "")
    await asyncio.sleep(0.01)
    assert requests.acked == []  # nobody consumed them yet
    stream = delivery.open_stream(frozenset({T.MESSAGE_RECEIVE}))
    first = await stream.next_event()
    await asyncio.sleep(0.01)
    assert first.seq == 1 and requests.acked == []  # the application still holds it
    await stream.next_event()  # asking for the next one means done with the first
    await eventually(lambda: requests.acked == [["m1"]])
    delivery.drop_stream(stream)  # the current event counts as processed too
    await eventually(lambda: requests.acked == [["m1"], ["m2"]])


async def test_own_echo_moves_the_position_without_being_delivered() -> None:
    delivery, requests = make()
    got: list[Event] = []
    delivery.add_callback(None, got.append)
    delivery.response_received(T.MESSAGE_SEND, T.MESSAGE_RECEIVE, message(1), "r1")
    delivery.receive(T.MESSAGE_RECEIVE, message(2), "")  # no gap: 1 was ours
    await eventually(lambda: ["m2"] in requests.acked)
    assert seqs(got) == [2] and requests.history_requests == []
