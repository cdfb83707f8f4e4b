"""Resume (SPEC §4, §12.9, §12.20) through the real AUTH_REQUEST handler, with session
expiry decided by the fake clock: each refusal's code and close code."""

from __future__ import annotations

from sovereign.errors import CloseCode, ErrorCode
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.services import Harness, World

DAY_S = 24 * 3600


async def test_resume_makes_the_connection_ready_and_starts_its_sync(
    h: Harness, world: World
) -> None:
    w = world
    h.disconnect(w.b1)
    m = await h.send(w.a1, w.conv)
    s = h.open()
    h.request(s, T.AUTH_REQUEST, pb.AuthRequest(session_token=w.bob.token), "resume")
    await h.settle()
    ok, *backlog, done, presence = h.outbox.take(s)
    assert (ok.type, ok.request_id, ok.msg.user_id, ok.msg.session_token) == (
        T.AUTH_SUCCESS,
        "resume",
        w.bob.user_id,
        w.bob.token,  # §12.9: the same token
    )
    assert [f.msg.seq for f in backlog] == [2, 3] and backlog[-1].msg == m
    assert (done.type, presence.type) == (T.SYNC_COMPLETE, T.PRESENCE_NOTIFY)
    assert s.ready and h.outbox.is_live(s)


async def test_resume_refusals_and_their_close_codes(h: Harness, world: World) -> None:
    w = world
    cases: list[tuple[str, ErrorCode, CloseCode | None]] = []
    # Unknown token: 1001, non-fatal, the connection stays (docs/decisions.md).
    cases.append(("A" * 43, ErrorCode.INVALID_CREDENTIAL, None))
    # Revoked: 1005 and 4004.
    await h.conns.revoke_session(w.carol.session_id)
    cases.append((w.carol.token, ErrorCode.SESSION_REVOKED, CloseCode.SESSION_INVALID))
    # Expired (30 days on the fake clock, sliding from the last resume): 1002 and 4004.
    h.clock.advance(h.config.session_timeout_hours * 3600 + 1)
    cases.append((w.bob.token, ErrorCode.EXPIRED_SESSION, CloseCode.SESSION_INVALID))
    for token, code, close in cases:
        s = h.open()
        err = await h.call(s, T.AUTH_REQUEST, pb.AuthRequest(session_token=token))
        assert (err.type, err.msg.error_code) == (T.AUTH_ERROR, code)
        assert s.state.close_code == close and not s.ready


async def test_resume_slides_the_expiry_and_a_disabled_account_is_2004_then_4005(
    h: Harness, world: World
) -> None:
    w = world
    lifetime_s = h.config.session_timeout_hours * 3600
    h.clock.advance(lifetime_s - DAY_S)  # one day left
    s = h.open()
    assert (await h.call(s, T.AUTH_REQUEST, pb.AuthRequest(session_token=w.bob.token))).type == (
        T.AUTH_SUCCESS
    )
    h.clock.advance(2 * DAY_S)  # past the original expiry, within the extended one
    s = h.open()
    assert (await h.call(s, T.AUTH_REQUEST, pb.AuthRequest(session_token=w.bob.token))).type == (
        T.AUTH_SUCCESS
    )
    await h.conns.set_user_enabled(w.bob.user_id, False)
    s = h.open()
    err = await h.call(s, T.AUTH_REQUEST, pb.AuthRequest(session_token=w.bob.token))
    assert (err.type, err.msg.error_code) == (T.AUTH_ERROR, ErrorCode.ACCOUNT_DISABLED)
    assert s.state.close_code == CloseCode.ACCOUNT_DISABLED
