"""The admin HTTP API on the real admin listener (SPEC §10, §12.23-§12.25, §12.28):
real HTTP, real WebSocket clients for the live effects, real passkey ceremonies."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp

from sovereign.admin.http import is_public
from sovereign.client.authenticator import SoftwareAuthenticator
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import mls, pg
from tests.helpers.admin import (
    AdminApi,
    admin_token,
    panel_origin,
    setup_first_admin,
    sign_in,
)
from tests.helpers.flows import register, resume
from tests.helpers.server import RunningServer, running_server
from tests.helpers.wsclient import WsClient

ServerWith = Callable[..., AbstractAsyncContextManager[RunningServer]]

#: Every route reachable without an admin session, each a deliberate decision.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/admin"),
    ("GET", "/admin/"),
    ("GET", "/admin/setup"),
    ("GET", "/admin/static/{name}"),
    ("GET", "/admin/api/openapi.json"),
    ("POST", "/admin/api/login/options"),
    ("POST", "/admin/api/login/verify"),
    ("POST", "/admin/api/logout"),
    ("POST", "/admin/api/setup/options"),
    ("POST", "/admin/api/setup/verify"),
}


def _routes(srv: RunningServer) -> list[tuple[str, str, object]]:
    assert srv.app.admin_listener is not None
    out = []
    for route in srv.app.admin_listener.http.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or ""
        if route.method == "HEAD":
            continue
        out.append((route.method, path, route.handler))
    return out


# -- deny by default -------------------------------------------------------------------


async def test_every_route_needs_an_admin_unless_declared_public(server: RunningServer) -> None:
    routes = _routes(server)
    assert len(routes) > 25  # guards the walk itself
    public = {(m, p) for m, p, h in routes if is_public(h)}
    assert public == PUBLIC, "a public route was added or removed: decide it here"
    user_token = await admin_token(server, "mallory", admin=False)
    async with AdminApi(server.admin) as anon, AdminApi(server.admin, user_token) as user:
        for method, path, handler in routes:
            if is_public(handler):
                continue
            url = re.sub(r"\{[^}]+\}", "x", path)
            r = await anon.request(method, url, json={})
            assert (r.status, r.code) == (401, 1006), (method, path, r)
            r = await user.request(method, url, json={})
            assert (r.status, r.code) == (403, 2003), (method, path, r)
        # Unknown paths under the API are no way around it either.
        assert (await anon.get("/admin/api/nope")).status == 401
        assert (await user.get("/admin/api/nope")).status == 403


async def test_bad_credentials_are_401(server: RunningServer) -> None:
    async with AdminApi(server.admin) as api:
        for header in ("Bearer", "Bearer nope", "Basic cm9vdDpyb290", "Bearer " + "A" * 43):
            r = await api.get("/admin/api/info", headers={"Authorization": header})
            assert (r.status, r.code) == (401, 1006), header
        api.session.cookie_jar.update_cookies({"sovereign_admin_session": "A" * 43})
        assert (await api.get("/admin/api/info")).status == 401
    # A device session is no cookie: the cookie takes admin-kind sessions only.
    token = await admin_token(server)
    async with AdminApi(server.admin) as api:
        api.session.cookie_jar.update_cookies({"sovereign_admin_session": token})
        assert (await api.get("/admin/api/info")).status == 401
        assert (
            await api.get("/admin/api/info", headers={"Authorization": f"Bearer {token}"})
        ).status == 200


# -- shapes: errors, pagination, bodies ----------------------------------------------------


async def test_info_lists_and_errors(server: RunningServer) -> None:
    token = await admin_token(server)
    for i in range(3):
        await server.app.auth.create_user(f"user{i}")
    async with AdminApi(server.admin, token) as api:
        info = (await api.get("/admin/api/info")).body
        assert info["total_users"] == 4 and info["server_name"] == "Sovereign"
        assert info["uptime_seconds"] >= 0 and info["database_size_bytes"] > 0
        for key in ("version", "active_connections", "total_messages", "started_at"):
            assert key in info
        r = await api.get("/admin/api/users?limit=2&offset=1")
        assert r.status == 200 and len(r.body["data"]) == 2
        assert r.body["pagination"] == {"offset": 1, "limit": 2, "total": 4}
        r = await api.get("/admin/api/users?search=USER1")
        assert [u["username"] for u in r.body["data"]] == ["user1"]
        for query, field in (
            ("limit=101", "limit"),
            ("limit=0", "limit"),
            ("offset=-1", "offset"),
            ("limit=ten", "limit"),
        ):
            r = await api.get(f"/admin/api/users?{query}")
            assert r.status == 422 and r.body["error"]["field"] == field, query
        r = await api.get("/admin/api/users/nobody")
        assert (r.status, r.code) == (404, 4006)
        uid = (await api.get("/admin/api/users?search=user0")).body["data"][0]["id"]
        r = await api.put(f"/admin/api/users/{uid}", data=b"{not json")
        assert (r.status, r.code) == (400, 3001)
        r = await api.put(
            f"/admin/api/users/{uid}", data=b'{"display_name": "' + b"x" * 70_000 + b'"}'
        )
        assert (r.status, r.code) == (413, 3003)
        r = await api.put(f"/admin/api/users/{uid}", {"enabled": "no"})
        assert r.status == 422 and r.body["error"]["field"] == "enabled"
        # A refused request changes nothing: the valid field before the bad one too.
        r = await api.put(f"/admin/api/users/{uid}", {"display_name": "New", "is_admin": 1})
        assert r.status == 422 and r.body["error"]["field"] == "is_admin"
        assert (await api.get(f"/admin/api/users/{uid}")).body["display_name"] == "user0"
        r = await api.put(f"/admin/api/users/{uid}", {"display_name": "Zero", "is_admin": True})
        assert r.status == 200 and r.body["display_name"] == "Zero" and r.body["is_admin"]


async def test_the_last_admin_cannot_be_deleted_disabled_or_demoted(server: RunningServer) -> None:
    token = await admin_token(server)
    async with AdminApi(server.admin, token) as api:
        me = (await api.get("/admin/api/me")).body["user"]["id"]
        assert (await api.delete(f"/admin/api/users/{me}")).status == 409
        assert (await api.put(f"/admin/api/users/{me}", {"enabled": False})).status == 409
        assert (await api.put(f"/admin/api/users/{me}", {"is_admin": False})).status == 409
        assert (await api.get("/admin/api/info")).status == 200  # still an admin
        other = await server.app.auth.create_user("second", is_admin=True)
        assert (await api.delete(f"/admin/api/users/{other.user_id}")).status == 204
        assert (await api.get(f"/admin/api/users/{other.user_id}")).status == 404


# -- live effects with real connected clients -------------------------------------------


async def test_disable_closes_the_users_sockets_4005_within_a_second(server: RunningServer) -> None:
    token = await admin_token(server)
    c = await WsClient.connect(server.url)
    bob = await register(c, "bob")
    async with AdminApi(server.admin, token) as api:
        # A refused change leaves bob connected.
        r = await api.put(f"/admin/api/users/{bob.user_id}", {"enabled": "false"})
        assert r.status == 422
        assert (await c.request(T.PING, pb.Ping(timestamp=1), T.PONG)).timestamp == 1
        t0 = time.monotonic()
        r = await api.put(f"/admin/api/users/{bob.user_id}", {"enabled": False})
        assert r.status == 200 and r.body["enabled"] is False
        assert await c.closed(1.0) == 4005
        assert time.monotonic() - t0 < 1.0
        c2 = await WsClient.connect(server.url)
        code, _ = await c2.error(T.AUTH_REQUEST, pb.AuthRequest(session_token=bob.token))
        assert code == 2004
        await c2.close()
        assert (await api.put(f"/admin/api/users/{bob.user_id}", {"enabled": True})).status == 200
        c3 = await WsClient.connect(server.url)
        await resume(c3, bob.token)
        await c3.close()


async def test_revoking_a_session_closes_it_4004(server: RunningServer) -> None:
    token = await admin_token(server)
    c = await WsClient.connect(server.url)
    bob = await register(c, "bob")
    async with AdminApi(server.admin, token) as api:
        r = await api.get(f"/admin/api/sessions?user_id={bob.user_id}")
        assert r.status == 200 and len(r.body["data"]) == 1
        session = r.body["data"][0]
        assert session["online"] is True and session["username"] == "bob"
        assert (await api.delete("/admin/api/sessions/nope")).status == 404
        assert (await api.delete(f"/admin/api/sessions/{session['id']}")).status == 204
        assert await c.closed(1.0) == 4004
        assert (await api.get(f"/admin/api/sessions?user_id={bob.user_id}")).body["data"] == []
        # "revoke sessions" of a user: every device at once
        c1, c2 = await WsClient.connect(server.url), await WsClient.connect(server.url)
        carol = await register(c1, "carol")
        await resume(c2, carol.token)
        r = await api.delete(f"/admin/api/users/{carol.user_id}/sessions")
        assert r.body == {"revoked": 1}
        assert await c1.closed(1.0) == 4004 and await c2.closed(1.0) == 4004


async def test_deleting_a_user_removes_them_from_groups(server: RunningServer) -> None:
    token = await admin_token(server)
    ca, cb = await WsClient.connect(server.url), await WsClient.connect(server.url)
    alice, bob = await register(ca, "alice"), await register(cb, "bob")
    await cb.request(
        T.MLS_KEY_PACKAGE_UPLOAD,
        pb.MLSKeyPackageUpload(key_packages=[mls.key_package(bob.user_id)]),
        T.ACK,
    )
    created = await ca.request(
        T.GROUP_CREATE, pb.GroupCreate(title="g", member_ids=[bob.user_id]), T.GROUP_CREATED
    )
    await cb.wait_for(T.GROUP_MEMBER_ADDED)
    async with AdminApi(server.admin, token) as api:
        detail = (await api.get(f"/admin/api/users/{bob.user_id}")).body
        assert [c["id"] for c in detail["conversations"]] == [created.conversation_id]
        assert detail["key_packages"] == 1 and len(detail["credentials"]) == 1
        assert detail["online"] is True and len(detail["sessions"]) == 1
        assert (await api.delete(f"/admin/api/users/{bob.user_id}")).status == 204
        assert await cb.closed(1.0) == 4004
        removed = await ca.wait_for(T.GROUP_MEMBER_REMOVED)
        assert (removed.conversation_id, removed.user_id) == (created.conversation_id, bob.user_id)
        assert (await api.get(f"/admin/api/users/{bob.user_id}")).status == 404
        assert (await api.delete(f"/admin/api/users/{bob.user_id}")).status == 404
    c = await WsClient.connect(server.url)
    code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(session_token=bob.token))
    assert code in (1001, 1005)
    await c.close()
    assert alice.user_id in server.app.services.state.convs[created.conversation_id].members


# -- settings (SPEC §12.23) ------------------------------------------------------------------


async def test_settings_apply_live_and_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_server(data, rate_limit_per_second=0.5, rate_limit_burst=100) as srv:
        token = await admin_token(srv)
        async with AdminApi(srv.admin, token) as api:
            got = {s["key"]: s for s in (await api.get("/admin/api/settings")).body["data"]}
            assert got["rate_limit_burst"] == {
                "key": "rate_limit_burst",
                "value": 100,
                "source": "flag",
            }
            assert got["max_connections_per_user"]["source"] == "default"
            # Validated whole: one bad field and nothing is applied.
            r = await api.put(
                "/admin/api/settings", {"rate_limit_burst": 2, "registration": "maybe"}
            )
            assert r.status == 422 and r.body["error"]["field"] == "registration"
            r = await api.put("/admin/api/settings", {"no_such": 1})
            assert r.status == 422 and r.body["error"]["field"] == "no_such"
            r = await api.put("/admin/api/settings", {"max_message_size_bytes": 10**9})
            assert r.status == 422 and r.body["error"]["field"] == "max_message_size_bytes"
            assert srv.config.rate_limit_burst == 100
            r = await api.put(
                "/admin/api/settings",
                {
                    "rate_limit_burst": 2,
                    "registration": "closed",
                    "max_message_size_bytes": 16,
                    "server_name": "Acme",
                },
            )
            assert r.status == 200
            got = {s["key"]: s for s in r.body["data"]}
            assert got["rate_limit_burst"] == {
                "key": "rate_limit_burst",
                "value": 2,
                "source": "admin",
            }
        # Without a restart: a new connection gets the new bucket ...
        c = await WsClient.connect(srv.url)
        for i in range(2):
            await c.request(T.PING, pb.Ping(timestamp=i), T.PONG)
        code, err = await c.error(T.PING, pb.Ping(timestamp=9))
        assert code == 3004 and err.retry_after_ms > 0
        await c.close()
        # ... registration is closed, and the message size cap is the new one.
        c = await WsClient.connect(srv.url)
        code, _ = await c.error(T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="eve"))
        assert code == 1003
        await c.close()
    # Stored values win over the flags after a restart.
    async with running_server(data, rate_limit_per_second=0.5, rate_limit_burst=100) as srv:
        assert (srv.config.rate_limit_burst, srv.config.registration) == (2, "closed")
        assert (srv.config.max_message_size_bytes, srv.config.server_name) == (16, "Acme")
        token = await admin_token(srv, "root2")
        async with AdminApi(srv.admin, token) as api:
            r = await api.delete("/admin/api/settings/rate_limit_burst")
            got = {s["key"]: s for s in r.body["data"]}
            assert got["rate_limit_burst"] == {
                "key": "rate_limit_burst",
                "value": 100,
                "source": "flag",
            }
            assert (await api.delete("/admin/api/settings/nope")).status == 404


async def test_connection_cap_setting_applies_to_new_connections(server: RunningServer) -> None:
    token = await admin_token(server)
    c1 = await WsClient.connect(server.url)
    bob = await register(c1, "bob")
    c2 = await WsClient.connect(server.url)
    await resume(c2, bob.token)  # the default cap (5) allows both
    async with AdminApi(server.admin, token) as api:
        r = await api.put("/admin/api/settings", {"max_connections_per_user": 2})
        assert r.status == 200
        await c1.nothing(0.2)  # lowering a cap drops nobody (SPEC §12.23)
        c3 = await WsClient.connect(server.url)
        await resume(c3, bob.token)  # over the new cap: the oldest goes, 4003
        assert await c1.closed(1.0) == 4003
    for c in (c2, c3):
        await c.close()


async def test_message_size_setting_applies_to_the_next_send(server: RunningServer) -> None:
    token = await admin_token(server)
    c = await WsClient.connect(server.url)
    await register(c, "alice")
    created = await c.request(T.GROUP_CREATE, pb.GroupCreate(title="solo"), T.GROUP_CREATED)
    send = pb.MessageSend(conversation_id=created.conversation_id, encrypted_payload=b"x" * 64)
    await c.request(T.MESSAGE_SEND, send, T.MESSAGE_RECEIVE)
    async with AdminApi(server.admin, token) as api:
        assert (await api.put("/admin/api/settings", {"max_message_size_bytes": 32})).status == 200
    code, _ = await c.error(T.MESSAGE_SEND, send)
    assert code == 3003
    await c.close()


# -- the panel's ceremonies and CSRF (SPEC §12.28) -----------------------------------------


async def test_setup_sign_in_csrf_and_sign_out(server_with: ServerWith) -> None:
    async with server_with(registration="invite") as srv:
        await _setup_sign_in_csrf_and_sign_out(srv)


async def _setup_sign_in_csrf_and_sign_out(server: RunningServer) -> None:
    code = await server.app.auth.ensure_bootstrap()
    assert code is not None
    origin = panel_origin(server)
    auth = SoftwareAuthenticator()
    async with AdminApi(server.admin, origin=origin) as api:
        # A wrong or missing origin on the ceremony is refused before anything happens.
        r = await api.post(
            "/admin/api/setup/options",
            {"token": code, "username": "root"},
            headers={"Origin": "http://evil.example"},
        )
        assert r.status == 403
        r = await api.post("/admin/api/setup/options", {"token": "wrong", "username": "root"})
        assert (r.status, r.code) == (400, 1003)
        r = await setup_first_admin(api, code, "root", auth, origin)
        assert r.status == 200 and r.body["user"]["username"] == "root"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
        assert (await api.get("/admin/api/me")).body["user"]["username"] == "root"
        # The code stops working everywhere once used.
        r = await api.post("/admin/api/setup/options", {"token": code, "username": "root2"})
        assert r.status == 400
        c = await WsClient.connect(server.url)
        code_ws, _ = await c.error(
            T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="x", invite_code=code)
        )
        assert code_ws == 1003
        await c.close()
        # CSRF: a cookie write needs a same-origin Origin or Sec-Fetch-Site.
        invite = {"expires_in_hours": 1}
        assert (
            await api.post("/admin/api/invites", invite, headers={"Origin": "http://evil.example"})
        ).status == 403
        api.origin = None
        assert (await api.post("/admin/api/invites", invite)).status == 403
        r = await api.post("/admin/api/invites", invite, headers={"Sec-Fetch-Site": "same-origin"})
        assert r.status == 201
        assert (await api.get("/admin/api/invites")).body["pagination"]["total"] == 2  # + bootstrap
        api.origin = origin
        # Sign out, then in again with the same passkey (sign count moves on).
        assert (await api.post("/admin/api/logout")).status == 204
        assert (await api.get("/admin/api/me")).status == 401
        r = await sign_in(api, auth, origin)
        assert r.status == 200 and r.body["user"]["username"] == "root"
        assert (await api.get("/admin/api/me")).status == 200
        # Replayed sign count (a cloned authenticator) and a foreign origin are refused.
        r = await sign_in(api, auth, origin, sign_count=1)
        assert (r.status, r.code) == (401, 1004)
        r = await sign_in(api, auth, "http://localhost:9")
        assert r.status in (401, 403)


async def test_a_non_admin_passkey_cannot_sign_in(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    acc = await register(c, "bob", authenticator=SoftwareAuthenticator())
    await c.close()
    origin = panel_origin(server)
    # The WebSocket's origin (rp_origins) is accepted too: same passkey, same rp_id.
    async with AdminApi(server.admin, origin=origin) as api:
        r = await sign_in(api, acc.authenticator, "http://localhost:8080")
        assert (r.status, r.code) == (403, 2003)
        assert (await api.get("/admin/api/me")).status == 401


# -- invites ---------------------------------------------------------------------------------


async def test_invites_create_list_use_and_revoke(server_with: ServerWith) -> None:
    async with server_with(registration="invite") as srv:
        token = await admin_token(srv)
        async with AdminApi(srv.admin, token) as api:
            r = await api.post("/admin/api/invites", {"expires_in_hours": -1})
            assert r.status == 422 and r.body["error"]["field"] == "expires_in_hours"
            r = await api.post("/admin/api/invites", {"expires_in_hours": 24})
            assert r.status == 201 and r.body["status"] == "open"
            code, invite_id = r.body["code"], r.body["id"]
            assert r.body["expires_at"] > time.time() * 1000
            c = await WsClient.connect(srv.url)
            await register(c, "newbie", invite_code=code)
            await c.close()
            listed = (await api.get("/admin/api/invites")).body["data"]
            assert [i["status"] for i in listed if i["id"] == invite_id] == ["used"]
            assert code not in str(listed)  # only shown once, at creation
            second = (await api.post("/admin/api/invites", {})).body
            assert (await api.delete(f"/admin/api/invites/{second['id']}")).status == 204
            assert (await api.delete(f"/admin/api/invites/{second['code']}")).status == 404
            c = await WsClient.connect(srv.url)
            err, _ = await c.error(
                T.AUTH_REGISTER_REQUEST,
                pb.AuthRegisterRequest(username="late", invite_code=second["code"]),
            )
            assert err == 1003
            await c.close()


# -- MLS health (SPEC §12.24) ----------------------------------------------------------------


async def test_mls_health_shows_epochs_conflicts_and_pools(server_with: ServerWith) -> None:
    async with server_with(min_key_packages=2) as srv:
        token = await admin_token(srv)
        ca, cb = await WsClient.connect(srv.url), await WsClient.connect(srv.url)
        alice, bob = await register(ca, "alice"), await register(cb, "bob")
        await cb.request(
            T.MLS_KEY_PACKAGE_UPLOAD,
            pb.MLSKeyPackageUpload(key_packages=[mls.key_package(bob.user_id) for _ in range(3)]),
            T.ACK,
        )
        created = await ca.request(
            T.GROUP_CREATE,
            pb.GroupCreate(title="crypto", member_ids=[bob.user_id]),
            T.GROUP_CREATED,
        )
        conv = created.conversation_id
        gid = b"admin-health-gid"
        commit = pb.MLSCommit(
            conversation_id=conv, commit_data=mls.commit(gid, 0), group_info=mls.group_info(gid, 1)
        )
        await ca.request(T.MLS_COMMIT, commit, T.MLS_COMMIT_BROADCAST)
        code, _ = await cb.error(
            T.MLS_COMMIT, pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(gid, 0))
        )
        assert code == 5004
        async with AdminApi(srv.admin, token) as api:
            rows = (await api.get("/admin/api/mls/conversations")).body["data"]
            row = next(r for r in rows if r["id"] == conv)
            assert row["epoch"] == 1 and row["mls_group_id"] == gid.hex()
            assert row["commits_rejected_24h"] == 1 and row["group_info_stored"] is True
            assert row["member_count"] == 2 and row["title"] == "crypto"
            assert (
                row["last_commit_at"] is not None
                and abs(row["last_commit_at"] / 1000 - time.time()) < 60
            )
            assert row["pending_welcomes"] == 0
            devices = {
                d["username"]: d for d in (await api.get("/admin/api/mls/devices")).body["data"]
            }
            assert devices["bob"]["key_packages"] == 3 and devices["bob"]["below_min"] is False
            assert devices["alice"]["key_packages"] == 0 and devices["alice"]["below_min"] is True
            assert "root" in devices  # the operator's CLI device
            text = (await api.get("/metrics")).body
            assert "sovereign_mls_epoch_conflicts_total 1.0" in text
            assert re.search(r"sovereign_key_package_pools_below_min [1-9]", text)
        for c in (ca, cb):
            await c.close()
        assert alice.user_id


# -- metrics and health (SPEC §12.25) ---------------------------------------------------------


async def test_metrics_count_the_request_path(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    account = await register(c, "alice")
    created = await c.request(T.GROUP_CREATE, pb.GroupCreate(title="m"), T.GROUP_CREATED)
    for i in range(5):
        await c.request(
            T.MESSAGE_SEND,
            pb.MessageSend(conversation_id=created.conversation_id, encrypted_payload=b"p%d" % i),
            T.MESSAGE_RECEIVE,
        )
    await c.close()
    c = await WsClient.connect(server.url)
    await resume(c, account.token)
    await c.close()
    await asyncio.sleep(0.1)
    async with AdminApi(server.admin) as api:
        r = await api.get("/metrics")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text: str = r.body
    assert 'sovereign_envelopes_in_total{type="MESSAGE_SEND"} 5.0' in text
    assert 'sovereign_envelopes_out_total{type="MESSAGE_RECEIVE"} 5.0' in text
    # A resume's AUTH_SUCCESS leaves in the sync's write (Outbox.response_frame): counted.
    assert 'sovereign_envelopes_out_total{type="AUTH_SUCCESS"} 1.0' in text
    assert 'sovereign_auth_total{outcome="success"} 2.0' in text  # the register, the resume
    assert re.search(r'sovereign_closes_total\{code="1000"\} 2\.0', text)
    assert re.search(r"sovereign_events_stored_total [1-9]", text)
    assert re.search(r'sovereign_send_commit_seconds_bucket\{le="\+Inf"\} [1-9]', text)
    assert re.search(r"sovereign_writer_batch_size_count [1-9]", text)
    assert "sovereign_writer_commit_seconds_sum" in text
    # SQLite: the sends' batches committed on the event loop (this disk syncs in well
    # under sqlite_inline_commit_ms); PostgreSQL commits on the writer thread only.
    on_loop = re.search(r"^sovereign_writer_commits_on_loop_total (\S+)$", text, re.M)
    assert on_loop is not None
    assert (float(on_loop.group(1)) > 0) == (pg.STORAGE == "sqlite")
    assert "sovereign_rate_limited_total" in text
    # No user ids or tokens in label values.
    assert not re.search(r"\{[^}]*[0-9A-HJKMNP-TV-Z]{26}", text)


async def test_health_and_readiness_until_shutdown(tmp_path: Path) -> None:
    srv_cm = running_server(tmp_path / "data")
    srv = await srv_cm.__aenter__()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(srv.admin + "/healthz") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            async with http.get(srv.admin + "/readyz") as r:
                body = await r.json()
                assert r.status == 200 and all(body["checks"].values()), body
            # The WebSocket listener keeps its own /healthz.
            async with http.get(f"http://{srv.base}/healthz") as r:
                assert r.status == 200
            c = await WsClient.connect(srv.url)
            shutdown = asyncio.create_task(srv.app.shutdown(timeout=5))
            await asyncio.sleep(0)
            async with http.get(srv.admin + "/readyz") as r:
                body = await r.json()
                assert r.status == 503 and body["checks"]["accepting"] is False, body
            await shutdown
            assert await c.closed(1.0) == 4006
    finally:
        if not srv.app._stopped.is_set():
            await srv_cm.__aexit__(None, None, None)


async def test_metrics_off_counts_nothing_on_the_request_path(server_with: ServerWith) -> None:
    async with server_with(metrics=False) as srv:
        assert srv.app.stats is None and srv.app.outbox.stats is None
        c = await WsClient.connect(srv.url)
        await register(c, "alice")
        await c.close()
        async with AdminApi(srv.admin) as api:
            r = await api.get("/metrics")
        assert r.status == 200
        assert "sovereign_connections" in r.body and "sovereign_writer_batch_size" in r.body
        assert "sovereign_envelopes_in" not in r.body


async def test_openapi_document_is_served_without_auth(server: RunningServer) -> None:
    from sovereign import __version__
    from sovereign.admin.openapi import document

    async with AdminApi(server.admin) as api:
        r = await api.get("/admin/api/openapi.json")
    assert r.status == 200 and r.body == document(__version__)
    documented = {(method.upper(), path) for path, ops in r.body["paths"].items() for method in ops}
    served = {(m, p) for m, p, h in _routes(server) if not is_public(h)}
    # Every authenticated route but the panel's own helpers is in the document.
    assert served - documented == {("GET", "/admin/api/me")}, served - documented
