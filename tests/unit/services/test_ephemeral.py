"""Ephemeral signals (SPEC §5, §12.11): typing throttled on the (fake) monotonic clock,
presence aggregated over a user's connections and sent only on change, only to users
sharing a conversation; read markers clamped and never moving back."""

from __future__ import annotations

from sovereign.errors import ErrorCode
from sovereign.protocol.types import MessageType as T
from sovereign.services.ephemeral import TYPING_INTERVAL
from sovereign.services.session import Session
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.fakes import Sent
from tests.helpers.services import Harness, World


async def typing(h: Harness, s: Session, conv_id: str, on: bool) -> int:
    ack = await h.call(s, T.TYPING, pb.Typing(conversation_id=conv_id, typing=on))
    assert ack.type == T.ACK, ack
    count: int = ack.msg.count
    return count


def notes(frames: list[Sent]) -> list[tuple[str, object]]:
    return [
        (f.msg.user_id, f.msg.typing if f.type == T.TYPING_NOTIFY else f.msg.status)
        for f in frames
        if f.type in (T.TYPING_NOTIFY, T.PRESENCE_NOTIFY)
    ]


async def test_typing_is_forwarded_at_most_once_per_interval_and_stop_always(
    h: Harness, world: World
) -> None:
    w = world
    b2 = await h.connect(await h.another_device(w.bob))
    h.outbox.take(b2)
    bob = w.bob.user_id
    assert await typing(h, w.b1, w.conv, True) == 1
    [note] = h.outbox.take(w.a1)
    assert (note.type, note.msg) == (
        T.TYPING_NOTIFY,
        pb.TypingNotify(conversation_id=w.conv, user_id=bob, typing=True),
    )
    h.clock.advance(TYPING_INTERVAL - 0.001)
    assert await typing(h, w.b1, w.conv, True) == 0  # within the interval: dropped
    assert h.outbox.take(w.a1) == []
    h.clock.advance(0.001)
    assert await typing(h, w.b1, w.conv, True) == 1  # a full interval later
    assert await typing(h, w.b1, w.conv, False) == 1  # "stopped" is never throttled
    assert await typing(h, w.b1, w.conv, True) == 1  # and it resets the interval
    assert notes(h.outbox.take(w.a1)) == [(bob, True), (bob, False), (bob, True)]
    # Only the other members hear it: not the typist's other device, not outsiders.
    assert h.outbox.take(b2) == [] and h.outbox.take(w.c1) == []
    err = await h.call(w.c1, T.TYPING, pb.Typing(conversation_id=w.conv, typing=True))
    assert (err.type, err.msg.code) == (T.ERROR, ErrorCode.NOT_GROUP_MEMBER)


async def test_presence_is_the_best_over_a_users_connections_and_sent_only_on_change(
    h: Harness, world: World
) -> None:
    w = world
    alice = w.alice.user_id
    a2 = await h.connect(await h.another_device(w.alice))
    h.outbox.take(a2)
    assert h.outbox.take(w.b1) == []  # alice was online already: no change, no notice

    async def status(s: Session, value: str) -> None:
        ack = await h.call(s, T.PRESENCE_UPDATE, pb.PresenceUpdate(status=value))
        assert (ack.type, ack.msg.count) == (T.ACK, 1)

    await status(w.a1, "away")  # a2 is still online
    assert notes(h.outbox.take(w.b1)) == []
    await status(a2, "away")
    assert notes(h.outbox.take(w.b1)) == [(alice, "away")]
    await status(a2, "away")  # no change
    await status(w.a1, "online")
    assert notes(h.outbox.take(w.b1)) == [(alice, "online")]
    h.disconnect(w.a1)  # the online one goes: away remains
    assert notes(h.outbox.take(w.b1)) == [(alice, "away")]
    h.disconnect(a2)
    assert notes(h.outbox.take(w.b1)) == [(alice, "offline")]
    # SPEC §12.11: only users sharing a conversation; never the user itself.
    assert h.outbox.take(w.c1) == []
    err = await h.call(w.b1, T.PRESENCE_UPDATE, pb.PresenceUpdate(status="busy"))
    assert (err.type, err.msg.code) == (T.ERROR, ErrorCode.MALFORMED_MESSAGE)


async def test_new_contacts_learn_each_others_presence(h: Harness, world: World) -> None:
    w = world
    # alice hears it; carol does not share a conversation with bob yet.
    await h.call(w.b1, T.PRESENCE_UPDATE, pb.PresenceUpdate(status="away"))
    assert notes(h.outbox.take(w.a1)) == [(w.bob.user_id, "away")]
    assert h.outbox.take(w.c1) == []
    await h.call(
        w.a1, T.GROUP_INVITE, pb.GroupInvite(conversation_id=w.conv, user_id=w.carol.user_id)
    )
    assert sorted(notes(h.outbox.take(w.c1))) == sorted(
        [(w.alice.user_id, "online"), (w.bob.user_id, "away")]
    )
    assert notes(h.outbox.take(w.a1)) == [(w.carol.user_id, "online")]  # not bob again
    assert notes(h.outbox.take(w.b1)) == [(w.carol.user_id, "online")]


async def test_read_marker_is_clamped_never_moves_back_and_reaches_the_others(
    h: Harness, world: World
) -> None:
    w = world
    await h.send(w.a1, w.conv)  # seq 3
    b2 = await h.connect(await h.another_device(w.bob))
    for s in (w.a1, w.b1, b2):
        h.outbox.take(s)
    ack = await h.call(w.b1, T.MESSAGE_READ, pb.ReadMarker(conversation_id=w.conv, up_to_seq=99))
    assert (ack.type, ack.msg.count) == (T.ACK, 1)
    receipt = pb.ReadReceipt(conversation_id=w.conv, user_id=w.bob.user_id, up_to_seq=3)
    for s in (w.a1, b2):  # the other members, and the reader's other connections
        [r] = h.outbox.take(s)
        assert (r.type, r.msg) == (T.MESSAGE_READ_RECEIPT, receipt)
    assert h.outbox.take(w.b1) == [ack]
    ack = await h.call(w.b1, T.MESSAGE_READ, pb.ReadMarker(conversation_id=w.conv, up_to_seq=2))
    assert ack.msg.count == 0
    assert h.outbox.take(w.a1) == h.outbox.take(b2) == []
