"""Closing handshake and received close codes over real sockets (SPEC §12.31,
RFC 6455 §7.1.1, §7.4). Raw frames from ``tests/helpers/rawws.py``."""

from __future__ import annotations

import asyncio

import pytest

from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import rawws
from tests.helpers.rawws import OP_BINARY, OP_CONT, OP_TEXT, RawWs
from tests.helpers.server import RunningServer

# -- received close codes (defect 4) ---------------------------------------------------


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])
async def test_invalid_received_close_code_is_answered_1002(
    server: RunningServer, code: int
) -> None:
    ws = await RawWs.open(server.app.port)
    ws.send(rawws.close_frame(code))
    end = await ws.ending(answer=False)
    assert end.code == 1002, f"close code {code} answered {end.code}"
    await ws.close()


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999])
async def test_valid_received_close_code_is_echoed(server: RunningServer, code: int) -> None:
    ws = await RawWs.open(server.app.port)
    ws.send(rawws.close_frame(code, b"bye"))
    end = await ws.ending(answer=False)
    assert end.code == code
    assert end.eof and not end.reset
    await ws.close()


async def test_empty_close_body_is_answered_1000(server: RunningServer) -> None:
    ws = await RawWs.open(server.app.port)
    ws.send(rawws.close_frame(None))
    end = await ws.ending(answer=False)
    assert end.code == 1000
    await ws.close()


# -- the close frame reaches a peer that is still sending (defect 3) ---------------------

BURST = rawws.frame(OP_BINARY, b"\x00" * 60_000, fin=False) + b"".join(
    rawws.frame(OP_CONT, b"\x00" * 1000, fin=False) for _ in range(2000)
)


async def _fail_while_sending(ws: RawWs, bad: bytes) -> rawws.Ending:
    """Send ``bad`` followed at once by ~2 MB the server will not read, keep sending
    while waiting: the server's close frame must still arrive (not a reset)."""
    ws.send(bad + BURST)

    async def keep_sending() -> None:
        try:
            for _ in range(200):
                ws.send(rawws.frame(OP_CONT, b"\x00" * 1000, fin=False))
                await asyncio.sleep(0.005)
        except (ConnectionError, RuntimeError):
            pass

    sender = asyncio.create_task(keep_sending())
    try:
        return await ws.ending(timeout=5.0)
    finally:
        sender.cancel()


@pytest.mark.parametrize("attempt", range(3))
async def test_text_frame_close_1003_reaches_a_sending_peer(
    server: RunningServer, attempt: int
) -> None:
    ws = await RawWs.open(server.app.port)
    end = await _fail_while_sending(ws, rawws.frame(OP_TEXT, b"hi"))
    assert end.code == 1003, f"no close frame: eof={end.eof} reset={end.reset}"
    await ws.close()


async def test_oversized_frame_close_1009_reaches_a_sending_peer(server: RunningServer) -> None:
    ws = await RawWs.open(server.app.port)
    big = rawws.frame(OP_BINARY, b"\x00" * 16, length=2 * 1024 * 1024)[:-16]  # header only
    ws.send(big)
    end = await _fail_while_sending(ws, b"")
    assert end.code == 1009, f"no close frame: eof={end.eof} reset={end.reset}"
    await ws.close()


async def test_protocol_error_close_4007_reaches_a_sending_peer(server: RunningServer) -> None:
    ws = await RawWs.open(server.app.port)
    env = pb.Envelope(type=T.MESSAGE_SEND, request_id="x").SerializeToString()
    end = await _fail_while_sending(ws, rawws.frame(OP_BINARY, env))
    assert end.code == 4007, f"no close frame: eof={end.eof} reset={end.reset}"
    assert [op for op, _ in end.frames] == [OP_BINARY]  # the fatal Error 1006 first
    await ws.close()


async def test_server_close_waits_for_the_peer_close_then_ends(server: RunningServer) -> None:
    """RFC 6455 §7.1.1: after its close frame the server keeps the socket until the
    peer's close frame (then closes TCP at once), or ~1 s without one."""
    ws = await RawWs.open(server.app.port)
    ws.send(rawws.frame(OP_TEXT, b"x"))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end = await ws.ending(answer=False, timeout=5.0)
    waited = loop.time() - t0
    assert end.code == 1003 and end.eof
    assert 0.8 <= waited <= 3.0, f"closed after {waited:.2f} s without the peer's close"
    await ws.close()

    ws = await RawWs.open(server.app.port)
    ws.send(rawws.frame(OP_TEXT, b"x"))
    t0 = loop.time()
    end = await ws.ending(answer=True, timeout=5.0)
    assert end.code == 1003 and end.eof
    assert loop.time() - t0 < 0.5
    await ws.close()
