"""Strict KeyPackage validation with packages signed here (sovereign.mls.testing)."""

from __future__ import annotations

import dataclasses

import pytest

from sovereign.mls import (
    EXTENSION_LAST_RESORT,
    KeyPackage,
    KeyPackageInvalid,
    MLSMessage,
    has_last_resort_extension,
    parse_key_package,
    validate_key_package,
)
from sovereign.mls import structs as s
from sovereign.mls.testing import (
    build_key_package,
    generate_signing_key,
    make_key_package,
    sign_key_package,
    sign_with_label,
    signature_public_key,
)
from sovereign.mls.validate import (
    CIPHER_SUITES,
    DEFAULT_MAX_SKEW,
    sign_content,
    verify_with_label,
)

NOW = 1_760_000_000
DAY = 86_400
IDS = {b"01J9ZK3Q6V0000000000000000", b"alice"}
ALL_SUITES = sorted(CIPHER_SUITES)  # 1-7: Ed25519, P-256, Ed25519, Ed448, P-521, Ed448, P-384


def fresh(suite: int, *, last_resort: bool = False) -> KeyPackage:
    data = build_key_package(
        suite, b"alice", not_before=NOW - DAY, not_after=NOW + 30 * DAY, last_resort=last_resort
    )
    return parse_key_package(data)


def check(kp: KeyPackage, now: int = NOW) -> None:
    validate_key_package(kp, allowed_identities=IDS, now=now)


def rejected(kp: KeyPackage, check_name: str, now: int = NOW) -> KeyPackageInvalid:
    with pytest.raises(KeyPackageInvalid) as exc:
        check(kp, now)
    assert exc.value.check == check_name
    assert str(exc.value).startswith(f"{check_name}: ")
    return exc.value


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_built_key_packages_validate(suite: int) -> None:
    data = build_key_package(suite, b"alice", not_before=NOW - DAY, not_after=NOW + DAY)
    msg = MLSMessage.decode(data)
    assert msg.wire_format == 5 and msg.encode() == data
    kp = parse_key_package(data)
    assert kp.cipher_suite == suite and kp.version == 1
    assert kp.leaf_node.credential.identity == b"alice"
    check(kp)
    check(parse_key_package(kp.encode()))  # the bare form too
    assert not has_last_resort_extension(kp)


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_bad_key_package_signature(suite: int) -> None:
    kp = fresh(suite)
    sig = bytearray(kp.signature)
    sig[len(sig) // 2] ^= 0x01
    rejected(dataclasses.replace(kp, signature=bytes(sig)), "signature")
    rejected(dataclasses.replace(kp, signature=b""), "signature")
    # Any change to a signed field breaks it (here, a KeyPackage extension).
    added = dataclasses.replace(kp, extensions=(s.Extension(0xF000, b"x"),))
    rejected(added, "signature")


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_bad_leaf_signature(suite: int) -> None:
    """The leaf signature is wrong but the KeyPackage signature (over the leaf as it is)
    is right: only the leaf check can catch it."""
    bundle = make_key_package(suite, b"alice", not_before=NOW - DAY, not_after=NOW + DAY)
    kp = bundle.key_package
    sig = bytearray(kp.leaf_node.signature)
    sig[-1] ^= 0x80
    leaf = dataclasses.replace(kp.leaf_node, signature=bytes(sig))
    tampered = sign_key_package(
        dataclasses.replace(kp, leaf_node=leaf), bundle.signing_key, leaf=False
    )
    rejected(tampered, "leaf_signature")
    # A leaf signed with the wrong label.
    wrong = sign_with_label(suite, bundle.signing_key, "KeyPackageTBS", kp.leaf_node.tbs())
    leaf = dataclasses.replace(kp.leaf_node, signature=wrong)
    rejected(
        sign_key_package(dataclasses.replace(kp, leaf_node=leaf), bundle.signing_key, leaf=False),
        "leaf_signature",
    )


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_signed_by_another_key(suite: int) -> None:
    bundle = make_key_package(suite, b"alice", not_before=NOW - DAY, not_after=NOW + DAY)
    other = generate_signing_key(suite)
    rejected(sign_key_package(bundle.key_package, other), "leaf_signature")


@pytest.mark.parametrize("suite", [0, 8, 0x0A0A, 0xF000])
def test_unknown_cipher_suite(suite: int) -> None:
    kp = fresh(1)
    rejected(dataclasses.replace(kp, cipher_suite=suite), "cipher_suite")


def test_suite_with_another_signature_scheme() -> None:
    """A package signed with Ed25519 but claiming P-256 (and the reverse) fails."""
    ed = make_key_package(1, b"alice", not_before=NOW - DAY, not_after=NOW + DAY)
    claimed = sign_key_package(
        dataclasses.replace(ed.key_package, cipher_suite=2), ed.signing_key, suite=1
    )
    rejected(claimed, "signature_key")
    p256 = make_key_package(2, b"alice", not_before=NOW - DAY, not_after=NOW + DAY)
    claimed = sign_key_package(
        dataclasses.replace(p256.key_package, cipher_suite=7), p256.signing_key, suite=2
    )
    rejected(claimed, "signature_key")  # a P-256 point is not a P-384 point
    # Ed25519 (suite 3 shares the scheme with 1): re-labelled suite still verifies.
    relabelled = sign_key_package(
        dataclasses.replace(ed.key_package, cipher_suite=3), ed.signing_key
    )
    check(relabelled)


@pytest.mark.parametrize("suite", [1, 2])
def test_lifetime(suite: int) -> None:
    bundle = make_key_package(suite, b"alice", not_before=NOW, not_after=NOW + DAY)
    kp = bundle.key_package
    check(kp, NOW)
    check(kp, NOW + DAY)  # the last valid second
    rejected(kp, "lifetime", NOW + DAY + 1)
    check(kp, NOW - DEFAULT_MAX_SKEW)  # a client clock up to an hour ahead is forgiven
    err = rejected(kp, "lifetime", NOW - DEFAULT_MAX_SKEW - 1)
    assert "not valid yet" in str(err)
    expired = make_key_package(suite, b"alice", not_before=NOW - 2 * DAY, not_after=NOW - DAY)
    assert "expired" in str(rejected(expired.key_package, "lifetime"))
    inverted = make_key_package(suite, b"alice", not_before=NOW + DAY, not_after=NOW - DAY)
    rejected(inverted.key_package, "lifetime")
    # The lifetime is signed: editing it breaks the leaf signature.
    leaf = dataclasses.replace(kp.leaf_node, lifetime=s.Lifetime(NOW, NOW + 2 * DAY))
    forged = sign_key_package(
        dataclasses.replace(kp, leaf_node=leaf), bundle.signing_key, leaf=False
    )
    rejected(forged, "leaf_signature")
    # A custom skew.
    with pytest.raises(KeyPackageInvalid):
        validate_key_package(kp, allowed_identities=IDS, now=NOW - 10, max_skew=0)
    validate_key_package(kp, allowed_identities=IDS, now=NOW - 10, max_skew=10)


def test_foreign_identity() -> None:
    kp = parse_key_package(build_key_package(1, b"mallory", not_before=0, not_after=2**64 - 1))
    err = rejected(kp, "identity")
    assert "uploader" in str(err)
    validate_key_package(kp, allowed_identities={b"mallory"}, now=NOW)
    validate_key_package(kp, allowed_identities=frozenset({b"x", b"mallory"}), now=NOW)
    with pytest.raises(KeyPackageInvalid):
        validate_key_package(kp, allowed_identities=set(), now=NOW)


@pytest.mark.parametrize("suite", [1, 2])
def test_x509_credential(suite: int) -> None:
    bundle = make_key_package(
        suite,
        b"alice",
        not_before=NOW - DAY,
        not_after=NOW + DAY,
        credential=s.Credential(s.CREDENTIAL_X509, certificates=(b"\x30\x82cert",)),
    )
    kp = parse_key_package(bundle.data)
    assert kp.leaf_node.credential.certificates == (b"\x30\x82cert",)
    rejected(kp, "credential")


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_version_not_mls10(version: int) -> None:
    bundle = make_key_package(
        1, b"alice", not_before=NOW - DAY, not_after=NOW + DAY, version=version
    )
    kp = parse_key_package(bundle.data)
    assert kp.version == version
    rejected(kp, "version")


@pytest.mark.parametrize("source", [s.LEAF_SOURCE_UPDATE, s.LEAF_SOURCE_COMMIT])
def test_leaf_source_not_key_package(source: int) -> None:
    bundle = make_key_package(2, b"alice", not_before=NOW - DAY, not_after=NOW + DAY)
    kp = bundle.key_package
    leaf = dataclasses.replace(
        kp.leaf_node,
        leaf_node_source=source,
        lifetime=None,
        parent_hash=b"\x11" * 32 if source == s.LEAF_SOURCE_COMMIT else None,
    )
    # Signed like a real update/commit leaf (bound to a group and leaf index).
    leaf = dataclasses.replace(
        leaf,
        signature=sign_with_label(2, bundle.signing_key, "LeafNodeTBS", leaf.tbs(b"group", 3)),
    )
    forged = sign_key_package(
        dataclasses.replace(kp, leaf_node=leaf), bundle.signing_key, leaf=False
    )
    reparsed = parse_key_package(MLSMessage(1, 5, forged).encode())
    assert reparsed == forged
    rejected(reparsed, "leaf_node_source")


def test_init_key_equal_to_encryption_key() -> None:
    bundle = make_key_package(1, b"alice", not_before=NOW - DAY, not_after=NOW + DAY)
    kp = bundle.key_package
    same = dataclasses.replace(kp, init_key=kp.leaf_node.encryption_key)
    rejected(sign_key_package(same, bundle.signing_key), "init_key")


@pytest.mark.parametrize(
    ("suite", "key"),
    [
        (1, b"\x01" * 31),
        (1, b""),
        (4, b"\x01" * 32),
        (2, b"\x02" + b"\x01" * 32),  # compressed point
        (2, b"\x04" + b"\x00" * 64),  # not on the curve
        (5, b"\x04" + b"\x01" * 10),
    ],
)
def test_malformed_signature_key(suite: int, key: bytes) -> None:
    kp = fresh(suite)
    leaf = dataclasses.replace(kp.leaf_node, signature_key=key)
    rejected(dataclasses.replace(kp, leaf_node=leaf), "signature_key")


def test_check_order_names_first_failure() -> None:
    """Several faults: the report names the first check in the documented order."""
    kp = fresh(1)
    bad = dataclasses.replace(kp, version=2, cipher_suite=99, signature=b"")
    rejected(bad, "version")
    rejected(dataclasses.replace(bad, version=1), "cipher_suite")


@pytest.mark.parametrize("suite", [1, 2, 4])
def test_last_resort(suite: int) -> None:
    kp = fresh(suite, last_resort=True)
    assert has_last_resort_extension(kp)
    assert EXTENSION_LAST_RESORT == 0x000A
    assert s.Extension(0x000A, b"") in kp.extensions
    check(kp)
    assert not has_last_resort_extension(fresh(suite))


def test_sign_content_layout() -> None:
    """SignContent{opaque label<V>; opaque content<V>} with label "MLS 1.0 " + Label."""
    assert sign_content("LeafNodeTBS", b"abc") == b"\x13MLS 1.0 LeafNodeTBS\x03abc"
    key = generate_signing_key(1)
    sig = sign_with_label(1, key, "KeyPackageTBS", b"payload")
    pub = signature_public_key(key)
    assert verify_with_label(1, pub, "KeyPackageTBS", b"payload", sig)
    assert not verify_with_label(1, pub, "LeafNodeTBS", b"payload", sig)
    assert not verify_with_label(99, pub, "KeyPackageTBS", b"payload", sig)
    assert not verify_with_label(2, pub, "KeyPackageTBS", b"payload", sig)


def test_builder_rejects_unknown_suite() -> None:
    with pytest.raises(ValueError):
        build_key_package(9, b"alice", not_before=0, not_after=1)
