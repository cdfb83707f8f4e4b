"""Fan-out (SPEC §5): compiled ``sovereign._fast.fanout`` and its twin
``sovereign.transport.fanout``.

Every test runs on both implementations. A missing compiled module fails the run (set
SOVEREIGN_ALLOW_PURE=1 to skip its cases instead). Frames are checked three ways: exact
header bytes, an independent RFC 6455 parser below, and a real picows client reading
them off a loopback socket.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import types
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import picows
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from picows import WSFrame, WSListener, WSMsgType, WSTransport

from sovereign.codec import encode_envelope
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.frames import parse_frames
from tests.helpers.twins import impl_fixture, impls_fixture, load_twin

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]
MESSAGE_RECEIVE = 21


impl = impl_fixture("fanout")
impls = impls_fixture("fanout")


def payload_of(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


# ------------------------------------------------------------------ reference header


def expected_header(n: int) -> bytes:
    if n < 126:
        return bytes([0x82, n])
    if n < 65536:
        return bytes([0x82, 126, n >> 8, n & 0xFF])
    return bytes([0x82, 127]) + n.to_bytes(8, "big")


# ------------------------------------------------------------------ framing


@pytest.mark.parametrize("n", SIZES)
def test_ws_frame_exact_bytes(impl: ModuleType, n: int) -> None:
    payload = payload_of(n)
    frame = impl.ws_frame(payload)
    assert type(frame) is bytes
    assert frame == expected_header(n) + payload
    assert parse_frames(frame) == [payload]


@pytest.mark.parametrize("n", SIZES)
def test_ws_frame_accepts_buffers(impl: ModuleType, n: int) -> None:
    payload = payload_of(n)
    want = expected_header(n) + payload
    padded = b"xx" + payload + b"yy"
    assert impl.ws_frame(bytearray(payload)) == want
    assert impl.ws_frame(memoryview(payload)) == want
    assert impl.ws_frame(memoryview(padded)[2 : 2 + n]) == want
    if n % 4 == 0:  # a multi-byte format: framed by bytes, not items
        assert impl.ws_frame(memoryview(payload).cast("I")) == want


def test_ws_frame_rejects_bad_input(impl: ModuleType) -> None:
    with pytest.raises(BufferError):
        impl.ws_frame(memoryview(b"abcdef")[::2])
    with pytest.raises(TypeError):
        impl.ws_frame("text")
    with pytest.raises(TypeError):
        impl.ws_frame(None)


def test_append_ws_frame_equals_concatenation(impl: ModuleType) -> None:
    out = bytearray(b"prefix")
    for n in SIZES:
        impl.append_ws_frame(out, payload_of(n))
    impl.append_ws_frame(out, memoryview(bytearray(b"view")))
    want = b"".join(impl.ws_frame(payload_of(n)) for n in SIZES) + impl.ws_frame(b"view")
    assert out == b"prefix" + want
    assert parse_frames(bytes(out[6:])) == [payload_of(n) for n in SIZES] + [b"view"]


def test_append_ws_frame_errors_leave_out_unchanged(impl: ModuleType) -> None:
    with pytest.raises(TypeError):
        impl.append_ws_frame(b"not a bytearray", b"x")
    out = bytearray(b"abc")
    with pytest.raises(BufferError):  # a view of out pins its size
        impl.append_ws_frame(out, memoryview(out))
    with pytest.raises(BufferError):
        impl.append_ws_frame(out, out)
    with pytest.raises(BufferError):
        impl.append_ws_frame(out, memoryview(b"abcdef")[::2])
    assert out == b"abc"


# ------------------------------------------------------------------ fake connections


class FakeOut:
    """An asyncio transport stand-in: records writes, reports a growing buffer."""

    def __init__(self, buffered: int = 0) -> None:
        self.writes: list[bytes] = []
        self.buffered = buffered

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered


class FakeConn:
    """``live`` / ``out`` / ``overflow()`` as in sovereign.transport.ws.Connection.

    ``action`` says what overflow() does to ``registry`` (the by_user dict) besides
    dropping the connection: "self" removes this connection from its user's entry,
    "user" deletes the whole entry, "none" changes nothing else, "keep" leaves the
    connection live (misbehaving: fan-out must still call overflow() once per visit).
    """

    def __init__(
        self,
        name: str,
        user: str = "",
        *,
        live: bool = True,
        closed: bool = False,
        buffered: int = 0,
        action: str = "self",
        registry: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.user = user
        self.live = live
        self.out: FakeOut | None = None if closed else FakeOut(buffered)
        self.sink = self.out
        self.action = action
        self.registry = registry
        self.overflows = 0

    def overflow(self) -> None:
        self.overflows += 1
        if self.action == "keep":
            return
        self.live = False
        self.out = None
        reg = self.registry
        if self.action == "none":
            return
        if reg is None or self.user not in reg:
            return
        if self.action == "user":
            del reg[self.user]
            return
        seq = reg[self.user]
        if isinstance(seq, list):
            if self in seq:
                seq.remove(self)
        else:
            reg[self.user] = type(seq)(c for c in seq if c is not self)
        if not reg[self.user]:
            del reg[self.user]

    @property
    def writes(self) -> list[bytes]:
        return self.sink.writes if self.sink is not None else []

    def __repr__(self) -> str:
        return f"<FakeConn {self.name}>"


def world(spec: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, FakeConn]]:
    by_user: dict[str, Any] = {}
    conns: dict[str, FakeConn] = {}
    for user, items in spec.items():
        lst = []
        for i, kw in enumerate(items):
            c = FakeConn(f"{user}{i}", user, registry=by_user, **kw)
            conns[c.name] = c
            lst.append(c)
        by_user[user] = lst
    return by_user, conns


LIMIT = 1 << 20


def test_fanout_excludes_sender_connection_only(impl: ModuleType) -> None:
    by_user, c = world({"alice": [{}, {}], "bob": [{}, {}, {}], "carol": [{}]})
    frame = impl.ws_frame(b"event")
    n = impl.fanout(frame, by_user, ["alice", "bob", "carol"], c["alice0"], LIMIT)
    assert n == 5
    assert c["alice0"].writes == []
    for name in ("alice1", "bob0", "bob1", "bob2", "carol0"):
        assert c[name].writes == [frame]
        assert c[name].writes[0] is frame  # encoded once, the same object everywhere


def test_fanout_skips_non_live_and_closed(impl: ModuleType) -> None:
    by_user, c = world({"a": [{"live": False}, {"closed": True}, {}], "b": [{"live": False}]})
    frame = impl.ws_frame(b"x")
    assert impl.fanout(frame, by_user, ["a", "b"], None, LIMIT) == 1
    assert c["a0"].writes == [] and c["b0"].writes == [] and c["a1"].out is None
    assert c["a2"].writes == [frame]
    assert all(x.overflows == 0 for x in c.values())


def test_fanout_ignores_unknown_users_and_does_not_insert(impl: ModuleType) -> None:
    by_user, c = world({"a": [{}]})
    dd: collections.defaultdict[str, list[FakeConn]] = collections.defaultdict(list, by_user)
    frame = impl.ws_frame(b"x")
    assert impl.fanout(frame, by_user, ["nobody", "a", "ghost"], None, LIMIT) == 1
    assert impl.fanout(frame, dd, iter(["nobody", "a"]), None, LIMIT) == 1
    assert "nobody" not in dd  # .get, never __getitem__/__missing__
    assert impl.fanout(frame, types.MappingProxyType(by_user), {"a"}, None, LIMIT) == 1
    assert impl.fanout(frame, {}, ["a"], None, LIMIT) == 0
    assert impl.fanout(frame, by_user, [], None, LIMIT) == 0
    assert c["a0"].writes == [frame] * 3


def test_fanout_over_any_sequence(impl: ModuleType) -> None:
    conns = [FakeConn(str(i)) for i in range(4)]
    frame = impl.ws_frame(b"x")
    for seq in (list(conns), tuple(conns), collections.deque(conns)):
        assert impl.fanout(frame, {"u": seq}, ["u"], conns[1], LIMIT) == 3
    assert [len(c.writes) for c in conns] == [3, 0, 3, 3]


def test_buffer_limit_stops_writes_and_overflows_once(impl: ModuleType) -> None:
    frame = impl.ws_frame(b"p" * 98)  # 100 bytes on the wire
    by_user, c = world({"slow": [{"buffered": 150}], "fast": [{}]})
    results = [impl.fanout(frame, by_user, ["slow", "fast"], None, 400) for _ in range(5)]
    # slow: 150 -> 250 -> 350, the third would reach 450 > 400: overflow, then dropped.
    assert results == [2, 2, 1, 1, 0]  # fast: 100 .. 400 (== limit is fine), then 500
    assert len(c["slow0"].writes) == 2 and c["slow0"].overflows == 1
    assert len(c["fast0"].writes) == 4 and c["fast0"].overflows == 1
    assert by_user == {}  # both removed themselves


def test_limit_boundary(impl: ModuleType) -> None:
    frame = impl.ws_frame(b"z" * 8)  # 10 bytes
    at = FakeConn("at", buffered=90)
    over = FakeConn("over", buffered=91)
    assert impl.fanout_conns(frame, [at, over], None, 100) == 1
    assert (len(at.writes), at.overflows, len(over.writes), over.overflows) == (1, 0, 0, 1)
    huge = FakeConn("huge")
    assert impl.write_frame(huge, frame, 9) is False  # a frame alone over the limit
    assert huge.overflows == 1
    neg = FakeConn("neg")
    assert impl.write_frame(neg, frame, -(2**62)) is False and neg.overflows == 1
    big = FakeConn("big", buffered=2**62)
    assert impl.write_frame(big, frame, 2**63 - 1) is True


def test_overflow_removing_itself_does_not_skip_the_next(impl: ModuleType) -> None:
    # A naive index walk over the live list would skip a1 after a0 removes itself.
    by_user, c = world({"a": [{"buffered": 1000}, {}, {"buffered": 1000}, {}], "b": [{}]})
    frame = impl.ws_frame(b"x")
    assert impl.fanout(frame, by_user, ["a", "b"], None, 500) == 3
    assert [len(c[f"a{i}"].writes) for i in range(4)] == [0, 1, 0, 1]
    assert [c[f"a{i}"].overflows for i in range(4)] == [1, 0, 1, 0]
    assert by_user["a"] == [c["a1"], c["a3"]]
    assert c["b0"].writes == [frame]


def test_overflow_deleting_the_user_entry_finishes_the_snapshot(impl: ModuleType) -> None:
    by_user, c = world({"a": [{}, {"buffered": 1000, "action": "user"}, {}, {}], "b": [{}]})
    frame = impl.ws_frame(b"x")
    assert impl.fanout(frame, by_user, ["a", "b"], None, 500) == 4
    assert [len(c[f"a{i}"].writes) for i in range(4)] == [1, 0, 1, 1]
    assert "a" not in by_user and c["a1"].overflows == 1


def test_misbehaving_overflow_is_called_once_per_visit(impl: ModuleType) -> None:
    by_user, c = world({"a": [{"buffered": 1000, "action": "keep"}, {}]})
    frame = impl.ws_frame(b"x")
    assert impl.fanout(frame, by_user, ["a"], None, 500) == 1
    assert c["a0"].overflows == 1 and c["a0"].writes == []


def test_fanout_conns_snapshot_of_a_list(impl: ModuleType) -> None:
    registry: dict[str, Any] = {}
    conns = [FakeConn(str(i), "u", buffered=1000 * (i % 2), registry=registry) for i in range(6)]
    flat = list(conns)
    registry["u"] = flat  # overflow() removes from the very list being walked
    frame = impl.ws_frame(b"x")
    assert impl.fanout_conns(frame, flat, conns[2], 500) == 2
    assert [len(c.writes) for c in conns] == [1, 0, 0, 0, 1, 0]
    assert [c.overflows for c in conns] == [0, 1, 0, 1, 0, 1]
    assert flat == [conns[0], conns[2], conns[4]]


def test_fanout_conns_accepts_iterables(impl: ModuleType) -> None:
    conns = [FakeConn(str(i)) for i in range(3)]
    frame = impl.ws_frame(b"x")
    assert impl.fanout_conns(frame, iter(conns), None, LIMIT) == 3
    assert impl.fanout_conns(frame, (c for c in conns), conns[0], LIMIT) == 2
    assert impl.fanout_conns(frame, (), None, LIMIT) == 0
    assert all(w is frame for c in conns for w in c.writes)


def test_write_frame(impl: ModuleType) -> None:
    frame = impl.ws_frame(b"x")
    ok = FakeConn("ok")
    assert impl.write_frame(ok, frame, LIMIT) is True and ok.writes[0] is frame
    assert impl.write_frame(FakeConn("down", live=False), frame, LIMIT) is False
    assert impl.write_frame(FakeConn("closed", closed=True), frame, LIMIT) is False


def test_frame_must_be_bytes(impl: ModuleType) -> None:
    conn = FakeConn("c")
    for bad in (bytearray(b"\x82\x00"), memoryview(b"\x82\x00"), "x", None):
        with pytest.raises(TypeError):
            impl.write_frame(conn, bad, LIMIT)
        with pytest.raises(TypeError):
            impl.fanout(bad, {"u": [conn]}, ["u"], None, LIMIT)
        with pytest.raises(TypeError):
            impl.fanout_conns(bad, [conn], None, LIMIT)
    assert conn.writes == []


def test_exceptions_propagate(impl: ModuleType) -> None:
    class Boom(FakeOut):
        def write(self, data: bytes) -> None:
            raise RuntimeError("boom")

    conn = FakeConn("c")
    conn.out = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        impl.fanout_conns(impl.ws_frame(b"x"), [conn], None, LIMIT)
    with pytest.raises(TypeError):  # unhashable user id, as dict.get
        impl.fanout(impl.ws_frame(b"x"), {}, [[]], None, LIMIT)


# ------------------------------------------------------------------ parity


# Biased towards live connections whose overflow() mutates by_user: the interesting case.
CONN = st.fixed_dictionaries(
    {
        "live": st.sampled_from([True, True, True, False]),
        "closed": st.sampled_from([False, False, False, True]),
        "buffered": st.integers(0, 400),
        "action": st.sampled_from(["self", "self", "user", "keep", "none"]),
    }
)
SCENARIO = st.fixed_dictionaries(
    {
        "users": st.lists(st.lists(CONN, max_size=4), max_size=5),
        "user_ids": st.lists(st.integers(-1, 6), max_size=8),
        "exclude": st.one_of(st.none(), st.integers(0, 25)),
        "limit": st.integers(-5, 700),
        "size": st.sampled_from([0, 1, 50, 125, 126, 300]),
        "seq": st.sampled_from(["list", "tuple"]),
        "mapping": st.sampled_from(["dict", "proxy"]),
        "rounds": st.integers(1, 3),
        "flat": st.booleans(),
    }
)


def run_scenario(mod: ModuleType, sc: dict[str, Any]) -> tuple[object, ...]:
    spec = {f"u{i}": items for i, items in enumerate(sc["users"])}
    by_user, conns = world(spec)
    if sc["seq"] == "tuple":
        for k in by_user:
            by_user[k] = tuple(by_user[k])
    ordered = list(conns.values())
    exclude = None
    if sc["exclude"] is not None and ordered:
        exclude = ordered[sc["exclude"] % len(ordered)]
    frame = mod.ws_frame(payload_of(sc["size"]))
    mapping: Mapping[str, Sequence[FakeConn]] = (
        by_user if sc["mapping"] == "dict" else types.MappingProxyType(by_user)
    )
    counts = []
    for _ in range(sc["rounds"]):
        if sc["flat"]:
            flat = [c for k in list(by_user) for c in by_user[k]]
            counts.append(mod.fanout_conns(frame, flat, exclude, sc["limit"]))
        else:
            uids = [f"u{i}" for i in sc["user_ids"]]
            counts.append(mod.fanout(frame, mapping, uids, exclude, sc["limit"]))
    per_conn = [
        (c.name, len(c.writes), all(w is frame for w in c.writes), c.overflows, c.live)
        for c in ordered
    ]
    final = {k: [c.name for c in v] for k, v in by_user.items()}
    return counts, per_conn, final


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=SCENARIO)
def test_parity_random_scenarios(impls: list[ModuleType], sc: dict[str, Any]) -> None:
    results = [run_scenario(mod, sc) for mod in impls]
    assert all(r == results[0] for r in results[1:])


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(
        st.one_of(st.binary(max_size=300), st.integers(65530, 70000).map(payload_of)),
        max_size=5,
    )
)
def test_parity_framing(impls: list[ModuleType], chunks: list[bytes]) -> None:
    outs = []
    for mod in impls:
        out = bytearray()
        for chunk in chunks:
            mod.append_ws_frame(out, chunk)
        assert bytes(out) == b"".join(mod.ws_frame(c) for c in chunks)
        outs.append(bytes(out))
    assert all(o == outs[0] for o in outs)
    assert parse_frames(outs[0]) == chunks


# ------------------------------------------------------------------ selection


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "SOVEREIGN_PURE": "0", **env},
        check=False,
        timeout=60,
    )


BLOCK_FAST = "import sys; sys.modules['sovereign._fast.fanout'] = None\n"
PICK = "from sovereign.transport import fanout as f; print(f.implementation().__name__)"


def test_implementation_prefers_compiled() -> None:
    from sovereign.transport import fanout as twin

    compiled = load_twin("fanout", "compiled")
    if os.environ.get("SOVEREIGN_PURE") == "1":
        pytest.skip("SOVEREIGN_PURE=1 selects the twin (see test_implementations.py)")
    assert twin.implementation() is compiled


def test_implementation_falls_back_to_twin() -> None:
    r = _run(BLOCK_FAST + PICK, SOVEREIGN_REQUIRE_FAST="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sovereign.transport.fanout"


def test_require_fast_turns_missing_module_into_import_error() -> None:
    r = _run(BLOCK_FAST + PICK, SOVEREIGN_REQUIRE_FAST="1")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "SOVEREIGN_REQUIRE_FAST" in r.stderr


# ------------------------------------------------------------------ real sockets


class ServerSide(WSListener):
    """Server end of a test connection, shaped like the fan-out contract."""

    def __init__(self, registry: list[ServerSide]) -> None:
        super().__init__()
        self.registry = registry
        self.live = False
        self.out: Any = None
        self.overflows = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.out = transport.underlying_transport
        self.live = True
        self.registry.append(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.live = False
        self.out = None

    def overflow(self) -> None:
        self.overflows += 1
        self.live = False


class ClientSide(WSListener):
    def __init__(self) -> None:
        super().__init__()
        self.payloads: list[bytes] = []
        self.bad: list[str] = []
        self.arrived = asyncio.Event()
        self.expect = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.BINARY or not frame.fin or frame.rsv1:
            self.bad.append(f"{frame.msg_type} fin={frame.fin}")
            return
        self.payloads.append(frame.get_payload_as_bytes())
        if len(self.payloads) >= self.expect:
            self.arrived.set()


class Pair:
    def __init__(self, count: int) -> None:
        self.count = count
        self.servers: list[ServerSide] = []
        self.clients: list[tuple[WSTransport, ClientSide]] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Pair:
        self.server = await picows.ws_create_server(
            lambda _request: ServerSide(self.servers), "127.0.0.1", 0
        )
        port = self.server.sockets[0].getsockname()[1]
        for _ in range(self.count):
            transport, client = await picows.ws_connect(ClientSide, f"ws://127.0.0.1:{port}/")
            assert isinstance(client, ClientSide)
            self.clients.append((transport, client))
        for _ in range(200):
            if len(self.servers) == self.count:
                break
            await asyncio.sleep(0.01)
        assert len(self.servers) == self.count
        return self

    async def receive(self, expect: list[int]) -> None:
        for (_, client), n in zip(self.clients, expect, strict=True):
            client.expect = n
            if len(client.payloads) >= n:
                client.arrived.set()
        await asyncio.wait_for(asyncio.gather(*(c.arrived.wait() for _, c in self.clients)), 10)
        for _, c in self.clients:
            c.arrived.clear()

    async def __aexit__(self, *exc: object) -> None:
        for transport, _ in self.clients:
            transport.disconnect()
        for transport, _ in self.clients:
            await transport.wait_disconnected()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_picows_client_reads_our_frames(impl: ModuleType) -> None:
    async with Pair(1) as pair:
        out = pair.servers[0].out
        payloads = [payload_of(n) for n in SIZES]
        for p in payloads:  # one write per frame
            out.write(impl.ws_frame(p))
        batch = bytearray()  # and a whole backlog in one write
        for p in payloads:
            impl.append_ws_frame(batch, p)
        out.write(bytes(batch))
        await pair.receive([2 * len(SIZES)])
        client = pair.clients[0][1]
        assert client.bad == []
        assert client.payloads == payloads + payloads


async def test_fanout_to_50_real_connections(impl: ModuleType) -> None:
    async with Pair(50) as pair:
        # 20 users with 1..4 connections each; user0's first connection sent the event.
        by_user: dict[str, list[ServerSide]] = {}
        for i, conn in enumerate(pair.servers):
            by_user.setdefault(f"user{i % 20}", []).append(conn)
        sender = by_user["user0"][0]
        message = pb.MessageReceive(
            message_id="01J0000000000000000000000",
            conversation_id="c1",
            sender_id="user0",
            encrypted_payload=b"\x00\x01" * 150,
            seq=7,
        )
        envelope = encode_envelope(MESSAGE_RECEIVE, "", message.SerializeToString())
        frame = impl.ws_frame(envelope)
        users = [*by_user, "user-unknown"]
        assert impl.fanout(frame, by_user, users, sender, 1 << 20) == 49
        # A second frame to everyone, sender included: proves nothing else was queued
        # before it (TCP keeps order) and that the sender got nothing the first time.
        marker = impl.ws_frame(encode_envelope(60, "marker", b""))
        assert impl.fanout_conns(marker, pair.servers, None, 1 << 20) == 50
        expect = [1 if s is sender else 2 for s in pair.servers]
        await pair.receive(expect)
        for server_side, (_, client) in zip(pair.servers, pair.clients, strict=True):
            assert client.bad == []
            got = [pb.Envelope.FromString(p) for p in client.payloads]
            assert got[-1].request_id == "marker"
            if server_side is sender:
                assert len(got) == 1
                continue
            assert len(got) == 2 and client.payloads[0] == envelope
            assert got[0].type == MESSAGE_RECEIVE
            assert pb.MessageReceive.FromString(got[0].payload) == message
        assert all(s.overflows == 0 for s in pair.servers)


async def test_real_transport_limit_overflows(impl: ModuleType) -> None:
    async with Pair(2) as pair:
        a, b = pair.servers
        frame = impl.ws_frame(b"y" * 1000)
        assert impl.fanout_conns(frame, [a, b], None, 999) == 0  # the frame alone is over
        assert (a.overflows, b.overflows) == (1, 1)
        assert impl.fanout_conns(frame, [a, b], None, 1 << 20) == 0  # dropped: not live
        a.live = b.live = True
        assert impl.fanout_conns(frame, [a, b], None, 1 << 20) == 2
        await pair.receive([1, 1])
        assert [c.payloads for _, c in pair.clients] == [[b"y" * 1000]] * 2


def test_reference_parser_rejects_what_it_should() -> None:
    good = expected_header(3) + b"abc"
    assert parse_frames(good) == [b"abc"]
    for bad in (
        b"\x02\x01a",  # no FIN
        b"\x81\x01a",  # text
        b"\x82\x81\x00\x00\x00\x00a",  # masked
        b"\x82\x7e\x00\x05abcde",  # non-minimal 16-bit length
        b"\x82\x05abc",  # truncated
    ):
        with pytest.raises(AssertionError):
            parse_frames(bad)


# -- collect: the corked variant (one write per connection per commit batch) ----------


def test_collect_appends_per_connection_and_skips_like_fanout(impl: ModuleType) -> None:
    class C:
        def __init__(self, live: bool = True) -> None:
            self.live = live

    sender, other_dev, peer, dead = C(), C(), C(), C(live=False)
    by_user = {"alice": [sender, other_dev], "bob": [peer, dead]}
    pending: dict[object, bytearray] = {}
    f1, f2 = impl.ws_frame(b"one"), impl.ws_frame(b"two")
    assert impl.collect(f1, by_user, ["alice", "bob", "nobody"], sender, pending) == 2
    assert impl.collect(f2, by_user, ["bob"], None, pending) == 1
    assert pending == {other_dev: bytearray(f1), peer: bytearray(f1 + f2)}
    with pytest.raises(TypeError):
        impl.collect(bytearray(f1), by_user, ["bob"], None, pending)
