"""KeyPackage checks of the Authentication Service (SPEC §7, ``mls_validation = strict``).

:func:`validate_key_package` runs, in this order, and stops at the first failure with
:class:`KeyPackageInvalid` whose ``check`` names it:

``version``
    KeyPackage.version is mls10 (1).
``cipher_suite``
    one of the RFC 9420 §17.1 suites 1-7.
``leaf_node_source``
    the leaf node was made for a KeyPackage (source key_package), so it has a lifetime.
``lifetime``
    ``not_before <= not_after``, ``now >= not_before - max_skew`` and ``now <= not_after``.
    The skew (default :data:`DEFAULT_MAX_SKEW`, 1 hour) forgives a client whose clock runs
    ahead of the server's and that stamps ``not_before = now``. Expiry gets no grace: an
    expired package is never handed out, so accepting it would only fill the pool with
    packages the joiner's peers reject.
``init_key``
    ``init_key`` differs from the leaf's ``encryption_key`` (RFC 9420 §10.1).
``credential``
    a basic credential (x509 and others are refused),
``identity``
    whose identity bytes are one of ``allowed_identities`` (the uploader's user_id and
    username, UTF-8).
``signature_key``
    the leaf's signature key is well-formed for the suite's signature scheme: raw 32
    bytes (Ed25519), 57 bytes (Ed448), or an uncompressed SEC1 point (ECDSA).
``leaf_signature``
    the LeafNode's signature over LeafNodeTBS verifies with that key.
``signature``
    the KeyPackage's signature over KeyPackageTBS verifies with that key.

Signatures use SignWithLabel (RFC 9420 §5.1.2): the signed bytes are the TLS encoding
of ``SignContent { opaque label<V>; opaque content<V>; }`` with
``label = "MLS 1.0 " + Label`` and Labels ``"LeafNodeTBS"`` and ``"KeyPackageTBS"``.
Per §5.1.2 ECDSA signatures are DER-encoded and EdDSA signatures are ``R || S``
(RFC 8032, pure Ed25519/Ed448 with an empty context).

The last-resort marker is the ``last_resort_key_package`` KeyPackage extension, type
``0x000A``. RFC 9420 does not define it: its §17.3 registry holds 0x0001-0x0005
(application_id, ratchet_tree, required_capabilities, external_pub, external_senders).
It comes from draft-ietf-mls-extensions (added in -03; IANA entry "Value: 0x000A, Name:
last_resort_key_package, Message(s): KP"), the value OpenMLS, mls-rs and ts-mls use.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sovereign.mls.structs import (
    CREDENTIAL_BASIC,
    LEAF_SOURCE_KEY_PACKAGE,
    MLS10,
    KeyPackage,
)
from sovereign.mls.wire import Writer

__all__ = [
    "CIPHER_SUITES",
    "DEFAULT_MAX_SKEW",
    "EXTENSION_LAST_RESORT",
    "CipherSuite",
    "KeyPackageInvalid",
    "has_last_resort_extension",
    "sign_content",
    "validate_key_package",
    "verify_with_label",
]

EXTENSION_LAST_RESORT = 0x000A
DEFAULT_MAX_SKEW = 3600


class KeyPackageInvalid(ValueError):
    """A KeyPackage that fails a strict check; ``check`` names it (see module doc)."""

    def __init__(self, check: str, message: str) -> None:
        self.check = check
        super().__init__(f"{check}: {message}")


@dataclass(frozen=True, slots=True)
class CipherSuite:
    """An RFC 9420 §17.1 cipher suite, as far as the server needs it (signatures)."""

    value: int
    name: str
    signature_scheme: str  # "ed25519", "ed448", "ecdsa_secp256r1_sha256", ...
    curve: type[ec.EllipticCurve] | None = None
    hash: type[hashes.HashAlgorithm] | None = None


CIPHER_SUITES: dict[int, CipherSuite] = {
    s.value: s
    for s in (
        CipherSuite(1, "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519", "ed25519"),
        CipherSuite(
            2,
            "MLS_128_DHKEMP256_AES128GCM_SHA256_P256",
            "ecdsa_secp256r1_sha256",
            ec.SECP256R1,
            hashes.SHA256,
        ),
        CipherSuite(3, "MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519", "ed25519"),
        CipherSuite(4, "MLS_256_DHKEMX448_AES256GCM_SHA512_Ed448", "ed448"),
        CipherSuite(
            5,
            "MLS_256_DHKEMP521_AES256GCM_SHA512_P521",
            "ecdsa_secp521r1_sha512",
            ec.SECP521R1,
            hashes.SHA512,
        ),
        CipherSuite(6, "MLS_256_DHKEMX448_CHACHA20POLY1305_SHA512_Ed448", "ed448"),
        CipherSuite(
            7,
            "MLS_256_DHKEMP384_AES256GCM_SHA384_P384",
            "ecdsa_secp384r1_sha384",
            ec.SECP384R1,
            hashes.SHA384,
        ),
    )
}

_LABEL_PREFIX = b"MLS 1.0 "


def sign_content(label: str, content: bytes) -> bytes:
    """The bytes SignWithLabel signs: ``SignContent{"MLS 1.0 " + label, content}``."""
    w = Writer()
    w.opaque(_LABEL_PREFIX + label.encode("ascii"))
    w.opaque(content)
    return w.getvalue()


Verifier = Callable[[bytes, bytes], None]  # (signature, message) -> None or raise


class _BadKey(ValueError):
    pass


def _verifier(suite: CipherSuite, public_key: bytes) -> Verifier:
    """A verify function for the suite's scheme; ``_BadKey`` if the key is malformed."""
    try:
        if suite.signature_scheme == "ed25519":
            if len(public_key) != 32:
                raise _BadKey(f"Ed25519 key of {len(public_key)} bytes")
            return Ed25519PublicKey.from_public_bytes(public_key).verify
        if suite.signature_scheme == "ed448":
            if len(public_key) != 57:
                raise _BadKey(f"Ed448 key of {len(public_key)} bytes")
            return Ed448PublicKey.from_public_bytes(public_key).verify
        assert suite.curve is not None and suite.hash is not None
        if not public_key.startswith(b"\x04"):
            raise _BadKey("ECDSA key is not an uncompressed SEC1 point")
        key = ec.EllipticCurvePublicKey.from_encoded_point(suite.curve(), public_key)
    except ValueError as exc:  # _BadKey, or cryptography's "not on the curve"/bad size
        raise _BadKey(str(exc) or "malformed key") from exc
    algorithm = ec.ECDSA(suite.hash())

    def verify_ecdsa(signature: bytes, message: bytes) -> None:
        key.verify(signature, message, algorithm)

    return verify_ecdsa


def verify_with_label(
    suite: int, public_key: bytes, label: str, content: bytes, signature: bytes
) -> bool:
    """VerifyWithLabel (RFC 9420 §5.1.2) for a §17.1 suite; False on any failure."""
    cs = CIPHER_SUITES.get(suite)
    if cs is None:
        return False
    try:
        _verifier(cs, public_key)(signature, sign_content(label, content))
    except (InvalidSignature, ValueError):
        return False
    return True


def has_last_resort_extension(kp: KeyPackage) -> bool:
    """Whether the KeyPackage carries the ``last_resort_key_package`` extension (0x000A)."""
    return any(e.extension_type == EXTENSION_LAST_RESORT for e in kp.extensions)


def validate_key_package(
    kp: KeyPackage,
    *,
    allowed_identities: Set[bytes],
    now: int,
    max_skew: int = DEFAULT_MAX_SKEW,
) -> None:
    """Raise :class:`KeyPackageInvalid` unless ``kp`` passes every strict check.

    ``now`` is the current time in seconds since the Unix epoch.
    """
    if kp.version != MLS10:
        raise KeyPackageInvalid("version", f"version {kp.version} is not mls10 (1)")
    suite = CIPHER_SUITES.get(kp.cipher_suite)
    if suite is None:
        raise KeyPackageInvalid("cipher_suite", f"unknown cipher suite 0x{kp.cipher_suite:04x}")
    leaf = kp.leaf_node
    if leaf.leaf_node_source != LEAF_SOURCE_KEY_PACKAGE or leaf.lifetime is None:
        raise KeyPackageInvalid(
            "leaf_node_source", f"leaf_node_source {leaf.leaf_node_source} is not key_package"
        )
    lifetime = leaf.lifetime
    if lifetime.not_before > lifetime.not_after:
        raise KeyPackageInvalid("lifetime", "not_before is after not_after")
    if now < lifetime.not_before - max_skew:
        raise KeyPackageInvalid("lifetime", "not valid yet (not_before is in the future)")
    if now > lifetime.not_after:
        raise KeyPackageInvalid("lifetime", "expired (not_after has passed)")
    if kp.init_key == leaf.encryption_key:
        raise KeyPackageInvalid("init_key", "init_key equals the leaf encryption_key")
    credential = leaf.credential
    if credential.credential_type != CREDENTIAL_BASIC or credential.identity is None:
        raise KeyPackageInvalid(
            "credential", f"credential type {credential.credential_type} is not basic"
        )
    if credential.identity not in allowed_identities:
        raise KeyPackageInvalid("identity", "credential identity is not the uploader")
    try:
        verify = _verifier(suite, leaf.signature_key)
    except _BadKey as exc:
        raise KeyPackageInvalid(
            "signature_key", f"bad {suite.signature_scheme} key: {exc}"
        ) from None
    try:
        verify(leaf.signature, sign_content("LeafNodeTBS", leaf.tbs()))
    except (InvalidSignature, ValueError):
        raise KeyPackageInvalid("leaf_signature", "LeafNode signature does not verify") from None
    try:
        verify(kp.signature, sign_content("KeyPackageTBS", kp.tbs()))
    except (InvalidSignature, ValueError):
        raise KeyPackageInvalid("signature", "KeyPackage signature does not verify") from None
