"""Envelope codec and dispatch microbenchmarks: compiled vs pure-Python twin vs protobuf.

Run: ``python -m pytest benchmarks -q --benchmark-only``. Groups put the rivals of one
operation side by side; each benchmark checks its own result.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.helpers.twins import KINDS, load_twin

from sovereign.v1 import sovereign_pb2 as pb

# A typical MESSAGE_SEND: UUID request_id (36 bytes), 200-byte payload.
MESSAGE_SEND, PING = 20, 60
RID = "3f2a1c9e-8b7d-4e6f-a5b4-c3d2e1f0a9b8"
PAYLOAD = bytes(range(200))


def _pb_encode(t: int, rid: str, payload: bytes) -> bytes:
    return pb.Envelope(type=t, request_id=rid, payload=payload).SerializeToString()  # type: ignore[arg-type]


WIRE = _pb_encode(MESSAGE_SEND, RID, PAYLOAD)
# A PING: same request_id, Ping{timestamp} payload.
PING_PAYLOAD = pb.Ping(timestamp=1_760_000_000_000).SerializeToString()
PING_WIRE = _pb_encode(PING, RID, PING_PAYLOAD)

# Rounds of >= 200 us (many iterations each) so timer overhead does not blur ~100 ns ops.
BENCH = {"min_time": 0.0002, "warmup": True}


def _pb_decode(data: bytes) -> tuple[int, str, bytes]:
    e = pb.Envelope.FromString(data)
    return e.type, e.request_id, e.payload


@pytest.mark.benchmark(
    group="envelope decode: MESSAGE_SEND, 36 B request_id, 200 B payload", **BENCH
)
@pytest.mark.parametrize("impl", [*KINDS, "protobuf"])
def test_decode(benchmark: Any, impl: str) -> None:
    decode = _pb_decode if impl == "protobuf" else load_twin("envelope", impl).decode_envelope
    t, rid, payload = benchmark(decode, WIRE)
    assert (t, rid, bytes(payload)) == (MESSAGE_SEND, RID, PAYLOAD)


@pytest.mark.benchmark(
    group="envelope encode: MESSAGE_SEND, 36 B request_id, 200 B payload", **BENCH
)
@pytest.mark.parametrize("impl", [*KINDS, "protobuf"])
def test_encode(benchmark: Any, impl: str) -> None:
    encode = _pb_encode if impl == "protobuf" else load_twin("envelope", impl).encode_envelope
    assert benchmark(encode, MESSAGE_SEND, RID, PAYLOAD) == WIRE


class _Conn:
    __slots__ = ("rejects",)

    def __init__(self) -> None:
        self.rejects = 0

    def reject(self, code: int, request_id: str, retry_after_ms: int) -> None:
        self.rejects += 1


@pytest.mark.benchmark(
    group="dispatch: PING envelope to a no-op handler (ready, under limit)", **BENCH
)
@pytest.mark.parametrize("impl", KINDS)
def test_dispatch(benchmark: Any, impl: str) -> None:
    mod = load_twin("dispatch", impl)
    seen: list[tuple[int, str, int]] = []

    def on_ping(conn: Any, t: int, rid: str, payload: memoryview) -> None:
        if not seen:
            seen.append((t, rid, len(payload)))

    dispatcher = mod.Dispatcher({PING: on_ping}, (1, 3, 6, 8, PING), 65_536)
    bucket = mod.TokenBucket(30.0, 2**31 - 1, 0.0)  # never runs dry during the run
    conn = _Conn()
    assert benchmark(dispatcher.dispatch, conn, bucket, PING_WIRE, True, 0.0) == 0
    assert conn.rejects == 0
    assert seen == [(PING, RID, len(PING_PAYLOAD))]
