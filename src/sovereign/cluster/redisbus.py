"""The cluster's notification bus over Redis pub/sub (SPEC §12.27, ``services.ports.Bus``).

Rules (docs/scaling.md):

1. Redis is never the store. Every node publishes only after its COMMIT, so a lost
   notification loses nothing durable; it only delays live delivery until a resync.
2. One pub/sub channel per cluster (``sovereign:<cluster_name>:bus``). Each message is
   ``node_id (12 bytes) | kind (1 byte) | payload``; a node skips its own. Kinds:
   ``m`` a services notification (payload opaque, handed to ``on_message``), ``r`` a
   resync request (no payload, see 5).
3. ``publish`` never blocks and never raises: it appends to a bounded queue that a writer
   task drains, pipelining up to ``batch`` PUBLISH commands per round trip. While Redis
   is down the queue keeps the newest ``max_queue`` notifications and counts what it
   drops (``stats.dropped``).
4. Two connections: a subscriber (a reader task decodes and dispatches) and a publisher
   (the writer, which also PINGs when idle so a hung Redis is noticed within
   ``ping_interval + op_timeout``). Either failing takes the link down as a whole: one
   log line, then reconnection with jittered exponential backoff capped at
   ``backoff_max`` (1 s: live delivery resumes within 2 s of Redis coming back).
5. After every REconnection (any connection but the one made inside :meth:`start`, whose
   caller loads its state itself) the bus SUBSCRIBEs first and only then calls
   ``on_resync``, so nothing committed after the resync read can be missed. It also
   publishes an ``r`` message: the other nodes missed whatever this node published while
   its link was down (and what was in flight when it broke), so they resync too. Resyncs
   are coalesced: a request during a running resync runs one more afterwards; a resync
   that fails (the database may be down too) is retried every ``backoff_max``.
6. Logs never carry payloads or the Redis URL (it may hold a password): host:port only.

Everything runs on the event loop that called :meth:`start`; ``publish`` must be called
from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger("sovereign.cluster")

NODE_ID_LEN = 12  # secrets.token_urlsafe(9): 72 random bits, ASCII
KIND_MESSAGE = ord("m")
KIND_RESYNC = ord("r")
HEADER_LEN = NODE_ID_LEN + 1


@dataclass(slots=True)
class BusStats:
    """Counters for /metrics (plain ints, read at scrape time)."""

    published: int = 0  # notifications Redis accepted
    received: int = 0  # notifications from other nodes handed to on_message
    dropped: int = 0  # notifications lost on this side: queue overflow or a broken batch
    malformed: int = 0  # channel messages that were not a bus envelope (ignored)
    reconnects: int = 0  # links re-established after a loss
    resyncs: int = 0  # on_resync calls completed


def redis_where(url: str) -> str:
    """``host:port`` of a Redis URL, for logs (never the URL: it may hold a password)."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    except ValueError:
        return "(unparsable redis_url)"


async def _noop_resync() -> None:
    return None


class RedisBus:
    """:class:`~sovereign.services.ports.Bus` over Redis pub/sub (see the module rules)."""

    def __init__(
        self,
        url: str,
        cluster_name: str = "sovereign",
        *,
        max_queue: int = 10_000,
        batch: int = 256,
        connect_timeout: float = 1.0,
        op_timeout: float = 2.0,
        ping_interval: float = 1.0,
        backoff_min: float = 0.05,
        backoff_max: float = 1.0,
    ) -> None:
        self.url = url
        self.where = redis_where(url)
        self.channel = f"sovereign:{cluster_name}:bus".encode()
        self.node_id: str = secrets.token_urlsafe(9)
        self._node = self.node_id.encode("ascii")
        assert len(self._node) == NODE_ID_LEN
        self.stats = BusStats()
        self._queue: deque[bytes] = deque()
        self._max_queue = max_queue
        self._batch = batch
        self._connect_timeout = connect_timeout
        self._op_timeout = op_timeout
        self._ping_interval = ping_interval
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._on_message: Callable[[bytes], None] = lambda _p: None
        self._on_resync: Callable[[], Awaitable[None]] = _noop_resync
        self._wake = asyncio.Event()
        self._connected = False
        self._closing = False
        self._run_task: asyncio.Task[None] | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self._resync_again = False
        self._announce_resync = False
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None  # redis.asyncio.client.PubSub (untyped upstream)

    # -- the Bus port ---------------------------------------------------------------
    def publish(self, payload: bytes) -> None:
        self._enqueue(self._node + b"m" + payload)

    def set_handlers(
        self,
        on_message: Callable[[bytes], None],
        on_resync: Callable[[], Awaitable[None]],
    ) -> None:
        self._on_message = on_message
        self._on_resync = on_resync

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self) -> None:
        """Connect once (bounded by ``connect_timeout``); the link then lives in a task.

        A Redis that is down at start-up does not stop the node: it serves its own
        clients, and the first connection made later counts as a reconnection (rule 5).
        """
        if self._run_task is not None or self._closing:
            return  # started already (or closed): one link per bus
        loop = asyncio.get_running_loop()
        first_ok = False
        try:
            await self._connect()
            first_ok = True
            self._connected = True
            log.info("cluster bus connected to redis at %s (node %s)", self.where, self.node_id)
        except Exception as exc:
            await self._disconnect()
            log.warning(
                "cluster bus: cannot reach redis at %s (%s); live delivery between nodes "
                "waits for it, retrying",
                self.where,
                _why(exc),
            )
        self._run_task = loop.create_task(self._run(first_ok), name="redis-bus")

    async def close(self) -> None:
        self._closing = True
        self._connected = False
        for task in (self._run_task, self._resync_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._run_task = self._resync_task = None
        await self._disconnect()

    # -- queue --------------------------------------------------------------------------
    def _enqueue(self, message: bytes) -> None:
        q = self._queue
        if len(q) >= self._max_queue:
            q.popleft()  # the oldest goes: the newest are likeliest still to matter
            self.stats.dropped += 1
        q.append(message)
        self._wake.set()

    # -- the link -------------------------------------------------------------------------
    async def _connect(self) -> None:
        client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=self._connect_timeout,
            socket_timeout=None,  # the reader waits indefinitely; the writer bounds itself
            retry=Retry(NoBackoff(), 0),  # this class owns reconnection, not redis-py
            health_check_interval=0,
            single_connection_client=True,
            client_name=f"sovereign-{self.node_id}",  # CLIENT LIST shows which node
        )
        self._client = client
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub = pubsub
        async with asyncio.timeout(self._connect_timeout + self._op_timeout):
            await pubsub.subscribe(self.channel)
            # The SUBSCRIBE reply confirms the subscription (rule 5 orders on it).
            while True:
                reply = await pubsub.parse_response(block=True)
                if reply and _kind(reply) == b"subscribe":
                    break
            await client.ping()

    async def _disconnect(self) -> None:
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _run(self, connected: bool) -> None:
        attempt = 0
        while not self._closing:
            if not connected:
                try:
                    await self._connect()
                except Exception:
                    await self._disconnect()
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                attempt = 0
                self._connected = True
                self.stats.reconnects += 1
                log.info("cluster bus link to redis at %s restored", self.where)
                # Rule 5: subscribed first; now catch up and tell the others to.
                self._announce_resync = True  # outside the queue: never dropped
                self._wake.set()
                self._request_resync()
            connected = False
            reason = await self._serve_link()
            self._connected = False
            await self._disconnect()
            if self._closing:
                return
            log.warning(
                "cluster bus link to redis at %s lost (%s); reconnecting", self.where, reason
            )
            attempt = 1
            await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        base = min(self._backoff_max, self._backoff_min * (2 ** min(attempt, 16)))
        return float(base * random.uniform(0.5, 1.0))

    async def _serve_link(self) -> str:
        """Run the reader and the writer until either fails; the reason, for the log."""
        reader = asyncio.create_task(self._read(), name="redis-bus-reader")
        writer = asyncio.create_task(self._write(), name="redis-bus-writer")
        try:
            done, _ = await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            for task in (reader, writer):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                return _why(task.exception())
        return "closed"

    async def _read(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        own = self._node
        stats = self.stats
        while True:
            reply = await pubsub.parse_response(block=True)
            if not reply or _kind(reply) != b"message":
                continue  # subscribe confirmations, pongs
            data = reply[2]
            if not isinstance(data, bytes) or len(data) < HEADER_LEN:
                stats.malformed += 1
                continue
            if data.startswith(own):
                continue  # rule 2: a node never receives its own notifications
            kind = data[NODE_ID_LEN]
            if kind == KIND_MESSAGE:
                stats.received += 1
                try:
                    self._on_message(data[HEADER_LEN:])
                except Exception:
                    # The services' defect, not the link's: keep the link up.
                    log.exception("cluster bus: on_message failed")
            elif kind == KIND_RESYNC:
                self._request_resync()
            else:
                stats.malformed += 1

    async def _write(self) -> None:
        client = self._client
        assert client is not None
        q = self._queue
        stats = self.stats
        channel = self.channel
        while True:
            if self._announce_resync:
                async with asyncio.timeout(self._op_timeout):
                    await client.publish(channel, self._node + b"r")
                self._announce_resync = False
                continue
            if not q:
                self._wake.clear()
                try:
                    async with asyncio.timeout(self._ping_interval):
                        await self._wake.wait()
                except TimeoutError:
                    async with asyncio.timeout(self._op_timeout):
                        await client.ping()  # a hung Redis is noticed here (rule 4)
                    continue
            n = min(len(q), self._batch)
            batch = [q.popleft() for _ in range(n)]
            try:
                async with asyncio.timeout(self._op_timeout):
                    if n == 1:
                        await client.publish(channel, batch[0])
                    else:
                        pipe = client.pipeline(transaction=False)
                        for message in batch:
                            pipe.publish(channel, message)
                        await pipe.execute()
            except BaseException:
                stats.dropped += n  # sent or not, nobody can tell: counted as lost
                raise
            stats.published += n

    # -- resync --------------------------------------------------------------------------
    def _request_resync(self) -> None:
        if self._closing:
            return
        if self._resync_task is not None and not self._resync_task.done():
            self._resync_again = True
            return
        self._resync_task = asyncio.get_running_loop().create_task(
            self._resync(), name="redis-bus-resync"
        )

    async def _resync(self) -> None:
        while True:
            self._resync_again = False
            try:
                await self._on_resync()
                self.stats.resyncs += 1
            except Exception as exc:
                log.warning("cluster bus: resync failed (%s); retrying", _why(exc))
                self._resync_again = True
                await asyncio.sleep(self._backoff_max)
            if not self._resync_again or self._closing:
                return


def _kind(reply: Any) -> bytes:
    kind = reply[0] if isinstance(reply, (list, tuple)) and reply else b""
    return kind.encode() if isinstance(kind, str) else bytes(kind)


def _why(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
