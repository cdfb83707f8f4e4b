"""RFC 6455 frame handling: ``protocol.frames.FrameAssembler`` vs the inline rules that
``transport.ws.Connection.on_ws_frame`` had before it (copied below as the reference).

Run: ``python -m pytest benchmarks/test_bench_frames.py -q --benchmark-only``. Each
case calls a listener's ``on_ws_frame`` with real picows ``WSFrame`` objects (built by
picows's own test helper), so the frame attribute reads are priced in; the dispatcher
is a no-op that counts. Each benchmark checks what was delivered.
"""

from __future__ import annotations

import itertools
from typing import Any

import picows
import pytest
from picows import WSMsgType

from sovereign.errors import CloseCode
from sovereign.protocol import frames

BENCH = {"min_time": 0.0002, "warmup": True}
LIMIT = 1_048_576
PAYLOAD = bytes(range(200))  # a typical MESSAGE_SEND envelope
_make_frame: Any = getattr(picows.picows, "_make_test_ws_frame", None)

_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION


class _State:
    __slots__ = ("closed", "last_received")

    def __init__(self) -> None:
        self.closed = False
        self.last_received = 0.0


class _App:
    __slots__ = ("clock", "delivered")

    def __init__(self) -> None:
        self.clock = itertools.repeat(1.0).__next__  # a C callable, like time.monotonic
        self.delivered: list[bytes] = []

    def dispatch(self, conn: object, buf: memoryview, now: float) -> None:
        if len(self.delivered) < 2:
            self.delivered.append(bytes(buf))


class InlineShell:
    """``Connection.on_ws_frame`` as it was at 78e4a03 (rules inline)."""

    __slots__ = ("app", "closes", "frag", "state")

    def __init__(self) -> None:
        self.app = _App()
        self.state = _State()
        self.frag: bytearray | None = None
        self.closes: list[int] = []

    def close(self, code: int, reason: str = "") -> None:
        self.closes.append(code)

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        state = self.state
        if state.closed:
            return
        now = self.app.clock()
        state.last_received = now
        mt = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self.close(1002, "reserved bits set")
            return
        if mt is _BINARY:
            if self.frag is not None:
                self.close(1002, "expected continuation frame")
                return
            if frame.fin:
                self.app.dispatch(self, frame.get_payload_as_memoryview(), now)
            else:
                self.frag = bytearray(frame.get_payload_as_memoryview())
            return
        if mt is _CONTINUATION:
            frag = self.frag
            if frag is None:
                self.close(1002, "continuation without a message")
                return
            if len(frag) + frame.payload_size > LIMIT:
                self.frag = None
                self.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
                return
            frag += frame.get_payload_as_memoryview()
            if frame.fin:
                self.frag = None
                self.app.dispatch(self, memoryview(frag), now)
            return
        # TEXT, PING, CLOSE, PONG: not measured here


class AssemblerShell:
    """The shell from ``protocol.frames``'s docstring."""

    __slots__ = ("app", "closes", "frames", "state")

    def __init__(self) -> None:
        self.app = _App()
        self.state = _State()
        self.frames = frames.FrameAssembler(LIMIT)
        self.closes: list[int] = []

    def close(self, code: int, reason: str = "") -> None:
        self.closes.append(code)

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        state = self.state
        if state.closed:
            return
        now = self.app.clock()
        state.last_received = now
        fa = self.frames
        verdict = fa.receive(
            frame.msg_type,
            frame.fin,
            frame.rsv1 or frame.rsv2 or frame.rsv3,
            frame.get_payload_as_memoryview(),
            frame.payload_size,
        )
        if verdict == frames.DELIVER:
            self.app.dispatch(self, fa.message, now)
        elif verdict == frames.FAIL:
            self.close(fa.close_code, fa.close_reason)
        # REPLY_PONG, ECHO_CLOSE: not measured here


SHELLS = {"inline": InlineShell, "assembler": AssemblerShell}


@pytest.fixture(autouse=True)
def _need_test_frames() -> None:
    if _make_frame is None:
        pytest.skip("this picows has no _make_test_ws_frame")


@pytest.mark.benchmark(group="on_ws_frame: one unfragmented 200 B binary frame", **BENCH)
@pytest.mark.parametrize("shell", list(SHELLS))
def test_unfragmented(benchmark: Any, shell: str) -> None:
    conn = SHELLS[shell]()
    frame = _make_frame(_BINARY, PAYLOAD, True, False)
    benchmark(conn.on_ws_frame, None, frame)
    assert conn.app.delivered and all(d == PAYLOAD for d in conn.app.delivered)
    assert conn.closes == []


@pytest.mark.benchmark(group="on_ws_frame: a 200 B message in 3 fragments", **BENCH)
@pytest.mark.parametrize("shell", list(SHELLS))
def test_three_fragments(benchmark: Any, shell: str) -> None:
    conn = SHELLS[shell]()
    parts = (PAYLOAD[:80], PAYLOAD[80:160], PAYLOAD[160:])
    fs = (
        _make_frame(_BINARY, parts[0], False, False),
        _make_frame(_CONTINUATION, parts[1], False, False),
        _make_frame(_CONTINUATION, parts[2], True, False),
    )
    on_ws_frame = conn.on_ws_frame

    def message() -> None:
        for f in fs:
            on_ws_frame(None, f)

    benchmark(message)
    assert conn.app.delivered and all(d == PAYLOAD for d in conn.app.delivered)
    assert conn.closes == []
