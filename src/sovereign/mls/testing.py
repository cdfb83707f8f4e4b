"""Correctly signed KeyPackages for tests, bots and the load tool — not for real clients.

The packages are genuine RFC 9420 KeyPackages (real HPKE keys for the suite's KEM, a
basic credential, SignWithLabel signatures), so the server's strict validation accepts
them. The generating side keeps the private keys in :class:`KeyPackageBundle`, but this
module implements no MLS group logic: a client that must actually join a group needs a
real MLS implementation (the interop tests use ts-mls).

``build_key_package`` is the one-call form; ``make_key_package`` exposes every field so
tests can forge variants (wrong version, x509 credential, update leaf...) and
``sign_key_package`` re-signs a modified package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sovereign.mls.structs import (
    CREDENTIAL_BASIC,
    LEAF_SOURCE_KEY_PACKAGE,
    MLS10,
    WIRE_FORMAT_KEY_PACKAGE,
    Capabilities,
    Credential,
    Extension,
    KeyPackage,
    LeafNode,
    Lifetime,
    MLSMessage,
)
from sovereign.mls.validate import CIPHER_SUITES, EXTENSION_LAST_RESORT, sign_content

__all__ = [
    "KeyPackageBundle",
    "SigningKey",
    "build_key_package",
    "generate_signing_key",
    "make_key_package",
    "sign_key_package",
    "sign_with_label",
    "signature_public_key",
]

SigningKey = Ed25519PrivateKey | Ed448PrivateKey | ec.EllipticCurvePrivateKey
HpkePrivateKey = x25519.X25519PrivateKey | x448.X448PrivateKey | ec.EllipticCurvePrivateKey

# KEM of each suite (RFC 9420 §17.1): X25519 (1, 3), P-256 (2), X448 (4, 6), P-521 (5),
# P-384 (7).
_KEM_CURVES: dict[int, type[ec.EllipticCurve]] = {
    2: ec.SECP256R1,
    5: ec.SECP521R1,
    7: ec.SECP384R1,
}


def _suite(suite: int) -> None:
    if suite not in CIPHER_SUITES:
        raise ValueError(f"unknown cipher suite {suite}")


def generate_signing_key(suite: int) -> SigningKey:
    """A fresh signature key of the suite's scheme."""
    _suite(suite)
    cs = CIPHER_SUITES[suite]
    if cs.signature_scheme == "ed25519":
        return Ed25519PrivateKey.generate()
    if cs.signature_scheme == "ed448":
        return Ed448PrivateKey.generate()
    assert cs.curve is not None
    return ec.generate_private_key(cs.curve())


def signature_public_key(key: SigningKey) -> bytes:
    """SignaturePublicKey bytes: raw for EdDSA, uncompressed SEC1 point for ECDSA."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return key.public_key().public_bytes_raw()


def _generate_hpke_key(suite: int) -> tuple[HpkePrivateKey, bytes]:
    curve = _KEM_CURVES.get(suite)
    if curve is not None:
        key = ec.generate_private_key(curve())
        public = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return key, public
    if suite in (4, 6):
        xkey = x448.X448PrivateKey.generate()
        return xkey, xkey.public_key().public_bytes_raw()
    ykey = x25519.X25519PrivateKey.generate()
    return ykey, ykey.public_key().public_bytes_raw()


def sign_with_label(suite: int, key: SigningKey, label: str, content: bytes) -> bytes:
    """SignWithLabel (RFC 9420 §5.1.2); ECDSA signatures DER-encoded."""
    _suite(suite)
    message = sign_content(label, content)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        cs = CIPHER_SUITES[suite]
        assert cs.hash is not None
        return key.sign(message, ec.ECDSA(cs.hash()))
    return key.sign(message)


def sign_key_package(
    kp: KeyPackage, key: SigningKey, *, suite: int | None = None, leaf: bool = True
) -> KeyPackage:
    """Re-sign the leaf node (unless ``leaf=False``), then the KeyPackage itself.

    ``suite`` picks the signature scheme; by default the package's own cipher suite."""
    s = kp.cipher_suite if suite is None else suite
    leaf_node = kp.leaf_node
    if leaf:
        leaf_node = dataclasses.replace(
            leaf_node, signature=sign_with_label(s, key, "LeafNodeTBS", leaf_node.tbs())
        )
    kp = dataclasses.replace(kp, leaf_node=leaf_node)
    return dataclasses.replace(kp, signature=sign_with_label(s, key, "KeyPackageTBS", kp.tbs()))


@dataclass(frozen=True, slots=True)
class KeyPackageBundle:
    """A KeyPackage with its private keys and its MLSMessage encoding."""

    key_package: KeyPackage
    signing_key: SigningKey
    init_key: HpkePrivateKey
    encryption_key: HpkePrivateKey

    @property
    def data(self) -> bytes:
        """The MLSMessage (wire_format mls_key_package) bytes."""
        return MLSMessage(MLS10, WIRE_FORMAT_KEY_PACKAGE, self.key_package).encode()


def make_key_package(
    suite: int,
    identity: bytes,
    *,
    not_before: int,
    not_after: int,
    last_resort: bool = False,
    signing_key: SigningKey | None = None,
    credential: Credential | None = None,
    version: int = MLS10,
    extensions: tuple[Extension, ...] = (),
    leaf_extensions: tuple[Extension, ...] = (),
) -> KeyPackageBundle:
    """A signed KeyPackage for ``suite`` with a basic credential naming ``identity``.

    ``last_resort`` adds the ``last_resort_key_package`` extension (0x000A) and lists it
    in the leaf's capabilities; ``credential`` replaces the basic credential; ``version``
    is written as the KeyPackage version (signed like any other field)."""
    _suite(suite)
    key = signing_key if signing_key is not None else generate_signing_key(suite)
    init_priv, init_pub = _generate_hpke_key(suite)
    enc_priv, enc_pub = _generate_hpke_key(suite)
    kp_extensions = extensions
    if last_resort:
        kp_extensions = (*kp_extensions, Extension(EXTENSION_LAST_RESORT, b""))
    leaf = LeafNode(
        encryption_key=enc_pub,
        signature_key=signature_public_key(key),
        credential=credential or Credential(CREDENTIAL_BASIC, identity=identity),
        capabilities=Capabilities(
            versions=(MLS10,),
            cipher_suites=(suite,),
            extensions=(EXTENSION_LAST_RESORT,) if last_resort else (),
            proposals=(),
            credentials=(CREDENTIAL_BASIC,),
        ),
        leaf_node_source=LEAF_SOURCE_KEY_PACKAGE,
        lifetime=Lifetime(not_before, not_after),
        parent_hash=None,
        extensions=leaf_extensions,
        signature=b"",
    )
    kp = KeyPackage(version, suite, init_pub, leaf, kp_extensions, b"")
    return KeyPackageBundle(sign_key_package(kp, key), key, init_priv, enc_priv)


def build_key_package(
    suite: int,
    identity: bytes,
    *,
    not_before: int,
    not_after: int,
    last_resort: bool = False,
) -> bytes:
    """A correctly signed KeyPackage, MLSMessage-wrapped (wire_format mls_key_package)."""
    return make_key_package(
        suite, identity, not_before=not_before, not_after=not_after, last_resort=last_resort
    ).data
