"""Fan-out microbenchmarks (SPEC §5): compiled ``sovereign._fast.fanout`` vs its twin.

Run: ``python -m pytest benchmarks/test_bench_fanout.py -q --benchmark-only``.
One 300-byte frame goes to 1,000 connections whose transport is C-level and almost
free (``write`` is a bounded ``deque.append``, ``get_write_buffer_size`` returns 0), so
the figures are the fan-out's own cost: divide the mean by 1,000 for ns per delivery.
Real transports add their ``send()`` on top.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any

import pytest
from tests.helpers.twins import KINDS, load_twin

BENCH = {"min_time": 0.0002, "warmup": True}
MEMBERS = 1_000
LIMIT = 4 * 1_048_576
# A MESSAGE_RECEIVE-sized Envelope: 300 bytes -> a 304-byte frame (16-bit length).
ENVELOPE = bytes(range(256)) + bytes(44)


class _Out:
    """A transport whose methods are C callables: write keeps only the last frame."""

    __slots__ = ("get_write_buffer_size", "last", "write")

    def __init__(self) -> None:
        self.last: collections.deque[bytes] = collections.deque(maxlen=1)
        self.write = self.last.append
        self.get_write_buffer_size = itertools.repeat(0).__next__


class _Conn:
    __slots__ = ("live", "out")

    def __init__(self) -> None:
        self.live = True
        self.out = _Out()

    def overflow(self) -> None:  # never reached: the buffer stays empty
        raise AssertionError("overflow")


@pytest.mark.benchmark(group="ws_frame: 300 B envelope", **BENCH)
@pytest.mark.parametrize("impl", KINDS)
def test_ws_frame(benchmark: Any, impl: str) -> None:
    mod = load_twin("fanout", impl)
    frame = benchmark(mod.ws_frame, ENVELOPE)
    assert frame == b"\x82\x7e\x01\x2c" + ENVELOPE


@pytest.mark.benchmark(group="fanout: 304 B frame to 1,000 users x 1 connection", **BENCH)
@pytest.mark.parametrize("impl", KINDS)
def test_fanout_by_user(benchmark: Any, impl: str) -> None:
    mod = load_twin("fanout", impl)
    frame = mod.ws_frame(ENVELOPE)
    conns = [_Conn() for _ in range(MEMBERS + 1)]
    by_user = {f"user{i:04d}": [c] for i, c in enumerate(conns)}
    user_ids = list(by_user)  # the sender's own connection is excluded
    assert benchmark(mod.fanout, frame, by_user, user_ids, conns[0], LIMIT) == MEMBERS
    assert not conns[0].out.last
    assert all(c.out.last[0] is frame for c in conns[1:])


@pytest.mark.benchmark(group="fanout_conns: 304 B frame to 1,000 connections", **BENCH)
@pytest.mark.parametrize("impl", KINDS)
def test_fanout_conns(benchmark: Any, impl: str) -> None:
    mod = load_twin("fanout", impl)
    frame = mod.ws_frame(ENVELOPE)
    conns = [_Conn() for _ in range(MEMBERS)]
    assert benchmark(mod.fanout_conns, frame, conns, None, LIMIT) == MEMBERS
    assert all(c.out.last[0] is frame for c in conns)


@pytest.mark.benchmark(group="append_ws_frame: backlog of 100 x 300 B envelopes", **BENCH)
@pytest.mark.parametrize("impl", KINDS)
def test_append_backlog(benchmark: Any, impl: str) -> None:
    mod = load_twin("fanout", impl)
    append = mod.append_ws_frame

    def batch() -> bytearray:
        out = bytearray()
        for _ in range(100):
            append(out, ENVELOPE)
        return out

    out = benchmark(batch)
    assert out == (b"\x82\x7e\x01\x2c" + ENVELOPE) * 100
