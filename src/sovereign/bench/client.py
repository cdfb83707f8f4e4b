"""Cheap picows clients for the load tool.

A :class:`BenchClient` has two modes. During setup (``setup=True``) every frame is
decoded: responses resolve :meth:`~BenchClient.request` futures by request_id and
SYNC_COMPLETE ends :meth:`~BenchClient.resume`. During a measured phase a scenario's
subclass gets the raw picows frame in :meth:`~BenchClient.on_frame` and decodes only
what it needs — usually just the Envelope type, which for every server frame is the
second byte (the encoder writes field 1 first: ``08 <type>``).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import sys
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar, cast

import picows
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from sovereign.codec import decode_envelope, encode_envelope
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

__all__ = [
    "AddressPool",
    "BenchClient",
    "BenchError",
    "connect",
    "envelope_type",
]

BINARY = WSMsgType.BINARY
CLOSE = WSMsgType.CLOSE
PING = WSMsgType.PING
HEADERS = {"Sec-WebSocket-Protocol": "sovereign.v1"}

C = TypeVar("C", bound="BenchClient")


class BenchError(Exception):
    """A request failed (ERROR / AUTH_ERROR frame, disconnect or timeout)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def envelope_type(buf: memoryview | bytes) -> int:
    """The Envelope's type without decoding the rest (falls back to a full decode)."""
    if buf[0] == 0x08 and buf[1] < 0x80:
        return buf[1]
    return int(decode_envelope(buf)[0])


class AddressPool:
    """Round-robin 127.0.0.x source addresses: each has its own ephemeral port range,
    so one target port can take more connections than one source address allows."""

    def __init__(self, count: int, host: str, offset: int = 0) -> None:
        loopback = host.startswith("127.") or host == "localhost"
        self.addrs: list[tuple[str, int] | None] = (
            [(f"127.0.0.{1 + (i % 254)}", 0) for i in range(max(1, count))] if loopback else [None]
        )
        self._cycle = itertools.islice(itertools.cycle(self.addrs), offset % len(self.addrs), None)

    def next(self) -> tuple[str, int] | None:
        return next(self._cycle)


_rid_counter = itertools.count(1)


class BenchClient(WSListener):
    """One connection; see the module docstring for its two modes."""

    def __init__(self, owner: Any = None) -> None:
        super().__init__()
        self.owner = owner  # the scenario worker: told about unexpected disconnects
        self.transport: WSTransport | None = None
        self.setup = True
        self.waiters: dict[str, asyncio.Future[tuple[int, bytes]]] = {}
        self.sync_waiter: asyncio.Future[int] | None = None
        self.closing = False  # we started the close
        self.close_code: int | None = None
        self.disconnected = False
        self.user_id = ""
        self.capture: dict[int, list[bytes]] | None = None  # setup pushes kept by type
        self.setup_pushes = 0

    # -- picows callbacks ---------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is BINARY:
            if self.setup:
                self._setup_frame(frame.get_payload_as_bytes())
            else:
                self.on_frame(frame)
            return
        if frame.msg_type is CLOSE:
            code = frame.get_close_code()
            self.close_code = int(code.value) or 1005
            if not transport.is_close_frame_sent:
                transport.send_close(code if code.value else WSCloseCode.OK)
            transport.disconnect()
            return
        if frame.msg_type is PING:
            transport.send_pong(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        err = BenchError(f"disconnected (close code {self.close_code})", self.close_code or 0)
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self.waiters.clear()
        if self.sync_waiter is not None and not self.sync_waiter.done():
            self.sync_waiter.set_exception(err)
        self.on_disconnect()

    # -- scenario hooks ---------------------------------------------------------------
    def on_frame(self, frame: WSFrame) -> None:
        """A binary frame outside setup; subclasses decode only what they need."""

    def on_disconnect(self) -> None:
        """The socket is gone; unless we closed it, the owner counts it as lost."""
        if not self.closing and self.owner is not None:
            self.owner.lost(self)

    # -- setup mode ---------------------------------------------------------------------
    def _setup_frame(self, data: bytes) -> None:
        msg_type, rid, payload = decode_envelope(data)
        if rid:
            fut = self.waiters.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result((int(msg_type), bytes(payload)))
                return
        if msg_type == T.SYNC_COMPLETE and self.sync_waiter is not None:
            if not self.sync_waiter.done():
                self.sync_waiter.set_result(pb.SyncComplete.FromString(bytes(payload)).delivered)
            return
        if msg_type == T.AUTH_SUCCESS and not rid:
            self.user_id = pb.AuthSuccess.FromString(bytes(payload)).user_id
        if msg_type in (T.AUTH_ERROR, T.ERROR) and self.sync_waiter is not None:
            if not self.sync_waiter.done():
                self.sync_waiter.set_exception(_error(int(msg_type), bytes(payload)))
            return
        self.setup_pushes += 1
        if self.capture is not None and msg_type in self.capture:
            self.capture[int(msg_type)].append(bytes(payload))

    # -- output -----------------------------------------------------------------------------
    def send(self, msg_type: int, rid: str, payload: bytes) -> bool:
        t = self.transport
        if t is None or self.disconnected:
            return False
        t.send(BINARY, encode_envelope(msg_type, rid, payload))
        return True

    def send_frame(self, data: bytes) -> bool:
        t = self.transport
        if t is None or self.disconnected:
            return False
        t.send(BINARY, data)
        return True

    async def request(
        self, msg_type: int, payload: bytes, expect: int, timeout: float = 30.0
    ) -> bytes:
        """Send one request; its response must be ``expect`` (an ERROR raises)."""
        rid = f"s{next(_rid_counter)}"
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiters[rid] = fut
        if not self.send(msg_type, rid, payload):
            self.waiters.pop(rid, None)
            raise BenchError("not connected")
        try:
            async with asyncio.timeout(timeout):
                got_type, got = await fut
        except TimeoutError:
            self.waiters.pop(rid, None)
            raise BenchError(f"no answer to {T(msg_type).name} within {timeout:.0f} s") from None
        if got_type != expect:
            raise _error(got_type, got)
        return got

    async def resume(self, token: str, timeout: float = 60.0) -> int:
        """AUTH_REQUEST{session_token} and wait for SYNC_COMPLETE; returns its count."""
        self.sync_waiter = asyncio.get_running_loop().create_future()
        rid = f"a{next(_rid_counter)}"
        auth: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiters[rid] = auth
        self.send(T.AUTH_REQUEST, rid, pb.AuthRequest(session_token=token).SerializeToString())
        try:
            async with asyncio.timeout(timeout):
                got_type, got = await auth
                if got_type != T.AUTH_SUCCESS:
                    raise _error(got_type, got)
                self.user_id = pb.AuthSuccess.FromString(got).user_id
                return await self.sync_waiter
        except TimeoutError:
            raise BenchError(f"resume did not finish within {timeout:.0f} s") from None
        finally:
            self.sync_waiter = None

    def close(self) -> None:
        """Start a graceful close (close frame; the server answers and drops TCP)."""
        t = self.transport
        self.closing = True
        if t is None or t.is_disconnected:
            return
        if not t.is_close_frame_sent:
            t.send_close(WSCloseCode.OK)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        t = self.transport
        if t is None or t.is_disconnected:
            return
        try:
            async with asyncio.timeout(timeout):
                await t.wait_disconnected()
        except TimeoutError:
            t.disconnect(graceful=False)


def _error(msg_type: int, payload: bytes) -> BenchError:
    if msg_type == T.AUTH_ERROR:
        ae = pb.AuthError.FromString(payload)
        return BenchError(f"AuthError {ae.error_code}: {ae.message}", ae.error_code)
    if msg_type == T.ERROR:
        e = pb.Error.FromString(payload)
        return BenchError(f"Error {e.code}: {e.message}", e.code)
    name = T(msg_type).name if msg_type in T._value2member_map_ else str(msg_type)
    return BenchError(f"unexpected {name}")


#: Linux: bind() picks no port; connect() does, for the whole 4-tuple. Without it every
#: bind(addr, 0) reserves a port for that address alone, which is slower and exhausts
#: the ephemeral range sooner when many connections share one source address.
_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24 if sys.platform == "linux" else 0)


def _bound_socket(local_addr: tuple[str, int], _url: object) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, _NO_PORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(local_addr)
    except OSError:
        sock.close()
        raise
    return sock


async def connect(
    factory: Callable[[], C],
    url: str,
    *,
    local_addr: tuple[str, int] | None = None,
    timeout: float = 15.0,
    read_buffer: int = 4096,
) -> C:
    """Open one WebSocket offering ``sovereign.v1`` (from ``local_addr`` if given)."""
    kwargs: dict[str, Any] = {}
    if local_addr is not None:
        if _NO_PORT:
            kwargs["socket_factory"] = partial(_bound_socket, local_addr)
        else:
            kwargs["local_addr"] = local_addr
    try:
        async with asyncio.timeout(timeout):
            _transport, listener = await picows.ws_connect(
                factory,
                url,
                extra_headers=HEADERS,
                enable_auto_pong=False,
                websocket_handshake_timeout=timeout,
                read_buffer_init_size=read_buffer,
                max_frame_size=16 * 1024 * 1024,
                use_aiofastnet=False,
                logger_name="sovereign.bench.client",
                **kwargs,
            )
    except TimeoutError:
        raise BenchError(f"connecting to {url} timed out after {timeout:.0f} s") from None
    except (OSError, picows.WSError) as exc:
        raise BenchError(f"cannot connect to {url}: {exc}") from exc
    return cast(C, listener)


async def register_webauthn(
    url: str, username: str, origin: str, *, local_addr: tuple[str, int] | None = None
) -> tuple[str, str]:
    """Register ``username`` through a real WebAuthn ceremony with a software
    authenticator; returns (user_id, session token)."""
    from sovereign.client.authenticator import SoftwareAuthenticator

    auth = SoftwareAuthenticator()
    c = await connect(BenchClient, url, local_addr=local_addr)
    try:
        ch = pb.AuthRegisterChallenge.FromString(
            await c.request(
                T.AUTH_REGISTER_REQUEST,
                pb.AuthRegisterRequest(
                    username=username, display_name=username
                ).SerializeToString(),
                T.AUTH_REGISTER_CHALLENGE,
            )
        )
        att = auth.create(ch.credential_creation_options, origin)
        ok = pb.AuthRegisterSuccess.FromString(
            await c.request(
                T.AUTH_REGISTER_RESPONSE,
                pb.AuthRegisterResponse(
                    credential_id=att["credential_id"],
                    authenticator_data=att["authenticator_data"],
                    client_data_json=att["client_data_json"],
                    attestation_object=att["attestation_object"],
                ).SerializeToString(),
                T.AUTH_REGISTER_SUCCESS,
            )
        )
        return ok.user_id, ok.session_token
    finally:
        c.close()
        await c.wait_closed()
