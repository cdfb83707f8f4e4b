"""The fuzz target (tests/fuzz/fuzz_protocol.py) as hypothesis properties: the frame
rules keep their bounds, the compiled and pure codecs and dispatchers agree, the MLS
reader refuses with ValueError only. ``make fuzz`` runs the same target under atheris."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import fuzz_protocol as target


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_any_input_is_refused_cleanly(data: bytes) -> None:
    target.one_input(data)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB]),
            st.booleans(),
            st.booleans(),
            st.binary(max_size=600),
        ),
        max_size=12,
    )
)
def test_frame_sequences_keep_the_bounds(seq: list[tuple[int, bool, bool, bytes]]) -> None:
    data = bytearray()
    for opcode, fin, rsv, payload in seq:
        payload = payload[: (len(payload) // 24) * 24]
        data += bytes([opcode | (0x80 if fin else 0) | (0x10 if rsv else 0), len(payload) // 24])
        data += payload
    target.fuzz_frames(bytes(data))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=70),
    st.text(max_size=80),
    st.binary(max_size=300),
    st.booleans(),
)
def test_well_formed_envelopes_dispatch_alike(
    msg_type: int, rid: str, payload: bytes, ready: bool
) -> None:
    from sovereign.v1 import sovereign_pb2 as pb

    env = pb.Envelope(type=msg_type, request_id=rid, payload=payload).SerializeToString()
    target.fuzz_envelope(env)
    target.fuzz_dispatch(bytes([1 if ready else 0]) + env)


def test_close_frames_with_unsendable_codes_fail_1002() -> None:
    for code in (0, 1005, 1006, 5000, 65535):
        data = bytes([0x88, 1]) + struct.pack(">H", code) + b"\x00" * 22
        target.fuzz_frames(data)  # the target asserts every close code it sees is sendable
