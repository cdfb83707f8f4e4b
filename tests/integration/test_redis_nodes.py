"""Two real server nodes in one process, linked by RedisBus over a real ``redis-server``:
real sockets, real services in cluster mode, one real SQLite file shared by both.

The database is SQLite here (two nodes' writers over one WAL file) so that the Redis
link can be tested end to end without a PostgreSQL server; the multi-process tests on
PostgreSQL are in test_cluster.py. Covers: a client on each node converses live; Redis
killed and restarted during traffic — nothing durable lost, the other node's client
catches up without reconnecting, and live delivery resumes within 2 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sovereign.cluster.redisbus import RedisBus
from sovereign.protocol.types import MessageType as T
from sovereign.server import App, create_app
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import server as test_server
from tests.helpers.cluster import RedisServer
from tests.helpers.flows import register
from tests.helpers.wsclient import WsClient


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


@pytest.fixture
async def nodes(tmp_path: Path, redis: RedisServer) -> AsyncIterator[list[App]]:
    cfg, sources = test_server.test_config_sources(tmp_path / "data")
    apps: list[App] = []
    try:
        for _ in range(2):
            app = await create_app(cfg, sources, bus=RedisBus(redis.url, "nodes"))
            await app.start()
            apps.append(app)
        yield apps
    finally:
        for app in apps:
            await app.shutdown(timeout=5)


def url(app: App) -> str:
    return f"ws://127.0.0.1:{app.port}/ws"


async def send(c: WsClient, conv: str, body: bytes) -> pb.MessageReceive:
    rid = c.send(
        T.MESSAGE_SEND,
        pb.MessageSend(conversation_id=conv, encrypted_payload=body, message_type="text"),
    )
    got = await c.response(rid)
    assert got.type == T.MESSAGE_RECEIVE, got
    return got.message


async def received(c: WsClient, want: set[int], timeout: float) -> set[int]:
    """Seqs of MESSAGE_RECEIVE pushes until ``want`` are all seen; the missing ones."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    missing = set(want)
    while missing:
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            m = await c.wait_for(T.MESSAGE_RECEIVE, "", timeout=left)
        except TimeoutError:
            break
        missing.discard(int(m.seq))
    return missing


async def test_clients_on_two_nodes_converse_over_redis(nodes: list[App]) -> None:
    a_node, b_node = nodes
    assert all(isinstance(n.bus, RedisBus) and n.bus.connected for n in nodes)
    alice = await WsClient.connect(url(a_node))
    bob = await WsClient.connect(url(b_node))
    try:
        acct_a = await register(alice, "alice")
        acct_b = await register(bob, "bob")
        created = await alice.request(
            T.GROUP_CREATE, pb.GroupCreate(title="t", member_ids=[acct_b.user_id]), T.GROUP_CREATED
        )
        conv = created.conversation_id
        m1 = await send(alice, conv, b"over redis")
        assert not await received(bob, {int(m1.seq)}, 3.0)
        m2 = await send(bob, conv, b"and back")
        assert m2.seq == m1.seq + 1
        assert not await received(alice, {int(m2.seq)}, 3.0)
        assert acct_a.user_id != acct_b.user_id
    finally:
        await alice.close()
        await bob.close()


async def test_redis_restart_during_traffic_loses_nothing(
    nodes: list[App], redis: RedisServer
) -> None:
    a_node, b_node = nodes
    alice = await WsClient.connect(url(a_node))
    bob = await WsClient.connect(url(b_node))
    try:
        await register(alice, "alice")
        acct_b = await register(bob, "bob")
        created = await alice.request(
            T.GROUP_CREATE, pb.GroupCreate(title="t", member_ids=[acct_b.user_id]), T.GROUP_CREATED
        )
        conv = created.conversation_id
        echoed: set[int] = set()
        for i in range(20):
            echoed.add(int((await send(alice, conv, b"before %d" % i)).seq))
        redis.kill()
        while any(n.bus.connected for n in nodes):
            await asyncio.sleep(0.02)
        # Committed while Redis is down: durable, echoed, but no notification can go.
        for i in range(20):
            echoed.add(int((await send(alice, conv, b"during %d" % i)).seq))
        redis.start()
        back = time.monotonic()
        # Bob, who never reconnected, gets all 40 (the resync after reconnection).
        missing = await received(bob, echoed, 5.0)
        assert not missing, f"lost: {sorted(missing)}"
        # Live delivery resumes within 2 s of Redis's return.
        while not all(n.bus.connected for n in nodes):
            assert time.monotonic() - back < 2.0
            await asyncio.sleep(0.01)
        m = await send(alice, conv, b"after")
        assert not await received(bob, {int(m.seq)}, max(0.1, 2.0 - (time.monotonic() - back)))
        assert time.monotonic() - back < 2.0
        stats = [n.bus.stats for n in nodes if isinstance(n.bus, RedisBus)]
        assert len(stats) == 2 and all(s.reconnects == 1 for s in stats)
        # A node's resync is counted when its catch-up read returns, which may be just
        # after its link is back (seen once in CI under load): wait for it, bounded.
        while not all(s.resyncs >= 1 for s in stats):
            assert time.monotonic() - back < 5.0, [s.resyncs for s in stats]
            await asyncio.sleep(0.01)
        print(f"\nredis restart (2 nodes, SQLite): 41 echoed, 0 lost, live again after "
              f"{time.monotonic() - back:.2f} s")  # fmt: skip
    finally:
        await alice.close()
        await bob.close()


async def test_metrics_show_the_bus(nodes: list[App]) -> None:
    import urllib.request

    listener = nodes[0].admin_listener
    assert listener is not None

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{listener.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    await asyncio.sleep(0.3)
    text = await asyncio.get_running_loop().run_in_executor(None, scrape)
    assert "sovereign_cluster_bus_connected 1.0" in text
    assert 'sovereign_cluster_bus_messages_total{outcome="published"}' in text
    assert "sovereign_cluster_bus_reconnects_total 0.0" in text
