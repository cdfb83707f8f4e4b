"""Transport rules over real sockets (SPEC §1, §2, §4, §12.7, §12.8)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import picows
import pytest
from picows import WSMsgType

from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.flows import register
from tests.helpers.server import ORIGIN, RunningServer
from tests.helpers.wsclient import WsClient

ServerWith = Callable[..., AbstractAsyncContextManager[RunningServer]]


async def http_get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """A raw HTTP/1.1 upgrade request; returns (status, raw response)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    await writer.wait_closed()
    status = int(data.split(b" ", 2)[1])
    return status, data


async def ready_client(srv: RunningServer, name: str = "alice") -> WsClient:
    c = await WsClient.connect(srv.url)
    await register(c, name)
    return c


# -- upgrade (SPEC §1, §12.10) -----------------------------------------------------


async def test_healthz_on_main_listener(server: RunningServer) -> None:
    status, raw = await http_get(server.app.port, "/healthz")
    assert status == 200 and b'"status":"ok"' in raw


async def test_unknown_path_is_404(server: RunningServer) -> None:
    assert (await http_get(server.app.port, "/nope"))[0] == 404


async def test_subprotocol_negotiated(server: RunningServer) -> None:
    status, raw = await http_get(
        server.app.port, "/ws", {"Sec-WebSocket-Protocol": "chat, sovereign.v1"}
    )
    assert status == 101
    assert b"sec-websocket-protocol: sovereign.v1" in raw.lower()


async def test_foreign_subprotocol_refused_400(server: RunningServer) -> None:
    status, _ = await http_get(server.app.port, "/ws", {"Sec-WebSocket-Protocol": "chat"})
    assert status == 400


async def test_no_subprotocol_accepted(server: RunningServer) -> None:
    c = await WsClient.connect(server.url, subprotocols=[])
    assert await c.request(T.PING, pb.Ping(timestamp=7), T.PONG) == pb.Pong(timestamp=7)
    await c.close()


async def test_origin_allow_list(server: RunningServer) -> None:
    assert (await http_get(server.app.port, "/ws", {"Origin": "https://evil.example"}))[0] == 403
    assert (await http_get(server.app.port, "/ws", {"Origin": ORIGIN}))[0] == 101
    assert (await http_get(server.app.port, "/ws"))[0] == 101  # native client: no Origin


async def test_global_connection_cap_answers_503(server_with: ServerWith) -> None:
    async with server_with(max_connections=2, max_connections_per_user=1) as srv:
        a = await WsClient.connect(srv.url)
        b = await WsClient.connect(srv.url)
        assert (await http_get(srv.app.port, "/ws"))[0] == 503
        await a.close()
        for _ in range(100):
            if srv.app.connection_count() < 2:
                break
            await asyncio.sleep(0.01)
        assert (await http_get(srv.app.port, "/ws"))[0] == 101
        await b.close()


# -- frames (SPEC §1, RFC 6455) ------------------------------------------------------


async def test_text_frame_closes_1003(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    c.transport.send(WSMsgType.TEXT, b"hello")
    assert await c.closed() == 1003


async def pong_to(c: WsClient, payload: bytes) -> list[tuple[int, bytes]]:
    """Send a WebSocket ping; the control frames received within ~1 s."""
    c.transport.send_ping(payload)
    for _ in range(100):
        if c.listener.control:
            break
        await asyncio.sleep(0.01)
    return list(c.listener.control)


async def test_ws_ping_answered_with_pong(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    assert await pong_to(c, b"abc") == [(int(WSMsgType.PONG), b"abc")]
    await c.close()


async def test_accepted_socket_options_set_through_one_socket_object(
    server: RunningServer,
) -> None:
    """picows' connection_made goes through OpeningSocket (one socket object, detached
    after): TCP_NODELAY is really set on the accepted socket, the stand-in is gone
    once it returns, and the descriptor it used still carries the connection."""
    c = await WsClient.connect(server.url)
    (s,) = list(server.app.outbox.all_sessions())
    lt = s.link.transport.underlying_transport
    assert lt.opening is None
    sock = lt.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert lt.get_extra_info("sockname")[1] == server.app.port
    assert await pong_to(c, b"still here") == [(int(WSMsgType.PONG), b"still here")]
    await c.close()


def test_opening_socket_stands_aside_for_a_descriptor_that_is_no_socket() -> None:
    """A descriptor the socket module refuses (here a pipe) gives no OpeningSocket:
    picows then asks the transport's own stand-in, as it did before."""
    from sovereign.transport.ws import OpeningSocket

    class Transport:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return self if name == "socket" else default

        def fileno(self) -> int:
            return self.fd

    r, w = os.pipe()
    try:
        assert OpeningSocket.of(Transport(r)) is None  # type: ignore[arg-type]
        os.fstat(r)  # still open: nothing took it over
    finally:
        os.close(r)
        os.close(w)
    a, b = socket.socketpair()
    with a, b:
        opening = OpeningSocket.of(Transport(a.fileno()))  # type: ignore[arg-type]
        assert opening is not None and opening.fileno() == a.fileno()
        opening.release()
        a.sendall(b"x")  # the descriptor survived the release
        assert b.recv(1) == b"x"


async def test_frame_over_max_frame_bytes_closes_1009(server_with: ServerWith) -> None:
    async with server_with(max_frame_bytes=100_000, max_envelope_bytes=1000) as srv:
        c = await WsClient.connect(srv.url)
        c.send_raw(b"\x00" * 100_001)
        assert await c.closed() == 1009


async def test_reassembled_message_over_max_frame_bytes_closes_1009(
    server_with: ServerWith,
) -> None:
    async with server_with(max_frame_bytes=10_000, max_envelope_bytes=1000) as srv:
        c = await WsClient.connect(srv.url)
        c.transport.send(WSMsgType.BINARY, b"\x00" * 6000, fin=False)
        c.transport.send(WSMsgType.CONTINUATION, b"\x00" * 6000, fin=True)
        assert await c.closed() == 1009


async def test_fragmented_envelope_is_reassembled(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    data = pb.Envelope(
        type=T.PING, request_id="frag", payload=pb.Ping(timestamp=42).SerializeToString()
    ).SerializeToString()
    c.transport.send(WSMsgType.BINARY, data[:3], fin=False)
    c.transport.send(WSMsgType.CONTINUATION, data[3:5], fin=False)
    c.transport.send(WSMsgType.CONTINUATION, data[5:], fin=True)
    assert await c.expect(T.PONG, "frag") == pb.Pong(timestamp=42)
    await c.close()


@pytest.mark.parametrize("flag", ["rsv1", "rsv2", "rsv3"])
async def test_rsv_bits_close_1002(server: RunningServer, flag: str) -> None:
    c = await WsClient.connect(server.url)
    kwargs: dict[str, Any] = {flag: True}
    c.transport.send(WSMsgType.BINARY, b"\x08\x3c", **kwargs)
    assert await c.closed() == 1002


async def test_continuation_without_start_closes_1002(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    c.transport.send(WSMsgType.CONTINUATION, b"\x08\x3c", fin=True)
    assert await c.closed() == 1002


async def test_new_message_inside_fragmented_one_closes_1002(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    c.transport.send(WSMsgType.BINARY, b"\x08", fin=False)
    c.transport.send(WSMsgType.BINARY, b"\x08\x3c", fin=True)
    assert await c.closed() == 1002


async def test_invalid_close_code_is_protocol_error(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    c.transport.send(WSMsgType.CLOSE, b"\x03\xec")  # 1004: reserved, never valid on the wire
    assert await c.closed() == 1002


async def test_client_close_is_echoed(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    c.transport.send_close(picows.WSCloseCode.GOING_AWAY)
    assert await c.closed() == 1001


# -- envelopes (SPEC §2, §12.7, §12.8) ---------------------------------------------------


async def test_ping_pong_echoes_request_id_and_timestamp(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    rid = c.send(T.PING, pb.Ping(timestamp=123456789))
    assert await c.expect(T.PONG, rid) == pb.Pong(timestamp=123456789)
    await c.close()


async def test_before_ready_only_auth_and_ping(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    rid = c.send(T.MESSAGE_SEND, pb.MessageSend(conversation_id="x"))
    err = await c.expect(T.ERROR, rid)
    assert (err.code, err.fatal) == (1006, True)
    assert await c.closed() == 4007


async def test_before_ready_unparseable_auth_payload_is_1006(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    rid = c.send(T.AUTH_REQUEST, b"\xff\xff\xff")
    err = await c.expect(T.ERROR, rid)
    assert err.code == 1006
    assert await c.closed() == 4007


async def test_before_ready_oversized_envelope_is_1006(server_with: ServerWith) -> None:
    async with server_with(max_envelope_bytes=1000) as srv:
        c = await WsClient.connect(srv.url)
        c.send_raw(pb.Envelope(type=T.PING, payload=b"\x00" * 2000).SerializeToString())
        err = await c.expect(T.ERROR, "")
        assert err.code == 1006
        assert await c.closed() == 4007


async def test_before_ready_invalid_envelope_is_1006(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    c.send_raw(b"\xff\xff")
    err = await c.expect(T.ERROR, "")
    assert err.code == 1006
    assert await c.closed() == 4007


async def test_oversized_envelope_when_ready_is_3003_and_connection_stays(
    server_with: ServerWith,
) -> None:
    async with server_with(max_envelope_bytes=2000) as srv:
        c = await ready_client(srv)
        c.send_raw(
            pb.Envelope(type=T.PING, request_id="big", payload=b"\x00" * 3000).SerializeToString()
        )
        err = await c.expect(T.ERROR, "")  # SPEC §12.8: 3003 carries an empty request_id
        assert (err.code, err.fatal) == (3003, False)
        assert await c.request(T.PING, pb.Ping(timestamp=5), T.PONG) == pb.Pong(timestamp=5)
        await c.close()


async def test_invalid_envelope_when_ready_is_3005(server: RunningServer) -> None:
    c = await ready_client(server)
    c.send_raw(b"\x0a\xff\x01")  # field 1 as a length past the end
    err = await c.expect(T.ERROR, "")
    assert (err.code, err.fatal) == (3005, False)
    c.send_raw(pb.Envelope(type=T.PING, request_id="r" * 65).SerializeToString())
    assert (await c.expect(T.ERROR, "")).code == 3005  # request_id over 64 bytes
    assert await c.request(T.PING, pb.Ping(timestamp=6), T.PONG) == pb.Pong(timestamp=6)
    await c.close()


async def test_request_id_of_64_bytes_is_fine(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    rid = c.send(T.PING, pb.Ping(timestamp=1), request_id="r" * 64)
    await c.expect(T.PONG, rid)
    await c.close()


async def test_unknown_type_is_3002(server: RunningServer) -> None:
    c = await ready_client(server)
    rid = c.send(99, b"")
    err = await c.expect(T.ERROR, rid)
    assert (err.code, err.fatal) == (3002, False)
    rid = c.send(T.AUTH_SUCCESS, b"")  # a server-to-client type sent by a client
    assert (await c.expect(T.ERROR, rid)).code == 3002
    await c.close()


async def test_unparseable_payload_when_ready_is_3001(server: RunningServer) -> None:
    c = await ready_client(server)
    rid = c.send(T.PING, b"\x08")  # truncated varint
    err = await c.expect(T.ERROR, rid)
    assert (err.code, err.fatal) == (3001, False)
    await c.close()


async def test_empty_request_id_gets_no_ack_but_errors_still_come(server: RunningServer) -> None:
    c = await ready_client(server)
    c.send(T.PONG, pb.Pong(timestamp=1), request_id="")  # would be Acked with a request_id
    await c.nothing(0.3)
    c.send(99, b"", request_id="")
    assert (await c.expect(T.ERROR, "")).code == 3002
    rid = c.send(T.PONG, pb.Pong(timestamp=1))
    assert (await c.expect(T.ACK, rid)).count == 0
    await c.close()


async def test_rate_limit_3004_with_retry_after(server_with: ServerWith) -> None:
    async with server_with(rate_limit_per_second=5, rate_limit_burst=3) as srv:
        c = await ready_client(srv)
        await asyncio.sleep(0.7)  # refill the bucket after registration
        rids = [c.send(T.PING, pb.Ping(timestamp=i)) for i in range(6)]
        got = [await c.recv() for _ in rids]
        assert [g.type for g in got[:3]] == [T.PONG] * 3
        limited = [g for g in got if g.type == T.ERROR]
        assert limited and all(g.message.code == 3004 for g in limited)
        assert all(0 < g.message.retry_after_ms <= 200 for g in limited)
        assert [g.request_id for g in got] == rids  # exactly one response each
        await asyncio.sleep(0.3)
        assert await c.request(T.PING, pb.Ping(timestamp=9), T.PONG) == pb.Pong(timestamp=9)
        await c.close()


# -- timers (SPEC §4, §12.7) -----------------------------------------------------------


async def test_auth_timeout_closes_4001_and_pings_do_not_extend_it(
    server_with: ServerWith,
) -> None:
    async with server_with(auth_timeout=1.0) as srv:
        c = await WsClient.connect(srv.url)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(3):
            await c.request(T.PING, pb.Ping(timestamp=i), T.PONG)
            await asyncio.sleep(0.3)
        assert await c.closed(5) == 4001
        assert 0.9 <= loop.time() - start < 3.0


async def test_idle_timeout_closes_4008_and_frames_reset_it(server_with: ServerWith) -> None:
    async with server_with(idle_timeout=1.0, auth_timeout=30) as srv:
        c = await ready_client(srv)
        for i in range(4):  # 1.6 s of activity: longer than idle_timeout
            await asyncio.sleep(0.4)
            await c.request(T.PING, pb.Ping(timestamp=i), T.PONG)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await c.closed(5) == 4008
        assert 0.7 <= loop.time() - start < 3.0


async def test_idle_timer_counts_websocket_pings(server_with: ServerWith) -> None:
    async with server_with(idle_timeout=1.0, auth_timeout=30) as srv:
        c = await ready_client(srv)
        for _ in range(4):
            await asyncio.sleep(0.4)
            c.transport.send_ping(b"")
        assert not c.transport.is_disconnected
        assert await c.closed(5) == 4008


# -- shutdown (SPEC §4) -----------------------------------------------------------------


async def test_shutdown_closes_every_connection_4006(server_with: ServerWith) -> None:
    async with server_with() as srv:
        a = await ready_client(srv, "a1")
        b = await WsClient.connect(srv.url)
        port = srv.app.port
        await srv.app.shutdown()
        assert await a.closed() == 4006
        assert await b.closed() == 4006
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
