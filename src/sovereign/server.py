"""Composition root: wires config, storage, services, dispatcher and transport.

Requests flow transport (``transport.ws``) -> dispatcher (``_fast.dispatch`` or its
twin) -> API handlers (``sovereign.api``) -> services -> storage. This module owns the
live-connection registry, the timers and the shutdown sequence (SPEC §4).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
import picows

from sovereign import __version__, codec
from sovereign.config import Config, ConfigError
from sovereign.errors import CloseCode, SovereignError
from sovereign.protocol.connection import Timeouts
from sovereign.protocol.types import PRE_AUTH_TYPES
from sovereign.storage import Storage, open_storage
from sovereign.transport.ws import Connection, make_listener_factory

log = logging.getLogger("sovereign.server")

Handler = Callable[[Connection, int, str, memoryview], object]


def _load_dispatch() -> tuple[Any, str]:
    from sovereign import implementations

    return implementations.select("dispatch")


class App:
    """The running server: one per process."""

    def __init__(self, config: Config, storage: Storage) -> None:
        from sovereign import api
        from sovereign.services.auth import AuthService

        self.config = config
        self.storage = storage
        self.clock: Callable[[], float] = time.monotonic
        self.started_at = time.time()
        self.accepting = True
        self.allowed_origins = frozenset(config.origins_allowed)
        self.timeouts = Timeouts(
            auth_timeout=config.auth_timeout,
            idle_timeout=config.idle_timeout,
            max_auth_failures=config.max_auth_failures,
        )
        self.connections: dict[int, Connection] = {}
        self.by_user: dict[str, list[Connection]] = {}
        self._conn_seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.rejected: dict[int, int] = {}
        self.auth = AuthService(config, storage)
        from sovereign.services.messaging import MessagingService

        self.messaging = MessagingService(self)
        self.auth.device_hooks.append(self.messaging.device_created)
        from sovereign.services.mls import MlsService

        self.mls = MlsService(self, self.messaging)
        # Awaited at the end of a connection's offline sync, after presence (SPEC §4).
        self.sync_hooks: list[Callable[[Connection], Awaitable[None]]] = [self.mls.on_sync_end]
        self._dispatch_mod, self.dispatch_impl = _load_dispatch()
        self.handlers: dict[int, Handler] = {}
        api.install(self)
        self.dispatcher = self._dispatch_mod.Dispatcher(
            self.handlers, [int(t) for t in PRE_AUTH_TYPES], config.max_envelope_bytes
        )
        # While a commit's effects run, frames per connection collect here and go out
        # in one write each (a write is one syscall: the dominant cost per message).
        self.corked: dict[Connection, bytearray] | None = None
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        # Called once a connection is READY and its success response is out; the
        # messaging service hooks its sync/presence work here (SPEC §4 "On READY").
        self.ready_hooks: list[Callable[[Connection], None]] = [self.messaging.on_ready]

    # -- connection registry ------------------------------------------------
    def next_conn_id(self) -> int:
        self._conn_seq += 1
        return self._conn_seq

    def new_bucket(self) -> Any:
        cfg = self.config
        return self._dispatch_mod.TokenBucket(
            cfg.rate_limit_per_second, cfg.rate_limit_burst, self.clock()
        )

    def connection_count(self) -> int:
        return len(self.connections)

    def connection_opened(self, conn: Connection) -> None:
        self.connections[conn.conn_id] = conn

    def connection_closed(self, conn: Connection) -> None:
        self.connections.pop(conn.conn_id, None)
        if conn.user_id:
            _remove(self.by_user, conn.user_id, conn)
            self.messaging.detach(conn)

    def mark_ready(
        self,
        conn: Connection,
        *,
        user_id: str,
        username: str,
        session_id: str,
        device_id: str,
        is_admin: bool,
    ) -> bool:
        """AUTHENTICATING -> READY; enforces max_connections_per_user (SPEC §4)."""
        if conn.state.closed:
            return False
        conn.state.authenticated()
        # conn.live (fan-out writes directly) is set by the messaging service once the
        # offline backlog is out: live events meanwhile wait in its SyncState (SPEC §4).
        conn.user_id = user_id
        conn.username = username
        conn.session_id = session_id
        conn.device_id = device_id
        conn.is_admin = is_admin
        conn.ready_at = self.clock()
        conns = self.by_user.setdefault(user_id, [])
        conns.append(conn)
        while len(conns) > self.config.max_connections_per_user:
            oldest = conns[0]
            log.info("user %s over connection cap: closing oldest connection", user_id)
            oldest.close(CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
            _remove(self.by_user, user_id, oldest)
        return True

    def on_ready(self, conn: Connection) -> None:
        for hook in self.ready_hooks:
            hook(conn)

    def close_session(self, session_id: str, code: int, reason: str) -> int:
        # A scan, not an index: revocation is rare and an index costs every idle
        # connection a dict entry and a list.
        conns = [c for c in self.connections.values() if c.session_id == session_id]
        for c in conns:
            c.close(code, reason)
        return len(conns)

    def close_user(self, user_id: str, code: int, reason: str) -> int:
        conns = list(self.by_user.get(user_id, ()))
        for c in conns:
            c.close(code, reason)
        return len(conns)

    async def set_user_enabled(self, user_id: str, enabled: bool) -> None:
        """Disabling closes the user's live connections with 4005 (SPEC §4)."""
        await self.storage.users.set_enabled(user_id, enabled)
        if not enabled:
            self.close_user(user_id, CloseCode.ACCOUNT_DISABLED, "account disabled")

    async def revoke_session(self, session_id: str) -> bool:
        """Revoking closes the session's live connections with 4004 (SPEC §4)."""
        from sovereign.services.tokens import now_us

        revoked = await self.storage.sessions.revoke(session_id, now_us())
        self.close_session(session_id, CloseCode.SESSION_INVALID, "session revoked")
        return revoked

    # -- request path --------------------------------------------------------
    def dispatch(self, conn: Connection, buf: memoryview, now: float) -> None:
        try:
            self.dispatcher.dispatch(conn, conn.bucket, buf, conn.state.ready, now)
        except Exception:
            # SPEC §8: an unexpected exception answers 9001; the connection stays up.
            log.exception("handler failed")
            conn.send_error(9001, "", "internal error")

    def spawn(self, conn: Connection, request_id: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run an async request; any failure becomes exactly one error response."""
        task = asyncio.get_running_loop().create_task(self._guard(conn, request_id, coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        """A task the server owns (kept referenced; awaited at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, conn: Connection, request_id: str, coro: Awaitable[None]) -> None:
        try:
            await coro
        except SovereignError as exc:
            conn.send_error(exc.code, request_id, exc.message, exc.retry_after_ms)
        except Exception:
            log.exception("request failed")
            conn.send_error(9001, request_id, "internal error")

    def cork(self) -> None:
        if self.corked is None:
            self.corked = {}

    def uncork(self) -> None:
        corked, self.corked = self.corked, None
        if not corked:
            return
        limit = self.config.send_buffer_limit
        for conn, buf in corked.items():
            out = conn.out
            if out is None or conn.state.closed:
                continue
            if out.get_write_buffer_size() + len(buf) > limit:
                conn.overflow()
            else:
                out.write(buf)  # not mutated after: no copy

    def metrics_rejected(self, code: int) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    def health_body(self) -> bytes:
        return orjson.dumps({"status": "ok", "version": __version__})

    # -- timers ----------------------------------------------------------------
    async def _sweep(self) -> None:
        """One sweeper for every connection's auth and idle deadline (SPEC §4).

        A single periodic scan is cheaper in memory than a timer handle per
        connection; the granularity is a quarter of the shortest timeout, at most 1 s.
        """
        t = self.timeouts
        interval = min(1.0, min(t.auth_timeout, t.idle_timeout) / 4)
        next_purge = 0.0
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            for conn in list(self.connections.values()):
                code = conn.state.expired(now, t)
                if code is not None:
                    conn.close(code, "auth timeout" if code == CloseCode.AUTH_TIMEOUT else "idle")
            if now >= next_purge:
                next_purge = now + 60.0
                await self.auth.purge_expired()

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        host, _, port = cfg.listen.rpartition(":")
        ssl_ctx = make_ssl_context(cfg)
        self._server = await picows.ws_create_server(
            make_listener_factory(self),
            host.strip("[]"),
            int(port),
            ssl=ssl_ctx,
            max_frame_size=cfg.max_frame_bytes,
            read_buffer_init_size=1024,
            enable_auto_pong=False,  # we answer pings ourselves so they reset the idle clock
            websocket_handshake_timeout=cfg.auth_timeout,
            use_aiofastnet=False,
            logger_name="transport",
            reuse_address=True,
            backlog=4096,  # resume storms: the default 100 drops SYNs (measured)
        )
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self.messaging.start_background()
        log.info(
            "sovereign %s listening on %s://%s (envelope codec: %s, dispatcher: %s)",
            __version__,
            "wss" if ssl_ctx else "ws",
            self.bound_address(),
            codec.IMPLEMENTATION,
            self.dispatch_impl,
        )

    def bound_address(self) -> str:
        assert self._server is not None
        sock = self._server.sockets[0].getsockname()
        return f"{sock[0]}:{sock[1]}"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def shutdown(self, timeout: float = 10.0) -> None:
        """SPEC §4: stop accepting, close every connection 4006, finish writes."""
        self.accepting = False
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections.values()):
            conn.close(CloseCode.SERVER_SHUTDOWN, "server shutdown")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        await self.messaging.stop()  # every queued event and ack reaches storage
        # Give transports a moment to flush their close frames.
        deadline = self.clock() + 2.0
        while self.connections and self.clock() < deadline:
            await asyncio.sleep(0.01)
        await self.storage.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _remove(index: dict[str, list[Connection]], key: str, conn: Connection) -> None:
    conns = index.get(key)
    if conns is None:
        return
    try:
        conns.remove(conn)
    except ValueError:
        return
    if not conns:
        del index[key]


def make_ssl_context(cfg: Config) -> ssl.SSLContext | None:
    """SPEC §11: TLS 1.2+ with modern ciphers when cert and key are configured."""
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls_cert: cannot load {cfg.tls_cert!r} with key {cfg.tls_key!r}: {exc}"
        ) from None
    return ctx


def tune_gc() -> None:
    """Collect less often, and never scan what start-up loaded.

    Measured with py-spy (native frames) under the relay load: 36% of the event loop's
    busy time was CPython's cyclic collector, run every 700 allocations and walking the
    large, long-lived caches (conversations, event index, idempotency keys). The hot
    path makes little cyclic garbage, so a higher first threshold costs little memory.
    """
    gc.collect()
    gc.freeze()  # everything loaded so far: permanent generation, never traversed
    gc.set_threshold(50_000, 50, 1_000)


async def create_app(config: Config) -> App:
    _load_dispatch()  # SOVEREIGN_REQUIRE_FAST fails here, before anything is opened
    storage = await open_storage(config.sqlite_path, max_batch=config.group_commit_max_batch)
    try:
        app = App(config, storage)
        await app.auth.load_settings()
        await app.messaging.load()
    except BaseException:
        await storage.close()
        raise
    return app


async def serve(config: Config, *, ready: Callable[[App], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    # Signals are caught from the first moment, so a SIGTERM during start-up still
    # shuts down gracefully (exit 0) once the server is up.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = await create_app(config)
    tune_gc()
    try:
        await app.start()
    except BaseException:
        await app.storage.close()
        raise
    code = await app.auth.ensure_bootstrap()
    if code is not None:
        # Printed, never logged: the operator needs it once. (The admin panel's setup
        # page, SPEC §10, is not built yet, so no URL is advertised.)
        print(
            "No admin exists yet. Register the first admin with this one-time code as "
            "invite_code (AUTH_REGISTER_REQUEST; works under any registration policy). "
            "A new code is printed at each start until an admin exists.\n"
            f"bootstrap code: {code}",
            flush=True,
        )
    if ready is not None:
        ready(app)
    await stop.wait()
    log.info("shutting down: closing %d connections", app.connection_count())
    await app.shutdown()
    log.info("stopped")
    return 0
