"""A small, strict WebSocket test client on picows (real sockets, real frames).

It records every Envelope and the close code, and can send arbitrary frames (text,
fragments, RSV bits) for the transport's negative tests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import picows
from google.protobuf.message import Message
from picows import WSFrame, WSListener, WSMsgType, WSTransport

from sovereign.client.events import PAYLOAD_CLASSES
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

PAYLOAD_TYPES = PAYLOAD_CLASSES  # the SDK's table: one list of S->C payload types


@dataclass
class Received:
    type: int
    request_id: str
    message: Any
    raw: bytes = b""

    def __repr__(self) -> str:
        name = T(self.type).name if self.type in T._value2member_map_ else str(self.type)
        body = str(self.message).replace("\n", " ")
        return f"<{name} rid={self.request_id!r} {body}>"


class _Listener(WSListener):
    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[Received | None] = asyncio.Queue()
        self.close_code: int | None = None
        self.control: list[tuple[int, bytes]] = []
        #: Set by WsClient.deliver_to: envelopes go to it as they arrive, not to queue.
        self.handler: Callable[[Received], None] | None = None
        #: Envelope types whose payload is left as bytes (a client that asserts nothing
        #: on them need not pay for decoding hundreds of thousands).
        self.undecoded: frozenset[int] = frozenset()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type in (WSMsgType.PING, WSMsgType.PONG):
            self.control.append((int(frame.msg_type), frame.get_payload_as_bytes()))
            return
        raw = frame.get_payload_as_bytes()
        env = pb.Envelope.FromString(raw)
        cls = None if env.type in self.undecoded else PAYLOAD_TYPES.get(env.type)
        msg = cls.FromString(env.payload) if cls is not None else env.payload
        got = Received(env.type, env.request_id, msg, raw)
        if self.handler is not None:
            self.handler(got)
        else:
            self.queue.put_nowait(got)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.queue.put_nowait(None)


class WsClient:
    def __init__(self, transport: WSTransport, listener: _Listener) -> None:
        self.transport = transport
        self.listener = listener
        self.backlog: list[Received] = []

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        subprotocols: list[str] | None = None,
        origin: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> WsClient:
        extra: dict[str, str] = dict(headers or {})
        if subprotocols is None:
            subprotocols = ["sovereign.v1"]
        if subprotocols:
            extra["Sec-WebSocket-Protocol"] = ", ".join(subprotocols)
        if origin is not None:
            extra["Origin"] = origin
        transport, listener = await picows.ws_connect(
            _Listener, url, extra_headers=extra, enable_auto_pong=False
        )
        return cls(transport, listener)

    # -- sending -----------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.transport.send(WSMsgType.BINARY, data)

    def send(
        self, msg_type: int, message: Message | bytes | None = None, request_id: str | None = None
    ) -> str:
        rid = uuid.uuid4().hex if request_id is None else request_id
        payload = (
            message
            if isinstance(message, bytes)
            else (message.SerializeToString() if message is not None else b"")
        )
        env = pb.Envelope(type=msg_type, request_id=rid, payload=payload)
        self.send_raw(env.SerializeToString())
        return rid

    # -- receiving ---------------------------------------------------------------
    def deliver_to(self, handler: Callable[[Received], None]) -> None:
        """From now on ``handler`` gets each envelope in the transport's callback, as it
        arrives (envelopes already received go first; ``recv`` then sees only the
        disconnect). A client taking hundreds of thousands of pushes keeps no queue of
        them: nothing piles up between reads for the garbage collector to walk."""
        queue = self.listener.queue
        while self.backlog:
            handler(self.backlog.pop(0))
        while not queue.empty():
            item = queue.get_nowait()
            if item is None:
                queue.put_nowait(None)  # keep reporting the disconnect
                break
            handler(item)
        self.listener.handler = handler

    async def recv(self, timeout: float = 5.0) -> Received:
        if self.backlog:
            return self.backlog.pop(0)
        queue = self.listener.queue
        # Already there: no wait_for (a task and a timer per envelope — the whole cost
        # of a client taking hundreds of thousands of pushes, as the cluster tests do).
        if not queue.empty():
            item = queue.get_nowait()
        else:
            item = await asyncio.wait_for(queue.get(), timeout)
        if item is None:
            self.listener.queue.put_nowait(None)  # keep reporting the disconnect
            raise ConnectionError(f"disconnected (close code {self.listener.close_code})")
        return item

    async def expect(
        self, msg_type: int, request_id: str | None = None, timeout: float = 5.0
    ) -> Any:
        """The next envelope must be ``msg_type`` (and echo ``request_id``)."""
        got = await self.recv(timeout)
        assert got.type == msg_type, f"expected {T(msg_type).name}, got {got!r}"
        if request_id is not None:
            assert got.request_id == request_id, f"request_id {got.request_id!r} != {request_id!r}"
        return got.message

    async def wait_for(
        self, msg_type: int, request_id: str | None = None, timeout: float = 5.0
    ) -> Any:
        """Skip other envelopes (kept in backlog) until ``msg_type`` arrives."""
        skipped: list[Received] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                got = await self.recv(max(0.01, deadline - loop.time()))
                if got.type == msg_type and (request_id is None or got.request_id == request_id):
                    return got.message
                skipped.append(got)
        finally:
            self.backlog[:0] = skipped

    async def response(self, rid: str, timeout: float = 5.0) -> Received:
        """The response to ``rid``; pushes (request_id "") that arrive first are kept."""
        skipped: list[Received] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                got = await self.recv(max(0.01, deadline - loop.time()))
                if got.request_id == rid:
                    return got
                assert got.request_id == "", f"response for another request: {got!r}"
                skipped.append(got)
        finally:
            self.backlog[:0] = skipped

    async def request(
        self,
        msg_type: int,
        message: Message | bytes | None,
        expect_type: int,
        timeout: float = 5.0,
    ) -> Any:
        rid = self.send(msg_type, message)
        got = await self.response(rid, timeout)
        assert got.type == expect_type, f"expected {T(expect_type).name}, got {got!r}"
        return got.message

    async def error(
        self, msg_type: int, message: Message | bytes | None, timeout: float = 5.0
    ) -> tuple[int, Any]:
        """Send a request that must fail; returns (code, Error or AuthError)."""
        rid = self.send(msg_type, message)
        got = await self.response(rid, timeout)
        if got.type == T.AUTH_ERROR:
            return got.message.error_code, got.message
        assert got.type == T.ERROR, f"expected an error, got {got!r}"
        return got.message.code, got.message

    async def until_sync(self, timeout: float = 5.0) -> tuple[list[Received], Any]:
        """Everything pushed up to SYNC_COMPLETE, and the SyncComplete itself."""
        before: list[Received] = []
        while True:
            got = await self.recv(timeout)
            if got.type == T.SYNC_COMPLETE:
                return before, got.message
            before.append(got)

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close; returns the close code it sent."""
        await asyncio.wait_for(self.transport.wait_disconnected(), timeout)
        return self.listener.close_code

    async def nothing(self, within: float = 0.2, ignore: tuple[int, ...] = ()) -> None:
        """Assert that no envelope (other than the ``ignore`` types) arrives in ``within`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                got = await self.recv(left)
            except TimeoutError:
                return
            if got.type not in ignore:
                raise AssertionError(f"unexpected envelope {got!r}")

    async def close(self) -> None:
        if not self.transport.is_disconnected:
            self.transport.send_close(picows.WSCloseCode.OK)
            self.transport.disconnect()
            await self.transport.wait_disconnected()
