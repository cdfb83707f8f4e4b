"""Messaging through the Python client SDK against the real server over loopback.

Nothing is scripted or mocked: every test starts the in-process server on real sockets
with real SQLite files, and every participant is a ``sovereign.client.Client`` doing real
WebAuthn ceremonies with the software authenticator. What is checked is what an
application built on the SDK observes (SPEC §4 READY, §5, §6, §12.1-§12.4, §12.11-§12.14):

* multi-device fan-out (echo to the sender, events to every other device);
* offline then online: the whole backlog, in seq order, then SYNC_COMPLETE; the SDK's
  automatic acks move the cursors so a later reconnect brings nothing;
* redelivery of unacknowledged events (manual acks), cumulative acks;
* idempotent retry by request_id, across devices of the same user;
* history paging both ways and visibility from one's own GROUP_MEMBER_ADDED;
* MESSAGE_DELIVERED, read receipts, typing, presence;
* every §6 error as ``SovereignClientError`` and admin succession;
* a server restart: the SDK resumes and carries on with no duplicate and no gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from sovereign.client import (
    Backoff,
    Client,
    ClientState,
    Event,
    MessageType,
    SoftwareAuthenticator,
    SovereignClientError,
)
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.server import ORIGIN, RunningServer, running_server

T = MessageType
ServerWith = Callable[..., AbstractAsyncContextManager[RunningServer]]
ClientFactory = Callable[..., Client]

TIMEOUT = 5.0


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """SDK clients with fast test defaults; every one is closed at the end."""
    made: list[Client] = []

    def make(url: str, **kw: Any) -> Client:
        kw.setdefault("authenticator", SoftwareAuthenticator())
        kw.setdefault("origin", ORIGIN)
        kw.setdefault("backoff", Backoff((0.05, 0.1), random=lambda: 1.0))
        kw.setdefault("request_timeout", TIMEOUT)
        c = Client(url, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


class Recorder:
    """Every event a client hands to the application, through a callback (so the SDK
    acknowledges each durable event as soon as it is recorded)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[Event] = []
        self._waiters: list[asyncio.Future[None]] = []
        client.on(None, self._add)

    def _add(self, event: Event) -> None:
        self.events.append(event)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def of(self, *types: MessageType) -> list[Event]:
        return [e for e in self.events if not types or e.type in types]

    def messages(self, conv: str | None = None) -> list[pb.MessageReceive]:
        return [
            e.message
            for e in self.of(T.MESSAGE_RECEIVE)
            if conv is None or e.conversation_id == conv
        ]

    async def until(self, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                await fut

    async def count(self, n: int, *types: MessageType, timeout: float = TIMEOUT) -> list[Event]:
        """Wait until at least ``n`` events of ``types`` were recorded; returns them."""
        await self.until(lambda: len(self.of(*types)) >= n, timeout)
        return self.of(*types)


async def barrier(*clients: Client) -> None:
    """A PING round trip on each client: whatever the server pushed to it before
    answering has been received (and recorded) once this returns."""
    for c in clients:
        await c.ping()
    await asyncio.sleep(0)  # let the callback runner record what arrived with the PONG


async def eventually(check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def users(make: ClientFactory, url: str, *names: str, **kw: Any) -> list[Client]:
    out = []
    for name in names:
        c = make(url, **kw)
        await c.register(name, display_name=name.title())
        await c.synced(timeout=TIMEOUT)
        out.append(c)
    return out


async def second_device(make: ClientFactory, first: Client, **kw: Any) -> Client:
    """Another device of ``first``'s user: a new passkey login (SPEC §4)."""
    c = make(first.url, authenticator=first.authenticator, **kw)
    await c.login(first.username)
    assert c.user_id == first.user_id and c.token != first.token
    await c.synced(timeout=TIMEOUT)
    return c


async def resumed(make: ClientFactory, url: str, token: str | None, **kw: Any) -> Client:
    """The same device again on a fresh Client (as after a process restart)."""
    assert token
    c = make(url, authenticator=None, **kw)
    await c.resume(token)
    return c


def seqs(events: Iterable[Event]) -> list[int]:
    return [e.seq for e in events]


async def expect_error(code: int, awaitable: Any) -> SovereignClientError:
    with pytest.raises(SovereignClientError) as err:
        await awaitable
    assert err.value.code == code, err.value
    assert not err.value.fatal
    return err.value


# -- multi-device delivery (SPEC §5 fan-out, §12.1-§12.3) ------------------------------


async def test_multi_device_delivery(
    server: RunningServer, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The SDK drops (and logs at DEBUG) an event it already has, so a copy of its own
    # message sent to the sending connection would be invisible to the app: watch the log.
    caplog.set_level(logging.DEBUG, logger="sovereign.client")
    a1, bob = await users(make_client, server.url, "alice", "bob")
    a2 = await second_device(make_client, a1)
    rec = {name: Recorder(c) for name, c in (("a1", a1), ("a2", a2), ("bob", bob))}

    group = await a1.create_group("family", [bob.user_id])
    conv = group.conversation_id
    assert [(m.user_id, m.role) for m in group.members] == [
        (a1.user_id, "admin"),
        (bob.user_id, "member"),
    ]
    # Membership events go to every device of every member, the requester's too; each
    # member sees the conversation from its own GROUP_MEMBER_ADDED on (§5, §12.2).
    expected = [(1, a1.user_id, a1.user_id), (2, bob.user_id, a1.user_id)]
    for name, first in (("a1", 0), ("a2", 0), ("bob", 1)):
        added = await rec[name].count(2 - first, T.GROUP_MEMBER_ADDED)
        assert [(e.seq, e.message.user_id, e.message.added_by) for e in added] == expected[first:]

    sent = await a1.send_message(conv, b"from a1")
    assert (sent.seq, sent.sender_id, sent.encrypted_payload) == (3, a1.user_id, b"from a1")
    assert sent.message_id and sent.server_timestamp > 0
    for name in ("a2", "bob"):  # the sender's other device and the other member
        (got,) = [e.message for e in await rec[name].count(1, T.MESSAGE_RECEIVE)]
        assert got == sent  # the very same stored message

    from_bob = await bob.send_message(conv, b"from bob", "text")
    from_a2 = await a2.send_message(conv, b"from a2")
    assert (from_bob.seq, from_a2.seq) == (4, 5)
    await rec["a1"].count(2, T.MESSAGE_RECEIVE)
    await rec["a2"].count(2, T.MESSAGE_RECEIVE)
    await rec["bob"].count(2, T.MESSAGE_RECEIVE)
    await barrier(a1, a2, bob)
    # Each sending connection got its echo as the return value only, never as an event.
    assert rec["a1"].messages() == [from_bob, from_a2]
    assert rec["a2"].messages() == [sent, from_bob]
    assert rec["bob"].messages() == [sent, from_a2]
    for r in rec.values():
        conv_events = [e for e in r.events if e.conversation_id == conv]
        assert seqs(conv_events) == sorted(seqs(conv_events))  # in seq order
        assert not any(e.replayed for e in r.events)  # no gap was seen anywhere
    assert not [r for r in caplog.records if r.getMessage().startswith("duplicate")]
    # Every device sees the same dense conversation.
    for c in (a1, a2, bob):
        assert c.last_seq(conv) == 5
    (listed,) = await bob.list_conversations()
    assert (listed.conversation_id, listed.title, listed.last_seq) == (conv, "family", 5)


# -- offline then online (SPEC §4 READY, §5 at-least-once) -----------------------------


async def test_offline_then_online_gets_everything_in_order_then_sync_complete(
    server: RunningServer, make_client: ClientFactory
) -> None:
    alice, bob, carol = await users(make_client, server.url, "alice", "bob", "carol")
    first = await alice.create_group("one", [bob.user_id])
    second = await alice.create_group("two", [bob.user_id])
    c1, c2 = first.conversation_id, second.conversation_id
    bob_rec = Recorder(bob)
    await bob_rec.count(2, T.GROUP_MEMBER_ADDED)
    await bob.close()  # flushes the automatic acks of its two GROUP_MEMBER_ADDED
    assert bob.state is ClientState.CLOSED

    # While bob is away: messages in both conversations, interleaved, and a new member.
    sent: dict[str, list[pb.MessageReceive]] = {c1: [], c2: []}
    for i in range(12):
        conv = c1 if i % 3 else c2
        sent[conv].append(await alice.send_message(conv, f"m{i}".encode()))
    await alice.invite(c1, carol.user_id)

    again = await resumed(make_client, server.url, bob.token)
    assert again.user_id == bob.user_id
    rec = Recorder(again)  # registered after READY: the sync burst waited in the backlog
    done = await again.synced(timeout=TIMEOUT)
    await rec.count(1, T.SYNC_COMPLETE)
    assert done.delivered == 13 and not done.truncated_conversation_ids
    backlog = rec.events[: rec.events.index(rec.of(T.SYNC_COMPLETE)[0])]
    assert len(backlog) == 13  # everything above the cursors, before SYNC_COMPLETE
    for conv in (c1, c2):
        got = [e for e in backlog if e.conversation_id == conv]
        expected_seqs = list(range(3, 3 + len(sent[conv]) + (conv == c1)))
        assert seqs(got) == expected_seqs  # dense and in order
        assert [e.message for e in got if e.type == T.MESSAGE_RECEIVE] == sent[conv]
    joined = [e for e in backlog if e.type == T.GROUP_MEMBER_ADDED]
    assert [(e.conversation_id, e.message.user_id) for e in joined] == [(c1, carol.user_id)]
    assert joined[0].seq == len(sent[c1]) + 3  # after every message of c1
    assert not any(e.replayed for e in backlog)  # from the sync, not from gap repair

    # The SDK acked what the application processed: the next connection gets nothing.
    await again.close()
    third = await resumed(make_client, server.url, bob.token)
    rec3 = Recorder(third)
    done = await third.synced(timeout=TIMEOUT)
    assert done.delivered == 0
    await barrier(third)
    assert not [e for e in rec3.events if e.durable]


async def test_unacked_events_are_redelivered_until_acked(
    server: RunningServer, make_client: ClientFactory
) -> None:
    alice, bob = await users(make_client, server.url, "alice", "bob")
    conv = (await alice.create_group("g", [bob.user_id])).conversation_id
    await Recorder(bob).count(1, T.GROUP_MEMBER_ADDED)
    await bob.close()  # cursor at seq 2
    sent = [await alice.send_message(conv, f"n{i}".encode()) for i in range(5)]  # seq 3..7

    async def connect_and_collect() -> tuple[Client, list[Event], pb.SyncComplete]:
        c = await resumed(make_client, server.url, bob.token, auto_ack=False)
        done = await c.synced(timeout=TIMEOUT)
        got = []
        async with c.events(T.MESSAGE_RECEIVE) as stream:
            for _ in range(done.delivered):
                got.append(await stream.next(TIMEOUT))
        return c, got, done

    # Received but never acknowledged: delivered again, the same events.
    c, got, done = await connect_and_collect()
    assert done.delivered == 5 and [e.message for e in got] == sent
    await c.close()  # auto_ack=False: close acknowledges nothing
    c, got, done = await connect_and_collect()
    assert done.delivered == 5 and [e.message for e in got] == sent

    # Acks are cumulative: acking seq 5 acknowledges 3 and 4 as well.
    assert await c.ack(got[2]) == 1
    assert await c.ack(got[0]) == 0  # behind the cursor: moves nothing
    await c.close()
    c, got, done = await connect_and_collect()
    assert done.delivered == 2 and [e.seq for e in got] == [6, 7]
    assert await c.ack(*got) == 2  # Ack.count: ids that moved the cursor (§12.14)
    await c.close()
    c, got, done = await connect_and_collect()
    assert done.delivered == 0 and got == []


# -- idempotent retry (SPEC §5) --------------------------------------------------------


async def test_idempotent_retry_returns_the_original_and_stores_nothing(
    server: RunningServer, make_client: ClientFactory
) -> None:
    a1, bob = await users(make_client, server.url, "alice", "bob")
    a2 = await second_device(make_client, a1)
    bob_rec, a2_rec = Recorder(bob), Recorder(a2)
    conv = (await a1.create_group("g", [bob.user_id])).conversation_id

    original = await a1.send_message(conv, b"once", request_id="retry-1")
    again = await a1.send_message(conv, b"once", request_id="retry-1")
    from_other_device = await a2.send_message(conv, b"once", request_id="retry-1")
    assert again == original and from_other_device == original
    # Concurrent retries from two devices of the same user: still one message.
    racing = await asyncio.gather(
        a1.send_message(conv, b"race", request_id="retry-2"),
        a2.send_message(conv, b"race", request_id="retry-2"),
    )
    assert racing[0] == racing[1] and racing[0].seq == original.seq + 1
    # The request_id is per user: bob using the same one sends a new message.
    bobs = await bob.send_message(conv, b"mine", request_id="retry-1")
    assert bobs.message_id != original.message_id and bobs.seq == original.seq + 2

    await bob_rec.count(2, T.MESSAGE_RECEIVE)
    await a2_rec.count(2, T.MESSAGE_RECEIVE)
    await barrier(bob, a2)
    assert bob_rec.messages() == [original, racing[0]]  # one event per message
    # a2 gets the raced message as an event unless its own echo came first (then the
    # SDK drops the event as a duplicate): never twice, never out of order.
    a2_seqs = [m.seq for m in a2_rec.messages()]
    assert a2_seqs in ([3, 4, 5], [3, 5])
    (listed,) = await a1.list_conversations()
    assert listed.last_seq == bobs.seq == 5  # 2 membership events + 3 stored messages
    stored = [e async for e in a1.iter_history(conv)]
    assert [e.seq for e in stored] == [1, 2, 3, 4, 5]


# -- history (SPEC §5, §12.4, §12.13) --------------------------------------------------


async def test_history_paging_both_directions_and_visibility(
    server: RunningServer, make_client: ClientFactory
) -> None:
    alice, bob, carol = await users(make_client, server.url, "alice", "bob", "carol")
    conv = (await alice.create_group("g", [bob.user_id])).conversation_id  # seq 1, 2
    sent = [await alice.send_message(conv, f"h{i}".encode()) for i in range(10)]  # 3..12
    assert [m.seq for m in sent] == list(range(3, 13))

    page = await alice.history(conv, limit=4)  # backward from the newest
    assert (seqs(page.events), page.next_cursor_seq, page.has_more) == ([9, 10, 11, 12], 9, True)
    assert all(e.replayed and e.type == T.MESSAGE_RECEIVE for e in page.events)
    assert [e.message for e in page.events] == sent[-4:]
    page = await alice.history(conv, page.next_cursor_seq, 4)
    assert (seqs(page.events), page.next_cursor_seq, page.has_more) == ([5, 6, 7, 8], 5, True)
    page = await alice.history(conv, page.next_cursor_seq, 4)
    assert (seqs(page.events), page.has_more) == ([1, 2, 3, 4], False)
    assert [e.type for e in page.events[:2]] == [T.GROUP_MEMBER_ADDED] * 2

    page = await alice.history(conv, 0, 5, forward=True)  # forward from the start
    assert (seqs(page.events), page.next_cursor_seq, page.has_more) == ([1, 2, 3, 4, 5], 5, True)
    page = await alice.history(conv, 5, 5, forward=True)
    assert (seqs(page.events), page.next_cursor_seq, page.has_more) == (
        [6, 7, 8, 9, 10],
        10,
        True,
    )
    page = await alice.history(conv, 10, 5, forward=True)
    assert (seqs(page.events), page.has_more) == ([11, 12], False)
    page = await alice.history(conv, 0, 0, forward=True)  # limit 0 means 50
    assert seqs(page.events) == list(range(1, 13)) and not page.has_more

    forward = [e async for e in alice.iter_history(conv, page_size=5)]
    assert seqs(forward) == list(range(1, 13))
    backward = [e async for e in alice.iter_history(conv, forward=False, page_size=5)]
    # newest page first, each page ascending
    assert seqs(backward) == [8, 9, 10, 11, 12, 3, 4, 5, 6, 7, 1, 2]
    tail = [e async for e in alice.iter_history(conv, cursor_seq=10, page_size=5)]
    assert seqs(tail) == [11, 12]

    # A member pages from its own GROUP_MEMBER_ADDED on (§12.13): bob joined at seq 2.
    assert seqs((await bob.history(conv, 0, 50, forward=True)).events) == list(range(2, 13))
    page = await bob.history(conv, 5, 50)
    assert (seqs(page.events), page.has_more) == ([2, 3, 4], False)
    page = await bob.history(conv, 0, 11)
    assert (seqs(page.events), page.has_more) == (list(range(2, 13)), False)
    page = await bob.history(conv, 0, 10)
    assert (seqs(page.events), page.next_cursor_seq, page.has_more) == (
        list(range(3, 13)),
        3,
        True,
    )
    page = await bob.history(conv, 3, 10)
    assert (seqs(page.events), page.has_more) == ([2], False)
    await alice.invite(conv, carol.user_id)  # seq 13
    late = await alice.send_message(conv, b"after carol joined")  # seq 14
    page = await carol.history(conv, 0, 50, forward=True)
    assert seqs(page.events) == [13, 14] and not page.has_more
    joined = page.events[0].expect(pb.GroupMemberAdded)
    assert (joined.user_id, joined.added_by) == (carol.user_id, alice.user_id)
    assert page.events[1].message == late
    page = await carol.history(conv, 0, 1)  # backward: stops at its join
    assert (seqs(page.events), page.next_cursor_seq, page.has_more) == ([14], 14, True)
    page = await carol.history(conv, 14, 1)
    assert (seqs(page.events), page.has_more) == ([13], False)
    assert seqs((await carol.history(conv, 13, 50)).events) == []
    assert seqs([e async for e in carol.iter_history(conv, forward=False, page_size=1)]) == [
        14,
        13,
    ]


# -- MESSAGE_DELIVERED (SPEC §5, §12.14) -----------------------------------------------


async def test_message_delivered_after_the_recipient_sdk_acks(
    server: RunningServer, make_client: ClientFactory
) -> None:
    alice, bob = await users(make_client, server.url, "alice", "bob")
    b2 = await second_device(make_client, bob)
    alice_rec = Recorder(alice)
    bob_rec, b2_rec = Recorder(bob), Recorder(b2)
    conv = (await alice.create_group("g", [bob.user_id])).conversation_id

    m1 = await alice.send_message(conv, b"one")
    (d1,) = await alice_rec.count(1, T.MESSAGE_DELIVERED)
    assert (
        d1.message.message_id,
        d1.message.delivered_to,
        d1.message.conversation_id,
        d1.message.up_to_seq,
    ) == (m1.message_id, bob.user_id, conv, m1.seq)
    await bob_rec.count(1, T.MESSAGE_RECEIVE)
    await b2_rec.count(1, T.MESSAGE_RECEIVE)

    # bob's second device acking too is not a second delivery (first device only).
    m2 = await alice.send_message(conv, b"two")
    await alice_rec.count(2, T.MESSAGE_DELIVERED)
    await bob_rec.count(2, T.MESSAGE_RECEIVE)
    await b2_rec.count(2, T.MESSAGE_RECEIVE)
    await asyncio.sleep(0.2)  # both devices' ack batches reached the server
    await barrier(alice)
    delivered = [e.message for e in alice_rec.of(T.MESSAGE_DELIVERED)]
    assert [(d.message_id, d.up_to_seq) for d in delivered] == [
        (m1.message_id, m1.seq),
        (m2.message_id, m2.seq),
    ]
    # The other way round: bob's message is delivered when alice's SDK acks it; his
    # own other device acking it sends nothing (§12.14). Each of bob's devices hears.
    reply = await bob.send_message(conv, b"reply")
    for rec in (bob_rec, b2_rec):
        (d,) = await rec.count(1, T.MESSAGE_DELIVERED)
        assert (d.message.message_id, d.message.delivered_to, d.message.up_to_seq) == (
            reply.message_id,
            alice.user_id,
            reply.seq,
        )
    await b2_rec.count(3, T.MESSAGE_RECEIVE)
    await asyncio.sleep(0.2)  # b2's ack of the reply reached the server
    await barrier(alice, bob, b2)
    assert len(bob_rec.of(T.MESSAGE_DELIVERED)) == len(b2_rec.of(T.MESSAGE_DELIVERED)) == 1
    assert len(alice_rec.of(T.MESSAGE_DELIVERED)) == 2

    # While bob is offline nothing is delivered; his sync + automatic acks deliver.
    await bob.close()
    await b2.close()
    m3 = await alice.send_message(conv, b"three")
    m4 = await alice.send_message(conv, b"four")
    await asyncio.sleep(0.1)
    await barrier(alice)
    assert len(alice_rec.of(T.MESSAGE_DELIVERED)) == 2
    back = await resumed(make_client, server.url, bob.token)
    back_rec = Recorder(back)
    await back.synced(timeout=TIMEOUT)
    assert back_rec.messages() == [m3, m4]  # (its own reply: acked as its echo)
    await alice_rec.until(lambda: alice_rec.of(T.MESSAGE_DELIVERED)[-1].message.up_to_seq == m4.seq)
    late = [e.message for e in alice_rec.of(T.MESSAGE_DELIVERED)[2:]]
    assert late[-1].message_id == m4.message_id and late[-1].delivered_to == bob.user_id
    assert all(d.conversation_id == conv and d.up_to_seq <= m4.seq for d in late)


# -- receipts, typing, presence (SPEC §5 ephemeral, §12.11) ----------------------------


async def test_read_receipts_reach_the_other_members(
    server: RunningServer, make_client: ClientFactory
) -> None:
    alice, bob, carol, stranger = await users(
        make_client, server.url, "alice", "bob", "carol", "stranger"
    )
    recs = {c.username: Recorder(c) for c in (alice, bob, carol, stranger)}
    conv = (await alice.create_group("g", [bob.user_id, carol.user_id])).conversation_id
    m = await alice.send_message(conv, b"read me")
    await recs["bob"].count(1, T.MESSAGE_RECEIVE)

    await bob.mark_read(conv, m.seq)
    for name in ("alice", "carol"):
        (receipt,) = await recs[name].count(1, T.MESSAGE_READ_RECEIPT)
        assert (
            receipt.message.conversation_id,
            receipt.message.user_id,
            receipt.message.up_to_seq,
        ) == (conv, bob.user_id, m.seq)
    await bob.mark_read(conv, 1)  # an older marker moves nothing: no receipt
    await carol.mark_read(conv, m.seq)
    (receipt,) = await recs["bob"].count(1, T.MESSAGE_READ_RECEIPT)
    assert receipt.message.user_id == carol.user_id
    await recs["alice"].count(2, T.MESSAGE_READ_RECEIPT)
    await barrier(alice, bob, carol, stranger)
    assert [e.message.user_id for e in recs["alice"].of(T.MESSAGE_READ_RECEIPT)] == [
        bob.user_id,
        carol.user_id,
    ]
    assert [e.message.user_id for e in recs["carol"].of(T.MESSAGE_READ_RECEIPT)] == [bob.user_id]
    assert not recs["stranger"].of(T.MESSAGE_READ_RECEIPT)


async def test_typing_goes_to_the_others(server: RunningServer, make_client: ClientFactory) -> None:
    alice, bob, stranger = await users(make_client, server.url, "alice", "bob", "stranger")
    a2 = await second_device(make_client, alice)
    recs = {name: Recorder(c) for name, c in (("a1", alice), ("a2", a2), ("bob", bob))}
    stranger_rec = Recorder(stranger)
    conv = (await alice.create_group("g", [bob.user_id])).conversation_id

    await alice.typing(conv, True)
    (t,) = await recs["bob"].count(1, T.TYPING_NOTIFY)
    assert (t.message.conversation_id, t.message.user_id, t.message.typing) == (
        conv,
        alice.user_id,
        True,
    )
    await alice.typing(conv, False)
    stopped = (await recs["bob"].count(2, T.TYPING_NOTIFY))[1]
    assert (stopped.message.user_id, stopped.message.typing) == (alice.user_id, False)
    await bob.typing(conv, True)
    (t,) = await recs["a2"].count(1, T.TYPING_NOTIFY)  # every device of the others
    assert (t.message.user_id, t.message.typing) == (bob.user_id, True)
    await recs["a1"].count(1, T.TYPING_NOTIFY)
    await barrier(alice, a2, bob, stranger)
    # nobody hears their own typing, a stranger hears nothing
    assert [e.message.user_id for e in recs["a1"].of(T.TYPING_NOTIFY)] == [bob.user_id]
    assert [e.message.user_id for e in recs["a2"].of(T.TYPING_NOTIFY)] == [bob.user_id]
    assert len(recs["bob"].of(T.TYPING_NOTIFY)) == 2
    assert not stranger_rec.of(T.TYPING_NOTIFY)


async def test_presence_transitions_seen_by_contacts_only(
    server: RunningServer, make_client: ClientFactory
) -> None:
    alice, bob, stranger = await users(make_client, server.url, "alice", "bob", "stranger")
    alice_rec, stranger_rec = Recorder(alice), Recorder(stranger)
    await alice.create_group("g", [bob.user_id])
    bob_id = bob.user_id

    def bob_presence() -> list[str]:
        return [e.message.status for e in alice_rec.of(T.PRESENCE_NOTIFY) if e.sender_id == bob_id]

    # Sharing a conversation for the first time introduces online users (decisions.md).
    await alice_rec.until(lambda: bob_presence() == ["online"])
    await bob.set_presence("away")
    await alice_rec.until(lambda: bob_presence() == ["online", "away"])
    await bob.set_presence("away")  # no change: no notification
    await bob.set_presence("online")
    await alice_rec.until(lambda: bob_presence() == ["online", "away", "online"])
    token = bob.token
    await bob.close()
    await alice_rec.until(lambda: bob_presence() == ["online", "away", "online", "offline"])

    back = await resumed(make_client, server.url, token)
    back_rec = Recorder(back)
    await alice_rec.until(
        lambda: bob_presence() == ["online", "away", "online", "offline", "online"]
    )
    # The new connection learns alice is online right after its SYNC_COMPLETE (§4).
    await back_rec.count(1, T.PRESENCE_NOTIFY)
    kinds = [e.type for e in back_rec.events if e.type in (T.SYNC_COMPLETE, T.PRESENCE_NOTIFY)]
    assert kinds == [T.SYNC_COMPLETE, T.PRESENCE_NOTIFY]
    p = back_rec.of(T.PRESENCE_NOTIFY)[0].message
    assert (p.user_id, p.status) == (alice.user_id, "online")

    await alice.set_presence("away")
    await back_rec.until(lambda: back_rec.of(T.PRESENCE_NOTIFY)[-1].message.status == "away")
    await barrier(alice, back, stranger)
    assert bob_presence() == ["online", "away", "online", "offline", "online"]
    assert not stranger_rec.of(T.PRESENCE_NOTIFY)  # shares no conversation: sees nothing
    with pytest.raises(SovereignClientError) as err:
        await back.set_presence("busy")
    assert err.value.code == 3001


# -- §6 errors through the SDK ---------------------------------------------------------


async def test_every_group_error_is_a_client_error_with_its_code(
    server: RunningServer, make_client: ClientFactory
) -> None:
    alice, bob, carol = await users(make_client, server.url, "alice", "bob", "carol")
    conv = (await alice.create_group("g", [bob.user_id])).conversation_id
    unknown_user = "0" * 26
    unknown_conv = "Z" * 26

    err = await expect_error(4006, alice.create_group("x", [bob.user_id, unknown_user]))
    assert err.name == "UserNotFound" and err.request_type == T.GROUP_CREATE
    await expect_error(4006, alice.invite(conv, unknown_user))
    err = await expect_error(2001, bob.invite(conv, carol.user_id))  # bob is no admin
    assert err.name == "NotGroupAdmin"
    await expect_error(2001, bob.remove(conv, alice.user_id))
    assert (await expect_error(4002, alice.invite(conv, bob.user_id))).name == "AlreadyMember"
    assert (await expect_error(4003, alice.remove(conv, carol.user_id))).name == "NotMember"
    err = await expect_error(4004, alice.remove(conv, alice.user_id))
    assert err.name == "CannotRemoveSelf"
    # carol is not a member: 2002 for sending, leaving, history, receipts, typing, invites
    err = await expect_error(2002, carol.send_message(conv, b"let me in"))
    assert err.name == "NotGroupMember" and err.request_type == T.MESSAGE_SEND
    await expect_error(2002, carol.leave(conv))
    await expect_error(2002, carol.history(conv))
    await expect_error(2002, carol.mark_read(conv, 1))
    await expect_error(2002, carol.typing(conv, True))
    await expect_error(2002, carol.invite(conv, carol.user_id))
    # an unknown conversation: 4001 whatever the request
    err = await expect_error(4001, alice.send_message(unknown_conv, b"?"))
    assert err.name == "GroupNotFound"
    await expect_error(4001, alice.invite(unknown_conv, bob.user_id))
    await expect_error(4001, alice.remove(unknown_conv, bob.user_id))
    await expect_error(4001, alice.leave(unknown_conv))
    await expect_error(4001, alice.history(unknown_conv))
    await expect_error(4001, alice.mark_read(unknown_conv, 1))
    await expect_error(4001, alice.typing(unknown_conv, True))

    # None of it stored anything or cost a connection.
    for c in (alice, bob, carol):
        assert c.ready and c.reconnects == 0
    (listed,) = await alice.list_conversations()
    assert listed.last_seq == 2
    assert sorted((m.user_id, m.role) for m in listed.members) == sorted(
        [(alice.user_id, "admin"), (bob.user_id, "member")]
    )
    assert await carol.list_conversations() == []
    assert (await alice.send_message(conv, b"still fine")).seq == 3


async def test_group_full(server_with: ServerWith, make_client: ClientFactory) -> None:
    async with server_with(max_group_members=3) as srv:
        alice, bob, carol, dave = await users(make_client, srv.url, "alice", "bob", "carol", "dave")
        err = await expect_error(
            4005, alice.create_group("big", [bob.user_id, carol.user_id, dave.user_id])
        )
        assert err.name == "GroupFull"
        assert await alice.list_conversations() == []  # nothing was created
        conv = (await alice.create_group("ok", [bob.user_id, carol.user_id])).conversation_id
        await expect_error(4005, alice.invite(conv, dave.user_id))
        await bob.leave(conv)  # room again
        await alice.invite(conv, dave.user_id)
        (listed,) = await alice.list_conversations()
        assert sorted(m.user_id for m in listed.members) == sorted(
            [alice.user_id, carol.user_id, dave.user_id]
        )


async def test_last_admin_leaving_promotes_the_longest_standing_member(
    server: RunningServer, make_client: ClientFactory
) -> None:
    alice, bob, carol, dave = await users(make_client, server.url, "alice", "bob", "carol", "dave")
    alice_rec, bob_rec = Recorder(alice), Recorder(bob)
    # carol joins before bob (member_ids order), dave joins last
    conv = (await alice.create_group("g", [carol.user_id, bob.user_id])).conversation_id
    await alice.invite(conv, dave.user_id)  # seq 4

    def roles(conversations: list[pb.Conversation]) -> dict[str, str]:
        (c,) = conversations
        return {m.user_id: m.role for m in c.members}

    assert roles(await bob.list_conversations()) == {
        alice.user_id: "admin",
        carol.user_id: "member",
        bob.user_id: "member",
        dave.user_id: "member",
    }
    await alice.leave(conv)  # seq 5
    assert roles(await bob.list_conversations()) == {
        carol.user_id: "admin",
        bob.user_id: "member",
        dave.user_id: "member",
    }
    assert await alice.list_conversations() == []
    # everyone, the leaver included, got the durable GROUP_MEMBER_REMOVED
    for rec in (alice_rec, bob_rec):
        (removed,) = await rec.count(1, T.GROUP_MEMBER_REMOVED)
        assert (removed.seq, removed.message.user_id, removed.message.removed_by) == (
            5,
            alice.user_id,
            alice.user_id,
        )
    # the new admin acts as one; the others still cannot
    await carol.remove(conv, dave.user_id)
    await expect_error(2001, bob.invite(conv, alice.user_id))
    await expect_error(2002, alice.send_message(conv, b"gone"))
    await expect_error(2002, alice.history(conv))
    await carol.leave(conv)  # the last admin again: bob is all that is left
    assert roles(await bob.list_conversations()) == {bob.user_id: "admin"}
    await bob.invite(conv, alice.user_id)
    assert roles(await alice.list_conversations())[alice.user_id] == "member"


# -- server restart (SPEC §4 shutdown, §5) ---------------------------------------------


async def test_server_restart_sdk_resumes_without_duplicates_or_gaps(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    data = tmp_path / "d"
    async with AsyncExitStack() as stack:
        first = running_server(data)
        srv = await first.__aenter__()
        try:
            port = srv.app.port
            alice = make_client(srv.url, backoff=Backoff((0.05,), random=lambda: 1.0))
            await alice.register("alice")
            # bob comes back later than alice, and holds his acks back (ack_interval), so
            # the restarted server sends him everything again: the SDK must drop it.
            bob = make_client(
                srv.url, backoff=Backoff((0.4,), random=lambda: 1.0), ack_interval=30.0
            )
            await bob.register("bob")
            bob_rec = Recorder(bob)
            conv = (await alice.create_group("g", [bob.user_id])).conversation_id
            before = [await alice.send_message(conv, f"b{i}".encode()) for i in range(3)]
            await bob_rec.count(3, T.MESSAGE_RECEIVE)
            tokens = (alice.token, bob.token)
        finally:
            await first.__aexit__(None, None, None)  # shutdown: every connection gets 4006
        await eventually(lambda: alice.state is not ClientState.READY)
        await eventually(lambda: bob.state is not ClientState.READY)
        assert alice.last_close is not None and alice.last_close[0] == 4006
        assert bob.last_close is not None and bob.last_close[0] == 4006
        # A send while the server is down waits for the resume (same request_id).
        queued = asyncio.create_task(alice.send_message(conv, b"queued while down"))
        await asyncio.sleep(0.1)
        assert not queued.done()

        again = await stack.enter_async_context(running_server(data, listen=f"127.0.0.1:{port}"))
        await alice.wait_ready(timeout=TIMEOUT)
        during = [await queued]
        during.append(await alice.send_message(conv, b"before bob is back"))
        await bob.wait_ready(timeout=TIMEOUT)
        synced = await bob.synced(timeout=TIMEOUT)
        assert synced.delivered >= 1 + len(before)  # resent from seq 2: nothing was acked
        after = [await alice.send_message(conv, f"a{i}".encode()) for i in range(3)]
        await bob_rec.count(len(before) + len(during) + len(after), T.MESSAGE_RECEIVE)
        await barrier(alice, bob)

        assert (alice.token, bob.token) == tokens  # the same devices
        assert (alice.reconnects, bob.reconnects) == (1, 1)
        expected = before + during + after
        assert [m.seq for m in expected] == list(range(3, 3 + len(expected)))
        assert bob_rec.messages(conv) == expected  # each exactly once, in order
        durable = [e for e in bob_rec.events if e.conversation_id == conv and e.durable]
        assert seqs(durable) == list(range(2, 3 + len(expected)))  # dense, no duplicate
        assert len({e.event_id for e in durable}) == len(durable)
        # The restarted server kept everything, and seq went on without reuse.
        (listed,) = await alice.list_conversations()
        assert listed.last_seq == 2 + len(expected)
        history = [e async for e in alice.iter_history(conv, page_size=4)]
        assert seqs(history) == list(range(1, 3 + len(expected)))
        assert [e.message for e in history if e.type == T.MESSAGE_RECEIVE] == expected
        # bob's held-back acks go out at close: a fresh connection of his gets nothing
        await bob.close()
        fresh = await resumed(make_client, again.url, tokens[1])
        assert (await fresh.synced(timeout=TIMEOUT)).delivered == 0
