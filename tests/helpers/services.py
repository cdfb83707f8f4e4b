"""The real services over a real SQLite file, driven with no sockets (in the spirit of
h11's ``ConnectionPair``): a fake outbox records what each session would have read,
a fake clock moves only when a test says so.

:class:`Harness` builds the services with ``sovereign.services.compose.build_services``,
as ``sovereign.server.App`` does, with a fake outbox and clock
(``tests/unit/services/test_wiring.py`` checks the two stay the same) and feeds
requests through the real API handler table, so payload parsing and error rendering
are the production ones. A test reads responses and pushes with
``h.outbox.take(session)``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from sovereign import implementations
from sovereign.api import handler_table
from sovereign.config import Config, validate
from sovereign.protocol.types import MessageType as T
from sovereign.services.compose import build_services
from sovereign.services.eventlog import Conv
from sovereign.services.ports import Bus
from sovereign.services.session import Session
from sovereign.storage import Storage, open_storage
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.bus import Hub
from tests.helpers.fakes import FakeClock, FakeOutbox, Hold, Sent

#: The event-id generator the services use (its state is put back after a harness).
_IDS = implementations.load("ids")
SETTLE_TIMEOUT = 10.0  # a guard against a hung test, not a wait for time to pass


@dataclass(frozen=True, slots=True)
class Login:
    """One device of a user: a session created by a passkey login (SPEC §4)."""

    user_id: str
    username: str
    session_id: str
    device_id: str
    token: str = ""  # the session token (AUTH_REQUEST{session_token} resumes with it)


class FakeLink:
    """What a Session links to in place of a socket: the services' ``Link``."""

    def user_agent(self) -> str:
        return "sovereign-tests"

    def peer(self) -> str:
        return "fake:0"

    def source_ip(self) -> str:
        return "192.0.2.1"  # TEST-NET-1: never a real peer


class Harness:
    def __init__(
        self, config: Config, storage: Storage, clock: FakeClock, bus: Bus | None = None
    ) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        self.db = storage.db
        self.outbox = FakeOutbox()
        svc = self.services = build_services(config, storage, self.outbox, clock, bus=bus)
        self.cluster = svc.cluster
        self.tasks, self.eventlog, self.state = svc.tasks, svc.eventlog, svc.state
        self.auth, self.conns, self.delivery = svc.auth, svc.connections, svc.delivery
        self.ephemeral, self.groups, self.mls = svc.ephemeral, svc.groups, svc.mls
        self.handlers = handler_table(self.services)
        self._conn_ids = itertools.count(1)
        self._rids = itertools.count(1)

    async def load(self) -> None:
        """What ``create_app`` loads before serving."""
        await self.auth.load_settings()
        await self.state.load()
        await self.delivery.load()
        if self.cluster is not None:
            await self.cluster.load()

    async def close(self) -> None:
        """The end of ``App.shutdown``: requests finish, queued writes land, then storage."""
        await self.settle()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.delivery.stop()
        await self.storage.close()

    # -- users and devices ------------------------------------------------------------
    async def register(self, username: str) -> Login:
        """A new user with its first device."""
        user = await self.auth.create_user(username)
        return await self._new_device(user.user_id, username)

    async def another_device(self, of: Login) -> Login:
        """A second passkey login of the same user: a new device (SPEC §12.12)."""
        return await self._new_device(of.user_id, of.username)

    async def _new_device(self, user_id: str, username: str) -> Login:
        # The login path: the session is stamped with the injected (fake) clock and the
        # device hooks start its cursors (SPEC §12.12).
        row, token = await self.auth.create_session(user_id)
        return Login(user_id, username, row.session_id, row.device_id, token)

    # -- connections --------------------------------------------------------------------
    def open(self) -> Session:
        """A connection right after the WebSocket upgrade (AUTHENTICATING)."""
        s = Session(next(self._conn_ids), FakeLink(), self.outbox, None)
        self.outbox.opened(s)
        s.state.upgraded(self.clock.monotonic())
        return s

    def authenticate(self, s: Session, who: Login) -> None:
        """What a successful AUTH_* step does: READY, then the READY hooks (sync)."""
        if self.conns.authenticated(
            s,
            user_id=who.user_id,
            username=who.username,
            session_id=who.session_id,
            device_id=who.device_id,
            is_admin=False,
        ):
            self.conns.ready(s)

    async def connect(self, who: Login) -> Session:
        """A READY session whose offline sync has finished (its frames are kept)."""
        s = self.open()
        self.authenticate(s, who)
        await self.settle()
        assert self.outbox.is_live(s), "the session did not go live after its sync"
        return s

    def disconnect(self, s: Session) -> None:
        """The socket is gone: what the transport and ``App.closed`` do."""
        self.outbox.closed(s)
        self.conns.closed(s)

    # -- requests -------------------------------------------------------------------------
    def request(self, s: Session, msg_type: T, message: Message, rid: str = "") -> None:
        """One envelope from the client, through the real handler for its type."""
        self.handlers[msg_type](s, msg_type, rid, memoryview(message.SerializeToString()))

    def rid(self) -> str:
        return f"r{next(self._rids)}"

    def cluster_work(self) -> tuple[int, int, int]:
        """Counters that move while a cluster node still catches up."""
        c = self.cluster
        if c is None:
            return (0, 0, 0)
        pending = sum(len(f.pending) for f in c.feeds.values())
        return (c.repaired_events, c.remote_events, pending)

    def hold_reads(self) -> Hold:
        """Storage reads wait until released (then pass through to the real reader):
        a commit can land while, say, an offline sync has not read anything yet."""
        real = self.db.read
        hold = Hold()

        async def read(fn: Any) -> Any:
            await hold.wait()
            return await real(fn)

        self.db.read = read  # type: ignore[method-assign]
        return hold

    async def settle(self) -> None:
        """Until no commit is in flight and no request or background task is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_TIMEOUT
        writer = self.delivery.writer  # its writes are callback chains, not tasks
        while True:
            await self.eventlog.wait_idle()
            if not self.tasks.pending and not writer.busy:
                return
            left = deadline - loop.time()
            assert left > 0, "the services did not settle"
            if writer.busy:
                await asyncio.wait_for(writer.flush(), left)
            await self.tasks.drain(left)

    async def call(self, s: Session, msg_type: T, message: Message) -> Sent:
        """A request with a fresh request_id; settles and returns its one response."""
        rid = self.rid()
        self.request(s, msg_type, message, rid)
        await self.settle()
        return self.outbox.response(s, rid)

    # -- common flows -----------------------------------------------------------------------
    async def create_group(self, s: Session, *members: Login, title: str = "g") -> str:
        req = pb.GroupCreate(title=title, member_ids=[m.user_id for m in members])
        created = await self.call(s, T.GROUP_CREATE, req)
        assert created.type == T.GROUP_CREATED, created
        conv_id: str = created.msg.conversation_id
        return conv_id

    async def send(self, s: Session, conv_id: str, payload: bytes = b"ciphertext") -> Any:
        """MESSAGE_SEND; returns the echo (a pb.MessageReceive)."""
        req = pb.MessageSend(conversation_id=conv_id, encrypted_payload=payload)
        echo = await self.call(s, T.MESSAGE_SEND, req)
        assert echo.type == T.MESSAGE_RECEIVE, echo
        return echo.msg

    async def ack(self, s: Session, *message_ids: str) -> Sent:
        return await self.call(s, T.MESSAGE_ACK, pb.MessageAck(message_ids=list(message_ids)))

    async def refuse_events(self, refuse: bool = True) -> None:
        """Make SQLite refuse every conversation event (a failing commit), or stop."""
        sql = (
            "CREATE TRIGGER refuse_events BEFORE INSERT ON events"
            " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            if refuse
            else "DROP TRIGGER refuse_events"
        )
        await self.db.write(lambda c: c.execute(sql))

    def conv(self, conv_id: str) -> Conv:
        return self.state.convs[conv_id]

    async def stored_seqs(self, conv_id: str) -> list[int]:
        """The seqs of the conversation's events in storage."""
        rows = await self.db.read(
            lambda c: c.execute(
                "SELECT seq FROM events WHERE conversation_id = ? ORDER BY seq", (conv_id,)
            ).fetchall()
        )
        return [int(r[0]) for r in rows]


#: The ``harness_with`` fixture: ``async with harness_with(max_group_members=3) as h``.
HarnessWith = Callable[..., AbstractAsyncContextManager[Harness]]


@asynccontextmanager
async def harness(
    data_dir: Path, clock: FakeClock | None = None, **overrides: Any
) -> AsyncIterator[Harness]:
    """Services over a fresh (or existing) data directory. ``min_key_packages`` is 0
    unless overridden, so READY ends at presence unless a test asks for
    MLS_KEY_PACKAGE_LOW."""
    settings: dict[str, Any] = {"min_key_packages": 0, **overrides}
    # Event ids are monotonic per process (the "ids" component keeps the last
    # millisecond): ids stamped with the fake clock's 2030 would hold every later id of
    # this test process in 2030, so that state is put back when the harness closes.
    id_state = _IDS.state()
    config = validate(Config(data_dir=str(data_dir), **settings))
    storage = await open_storage(config.sqlite_path, max_batch=config.group_commit_max_batch)
    try:
        h = Harness(config, storage, clock or FakeClock())
        await h.load()
    except BaseException:
        await storage.close()
        _IDS.set_state(*id_state)
        raise
    try:
        yield h
    finally:
        try:
            await h.close()
        finally:
            _IDS.set_state(*id_state)


@dataclass(frozen=True, slots=True)
class World:
    """alice and bob share ``conv`` (alice created it: admin); carol shares nothing.
    One READY session each (a1, b1, c1), everything they received so far taken."""

    alice: Login
    bob: Login
    carol: Login
    a1: Session
    b1: Session
    c1: Session
    conv: str


async def build_world(h: Harness) -> World:
    alice, bob, carol = [await h.register(name) for name in ("alice", "bob", "carol")]
    a1, b1, c1 = [await h.connect(who) for who in (alice, bob, carol)]
    conv = await h.create_group(a1, bob)
    for s in (a1, b1, c1):
        h.outbox.take(s)
    return World(alice, bob, carol, a1, b1, c1, conv)


# -- two nodes of a cluster (SPEC §12.27) ------------------------------------------------


class Pair:
    """Two cluster nodes: each its own services, outbox and database connections (its
    own writer thread, as another process would have) over ONE database file, and an
    in-process bus between them (``tests/helpers/bus.py``). Users and devices are the
    database's, so a login made through either node works on both."""

    def __init__(self, a: Harness, b: Harness, hub: Hub) -> None:
        self.a, self.b, self.hub = a, b, hub

    @property
    def nodes(self) -> tuple[Harness, Harness]:
        return self.a, self.b

    async def settle(self) -> None:
        """Until neither node has work left and no notification is in flight."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_TIMEOUT
        while True:
            before = (self.hub.delivered, self.a.cluster_work(), self.b.cluster_work())
            await self.a.settle()
            await self.b.settle()
            await self.hub.settle()
            await self.a.settle()
            await self.b.settle()
            after = (self.hub.delivered, self.a.cluster_work(), self.b.cluster_work())
            if before == after and not self.a.tasks.pending and not self.b.tasks.pending:
                return
            assert loop.time() < deadline, "the cluster did not settle"


@asynccontextmanager
async def cluster_pair(
    data_dir: Path, clock: FakeClock | None = None, postgres_dsn: str = "", **overrides: Any
) -> AsyncIterator[Pair]:
    """Two nodes over one database (``min_key_packages`` 0 unless overridden): the
    SQLite file in ``data_dir``, or PostgreSQL at ``postgres_dsn``. SQLite serialises
    the two writers (BEGIN IMMEDIATE): the races are real between two connections but
    never concurrent inside one commit; on PostgreSQL the two writers' transactions
    really overlap (row locks, unique-key waits)."""
    settings: dict[str, Any] = {"min_key_packages": 0, **overrides}
    id_state = _IDS.state()
    clock = clock or FakeClock()
    config = validate(Config(data_dir=str(data_dir), **settings))
    hub = Hub()
    nodes: list[Harness] = []
    try:
        for _ in range(2):
            storage = await open_storage(
                config.sqlite_path,
                postgres_dsn=postgres_dsn,
                max_batch=config.group_commit_max_batch,
            )
            try:
                h = Harness(config, storage, clock, bus=hub.bus())
                await h.load()
            except BaseException:
                await storage.close()
                raise
            nodes.append(h)
        pair = Pair(nodes[0], nodes[1], hub)
        await pair.settle()
        yield pair
    finally:
        try:
            for h in reversed(nodes):
                await h.close()
        finally:
            _IDS.set_state(*id_state)
