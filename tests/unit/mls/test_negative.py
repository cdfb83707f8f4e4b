"""Malformed input: only MLSDecodeError, never another exception, never a wrong accept."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sovereign import mls
from sovereign.mls import structs as s
from sovereign.mls import wire
from sovereign.mls.wire import MLSDecodeError, Reader, encode_varint

from .test_vectors import BARE_TYPES
from .vectors import BARE_FIELDS, MLS_MESSAGE_FIELDS, messages

FIELDS = MLS_MESSAGE_FIELDS + BARE_FIELDS
PARSERS: dict[str, Callable[[bytes], Any]] = {
    "parse_mls_message": mls.parse_mls_message,
    "parse_key_package": mls.parse_key_package,
    "parse_commit_message": mls.parse_commit_message,
    "parse_welcome_message": mls.parse_welcome_message,
    "parse_group_info_message": mls.parse_group_info_message,
    **{name: cls.decode for name, cls in BARE_TYPES.items()},
    "KeyPackage": s.KeyPackage.decode,
    "LeafNode": s.LeafNode.decode,
    "GroupInfo": s.GroupInfo.decode,
    "Welcome": s.Welcome.decode,
    "PublicMessage": s.PublicMessage.decode,
    "PrivateMessage": s.PrivateMessage.decode,
    "Proposal": s.Proposal.decode,
}
HYPO = settings(
    max_examples=int(os.environ.get("SOVEREIGN_MLS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def decoder(field: str) -> Callable[[bytes], Any]:
    return s.MLSMessage.decode if field in MLS_MESSAGE_FIELDS else BARE_TYPES[field].decode


def only_decode_error(fn: Callable[[bytes], Any], data: bytes) -> Any:
    """Run a parser; any exception other than MLSDecodeError fails the test."""
    try:
        return fn(data)
    except MLSDecodeError as exc:
        assert exc.reason and exc.field
        return None


# --- random input ----------------------------------------------------------------------


@HYPO
@given(st.sampled_from(sorted(PARSERS)), st.binary(max_size=600))
def test_random_bytes(parser: str, data: bytes) -> None:
    only_decode_error(PARSERS[parser], data)


@HYPO
@given(
    st.sampled_from(sorted(PARSERS)),
    st.sampled_from([b"\x00\x01\x00\x01", b"\x00\x01\x00\x02", b"\x00\x01\x00\x03"])
    | st.sampled_from([b"\x00\x01\x00\x04", b"\x00\x01\x00\x05", b"\x00\x01"]),
    st.binary(max_size=400),
)
def test_random_bytes_behind_a_valid_header(parser: str, header: bytes, data: bytes) -> None:
    """Random bodies behind plausible MLSMessage headers get past the first checks."""
    only_decode_error(PARSERS[parser], header + data)


def test_large_garbage_is_rejected_quickly() -> None:
    junk = bytes(range(256)) * 4096  # 1 MiB
    for parser in PARSERS.values():
        assert only_decode_error(parser, junk) is None
    with pytest.raises(MLSDecodeError):
        mls.parse_key_package(b"")


# --- truncation, extension, mutation of valid vectors ----------------------------------


@pytest.mark.parametrize("field", FIELDS)
def test_every_truncation_fails(field: str) -> None:
    """Every proper prefix of the first entries' structures is rejected."""
    decode = decoder(field)
    for entry in messages()[:2]:
        data = entry[field]
        for n in range(len(data)):
            with pytest.raises(MLSDecodeError):
                decode(data[:n])


@HYPO
@given(st.data())
def test_truncations_and_trailing_bytes(data: st.DataObject) -> None:
    entry = data.draw(st.sampled_from(messages()))
    field = data.draw(st.sampled_from(FIELDS))
    raw = entry[field]
    n = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(MLSDecodeError):
        decoder(field)(raw[:n])
    extra = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(MLSDecodeError) as exc:
        decoder(field)(raw + extra)
    assert exc.value.reason == wire.TRAILING


@HYPO
@given(st.data())
def test_single_byte_mutations(data: st.DataObject) -> None:
    """A mutated structure is rejected with MLSDecodeError, or (if it still decodes) it
    re-encodes to exactly the mutated bytes: decoding accepts only canonical input."""
    entry = data.draw(st.sampled_from(messages()))
    field = data.draw(st.sampled_from(FIELDS))
    raw = bytearray(entry[field])
    pos = data.draw(st.integers(0, len(raw) - 1))
    value = data.draw(st.integers(0, 255))
    assume(raw[pos] != value)
    raw[pos] = value
    mutated = bytes(raw)
    decoded = only_decode_error(decoder(field), mutated)
    if decoded is not None:
        assert decoded.encode() == mutated
    for parser in (mls.parse_key_package, mls.parse_commit_message, mls.parse_welcome_message):
        only_decode_error(parser, mutated)


# --- length prefixes: non-minimal, oversized, reserved ---------------------------------


@contextmanager
def recorded_varints() -> Iterator[list[tuple[int, int, str]]]:
    """Record (offset, value, field) of every length prefix a decode reads."""
    seen: list[tuple[int, int, str]] = []
    original = Reader.varint

    def spy(self: Reader, field: str) -> int:
        start = self.position
        value = original(self, field)
        seen.append((start, value, field))
        return value

    Reader.varint = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        Reader.varint = original  # type: ignore[method-assign]


def length_prefixes(field: str, data: bytes) -> list[tuple[int, int, str]]:
    with recorded_varints() as seen:
        decoder(field)(data)
    return seen


@pytest.mark.parametrize("field", FIELDS)
def test_non_minimal_lengths_rejected(field: str) -> None:
    """Widening any length prefix of a valid structure (same value, longer form) fails
    at exactly that prefix: 'non-minimal', or 'truncated' when the wider form runs past
    the end of the vector holding it (an empty vector last in its parent)."""
    minimal_checked = 0
    for entry in messages()[:3]:
        data = entry[field]
        prefixes = length_prefixes(field, data)
        if field != "remove_proposal":
            assert prefixes
        for offset, value, name in prefixes:
            size = len(encode_varint(value))
            if size == 4:
                continue  # no wider form exists
            wide = (0x4000 | value).to_bytes(2, "big") if size == 1 else b""
            wide4 = (0x8000_0000 | value).to_bytes(4, "big")
            for form in (wide, wide4):
                if not form:
                    continue
                mutated = data[:offset] + form + data[offset + size :]
                with pytest.raises(MLSDecodeError) as exc:
                    decoder(field)(mutated)
                assert exc.value.field == name
                assert exc.value.reason in (wire.NON_MINIMAL, wire.TRUNCATED)
                minimal_checked += exc.value.reason == wire.NON_MINIMAL
    assert minimal_checked > 0 or field == "remove_proposal"


@pytest.mark.parametrize("field", FIELDS)
def test_oversized_and_reserved_lengths_rejected(field: str) -> None:
    entry = messages()[0]
    data = entry[field]
    for offset, value, _ in length_prefixes(field, data):
        size = len(encode_varint(value))
        # A length beyond the end of the input: truncated, whichever vector it is.
        for big in (len(data) + 1, 2**30 - 1):
            mutated = data[:offset] + encode_varint(big) + data[offset + size :]
            with pytest.raises(MLSDecodeError) as exc:
                decoder(field)(mutated)
            assert exc.value.reason == wire.TRUNCATED
        mutated = data[:offset] + b"\xc0" + data[offset + 1 :]
        with pytest.raises(MLSDecodeError) as exc:
            decoder(field)(mutated)
        assert exc.value.reason == wire.RESERVED_PREFIX


# --- enums and wire formats ------------------------------------------------------------


def _kp_message() -> bytes:
    return messages()[0]["mls_key_package"]


@pytest.mark.parametrize("wire_format", [0, 6, 0x0A0A, 0xFFFF])
def test_unknown_wire_format(wire_format: int) -> None:
    data = b"\x00\x01" + wire_format.to_bytes(2, "big") + _kp_message()[4:]
    with pytest.raises(MLSDecodeError) as exc:
        mls.parse_mls_message(data)
    assert exc.value.reason == wire.UNKNOWN_WIRE_FORMAT
    assert "wire_format" in str(exc.value)


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_unsupported_mls_message_version(version: int) -> None:
    data = version.to_bytes(2, "big") + _kp_message()[2:]
    with pytest.raises(MLSDecodeError) as exc:
        mls.parse_mls_message(data)
    assert exc.value.reason == wire.UNSUPPORTED_VERSION


def test_bad_enums() -> None:
    entry = messages()[0]
    # PrivateMessage content_type: after version, wire_format, group_id<V>, uint64 epoch.
    priv = entry["private_message"]
    gid_len = priv[4]
    ct_at = 4 + 1 + gid_len + 8
    assert priv[ct_at] in (1, 2, 3)
    for bad in (0, 4, 255):
        mutated = priv[:ct_at] + bytes([bad]) + priv[ct_at + 1 :]
        with pytest.raises(MLSDecodeError) as exc:
            mls.parse_commit_message(mutated)
        assert exc.value.reason == wire.BAD_ENUM
        assert exc.value.field == "PrivateMessage.content_type"
    # PublicMessage sender_type: right after the epoch.
    pub = entry["public_message_commit"]
    st_at = 4 + 1 + pub[4] + 8
    assert pub[st_at] == s.SENDER_MEMBER
    for bad in (0, 5):
        mutated = pub[:st_at] + bytes([bad]) + pub[st_at + 1 :]
        with pytest.raises(MLSDecodeError) as exc:
            mls.parse_commit_message(mutated)
        assert exc.value.field == "Sender.sender_type"
    # Remove a Proposal type / Credential type / leaf source via structure re-encoding.
    kp = mls.parse_key_package(entry["mls_key_package"])
    cred_at = len(
        encode_varint(len(kp.leaf_node.encryption_key))
        + kp.leaf_node.encryption_key
        + encode_varint(len(kp.leaf_node.signature_key))
        + kp.leaf_node.signature_key
    )
    leaf = kp.leaf_node.encode()
    for bad in (0, 3, 0x0A0A):
        mutated = leaf[:cred_at] + bad.to_bytes(2, "big") + leaf[cred_at + 2 :]
        with pytest.raises(MLSDecodeError) as exc:
            s.LeafNode.decode(mutated)
        assert exc.value.field == "Credential.credential_type"
    src_at = cred_at + len(kp.leaf_node.credential.encode() + kp.leaf_node.capabilities.encode())
    assert leaf[src_at] == s.LEAF_SOURCE_KEY_PACKAGE
    for bad in (0, 4):
        mutated = leaf[:src_at] + bytes([bad]) + leaf[src_at + 1 :]
        with pytest.raises(MLSDecodeError) as exc:
            s.LeafNode.decode(mutated)
        assert exc.value.field == "LeafNode.leaf_node_source"
    for bad in (0, 8, 0xFFFF):
        with pytest.raises(MLSDecodeError) as exc:
            s.Proposal.decode(bad.to_bytes(2, "big") + b"\x00" * 8)
        assert exc.value.field == "Proposal.proposal_type"
    with pytest.raises(MLSDecodeError) as exc:
        s.Commit.decode(b"\x00\x02")
    assert exc.value.reason == wire.BAD_OPTIONAL


def test_commit_path_presence_byte() -> None:
    for entry in messages()[:10]:
        commit = s.Commit.decode(entry["commit"])
        data = entry["commit"]
        at = len(s.Commit(commit.proposals, None).encode())  # proposals<V>, presence byte
        assert data[at - 1] == (1 if commit.path else 0)
        mutated = data[: at - 1] + b"\x02" + data[at:]
        with pytest.raises(MLSDecodeError) as exc:
            s.Commit.decode(mutated)
        assert exc.value.reason == wire.BAD_OPTIONAL


def test_parse_key_package_forms() -> None:
    kp_msg = _kp_message()
    kp = mls.parse_key_package(kp_msg)
    assert mls.parse_key_package(kp.encode()) == kp
    assert mls.parse_key_package(bytearray(kp_msg)) == kp
    assert mls.parse_key_package(memoryview(kp_msg)) == kp
    # A welcome is not a KeyPackage in either form.
    with pytest.raises(MLSDecodeError):
        mls.parse_key_package(messages()[0]["mls_welcome"])
    # A broken MLSMessage form reports the MLSMessage error.
    with pytest.raises(MLSDecodeError) as exc:
        mls.parse_key_package(kp_msg[:-1])
    assert exc.value.reason == wire.TRUNCATED
