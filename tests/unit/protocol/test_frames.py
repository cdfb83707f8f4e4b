"""RFC 6455 frame rules and reassembly (``sovereign.protocol.frames``), without sockets
except the last test, which drives the module from a real picows server."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import picows
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from sovereign.protocol import frames
from sovereign.protocol.frames import (
    DELIVER,
    ECHO_CLOSE,
    FAIL,
    IGNORE,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PENDING,
    REPLY_PONG,
    FrameAssembler,
)

LIMIT = 64


def feed(
    fa: FrameAssembler, opcode: int, payload: bytes = b"", fin: bool = True, rsv: bool = False
) -> int:
    return fa.receive(opcode, fin, rsv, memoryview(payload), len(payload))


def close_body(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def failed(fa: FrameAssembler, code: int) -> bool:
    return fa.ended and fa.close_code == code and fa.buffered == 0


# ------------------------------------------------------------------ constants


def test_opcodes_are_rfc_6455_and_match_picows() -> None:
    assert (OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG) == (
        0x0,
        0x1,
        0x2,
        0x8,
        0x9,
        0xA,
    )
    for name in ("CONTINUATION", "TEXT", "BINARY", "CLOSE", "PING", "PONG"):
        assert getattr(WSMsgType, name) == getattr(frames, "OP_" + name)


def test_verdicts_are_distinct_and_named() -> None:
    verdicts = [DELIVER, PENDING, IGNORE, REPLY_PONG, FAIL, ECHO_CLOSE]
    assert sorted(verdicts) == list(range(len(verdicts)))
    assert [frames.VERDICT_NAMES[v] for v in verdicts] == [
        "DELIVER",
        "PENDING",
        "IGNORE",
        "REPLY_PONG",
        "FAIL",
        "ECHO_CLOSE",
    ]


@pytest.mark.parametrize("bad", [-1, -100])
def test_limit_must_not_be_negative(bad: int) -> None:
    with pytest.raises(ValueError):
        FrameAssembler(bad)


def test_limit_must_be_an_integer() -> None:
    with pytest.raises(TypeError):
        FrameAssembler(1.5)  # type: ignore[arg-type]
    assert FrameAssembler(LIMIT).max_message_bytes == LIMIT


def test_assembler_is_slotted() -> None:
    assert not hasattr(FrameAssembler(LIMIT), "__dict__")


# ------------------------------------------------------------------ unfragmented


def test_binary_frame_is_delivered_as_the_same_view() -> None:
    fa = FrameAssembler(LIMIT)
    view = memoryview(b"envelope")
    assert fa.receive(OP_BINARY, True, False, view, len(view)) == DELIVER
    assert fa.message is view  # zero-copy: the caller's own payload
    assert fa.buffered == 0 and not fa.ended


def test_picows_style_arguments_take_the_hot_path() -> None:
    # picows gives WSMsgType (an IntEnum) and 0/1 ints for fin and the RSV bits.
    fa = FrameAssembler(LIMIT)
    view = memoryview(b"x")
    assert fa.receive(WSMsgType.BINARY, 1, 0, view, 1) == DELIVER  # type: ignore[arg-type]
    assert fa.message is view


def test_size_limit_is_inclusive() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_BINARY, b"a" * LIMIT) == DELIVER
    assert feed(fa, OP_BINARY, b"a" * (LIMIT + 1)) == FAIL
    assert failed(fa, 1009) and fa.close_reason == "message too big"


def test_empty_message_and_zero_limit() -> None:
    fa = FrameAssembler(0)
    assert feed(fa, OP_BINARY) == DELIVER
    assert bytes(fa.message) == b""
    assert feed(fa, OP_BINARY, b"", fin=False) == PENDING
    assert feed(fa, OP_CONTINUATION, b"") == DELIVER
    assert feed(fa, OP_BINARY, b"x") == FAIL
    assert failed(fa, 1009)


def test_size_is_checked_against_payload_size_before_the_payload_is_read() -> None:
    fa = FrameAssembler(LIMIT)
    # A shell's payload_size is trusted: the limit is applied to it, not to len(payload).
    assert fa.receive(OP_BINARY, True, False, memoryview(b""), LIMIT + 1) == FAIL
    assert failed(fa, 1009)


def test_message_is_cleared_by_any_other_verdict() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_BINARY, b"one") == DELIVER
    assert feed(fa, OP_PONG) == IGNORE
    assert bytes(fa.message) == b""


# ------------------------------------------------------------------ fragmentation


def test_fragments_are_reassembled() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_BINARY, b"abc", fin=False) == PENDING
    assert fa.buffered == 3
    assert feed(fa, OP_CONTINUATION, b"def", fin=False) == PENDING
    assert fa.buffered == 6
    assert feed(fa, OP_CONTINUATION, b"gh") == DELIVER
    assert type(fa.message) is memoryview and bytes(fa.message) == b"abcdefgh"
    assert fa.buffered == 0
    # and the next message starts clean
    assert feed(fa, OP_BINARY, b"next") == DELIVER
    assert bytes(fa.message) == b"next"


def test_first_fragment_is_copied() -> None:
    fa = FrameAssembler(LIMIT)
    data = bytearray(b"abc")
    assert fa.receive(OP_BINARY, False, False, memoryview(data), 3) == PENDING
    data[0] = ord("X")  # the shell's read buffer is reused: ours must not change
    assert feed(fa, OP_CONTINUATION, b"d") == DELIVER
    assert bytes(fa.message) == b"abcd"


def test_control_frames_between_fragments_keep_the_message_open() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_BINARY, b"ab", fin=False) == PENDING
    assert feed(fa, OP_PING, b"hello") == REPLY_PONG
    assert fa.pong_payload == b"hello" and type(fa.pong_payload) is bytes
    assert feed(fa, OP_PONG, b"x") == IGNORE
    assert feed(fa, OP_CONTINUATION, b"cd") == DELIVER
    assert bytes(fa.message) == b"abcd"


def test_binary_inside_a_fragmented_message_is_1002() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_BINARY, b"ab", fin=False) == PENDING
    assert feed(fa, OP_BINARY, b"cd") == FAIL
    assert failed(fa, 1002) and fa.close_reason == "expected continuation frame"


@pytest.mark.parametrize("fin", [True, False])
def test_continuation_without_a_message_is_1002(fin: bool) -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_CONTINUATION, b"x", fin=fin) == FAIL
    assert failed(fa, 1002) and fa.close_reason == "continuation without a message"


def test_continuation_after_a_complete_message_is_1002() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_BINARY, b"a", fin=False) == PENDING
    assert feed(fa, OP_CONTINUATION, b"b") == DELIVER
    assert feed(fa, OP_CONTINUATION, b"c") == FAIL
    assert failed(fa, 1002)


def test_first_fragment_over_the_limit_is_1009_and_not_buffered() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_BINARY, b"a" * (LIMIT + 1), fin=False) == FAIL
    assert failed(fa, 1009)


def test_reassembled_message_over_the_limit_is_1009_before_buffering() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_BINARY, b"a" * (LIMIT - 4), fin=False) == PENDING
    assert feed(fa, OP_CONTINUATION, b"b" * 4, fin=False) == PENDING
    assert fa.buffered == LIMIT  # exactly the limit is fine
    assert feed(fa, OP_CONTINUATION, b"", fin=False) == PENDING
    assert fa.receive(OP_CONTINUATION, True, False, memoryview(b"c"), 1) == FAIL
    assert failed(fa, 1009) and fa.close_reason == "message too big"


# ------------------------------------------------------------------ refused frames


@pytest.mark.parametrize(
    "opcode", [OP_BINARY, OP_CONTINUATION, OP_TEXT, OP_PING, OP_PONG, OP_CLOSE, 3]
)
def test_any_rsv_bit_is_1002(opcode: int) -> None:
    fa = FrameAssembler(LIMIT)
    if opcode == OP_CONTINUATION:
        assert feed(fa, OP_BINARY, b"a", fin=False) == PENDING
    assert feed(fa, opcode, b"x", rsv=True) == FAIL
    assert failed(fa, 1002) and fa.close_reason == "reserved bits set"


@pytest.mark.parametrize("fragmented", [False, True])
@pytest.mark.parametrize("fin", [True, False])
def test_text_is_1003_in_any_state(fragmented: bool, fin: bool) -> None:
    fa = FrameAssembler(LIMIT)
    if fragmented:
        assert feed(fa, OP_BINARY, b"a", fin=False) == PENDING
    assert feed(fa, OP_TEXT, b"hi", fin=fin) == FAIL
    assert failed(fa, 1003) and fa.close_reason == "binary frames only"


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_reserved_opcodes_are_1002(opcode: int) -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, opcode, b"x") == FAIL
    assert failed(fa, 1002) and fa.close_reason == "reserved opcode"


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame_is_1002(opcode: int) -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, opcode, b"", fin=False) == FAIL
    assert failed(fa, 1002) and fa.close_reason == "fragmented control frame"


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_payload_over_125_bytes_is_1002(opcode: int) -> None:
    fa = FrameAssembler(1 << 20)
    assert feed(fa, opcode, close_body(1000, b"r" * 124)) == FAIL  # 126 bytes
    assert failed(fa, 1002) and fa.close_reason == "control frame too long"


# ------------------------------------------------------------------ ping, pong


def test_ping_is_answered_with_its_payload() -> None:
    fa = FrameAssembler(LIMIT)
    body = bytes(range(125))
    assert feed(fa, OP_PING, body) == REPLY_PONG
    assert fa.pong_payload == body
    assert feed(fa, OP_PING) == REPLY_PONG
    assert fa.pong_payload == b""
    assert not fa.ended


def test_ping_payload_is_owned() -> None:
    fa = FrameAssembler(LIMIT)
    data = bytearray(b"ping")
    assert fa.receive(OP_PING, True, False, memoryview(data), 4) == REPLY_PONG
    data[:] = b"XXXX"  # the shell's read buffer is reused after its callback
    assert fa.pong_payload == b"ping"


def test_pong_needs_nothing() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_PONG, b"unsolicited") == IGNORE
    assert not fa.ended


# ------------------------------------------------------------------ close


def test_close_without_body_is_echoed_as_1000() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_CLOSE) == ECHO_CLOSE
    assert fa.close_code == 1000 and fa.close_reason == "" and fa.ended


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
)
def test_close_with_a_protocol_code_is_echoed(code: int) -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_CLOSE, close_body(code, b"bye \xe2\x9c\x93")) == ECHO_CLOSE
    assert fa.close_code == code and type(fa.close_code) is int


@pytest.mark.parametrize("code", [3000, 3999, 4000, 4006, 4999])
def test_close_with_a_registered_or_private_code_is_echoed(code: int) -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_CLOSE, close_body(code)) == ECHO_CLOSE
    assert fa.close_code == code


@pytest.mark.parametrize(
    "code", [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
def test_close_with_a_code_nobody_may_send_is_1002(code: int) -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_CLOSE, close_body(code)) == FAIL
    assert failed(fa, 1002) and fa.close_reason == "invalid close code"


def test_close_with_a_one_byte_body_is_1002() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_CLOSE, b"\x03") == FAIL
    assert failed(fa, 1002)


def test_close_reason_must_be_utf8() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_CLOSE, close_body(1000, b"\xff\xfe")) == FAIL
    assert failed(fa, 1007) and fa.close_reason == "close reason is not UTF-8"


def test_close_drops_an_open_message() -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_BINARY, b"abc", fin=False) == PENDING
    assert feed(fa, OP_CLOSE, close_body(1001)) == ECHO_CLOSE
    assert fa.buffered == 0 and fa.close_code == 1001


# ------------------------------------------------------------------ the end


@pytest.mark.parametrize(
    "ending",
    [
        (OP_TEXT, b"x"),  # we failed it
        (OP_CLOSE, b""),  # the peer closed
        None,  # the shell closed it (timeout, overflow, shutdown)
    ],
)
def test_every_frame_after_the_end_is_ignored(ending: tuple[int, bytes] | None) -> None:
    fa = FrameAssembler(LIMIT)
    assert feed(fa, OP_BINARY, b"ab", fin=False) == PENDING
    if ending is None:
        fa.close()
    else:
        feed(fa, *ending)
    assert fa.ended and fa.buffered == 0
    code, reason = fa.close_code, fa.close_reason
    for opcode in (OP_BINARY, OP_CONTINUATION, OP_TEXT, OP_PING, OP_PONG, OP_CLOSE, 3):
        assert feed(fa, opcode, b"x") == IGNORE
        assert feed(fa, opcode, b"x", fin=False, rsv=True) == IGNORE
    assert (fa.close_code, fa.close_reason) == (code, reason)  # the first ending stands
    assert bytes(fa.message) == b""


# ------------------------------------------------------------------ properties

PINGS = st.lists(st.binary(max_size=125), max_size=3)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=300)
@given(
    messages=st.lists(
        st.tuples(
            st.binary(max_size=3 * LIMIT),
            st.lists(st.integers(0, 3 * LIMIT), max_size=8),
            st.lists(PINGS, max_size=9),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_split_reassembles_to_the_same_bytes(
    messages: list[tuple[bytes, list[int], list[list[bytes]]]],
) -> None:
    """Every split into fragments, with PINGs and PONGs between them, delivers the
    message unchanged; past the limit it fails 1009 and never buffers more than the
    limit."""
    fa = FrameAssembler(2 * LIMIT)
    for data, cuts, pings in messages:
        parts = _split(data, cuts)
        too_big = len(data) > fa.max_message_bytes
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            verdict = feed(fa, OP_BINARY if i == 0 else OP_CONTINUATION, part, fin=last)
            assert fa.buffered <= fa.max_message_bytes
            if verdict == FAIL:
                assert too_big and failed(fa, 1009)
                return
            if last:
                assert verdict == DELIVER and bytes(fa.message) == data
            else:
                assert verdict == PENDING and fa.buffered == sum(map(len, parts[: i + 1]))
                for ping in pings[i] if i < len(pings) else []:
                    assert feed(fa, OP_PING, ping) == REPLY_PONG
                    assert fa.pong_payload == ping
                    assert feed(fa, OP_PONG, ping) == IGNORE
        assert not too_big


frame_strategy = st.tuples(
    st.sampled_from([0, 0, 0, 1, 2, 2, 2, 2, 3, 8, 9, 9, 10, 10, 11]),
    st.booleans(),
    st.integers(0, 9).map(lambda n: n == 0),  # an RSV bit now and then
    st.integers(0, LIMIT + 8),
)


@settings(max_examples=500)
@given(stream=st.lists(frame_strategy, max_size=30))
def test_invariants_over_any_frame_stream(stream: list[tuple[int, bool, bool, int]]) -> None:
    """Whatever a peer sends: the buffer stays within the limit, a delivered message is
    the data frames since the message opened, and nothing follows the end."""
    fa = FrameAssembler(LIMIT)
    opened: bytearray | None = None
    ended = False
    counter = 0
    for opcode, fin, rsv, size in stream:
        counter += 1
        payload = bytes((counter + i) & 0xFF for i in range(size))
        if opcode == OP_CLOSE and size >= 2:
            payload = close_body(1000, b"r" * (size - 2))
        verdict = feed(fa, opcode, payload, fin=fin, rsv=rsv)
        assert fa.buffered <= LIMIT
        if ended:
            assert verdict == IGNORE
            continue
        if verdict in (FAIL, ECHO_CLOSE):
            ended = True
            assert fa.ended and fa.buffered == 0
            if verdict == FAIL:
                assert fa.close_code in (1002, 1003, 1007, 1009)
            else:
                assert fa.close_code == 1000
            continue
        assert not rsv and opcode != OP_TEXT
        if opcode == OP_BINARY:
            assert opened is None
            opened = bytearray(payload)
        elif opcode == OP_CONTINUATION:
            assert opened is not None
            opened += payload
        else:
            assert opcode in (OP_PING, OP_PONG) and fin and size <= 125
            assert verdict == (REPLY_PONG if opcode == OP_PING else IGNORE)
            continue
        if verdict == DELIVER:
            assert fin and len(opened) <= LIMIT and bytes(fa.message) == opened
            opened = None
        else:
            assert verdict == PENDING and not fin and fa.buffered == len(opened)


# ------------------------------------------------------------------ picows


class Shell(WSListener):
    """The shell the module docstring describes, minus the server around it."""

    def __init__(self, sink: list[object]) -> None:
        super().__init__()
        self.frames = FrameAssembler(LIMIT)
        self.sink = sink

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        fa = self.frames
        verdict = fa.receive(
            frame.msg_type,  # type: ignore[arg-type]  # an IntEnum at run time
            frame.fin,
            frame.rsv1 or frame.rsv2 or frame.rsv3,
            frame.get_payload_as_memoryview(),
            frame.payload_size,
        )
        if verdict == DELIVER:
            self.sink.append(bytes(fa.message))
        elif verdict == REPLY_PONG:
            transport.send_pong(fa.pong_payload)
        elif verdict == FAIL:
            self.sink.append(("fail", fa.close_code))
            transport.send_close(WSCloseCode(fa.close_code), fa.close_reason.encode())
            transport.disconnect()
        elif verdict == ECHO_CLOSE:
            self.sink.append(("echo", fa.close_code))
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode(fa.close_code))
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.frames.close()


class Client(WSListener):
    def __init__(self) -> None:
        super().__init__()
        self.pongs: list[bytes] = []
        self.close_code: Any = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.PONG:
            self.pongs.append(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()


async def _until(check: Any) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


@pytest.mark.parametrize("ending", ["text", "close"])
async def test_drives_a_real_picows_connection(ending: str) -> None:
    sink: list[object] = []
    server = await picows.ws_create_server(
        lambda _request: Shell(sink),
        "127.0.0.1",
        0,
        enable_auto_pong=False,
        max_frame_size=4 * LIMIT,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        transport, client = await picows.ws_connect(Client, f"ws://127.0.0.1:{port}/")
        assert isinstance(client, Client)
        transport.send(WSMsgType.BINARY, b"whole")
        transport.send(WSMsgType.BINARY, b"frag", fin=False)
        transport.send_ping(b"are you there")
        transport.send(WSMsgType.CONTINUATION, b"ment", fin=False)
        transport.send(WSMsgType.CONTINUATION, b"ed")
        await _until(lambda: len(sink) == 2 and client.pongs)
        assert sink == [b"whole", b"fragmented"]
        assert client.pongs == [b"are you there"]
        if ending == "text":
            transport.send(WSMsgType.TEXT, b"hi")
            await transport.wait_disconnected()
            assert sink[2:] == [("fail", 1003)]
            assert client.close_code == WSCloseCode.UNSUPPORTED_DATA
        else:
            transport.send_close(WSCloseCode.GOING_AWAY)
            await transport.wait_disconnected()
            assert sink[2:] == [("echo", 1001)]
            assert client.close_code == WSCloseCode.GOING_AWAY
    finally:
        server.close()
        await server.wait_closed()


# -- the pre-READY fragment limit (SPEC §12.31) -------------------------------------------


def test_fragment_limit_caps_reassembly_but_not_unfragmented_frames() -> None:
    fa = frames.FrameAssembler(1000, fragment_limit=100)
    big = memoryview(b"x" * 500)
    # an unfragmented frame is checked against the message limit only (the dispatcher
    # refuses an oversized Envelope itself)
    assert fa.receive(frames.OP_BINARY, True, False, big, 500) == frames.DELIVER
    assert fa.receive(frames.OP_BINARY, False, False, memoryview(b"y" * 60), 60) == frames.PENDING
    verdict = fa.receive(frames.OP_CONTINUATION, True, False, memoryview(b"z" * 41), 41)
    assert verdict == frames.FAIL and fa.close_code == 1009 and fa.buffered == 0


def test_first_fragment_over_the_limit_fails_before_copying() -> None:
    fa = frames.FrameAssembler(1000, fragment_limit=100)
    verdict = fa.receive(frames.OP_BINARY, False, False, memoryview(b"y" * 101), 101)
    assert verdict == frames.FAIL and fa.close_code == 1009 and fa.buffered == 0


def test_raising_the_fragment_limit_at_ready_never_passes_the_message_limit() -> None:
    fa = frames.FrameAssembler(1000, fragment_limit=100)
    fa.set_fragment_limit(10_000)
    assert fa.fragment_limit == 1000
    assert fa.receive(frames.OP_BINARY, False, False, memoryview(b"y" * 600), 600) == frames.PENDING
    verdict = fa.receive(frames.OP_CONTINUATION, True, False, memoryview(b"z" * 400), 400)
    assert verdict == frames.DELIVER and len(fa.message) == 1000
