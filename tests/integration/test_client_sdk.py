"""The Python client SDK (sovereign.client).

* Pure parts without sockets: backoff schedule, dedupe / gap detection (SeqTracker),
  the ack batcher (AckTracker), Event accessors.
* Over real sockets against the real in-process server: register / login / resume,
  errors, request timeout, ping, automatic reconnect with backoff (idle close, server
  restart on the same port), no reconnect after 4004 / 4005, PONG deadline, in-flight
  requests on a dropped connection, rate-limit retry, Origin header.
* Over real sockets against a scripted peer: client behaviour a correct server never
  provokes (a seq gap, a duplicate, a server PING) and the exact acks the client sends.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import picows
import pytest
from google.protobuf.message import Message
from picows import WSFrame, WSListener, WSMsgType, WSTransport

from sovereign.client import (
    AckTracker,
    AuthenticatorError,
    Backoff,
    Client,
    ClientClosed,
    ClientError,
    ClientState,
    ConnectError,
    ConnectionLost,
    Event,
    MessageType,
    NotAuthenticated,
    RequestTimeout,
    SeqTracker,
    SessionEnded,
    SoftwareAuthenticator,
    SovereignClientError,
    Verdict,
)
from sovereign.client.authenticator import AssertionResponse, RegistrationResponse
from sovereign.client.events import decode_event
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.server import ORIGIN, RunningServer, running_server

T = MessageType
ServerWith = Callable[..., AbstractAsyncContextManager[RunningServer]]


# ======================================================================================
# Pure parts (no sockets)
# ======================================================================================


def test_backoff_default_schedule_with_injected_random() -> None:
    low = Backoff(random=lambda: 0.0)
    high = Backoff(random=lambda: 1.0)
    assert [low.delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 15, 15, 15]
    assert [high.delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert [low.base(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_backoff_jitter_is_uniform_between_half_and_full() -> None:
    rng = random.Random(1234)
    b = Backoff(random=rng.random)
    for attempt in range(50):
        base = b.base(attempt)
        d = b.delay(attempt)
        assert 0.5 * base <= d <= base
    # the jitter really varies
    assert len({round(b.delay(3), 6) for _ in range(20)}) > 10


def test_backoff_custom_schedule_and_validation() -> None:
    b = Backoff((0.01, 0.02), random=lambda: 0.5)
    delays = b.delays()
    assert [round(next(delays), 6) for _ in range(4)] == [0.0075, 0.015, 0.015, 0.015]
    for bad in [(), (-1.0,)]:
        with pytest.raises(ValueError):
            Backoff(bad)
    with pytest.raises(ValueError):
        Backoff(jitter=(1.0, 0.5))


def test_seq_tracker_first_next_gap_duplicate() -> None:
    s = SeqTracker()
    # Unknown starting point: whatever comes first is not a gap (SPEC §5, §12.12).
    assert s.check("c", 7, "e7") is Verdict.FIRST
    s.advance("c", 7, "e7")
    assert s.check("c", 8, "e8") is Verdict.NEXT
    assert s.check("c", 7, "e7") is Verdict.DUPLICATE
    assert s.check("c", 3, "other") is Verdict.DUPLICATE  # below last, any id
    assert s.check("c", 10, "e10") is Verdict.GAP
    assert s.last("c") == 7 and s.last("d") is None
    # conversations are independent
    assert s.check("d", 1, "d1") is Verdict.FIRST
    # last never moves down
    s.advance("c", 5, "e5")
    assert s.last("c") == 7


def test_seq_tracker_ids_are_a_bounded_lru() -> None:
    s = SeqTracker(id_capacity=3)
    for i in range(3):
        s.remember(f"w{i}")
    assert s.check("", 0, "w0") is Verdict.DUPLICATE  # welcomes: id only
    s.remember("w0")  # refresh: w1 is now the oldest
    s.remember("w3")
    assert s.seen_id("w0") and not s.seen_id("w1") and s.seen_id("w3")
    assert s.check("", 0, "w1") is Verdict.NEXT


def test_seq_tracker_forget_after_removal_avoids_false_gap() -> None:
    s = SeqTracker()
    s.advance("c", 4, "removed-me")
    s.forget("c")
    assert s.check("c", 20, "re-added") is Verdict.FIRST
    assert s.check("c", 4, "removed-me") is Verdict.DUPLICATE  # still caught by id


def test_ack_tracker_newest_per_conversation_and_each_welcome() -> None:
    a = AckTracker()
    for seq in (1, 2, 3):
        a.delivered("c1", seq, f"c1-{seq}")
        a.seen("c1", seq, f"c1-{seq}")
    a.delivered("c2", 9, "c2-9")
    a.seen("c2", 9, "c2-9")
    a.welcome_delivered("w1")
    a.welcome_seen("w1")
    a.welcome_delivered("w2")
    a.welcome_seen("w2")
    assert a.pending
    batch = a.take()
    assert batch.message_ids == ["c1-3", "c2-9", "w1", "w2"]
    assert not a.pending and not a.take()


def test_ack_tracker_never_acks_past_an_unprocessed_event() -> None:
    a = AckTracker()
    for seq in (1, 2, 3, 4):
        a.delivered("c", seq, f"e{seq}")
    a.seen("c", 1, "e1")
    a.seen("c", 3, "e3")  # 2 is still with the application
    a.seen("c", 4, "e4")
    assert a.take().message_ids == ["e1"]  # cumulative: acking e3 would ack e2
    assert not a.pending
    a.seen("c", 2, "e2")
    assert a.take().message_ids == ["e4"]


def test_ack_tracker_batches_are_bounded() -> None:
    a = AckTracker()
    for i in range(5):
        a.delivered(f"c{i}", 1, f"c{i}-1")
        a.seen(f"c{i}", 1, f"c{i}-1")
        a.welcome_seen(f"w{i}")
    first = a.take(limit=4)
    assert first.message_ids == ["c0-1", "c1-1", "c2-1", "c3-1"]
    second = a.take(limit=4)
    assert second.message_ids == ["c4-1", "w0", "w1", "w2"]
    assert a.take(limit=4).message_ids == ["w3", "w4"] and not a.pending


def test_ack_tracker_redelivery_and_requeue() -> None:
    a = AckTracker()
    a.delivered("c", 5, "e5")
    a.redelivered("c", 5, "e5")  # still being processed: no ack yet
    assert not a.pending
    a.seen("c", 5, "e5")
    batch = a.take()
    assert batch.message_ids == ["e5"]
    a.requeue(batch)  # the MESSAGE_ACK failed
    assert a.take().message_ids == ["e5"]
    a.redelivered("c", 5, "e5")  # server sent it again: our ack was lost
    a.welcome_redelivered("w")
    assert a.take().message_ids == ["e5", "w"]
    a.welcome_delivered("w2")
    a.welcome_redelivered("w2")  # still held
    assert not a.pending


def test_event_accessors() -> None:
    mr = pb.MessageReceive(message_id="m1", conversation_id="c", sender_id="u", seq=3)
    ev = decode_event(T.MESSAGE_RECEIVE, mr.SerializeToString())
    assert (ev.type, ev.conversation_id, ev.seq, ev.event_id, ev.sender_id) == (
        T.MESSAGE_RECEIVE,
        "c",
        3,
        "m1",
        "u",
    )
    assert ev.durable and ev.expect(pb.MessageReceive).seq == 3
    with pytest.raises(TypeError):
        ev.expect(pb.GroupInfo)
    w = decode_event(T.MLS_WELCOME_RECEIVE, pb.MLSWelcomeReceive(event_id="w1").SerializeToString())
    assert w.durable and w.event_id == "w1" and w.seq == 0
    p = decode_event(T.PRESENCE_NOTIFY, pb.PresenceNotify(user_id="u").SerializeToString())
    assert not p.durable and p.event_id == "" and p.conversation_id == ""
    unknown = decode_event(99, b"\x01")
    assert unknown.type == 99 and unknown.message == b"\x01"


# ======================================================================================
# Real server
# ======================================================================================


class RecordingBackoff(Backoff):
    """Backoff that remembers every (attempt, delay) it handed out."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, float]] = []

    def delay(self, attempt: int) -> float:
        d = super().delay(attempt)
        self.calls.append((attempt, d))
        return d


ClientFactory = Callable[..., Client]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """Clients with fast test defaults; every one is closed at the end."""
    made: list[Client] = []

    def make(url: str, **kw: Any) -> Client:
        kw.setdefault("authenticator", SoftwareAuthenticator())
        kw.setdefault("origin", ORIGIN)
        kw.setdefault("backoff", Backoff((0.05, 0.1), random=lambda: 1.0))
        kw.setdefault("request_timeout", 5.0)
        c = Client(url, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def server_conns(srv: RunningServer, user_id: str) -> list[Any]:
    return list(srv.app.outbox.sessions(user_id))


# -- authentication -----------------------------------------------------------------


async def test_register_then_ready(server: RunningServer, make_client: ClientFactory) -> None:
    c = make_client(server.url)
    states: list[ClientState] = []
    c.on_state_change(states.append)
    device = await c.register("alice", "Alice A.")
    assert c.state is ClientState.READY and c.ready
    assert states == [ClientState.CONNECTING, ClientState.AUTHENTICATING, ClientState.READY]
    assert device is c.device
    assert (device.user_id, device.username, device.display_name) == (
        c.user_id,
        "alice",
        "Alice A.",
    )
    assert len(c.user_id) == 26 and c.token is not None and len(c.token) == 43
    assert c.token not in repr(device)  # the token never shows up in a repr
    user = await server.app.storage.users.get_by_id(c.user_id)
    assert user is not None and user.username == "alice"
    assert len(server_conns(server, c.user_id)) == 1
    rtt = await c.ping()
    assert 0 < rtt < 1


async def test_login_is_a_new_device_and_resume_is_the_same(
    server: RunningServer, make_client: ClientFactory
) -> None:
    auth = SoftwareAuthenticator()
    first = make_client(server.url, authenticator=auth)
    await first.register("bob")
    await first.close()
    assert first.state is ClientState.CLOSED

    second = make_client(server.url, authenticator=auth)
    device = await second.login("bob")
    assert device.user_id == first.user_id and device.username == "bob"
    assert device.token != first.token  # a login is a new device
    assert device.server_name == "Sovereign"

    third = make_client(server.url)
    resumed = await third.resume(first.token)
    assert resumed.token == first.token and resumed.user_id == first.user_id
    assert resumed.username == "bob"


async def test_context_manager_resumes_with_token(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url)
    await c.register("carol")
    token = c.token
    await c.close()
    async with Client(server.url, token=token) as again:
        assert again.ready and again.user_id == c.user_id and again.token == token
        await again.ping()
    assert again.state is ClientState.CLOSED
    await eventually(lambda: not server_conns(server, c.user_id))


async def test_connect_logs_in_again_when_the_token_was_revoked(
    server: RunningServer, make_client: ClientFactory
) -> None:
    auth = SoftwareAuthenticator()
    c = make_client(server.url, authenticator=auth)
    await c.register("dave")
    session_id = server_conns(server, c.user_id)[0].session_id
    await c.close()
    assert await server.app.revoke_session(session_id)
    bot = make_client(server.url, token=c.token, username="dave", authenticator=auth)
    device = await bot.connect()
    assert device is not None and device.user_id == c.user_id
    assert bot.token != c.token  # a fresh device; the bot should persist bot.token


async def test_authenticator_export_import_round_trip(
    server: RunningServer, make_client: ClientFactory
) -> None:
    auth = SoftwareAuthenticator()
    c = make_client(server.url, authenticator=auth)
    await c.register("erin")
    saved = auth.export(password=b"pw")
    restored = SoftwareAuthenticator.import_(saved, password=b"pw")
    bot = make_client(server.url, authenticator=restored, username="erin")
    device = await bot.connect()
    assert device is not None and device.user_id == c.user_id


async def test_async_authenticator_plugs_in(
    server: RunningServer, make_client: ClientFactory
) -> None:
    class SlowAuthenticator:
        """An authenticator that asks a (simulated) user first: async create/get."""

        def __init__(self) -> None:
            self.inner = SoftwareAuthenticator()
            self.calls: list[str] = []

        async def create(self, options_json: bytes, origin: str) -> RegistrationResponse:
            self.calls.append("create")
            await asyncio.sleep(0.01)
            return self.inner.create(options_json, origin)

        async def get(self, options_json: bytes, origin: str) -> AssertionResponse:
            self.calls.append("get")
            await asyncio.sleep(0.01)
            return self.inner.get(options_json, origin)

    auth = SlowAuthenticator()
    await make_client(server.url, authenticator=auth).register("frank")
    await make_client(server.url, authenticator=auth).login("frank")
    assert auth.calls == ["create", "get"]


async def test_auth_errors_raise_and_leave_the_client_usable(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url)
    with pytest.raises(SovereignClientError) as err:
        await c.login("nobody")
    assert err.value.code == 1001 and err.value.name == "InvalidCredential"
    assert c.state is ClientState.IDLE and c.device is None
    with pytest.raises(NotAuthenticated):
        await c.ping()
    await c.register("grace")  # the same client can still authenticate
    assert c.ready
    with pytest.raises(SovereignClientError) as err:
        await make_client(server.url).register("grace")
    assert err.value.code == 1003
    with pytest.raises(SovereignClientError) as err:
        await make_client(server.url).resume("A" * 43)
    assert err.value.code == 1001


async def test_wrong_origin_is_refused_by_the_authenticator_ceremony(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url, origin="https://evil.example")
    with pytest.raises(SovereignClientError) as err:
        await c.register("heidi")
    assert err.value.code == 1003 and "origin" in err.value.message


async def test_missing_authenticator_and_double_auth(
    server: RunningServer, make_client: ClientFactory
) -> None:
    with pytest.raises(ValueError):
        await make_client(server.url, authenticator=None).register("ivan")
    c = make_client(server.url)
    await c.register("ivan")
    with pytest.raises(ClientError, match="already authenticated"):
        await c.login("ivan")
    # an authenticator that refuses: its error comes through unchanged
    refusing = make_client(server.url, authenticator=SoftwareAuthenticator())
    with pytest.raises(AuthenticatorError):
        await refusing.login("ivan")  # this authenticator holds no credential for ivan
    assert refusing.state is ClientState.IDLE


# -- transport options ----------------------------------------------------------------


async def test_origin_header_allowed_and_refused(
    server: RunningServer, make_client: ClientFactory
) -> None:
    ok = make_client(server.url, send_origin=True)
    await ok.register("judy")
    assert ok.ready
    bad = make_client(
        server.url, send_origin=True, origin="https://evil.example", authenticator=None
    )
    with pytest.raises(ConnectError) as err:
        await bad.resume(ok.token)
    assert err.value.status == 403
    assert bad.state is ClientState.IDLE


async def test_connect_error_when_nothing_listens(make_client: ClientFactory) -> None:
    port = free_port()
    c = make_client(f"ws://127.0.0.1:{port}/ws", connect_timeout=2)
    with pytest.raises(ConnectError):
        await c.resume("token")


# -- requests ---------------------------------------------------------------------------


async def test_error_response_raises_and_connection_stays(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url)
    await c.register("karl")
    with pytest.raises(SovereignClientError) as err:
        await c.request(99, b"")
    assert err.value.code == 3002 and not err.value.fatal
    pong = await c.request(T.PING, pb.Ping(timestamp=42))
    assert isinstance(pong, pb.Pong) and pong.timestamp == 42
    assert c.ready


async def test_request_timeout(server: RunningServer, make_client: ClientFactory) -> None:
    c = make_client(server.url)
    await c.register("liam")
    server_side = server_conns(server, c.user_id)[0]
    server_side.link.transport.underlying_transport.pause_reading()  # the server stops reading
    with pytest.raises(RequestTimeout):
        await c.request(T.PING, pb.Ping(timestamp=1), timeout=0.2)
    with pytest.raises(TimeoutError):  # RequestTimeout is a TimeoutError too
        await c.ping(timeout=0.1)
    assert c.ready  # a timeout alone does not drop the connection
    server_side.link.transport.underlying_transport.resume_reading()
    assert await c.ping() < 1


async def test_rate_limited_requests_are_retried_by_helpers(
    server_with: ServerWith, make_client: ClientFactory
) -> None:
    async with server_with(rate_limit_per_second=20, rate_limit_burst=3) as srv:
        c = make_client(srv.url, ping_interval=None)
        await c.register("mia")
        await asyncio.sleep(0.3)  # refill the bucket after the ceremony
        raw = await asyncio.gather(
            *(c.request(T.PING, pb.Ping(timestamp=i)) for i in range(8)),
            return_exceptions=True,
        )
        limited = [r for r in raw if isinstance(r, SovereignClientError)]
        assert limited and all(e.code == 3004 and e.retry_after_ms > 0 for e in limited)
        await asyncio.sleep(0.3)
        rtts = await asyncio.gather(*(c.ping() for _ in range(6)))  # helpers retry 3004
        assert len(rtts) == 6
        await asyncio.sleep(0.3)
        pongs = await asyncio.gather(
            *(c.request(T.PING, pb.Ping(timestamp=i), retry_rate_limited=True) for i in range(6))
        )
        assert sorted(p.timestamp for p in pongs) == list(range(6))


async def test_duplicate_request_id_in_flight_is_refused(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url)
    await c.register("nina")
    server_side = server_conns(server, c.user_id)[0]
    server_side.link.transport.underlying_transport.pause_reading()
    first = asyncio.create_task(c.request(T.PING, pb.Ping(), request_id="same", timeout=2))
    await asyncio.sleep(0.05)
    with pytest.raises(ValueError):
        await c.request(T.PING, pb.Ping(), request_id="same")
    server_side.link.transport.underlying_transport.resume_reading()
    assert isinstance(await first, pb.Pong)


# -- reconnect ----------------------------------------------------------------------------


async def test_reconnects_with_the_same_token_after_idle_close(
    server: RunningServer, make_client: ClientFactory
) -> None:
    backoff = RecordingBackoff((0.05, 0.1), random=lambda: 0.0)
    c = make_client(server.url, backoff=backoff)
    await c.register("olga")
    token, user_id = c.token, c.user_id
    old_conn = server_conns(server, user_id)[0]
    states: list[ClientState] = []
    c.on_state_change(states.append)

    assert server.app.close_user(user_id, 4008, "idle") == 1
    await eventually(lambda: c.reconnects == 1)
    await c.wait_ready(timeout=5)
    assert states == [
        ClientState.RECONNECTING,
        ClientState.CONNECTING,
        ClientState.AUTHENTICATING,
        ClientState.READY,
    ]
    assert backoff.calls == [(0, 0.025)]  # base 0.05 x jitter 0.5 (random() = 0)
    assert c.last_close == (4008, "idle")
    assert c.token == token and c.user_id == user_id
    conns = server_conns(server, user_id)
    assert len(conns) == 1 and conns[0] is not old_conn
    assert conns[0].session_id == old_conn.session_id  # same device
    assert await c.ping() < 1


async def test_server_restart_on_same_port_backs_off_then_resumes(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    data = tmp_path / "d"
    backoff = RecordingBackoff((0.02, 0.04, 0.08), random=lambda: 1.0)
    first = running_server(data)
    srv = await first.__aenter__()
    port = srv.app.port
    c = make_client(srv.url, backoff=backoff)
    await c.register("pia")
    token = c.token
    await first.__aexit__(None, None, None)  # shutdown: every connection closed 4006
    await eventually(lambda: len(backoff.calls) >= 4)  # refused attempts back off
    assert c.state in (ClientState.RECONNECTING, ClientState.CONNECTING)
    assert c.last_close is not None and c.last_close[0] == 4006
    async with running_server(data, listen=f"127.0.0.1:{port}") as again:
        await c.wait_ready(timeout=5)
        assert c.token == token and c.reconnects == 1
        assert await c.ping() < 1
        assert len(server_conns(again, c.user_id)) == 1
        calls = list(backoff.calls)
    attempts = [a for a, _ in calls]
    assert attempts == list(range(len(attempts)))  # one backoff sequence, no reset
    assert [d for _, d in calls[:4]] == [0.02, 0.04, 0.08, 0.08]


async def test_requests_wait_while_reconnecting(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url, backoff=Backoff((0.3,), random=lambda: 1.0))
    await c.register("quinn")
    server.app.close_user(c.user_id, 4008, "idle")
    await eventually(lambda: c.state is ClientState.RECONNECTING)
    rtt = await c.ping()  # queued, sent once the client resumed
    assert rtt >= 0.2 and c.reconnects == 1


async def test_in_flight_request_fails_with_connection_lost(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url)
    await c.register("rita")
    server_side = server_conns(server, c.user_id)[0]
    server_side.link.transport.underlying_transport.pause_reading()
    pending = asyncio.create_task(c.request(T.PING, pb.Ping(timestamp=1)))
    await asyncio.sleep(0.05)
    server.app.close_user(c.user_id, 4008, "idle")
    with pytest.raises(ConnectionLost) as err:
        await pending
    assert err.value.close_code == 4008
    await c.wait_ready(timeout=5)  # and the client still reconnects


async def test_idempotent_request_is_resent_with_same_request_id(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url)
    await c.register("sam")
    server_side = server_conns(server, c.user_id)[0]
    server_side.link.transport.underlying_transport.pause_reading()  # first copy never read
    pending = asyncio.create_task(
        c.request(T.PING, pb.Ping(timestamp=77), idempotent=True, request_id="rid-1")
    )
    await asyncio.sleep(0.05)
    server.app.close_user(c.user_id, 4008, "idle")
    pong = await asyncio.wait_for(pending, 5)
    # The answer can only match because the retry carried the same request_id.
    assert pong.timestamp == 77 and c.reconnects == 1


async def test_pong_deadline_drops_and_reconnects(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url, ping_interval=0.1, pong_timeout=0.2)
    await c.register("tina")
    first = server_conns(server, c.user_id)[0]
    first.link.transport.underlying_transport.pause_reading()  # PINGs go unanswered
    await eventually(lambda: c.reconnects == 1)
    assert c.last_close == (1006, "pong timeout")
    await c.wait_ready(timeout=5)
    await eventually(lambda: any(x is not first for x in server_conns(server, c.user_id)))
    await asyncio.sleep(0.5)  # heartbeats on the new connection are answered
    assert c.reconnects == 1 and c.ready


async def test_heartbeat_keeps_an_idle_connection_alive(
    server_with: ServerWith, make_client: ClientFactory
) -> None:
    async with server_with(idle_timeout=0.6) as srv:
        quiet = make_client(srv.url, ping_interval=None)
        await quiet.register("uma")
        beating = make_client(srv.url, ping_interval=0.1)
        await beating.register("vic")
        await eventually(lambda: quiet.reconnects >= 1, timeout=5)
        assert quiet.last_close is not None and quiet.last_close[0] == 4008
        assert beating.reconnects == 0 and beating.ready


# -- no reconnect after fatal closes ------------------------------------------------


async def test_revoked_session_4004_is_terminal(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url)
    await c.register("walt")
    stream = c.events()
    session_id = server_conns(server, c.user_id)[0].session_id
    assert await server.app.revoke_session(session_id)
    with pytest.raises(SessionEnded) as err:
        await asyncio.wait_for(c.wait_closed(), 5)
    assert err.value.close_code == 4004
    assert c.state is ClientState.CLOSED and c.terminal_error is err.value
    with pytest.raises(SessionEnded):
        await c.ping()
    with pytest.raises(SessionEnded):
        async for _ in stream:  # drains what arrived, then raises
            pass
    await asyncio.sleep(0.3)
    assert not server_conns(server, c.user_id)  # it did not come back
    await c.close()  # harmless after the end


async def test_disabled_account_4005_is_terminal(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url)
    await c.register("xena")
    await server.app.set_user_enabled(c.user_id, False)
    with pytest.raises(SessionEnded) as err:
        await asyncio.wait_for(c.run_forever(), 5)
    assert err.value.close_code == 4005
    await asyncio.sleep(0.2)
    assert not server_conns(server, c.user_id)


async def test_revoked_while_reconnecting_ends_with_the_auth_error(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url, backoff=Backoff((0.2,), random=lambda: 1.0))
    await c.register("yara")
    session_id = server_conns(server, c.user_id)[0].session_id
    server.app.close_user(c.user_id, 4008, "idle")
    await eventually(lambda: c.state is ClientState.RECONNECTING)
    await server.app.revoke_session(session_id)  # nothing live to close
    with pytest.raises(SessionEnded) as err:
        await asyncio.wait_for(c.wait_closed(), 5)
    assert err.value.close_code == 4004
    assert err.value.error is not None and err.value.error.code == 1005


async def test_close_while_reconnecting_stops_for_good(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url, backoff=Backoff((0.3,), random=lambda: 1.0))
    await c.register("zoe")
    server.app.close_user(c.user_id, 4008, "idle")
    await eventually(lambda: c.state is ClientState.RECONNECTING)
    waiting = asyncio.create_task(c.ping())
    await asyncio.sleep(0.01)
    await c.close()
    with pytest.raises(ClientClosed):
        await waiting
    await c.wait_closed()  # a close() by the application is not an error
    await asyncio.sleep(0.5)
    assert not server_conns(server, c.user_id) and c.state is ClientState.CLOSED
    with pytest.raises(ClientClosed):
        await c.ping()


async def test_no_auto_reconnect_surfaces_connection_lost(
    server: RunningServer, make_client: ClientFactory
) -> None:
    c = make_client(server.url, auto_reconnect=False)
    await c.register("abe")
    server.app.close_user(c.user_id, 4008, "idle")
    with pytest.raises(ConnectionLost) as err:
        await asyncio.wait_for(c.wait_closed(), 5)
    assert err.value.close_code == 4008


async def test_connect_retry_waits_for_the_server(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    data = tmp_path / "d"
    async with running_server(data) as srv:
        c = make_client(srv.url)
        await c.register("bea")
        token = c.token
        await c.close()
    port = free_port()
    bot = make_client(
        f"ws://127.0.0.1:{port}/ws", token=token, backoff=Backoff((0.05,), random=lambda: 1.0)
    )
    connecting = asyncio.create_task(bot.connect(retry=True))
    await asyncio.sleep(0.2)
    assert not connecting.done()
    async with running_server(data, listen=f"127.0.0.1:{port}"):
        device = await asyncio.wait_for(connecting, 5)
        assert device is not None and device.token == token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ======================================================================================
# Scripted peer: client behaviour a correct server does not provoke
# ======================================================================================


class Peer:
    """A minimal scripted server: answers resume, PING and MESSAGE_ACK by itself and
    queues everything else for the test, which pushes events and answers history."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.inbox: asyncio.Queue[pb.Envelope] = asyncio.Queue()
        self.acks: asyncio.Queue[list[str]] = asyncio.Queue()
        self.pongs: asyncio.Queue[pb.Envelope] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        peer = self

        class Listener(WSListener):
            def on_ws_connected(self, transport: WSTransport) -> None:
                peer.transport = transport

            def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
                if frame.msg_type is WSMsgType.CLOSE:
                    transport.send_close(frame.get_close_code())
                    transport.disconnect()
                elif frame.msg_type is WSMsgType.BINARY:
                    peer.received(pb.Envelope.FromString(frame.get_payload_as_bytes()))

        self.server = await picows.ws_create_server(lambda _req: Listener(), "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    def received(self, env: pb.Envelope) -> None:
        if env.type == T.AUTH_REQUEST:
            req = pb.AuthRequest.FromString(env.payload)
            self.send(
                T.AUTH_SUCCESS,
                pb.AuthSuccess(session_token=req.session_token, user_id="me", username="me"),
                env.request_id,
            )
        elif env.type == T.PING:
            self.send(
                T.PONG, pb.Pong(timestamp=pb.Ping.FromString(env.payload).timestamp), env.request_id
            )
        elif env.type == T.PONG:
            self.pongs.put_nowait(env)
        elif env.type == T.MESSAGE_ACK:
            ids = list(pb.MessageAck.FromString(env.payload).message_ids)
            self.acks.put_nowait(ids)
            self.send(T.ACK, pb.Ack(count=len(ids)), env.request_id)
        else:
            self.inbox.put_nowait(env)

    def send(self, msg_type: int, message: Message, request_id: str = "") -> None:
        assert self.transport is not None
        env = pb.Envelope(type=msg_type, request_id=request_id, payload=message.SerializeToString())
        self.transport.send(WSMsgType.BINARY, env.SerializeToString())

    def push(self, event: Message) -> None:
        self.send(_TYPE_OF[type(event)], event)

    async def expect(self, msg_type: int, timeout: float = 5.0) -> pb.Envelope:
        env = await asyncio.wait_for(self.inbox.get(), timeout)
        assert env.type == msg_type, f"expected {T(msg_type).name}, got {T(env.type).name}"
        return env

    async def no_ack(self, within: float = 0.2) -> None:
        try:
            ids = await asyncio.wait_for(self.acks.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected MESSAGE_ACK {ids}")

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.disconnect()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


_TYPE_OF: dict[type[Message], int] = {
    pb.MessageReceive: T.MESSAGE_RECEIVE,
    pb.GroupMemberAdded: T.GROUP_MEMBER_ADDED,
    pb.MLSWelcomeReceive: T.MLS_WELCOME_RECEIVE,
    pb.SyncComplete: T.SYNC_COMPLETE,
    pb.PresenceNotify: T.PRESENCE_NOTIFY,
}


def msg(conv: str, seq: int) -> pb.MessageReceive:
    return pb.MessageReceive(
        message_id=f"{conv}-{seq}",
        conversation_id=conv,
        sender_id="other",
        encrypted_payload=f"payload {seq}".encode(),
        message_type="text",
        seq=seq,
    )


def env_of(event: Message) -> pb.Envelope:
    return pb.Envelope(type=_TYPE_OF[type(event)], payload=event.SerializeToString())


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    await p.start()
    yield p
    await p.close()


async def connected(peer: Peer, make_client: ClientFactory, **kw: Any) -> Client:
    assert peer.server is not None
    port = peer.server.sockets[0].getsockname()[1]
    c = make_client(f"ws://127.0.0.1:{port}/ws", token="tok", ping_interval=None, **kw)
    await c.connect()
    assert c.ready and c.user_id == "me"
    return c


async def acks_until(peer: Peer, *ids: str, timeout: float = 5.0) -> list[list[str]]:
    """MESSAGE_ACK batches the peer receives until all ``ids`` were acknowledged."""
    batches: list[list[str]] = []
    wanted = set(ids)
    async with asyncio.timeout(timeout):
        while not wanted <= {i for b in batches for i in b}:
            batches.append(await peer.acks.get())
    return batches


async def collect(stream: Any, n: int, timeout: float = 5.0) -> list[Event]:
    return [await stream.next(timeout) for _ in range(n)]


async def test_gap_pauses_pages_history_then_delivers_in_order(
    peer: Peer, make_client: ClientFactory
) -> None:
    c = await connected(peer, make_client)
    stream = c.events(T.MESSAGE_RECEIVE)
    peer.push(msg("c", 1))  # the starting point
    peer.push(msg("c", 4))  # 2 and 3 are missing
    req_env = await peer.expect(T.MESSAGE_HISTORY_REQUEST)
    req = pb.HistoryRequest.FromString(req_env.payload)
    assert (req.conversation_id, req.cursor_seq, req.limit, req.direction) == (
        "c",
        1,
        200,
        pb.HISTORY_FORWARD,
    )
    peer.push(msg("c", 5))  # live while the repair runs: held back
    peer.push(msg("d", 1))  # other conversations are not paused
    got = await collect(stream, 2)
    assert [(e.conversation_id, e.seq) for e in got] == [("c", 1), ("d", 1)]
    # first page: 2 only, has_more
    peer.send(
        T.MESSAGE_HISTORY_RESPONSE,
        pb.HistoryResponse(events=[env_of(msg("c", 2))], next_cursor_seq=2, has_more=True),
        req_env.request_id,
    )
    req_env = await peer.expect(T.MESSAGE_HISTORY_REQUEST)
    assert pb.HistoryRequest.FromString(req_env.payload).cursor_seq == 2
    # second page: 3 and 4 (4 is also held: delivered once)
    peer.send(
        T.MESSAGE_HISTORY_RESPONSE,
        pb.HistoryResponse(
            events=[env_of(msg("c", 3)), env_of(msg("c", 4))], next_cursor_seq=4, has_more=False
        ),
        req_env.request_id,
    )
    got = await collect(stream, 4)
    assert [(e.seq, e.replayed) for e in got] == [(2, True), (3, True), (4, True), (5, False)]
    assert got[0].message.encrypted_payload == b"payload 2"
    assert c.last_seq("c") == 5
    stream.close()  # the last one counts as processed
    batches = await acks_until(peer, "c-5", "d-1")
    assert "c-4" not in batches[0] or "c-5" in batches[0]
    await peer.no_ack()


async def test_unrepairable_gap_is_delivered_after_history(
    peer: Peer, make_client: ClientFactory
) -> None:
    c = await connected(peer, make_client)
    stream = c.events()
    peer.push(msg("c", 1))
    peer.push(msg("c", 9))
    req_env = await peer.expect(T.MESSAGE_HISTORY_REQUEST)
    # Retention removed 2..5; the server still has 6..9.
    peer.send(
        T.MESSAGE_HISTORY_RESPONSE,
        pb.HistoryResponse(events=[env_of(msg("c", s)) for s in (6, 7, 8, 9)], next_cursor_seq=9),
        req_env.request_id,
    )
    got = await collect(stream, 5)
    assert [e.seq for e in got] == [1, 6, 7, 8, 9]


async def test_history_error_does_not_stall_the_conversation(
    peer: Peer, make_client: ClientFactory
) -> None:
    c = await connected(peer, make_client)
    stream = c.events()
    peer.push(msg("c", 1))
    peer.push(msg("c", 3))
    req_env = await peer.expect(T.MESSAGE_HISTORY_REQUEST)
    peer.send(T.ERROR, pb.Error(code=9001, message="boom"), req_env.request_id)
    got = await collect(stream, 2)
    assert [e.seq for e in got] == [1, 3]


async def test_sync_complete_waits_for_gap_repairs(peer: Peer, make_client: ClientFactory) -> None:
    c = await connected(peer, make_client)
    stream = c.events()
    peer.push(msg("c", 1))
    peer.push(msg("c", 3))
    peer.push(pb.SyncComplete(delivered=2, truncated_conversation_ids=["t"]))
    req_env = await peer.expect(T.MESSAGE_HISTORY_REQUEST)
    synced = asyncio.create_task(c.synced(timeout=5))
    await asyncio.sleep(0.1)
    assert not synced.done()
    peer.send(
        T.MESSAGE_HISTORY_RESPONSE,
        pb.HistoryResponse(events=[env_of(msg("c", 2))], next_cursor_seq=2),
        req_env.request_id,
    )
    result = await synced
    assert result.delivered == 2 and c.truncated_conversation_ids == ("t",)
    got = await collect(stream, 4)
    assert [(e.type, e.seq) for e in got] == [
        (T.MESSAGE_RECEIVE, 1),
        (T.MESSAGE_RECEIVE, 2),
        (T.MESSAGE_RECEIVE, 3),
        (T.SYNC_COMPLETE, 0),
    ]


async def test_duplicates_are_dropped_and_acked_again(
    peer: Peer, make_client: ClientFactory
) -> None:
    c = await connected(peer, make_client)
    seen: list[Event] = []
    c.on(None, seen.append)
    peer.push(msg("c", 1))
    peer.push(msg("c", 2))
    await acks_until(peer, "c-2")
    peer.push(msg("c", 1))  # redelivered (say our ack was lost)
    peer.push(msg("c", 2))
    welcome = pb.MLSWelcomeReceive(conversation_id="c", event_id="w1", welcome_data=b"w")
    peer.push(welcome)
    peer.push(welcome)
    batches = await acks_until(peer, "c-2", "w1")  # acked again, delivered once
    assert sorted(i for b in batches for i in b) == ["c-2", "w1"]
    await peer.no_ack()
    assert [(e.type, e.event_id) for e in seen] == [
        (T.MESSAGE_RECEIVE, "c-1"),
        (T.MESSAGE_RECEIVE, "c-2"),
        (T.MLS_WELCOME_RECEIVE, "w1"),
    ]


async def test_acks_are_batched_per_conversation_and_welcome(
    peer: Peer, make_client: ClientFactory
) -> None:
    c = await connected(peer, make_client, ack_interval=0.1)
    handled: list[str] = []

    async def handler(event: Event) -> None:
        handled.append(event.event_id)

    c.on([T.MESSAGE_RECEIVE, T.MLS_WELCOME_RECEIVE, T.GROUP_MEMBER_ADDED], handler)
    peer.push(pb.GroupMemberAdded(conversation_id="a", user_id="me", event_id="a-1", seq=1))
    for s in (2, 3, 4):
        peer.push(msg("a", s))
    peer.push(msg("b", 7))
    peer.push(pb.MLSWelcomeReceive(conversation_id="b", event_id="w1"))
    peer.push(pb.MLSWelcomeReceive(conversation_id="a", event_id="w2"))
    peer.push(pb.PresenceNotify(user_id="x", status="online"))  # ephemeral: never acked
    ids = await asyncio.wait_for(peer.acks.get(), 5)
    assert ids == ["a-4", "b-7", "w1", "w2"]  # one MESSAGE_ACK for all of them
    assert handled == ["a-1", "a-2", "a-3", "a-4", "b-7", "w1", "w2"]
    await peer.no_ack()


async def test_iterator_acks_only_after_the_app_moves_on(
    peer: Peer, make_client: ClientFactory
) -> None:
    c = await connected(peer, make_client)
    stream = c.events()
    peer.push(msg("c", 1))
    peer.push(msg("c", 2))
    first = await stream.next(5)
    assert first.seq == 1
    await peer.no_ack(0.2)  # still processing event 1
    second = await stream.next(5)
    assert second.seq == 2
    assert await asyncio.wait_for(peer.acks.get(), 5) == ["c-1"]
    async with stream:
        pass  # closing the stream finishes event 2
    assert await asyncio.wait_for(peer.acks.get(), 5) == ["c-2"]


async def test_backlog_is_kept_until_a_consumer_registers(
    peer: Peer, make_client: ClientFactory
) -> None:
    c = await connected(peer, make_client)
    peer.push(msg("c", 1))
    peer.push(pb.PresenceNotify(user_id="x", status="away"))
    peer.push(msg("c", 2))
    await asyncio.sleep(0.1)
    await peer.no_ack(0.1)  # nobody has seen them yet
    # wait_for takes from the backlog without consuming the rest
    presence = await c.wait_for(T.PRESENCE_NOTIFY, timeout=1)
    assert presence.message.status == "away"
    got = await collect(c.events(T.MESSAGE_RECEIVE), 2)  # registered and gone in one tick
    assert [e.seq for e in got] == [1, 2]
    assert await acks_until(peer, "c-2") == [["c-2"]]  # nothing left holding the acks


async def test_manual_ack_mode(peer: Peer, make_client: ClientFactory) -> None:
    c = await connected(peer, make_client, auto_ack=False)
    stream = c.events()
    peer.push(msg("c", 1))
    peer.push(msg("c", 2))
    got = await collect(stream, 2)
    stream.close()
    await peer.no_ack(0.2)
    assert await c.ack(got[-1]) == 1
    assert await asyncio.wait_for(peer.acks.get(), 5) == ["c-2"]


async def test_handler_errors_are_logged_and_count_as_handled(
    peer: Peer, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    c = await connected(peer, make_client)

    @c.on(T.MESSAGE_RECEIVE)
    def broken(event: Event) -> None:
        raise RuntimeError("bug in the bot")

    peer.push(msg("c", 1))
    assert await asyncio.wait_for(peer.acks.get(), 5) == ["c-1"]
    assert "bug in the bot" in caplog.text


async def test_server_ping_is_answered(peer: Peer, make_client: ClientFactory) -> None:
    await connected(peer, make_client)
    peer.send(T.PING, pb.Ping(timestamp=99), "srv-1")
    pong = await asyncio.wait_for(peer.pongs.get(), 5)
    assert pong.request_id == "srv-1" and pb.Pong.FromString(pong.payload).timestamp == 99


async def test_own_echo_moves_seq_and_is_acked(peer: Peer, make_client: ClientFactory) -> None:
    c = await connected(peer, make_client)
    seen: list[Event] = []
    c.on(None, seen.append)
    peer.push(msg("c", 1))
    await acks_until(peer, "c-1")
    sending = asyncio.create_task(c.send_message("c", b"mine"))
    req = await peer.expect(T.MESSAGE_SEND)
    send = pb.MessageSend.FromString(req.payload)
    assert (send.conversation_id, send.encrypted_payload, send.message_type) == (
        "c",
        b"mine",
        "text",
    )
    echo = pb.MessageReceive(
        message_id="mine-2", conversation_id="c", sender_id="me", encrypted_payload=b"mine", seq=2
    )
    peer.send(T.MESSAGE_RECEIVE, echo, req.request_id)
    result = await sending
    assert result.seq == 2 and result.message_id == "mine-2"
    assert await acks_until(peer, "mine-2") == [["mine-2"]]  # acked like any event
    peer.push(msg("c", 3))  # not a gap: the echo counted
    await acks_until(peer, "c-3")
    assert [e.seq for e in seen] == [1, 3]  # the echo itself is the return value only
    await peer.no_ack()


async def test_handlers_can_be_awaitables(peer: Peer, make_client: ClientFactory) -> None:
    c = await connected(peer, make_client)
    order: list[int] = []
    done = asyncio.Event()

    async def slow(event: Event) -> None:
        await asyncio.sleep(0.02)
        order.append(event.seq)
        if event.seq == 3:
            done.set()

    unsubscribe = c.on(T.MESSAGE_RECEIVE, slow)
    for s in (1, 2, 3):
        peer.push(msg("c", s))
    await asyncio.wait_for(done.wait(), 5)
    assert order == [1, 2, 3]  # one at a time, in order
    unsubscribe()
