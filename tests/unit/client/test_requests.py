"""The client's pending-request table (sovereign.client.requests) without a server:
a fake connection records frames, the test answers them by request_id."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from sovereign.client.errors import (
    ClientClosed,
    ConnectionLost,
    NotAuthenticated,
    ProtocolViolation,
    RequestTimeout,
    SovereignClientError,
)
from sovereign.client.events import Device
from sovereign.client.requests import IDEMPOTENT_TYPES, RequestTable
from sovereign.codec import decode_envelope
from sovereign.errors import ErrorCode
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb


@dataclass(eq=False)
class FakeConn:
    ready: bool = True
    closed: bool = False
    effective_close_code: int = 1006
    frames: list[bytes] = field(default_factory=list)

    def send(self, frame: bytes) -> bool:
        if self.closed:
            return False
        self.frames.append(frame)
        return True

    def request_ids(self) -> list[str]:
        return [decode_envelope(f)[1] for f in self.frames]


@dataclass(eq=False)
class FakeGate:
    connection: Any = None
    device: Device | None = field(default_factory=lambda: Device(token="t", user_id="u"))
    closed: bool = False

    def check_open(self) -> None:
        if self.closed:
            raise ClientClosed()


def settings(**overrides: Any) -> SimpleNamespace:
    values = {"request_timeout": 1.0, "retry_rate_limited": True, "max_rate_limit_retries": 5}
    return SimpleNamespace(**(values | overrides))


def ack(count: int = 1) -> bytes:
    return pb.Ack(count=count).SerializeToString()


async def started(coro: Any) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)  # let it submit its frame
    return task


async def test_answer_resolves_the_request_it_belongs_to() -> None:
    conn = FakeConn()
    table = RequestTable(settings(), FakeGate(conn))
    task = await started(table.typed(T.MESSAGE_READ, pb.ReadMarker(), T.ACK, pb.Ack))
    (rid,) = conn.request_ids()
    assert table.resolve(FakeConn(), rid, T.ACK, ack()) is None  # not where it was sent
    assert table.resolve(conn, "someone-else", T.ACK, ack()) is None
    assert table.resolve(conn, rid, T.ACK, ack(7)) == T.MESSAGE_READ
    assert (await task).count == 7
    assert len(table) == 0


async def test_error_and_unexpected_answers_raise() -> None:
    conn = FakeConn()
    table = RequestTable(settings(), FakeGate(conn))
    task = await started(table.typed(T.GROUP_CREATE, pb.GroupCreate(), T.GROUP_CREATED, pb.Ack))
    error = pb.Error(code=ErrorCode.NOT_GROUP_ADMIN, message="no").SerializeToString()
    table.resolve(conn, conn.request_ids()[0], T.ERROR, error)
    with pytest.raises(SovereignClientError) as err:
        await task
    assert (err.value.code, err.value.request_type) == (ErrorCode.NOT_GROUP_ADMIN, T.GROUP_CREATE)

    task = await started(table.typed(T.GROUP_CREATE, pb.GroupCreate(), T.GROUP_CREATED, pb.Ack))
    table.resolve(conn, conn.request_ids()[1], T.ACK, ack())
    with pytest.raises(ProtocolViolation, match="answered with ACK, expected GROUP_CREATED"):
        await task


async def test_timeout_removes_the_entry() -> None:
    table = RequestTable(settings(request_timeout=0.01), FakeGate(FakeConn()))
    with pytest.raises(RequestTimeout, match=r"PING got no response within 0\.01 s"):
        await table.call(T.PING, b"")
    assert len(table) == 0


async def test_requests_wait_for_a_ready_connection() -> None:
    gate = FakeGate(FakeConn(ready=False))
    table = RequestTable(settings(), gate)
    task = await started(table.call(T.CONVERSATION_LIST_REQUEST, b""))
    assert gate.connection.frames == []  # still authenticating: nothing goes out
    conn = FakeConn()
    gate.connection = conn
    table.resend(conn)
    (rid,) = conn.request_ids()
    table.resolve(conn, rid, T.CONVERSATION_LIST, b"")
    assert await task == (T.CONVERSATION_LIST, b"")


async def test_dropped_connection_keeps_only_idempotent_requests() -> None:
    first = FakeConn()
    gate = FakeGate(first)
    table = RequestTable(settings(), gate)
    assert T.MESSAGE_SEND in IDEMPOTENT_TYPES and T.GROUP_CREATE not in IDEMPOTENT_TYPES
    send = await started(table.call(T.MESSAGE_SEND, b"", retry=True))
    create = await started(table.call(T.GROUP_CREATE, b""))
    ping = await started(table.call(T.PING, b"", retry=True, bound=first))
    send_rid = first.request_ids()[0]

    table.connection_lost(first, ConnectionLost(4006, "shutdown"))
    for task in (create, ping):  # a bound request is never resent, even if idempotent
        with pytest.raises(ConnectionLost) as err:
            await task
        assert err.value.close_code == 4006
    assert not send.done()

    second = FakeConn()
    gate.connection = second
    table.resend(second)
    assert second.request_ids() == [send_rid]  # the same request_id: the server dedupes
    table.resolve(second, send_rid, T.MESSAGE_RECEIVE, b"")
    assert await send == (T.MESSAGE_RECEIVE, b"")


async def test_rate_limited_requests_are_retried_after_the_delay() -> None:
    conn = FakeConn()
    table = RequestTable(settings(), FakeGate(conn))
    task = await started(table.call(T.MESSAGE_SEND, b"", retry_rate_limited=True))
    limited = pb.Error(code=ErrorCode.RATE_LIMITED, retry_after_ms=5).SerializeToString()
    table.resolve(conn, conn.request_ids()[0], T.ERROR, limited)
    while len(conn.frames) < 2:
        await asyncio.sleep(0.005)
    assert conn.request_ids()[0] == conn.request_ids()[1]
    table.resolve(conn, conn.request_ids()[1], T.MESSAGE_RECEIVE, b"")
    assert await task == (T.MESSAGE_RECEIVE, b"")

    task = await started(table.call(T.MESSAGE_SEND, b""))  # not asked to retry
    table.resolve(conn, conn.request_ids()[2], T.ERROR, limited)
    with pytest.raises(SovereignClientError) as err:
        await task
    assert (err.value.code, err.value.retry_after_ms) == (ErrorCode.RATE_LIMITED, 5)


async def test_what_may_not_be_sent() -> None:
    conn = FakeConn()
    gate = FakeGate(conn, device=None)
    table = RequestTable(settings(), gate)
    with pytest.raises(NotAuthenticated):
        await table.call(T.MESSAGE_SEND, b"")
    with pytest.raises(ConnectionLost):  # bound to a connection that is not current
        await table.call(T.PING, b"", bound=FakeConn())
    task = await started(table.call(T.AUTH_REQUEST, b"", request_id="r1", bound=conn))
    with pytest.raises(ValueError, match="already in flight"):
        await table.call(T.AUTH_REQUEST, b"", request_id="r1", bound=conn)
    gate.closed = True
    with pytest.raises(ClientClosed):
        await table.call(T.PING, b"", bound=conn)
    table.fail_all(ClientClosed())
    with pytest.raises(ClientClosed):
        await task
    assert len(table) == 0


async def test_on_response_runs_before_the_caller_resumes() -> None:
    conn = FakeConn()
    table = RequestTable(settings(), FakeGate(conn))
    seen: list[int] = []
    task = await started(
        table.call(T.AUTH_REQUEST, b"", bound=conn, on_response=lambda t, _: seen.append(t))
    )
    table.resolve(conn, conn.request_ids()[0], T.AUTH_SUCCESS, b"")
    assert seen == [T.AUTH_SUCCESS]  # synchronously, inside resolve()
    await task

    def broken(rtype: int, payload: bytes) -> None:
        raise ValueError("garbage")

    task = await started(table.call(T.AUTH_REQUEST, b"", bound=conn, on_response=broken))
    table.resolve(conn, conn.request_ids()[1], T.AUTH_SUCCESS, b"")
    with pytest.raises(ProtocolViolation, match="bad AUTH_SUCCESS: garbage"):
        await task
