"""The protocol core without sockets: state machine, timers, upgrade policy, types."""

from __future__ import annotations

import pytest

from sovereign.errors import AUTH_ERROR_CODES, REGISTRY, CloseCode, ErrorCode, SovereignError
from sovereign.protocol import upgrade
from sovereign.protocol.connection import ConnectionState, InvalidTransition, Phase, Timeouts
from sovereign.protocol.types import PRE_AUTH_TYPES, MessageType
from sovereign.v1 import sovereign_pb2 as pb

LIMITS = Timeouts(auth_timeout=10.0, idle_timeout=90.0, max_auth_failures=5)


def test_message_type_numbers_match_generated_proto() -> None:
    generated = {v.name: v.number for v in pb.MessageType.DESCRIPTOR.values}
    ours = {
        ("MESSAGE_TYPE_UNSPECIFIED" if m.name == "UNSPECIFIED" else m.name): m.value
        for m in MessageType
    }
    assert ours == generated


def test_pre_auth_types_are_exactly_spec_12_7() -> None:
    assert {t.name for t in PRE_AUTH_TYPES} == {
        "AUTH_REQUEST",
        "AUTH_RESPONSE",
        "AUTH_REGISTER_REQUEST",
        "AUTH_REGISTER_RESPONSE",
        "PING",
    }


def test_error_registry_covers_spec_section_8() -> None:
    fatal = {c for c, i in REGISTRY.items() if i.fatal}
    assert fatal == {1002, 1005, 1006, 2004, 9003}
    assert set(REGISTRY) == {int(c) for c in ErrorCode}
    assert set(REGISTRY) >= AUTH_ERROR_CODES
    with pytest.raises(ValueError):
        SovereignError(1234)
    err = SovereignError(3004, retry_after_ms=120)
    assert (err.code, err.name, err.fatal, err.retry_after_ms) == (3004, "RateLimited", False, 120)


def test_close_codes_match_spec() -> None:
    assert [int(c) for c in CloseCode] == [
        1000,
        1001,
        1003,
        1009,
        1011,
        1013,
        4001,
        4002,
        4003,
        4004,
        4005,
        4006,
        4007,
        4008,
    ]


def test_lifecycle_transitions() -> None:
    s = ConnectionState()
    assert s.phase is Phase.CONNECTING
    with pytest.raises(InvalidTransition):
        s.authenticated()  # cannot skip AUTHENTICATING
    s.upgraded(100.0)
    assert s.phase is Phase.AUTHENTICATING and not s.ready
    s.authenticated()
    assert s.ready
    with pytest.raises(InvalidTransition):
        s.upgraded(101.0)
    assert s.closing(4006) is True
    assert s.closed and s.close_code == 4006
    assert s.closing(4008) is False  # CLOSED is terminal; first code wins
    assert s.close_code == 4006


def test_auth_timeout_counts_from_upgrade_and_frames_do_not_extend_it() -> None:
    s = ConnectionState()
    s.upgraded(0.0)
    s.frame_received(9.0)  # e.g. a PING (SPEC §12.7)
    assert s.expired(9.99, LIMITS) is None
    assert s.expired(10.0, LIMITS) == CloseCode.AUTH_TIMEOUT


def test_ready_connection_has_no_auth_deadline_but_idles_out() -> None:
    s = ConnectionState()
    s.upgraded(0.0)
    s.authenticated()
    assert s.expired(50.0, LIMITS) is None
    s.frame_received(50.0)
    assert s.expired(139.9, LIMITS) is None
    assert s.expired(140.0, LIMITS) == CloseCode.IDLE_TIMEOUT


def test_idle_applies_before_ready_when_shorter_than_auth_timeout() -> None:
    limits = Timeouts(auth_timeout=10.0, idle_timeout=3.0, max_auth_failures=5)
    s = ConnectionState()
    s.upgraded(0.0)
    assert s.expired(3.0, limits) == CloseCode.IDLE_TIMEOUT


def test_closed_connection_owes_nothing() -> None:
    s = ConnectionState()
    s.upgraded(0.0)
    s.closing(1000)
    assert s.expired(1000.0, LIMITS) is None


def test_five_failures_are_non_fatal_the_sixth_is_fatal() -> None:
    s = ConnectionState()
    s.upgraded(0.0)
    assert [s.auth_failed(LIMITS) for _ in range(6)] == [False] * 5 + [True]


def _decide(**kw: object) -> upgrade.UpgradeDecision:
    args: dict[str, object] = {
        "method": "GET",
        "path": "/ws",
        "origin": None,
        "offered_subprotocols": [],
        "allowed_origins": {"https://chat.example"},
        "active_connections": 0,
        "max_connections": 10,
    }
    args.update(kw)
    return upgrade.decide(**args)  # type: ignore[arg-type]


def test_upgrade_accepts_native_client_without_subprotocol() -> None:
    d = _decide()
    assert (d.status, d.subprotocol) == (101, None)


def test_upgrade_negotiates_subprotocol() -> None:
    d = _decide(offered_subprotocols=["chat", "sovereign.v1"])
    assert (d.status, d.subprotocol) == (101, "sovereign.v1")


def test_upgrade_refuses_foreign_subprotocols_with_400() -> None:
    assert _decide(offered_subprotocols=["chat"]).status == 400


def test_upgrade_origin_allow_list() -> None:
    assert _decide(origin="https://chat.example").status == 101
    assert _decide(origin="https://evil.example").status == 403
    assert _decide(origin="null").status == 403


def test_upgrade_global_cap_and_shutdown_answer_503() -> None:
    assert _decide(active_connections=10).status == 503
    assert _decide(active_connections=9).status == 101
    assert _decide(accepting=False).status == 503


def test_upgrade_routes() -> None:
    assert _decide(path="/healthz").status == 200
    assert _decide(path="/ws?x=1").status == 101
    assert _decide(path="/admin").status == 404
    assert _decide(method="POST").status == 405


def test_parse_subprotocols_handles_lists_and_repeats() -> None:
    assert upgrade.parse_subprotocols(["a, b", "sovereign.v1"]) == ["a", "b", "sovereign.v1"]
    assert upgrade.parse_subprotocols([]) == []


def test_ping_after_ping_interval_then_4008_after_ping_timeout() -> None:
    """SPEC §12.31: one ping per quiet spell; silence ping_timeout after it closes 4008;
    any frame in between (a pong) starts over."""
    limits = Timeouts(
        auth_timeout=10.0,
        idle_timeout=90.0,
        max_auth_failures=5,
        ping_interval=30.0,
        ping_timeout=15.0,
    )
    s = ConnectionState()
    s.upgraded(0.0)
    s.authenticated()
    assert not s.ping_due(29.9, limits)
    assert s.ping_due(30.0, limits)
    assert not s.ping_due(31.0, limits)  # already pinged, waiting
    assert s.expired(44.9, limits) is None
    assert s.expired(45.0, limits) == CloseCode.IDLE_TIMEOUT  # dead peer: gone at 45 s
    s.frame_received(40.0)  # the pong came in time
    assert s.expired(45.0, limits) is None
    assert not s.ping_due(69.9, limits) and s.ping_due(70.0, limits)
