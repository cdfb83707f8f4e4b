"""Cluster mode (SPEC §12.27): two nodes — each its own services, outbox and database
connections — over one database, with the in-process bus of ``tests/helpers/bus.py``.

Everything but the bus transport is real: the services, the event log, SQLite (two
writer connections, serialised by SQLite's lock as two processes would be).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sovereign.errors import CloseCode, ErrorCode
from sovereign.protocol.types import MessageType as T
from sovereign.services.session import Session
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import mls, pg
from tests.helpers.bus import HubBus
from tests.helpers.fakes import FakeClock, Sent
from tests.helpers.services import Harness, Login, Pair, cluster_pair, harness


@pytest.fixture(params=["sqlite", "postgres"])
def dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test on both engines: "" is SQLite (one file, two writer connections), else
    a throwaway PostgreSQL database (where the two nodes' transactions truly overlap)."""
    if request.param == "sqlite":
        yield ""
        return
    name, url = pg.create_database()
    try:
        yield url
    finally:
        pg.drop_database(name)


@pytest.fixture
async def pair(tmp_path: Path, dsn: str) -> AsyncIterator[Pair]:
    async with cluster_pair(tmp_path / "data", postgres_dsn=dsn) as p:
        yield p


def send_req(conv_id: str, payload: bytes = b"ciphertext") -> pb.MessageSend:
    return pb.MessageSend(conversation_id=conv_id, encrypted_payload=payload)


def of_type(frames: list[Sent], t: T) -> list[Sent]:
    return [f for f in frames if f.type == t]


def seqs(frames: list[Sent]) -> list[int]:
    return [f.msg.seq for f in frames if f.type == T.MESSAGE_RECEIVE]


async def call(p: Pair, h: Harness, s: Session, t: T, msg: object, rid: str = "") -> Sent:
    rid = rid or h.rid()
    h.request(s, t, msg, rid)  # type: ignore[arg-type]
    await p.settle()
    return h.outbox.response(s, rid)


async def two_users(p: Pair) -> tuple[Login, Login, Session, Session, str]:
    """alice on node a, bob on node b, sharing a conversation alice created on a."""
    alice = await p.a.register("alice")
    bob = await p.a.register("bob")
    a1 = await p.a.connect(alice)
    b1 = await p.b.connect(bob)
    created = await call(
        p, p.a, a1, T.GROUP_CREATE, pb.GroupCreate(title="g", member_ids=[bob.user_id])
    )
    assert created.type == T.GROUP_CREATED, created
    conv = created.msg.conversation_id
    await p.settle()
    return alice, bob, a1, b1, conv


async def stored_seqs(h: Harness, conv: str) -> list[int]:
    return await h.stored_seqs(conv)


# -- conversing across nodes ----------------------------------------------------------


async def test_a_group_created_on_one_node_reaches_a_member_on_the_other(pair: Pair) -> None:
    p = pair
    _alice, bob, a1, b1, conv = await two_users(p)
    got = p.b.outbox.take(b1)
    added = of_type(got, T.GROUP_MEMBER_ADDED)
    # SPEC §12.2, §12.13: bob sees events from his own GROUP_MEMBER_ADDED on (seq 2;
    # alice's, seq 1, is before it), as on a single node.
    assert [(f.msg.user_id, f.msg.seq) for f in added] == [(bob.user_id, 2)]
    assert [f.msg.seq for f in of_type(p.a.outbox.take(a1), T.GROUP_MEMBER_ADDED)] == [1, 2]
    assert bob.user_id in p.b.conv(conv).members  # node b learned the conversation


async def test_two_nodes_converse_in_order_and_the_echo_is_the_response(pair: Pair) -> None:
    p = pair
    _alice, _bob, a1, b1, conv = await two_users(p)
    p.a.outbox.take(a1)
    p.b.outbox.take(b1)
    echo = await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"hi bob"))
    assert echo.type == T.MESSAGE_RECEIVE and echo.msg.seq == 3
    got = p.b.outbox.take(b1)
    assert [(f.msg.seq, f.msg.encrypted_payload) for f in got] == [(3, b"hi bob")]
    echo = await call(p, p.b, b1, T.MESSAGE_SEND, send_req(conv, b"hi alice"))
    assert echo.msg.seq == 4
    got = p.a.outbox.take(a1)
    assert [f.msg.seq for f in got if f.request_id == ""] == [4]
    assert await stored_seqs(p.a, conv) == [1, 2, 3, 4]


async def test_concurrent_sends_from_both_nodes_get_dense_unique_seqs_in_order_everywhere(
    pair: Pair,
) -> None:
    p = pair
    alice, _bob, a1, b1, conv = await two_users(p)
    a2 = await p.b.connect(await p.a.another_device(alice))  # alice also on node b
    for s, h in ((a1, p.a), (b1, p.b), (a2, p.b)):
        h.outbox.take(s)
    n = 40
    for i in range(n):  # interleaved, without waiting: both event logs batch
        p.a.request(a1, T.MESSAGE_SEND, send_req(conv, b"a%d" % i), f"a{i}")
        p.b.request(b1, T.MESSAGE_SEND, send_req(conv, b"b%d" % i), f"b{i}")
    await p.settle()
    assert await stored_seqs(p.a, conv) == list(range(1, 2 * n + 3))
    # Every connection saw every seq exactly once, in ascending order (its own sends as
    # responses, the rest pushed).
    for s, h in ((a1, p.a), (b1, p.b), (a2, p.b)):
        got = seqs(h.outbox.take(s))
        assert got == list(range(3, 2 * n + 3)), (s, got)
    # The payload says the seq the database assigned.
    row = await p.a.db.read(
        lambda c: c.execute(
            "SELECT seq, payload FROM events WHERE conversation_id = ? AND seq = 40", (conv,)
        ).fetchone()
    )
    assert pb.MessageReceive.FromString(row[1]).seq == 40
    # The exact head is in the conversations row (cluster mode).
    last = await p.a.db.read(
        lambda c: c.execute(
            "SELECT last_seq FROM conversations WHERE conversation_id = ?", (conv,)
        ).fetchone()[0]
    )
    assert last == 2 * n + 2


async def test_idempotent_retry_raced_on_the_other_node_answers_the_original(
    pair: Pair,
) -> None:
    p = pair
    alice, _bob, a1, b1, conv = await two_users(p)
    a2 = await p.b.connect(await p.a.another_device(alice))
    p.a.outbox.take(a1)
    p.b.outbox.take(a2)
    # The same request_id from two devices of one user, on two nodes, at once.
    p.a.request(a1, T.MESSAGE_SEND, send_req(conv, b"once"), "same-rid")
    p.b.request(a2, T.MESSAGE_SEND, send_req(conv, b"once"), "same-rid")
    await p.settle()
    first = p.a.outbox.response(a1, "same-rid")
    second = p.b.outbox.response(a2, "same-rid")
    assert first.type == second.type == T.MESSAGE_RECEIVE, (first, second)
    assert first.msg.message_id == second.msg.message_id
    assert first.msg.seq == second.msg.seq == 3
    assert await stored_seqs(p.a, conv) == [1, 2, 3]  # stored once
    # bob got it once.
    assert seqs(p.b.outbox.take(b1)) == [3]


async def test_a_retry_inside_a_batch_of_claims_answers_the_original_stored_elsewhere(
    pair: Pair,
) -> None:
    """The batch's claims go in one statement: the one already stored (by the other
    node) answers with its original, the others commit with dense seqs around it."""
    p = pair
    alice, _bob, a1, b1, conv = await two_users(p)
    a2 = await p.b.connect(await p.a.another_device(alice))
    original = await call(p, p.b, a2, T.MESSAGE_SEND, send_req(conv, b"once"), "dup")
    assert original.type == T.MESSAGE_RECEIVE and original.msg.seq == 3
    p.a.outbox.take(a1)
    p.b.outbox.take(b1)
    rids = ["s0", "s1", "dup", "s2", "s3"]
    batches = p.a.eventlog.batches
    for rid in rids:  # node a has not seen "dup": the database decides, in one batch
        p.a.request(a1, T.MESSAGE_SEND, send_req(conv, b"once" if rid == "dup" else b"x"), rid)
    await p.settle()
    assert p.a.eventlog.batches == batches + 1
    answers = {rid: p.a.outbox.response(a1, rid) for rid in rids}
    assert answers["dup"].type == T.MESSAGE_RECEIVE
    assert answers["dup"].msg.message_id == original.msg.message_id
    assert answers["dup"].msg.seq == 3
    assert [answers[r].msg.seq for r in ("s0", "s1", "s2", "s3")] == [4, 5, 6, 7]
    assert await stored_seqs(p.a, conv) == [1, 2, 3, 4, 5, 6, 7]
    assert seqs(p.b.outbox.take(b1)) == [4, 5, 6, 7]


async def test_two_commits_at_one_epoch_from_two_nodes_one_wins_one_gets_5004(
    pair: Pair,
) -> None:
    p = pair
    _alice, _bob, a1, b1, conv = await two_users(p)
    gid = b"g" * 16
    p.a.request(
        a1, T.MLS_COMMIT, pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(gid, 0)), "ca"
    )
    p.b.request(
        b1, T.MLS_COMMIT, pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(gid, 0)), "cb"
    )
    await p.settle()
    ra = p.a.outbox.response(a1, "ca")
    rb = p.b.outbox.response(b1, "cb")
    kinds = sorted([ra.type, rb.type])
    assert kinds == sorted([T.MLS_COMMIT_BROADCAST, T.ERROR]), (ra, rb)
    loser = ra if ra.type == T.ERROR else rb
    assert loser.msg.code == ErrorCode.EPOCH_MISMATCH
    assert await stored_seqs(p.a, conv) == [1, 2, 3]
    # Both nodes now know epoch 1: the next commit at epoch 1 works from either.
    assert p.a.conv(conv).epoch == 1 and p.b.conv(conv).epoch == 1
    ok = await call(
        p, p.b, b1, T.MLS_COMMIT, pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(gid, 1))
    )
    assert ok.type == T.MLS_COMMIT_BROADCAST and ok.msg.epoch == 1


async def test_key_package_claims_raced_from_two_nodes_hand_each_package_out_once(
    tmp_path: Path, dsn: str
) -> None:
    # Real time: the packages' lifetimes are checked against the (injected) clock.
    clock = FakeClock(wall_us=time.time_ns() // 1000)
    async with cluster_pair(tmp_path / "data", clock, postgres_dsn=dsn) as p:
        await _key_package_race(p)


async def _key_package_race(p: Pair) -> None:
    _alice, bob, a1, b1, _conv = await two_users(p)
    up = pb.MLSKeyPackageUpload(key_packages=[mls.key_package(bob.user_id) for _ in range(3)])
    stored = await call(p, p.b, b1, T.MLS_KEY_PACKAGE_UPLOAD, up)
    assert stored.type == T.ACK and stored.msg.count == 3, stored
    carol = await p.a.register("carol")
    c1 = await p.b.connect(carol)
    fetch = pb.MLSKeyPackageFetch(user_id=bob.user_id)
    for i in range(2):
        p.a.request(a1, T.MLS_KEY_PACKAGE_FETCH, fetch, f"fa{i}")
        p.b.request(c1, T.MLS_KEY_PACKAGE_FETCH, fetch, f"fc{i}")
    await p.settle()
    got = [p.a.outbox.response(a1, f"fa{i}") for i in range(2)]
    got += [p.b.outbox.response(c1, f"fc{i}") for i in range(2)]
    handed = [g.msg.key_package_data for g in got if g.type == T.MLS_KEY_PACKAGE_RESPONSE]
    assert len(handed) == 3 and len(set(handed)) == 3, got
    assert [g.msg.code for g in got if g.type == T.ERROR] == [ErrorCode.NO_KEY_PACKAGE_AVAILABLE]


# -- live signals and closes across nodes -----------------------------------------------


async def test_typing_receipts_presence_and_delivered_reach_the_other_node(pair: Pair) -> None:
    p = pair
    alice, bob, a1, b1, conv = await two_users(p)
    p.a.outbox.take(a1)
    p.b.outbox.take(b1)
    await call(p, p.a, a1, T.TYPING, pb.Typing(conversation_id=conv, typing=True))
    assert [f.msg.user_id for f in of_type(p.b.outbox.take(b1), T.TYPING_NOTIFY)] == [alice.user_id]
    echo = await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv))
    p.b.outbox.take(b1)
    await call(p, p.b, b1, T.MESSAGE_ACK, pb.MessageAck(message_ids=[echo.msg.message_id]))
    delivered = of_type(p.a.outbox.take(a1), T.MESSAGE_DELIVERED)
    assert [(d.msg.delivered_to, d.msg.up_to_seq) for d in delivered] == [(bob.user_id, 3)]
    await call(p, p.b, b1, T.MESSAGE_READ, pb.ReadMarker(conversation_id=conv, up_to_seq=3))
    receipts = of_type(p.a.outbox.take(a1), T.MESSAGE_READ_RECEIPT)
    assert [(r.msg.user_id, r.msg.up_to_seq) for r in receipts] == [(bob.user_id, 3)]
    await call(p, p.b, b1, T.PRESENCE_UPDATE, pb.PresenceUpdate(status="away"))
    pres = of_type(p.a.outbox.take(a1), T.PRESENCE_NOTIFY)
    assert [(x.msg.user_id, x.msg.status) for x in pres] == [(bob.user_id, "away")]
    # bob's last connection (on node b) goes: node a's alice hears "offline".
    p.b.disconnect(b1)
    await p.settle()
    pres = of_type(p.a.outbox.take(a1), T.PRESENCE_NOTIFY)
    assert [(x.msg.user_id, x.msg.status) for x in pres] == [(bob.user_id, "offline")]


async def test_disable_and_revoke_close_sockets_on_the_other_node(pair: Pair) -> None:
    p = pair
    alice, bob, a1, b1, _conv = await two_users(p)
    a2 = await p.b.connect(await p.a.another_device(alice))
    await p.a.conns.revoke_session(a2_login_session(p, a2))
    await p.settle()
    assert [(c[0], c[1]) for c in p.b.outbox.closes] == [(a2, CloseCode.SESSION_INVALID)]
    await p.a.conns.set_user_enabled(bob.user_id, False)
    await p.settle()
    assert (b1, CloseCode.ACCOUNT_DISABLED) in [(c[0], c[1]) for c in p.b.outbox.closes]
    assert a1 not in [c[0] for c in p.a.outbox.closes]


def a2_login_session(p: Pair, s: Session) -> str:
    return s.session_id


async def test_the_per_user_cap_counts_connections_on_every_node(tmp_path: Path, dsn: str) -> None:
    async with cluster_pair(tmp_path / "data", postgres_dsn=dsn, max_connections_per_user=2) as p:
        alice = await p.a.register("alice")
        first = await p.a.connect(alice)
        p.a.clock.advance(1)
        second = await p.b.connect(await p.a.another_device(alice))
        await p.settle()
        assert p.a.outbox.closes == [] and p.b.outbox.closes == []
        p.a.clock.advance(1)
        third = await p.b.connect(alice)
        await p.settle()
        # Three across the cluster, cap 2: the oldest (on node a) is closed by node a.
        assert [(c[0], c[1]) for c in p.a.outbox.closes] == [
            (first, CloseCode.TOO_MANY_CONNECTIONS)
        ]
        assert p.b.outbox.closes == []
        assert not second.closed and not third.closed


# -- losing the bus ------------------------------------------------------------------------


async def test_a_node_that_lost_the_bus_catches_up_in_order_after_reconnecting(
    pair: Pair,
) -> None:
    p = pair
    _alice, _bob, a1, b1, conv = await two_users(p)
    p.b.outbox.take(b1)
    bus_b = p.b.cluster.bus if p.b.cluster else None
    assert isinstance(bus_b, HubBus)
    bus_b.disconnect()
    for i in range(5):
        await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"m%d" % i))
    assert p.b.outbox.take(b1) == []  # nothing reached node b
    dropped = p.hub.dropped
    assert dropped >= 5
    await bus_b.reconnect()
    await p.settle()
    assert seqs(p.b.outbox.take(b1)) == [3, 4, 5, 6, 7]
    # and live again afterwards, without duplicates
    await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"after"))
    assert seqs(p.b.outbox.take(b1)) == [8]


async def test_requests_the_bus_has_not_caught_up_with_are_decided_after_a_catch_up(
    pair: Pair,
) -> None:
    """SPEC §12.27: node b's memory lags the database while a notification is on its
    way (here it is lost). A member's request naming the conversation is decided again
    once b has caught up with the database, not refused as unknown; a non-member's is
    still refused."""
    p = pair
    alice = await p.a.register("alice")
    bob = await p.a.register("bob")
    mallory = await p.a.register("mallory")
    a1 = await p.a.connect(alice)
    b1 = await p.b.connect(bob)
    m1 = await p.b.connect(mallory)
    bus_b = p.b.cluster.bus if p.b.cluster else None
    assert isinstance(bus_b, HubBus)
    bus_b.disconnect()
    created = await call(
        p, p.a, a1, T.GROUP_CREATE, pb.GroupCreate(title="g", member_ids=[bob.user_id])
    )
    conv = created.msg.conversation_id
    assert conv not in p.b.state.convs  # node b has not heard of it
    echo = await call(p, p.b, b1, T.MESSAGE_SEND, send_req(conv, b"first"))
    assert echo.type == T.MESSAGE_RECEIVE and echo.msg.seq == 3, echo
    assert bob.user_id in p.b.conv(conv).members
    typing = await call(p, p.b, b1, T.TYPING, pb.Typing(conversation_id=conv, typing=True))
    assert typing.type == T.ACK, typing
    refused = await call(p, p.b, m1, T.MESSAGE_SEND, send_req(conv, b"intruder"))
    assert (refused.type, refused.msg.code) == (T.ERROR, ErrorCode.NOT_GROUP_MEMBER), refused
    unknown = await call(p, p.b, m1, T.MESSAGE_SEND, send_req("no-such-conversation"))
    assert (unknown.type, unknown.msg.code) == (T.ERROR, ErrorCode.GROUP_NOT_FOUND), unknown
    assert await stored_seqs(p.a, conv) == [1, 2, 3]


async def test_a_lost_notification_is_repaired_from_the_database_when_the_next_arrives(
    pair: Pair,
) -> None:
    p = pair
    _alice, _bob, a1, b1, conv = await two_users(p)
    p.b.outbox.take(b1)
    bus_a = p.a.cluster.bus if p.a.cluster else None
    assert isinstance(bus_a, HubBus)
    bus_a.disconnect()  # node a's notifications for seqs 3 and 4 are lost
    await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"lost-1"))
    await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"lost-2"))
    bus_a._connected = True  # back without a resync on node a: b must notice the hole
    await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"seen"))
    await p.settle()
    got = p.b.outbox.take(b1)
    assert [(f.msg.seq, f.msg.encrypted_payload) for f in got] == [
        (3, b"lost-1"),
        (4, b"lost-2"),
        (5, b"seen"),
    ]
    assert p.b.cluster is not None and p.b.cluster.repaired_events == 2


async def test_offline_sync_on_one_node_then_live_events_from_the_other_without_gaps(
    pair: Pair,
) -> None:
    p = pair
    _alice, bob, a1, b1, conv = await two_users(p)
    p.b.disconnect(b1)
    for i in range(3):
        await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"x%d" % i))
    b2 = p.b.open()
    p.b.authenticate(b2, bob)
    await p.settle()
    await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"live"))
    got = seqs(p.b.outbox.take(b2))
    # bob's cursor is at his GROUP_MEMBER_ADDED - 1: the backlog (2 is that event, not
    # a message) and then the live one from node a, no gap, no duplicate.
    assert got == [3, 4, 5, 6], got


async def test_membership_changes_on_one_node_apply_on_the_other(pair: Pair) -> None:
    p = pair
    _alice, bob, a1, b1, conv = await two_users(p)
    carol = await p.a.register("carol")
    c1 = await p.b.connect(carol)
    ok = await call(
        p, p.a, a1, T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv, user_id=carol.user_id)
    )
    assert ok.type == T.ACK, ok
    assert carol.user_id in p.b.conv(conv).members
    assert p.b.conv(conv).members[carol.user_id].joined_seq == 3
    assert [f.msg.seq for f in of_type(p.b.outbox.take(c1), T.GROUP_MEMBER_ADDED)] == [3]
    # carol sends through node b: a member there.
    echo = await call(p, p.b, c1, T.MESSAGE_SEND, send_req(conv, b"hello all"))
    assert echo.msg.seq == 4
    # bob leaves on node b: alice (node a) sees the removal and bob is gone there.
    left = await call(p, p.b, b1, T.GROUP_LEAVE, pb.GroupLeave(conversation_id=conv))
    assert left.type == T.ACK
    assert bob.user_id not in p.a.conv(conv).members
    assert p.a.conv(conv).former[bob.user_id].left_seq == 5
    # Inviting carol again from node b (stale or not) is refused by the database.
    again = await call(
        p, p.b, b1, T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv, user_id=carol.user_id)
    )
    assert again.type == T.ERROR


async def test_the_loser_of_a_cross_node_invite_race_gets_already_member(pair: Pair) -> None:
    p = pair
    alice, _bob, a1, _b1, conv = await two_users(p)
    a2 = await p.b.connect(await p.a.another_device(alice))
    carol = await p.a.register("carol")
    inv = pb.GroupInvite(conversation_id=conv, user_id=carol.user_id)
    p.a.request(a1, T.GROUP_INVITE, inv, "i1")
    p.b.request(a2, T.GROUP_INVITE, inv, "i2")
    await p.settle()
    r1 = p.a.outbox.response(a1, "i1")
    r2 = p.b.outbox.response(a2, "i2")
    assert sorted([r1.type, r2.type]) == sorted([T.ACK, T.ERROR]), (r1, r2)
    loser = r1 if r1.type == T.ERROR else r2
    assert loser.msg.code == ErrorCode.ALREADY_MEMBER
    assert await stored_seqs(p.a, conv) == [1, 2, 3]
    for h in p.nodes:
        assert h.conv(conv).members[carol.user_id].joined_seq == 3


async def test_a_welcome_reaches_the_other_node_live_and_after_a_lost_notification(
    pair: Pair,
) -> None:
    p = pair
    _alice, bob, a1, b1, conv = await two_users(p)
    p.b.outbox.take(b1)
    w = pb.MLSWelcome(conversation_id=conv, recipient_id=bob.user_id, welcome_data=mls.welcome())
    ok = await call(p, p.a, a1, T.MLS_WELCOME, w)
    assert ok.type == T.ACK, ok
    first = of_type(p.b.outbox.take(b1), T.MLS_WELCOME_RECEIVE)
    assert len(first) == 1
    bus_b = p.b.cluster.bus if p.b.cluster else None
    assert isinstance(bus_b, HubBus)
    bus_b.disconnect()
    ok = await call(p, p.a, a1, T.MLS_WELCOME, w)
    assert of_type(p.b.outbox.take(b1), T.MLS_WELCOME_RECEIVE) == []
    await bus_b.reconnect()
    await p.settle()
    again = of_type(p.b.outbox.take(b1), T.MLS_WELCOME_RECEIVE)
    # only the one whose notification was lost, not the first a second time
    assert [x.msg.event_id for x in again] != [first[0].msg.event_id] and len(again) == 1


async def test_a_lost_last_notification_is_found_by_the_head_check(pair: Pair) -> None:
    p = pair
    _alice, _bob, a1, b1, conv = await two_users(p)
    p.b.outbox.take(b1)
    bus_a = p.a.cluster.bus if p.a.cluster else None
    assert isinstance(bus_a, HubBus)
    bus_a.disconnect()
    await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"nobody hears"))
    bus_a._connected = True
    assert p.b.outbox.take(b1) == []
    assert p.b.cluster is not None
    await p.b.cluster.catch_up()  # what the node does every HEAD_CHECK_S
    await p.settle()
    assert seqs(p.b.outbox.take(b1)) == [3]


async def test_a_database_used_single_node_gets_exact_heads_when_it_joins_a_cluster(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    async with harness(data) as h:
        alice = await h.register("alice")
        a1 = await h.connect(alice)
        conv = await h.create_group(a1)
        for _ in range(3):
            await h.send(a1, conv)
        floor = await h.db.read(
            lambda c: c.execute(
                "SELECT last_seq FROM conversations WHERE conversation_id = ?", (conv,)
            ).fetchone()[0]
        )
        assert floor == 0  # single-node: the head is the newest event, not this column
    async with cluster_pair(data) as p:
        last = await p.a.db.read(
            lambda c: c.execute(
                "SELECT last_seq FROM conversations WHERE conversation_id = ?", (conv,)
            ).fetchone()[0]
        )
        assert last == 4
        a1 = await p.b.connect(alice)
        echo = await call(p, p.b, a1, T.MESSAGE_SEND, send_req(conv))
        assert echo.msg.seq == 5


async def test_a_profile_change_reaches_the_other_nodes_cache(pair: Pair) -> None:
    p = pair
    alice, _bob, a1, _b1, _conv = await two_users(p)
    assert await p.b.state.profile(alice.user_id) == ("alice", "alice")
    ok = await call(p, p.a, a1, T.PROFILE_UPDATE, pb.ProfileUpdate(display_name="Alice A."))
    assert ok.type == T.ACK
    assert await p.b.state.profile(alice.user_id) == ("alice", "Alice A.")


# -- invalidations: what changes without a conversation event -----------------------------


def after_now(p: Pair) -> int:
    """A retention cutoff (ms) past every event so far: their ids carry the fake clock."""
    return p.a.clock.now_us() // 1000 + 1


async def test_retention_on_one_node_is_reported_by_the_other_nodes_sync(pair: Pair) -> None:
    """SPEC §5: truncated_conversation_ids on every node, not only the purging one."""
    p = pair
    _alice, bob, a1, b1, conv = await two_users(p)
    p.b.disconnect(b1)
    await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"old"))
    assert await p.a.services.history.run_retention(after_now(p)) == {conv: 3}
    await p.settle()
    assert p.b.conv(conv).purged_seq == 3
    b2 = await p.b.connect(bob)
    (done,) = of_type(p.b.outbox.take(b2), T.SYNC_COMPLETE)
    assert list(done.msg.truncated_conversation_ids) == [conv]


async def test_invalidations_missed_while_the_bus_was_down_are_read_after_reconnecting(
    pair: Pair,
) -> None:
    p = pair
    alice, _bob, a1, _b1, conv = await two_users(p)
    await call(p, p.a, a1, T.MESSAGE_SEND, send_req(conv, b"old"))
    assert await p.b.state.profile(alice.user_id) == ("alice", "alice")
    bus_b = p.b.cluster.bus if p.b.cluster else None
    assert isinstance(bus_b, HubBus)
    bus_b.disconnect()
    await p.a.services.history.run_retention(after_now(p))
    await call(p, p.a, a1, T.PROFILE_UPDATE, pb.ProfileUpdate(display_name="Alice A."))
    await p.settle()
    assert p.b.conv(conv).purged_seq == 0  # both notes lost
    assert await p.b.state.profile(alice.user_id) == ("alice", "alice")
    await bus_b.reconnect()
    await p.settle()
    assert p.b.conv(conv).purged_seq == 3
    assert await p.b.state.profile(alice.user_id) == ("alice", "Alice A.")


async def test_a_settings_note_and_a_reconnection_each_make_the_other_node_re_read(
    pair: Pair,
) -> None:
    """The admin service's re-read (``AdminService.load_settings``) is the hook; the
    integration test test_cluster_admin.py checks the settings themselves."""
    p = pair
    assert p.a.cluster is not None and p.b.cluster is not None
    reads: list[str] = []

    async def reread() -> None:
        reads.append("read")

    p.b.cluster.settings_hooks.append(reread)
    p.a.cluster.settings_changed()
    await p.settle()
    assert reads == ["read"]
    bus_b = p.b.cluster.bus
    assert isinstance(bus_b, HubBus)
    bus_b.disconnect()
    p.a.cluster.settings_changed()  # lost
    await p.settle()
    assert reads == ["read"]
    await bus_b.reconnect()
    await p.settle()
    assert reads == ["read", "read"]


async def test_batches_over_several_conversations_from_both_nodes_all_commit(
    pair: Pair,
) -> None:
    """Each node's batches hold ops of two conversations in opposite orders: on
    PostgreSQL the rows are locked in one order, so no batch dies in a deadlock."""
    p = pair
    alice, _bob, a1, b1, conv1 = await two_users(p)
    conv2 = (
        await call(
            p, p.b, b1, T.GROUP_CREATE, pb.GroupCreate(title="h", member_ids=[alice.user_id])
        )
    ).msg.conversation_id
    n = 15
    for i in range(n):
        p.a.request(a1, T.MESSAGE_SEND, send_req(conv1), f"a1-{i}")
        p.a.request(a1, T.MESSAGE_SEND, send_req(conv2), f"a2-{i}")
        p.b.request(b1, T.MESSAGE_SEND, send_req(conv2), f"b2-{i}")
        p.b.request(b1, T.MESSAGE_SEND, send_req(conv1), f"b1-{i}")
    await p.settle()
    answers = [p.a.outbox.response(a1, f"a{c}-{i}") for c in (1, 2) for i in range(n)]
    answers += [p.b.outbox.response(b1, f"b{c}-{i}") for c in (1, 2) for i in range(n)]
    assert all(x.type == T.MESSAGE_RECEIVE for x in answers), [
        x for x in answers if x.type != T.MESSAGE_RECEIVE
    ]
    assert await stored_seqs(p.a, conv1) == list(range(1, 2 * n + 3))
    assert await stored_seqs(p.a, conv2) == list(range(1, 2 * n + 3))


class _Counting:
    """A writer connection that counts statements (each a round trip on PostgreSQL)."""

    def __init__(self, conn: Any, counter: list[int]) -> None:
        self._conn = conn
        self._counter = counter

    def execute(self, *args: Any) -> Any:
        self._counter[0] += 1
        return self._conn.execute(*args)

    def executemany(self, *args: Any) -> Any:
        self._counter[0] += 1
        return self._conn.executemany(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_an_event_batch_costs_as_many_statements_for_forty_sends_as_for_one(
    pair: Pair,
) -> None:
    """Regression (docs/scaling.md, "Measured"): the cluster event log ran about five
    statements per op, each a round trip from the writer thread on PostgreSQL, so a
    closed loop's whole window landed in one batch that took a second to write and
    deliveries came in bursts once a second. A batch's statements must not grow with
    its ops; its own events are delivered without any read or repair."""
    p = pair
    _alice, _bob, a1, b1, conv = await two_users(p)
    log = p.a.eventlog
    real = log.db
    statements: list[int] = []

    class CountingDb:  # the event log hands each batch to storage with submit()
        def submit(self, fn: Any, **kw: Any) -> asyncio.Future[Any]:
            counter = [0]
            fut = real.submit(lambda c: fn(_Counting(c, counter)), **kw)
            fut.add_done_callback(lambda _: statements.append(counter[0]))
            return fut

        def hold(self) -> None:
            real.hold()

        def release(self) -> None:
            real.release()

    log.db = CountingDb()  # type: ignore[assignment]
    p.a.outbox.take(a1)
    p.b.outbox.take(b1)
    cluster = p.a.cluster
    assert cluster is not None
    repairs = cluster.repairs
    p.a.request(a1, T.MESSAGE_SEND, send_req(conv), "one")
    await p.settle()
    batches = log.batches
    n = 40
    for i in range(n):  # submitted together: one batch
        p.a.request(a1, T.MESSAGE_SEND, send_req(conv, b"m%d" % i), f"m{i}")
    await p.settle()
    assert log.batches == batches + 1
    assert len(statements) == 2
    assert statements[1] == statements[0] <= 4, statements
    assert [f.msg.seq for f in p.a.outbox.take(a1)] == list(range(3, n + 4))
    assert seqs(p.b.outbox.take(b1)) == list(range(3, n + 4))
    assert cluster.repairs == repairs
    assert await stored_seqs(p.a, conv) == list(range(1, n + 4))


async def test_key_package_low_reaches_the_device_on_the_other_node(
    tmp_path: Path, dsn: str
) -> None:
    clock = FakeClock(wall_us=time.time_ns() // 1000)
    async with cluster_pair(tmp_path / "data", clock, postgres_dsn=dsn, min_key_packages=2) as p:
        alice, bob, a1, b1, _conv = await two_users(p)
        up = pb.MLSKeyPackageUpload(key_packages=[mls.key_package(bob.user_id) for _ in range(2)])
        assert (await call(p, p.b, b1, T.MLS_KEY_PACKAGE_UPLOAD, up)).type == T.ACK
        p.b.outbox.take(b1)
        got = await call(
            p, p.a, a1, T.MLS_KEY_PACKAGE_FETCH, pb.MLSKeyPackageFetch(user_id=bob.user_id)
        )
        assert got.type == T.MLS_KEY_PACKAGE_RESPONSE
        low = of_type(p.b.outbox.take(b1), T.MLS_KEY_PACKAGE_LOW)
        assert [(x.msg.remaining, x.msg.minimum) for x in low] == [(1, 2)]
        assert alice.user_id  # the fetch came from node a
