"""Connection lifecycle (SPEC §4): the per-user cap, and the live effects of disabling
an account or revoking a session."""

from __future__ import annotations

from sovereign.errors import CloseCode
from sovereign.protocol.types import MessageType as T
from tests.helpers.services import Harness, HarnessWith, World, build_world


async def test_over_the_per_user_cap_the_oldest_connection_is_closed_4003(
    harness_with: HarnessWith,
) -> None:
    async with harness_with(max_connections_per_user=2) as h:
        w = await build_world(h)
        a2 = await h.connect(await h.another_device(w.alice))
        assert h.outbox.closes == []  # two is the cap, not over it
        a3 = await h.connect(w.alice)  # a second connection of the first device
        assert [(s, code) for s, code, _ in h.outbox.closes] == [
            (w.a1, CloseCode.TOO_MANY_CONNECTIONS)
        ]
        assert w.a1.closed and not (a2.closed or a3.closed)
        assert h.outbox.sessions(w.alice.user_id) == [a2, a3]
        for s in (w.a1, a2, a3):
            h.outbox.take(s)
        m = await h.send(w.b1, w.conv)
        assert h.outbox.take(w.a1) == []
        for s in (a2, a3):
            assert [f.msg for f in h.outbox.take(s)] == [m]


async def test_disabling_an_account_closes_its_connections_4005(h: Harness, world: World) -> None:
    w = world
    a2 = await h.connect(await h.another_device(w.alice))
    await h.conns.set_user_enabled(w.alice.user_id, False)
    assert {(s, code) for s, code, _ in h.outbox.closes} == {
        (w.a1, CloseCode.ACCOUNT_DISABLED),
        (a2, CloseCode.ACCOUNT_DISABLED),
    }
    assert not (w.b1.closed or w.c1.closed)


async def test_revoking_a_session_closes_that_devices_connections_4004(
    h: Harness, world: World
) -> None:
    w = world
    a2 = await h.connect(await h.another_device(w.alice))
    a1_again = await h.connect(w.alice)  # the same device (session) twice
    assert await h.conns.revoke_session(w.alice.session_id)
    assert {(s, code) for s, code, _ in h.outbox.closes} == {
        (w.a1, CloseCode.SESSION_INVALID),
        (a1_again, CloseCode.SESSION_INVALID),
    }
    assert not a2.closed


async def test_a_gone_connection_is_forgotten_and_its_user_goes_offline(
    h: Harness, world: World
) -> None:
    w = world
    assert w.bob.device_id in h.state.devices
    h.disconnect(w.b1)  # what the transport reports when the socket is gone
    [note] = h.outbox.take(w.a1)
    assert (note.type, note.msg.user_id, note.msg.status) == (
        T.PRESENCE_NOTIFY,
        w.bob.user_id,
        "offline",
    )
    assert w.bob.device_id not in h.state.devices  # its delivery state is let go
    assert h.outbox.sessions(w.bob.user_id) == []
