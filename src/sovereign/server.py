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
import gc
import ipaddress
import logging
import signal
import ssl
from collections.abc import Callable

import orjson

from sovereign import __version__, implementations, logs
from sovereign.api import handler_table
from sovereign.clock import SYSTEM_CLOCK, Clock
from sovereign.config import Config, ConfigError
from sovereign.errors import CloseCode, ErrorCode
from sovereign.protocol.connection import Timeouts
from sovereign.protocol.types import PRE_AUTH_TYPES
from sovereign.services import Services
from sovereign.services.auth import AuthService
from sovereign.services.connections import ConnectionService
from sovereign.services.delivery import DeliveryService
from sovereign.services.ephemeral import EphemeralService
from sovereign.services.eventlog import EventLog
from sovereign.services.groups import GroupService
from sovereign.services.history import HistoryService
from sovereign.services.mls import MlsService
from sovereign.services.session import Session
from sovereign.services.state import ConversationState
from sovereign.services.tasks import TaskRunner
from sovereign.storage import Storage, open_storage
from sovereign.transport.outbox import LocalOutbox
from sovereign.transport.ws import Connection, create_server

log = logging.getLogger("sovereign.server")
abuse = logging.getLogger(logs.ABUSE_LOGGER)

MAINTENANCE_INTERVAL = 3600.0  # retention and idempotency-window purges


class App:
    """The running server: one per process. Implements the transport's
    :class:`~sovereign.transport.ws.ConnectionHandler`."""

    def __init__(self, config: Config, storage: Storage, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        logs.limit_abuse_log()  # SPEC §12.32: a flood of bad clients cannot fill the disk
        self.monotonic: Callable[[], float] = clock.monotonic
        self.started_at = clock.now_s()
        self.accepting = True
        self.allowed_origins = frozenset(config.origins_allowed)
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
        db = storage.db
        # -- ports
        self.outbox = outbox = LocalOutbox(config.send_buffer_limit)
        self.tasks = tasks = TaskRunner(outbox)
        eventlog = EventLog(db, outbox.cork, outbox.uncork)
        state = ConversationState(db, storage.users)
        # -- services
        self.auth = auth = AuthService(config, storage, clock)
        conns = ConnectionService(config, storage.users, storage.sessions, outbox, clock)
        delivery = DeliveryService(config, db, state, eventlog, outbox, clock, tasks)
        ephemeral = EphemeralService(db, state, outbox, clock, delivery.writer)
        groups = GroupService(config, state, eventlog, outbox, clock, delivery, ephemeral.introduce)
        history = HistoryService(config, db, state, outbox, clock)
        mls = MlsService(config, db, state, eventlog, outbox, clock, delivery)
        # -- how they hear of each other (SPEC §4 "On READY" order)
        auth.device_hooks.append(delivery.device_created)
        conns.ready_hooks.append(delivery.on_ready)
        conns.closed_hooks.extend((delivery.detach, ephemeral.on_closed))
        delivery.after_sync.append(mls.on_sync_end)
        delivery.went_live.append(ephemeral.on_live)
        self.services = Services(
            config=config,
            outbox=outbox,
            tasks=tasks,
            state=state,
            auth=auth,
            connections=conns,
            delivery=delivery,
            groups=groups,
            ephemeral=ephemeral,
            history=history,
            mls=mls,
        )
        # -- the request path
        self._dispatch_mod = implementations.load("dispatch")
        self.dispatcher = self._dispatch_mod.Dispatcher(
            handler_table(self.services),
            [int(t) for t in PRE_AUTH_TYPES],
            config.max_envelope_bytes,
        )
        self._conn_seq = 0
        self._server: asyncio.Server | None = None
        self._timers: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    # -- transport callbacks (ConnectionHandler) --------------------------------------
    @property
    def max_frame_bytes(self) -> int:
        return self.config.max_frame_bytes

    @property
    def max_envelope_bytes(self) -> int:
        return self.config.max_envelope_bytes

    @property
    def max_connections(self) -> int:
        return self.config.max_connections

    @property
    def send_buffer_limit(self) -> int:
        return self.config.send_buffer_limit

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
        return s

    def received(self, s: Session, buf: memoryview, now: float) -> None:
        try:
            self.dispatcher.dispatch(s, s.bucket, buf, s.state.ready, now)
        except Exception:
            # SPEC §8: an unexpected exception answers 9001; the connection stays up.
            log.exception("handler failed")
            self.outbox.send_error(s, ErrorCode.INTERNAL_ERROR, "", "internal error")

    def closed(self, conn: Connection) -> None:
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
    async def start(self) -> None:
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
        for timer in self._timers:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
        self.outbox.close_all(CloseCode.SERVER_SHUTDOWN, "server shutdown")
        await self.tasks.drain(timeout)  # in-flight requests finish before storage closes
        await self.services.delivery.stop()  # every queued event and ack reaches storage
        # Give transports a moment to flush their close frames.
        deadline = self.monotonic() + 2.0
        while self.outbox.count() and self.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Work started meanwhile (coalesced writes) gets a moment; whatever still runs
        # is stopped before storage closes, never left to fail on it (defect 9).
        await self.tasks.drain(0.5)
        await self.tasks.cancel_all()
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
    implementations.load("dispatch")  # SOVEREIGN_REQUIRE_FAST fails here, before anything opens
    storage = await open_storage(config.sqlite_path, max_batch=config.group_commit_max_batch)
    try:
        app = App(config, storage)
        await app.auth.load_settings()
        await app.services.state.load()
        await app.services.delivery.load()
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
