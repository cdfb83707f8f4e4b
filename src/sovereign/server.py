"""Composition root: builds the ports, the services over them, the API handler table,
the dispatcher and the transport, and owns the timers and the shutdown sequence
(SPEC §4).

Requests flow transport (``transport.ws``) -> dispatcher (``_fast.dispatch`` or its
twin) -> API handlers (``sovereign.api``) -> services -> storage; every frame to a
client leaves through the outbox (``transport.outbox``). This is the only module that
knows every layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import ssl
from collections.abc import Callable
from typing import Any

import orjson

from sovereign import __version__, implementations, logs
from sovereign.admin.http import AdminContext, AdminListener
from sovereign.admin.metrics import Sources
from sovereign.admin.timeseries import MinuteSeries
from sovereign.api import handler_table
from sovereign.auth import webauthn as wa
from sovereign.clock import SYSTEM_CLOCK, Clock
from sovereign.cluster.redisbus import RedisBus
from sovereign.collector import tune_gc
from sovereign.config import Config, ConfigError
from sovereign.errors import CloseCode, ErrorCode
from sovereign.protocol.connection import Timeouts
from sovereign.protocol.types import PRE_AUTH_TYPES
from sovereign.services.admin import SETTINGS, AdminService
from sovereign.services.auth import AuthService
from sovereign.services.compose import build_services
from sovereign.services.eventlog import CURSOR_RIDE_S, EVENT_GATHER_S
from sovereign.services.ports import Bus, NullBus
from sovereign.services.session import Session
from sovereign.stats import MlsStats, ServerStats
from sovereign.storage import Storage, open_storage
from sovereign.transport.outbox import LocalOutbox
from sovereign.transport.webclient import load_site
from sovereign.transport.ws import Connection, create_server

log = logging.getLogger("sovereign.server")
abuse = logging.getLogger(logs.ABUSE_LOGGER)

MAINTENANCE_INTERVAL = 3600.0  # retention and idempotency-window purges


class App:
    """The running server: one per process. Implements the transport's
    :class:`~sovereign.transport.ws.ConnectionHandler`."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        clock: Clock = SYSTEM_CLOCK,
        sources: dict[str, str] | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        logs.limit_abuse_log()  # SPEC §12.32: a flood of bad clients cannot fill the disk
        self.monotonic: Callable[[], float] = clock.monotonic
        self.started_at = clock.now_s()
        self.accepting = True
        self.allowed_origins = frozenset(config.origins_allowed)
        # Read by the transport on every connection: plain attributes, not properties
        # (neither is a runtime setting; max_connections is, see the property below).
        self.max_frame_bytes = config.max_frame_bytes
        self.send_buffer_limit = config.send_buffer_limit
        self.trusted_proxies = tuple(
            ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies
        )
        self.timeouts = Timeouts(
            auth_timeout=config.auth_timeout,
            idle_timeout=config.idle_timeout,
            max_auth_failures=config.max_auth_failures,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
        )
        # -- counters for /metrics: plain ints read at scrape time (SPEC §12.25)
        self.stats = stats = ServerStats() if config.metrics else None
        self.mls_stats = mls_stats = MlsStats()
        # -- ports and services
        self.outbox = outbox = LocalOutbox(config.send_buffer_limit, stats)
        self.services = svc = build_services(
            config,
            storage,
            outbox,
            clock,
            stats=stats,
            mls_stats=mls_stats,
            gather_s=EVENT_GATHER_S,
            ride_s=CURSOR_RIDE_S,
            bus=bus,
        )
        self.bus: Bus = bus if bus is not None else NullBus()
        self.tasks = svc.tasks
        self.auth = svc.auth
        self.eventlog = svc.eventlog
        if stats is not None:
            svc.connections.ready_hooks.append(self._count_ready)
            self._envelopes_in = stats.envelopes_in
            self.received = self._received_counting  # type: ignore[method-assign]
        # -- the admin listener's service: its own AuthService, whose relying party also
        # accepts the admin listener's origin once it is bound (SPEC §12.28)
        self.admin_auth = AuthService(config, storage, clock)
        self.admin = AdminService(
            config,
            storage,
            clock,
            auth=self.admin_auth,
            connections=svc.connections,
            groups=svc.groups,
            state=svc.state,
            outbox=outbox,
            mls_stats=mls_stats,
            base={k: getattr(config, k) for k in SETTINGS},
            sources=sources or {},
            peers=svc.connections.peers,
        )
        if svc.cluster is not None:
            # SPEC §12.27: another node's settings change re-reads them here.
            svc.cluster.settings_hooks.append(self.admin.load_settings)
        self.admin_listener: AdminListener | None = None
        # -- the request path
        self._dispatch_mod = implementations.load("dispatch")
        self.dispatcher = self._dispatch_mod.Dispatcher(
            handler_table(self.services),
            [int(t) for t in PRE_AUTH_TYPES],
            config.max_envelope_bytes,
        )
        # SPEC §12.30: the browser client's files, read once, served from memory.
        self.static_site = (
            load_site(config.web_client_dir, config.rp_origins) if config.web_client else None
        )
        self._conn_seq = 0
        self._server: asyncio.Server | None = None
        self._timers: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    # -- transport callbacks (ConnectionHandler) --------------------------------------
    @property
    def max_connections(self) -> int:
        return self.config.max_connections  # an admin may change it at runtime (§12.23)

    @property
    def max_envelope_bytes(self) -> int:
        return self.config.max_envelope_bytes

    def connection_count(self) -> int:
        return self.outbox.count()

    def opened(self, conn: Connection) -> Session:
        self._conn_seq += 1
        cfg = self.config
        bucket = self._dispatch_mod.TokenBucket(
            cfg.rate_limit_per_second, cfg.rate_limit_burst, self.monotonic()
        )
        s = Session(self._conn_seq, conn, self.outbox, bucket)
        self.outbox.opened(conn)
        if self.stats is not None:
            self.stats.connections_opened += 1
        return s

    def received(self, s: Session, buf: memoryview, now: float) -> None:
        try:
            self.dispatcher.dispatch(s, s.bucket, buf, s.state.ready, now)
        except Exception:
            # SPEC §8: an unexpected exception answers 9001; the connection stays up.
            log.exception("handler failed")
            self.outbox.send_error(s, ErrorCode.INTERNAL_ERROR, "", "internal error")

    def _received_counting(self, s: Session, buf: memoryview, now: float) -> None:
        """:meth:`received` plus a count by Envelope type, read from the first field
        (tag 0x08, a varint) without decoding. A copy of :meth:`received`'s body rather
        than a call to it: one Python frame less per frame received."""
        t = buf[1] if len(buf) > 1 and buf[0] == 0x08 else 0
        if t & 0x80 and len(buf) > 2:
            t = (t & 0x7F) | (buf[2] << 7)
        counts = self._envelopes_in
        counts[t] = counts.get(t, 0) + 1
        try:
            self.dispatcher.dispatch(s, s.bucket, buf, s.state.ready, now)
        except Exception:
            log.exception("handler failed")
            self.outbox.send_error(s, ErrorCode.INTERNAL_ERROR, "", "internal error")

    def _count_ready(self, s: Session) -> None:
        self.stats.auth_success += 1  # type: ignore[union-attr]

    def closed(self, conn: Connection) -> None:
        if self.stats is not None:
            code = conn.session.state.close_code or CloseCode.GOING_AWAY
            self.stats.closes[code] = self.stats.closes.get(code, 0) + 1
        self.outbox.closed(conn)
        self.services.connections.closed(conn.session)

    def protocol_error(self, s: Session, code: int, reason: str) -> None:
        abuse.info(
            "protocol error conn=%s ip=%s close=%s: %s", s.conn_id, s.link.source_ip(), code, reason
        )

    def health_body(self) -> bytes:
        return orjson.dumps({"status": "ok", "version": __version__})

    # -- operator actions (CLI, tests; the admin API later) ---------------------------
    def close_user(self, user_id: str, code: int, reason: str) -> int:
        return self.services.connections.close_user(user_id, code, reason)

    async def set_user_enabled(self, user_id: str, enabled: bool) -> None:
        await self.services.connections.set_user_enabled(user_id, enabled)

    async def revoke_session(self, session_id: str) -> bool:
        return await self.services.connections.revoke_session(session_id)

    # -- timers ----------------------------------------------------------------
    async def _sweep(self) -> None:
        """One sweeper for every connection's auth and idle deadline (SPEC §4).

        A single periodic scan is cheaper in memory than a timer handle per
        connection; the granularity is a quarter of the shortest timeout, at most 1 s.
        """
        t = self.timeouts
        interval = min(
            1.0, min(t.auth_timeout, t.idle_timeout, t.ping_interval, t.ping_timeout) / 4
        )
        next_purge = 0.0
        while True:
            await asyncio.sleep(interval)
            now = self.monotonic()
            for s in self.outbox.all_sessions():
                code = s.state.expired(now, t)
                if code is not None:
                    reason = "auth timeout" if code == CloseCode.AUTH_TIMEOUT else "idle"
                    self.outbox.close(s, code, reason)
                elif s.state.ping_due(now, t):
                    s.link.ping()  # SPEC §12.31: is the peer still there?
            if now >= next_purge:
                next_purge = now + 60.0
                await self.auth.purge_expired()

    async def _maintenance(self) -> None:
        svc = self.services
        while True:
            try:
                await svc.history.retention_pass()
                await svc.delivery.purge_stored_idempotency()
            except Exception:
                log.exception("maintenance pass failed")
            await asyncio.sleep(MAINTENANCE_INTERVAL)

    # -- lifecycle -------------------------------------------------------------
    async def start(self, reuse_port: bool = False) -> None:
        """Bind the listeners; ``reuse_port``: SO_REUSEPORT, so the workers of
        ``serve --workers N`` share the port and the kernel spreads connections."""
        cfg = self.config
        host, _, port = cfg.listen.rpartition(":")
        ssl_ctx = make_ssl_context(cfg)
        self._server = await create_server(
            self,
            host.strip("[]"),
            int(port),
            ssl_context=ssl_ctx,
            max_frame_size=cfg.max_frame_bytes,
            handshake_timeout=cfg.handshake_timeout,  # SPEC §12.31 (slowloris)
            backlog=4096,  # resume storms: the default 100 drops SYNs (measured)
            reuse_port=reuse_port,
        )
        loop = asyncio.get_running_loop()
        self._timers = [loop.create_task(self._sweep()), loop.create_task(self._maintenance())]
        log.info(
            "sovereign %s listening on %s://%s (%s)",
            __version__,
            "wss" if ssl_ctx else "ws",
            self.bound_address(),
            implementations.describe(),
        )
        if cfg.admin_listen:
            await self._start_admin(ssl_ctx)

    async def _start_admin(self, ssl_ctx: ssl.SSLContext | None) -> None:
        cfg = self.config
        host, _, port = cfg.admin_listen.rpartition(":")
        scheme = "https" if ssl_ctx else "http"
        ctx = AdminContext(
            service=self.admin,
            version=__version__,
            started_at_s=self.started_at,
            tls=ssl_ctx is not None,
            origins=frozenset(),  # set below, once the port is known
            ready=self.readiness,
            metrics=self._metric_sources(),
            series=MinuteSeries(
                lambda: self.clock.now_us() / 1e6,
                self.outbox.count,
                lambda: self.eventlog.events_written,
            ),
        )
        listener = AdminListener(ctx)
        await listener.start(host.strip("[]"), int(port), ssl_ctx)
        self.admin_listener = listener
        # SPEC §12.28: the panel's ceremonies and CSRF check accept the rp_origins and
        # the admin listener's own origin; a browser needs a host the rp_id covers, so
        # "localhost" stands for a loopback or wildcard bind (docs/decisions.md).
        own = {f"{scheme}://{h}:{listener.port}" for h in self._admin_hosts(listener.host)}
        origins = (*cfg.rp_origins, *sorted(own - set(cfg.rp_origins)))
        ctx.origins = frozenset(origins)
        self.admin_auth.rp = wa.RelyingParty(rp_id=cfg.rp_id, rp_name=cfg.rp_name, origins=origins)
        log.info("admin listener on %s://%s:%d", scheme, listener.host, listener.port)

    @staticmethod
    def _admin_hosts(bound: str) -> list[str]:
        if bound in ("127.0.0.1", "0.0.0.0", "::", "::1", "localhost"):
            return ["localhost", "127.0.0.1"]
        return [bound]

    def admin_url(self, path: str) -> str | None:
        """An URL of the admin listener a browser on this machine can open."""
        listener = self.admin_listener
        if listener is None:
            return None
        scheme = "https" if self.config.tls_cert else "http"
        host = self._admin_hosts(listener.host)[0]
        return f"{scheme}://{host}:{listener.port}{path}"

    def _metric_sources(self) -> Sources:
        db = self.storage.db
        outbox = self.outbox
        return Sources(
            stats=self.stats,
            mls=self.mls_stats,
            connections=outbox.count,
            ready_connections=lambda: sum(1 for s in outbox.all_sessions() if s.state.ready),
            events_written=lambda: self.eventlog.events_written,
            batch_sizes=db.batch_sizes,
            commit_seconds=db.commit_seconds,
            writes_committed=lambda: db.stats().writes_committed,
            writes_failed=lambda: db.stats().writes_failed,
            commits_on_loop=lambda: db.inline_batches,
            rejected=outbox.rejected,
            pools_below_min=lambda: 0,
            **self._bus_sources(),
        )

    def _bus_sources(self) -> dict[str, Any]:
        bus = self.bus
        if not isinstance(bus, RedisBus):
            return {}
        return {
            "bus_counters": lambda: dataclasses.asdict(bus.stats),
            "bus_connected": lambda: bus.connected,
        }

    async def readiness(self) -> dict[str, bool | None]:
        """SPEC §12.25 ``/readyz``: every check must hold; 503 while draining (then the
        write probe is skipped: ``database_writable`` is None, not checked)."""
        db = self.storage.db
        writable: bool | None = None if not self.accepting else False
        if self.accepting and db.writer_alive:
            try:  # one empty transaction through the writer: it takes the write lock
                await asyncio.wait_for(db.write(lambda c: None, durable=False), 2.0)
                writable = True
            except Exception:
                writable = False
        return {
            "accepting": self.accepting,
            "listeners_bound": self._server is not None
            and self._server.is_serving()
            and (self.admin_listener is not None and self.admin_listener.bound),
            "writer_alive": db.writer_alive,
            "database_writable": writable,
        }

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
        self.accepting = False  # /readyz answers 503 from here on
        if self._server is not None:
            self._server.close()
        for timer in self._timers:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
        self.outbox.close_all(CloseCode.SERVER_SHUTDOWN, "server shutdown")
        await self.tasks.drain(timeout)  # in-flight requests finish before storage closes
        await self.services.delivery.stop()  # every queued event and ack reaches storage
        if self.services.cluster is not None:
            await self.services.cluster.stop()  # after the last commit was announced
        # Give transports a moment to flush their close frames.
        deadline = self.monotonic() + 2.0
        while self.outbox.count() and self.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Work started meanwhile (coalesced writes) gets a moment; whatever still runs
        # is stopped before storage closes, never left to fail on it (defect 9).
        await self.tasks.drain(0.5)
        await self.tasks.cancel_all()
        if self.services.cluster is None:
            await self.bus.close()  # the cluster service (above) closes the bus it owns
        if self.admin_listener is not None:
            await self.admin_listener.stop()
        await self.storage.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


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


def make_bus(config: Config) -> Bus:
    """SPEC §12.27: Redis pub/sub between the nodes when ``redis_url`` is set."""
    if config.redis_url:
        return RedisBus(config.redis_url, config.cluster_name)
    return NullBus()


async def open_configured_storage(config: Config) -> Storage:
    """The configured database, migrated (``serve --workers`` calls this once in the
    supervisor before any worker starts, so migrations never run concurrently)."""
    return await open_storage(
        config.sqlite_path,
        postgres_dsn=config.storage_dsn,
        max_batch=config.group_commit_max_batch,
        coalesce_wal=config.sqlite_coalesce_wal,
        inline_ms=config.sqlite_inline_commit_ms,
    )


async def migrate(config: Config) -> None:
    storage = await open_configured_storage(config)
    await storage.close()


async def create_app(
    config: Config, sources: dict[str, str] | None = None, *, bus: Bus | None = None
) -> App:
    """The app over the configured storage. ``bus``: None builds the configured one
    (:func:`make_bus`); CLI commands that only touch storage pass ``NullBus()``."""
    implementations.load("dispatch")  # SOVEREIGN_REQUIRE_FAST fails here, before anything opens
    storage = await open_configured_storage(config)
    bus = make_bus(config) if bus is None else bus
    try:
        app = App(config, storage, sources=sources, bus=bus)
        await app.auth.load_settings()
        await app.admin.load_settings()  # stored settings win over file, env, flags
        await app.services.state.load()
        await app.services.delivery.load()
        if app.services.cluster is not None:
            # Cluster mode (SPEC §12.27): exact heads, then the bus starts (the cluster
            # service owns its lifecycle; on_resync follows each reconnection).
            await app.services.cluster.load()
    except BaseException:
        await bus.close()
        await storage.close()
        raise
    return app


async def serve(
    config: Config,
    *,
    ready: Callable[[App], None] | None = None,
    sources: dict[str, str] | None = None,
    reuse_port: bool = False,
    bootstrap: bool = True,
) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code. ``reuse_port`` and
    ``bootstrap=False`` are for the workers of ``serve --workers`` (only worker 0
    prints the setup code)."""
    # Signals are caught from the first moment, so a SIGTERM during start-up still
    # shuts down gracefully (exit 0) once the server is up.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = await create_app(config, sources)
    tune_gc()
    try:
        await app.start(reuse_port=reuse_port)
    except BaseException:
        await app.shutdown()
        raise
    code = await app.auth.ensure_bootstrap() if bootstrap else None
    if code is not None:
        # Printed, never logged: the operator needs it once (SPEC §10, §12.28). The
        # admin panel's setup page, the web client (the #fragment never reaches a server
        # or a log; only an origin of the listener's own scheme is advertised) and
        # AUTH_REGISTER_REQUEST.invite_code all take the same one-time code.
        lines = []
        url = app.admin_url(f"/admin/setup?token={code}")
        if url is not None:
            lines.append(f"setup URL: {url}")
        scheme = "https://" if config.tls_cert else "http://"
        origin = next((o for o in config.rp_origins if o.startswith(scheme)), None)
        if app.static_site is not None and origin is not None:
            lines.append(f"set up the first admin in a browser: {origin}/#invite={code}")
        lines.append(f"bootstrap code: {code}")
        print(
            "No admin exists yet. Open the setup URL to register the first admin's passkey "
            "in the admin panel, or register in the web client with the link, or use the "
            "code as invite_code (AUTH_REGISTER_REQUEST; works under any registration "
            "policy). A new code is printed at each start until an admin exists.\n"
            + "\n".join(lines),
            flush=True,
        )
    if ready is not None:
        ready(app)
    await stop.wait()
    log.info("shutting down: closing %d connections", app.connection_count())
    await app.shutdown()
    log.info("stopped")
    return 0
