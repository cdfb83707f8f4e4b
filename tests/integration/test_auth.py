"""Passkey registration, login, sessions over real sockets with real WebAuthn
ceremonies (software authenticator -> py_webauthn) (SPEC §4, §12.7, §12.9, §12.19)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from sovereign.client.authenticator import SoftwareAuthenticator
from sovereign.clock import SYSTEM_CLOCK
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import pg
from tests.helpers.flows import (
    Account,
    assertion_response,
    login,
    register,
    registration_response,
    resume,
)
from tests.helpers.server import RunningServer
from tests.helpers.wsclient import WsClient

ServerWith = Callable[..., AbstractAsyncContextManager[RunningServer]]


async def registered(srv: RunningServer, name: str = "alice", **kw: str) -> Account:
    c = await WsClient.connect(srv.url)
    acct = await register(c, name, **kw)
    await c.close()
    return acct


async def login_challenge(c: WsClient, username: str) -> bytes:
    ch = await c.request(T.AUTH_REQUEST, pb.AuthRequest(username=username), T.AUTH_CHALLENGE)
    assert len(ch.challenge) == 32
    return bytes(ch.credential_request_options)


# -- registration ------------------------------------------------------------------


async def test_register_then_ready(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    acct = await register(c, "alice", display_name="Alice A.")
    assert len(acct.user_id) == 26 and len(acct.token) == 43
    # READY: a non-auth request is now served (unknown type -> 3002, not 1006)
    rid = c.send(99, b"")
    assert (await c.expect(T.ERROR, rid)).code == 3002
    user = await server.app.storage.users.get_by_id(acct.user_id)
    assert user is not None and (user.username, user.display_name) == ("alice", "Alice A.")
    assert not user.is_admin
    await c.close()


async def test_registration_options_are_webauthn_creation_options(server: RunningServer) -> None:
    import orjson

    c = await WsClient.connect(server.url)
    ch = await c.request(
        T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="bob"), T.AUTH_REGISTER_CHALLENGE
    )
    opts = orjson.loads(ch.credential_creation_options)
    assert opts["rp"]["id"] == "localhost"
    assert opts["user"]["name"] == "bob"
    assert opts["timeout"] == 60000
    assert {"type": "public-key", "alg": -7} in opts["pubKeyCredParams"]
    await c.close()


async def test_taken_username_is_1003(server: RunningServer) -> None:
    await registered(server, "alice")
    c = await WsClient.connect(server.url)
    code, _ = await c.error(T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="ALICE"))
    assert code == 1003
    await c.close()


async def test_invalid_username_is_1003(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    for bad in ["", "a b", "x" * 33, "-lead"]:
        code, _err = await c.error(T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username=bad))
        assert code == 1003, bad
    await c.close()


async def test_bad_attestation_is_1003(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    ch = await c.request(
        T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="eve"), T.AUTH_REGISTER_CHALLENGE
    )
    code, err = await c.error(
        T.AUTH_REGISTER_RESPONSE,
        registration_response(
            SoftwareAuthenticator(), ch.credential_creation_options, "https://evil.example"
        ),
    )
    assert code == 1003 and "origin" in err.message
    assert await server.app.storage.users.get_by_username("eve") is None
    await c.close()


async def test_registration_challenge_is_single_use(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    ch = await c.request(
        T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="carol"), T.AUTH_REGISTER_CHALLENGE
    )
    resp = registration_response(SoftwareAuthenticator(), ch.credential_creation_options)
    await c.request(T.AUTH_REGISTER_RESPONSE, resp, T.AUTH_REGISTER_SUCCESS)
    c2 = await WsClient.connect(server.url)
    code, _ = await c2.error(T.AUTH_REGISTER_RESPONSE, resp)
    assert code == 1004
    await c.close()
    await c2.close()


async def test_registration_policy_closed(server_with: ServerWith) -> None:
    async with server_with(registration="closed") as srv:
        c = await WsClient.connect(srv.url)
        code, err = await c.error(T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="x"))
        assert code == 1003 and "closed" in err.message
        await c.close()


async def test_registration_policy_invite_single_use(server_with: ServerWith) -> None:
    async with server_with(registration="invite") as srv:
        c = await WsClient.connect(srv.url)
        code, _ = await c.error(T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="x"))
        assert code == 1003
        code, _ = await c.error(
            T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="x", invite_code="bogus")
        )
        assert code == 1003
        invite = await srv.app.auth.create_invite(None)
        await register(c, "first", invite_code=invite)
        c2 = await WsClient.connect(srv.url)
        code, _ = await c2.error(
            T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="second", invite_code=invite)
        )
        assert code == 1003
        await c.close()
        await c2.close()


async def test_invite_consumed_only_once_under_a_race(server_with: ServerWith) -> None:
    async with server_with(registration="invite") as srv:
        invite = await srv.app.auth.create_invite(None)
        clients = [await WsClient.connect(srv.url) for _ in range(2)]
        challenges = [
            await c.request(
                T.AUTH_REGISTER_REQUEST,
                pb.AuthRegisterRequest(username=f"u{i}", invite_code=invite),
                T.AUTH_REGISTER_CHALLENGE,
            )
            for i, c in enumerate(clients)
        ]
        rids = []
        for c, ch in zip(clients, challenges, strict=True):
            rids.append(
                c.send(
                    T.AUTH_REGISTER_RESPONSE,
                    registration_response(SoftwareAuthenticator(), ch.credential_creation_options),
                )
            )
        results = [await c.recv() for c in clients]
        assert sorted(r.type for r in results) == [T.AUTH_ERROR, T.AUTH_REGISTER_SUCCESS]
        assert await srv.app.storage.users.count() == 1
        for c in clients:
            await c.close()


async def test_bootstrap_code_creates_first_admin_once(server_with: ServerWith) -> None:
    async with server_with(registration="closed") as srv:
        code = await srv.app.auth.ensure_bootstrap()
        assert code is not None
        c = await WsClient.connect(srv.url)
        admin = await register(c, "root", invite_code=code)
        user = await srv.app.storage.users.get_by_id(admin.user_id)
        assert user is not None and user.is_admin
        assert await srv.app.auth.ensure_bootstrap() is None  # an admin exists now
        c2 = await WsClient.connect(srv.url)
        err, _ = await c2.error(
            T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="again", invite_code=code)
        )
        assert err == 1003
        success = await login(c2, admin)
        assert success.is_admin
        await c.close()
        await c2.close()


async def test_bootstrap_code_under_open_policy_still_makes_admin(server: RunningServer) -> None:
    code = await server.app.auth.ensure_bootstrap()
    assert code is not None
    acct = await registered(server, "boss", invite_code=code)
    user = await server.app.storage.users.get_by_id(acct.user_id)
    assert user is not None and user.is_admin


async def test_ordinary_invite_ignored_under_open(server: RunningServer) -> None:
    acct = await registered(server, "walkin", invite_code="not-a-real-code")
    assert acct.user_id


# -- login ---------------------------------------------------------------------------


async def test_login_with_passkey(server_with: ServerWith) -> None:
    async with server_with(server_name="Family") as srv:
        acct = await registered(srv, "alice")
        c = await WsClient.connect(srv.url)
        success = await login(c, acct)
        assert (success.user_id, success.username, success.display_name) == (
            acct.user_id,
            "alice",
            "alice",
        )
        assert success.server_name == "Family" and not success.is_admin
        assert success.session_token != acct.token  # a new device
        await c.close()


async def test_unknown_user_is_1001(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(username="nobody"))
    assert code == 1001
    await c.close()


async def test_wrong_origin_assertion_is_1004(server: RunningServer) -> None:
    acct = await registered(server)
    c = await WsClient.connect(server.url)
    opts = await login_challenge(c, "alice")
    code, err = await c.error(
        T.AUTH_RESPONSE, assertion_response(acct.authenticator, opts, "https://evil.example")
    )
    assert code == 1004 and "origin" in err.message
    await c.close()


async def test_wrong_rp_id_is_1004(server: RunningServer) -> None:
    acct = await registered(server)
    c = await WsClient.connect(server.url)
    opts = await login_challenge(c, "alice")
    code, err = await c.error(
        T.AUTH_RESPONSE, assertion_response(acct.authenticator, opts, rp_id="evil.example")
    )
    assert code == 1004 and "rp id" in err.message
    await c.close()


async def test_replayed_assertion_is_1004(server: RunningServer) -> None:
    acct = await registered(server)
    c = await WsClient.connect(server.url)
    opts = await login_challenge(c, "alice")
    resp = assertion_response(acct.authenticator, opts)
    await c.request(T.AUTH_RESPONSE, resp, T.AUTH_SUCCESS)
    c2 = await WsClient.connect(server.url)
    code, _ = await c2.error(T.AUTH_RESPONSE, resp)
    assert code == 1004
    await c.close()
    await c2.close()


async def test_sign_count_regression_is_1004(server: RunningServer) -> None:
    acct = await registered(server)
    c = await WsClient.connect(server.url)
    await login(c, acct)  # counter moves forward
    await c.close()
    c = await WsClient.connect(server.url)
    opts = await login_challenge(c, "alice")
    code, err = await c.error(
        T.AUTH_RESPONSE, assertion_response(acct.authenticator, opts, sign_count=1)
    )
    assert code == 1004 and "sign count" in err.message
    await c.close()


async def test_user_presence_required(server: RunningServer) -> None:
    acct = await registered(server)
    c = await WsClient.connect(server.url)
    opts = await login_challenge(c, "alice")
    code, err = await c.error(
        T.AUTH_RESPONSE, assertion_response(acct.authenticator, opts, user_present=False)
    )
    assert code == 1004 and "present" in err.message
    await c.close()


async def test_credential_of_another_user_is_1001(server: RunningServer) -> None:
    await registered(server, "alice")
    bob = await registered(server, "bob")
    c = await WsClient.connect(server.url)
    opts = await login_challenge(c, "alice")  # challenge bound to alice
    import orjson

    o = orjson.loads(opts)
    o["allowCredentials"] = []
    code, _ = await c.error(T.AUTH_RESPONSE, assertion_response(bob.authenticator, orjson.dumps(o)))
    assert code == 1001
    await c.close()


async def test_expired_challenge_is_1004(server_with: ServerWith) -> None:
    async with server_with(challenge_timeout=0.3) as srv:
        acct = await registered(srv)
        c = await WsClient.connect(srv.url)
        opts = await login_challenge(c, "alice")
        await asyncio.sleep(0.5)
        code, _ = await c.error(T.AUTH_RESPONSE, assertion_response(acct.authenticator, opts))
        assert code == 1004
        await c.close()


async def test_five_failures_non_fatal_sixth_closes_4002(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    for _ in range(5):
        code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(username="nobody"))
        assert code == 1001
    code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(username="nobody"))
    assert code == 1001
    assert await c.closed() == 4002


async def test_auth_requests_after_ready_are_refused(server: RunningServer) -> None:
    acct = await registered(server)
    c = await WsClient.connect(server.url)
    await resume(c, acct.token)
    code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(session_token=acct.token))
    assert code == 3001
    await c.close()


# -- sessions --------------------------------------------------------------------------


async def test_resume_returns_same_token_and_slides_expiry(server: RunningServer) -> None:
    acct = await registered(server)
    digest = hashlib.sha256(acct.token.encode()).digest()
    lifetime = server.config.session_timeout_hours * 3600 * 1_000_000

    def age(conn: sqlite3.Connection) -> None:  # as if the last resume was 2 h ago
        conn.execute(
            "UPDATE sessions SET expires_at_us = ? WHERE token_hash = ?",
            (SYSTEM_CLOCK.now_us() + lifetime - 2 * 3600 * 1_000_000, digest),
        )

    await server.app.storage.db.write(age)
    before = await server.app.storage.sessions.get_by_token_hash(digest)
    assert before is not None
    c = await WsClient.connect(server.url)
    success = await resume(c, acct.token)
    assert success.session_token == acct.token and success.user_id == acct.user_id
    after = await server.app.storage.sessions.get_by_token_hash(digest)
    assert after is not None
    assert after.expires_at_us - before.expires_at_us >= 2 * 3600 * 1_000_000 - 10_000_000
    assert after.device_id == before.device_id  # resuming is the same device
    # An immediate second resume gains < 1 minute: no write (decisions.md), same token.
    c2 = await WsClient.connect(server.url)
    assert (await resume(c2, acct.token)).session_token == acct.token
    again = await server.app.storage.sessions.get_by_token_hash(digest)
    assert again is not None and again.expires_at_us == after.expires_at_us
    await c.close()
    await c2.close()


@pg.sqlite_only("reads the database file and its WAL byte for byte")
async def test_only_token_digest_is_stored(server: RunningServer) -> None:
    acct = await registered(server)
    raw = server.config.sqlite_path.read_bytes()
    wal = server.config.sqlite_path.with_name("sovereign.db-wal")
    raw += wal.read_bytes() if wal.exists() else b""
    assert acct.token.encode() not in raw
    db = sqlite3.connect(server.config.sqlite_path)
    hashes = [r[0] for r in db.execute("SELECT token_hash FROM sessions")]
    db.close()
    assert hashlib.sha256(acct.token.encode()).digest() in hashes


async def test_unknown_token_is_1001_non_fatal(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(session_token="A" * 43))
    assert code == 1001
    assert await c.request(T.PING, pb.Ping(timestamp=1), T.PONG) == pb.Pong(timestamp=1)
    await c.close()


async def test_expired_token_is_1002_then_4004(server: RunningServer) -> None:
    acct = await registered(server)
    digest = hashlib.sha256(acct.token.encode()).digest()

    def expire(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE sessions SET expires_at_us = ? WHERE token_hash = ?",
            (SYSTEM_CLOCK.now_us() - 1, digest),
        )

    await server.app.storage.db.write(expire)
    c = await WsClient.connect(server.url)
    code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(session_token=acct.token))
    assert code == 1002
    assert await c.closed() == 4004


async def test_revoked_token_is_1005_then_4004(server: RunningServer) -> None:
    acct = await registered(server)
    session = await server.app.storage.sessions.get_by_token_hash(
        hashlib.sha256(acct.token.encode()).digest()
    )
    assert session is not None
    live = await WsClient.connect(server.url)
    await resume(live, acct.token)
    assert await server.app.revoke_session(session.session_id)
    assert await live.closed() == 4004  # live connections of the session are closed
    c = await WsClient.connect(server.url)
    code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(session_token=acct.token))
    assert code == 1005
    assert await c.closed() == 4004


async def test_disabled_account_is_2004_then_4005(server: RunningServer) -> None:
    acct = await registered(server)
    live = await WsClient.connect(server.url)
    await resume(live, acct.token)
    await server.app.set_user_enabled(acct.user_id, False)
    assert await live.closed() == 4005
    c = await WsClient.connect(server.url)
    code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(session_token=acct.token))
    assert code == 2004
    assert await c.closed() == 4005
    c = await WsClient.connect(server.url)
    code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(username="alice"))
    assert code == 2004
    assert await c.closed() == 4005


async def test_per_user_cap_closes_oldest_4003(server_with: ServerWith) -> None:
    async with server_with(max_connections_per_user=2) as srv:
        acct = await registered(srv)
        conns = []
        for _ in range(3):
            c = await WsClient.connect(srv.url)
            await resume(c, acct.token)
            conns.append(c)
        assert await conns[0].closed() == 4003
        for c in conns[1:]:
            assert await c.request(T.PING, pb.Ping(timestamp=1), T.PONG) == pb.Pong(timestamp=1)
            await c.close()


# -- original clients (SPEC §12.26, defect 10) -------------------------------------------


async def test_original_client_resumes_with_the_token_in_username(server: RunningServer) -> None:
    acct = await registered(server)
    c = await WsClient.connect(server.url)
    ok = await c.request(T.AUTH_REQUEST, pb.AuthRequest(username=acct.token), T.AUTH_SUCCESS)
    assert ok.user_id == acct.user_id and ok.session_token == acct.token
    await c.until_sync()
    # a well-formed token that is not a session: AuthError 1001, like any resume
    c2 = await WsClient.connect(server.url)
    code, _ = await c2.error(T.AUTH_REQUEST, pb.AuthRequest(username="B" * 43))
    assert code == 1001
    await c.close()
    await c2.close()
