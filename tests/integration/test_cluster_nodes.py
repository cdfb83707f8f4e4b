"""Two server nodes in one process, real sockets, one database (SPEC §12.27).

Each node is a whole ``App`` (its own listener, outbox, services, database
connections) made by ``create_app(config, bus=...)`` as ``sovereign serve`` makes it;
the nodes share the data directory (or, under SOVEREIGN_TEST_STORAGE=postgres, the
PostgreSQL database) and talk over the in-process bus of ``tests/helpers/bus.py`` —
the double of the Redis transport, which ``tests/helpers/cluster.py`` runs for real
across processes. Clients are the SDK over real WebSockets with real passkeys.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from sovereign.client import Backoff, Client, Event, MessageType, SoftwareAuthenticator
from sovereign.server import App, create_app
from tests.helpers import server as server_helpers
from tests.helpers.bus import Hub
from tests.helpers.server import ORIGIN

T = MessageType
TIMEOUT = 5.0


@asynccontextmanager
async def two_nodes(data_dir: Path) -> AsyncIterator[tuple[App, App]]:
    hub = Hub()
    apps: list[App] = []
    try:
        for _ in range(2):
            cfg, sources = server_helpers.test_config_sources(data_dir)
            app = await create_app(cfg, sources, bus=hub.bus())
            apps.append(app)
            await app.start()
        yield apps[0], apps[1]
    finally:
        for app in reversed(apps):
            await app.shutdown(timeout=5)


def url(app: App) -> str:
    return f"ws://127.0.0.1:{app.port}/ws"


def client(app: App, **kw: Any) -> Client:
    kw.setdefault("authenticator", SoftwareAuthenticator())
    return Client(
        url(app),
        origin=ORIGIN,
        backoff=Backoff((0.05, 0.1), random=lambda: 1.0),
        request_timeout=TIMEOUT,
        **kw,
    )


class Inbox:
    def __init__(self, c: Client) -> None:
        self.events: list[Event] = []
        self.changed = asyncio.Event()
        c.on(None, self._add)

    def _add(self, e: Event) -> None:
        self.events.append(e)
        self.changed.set()

    def seqs(self, conv: str) -> list[int]:
        return [
            e.seq for e in self.events if e.type == T.MESSAGE_RECEIVE and e.conversation_id == conv
        ]

    async def until(self, check: Any) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not check():
                self.changed.clear()
                await self.changed.wait()


async def test_clients_on_two_nodes_converse_with_dense_seqs_in_order(tmp_path: Path) -> None:
    async with two_nodes(tmp_path / "data") as (a, b), AsyncExitStack() as stack:
        alice, bob = client(a), client(b)
        stack.push_async_callback(alice.close)
        stack.push_async_callback(bob.close)
        await alice.register("alice", display_name="Alice")
        await alice.synced(timeout=TIMEOUT)
        await bob.register("bob", display_name="Bob")
        await bob.synced(timeout=TIMEOUT)
        inbox_a, inbox_b = Inbox(alice), Inbox(bob)
        conv = (await alice.create_group("g", [bob.user_id])).conversation_id
        await inbox_b.until(lambda: any(e.type == T.GROUP_MEMBER_ADDED for e in inbox_b.events))
        n = 20
        sends = [alice.send_message(conv, b"a%d" % i) for i in range(n)]
        sends += [bob.send_message(conv, b"b%d" % i) for i in range(n)]
        echoes = await asyncio.gather(*sends)
        # Dense and unique across the two nodes (2 GROUP_MEMBER_ADDED first).
        assert sorted(e.seq for e in echoes) == list(range(3, 2 * n + 3))
        # Each side receives the other's messages in seq order, none twice.
        theirs_a = sorted(e.seq for e in echoes[n:])
        theirs_b = sorted(e.seq for e in echoes[:n])
        await inbox_a.until(lambda: len(inbox_a.seqs(conv)) >= n)
        await inbox_b.until(lambda: len(inbox_b.seqs(conv)) >= n)
        assert inbox_a.seqs(conv) == theirs_a
        assert inbox_b.seqs(conv) == theirs_b
        # Typing goes across too.
        await bob.typing(conv, True)
        await inbox_a.until(lambda: any(e.type == T.TYPING_NOTIFY for e in inbox_a.events))
