"""Abuse limits over real sockets (SPEC §12.32, §12.31): one request cannot stall the
others, per-IP authentication limits, bounded buffers before READY.

Latency criteria here are behaviour, not benchmarks: a bystander's PING round trips
while an attacker works the server, with margins for two shared, noisy cores.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from sovereign import logs
from sovereign.protocol.types import MessageType as T
from sovereign.server import create_app
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import rawws
from tests.helpers.flows import register
from tests.helpers.server import RunningServer
from tests.helpers.server import test_config as make_config
from tests.helpers.wsclient import WsClient

ServerWith = Callable[..., AbstractAsyncContextManager[RunningServer]]


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def ping_rtts(c: WsClient, stop: asyncio.Event, limit: int = 2000) -> list[float]:
    """PING/PONG round trips (seconds) until ``stop`` (or ``limit`` pings)."""
    rtts: list[float] = []
    while not stop.is_set() and len(rtts) < limit:
        t0 = time.perf_counter()
        await c.request(T.PING, pb.Ping(timestamp=1), T.PONG, timeout=10)
        rtts.append(time.perf_counter() - t0)
        await asyncio.sleep(0.005)
    return rtts


async def during(attack: Awaitable[None], bystander: WsClient) -> list[float]:
    stop = asyncio.Event()
    pinger = asyncio.create_task(ping_rtts(bystander, stop))
    await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(attack, 60)
    finally:
        stop.set()
    return await pinger


_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def short_id(n: int) -> str:
    """A 3-character id (62**3 of them): 12,000 fit one 60 KB envelope, as in the probe."""
    a = _ALPHABET
    return a[n // 3844 % 62] + a[n // 62 % 62] + a[n % 62]


def ack_of(n: int, offset: int = 0) -> pb.MessageAck:
    return pb.MessageAck(message_ids=[short_id(offset + i) for i in range(n)])


# -- MESSAGE_ACK (defect 1) -------------------------------------------------------------


async def test_ack_with_more_than_1000_ids_is_3001(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    await register(c, "acker")
    code, err = await c.error(T.MESSAGE_ACK, ack_of(1001))
    assert code == 3001 and not err.fatal
    ok = await c.request(T.MESSAGE_ACK, ack_of(1000), T.ACK)
    assert ok.count == 0  # unknown ids are ignored (§12.14)
    # message_id counts toward the cap too
    req = ack_of(1000)
    req.message_id = "extra"
    code, _ = await c.error(T.MESSAGE_ACK, req)
    assert code == 3001


async def test_ack_storm_does_not_stall_a_bystander(server: RunningServer) -> None:
    """The probe: one 60 KB ack of 12,000 short ids held the loop for seconds. Acks at
    and over the cap from four clients must leave a bystander's PING p99 < 20 ms."""
    bystander = await WsClient.connect(server.url)
    await register(bystander, "bystander")
    attackers = []
    for i in range(4):
        c = await WsClient.connect(server.url)
        await register(c, f"attacker{i}")
        attackers.append(c)

    answers: list[tuple[str, int]] = []
    # Built before the storm: the clients share this process's loop with the server, and
    # building one 12,000-id ack takes ~3 ms of Python that the bystander's PING would
    # otherwise measure as a server stall (CI once saw 24.9 ms with four built at once).
    acks = {
        (i, round_): (
            ack_of(12_000, (i * 6 + round_) * 12_000),  # 60 KB: 3001, cheaply
            ack_of(1000, (i * 6 + round_) * 1000),  # at the cap: one query
        )
        for i in range(4)
        for round_ in range(6)
    }

    async def storm() -> None:
        async def one(c: WsClient, i: int) -> None:
            for round_ in range(6):
                big, capped = acks[i, round_]
                got = await c.response(c.send(T.MESSAGE_ACK, big), timeout=30)
                answers.append(("over", got.message.code if got.type == T.ERROR else got.type))
                got = await c.response(c.send(T.MESSAGE_ACK, capped), timeout=30)
                answers.append(("cap", got.type))

        await asyncio.gather(*(one(c, i) for i, c in enumerate(attackers)))

    rtts = await during(storm(), bystander)
    assert len(rtts) >= 10
    # The 20 ms holds on uvloop (production); the stdlib loop, which the suite
    # also runs, is measurably slower per callback and gets twice the margin.
    limit = 0.020 if "uvloop" in type(asyncio.get_running_loop()).__module__ else 0.040
    assert p99(rtts) < limit, f"bystander PING p99 {p99(rtts) * 1000:.1f} ms during an ack storm"
    assert sorted(set(answers)) == [("cap", T.ACK), ("over", 3001)]


# -- per-IP authentication limits (defect 7) ---------------------------------------------


async def test_auth_attempts_are_limited_per_source_ip(server_with: ServerWith) -> None:
    async with server_with(
        auth_rate_per_minute=6.0, auth_rate_burst=3, register_rate_per_hour=1_000
    ) as srv:
        codes = []
        for _ in range(4):  # one connection per attempt: the limit is per IP, not socket
            c = await WsClient.connect(srv.url)
            code, err = await c.error(T.AUTH_REQUEST, pb.AuthRequest(session_token="A" * 43))
            codes.append((code, err))
            await c.close()
        assert [code for code, _ in codes] == [1001, 1001, 1001, 3004]
        limited = codes[-1][1]
        assert not limited.fatal and 1_000 <= limited.retry_after_ms <= 10_001


async def test_registrations_are_limited_per_source_ip(server_with: ServerWith) -> None:
    async with server_with(
        auth_rate_per_minute=1_000.0, auth_rate_burst=1_000, register_rate_per_hour=2
    ) as srv:
        c = await WsClient.connect(srv.url)
        for name in ("r1", "r2"):
            await c.request(
                T.AUTH_REGISTER_REQUEST,
                pb.AuthRegisterRequest(username=name),
                T.AUTH_REGISTER_CHALLENGE,
            )
        code, err = await c.error(T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="r3"))
        assert code == 3004 and err.retry_after_ms > 0
        # logins are not registrations: still allowed from that address
        code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(username="nobody"))
        assert code == 1001


async def test_forwarded_for_counts_only_behind_a_trusted_proxy(server_with: ServerWith) -> None:
    async def attempts(srv: RunningServer, forwarded: list[str]) -> list[int]:
        out = []
        for ip in forwarded:
            c = await WsClient.connect(srv.url, headers={"X-Forwarded-For": ip})
            code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(session_token="A" * 43))
            out.append(code)
            await c.close()
        return out

    limits = {"auth_rate_per_minute": 1.0, "auth_rate_burst": 1}
    async with server_with(trusted_proxies=["127.0.0.0/8"], **limits) as srv:
        # behind the proxy each client has its own bucket; a spoofed hop to the left
        # of the proxy's entry does not help the second client
        assert await attempts(srv, ["203.0.113.1", "203.0.113.2", "198.51.100.9, 203.0.113.2"]) == [
            1001,
            1001,
            3004,
        ]
    async with server_with(**limits) as srv:  # no trusted proxy: the header is ignored
        assert await attempts(srv, ["203.0.113.1", "203.0.113.2"]) == [1001, 3004]


# -- shutdown under in-flight work (defect 9) --------------------------------------------


async def test_shutdown_does_not_close_storage_under_in_flight_acks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SPEC §4: shutdown finishes or stops in-flight work before storage closes. The
    probe saw DatabaseClosed in _ack_slow; a zero drain timeout forces the race."""
    cfg = make_config(tmp_path / "data")
    app = await create_app(cfg)
    await app.start()
    url = f"ws://127.0.0.1:{app.port}/ws"
    clients = []
    for i in range(4):
        c = await WsClient.connect(url)
        await register(c, f"acker{i}")
        clients.append(c)
    caplog.set_level(logging.INFO)
    for n in range(50):
        for i, c in enumerate(clients):
            c.send(T.MESSAGE_ACK, ack_of(1000, (n * 4 + i) * 1000 % 200_000))
    await asyncio.sleep(0.01)  # the acks are in flight (storage reads)
    await app.shutdown(timeout=0.0)
    text = caplog.text
    assert "DatabaseClosed" not in text and "request failed" not in text, text[-2000:]
    for c in clients:
        assert await c.closed(5) == 4006


async def test_shutdown_stops_work_that_outlives_the_drain_before_storage_closes(
    tmp_path: Path,
) -> None:
    """A request task still running when the drain times out must not touch storage
    after it closed (the probe's DatabaseClosed): it finishes or is cancelled first."""
    app = await create_app(make_config(tmp_path / "data"))
    await app.start()
    touched: list[str] = []

    async def late_reader() -> None:
        await asyncio.sleep(0.5)  # outlives the drain below
        try:
            await app.storage.db.read(lambda conn: conn.execute("SELECT 1").fetchone())
            touched.append("read after shutdown began")
        except Exception as exc:
            touched.append(type(exc).__name__)
            raise

    app.tasks.background(late_reader())
    await app.shutdown(timeout=0.05)
    await asyncio.sleep(0.6)
    assert "DatabaseClosed" not in touched, touched
    assert app.tasks.pending == 0


# -- logging of protocol errors and auth failures (defect 8) -----------------------------


async def test_protocol_errors_and_auth_failures_are_logged_rate_limited(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=logs.ABUSE_LOGGER)
    flt = logs.limit_abuse_log()
    flt.tokens, flt.suppressed = flt.burst, 0
    acct_client = await WsClient.connect(server.url)
    token = (await register(acct_client, "logged")).token
    await acct_client.close()
    caplog.clear()
    # one of each: our frame rules, picows's framing rules, the dispatcher, auth
    kinds = [
        rawws.frame(rawws.OP_TEXT, b"x"),
        rawws.frame(rawws.OP_CONT, b"x"),
        rawws.frame(rawws.OP_BINARY, b"x", mask=False),
        rawws.frame(rawws.OP_BINARY, pb.Envelope(type=T.MESSAGE_SEND).SerializeToString()),
    ]
    for data in kinds:
        ws = await rawws.RawWs.open(server.app.port)
        ws.send(data)
        await ws.ending()
        await ws.close()
    c = await WsClient.connect(server.url)
    await c.error(T.AUTH_REQUEST, pb.AuthRequest(session_token="B" * 43))
    await c.close()
    text = caplog.text
    assert "close=1003" in text and "close=1002" in text and "error=1006" in text
    assert "auth failure" in text and "error=1001" in text
    assert token not in text and "B" * 43 not in text  # never a token (SPEC §11)
    # a flood is cut to the filter's rate, with a count of what was dropped
    caplog.clear()
    t0 = time.monotonic()
    for _ in range(150):
        ws = await rawws.RawWs.open(server.app.port)
        ws.send(rawws.frame(rawws.OP_TEXT, b"x"))
        await ws.ending()
        await ws.close()
    elapsed = time.monotonic() - t0
    lines = [r for r in caplog.records if r.name == logs.ABUSE_LOGGER]
    assert len(lines) <= flt.burst + flt.per_second * elapsed + 1, (len(lines), elapsed)
    # after a pause the next record passes; every one of the 151 errors is then either
    # a line or counted in a line. (On a slow machine a token refills mid-flood, so the
    # count may ride on a flood line rather than on this last one.)
    await asyncio.sleep(0.3)
    ws = await rawws.RawWs.open(server.app.port)
    ws.send(rawws.frame(rawws.OP_TEXT, b"x"))
    await ws.ending()
    await ws.close()
    lines = [r.getMessage() for r in caplog.records if r.name == logs.ABUSE_LOGGER]
    counted = [re.search(r"\(and (\d+) similar suppressed\)$", m) for m in lines]
    assert any(counted), lines[-3:]
    assert len(lines) + sum(int(m.group(1)) for m in counted if m) == 151
    assert flt.suppressed == 0
