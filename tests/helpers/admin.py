"""A real HTTP client for the admin listener, and the real passkey ceremonies of the
panel (the software authenticator plays the browser's part)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from sovereign.client.authenticator import SoftwareAuthenticator
from tests.helpers.server import RunningServer


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def code(self) -> int | None:
        return (
            self.body["error"]["code"]
            if isinstance(self.body, dict) and "error" in self.body
            else None
        )


class AdminApi:
    """``await api.get("/admin/api/info")`` -> Reply; Bearer ``token`` if given."""

    def __init__(self, base: str, token: str = "", origin: str | None = None) -> None:
        self.base = base
        self.token = token
        self.origin = origin
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        h = dict(headers or {})
        if self.token:
            h.setdefault("Authorization", f"Bearer {self.token}")
        if self.origin is not None:
            h.setdefault("Origin", self.origin)
        body = data if data is not None else (orjson.dumps(json) if json is not None else None)
        if body is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=body, headers=h) as r:
            raw = await r.read()
            try:
                parsed: Any = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                parsed = raw.decode("utf-8", "replace")
            return Reply(r.status, parsed, r.headers)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def put(self, path: str, json: Any = None, **kw: Any) -> Reply:
        return await self.request("PUT", path, json, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> Reply:
        return await self.request("POST", path, json, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.request("DELETE", path, **kw)

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> AdminApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def admin_token(srv: RunningServer, username: str = "root", *, admin: bool = True) -> str:
    """A user made by the operator path (like ``sovereign user create --print-token``)."""
    user = await srv.app.auth.create_user(username, is_admin=admin)
    _session, token = await srv.app.auth.create_session(user.user_id, None, "test")
    return token


def panel_origin(srv: RunningServer) -> str:
    assert srv.app.admin_listener is not None
    return f"http://localhost:{srv.app.admin_listener.port}"


async def setup_first_admin(
    api: AdminApi, code: str, username: str, auth: SoftwareAuthenticator, origin: str
) -> Reply:
    """The setup page's ceremony: options with the bootstrap code, attestation, verify."""
    r = await api.post("/admin/api/setup/options", {"token": code, "username": username})
    assert r.status == 200, r
    att = auth.create(orjson.dumps(r.body), origin)
    return await api.post(
        "/admin/api/setup/verify",
        {
            "credential_id": b64(att["credential_id"]),
            "authenticator_data": b64(att["authenticator_data"]),
            "client_data_json": b64(att["client_data_json"]),
            "attestation_object": b64(att["attestation_object"]),
        },
    )


async def sign_in(api: AdminApi, auth: SoftwareAuthenticator, origin: str, **knobs: Any) -> Reply:
    """The panel's sign-in: discoverable-credential options, assertion, verify."""
    r = await api.post("/admin/api/login/options")
    assert r.status == 200, r
    a = auth.get(orjson.dumps(r.body), origin, **knobs)
    return await api.post(
        "/admin/api/login/verify",
        {
            "credential_id": b64(a["credential_id"]),
            "authenticator_data": b64(a["authenticator_data"]),
            "client_data_json": b64(a["client_data_json"]),
            "signature": b64(a["signature"]),
            "user_handle": b64(a["user_handle"] or b""),
        },
    )
