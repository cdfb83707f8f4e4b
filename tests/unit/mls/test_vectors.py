"""The MLS working-group vectors decode and re-encode byte for byte."""

from __future__ import annotations

from typing import Any

import pytest

from sovereign.mls import (
    CONTENT_APPLICATION,
    CONTENT_COMMIT,
    CONTENT_PROPOSAL,
    WIRE_FORMAT_GROUP_INFO,
    WIRE_FORMAT_KEY_PACKAGE,
    WIRE_FORMAT_PRIVATE_MESSAGE,
    WIRE_FORMAT_PUBLIC_MESSAGE,
    WIRE_FORMAT_WELCOME,
    KeyPackageInvalid,
    MLSDecodeError,
    parse_commit_message,
    parse_group_info_message,
    parse_key_package,
    parse_welcome_message,
    validate_key_package,
)
from sovereign.mls import structs as s
from sovereign.mls.validate import CIPHER_SUITES

from .vectors import BARE_FIELDS, MLS_MESSAGE_FIELDS, messages, welcomes

BARE_TYPES: dict[str, type[Any]] = {
    "ratchet_tree": s.RatchetTree,
    "group_secrets": s.GroupSecrets,
    "add_proposal": s.Add,
    "update_proposal": s.Update,
    "remove_proposal": s.Remove,
    "pre_shared_key_proposal": s.PreSharedKey,
    "re_init_proposal": s.ReInit,
    "external_init_proposal": s.ExternalInit,
    "group_context_extensions_proposal": s.GroupContextExtensions,
    "commit": s.Commit,
}
EXPECTED_WIRE_FORMAT = {
    "mls_welcome": WIRE_FORMAT_WELCOME,
    "mls_group_info": WIRE_FORMAT_GROUP_INFO,
    "mls_key_package": WIRE_FORMAT_KEY_PACKAGE,
    "public_message_application": WIRE_FORMAT_PUBLIC_MESSAGE,
    "public_message_proposal": WIRE_FORMAT_PUBLIC_MESSAGE,
    "public_message_commit": WIRE_FORMAT_PUBLIC_MESSAGE,
    "private_message": WIRE_FORMAT_PRIVATE_MESSAGE,
}
ENTRIES = range(len(messages()))


def test_vector_files_cover_every_field() -> None:
    for entry in messages():
        assert set(entry) == set(MLS_MESSAGE_FIELDS) | set(BARE_FIELDS)
    assert len(messages()) >= 60


@pytest.mark.parametrize("field", MLS_MESSAGE_FIELDS)
@pytest.mark.parametrize("i", ENTRIES)
def test_mls_message_roundtrip(i: int, field: str) -> None:
    data = messages()[i][field]
    msg = s.MLSMessage.decode(data)
    assert msg.version == 1
    assert msg.wire_format == EXPECTED_WIRE_FORMAT[field]
    assert msg.encode() == data


@pytest.mark.parametrize("field", BARE_FIELDS)
@pytest.mark.parametrize("i", ENTRIES)
def test_bare_structure_roundtrip(i: int, field: str) -> None:
    data = messages()[i][field]
    value = BARE_TYPES[field].decode(data)
    assert value.encode() == data


@pytest.mark.parametrize("i", ENTRIES)
def test_public_message_content_types(i: int) -> None:
    entry = messages()[i]
    for field, ctype, body_type in [
        ("public_message_application", CONTENT_APPLICATION, bytes),
        ("public_message_proposal", CONTENT_PROPOSAL, s.Proposal),
        ("public_message_commit", CONTENT_COMMIT, s.Commit),
    ]:
        msg = s.MLSMessage.decode(entry[field])
        assert isinstance(msg.body, s.PublicMessage)
        content = msg.body.content
        assert content.content_type == ctype
        assert isinstance(content.body, body_type)
        assert (msg.body.auth.confirmation_tag is not None) == (ctype == CONTENT_COMMIT)
        assert (msg.body.membership_tag is not None) == (
            content.sender.sender_type == s.SENDER_MEMBER
        )


@pytest.mark.parametrize("i", ENTRIES)
def test_parse_helpers_on_vectors(i: int) -> None:
    entry = messages()[i]
    # Commit info: PublicMessage (sender, content in clear) and PrivateMessage header.
    pub = s.MLSMessage.decode(entry["public_message_commit"]).body
    assert isinstance(pub, s.PublicMessage)
    info = parse_commit_message(entry["public_message_commit"])
    assert info.wire_format == WIRE_FORMAT_PUBLIC_MESSAGE
    assert info.content_type == CONTENT_COMMIT
    assert (info.group_id, info.epoch) == (pub.content.group_id, pub.content.epoch)
    priv = s.MLSMessage.decode(entry["private_message"]).body
    assert isinstance(priv, s.PrivateMessage)
    info = parse_commit_message(entry["private_message"])
    assert info.wire_format == WIRE_FORMAT_PRIVATE_MESSAGE
    assert (info.group_id, info.epoch, info.content_type) == (
        priv.group_id,
        priv.epoch,
        priv.content_type,
    )
    app = parse_commit_message(entry["public_message_application"])
    assert app.content_type == CONTENT_APPLICATION
    # Welcome, GroupInfo.
    welcome = parse_welcome_message(entry["mls_welcome"])
    assert welcome.encode() == entry["mls_welcome"][4:]
    gi = parse_group_info_message(entry["mls_group_info"])
    assert (gi.group_id, gi.epoch) == (gi.group_context.group_id, gi.group_context.epoch)
    # KeyPackage: the MLSMessage form and the bare one give the same package.
    kp = parse_key_package(entry["mls_key_package"])
    assert parse_key_package(kp.encode()) == kp
    assert kp.encode() == entry["mls_key_package"][4:]
    # Each helper refuses the other wire formats.
    for helper, own in [
        (parse_welcome_message, {"mls_welcome"}),
        (parse_group_info_message, {"mls_group_info"}),
        (parse_commit_message, {k for k in MLS_MESSAGE_FIELDS if "message" in k}),
    ]:
        for field in MLS_MESSAGE_FIELDS:
            if field not in own:
                with pytest.raises(MLSDecodeError, match="wire_format"):
                    helper(entry[field])


@pytest.mark.parametrize("i", ENTRIES)
def test_vector_key_packages_verify(i: int) -> None:
    """The vector KeyPackages are validly signed (suites 1-3): strict validation passes
    at a time inside their lifetime, with their own identity, and fails outside it."""
    kp = parse_key_package(messages()[i]["mls_key_package"])
    lifetime = kp.leaf_node.lifetime
    identity = kp.leaf_node.credential.identity
    assert lifetime is not None and identity is not None
    validate_key_package(kp, allowed_identities={identity}, now=lifetime.not_before)
    with pytest.raises(KeyPackageInvalid, match="lifetime"):
        validate_key_package(kp, allowed_identities={identity}, now=lifetime.not_after + 1)
    with pytest.raises(KeyPackageInvalid, match="identity"):
        validate_key_package(kp, allowed_identities={b"mallory"}, now=lifetime.not_before)


@pytest.mark.parametrize("case", welcomes(), ids=lambda c: f"suite{c['cipher_suite']}")
def test_welcome_json(case: dict[str, Any]) -> None:
    """welcome.json: a Welcome and the KeyPackage it was made for, one per suite 1-7.
    Both decode and re-encode; the KeyPackage (made by a real MLS implementation) passes
    strict validation, its signatures included, and the Welcome names its suite."""
    kp_data = bytes.fromhex(case["key_package"])
    welcome_data = bytes.fromhex(case["welcome"])
    kp = parse_key_package(kp_data)
    assert s.MLSMessage.decode(kp_data).encode() == kp_data
    assert kp.cipher_suite == case["cipher_suite"] in CIPHER_SUITES
    welcome = parse_welcome_message(welcome_data)
    assert s.MLSMessage.decode(welcome_data).encode() == welcome_data
    assert welcome.cipher_suite == case["cipher_suite"]
    assert len(welcome.secrets) >= 1
    identity = kp.leaf_node.credential.identity
    assert identity is not None
    validate_key_package(kp, allowed_identities={identity}, now=1_760_000_000)
