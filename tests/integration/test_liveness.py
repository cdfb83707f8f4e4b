"""Liveness and pre-READY bounds over real sockets (SPEC §12.31): the upgrade
deadline (slowloris), server pings and dead peers, the pre-READY reassembly cap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, suppress

import pytest
from picows import WSMsgType

from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import rawws
from tests.helpers.flows import register
from tests.helpers.rawws import OP_BINARY, OP_CONT, RawWs
from tests.helpers.server import RunningServer
from tests.helpers.wsclient import WsClient

ServerWith = Callable[..., AbstractAsyncContextManager[RunningServer]]


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def half_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A slowloris upgrade: the request line and one header, never the blank line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await writer.drain()
    return reader, writer


async def slowloris(srv: RunningServer, count: int, deadline: float) -> None:
    """``count`` half-open upgrades must all be closed by ``deadline`` seconds, while a
    new client's connect + resume p99 stays under 50 ms."""
    probe = await WsClient.connect(srv.url)
    token = (await register(probe, "victim")).token
    await probe.close()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    socks = [await half_open(srv.app.port) for _ in range(count)]

    async def closed_at(reader: asyncio.StreamReader) -> float:
        with suppress(ConnectionResetError):
            await asyncio.wait_for(reader.read(), deadline + 5)
        return loop.time() - t0

    closing = [asyncio.create_task(closed_at(r)) for r, _ in socks]
    latencies: list[float] = []
    while loop.time() - t0 < deadline - 0.5:
        start = time.perf_counter()
        c = await WsClient.connect(srv.url)
        await c.request(T.AUTH_REQUEST, pb.AuthRequest(session_token=token), T.AUTH_SUCCESS)
        latencies.append(time.perf_counter() - start)
        await c.close()
        await asyncio.sleep(0.01)
    times = await asyncio.gather(*closing)
    for _, w in socks:
        w.close()
    assert max(times) <= deadline, f"a half-open upgrade lived {max(times):.2f} s"
    assert p99(latencies) < 0.050, f"connect+auth p99 {p99(latencies) * 1000:.1f} ms"


async def test_half_open_upgrades_are_closed_at_handshake_timeout(server_with: ServerWith) -> None:
    async with server_with(handshake_timeout=1.0) as srv:
        await slowloris(srv, 100, deadline=1.5)


@pytest.mark.slow
async def test_slowloris_1000_half_open_upgrades_closed_within_5_5_s(
    server_with: ServerWith,
) -> None:
    async with server_with() as srv:  # handshake_timeout defaults to 5 s
        await slowloris(srv, 1000, deadline=5.5)


# -- server pings (defect 6) -------------------------------------------------------------


async def test_server_pings_a_quiet_peer_and_drops_a_dead_one(server_with: ServerWith) -> None:
    async with server_with(ping_interval=0.6, ping_timeout=0.6, idle_timeout=60) as srv:
        dead = await WsClient.connect(srv.url)  # never answers pings (no auto pong)
        await register(dead, "dead")
        alive = await WsClient.connect(srv.url)
        await register(alive, "alive")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stop = asyncio.Event()

        async def pong_back() -> None:  # a live client answers every ping
            seen = 0
            while not stop.is_set():
                pings = [p for op, p in alive.listener.control if op == WSMsgType.PING]
                for p in pings[seen:]:
                    alive.transport.send_pong(p)
                seen = len(pings)
                await asyncio.sleep(0.05)

        ponger = asyncio.create_task(pong_back())
        code = await dead.closed(timeout=5)
        elapsed = loop.time() - t0
        assert code == 4008
        assert 1.0 <= elapsed <= 2.5, f"dead peer dropped after {elapsed:.2f} s"
        assert any(op == WSMsgType.PING for op, _ in dead.listener.control)
        await asyncio.sleep(max(0.0, 3.0 - (loop.time() - t0)))
        stop.set()
        await ponger
        # the peer that answered is still connected and usable
        await alive.request(T.PING, pb.Ping(timestamp=7), T.PONG)
        await alive.close()


# -- pre-READY reassembly cap (defect 2) -------------------------------------------------


async def test_fragments_before_ready_are_capped_at_max_envelope_bytes(
    server: RunningServer,
) -> None:
    ws = await RawWs.open(server.app.port)
    ws.send(rawws.frame(OP_BINARY, b"\x00" * 40_000, fin=False))
    ws.send(rawws.frame(OP_CONT, b"\x00" * 30_000, fin=False))  # 70,000 > 65,536
    end = await ws.ending()
    assert end.code == 1009
    await ws.close()


async def test_fragments_after_ready_may_reach_max_frame_bytes(server: RunningServer) -> None:
    """After READY reassembly goes up to max_frame_bytes, so an oversized Envelope is
    the non-fatal 3003 of SPEC §1 (the pre-READY cap does not leak into READY)."""
    c = await WsClient.connect(server.url)
    await register(c, "big")
    env = pb.Envelope(type=T.PING, request_id="", payload=b"\x00" * 100_000).SerializeToString()
    c.transport.send(WSMsgType.BINARY, env[:50_000], fin=False)
    c.transport.send(WSMsgType.CONTINUATION, env[50_000:], fin=True)
    got = await c.expect(T.ERROR)
    assert got.code == 3003
    await c.request(T.PING, pb.Ping(timestamp=1), T.PONG)
    await c.close()
