"""Offline sync on READY (SPEC §4 "On READY", §5, §12.12, §12.13, §12.15): the backlog
above the device's cursors, SYNC_COMPLETE, presence, MLS_KEY_PACKAGE_LOW; events
committed meanwhile follow without duplicates, and only then live fan-out."""

from __future__ import annotations

import asyncio
from typing import Any

from sovereign.protocol.types import MessageType as T
from sovereign.services.session import Session
from sovereign.storage.messaging import events_after_txn
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import mls
from tests.helpers.fakes import Sent
from tests.helpers.services import Harness, HarnessWith, Login, World

DURABLE = (T.MESSAGE_RECEIVE, T.GROUP_MEMBER_ADDED, T.GROUP_MEMBER_REMOVED)


def split_at_sync_complete(frames: list[Sent]) -> tuple[list[Sent], Sent, list[Sent]]:
    [i] = [n for n, f in enumerate(frames) if f.type == T.SYNC_COMPLETE]
    return frames[:i], frames[i], frames[i + 1 :]


def seqs(frames: list[Sent], conv_id: str) -> list[int]:
    return [f.msg.seq for f in frames if f.type in DURABLE and f.msg.conversation_id == conv_id]


async def test_ready_order_backlog_per_conversation_then_sync_complete_presence_and_low(
    harness_with: HarnessWith,
) -> None:
    async with harness_with(min_key_packages=1) as h:
        alice, bob = await h.register("alice"), await h.register("bob")
        a1 = await h.connect(alice)
        conv1 = await h.create_group(a1, bob)
        conv2 = await h.create_group(a1, bob)
        for conv_id, n in ((conv1, 3), (conv2, 2)):
            for _ in range(n):
                await h.send(a1, conv_id)
        b1 = await h.connect(bob)  # bob was offline until now
        backlog, done, after = split_at_sync_complete(h.outbox.take(b1))
        # Per conversation in seq order, from bob's own GROUP_MEMBER_ADDED (seq 2) on.
        assert seqs(backlog, conv1) == [2, 3, 4, 5]
        assert seqs(backlog, conv2) == [2, 3, 4]
        runs = [f.msg.conversation_id for f in backlog]
        assert runs == sorted(runs, key=runs.index)  # one conversation after the other
        assert done.msg.delivered == len(backlog) == 7
        assert list(done.msg.truncated_conversation_ids) == []
        # Then the presence of online contacts, then the KeyPackage pool warning.
        assert [(f.type, f.msg) for f in after] == [
            (T.PRESENCE_NOTIFY, pb.PresenceNotify(user_id=alice.user_id, status="online")),
            (T.MLS_KEY_PACKAGE_LOW, pb.KeyPackageLow(remaining=0, minimum=1)),
        ]
        # One write from the backlog to the warning (the count was read with the
        # device: MlsService.sync_tail); no fan-out reached b1.
        assert [w.via for w in h.outbox.writes(b1)] == ["backlog"]


async def test_reconnect_delivers_only_above_the_acked_cursor(h: Harness, world: World) -> None:
    w = world
    h.disconnect(w.b1)
    sent = [await h.send(w.a1, w.conv) for _ in range(4)]  # seqs 3..6
    b1 = await h.connect(w.bob)
    backlog, done, _ = split_at_sync_complete(h.outbox.take(b1))
    assert seqs(backlog, w.conv) == [2, 3, 4, 5, 6]
    await h.ack(b1, sent[1].message_id)  # seq 4, and everything before it
    h.disconnect(b1)
    b1 = await h.connect(w.bob)
    backlog, done, _ = split_at_sync_complete(h.outbox.take(b1))
    assert seqs(backlog, w.conv) == [5, 6]
    assert done.msg.delivered == 2


async def test_events_committed_during_the_sync_follow_it_once_and_then_it_goes_live(
    h: Harness, world: World
) -> None:
    w = world
    h.disconnect(w.b1)
    m1 = await h.send(w.a1, w.conv)  # seq 3: stored while bob is offline
    reads = h.hold_reads()
    backlog = h.outbox.hold_backlog()
    b1 = h.open()
    h.authenticate(b1, w.bob)  # READY: the sync starts, and waits for its first read
    await reads.entered.wait()
    # seq 4 commits before the sync has read anything: it is both in the stored backlog
    # and in the live events buffered for b1; bob must get it once.
    h.request(w.a1, T.MESSAGE_SEND, pb.MessageSend(conversation_id=w.conv), "m2")
    await h.eventlog.wait_idle()
    reads.release()
    await backlog.entered.wait()  # the backlog is written, and takes its time
    # seq 5 commits while the backlog is in flight: it must come after SYNC_COMPLETE.
    h.request(w.a1, T.MESSAGE_SEND, pb.MessageSend(conversation_id=w.conv), "m3")
    await h.eventlog.wait_idle()
    assert h.outbox.frames(b1) == []  # not live yet: no fan-out reached it directly
    backlog.release()
    await h.settle()
    m2 = h.outbox.response(w.a1, "m2").msg
    m3 = h.outbox.response(w.a1, "m3").msg
    before, done, after = split_at_sync_complete(h.outbox.take(b1))
    assert seqs(before, w.conv) == [2, 3, 4]
    assert [f.msg.message_id for f in before[1:]] == [m1.message_id, m2.message_id]
    assert done.msg.delivered == 3
    assert [(f.type, f.msg.seq) for f in after if f.type != T.PRESENCE_NOTIFY] == [
        (T.MESSAGE_RECEIVE, 5)
    ]
    assert after[-1].msg == m3
    # Now live: the next event reaches b1 by fan-out.
    m4 = await h.send(w.a1, w.conv)
    [live] = h.outbox.take(b1)
    assert live.msg == m4 and h.outbox.writes(b1)[-1].via == "flush"


async def test_a_device_created_after_joining_starts_at_the_last_seq(
    h: Harness, world: World
) -> None:
    """SPEC §12.12: a new device is not sent what its user's other devices had before
    it existed (it pages history if it wants); what comes after, it gets."""
    w = world
    await h.send(w.a1, w.conv)
    await h.send(w.b1, w.conv)
    a2_login = await h.another_device(w.alice)
    a2 = await h.connect(a2_login)
    backlog, done, _ = split_at_sync_complete(h.outbox.take(a2))
    assert (backlog, done.msg.delivered) == ([], 0)
    h.disconnect(a2)
    m = await h.send(w.b1, w.conv)
    a2 = await h.connect(a2_login)
    backlog, done, _ = split_at_sync_complete(h.outbox.take(a2))
    assert [f.msg for f in backlog] == [m]


async def test_a_late_member_gets_events_from_its_own_member_added_on(
    h: Harness, world: World
) -> None:
    """SPEC §5, §12.13: a joining user's devices start at its GROUP_MEMBER_ADDED - 1."""
    w = world
    await h.send(w.a1, w.conv)  # seq 3, before carol joins
    h.disconnect(w.c1)
    await h.call(
        w.a1, T.GROUP_INVITE, pb.GroupInvite(conversation_id=w.conv, user_id=w.carol.user_id)
    )
    m = await h.send(w.b1, w.conv)  # seq 5
    c1 = await h.connect(w.carol)
    backlog, done, _ = split_at_sync_complete(h.outbox.take(c1))
    assert [(f.type, f.msg.seq) for f in backlog] == [
        (T.GROUP_MEMBER_ADDED, 4),
        (T.MESSAGE_RECEIVE, 5),
    ]
    assert done.msg.delivered == 2
    assert backlog[0].msg.user_id == w.carol.user_id and backlog[1].msg == m


async def send_welcome(h: Harness, s: Session, conv_id: str, to: Login) -> None:
    ack = await h.call(
        s,
        T.MLS_WELCOME,
        pb.MLSWelcome(conversation_id=conv_id, recipient_id=to.user_id, welcome_data=mls.welcome()),
    )
    assert (ack.type, ack.msg.count) == (T.ACK, 1)


async def test_welcomes_follow_the_conversation_backlog_and_skip_devices_created_later(
    h: Harness, world: World
) -> None:
    """SPEC §4 (welcomes after the conversation events), §12.12 (no welcome stored
    before the device existed), §12.15 (acked per device)."""
    w = world
    h.disconnect(w.b1)
    await send_welcome(h, w.a1, w.conv, w.bob)
    h.clock.advance(1)
    b2_login = await h.another_device(w.bob)
    b1 = await h.connect(w.bob)
    backlog, done, _ = split_at_sync_complete(h.outbox.take(b1))
    assert [f.type for f in backlog] == [T.GROUP_MEMBER_ADDED, T.MLS_WELCOME_RECEIVE]
    assert done.msg.delivered == 2
    welcome = backlog[-1].msg
    b2 = await h.connect(b2_login)
    backlog, done, _ = split_at_sync_complete(h.outbox.take(b2))
    assert (backlog, done.msg.delivered) == ([], 0)
    # Acked by b1 (welcomes are acked one by one, per device), it is not sent again.
    assert (await h.ack(b1, welcome.event_id)).msg.count == 1
    h.disconnect(b1)
    b1 = await h.connect(w.bob)
    backlog, _, _ = split_at_sync_complete(h.outbox.take(b1))
    assert seqs(backlog, w.conv) == [2] and T.MLS_WELCOME_RECEIVE not in [f.type for f in backlog]


async def test_a_device_logged_in_after_a_welcome_does_not_get_it(h: Harness, world: World) -> None:
    w = world
    await send_welcome(h, w.a1, w.conv, w.bob)
    h.clock.advance(1)
    session, _token = await h.auth.create_session(w.bob.user_id)  # the login path
    b2 = await h.connect(Login(w.bob.user_id, "bob", session.session_id, session.device_id))
    backlog, done, _ = split_at_sync_complete(h.outbox.take(b2))
    assert T.MLS_WELCOME_RECEIVE not in [f.type for f in backlog]
    assert done.msg.delivered == 0


async def test_sync_complete_names_conversations_whose_unacked_events_retention_removed(
    h: Harness, world: World
) -> None:
    """SPEC §5: lost history is never silent. Time passes on the fake clock."""
    w = world
    h.disconnect(w.b1)
    await h.send(w.a1, w.conv)  # seq 3, never acked by bob's first device
    b2_login = await h.another_device(w.bob)  # starts at seq 3: loses nothing
    h.clock.advance((h.config.retention_days + 1) * 24 * 3600)
    kept = await h.send(w.a1, w.conv)  # seq 4, recent
    assert await h.services.history.retention_pass() == {w.conv: 3}
    b1 = await h.connect(w.bob)
    backlog, done, _ = split_at_sync_complete(h.outbox.take(b1))
    assert [f.msg for f in backlog] == [kept]
    assert (done.msg.delivered, list(done.msg.truncated_conversation_ids)) == (1, [w.conv])
    b2 = await h.connect(b2_login)
    backlog, done, _ = split_at_sync_complete(h.outbox.take(b2))
    assert [f.msg for f in backlog] == [kept]
    assert list(done.msg.truncated_conversation_ids) == []


async def test_a_resume_reads_the_device_and_its_key_package_count_in_one_read(
    harness_with: HarnessWith,
) -> None:
    """A resume storm is mostly reader hops: the KeyPackage count of the READY's LOW
    check rides on the read of the device (one hop, not two; docs/performance.md)."""
    async with harness_with(min_key_packages=1) as h:
        bob = await h.register("bob")
        h.disconnect(await h.connect(bob))  # the device is not in memory any more
        real, reads = h.db.read, []

        async def counting(fn: Any) -> Any:
            reads.append(fn)
            return await real(fn)

        h.db.read = counting  # type: ignore[method-assign]
        b1 = await h.connect(bob)
        await h.settle()
        _, done, after = split_at_sync_complete(h.outbox.take(b1))
        assert done.msg.delivered == 0
        assert [(f.type, f.msg) for f in after] == [
            (T.MLS_KEY_PACKAGE_LOW, pb.KeyPackageLow(remaining=0, minimum=1))
        ]
        assert len(reads) == 1


async def test_a_token_resume_reads_the_session_and_the_device_in_one_read(
    harness_with: HarnessWith,
) -> None:
    """AUTH_REQUEST{session_token} of a device not in memory: the token's session and
    user, the device's cursors and welcomes and its KeyPackage count come in one
    reader hop (docs/performance.md, resume storm), and the READY is as before."""
    async with harness_with(min_key_packages=1) as h:
        alice, bob = await h.register("alice"), await h.register("bob")
        a1, b1 = await h.connect(alice), await h.connect(bob)
        conv = await h.create_group(a1, bob)
        h.disconnect(b1)
        m = await h.send(a1, conv)
        real, reads = h.db.read, []

        async def counting(fn: Any) -> Any:
            reads.append(fn)
            return await real(fn)

        h.db.read = counting  # type: ignore[method-assign]
        b1 = h.open()
        h.request(b1, T.AUTH_REQUEST, pb.AuthRequest(session_token=bob.token), "auth")
        await h.settle()
        frames = h.outbox.take(b1)
        assert frames[0].type == T.AUTH_SUCCESS and frames[0].msg.user_id == bob.user_id
        backlog, done, after = split_at_sync_complete(frames[1:])
        assert seqs(backlog, conv) == [2, 3] and backlog[-1].msg == m
        assert done.msg.delivered == 2
        assert [(f.type, f.msg) for f in after] == [
            (T.PRESENCE_NOTIFY, pb.PresenceNotify(user_id=alice.user_id, status="online")),
            (T.MLS_KEY_PACKAGE_LOW, pb.KeyPackageLow(remaining=0, minimum=1)),
        ]
        # The token's read, then the backlog's one page: nothing else.
        assert len(reads) == 2 and reads[1].func is events_after_txn


async def test_a_resume_with_nothing_to_read_is_one_write_from_auth_success_to_presence(
    h: Harness, world: World
) -> None:
    """AUTH_SUCCESS rides in the sync's first write (SyncState.head): a resume whose
    backlog is in memory costs the socket one write, not two."""
    w = world
    m = await h.send(w.a1, w.conv)
    await h.ack(w.b1, m.message_id)  # cumulative: nothing above bob's cursor is left
    h.disconnect(w.b1)
    b1 = h.open()
    h.request(b1, T.AUTH_REQUEST, pb.AuthRequest(session_token=w.bob.token), "auth")
    await h.settle()
    [write] = h.outbox.writes(b1)
    assert write.via == "backlog"
    frames = write.frames()
    assert (frames[0].type, frames[0].request_id) == (T.AUTH_SUCCESS, "auth")
    assert frames[0].msg.user_id == w.bob.user_id
    _, done, after = split_at_sync_complete(frames[1:])
    assert done.msg.delivered == 0
    assert [(f.type, f.msg) for f in after] == [
        (T.PRESENCE_NOTIFY, pb.PresenceNotify(user_id=w.alice.user_id, status="online"))
    ]
    assert h.outbox.is_live(b1)


async def test_auth_success_never_waits_for_a_backlog_read(h: Harness, world: World) -> None:
    """With a backlog to read, AUTH_SUCCESS leaves alone before the read; the backlog
    and SYNC_COMPLETE follow once storage answers."""
    w = world
    h.disconnect(w.b1)
    m = await h.send(w.a1, w.conv)
    real = h.db.read
    backlog_read, go = asyncio.Event(), asyncio.Event()

    async def held(fn: Any) -> Any:
        if getattr(fn, "func", None) is events_after_txn:
            backlog_read.set()
            await go.wait()
        return await real(fn)

    h.db.read = held  # type: ignore[method-assign]
    b1 = h.open()
    h.request(b1, T.AUTH_REQUEST, pb.AuthRequest(session_token=w.bob.token), "auth")
    await asyncio.wait_for(backlog_read.wait(), 5.0)
    [first] = h.outbox.writes(b1)  # out while the backlog's read is held
    assert [(f.type, f.request_id) for f in first.frames()] == [(T.AUTH_SUCCESS, "auth")]
    go.set()
    await h.settle()
    frames = h.outbox.take(b1)
    assert frames[0].type == T.AUTH_SUCCESS
    backlog, done, _ = split_at_sync_complete(frames[1:])
    assert backlog[-1].msg == m and done.msg.delivered == len(backlog)


async def test_a_welcome_stored_between_the_token_read_and_the_sync_is_not_lost(
    h: Harness, world: World
) -> None:
    """The device's welcomes are read with the token, before the session buffers live
    welcomes: one stored and pushed in between must still come, once."""
    w = world
    h.disconnect(w.b1)
    real = h.db.read
    was_read, go = asyncio.Event(), asyncio.Event()

    async def held(fn: Any) -> Any:
        result = await real(fn)
        was_read.set()
        await go.wait()
        return result

    h.db.read = held  # type: ignore[method-assign]
    b1 = h.open()
    h.request(b1, T.AUTH_REQUEST, pb.AuthRequest(session_token=w.bob.token), "auth")
    await was_read.wait()  # the session and the device are read; no READY yet
    h.db.read = real  # type: ignore[method-assign]
    h.request(
        w.a1,
        T.MLS_WELCOME,
        pb.MLSWelcome(
            conversation_id=w.conv, recipient_id=w.bob.user_id, welcome_data=mls.welcome()
        ),
        "w1",
    )
    for _ in range(2000):  # the welcome is stored and pushed while the resume waits
        if any(f.request_id == "w1" for f in h.outbox.frames(w.a1)):
            break
        await asyncio.sleep(0.001)
    assert h.outbox.response(w.a1, "w1").type == T.ACK
    go.set()
    await h.settle()
    frames = h.outbox.take(b1)
    assert frames[0].type == T.AUTH_SUCCESS
    backlog, done, after = split_at_sync_complete(frames[1:])
    assert [f.type for f in backlog] == [T.GROUP_MEMBER_ADDED, T.MLS_WELCOME_RECEIVE]
    assert done.msg.delivered == 2
    assert T.MLS_WELCOME_RECEIVE not in [f.type for f in after]


async def test_a_key_package_fetch_during_the_sync_makes_its_count_read_again(
    harness_with: HarnessWith,
) -> None:
    """The count read with the device is stale once a fetch completes after it: the
    LOW at the end of the sync carries the count after the fetch, as it did when the
    count was always read after the backlog."""
    # Opaque: the packages are not checked against the fake clock's date.
    async with harness_with(min_key_packages=2, mls_validation="opaque") as h:
        alice, bob = await h.register("alice"), await h.register("bob")
        a1, b1 = await h.connect(alice), await h.connect(bob)
        up = pb.MLSKeyPackageUpload(key_packages=[mls.key_package(bob.user_id) for _ in range(2)])
        assert (await h.call(b1, T.MLS_KEY_PACKAGE_UPLOAD, up)).type == T.ACK
        h.disconnect(b1)
        backlog = h.outbox.hold_backlog()
        b1 = h.open()
        h.authenticate(b1, bob)  # READY: the device and its count (2) are read
        await backlog.entered.wait()  # ... and the backlog is in flight
        fetch = pb.MLSKeyPackageFetch(user_id=bob.user_id)
        h.request(a1, T.MLS_KEY_PACKAGE_FETCH, fetch, "f1")  # not h.call: the sync is held
        for _ in range(2000):  # the fetch completes while the backlog is in flight
            if any(f.request_id == "f1" for f in h.outbox.frames(a1)):
                break
            await asyncio.sleep(0.001)
        assert h.outbox.response(a1, "f1").type == T.MLS_KEY_PACKAGE_RESPONSE
        backlog.release()
        await h.settle()
        _, _, after = split_at_sync_complete(h.outbox.take(b1))
        lows = [f.msg for f in after if f.type == T.MLS_KEY_PACKAGE_LOW]
        assert lows == [pb.KeyPackageLow(remaining=1, minimum=2)]
