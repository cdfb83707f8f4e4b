"""Dispatcher and TokenBucket (SPEC §1, §2, §4, §8, §9, §12.7, §12.8), both twins.

Every test runs against ``sovereign._fast.dispatch`` and ``sovereign.protocol.dispatch``.
A missing compiled module fails the run (SOVEREIGN_ALLOW_PURE=1 skips instead).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign.codec import encode_envelope
from sovereign.codec.envelope import encode_envelope as py_encode
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.twins import impl_fixture, impls_fixture

AUTH_REQUEST, AUTH_RESPONSE, MESSAGE_SEND, PING = 1, 3, 20, 60
PRE_AUTH = (1, 3, 6, 8, 60)  # SPEC §12.7
MAX_ENVELOPE = 256


mod = impl_fixture("dispatch")
mods = impls_fixture("dispatch")


class FakeConn:
    def __init__(self) -> None:
        self.rejects: list[tuple[int, str, int]] = []

    def reject(self, code: int, request_id: str, retry_after_ms: int) -> None:
        self.rejects.append((code, request_id, retry_after_ms))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, int, str, memoryview]] = []

    def __call__(self, conn: Any, msg_type: int, request_id: str, payload: memoryview) -> None:
        self.calls.append((conn, msg_type, request_id, payload))


def env(t: int, rid: str = "", payload: bytes = b"") -> bytes:
    return encode_envelope(t, rid, payload)


def make(
    mod: ModuleType, types: tuple[int, ...] = (1, 3, 20, 60), **kw: Any
) -> tuple[Any, Recorder]:
    rec = Recorder()
    kw.setdefault("max_envelope_bytes", MAX_ENVELOPE)
    return mod.Dispatcher({t: rec for t in types}, PRE_AUTH, **kw), rec


def bucket(mod: ModuleType, rate: float = 30.0, burst: int = 10, now: float = 0.0) -> Any:
    return mod.TokenBucket(rate, burst, now)


# ------------------------------------------------------------------ a. size


def test_oversized_ready_is_3003_with_empty_request_id(mod: ModuleType) -> None:
    d, rec = make(mod)
    conn = FakeConn()
    big = env(MESSAGE_SEND, "rid", b"x" * MAX_ENVELOPE)
    assert d.dispatch(conn, bucket(mod), big, True, 0.0) == 3003
    assert conn.rejects == [(3003, "", 0)]
    assert rec.calls == []


def test_oversized_is_checked_before_parsing(mod: ModuleType) -> None:
    d, _ = make(mod)
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), b"\xff" * (MAX_ENVELOPE + 1), True, 0.0) == 3003
    assert conn.rejects == [(3003, "", 0)]


def test_oversized_before_ready_is_1006(mod: ModuleType) -> None:
    d, _ = make(mod)
    conn = FakeConn()
    big = env(AUTH_REQUEST, "rid", b"x" * MAX_ENVELOPE)
    assert d.dispatch(conn, bucket(mod), big, False, 0.0) == 1006
    assert conn.rejects == [(1006, "", 0)]


def test_size_limit_is_inclusive_and_adjustable(mod: ModuleType) -> None:
    d, rec = make(mod)
    exact = env(PING, "r", b"p" * (MAX_ENVELOPE - 8))  # 8 bytes of framing
    assert len(exact) == MAX_ENVELOPE
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), exact, True, 0.0) == 0
    d.set_max_envelope_bytes(MAX_ENVELOPE - 1)
    assert d.max_envelope_bytes == MAX_ENVELOPE - 1
    assert d.dispatch(conn, bucket(mod), exact, True, 0.0) == 3003
    d.set_max_envelope_bytes(MAX_ENVELOPE)
    assert d.dispatch(conn, bucket(mod), exact, True, 0.0) == 0
    assert len(rec.calls) == 2
    with pytest.raises(ValueError):
        d.set_max_envelope_bytes(-1)


def test_size_counts_bytes_of_any_buffer(mod: ModuleType) -> None:
    d, _ = make(mod)
    big = env(PING, "", b"x" * MAX_ENVELOPE)
    for buf in (bytearray(big), memoryview(big)):
        conn = FakeConn()
        assert d.dispatch(conn, bucket(mod), buf, True, 0.0) == 3003


# ------------------------------------------------------------------ b. parse


@pytest.mark.parametrize(
    "data", [b"\x08", b"\x0e", b"\x12\x05ab", b"\x12\x01\xff", b"\x00", b"\x0b\x0c"]
)
def test_unparseable_ready_is_3005_with_empty_request_id(mod: ModuleType, data: bytes) -> None:
    d, rec = make(mod)
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), data, True, 0.0) == 3005
    assert conn.rejects == [(3005, "", 0)]
    assert rec.calls == []


def test_unparseable_before_ready_is_1006(mod: ModuleType) -> None:
    d, _ = make(mod)
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), b"\x12\x05ab", False, 0.0) == 1006
    assert conn.rejects == [(1006, "", 0)]


def test_request_id_too_long_is_3005(mod: ModuleType) -> None:
    d, rec = make(mod)
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), env(PING, "a" * 64), True, 0.0) == 0
    assert d.dispatch(conn, bucket(mod), env(PING, "a" * 65), True, 0.0) == 3005
    assert d.dispatch(conn, bucket(mod), env(PING, "a" * 65), False, 0.0) == 1006
    assert conn.rejects == [(3005, "", 0), (1006, "", 0)]  # SPEC §12.8: empty request_id
    assert len(rec.calls) == 1


def test_request_id_limit_is_configurable(mod: ModuleType) -> None:
    d, _ = make(mod, max_request_id_bytes=4)
    assert d.max_request_id_bytes == 4
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), env(PING, "abcd"), True, 0.0) == 0
    assert d.dispatch(conn, bucket(mod), env(PING, "abcde"), True, 0.0) == 3005


# ------------------------------------------------------------------ c. pre-auth gate


def test_before_ready_only_pre_auth_types(mod: ModuleType) -> None:
    d, rec = make(mod)
    conn = FakeConn()
    b = bucket(mod)
    assert d.dispatch(conn, b, env(MESSAGE_SEND, "m1", b"x"), False, 0.0) == 1006
    assert conn.rejects == [(1006, "m1", 0)]  # echoes the request_id
    assert d.dispatch(conn, b, env(AUTH_REQUEST, "a1", b"u"), False, 0.0) == 0
    assert d.dispatch(conn, b, env(PING, "p1"), False, 0.0) == 0
    assert [(c[1], c[2]) for c in rec.calls] == [(AUTH_REQUEST, "a1"), (PING, "p1")]
    assert d.dispatch(conn, b, env(MESSAGE_SEND, "m2", b"x"), True, 0.0) == 0


@pytest.mark.parametrize("t", [0, 21, 127, 128, 1000, -1, 2**31 - 1, -(2**31)])
def test_unknown_type_before_ready_is_1006_not_3002(mod: ModuleType, t: int) -> None:
    d, _ = make(mod)
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), env(t, "r"), False, 0.0) == 1006
    assert conn.rejects == [(1006, "r", 0)]


def test_pre_auth_type_without_handler_is_3002(mod: ModuleType) -> None:
    d, _ = make(mod, types=(60,))
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), env(AUTH_RESPONSE, "r"), False, 0.0) == 3002
    assert conn.rejects == [(3002, "r", 0)]


def test_rejections_before_the_rate_limit_consume_no_token(mod: ModuleType) -> None:
    d, _ = make(mod)
    conn = FakeConn()
    b = bucket(mod, rate=1.0, burst=1)
    d.dispatch(conn, b, b"\xff" * (MAX_ENVELOPE + 1), True, 0.0)  # 3003
    d.dispatch(conn, b, b"\x08", True, 0.0)  # 3005
    d.dispatch(conn, b, env(MESSAGE_SEND), False, 0.0)  # 1006
    assert [r[0] for r in conn.rejects] == [3003, 3005, 1006]
    assert d.dispatch(conn, b, env(PING), True, 0.0) == 0  # the token is still there


# ------------------------------------------------------------------ d. rate limit


def test_rate_limit_after_burst_then_recovery(mod: ModuleType) -> None:
    d, rec = make(mod)
    conn = FakeConn()
    b = bucket(mod, rate=2.0, burst=3, now=100.0)
    for i in range(3):
        assert d.dispatch(conn, b, env(PING, f"p{i}"), True, 100.0) == 0
    assert d.dispatch(conn, b, env(PING, "p3"), True, 100.0) == 3004
    assert d.dispatch(conn, b, env(PING, "p4"), True, 100.25) == 3004
    assert conn.rejects == [(3004, "p3", 500), (3004, "p4", 250)]
    assert len(rec.calls) == 3
    assert d.dispatch(conn, b, env(PING, "p5"), True, 100.5) == 0
    assert rec.calls[-1][2] == "p5"
    # a long pause refills only up to the burst
    for i in range(3):
        assert d.dispatch(conn, b, env(PING, f"q{i}"), True, 1000.0) == 0
    assert d.dispatch(conn, b, env(PING, "q3"), True, 1000.0) == 3004


def test_rate_limit_applies_before_ready_and_before_unknown_type(mod: ModuleType) -> None:
    d, _ = make(mod)
    conn = FakeConn()
    b = bucket(mod, rate=1.0, burst=1)
    assert d.dispatch(conn, b, env(21, "u1"), True, 0.0) == 3002  # consumed the token
    assert d.dispatch(conn, b, env(21, "u2"), True, 0.0) == 3004
    assert d.dispatch(conn, b, env(PING, "p"), False, 0.5) == 3004
    assert conn.rejects == [(3002, "u1", 0), (3004, "u2", 1000), (3004, "p", 500)]


# ------------------------------------------------------------------ e. unknown type


@pytest.mark.parametrize("t", [0, 21, 62, 127, 128, 1000, -1, 2**31 - 1, -(2**31)])
def test_unknown_type_is_3002(mod: ModuleType, t: int) -> None:
    d, rec = make(mod)
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), env(t, "r", b"x"), True, 0.0) == 3002
    assert conn.rejects == [(3002, "r", 0)]
    assert rec.calls == []


def test_none_handler_counts_as_missing(mod: ModuleType) -> None:
    d = mod.Dispatcher({60: None}, PRE_AUTH, MAX_ENVELOPE)
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), env(PING), True, 0.0) == 3002


def test_handler_at_type_127_and_0(mod: ModuleType) -> None:
    d, rec = make(mod, types=(0, 127))
    conn = FakeConn()
    assert d.dispatch(conn, bucket(mod), env(127, "a"), True, 0.0) == 0
    assert d.dispatch(conn, bucket(mod), b"", True, 0.0) == 0  # empty envelope = type 0
    assert [(c[1], c[2]) for c in rec.calls] == [(127, "a"), (0, "")]


# ------------------------------------------------------------------ f. handler


def test_handler_gets_conn_type_request_id_and_zero_copy_payload(mod: ModuleType) -> None:
    d, rec = make(mod)
    conn = FakeConn()
    buf = bytearray(env(MESSAGE_SEND, "req-1", b"ciphertext"))
    assert d.dispatch(conn, bucket(mod), buf, True, 0.0) == 0
    assert conn.rejects == []
    ((c, t, rid, payload),) = rec.calls
    assert c is conn and t == MESSAGE_SEND and rid == "req-1"
    assert type(payload) is memoryview and payload.obj is buf
    buf[-1] = ord("X")
    assert bytes(payload) == b"ciphertexX"  # a view into the received buffer
    rec.calls.clear()
    del c, payload
    buf.append(0)  # the dispatcher left no buffer export behind


def test_handler_payload_from_bytes_and_memoryview(mod: ModuleType) -> None:
    d, rec = make(mod)
    wire = env(PING, "", b"\x08\x2a")
    d.dispatch(FakeConn(), bucket(mod), wire, True, 0.0)
    mv = memoryview(wire)
    d.dispatch(FakeConn(), bucket(mod), mv, True, 0.0)
    assert rec.calls[0][3].obj is wire and rec.calls[1][3].obj is wire
    assert [bytes(c[3]) for c in rec.calls] == [b"\x08\x2a", b"\x08\x2a"]
    assert pb.Ping.FromString(bytes(rec.calls[0][3])).timestamp == 42


def test_handler_return_value_is_ignored(mod: ModuleType) -> None:
    d = mod.Dispatcher({60: lambda *a: 3002}, PRE_AUTH, MAX_ENVELOPE)
    assert d.dispatch(FakeConn(), bucket(mod), env(PING), True, 0.0) == 0


def test_handler_exceptions_propagate(mod: ModuleType) -> None:
    def boom(conn: Any, t: int, rid: str, payload: memoryview) -> None:
        raise RuntimeError("boom")

    d = mod.Dispatcher({60: boom}, PRE_AUTH, MAX_ENVELOPE)
    conn = FakeConn()
    with pytest.raises(RuntimeError, match="boom"):
        d.dispatch(conn, bucket(mod), bytearray(env(PING, "r")), True, 0.0)
    assert conn.rejects == []


def test_reject_exceptions_propagate(mod: ModuleType) -> None:
    class Broken:
        def reject(self, code: int, request_id: str, retry_after_ms: int) -> None:
            raise ConnectionError(code)

    d, _ = make(mod)
    buf = bytearray(b"\x08")
    with pytest.raises(ConnectionError):
        d.dispatch(Broken(), bucket(mod), buf, True, 0.0)
    buf.append(0)  # buffer released on the error path too


def test_constructor_validation(mod: ModuleType) -> None:
    rec = Recorder()
    for bad in (128, -1, 1000):
        with pytest.raises(ValueError):
            mod.Dispatcher({bad: rec}, (), MAX_ENVELOPE)
        with pytest.raises(ValueError):
            mod.Dispatcher({}, (bad,), MAX_ENVELOPE)
    with pytest.raises(TypeError):
        mod.Dispatcher({"60": rec}, (), MAX_ENVELOPE)
    with pytest.raises(ValueError):
        mod.Dispatcher({}, (), -1)
    with pytest.raises(ValueError):
        mod.Dispatcher({}, (), 10, -1)
    assert mod.MAX_TYPES == 128


def test_dispatch_argument_errors(mod: ModuleType) -> None:
    d, _ = make(mod)
    with pytest.raises(TypeError):
        d.dispatch(FakeConn(), bucket(mod), "text", True, 0.0)
    with pytest.raises(BufferError):
        d.dispatch(FakeConn(), bucket(mod), memoryview(b"\x08\x01\x08\x01")[::2], True, 0.0)


# ------------------------------------------------------------------ TokenBucket


def test_bucket_starts_full_and_refills_continuously(mod: ModuleType) -> None:
    b = mod.TokenBucket(4.0, 2, 10.0)
    assert (b.rate_per_s, b.burst, b.tokens) == (4.0, 2, 2.0)
    assert b.take(10.0) == 0
    assert b.take(10.0) == 0
    assert b.take(10.0) == 250  # ceil(1 / 4 s) = 250 ms
    assert b.take(10.125) == 125  # half a token is there
    assert b.tokens == 0.5
    assert b.take(10.25) == 0
    assert b.tokens == 0.0


def test_bucket_caps_at_burst(mod: ModuleType) -> None:
    b = mod.TokenBucket(30.0, 10, 0.0)
    for _ in range(10):
        assert b.take(0.0) == 0
    assert b.take(0.0) == 34  # ceil(1000 / 30)
    assert b.take(3600.0) == 0
    assert b.tokens == 9.0


def test_bucket_retry_is_at_least_1ms_and_capped(mod: ModuleType) -> None:
    b = mod.TokenBucket(1000.0, 1, 0.0)
    assert b.take(0.0) == 0
    assert b.take(0.0009995) == 1  # 0.9995 tokens: 0.0005 ms to go → 1
    slow = mod.TokenBucket(1e-9, 1, 0.0)
    assert slow.take(0.0) == 0
    assert slow.take(0.0) == 2**32 - 1  # Error.retry_after_ms is uint32


def test_bucket_clock_going_backwards_refills_nothing(mod: ModuleType) -> None:
    b = mod.TokenBucket(1.0, 1, 100.0)
    assert b.take(100.0) == 0
    assert b.take(50.0) == 1000
    assert b.take(100.5) == 500  # measured from the latest time seen (100.0)
    assert b.take(float("nan")) == 500


def test_bucket_reconfigure(mod: ModuleType) -> None:
    b = mod.TokenBucket(10.0, 10, 0.0)
    b.reconfigure(2.0, 3)  # tokens clamp to the new burst
    assert (b.rate_per_s, b.burst, b.tokens) == (2.0, 3, 3.0)
    for _ in range(3):
        assert b.take(0.0) == 0
    assert b.take(0.0) == 500
    b.reconfigure(4.0, 20)  # a larger burst does not add tokens
    assert b.tokens == 0.0
    assert b.take(0.0) == 250


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("inf"), 1), (float("nan"), 1), (1.0, 0)]
)
def test_bucket_validation(mod: ModuleType, rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        mod.TokenBucket(rate, burst, 0.0)
    b = mod.TokenBucket(1.0, 1, 0.0)
    with pytest.raises(ValueError):
        b.reconfigure(rate, burst)
    with pytest.raises(TypeError):
        mod.TokenBucket(1.0, 1.5, 0.0)


def test_python_bucket_is_slotted() -> None:
    from sovereign.protocol.dispatch import TokenBucket

    assert not hasattr(TokenBucket(1.0, 1, 0.0), "__dict__")


# ------------------------------------------------------------------ parity properties

# Dyadic steps and rates keep every refill exact, so the twins must agree bit for bit.
steps = st.integers(0, 4096).map(lambda k: k / 64)
rates = st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 32.0, 1024.0])


@settings(max_examples=200)
@given(
    rate=rates,
    burst=st.integers(1, 20),
    ops=st.lists(st.tuples(steps, st.booleans(), st.integers(1, 20)), max_size=60),
)
def test_bucket_twins_agree(
    mods: list[ModuleType], rate: float, burst: int, ops: list[tuple[float, bool, int]]
) -> None:
    buckets = [m.TokenBucket(rate, burst, 0.0) for m in mods]
    now = 0.0
    for dt, back, new_burst in ops:
        now = now - dt if back and dt < 1 else now + dt
        results = {(b.take(now), b.tokens) for b in buckets}
        assert len(results) == 1, results
        if new_burst == 20:
            for b in buckets:
                b.reconfigure(rate * 2, burst)
        (retry, tokens) = results.pop()
        assert retry >= 0 and 0.0 <= tokens <= burst


envelopes = st.one_of(
    st.binary(max_size=40),
    st.builds(
        py_encode,
        st.one_of(st.sampled_from([0, 1, 3, 6, 20, 21, 60, 127, 128]), st.integers(-5, 200)),
        st.text(max_size=70),
        st.binary(max_size=60),
    ),
)


@settings(max_examples=300)
@given(
    frames=st.lists(st.tuples(envelopes, st.booleans(), steps), max_size=25),
    max_env=st.sampled_from([16, 64, 256]),
)
def test_dispatcher_twins_agree(
    mods: list[ModuleType], frames: list[tuple[bytes, bool, float]], max_env: int
) -> None:
    logs = []
    for m in mods:
        rec = Recorder()
        d = m.Dispatcher({t: rec for t in (0, 1, 20, 60, 127)}, PRE_AUTH, max_env, 32)
        conn = FakeConn()
        b = m.TokenBucket(8.0, 3, 0.0)
        codes, now = [], 0.0
        for data, ready, dt in frames:
            now += dt
            codes.append(d.dispatch(conn, b, data, ready, now))
        calls = [(c is conn, t, rid, bytes(p)) for c, t, rid, p in rec.calls]
        logs.append((codes, conn.rejects, calls))
    assert all(log == logs[0] for log in logs[1:])
