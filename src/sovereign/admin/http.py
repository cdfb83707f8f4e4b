"""The admin listener's routes (SPEC §10, §12.23-§12.25, §12.28).

Rules, in the order the middleware applies them:

1. Deny by default. Every route needs an enabled server admin unless its handler is
   marked :func:`public` (health, metrics, the panel's static files, the OpenAPI
   document and the sign-in / setup ceremonies). ``tests/integration/test_admin_api.py``
   walks the router table, so a route added without a decision fails the suite.
2. Credentials: ``Authorization: Bearer <session token>`` or the
   ``sovereign_admin_session`` cookie (an admin-kind session). None → 401 (1006); not
   an admin → 403 (2003).
3. CSRF: a write (any method but GET/HEAD) authenticated by the cookie, and every
   ceremony that sets the cookie, needs a same-origin ``Origin`` (or, without one,
   ``Sec-Fetch-Site: same-origin``). Bearer requests carry no ambient credential.
4. Errors are ``{"error": {"code", "message"[, "field"]}}``: ``code`` is the SPEC §8
   registry code where one applies, else the HTTP status. Malformed JSON → 400, a body
   over :data:`MAX_BODY` → 413, a bad field → 422 naming it. A refused request changes
   nothing: every check runs before the service acts.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sovereign.admin.metrics import Sources, SovereignCollector
from sovereign.admin.openapi import document
from sovereign.admin.timeseries import MinuteSeries
from sovereign.errors import REGISTRY, ErrorCode, SovereignError
from sovereign.services.admin import MAX_PAGE, AdminError, AdminService, Caller

log = logging.getLogger("sovereign.admin.http")

COOKIE = "sovereign_admin_session"
MAX_BODY = 64 * 1024
ADMIN_SESSION_SECONDS = 12 * 3600
_PUBLIC_ATTR = "__sovereign_public__"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


CALLER = web.RequestKey("caller", Caller)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The panel's files: read once, served by name from this table (no directory walk).
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


F = TypeVar("F", bound=Callable[..., Any])


def public(handler: F) -> F:
    """Mark a route as reachable without an admin session (a deliberate decision)."""
    setattr(handler, _PUBLIC_ATTR, True)
    return handler


_QUERY_ATTR = "__sovereign_query__"


def query(*names: str) -> Callable[[F], F]:
    """The query parameters a route takes; any other, or one given twice, is a 422."""

    def mark(handler: F) -> F:
        setattr(handler, _QUERY_ATTR, frozenset(names))
        return handler

    return mark


def check_query(request: web.Request, handler: Any) -> None:
    allowed: frozenset[str] = getattr(handler, _QUERY_ATTR, frozenset())
    for key in request.query:
        if key not in allowed:
            raise AdminError(422, f"{key[:40]}: unknown query parameter", field=key[:40])
        if len(request.query.getall(key)) > 1:
            raise AdminError(422, f"{key}: given more than once", field=key)


def is_public(handler: Any) -> bool:
    return bool(getattr(handler, _PUBLIC_ATTR, False))


@dataclass
class AdminContext:
    """What the routes use, handed over by the composition root (``server.App``)."""

    service: AdminService
    version: str
    started_at_s: int
    tls: bool
    origins: frozenset[str]  # origins accepted for the panel (CSRF + WebAuthn, §12.28)
    ready: Callable[[], Awaitable[dict[str, bool | None]]]
    metrics: Sources
    series: MinuteSeries


# -- responses ------------------------------------------------------------------------


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def error_response(status: int, code: int, message: str, field: str | None = None) -> web.Response:
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return json_response({"error": err}, status)


def _sovereign_error(exc: SovereignError) -> web.Response:
    return error_response(REGISTRY[exc.code].http_status, exc.code, exc.message)


# -- request parsing ---------------------------------------------------------------------


async def read_json(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise AdminError(413, f"body larger than {MAX_BODY} bytes") from None
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise AdminError(400, "body is not valid JSON") from None


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int | None) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise AdminError(422, f"{name}: must be an integer", field=name) from None
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise AdminError(422, f"{name}: must be {bound}", field=name)
    return value


def page_params(request: web.Request) -> tuple[int, int]:
    offset = _int_param(request, "offset", 0, 0, 10_000_000)
    limit = _int_param(request, "limit", 50, 1, MAX_PAGE)
    return offset, limit


def _b64(body: dict[str, Any], key: str, *, required: bool = True) -> bytes:
    value = body.get(key, "")
    if not isinstance(value, str) or (required and not value) or len(value) > 16_384:
        raise AdminError(422, f"{key}: expected a base64url string", field=key)
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, TypeError):
        raise AdminError(422, f"{key}: expected a base64url string", field=key) from None


def _str(body: dict[str, Any], key: str, max_len: int, *, required: bool = True) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or (required and not value) or len(value) > max_len:
        raise AdminError(
            422, f"{key}: expected a string of at most {max_len} characters", field=key
        )
    return value


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise AdminError(422, "body: expected a JSON object", field="body")
    return body


# -- the application -----------------------------------------------------------------------


class AdminHttp:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self.svc = ctx.service
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SovereignCollector(ctx.metrics))
        self._pools_below = 0
        ctx.metrics.pools_below_min = lambda: self._pools_below
        self._static = _load_static()
        self._openapi = orjson.dumps(document(ctx.version))
        self.app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        self._routes()

    # -- middleware: errors, deny by default, CSRF --------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            match = request.match_info
            route_handler = match.handler if match.http_exception is None else None
            if route_handler is None or not is_public(route_handler):
                # Unknown paths and wrong methods are answered only after auth, too.
                request[CALLER] = await self._authenticate(request)
                if match.http_exception is not None:
                    raise match.http_exception
            if route_handler is not None:
                check_query(request, route_handler)
            return await handler(request)
        except SovereignError as exc:
            return _sovereign_error(exc)
        except AdminError as exc:
            code = {413: ErrorCode.MESSAGE_TOO_LARGE, 400: ErrorCode.MALFORMED_MESSAGE}.get(
                exc.status, exc.status
            )
            if exc.status == 422:
                code = ErrorCode.MALFORMED_MESSAGE
            return error_response(exc.status, int(code), exc.message, exc.field)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, ErrorCode.MESSAGE_TOO_LARGE, "body too large")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = error_response(exc.status, exc.status, exc.reason)
            if "Allow" in exc.headers:  # RFC 9110 §15.5.6: a 405 lists what is allowed
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admin request failed: %s %s", request.method, request.path)
            return error_response(500, ErrorCode.INTERNAL_ERROR, "internal error")

    async def _authenticate(self, request: web.Request) -> Caller:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise SovereignError(ErrorCode.AUTH_REQUIRED, "expected a Bearer token")
            return await self.svc.authenticate(token.strip(), cookie=False)
        cookie = request.cookies.get(COOKIE, "")
        if not cookie:
            raise SovereignError(ErrorCode.AUTH_REQUIRED, "sign in first")
        caller = await self.svc.authenticate(cookie, cookie=True)
        if request.method not in _SAFE_METHODS:
            self._same_origin(request)
        return caller

    def _same_origin(self, request: web.Request) -> None:
        """CSRF for cookie-authenticated writes and cookie-setting ceremonies."""
        origin = request.headers.get("Origin")
        if origin is not None:
            own = f"{'https' if self.ctx.tls else 'http'}://{request.host}"
            if origin == own or origin in self.ctx.origins:
                return
            raise SovereignError(ErrorCode.NOT_ADMIN, "cross-origin request refused")
        if request.headers.get("Sec-Fetch-Site") == "same-origin":
            return
        raise SovereignError(
            ErrorCode.NOT_ADMIN, "cross-origin request refused (no Origin or Sec-Fetch-Site)"
        )

    def _set_cookie(self, resp: web.Response, token: str) -> None:
        resp.set_cookie(
            COOKIE,
            token,
            max_age=ADMIN_SESSION_SECONDS,
            path="/admin",
            httponly=True,
            samesite="Strict",
            secure=self.ctx.tls,
        )

    # -- routes ---------------------------------------------------------------------------
    def _routes(self) -> None:
        r = self.app.router
        add = r.add_route
        add("GET", "/healthz", self.healthz)
        add("GET", "/readyz", self.readyz)
        add("GET", "/metrics", self.metrics)
        add("GET", "/admin", self.panel_redirect)
        add("GET", "/admin/", self.panel)
        add("GET", "/admin/setup", self.setup_page)
        add("GET", "/admin/static/{name}", self.static)
        add("GET", "/admin/api/openapi.json", self.openapi)
        add("POST", "/admin/api/login/options", self.login_options)
        add("POST", "/admin/api/login/verify", self.login_verify)
        add("POST", "/admin/api/logout", self.logout)
        add("POST", "/admin/api/setup/options", self.setup_options)
        add("POST", "/admin/api/setup/verify", self.setup_verify)
        add("GET", "/admin/api/me", self.me)
        add("GET", "/admin/api/info", self.info)
        add("GET", "/admin/api/stats", self.stats)
        add("GET", "/admin/api/users", self.users)
        add("GET", "/admin/api/users/{id}", self.user)
        add("PUT", "/admin/api/users/{id}", self.user_put)
        add("DELETE", "/admin/api/users/{id}", self.user_delete)
        add("DELETE", "/admin/api/users/{id}/sessions", self.user_sessions_delete)
        add("GET", "/admin/api/settings", self.settings)
        add("PUT", "/admin/api/settings", self.settings_put)
        add("DELETE", "/admin/api/settings/{key}", self.setting_delete)
        add("GET", "/admin/api/sessions", self.sessions)
        add("DELETE", "/admin/api/sessions/{id}", self.session_delete)
        add("POST", "/admin/api/invites", self.invite_create)
        add("GET", "/admin/api/invites", self.invites)
        add("DELETE", "/admin/api/invites/{code}", self.invite_delete)
        add("GET", "/admin/api/mls/conversations", self.mls_conversations)
        add("GET", "/admin/api/mls/devices", self.mls_devices)

    # -- operations (no auth: bind the admin listener to a private address, §12.25) ---------
    @public
    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok", "version": self.ctx.version})

    @public
    async def readyz(self, request: web.Request) -> web.Response:
        checks = await self.ctx.ready()
        ok = all(checks.values())
        return json_response(
            {"status": "ready" if ok else "unavailable", "checks": checks}, 200 if ok else 503
        )

    @public
    async def metrics(self, request: web.Request) -> web.Response:
        try:
            self._pools_below = await self.svc.pools_below_minimum()
        except Exception:  # a scrape during shutdown still answers
            log.debug("pool count unavailable", exc_info=True)
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- the panel's files ------------------------------------------------------------------
    def _file(self, name: str) -> web.Response:
        found = self._static.get(name)
        if found is None:
            raise AdminError(404, "not found")
        body, ctype = found
        headers = {
            "Content-Type": ctype,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            # The setup URL carries the bootstrap code: never leak it in a Referer.
            "Referrer-Policy": "no-referrer",
        }
        if ctype.startswith("text/html"):
            headers["Content-Security-Policy"] = CSP
            headers["X-Frame-Options"] = "DENY"
        return web.Response(body=body, headers=headers)

    @public
    async def panel_redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/admin/")

    @public
    async def panel(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    @public
    @query("token")
    async def setup_page(self, request: web.Request) -> web.Response:
        return self._file("setup.html")

    @public
    @query("v")
    async def static(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    @public
    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    # -- ceremonies (SPEC §12.28) --------------------------------------------------------------
    @public
    async def login_options(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        options = await self.svc.login_options()
        return web.Response(body=options, content_type="application/json")

    @public
    async def login_verify(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        body = _object(await read_json(request))
        user, token = await self.svc.login_verify(
            credential_id=_b64(body, "credential_id"),
            authenticator_data=_b64(body, "authenticator_data"),
            client_data_json=_b64(body, "client_data_json"),
            signature=_b64(body, "signature"),
            user_handle=_b64(body, "user_handle", required=False),
            user_agent=request.headers.get("User-Agent", "")[:200],
        )
        resp = json_response({"user": {"id": user.user_id, "username": user.username}})
        self._set_cookie(resp, token)
        return resp

    @public
    async def logout(self, request: web.Request) -> web.Response:
        """Revokes the cookie's admin session if there is one; always clears the cookie."""
        token = request.cookies.get(COOKIE, "")
        if token:
            self._same_origin(request)
            try:
                caller = await self.svc.authenticate(token, cookie=True)
            except SovereignError:
                caller = None
            if caller is not None:
                await self.svc.logout(caller)
        resp = web.Response(status=204)
        resp.del_cookie(COOKIE, path="/admin")
        return resp

    @public
    async def setup_options(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        body = _object(await read_json(request))
        options = await self.svc.setup_options(
            _str(body, "token", 100),
            _str(body, "username", 32),
            _str(body, "display_name", 64, required=False),
        )
        return web.Response(body=options, content_type="application/json")

    @public
    async def setup_verify(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        body = _object(await read_json(request))
        user, token = await self.svc.setup_verify(
            credential_id=_b64(body, "credential_id"),
            authenticator_data=_b64(body, "authenticator_data", required=False),
            client_data_json=_b64(body, "client_data_json"),
            attestation_object=_b64(body, "attestation_object"),
            user_agent=request.headers.get("User-Agent", "")[:200],
        )
        resp = json_response({"user": {"id": user.user_id, "username": user.username}})
        self._set_cookie(resp, token)
        return resp

    # -- the API ---------------------------------------------------------------------------------
    async def me(self, request: web.Request) -> web.Response:
        caller = request[CALLER]
        return json_response(
            {
                "user": {
                    "id": caller.user.user_id,
                    "username": caller.user.username,
                    "display_name": caller.user.display_name,
                },
                "server_name": self.svc.config.server_name,
                "version": self.ctx.version,
                # Where people use the server (invite links point there).
                "client_origin": self.svc.config.rp_origins[0],
            }
        )

    async def info(self, request: web.Request) -> web.Response:
        return json_response(await self.svc.info(self.ctx.started_at_s, self.ctx.version))

    async def stats(self, request: web.Request) -> web.Response:
        return json_response(self.ctx.series.body())

    @query("search", "offset", "limit")
    async def users(self, request: web.Request) -> web.Response:
        offset, limit = page_params(request)
        search = request.query.get("search", "")
        if len(search) > 64:
            raise AdminError(422, "search: at most 64 characters", field="search")
        return json_response((await self.svc.list_users(search, offset, limit)).body())

    async def user(self, request: web.Request) -> web.Response:
        return json_response(await self.svc.user_detail(request.match_info["id"]))

    async def user_put(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        return json_response(await self.svc.update_user(request.match_info["id"], body))

    async def user_delete(self, request: web.Request) -> web.Response:
        caller = request[CALLER]
        await self.svc.delete_user(request.match_info["id"])
        log.info("user deleted by admin %s", caller.user.user_id)
        return web.Response(status=204)

    async def user_sessions_delete(self, request: web.Request) -> web.Response:
        n = await self.svc.revoke_user_sessions(request.match_info["id"])
        return json_response({"revoked": n})

    async def settings(self, request: web.Request) -> web.Response:
        return json_response({"data": self.svc.settings()})

    async def settings_put(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        return json_response({"data": await self.svc.put_settings(body)})

    async def setting_delete(self, request: web.Request) -> web.Response:
        return json_response({"data": await self.svc.reset_setting(request.match_info["key"])})

    @query("user_id", "offset", "limit")
    async def sessions(self, request: web.Request) -> web.Response:
        offset, limit = page_params(request)
        user_id = request.query.get("user_id") or None
        return json_response((await self.svc.list_sessions(user_id, offset, limit)).body())

    async def session_delete(self, request: web.Request) -> web.Response:
        await self.svc.revoke_session(request.match_info["id"])
        return web.Response(status=204)

    async def invite_create(self, request: web.Request) -> web.Response:
        caller = request[CALLER]
        body = _object(await read_json(request))
        ttl = body.get("expires_in_hours", 168)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 24 * 365:
            raise AdminError(
                422, "expires_in_hours: an integer from 0 (never) to 8760", field="expires_in_hours"
            )
        invite = await self.svc.create_invite(caller.user.user_id, ttl)
        return json_response(invite, 201)

    @query("offset", "limit")
    async def invites(self, request: web.Request) -> web.Response:
        offset, limit = page_params(request)
        return json_response((await self.svc.list_invites(offset, limit)).body())

    async def invite_delete(self, request: web.Request) -> web.Response:
        await self.svc.delete_invite(request.match_info["code"])
        return web.Response(status=204)

    @query("offset", "limit")
    async def mls_conversations(self, request: web.Request) -> web.Response:
        offset, limit = page_params(request)
        return json_response((await self.svc.mls_conversations(offset, limit)).body())

    @query("offset", "limit")
    async def mls_devices(self, request: web.Request) -> web.Response:
        offset, limit = page_params(request)
        return json_response((await self.svc.mls_devices(offset, limit)).body())


def _load_static() -> dict[str, tuple[bytes, str]]:
    out: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("sovereign.admin").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _STATIC_TYPES:
            out[entry.name] = (entry.read_bytes(), _STATIC_TYPES[suffix])
    return out


class AdminListener:
    """Runs :class:`AdminHttp` on ``admin_listen`` in the current event loop."""

    def __init__(self, ctx: AdminContext) -> None:
        self.http = AdminHttp(ctx)
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.port = 0
        self.host = ""

    async def start(self, host: str, port: int, ssl_ctx: Any) -> None:
        # No access log: the setup URL's query holds the bootstrap code. A request still
        # running at shutdown gets 2 s (the WebSocket side drains first, SPEC §4).
        runner = web.AppRunner(
            self.http.app, access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, reuse_address=True)
        await site.start()
        self._runner = runner
        server = site._server
        assert server is not None
        sock = server.sockets[0].getsockname()  # type: ignore[attr-defined]
        self.host, self.port = sock[0], int(sock[1])
        self._sampler = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        series = self.http.ctx.series
        while True:
            series.sample()
            await asyncio.sleep(5.0)

    @property
    def bound(self) -> bool:
        return self._runner is not None

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with _suppress_cancel():
                await self._sampler
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class _suppress_cancel:
    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: object, exc: object, tb: object) -> bool:
        return tp is asyncio.CancelledError
