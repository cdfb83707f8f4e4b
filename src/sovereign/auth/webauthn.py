"""WebAuthn ceremonies for the auth service: a pure layer over py_webauthn.

No I/O and no storage. The caller mints each challenge (``secrets.token_bytes(32)``), keeps
it single-use with its 60 s expiry (SPEC §4), stores credentials and sign counts, and maps
:class:`WebAuthnError` to AUTH_ERROR: a failed registration is 1003, a failed assertion
1004 (SPEC §12.7).

Each check of WebAuthn §7.1 (registration) and §7.2 (authentication) that can fail on
client input is first made here, explicitly and in the spec's order, so that every
failure carries a precise, client-safe reason; py_webauthn then runs its complete
verification (attestation statement, signature) as the second line. Two rules py_webauthn
does not apply are added: the attested credential id must be the one the client named,
and a non-empty user handle must belong to the credential's owner. The sign counter is
judged only after the signature has verified, so a forged assertion can never pass for a
cloned authenticator.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    decode_credential_public_key,
    decoded_public_key_to_cryptography,
    parse_attestation_object,
    parse_authenticator_data,
)
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorDataFlags,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "RegisteredCredential",
    "RelyingParty",
    "WebAuthnError",
    "authentication_options",
    "extract_challenge",
    "registration_options",
    "verify_authentication",
    "verify_registration",
]

# Offered in this order of preference: ES256 and EdDSA first; RS256 last, for Windows
# Hello. A credential with any other algorithm is refused (WebAuthn §7.1 step 16).
SUPPORTED_ALGORITHMS: Final[tuple[COSEAlgorithmIdentifier, ...]] = (
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.EDDSA,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
)
MIN_CHALLENGE_BYTES: Final = 16  # WebAuthn §13.4.3: challenges of at least 16 random bytes
MAX_USER_HANDLE_BYTES: Final = 64  # WebAuthn §5.4.3
MAX_CREDENTIAL_ID_BYTES: Final = 1023  # WebAuthn L3 §7.1 step 22

_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")


class WebAuthnError(Exception):
    """A ceremony failed. ``reason`` is a short phrase that is safe to show a client.

    Reasons: "malformed client data", "wrong client data type", "challenge mismatch",
    "origin not allowed", "cross-origin not allowed", "malformed authenticator data",
    "rp id mismatch", "user not present", "bad attestation", "unsupported algorithm",
    "credential id mismatch", "user handle mismatch", "bad public key", "bad signature",
    "sign count regression". The underlying py_webauthn exception, if any, is chained as
    ``__cause__`` for server-side logs only.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RelyingParty:
    rp_id: str
    rp_name: str
    origins: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RegisteredCredential:
    """What to store for a credential after a verified registration."""

    credential_id: bytes
    public_key: bytes  # COSE_Key
    sign_count: int
    aaguid: str
    transports: tuple[str, ...] = ()
    user_verified: bool = False
    backup_eligible: bool = False  # a multi-device (synced) credential
    backed_up: bool = False


# -- options -----------------------------------------------------------------------------


def registration_options(
    rp: RelyingParty,
    *,
    user_id: bytes,
    username: str,
    display_name: str,
    challenge: bytes,
    exclude_credential_ids: Sequence[bytes] = (),
    timeout_ms: int = 60000,
) -> bytes:
    """PublicKeyCredentialCreationOptions as JSON bytes (WebAuthn §5.4)."""
    _check_challenge(challenge)
    if not 1 <= len(user_id) <= MAX_USER_HANDLE_BYTES:
        raise ValueError("user_id must be 1 to 64 bytes")  # WebAuthn §5.4.3
    if timeout_ms <= 0:
        raise ValueError("timeout_ms must be positive")
    options = generate_registration_options(
        rp_id=rp.rp_id,
        rp_name=rp.rp_name,
        user_id=user_id,
        user_name=username,
        user_display_name=display_name,
        challenge=challenge,
        timeout=timeout_ms,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            require_resident_key=False,
            user_verification=UserVerificationRequirement.PREFERRED,
        ),
        exclude_credentials=[PublicKeyCredentialDescriptor(id=c) for c in exclude_credential_ids],
        supported_pub_key_algs=list(SUPPORTED_ALGORITHMS),
    )
    return options_to_json(options).encode("utf-8")


def authentication_options(
    rp: RelyingParty,
    *,
    challenge: bytes,
    allow_credential_ids: Sequence[bytes] = (),
    timeout_ms: int = 60000,
) -> bytes:
    """PublicKeyCredentialRequestOptions as JSON bytes (WebAuthn §5.5)."""
    _check_challenge(challenge)
    if timeout_ms <= 0:
        raise ValueError("timeout_ms must be positive")
    options = generate_authentication_options(
        rp_id=rp.rp_id,
        challenge=challenge,
        timeout=timeout_ms,
        allow_credentials=[PublicKeyCredentialDescriptor(id=c) for c in allow_credential_ids],
        user_verification=UserVerificationRequirement.PREFERRED,
    )
    return options_to_json(options).encode("utf-8")


# -- ceremonies --------------------------------------------------------------------------


def verify_registration(
    rp: RelyingParty,
    *,
    challenge: bytes,
    credential_id: bytes,
    client_data_json: bytes,
    attestation_object: bytes,
    transports: Sequence[str] = (),
) -> RegisteredCredential:
    """Verify an attestation (WebAuthn §7.1). Raises :class:`WebAuthnError`.

    The caller still checks that ``credential_id`` is not registered yet (§7.1 step 23).
    """
    # Steps 5-11: clientDataJSON.
    _check_client_data(rp, client_data_json, expected_type="webauthn.create", challenge=challenge)
    # Step 12: decode the attestation object (CBOR) and its authenticator data.
    try:
        attestation = parse_attestation_object(bytes(attestation_object))
    except Exception as exc:
        raise WebAuthnError("bad attestation") from exc
    auth_data = attestation.auth_data
    # Steps 13-14: rpIdHash and the UP flag.
    _check_authenticator_data(rp, auth_data.rp_id_hash, auth_data.flags)
    attested = auth_data.attested_credential_data
    if attested is None or not attested.credential_id:
        raise WebAuthnError("bad attestation")
    if len(attested.credential_id) > MAX_CREDENTIAL_ID_BYTES:  # L3 step 22
        raise WebAuthnError("bad attestation")
    # The credential the client names must be the one the authenticator attested.
    if not hmac.compare_digest(attested.credential_id, bytes(credential_id)):
        raise WebAuthnError("credential id mismatch")
    # Step 16: the key's algorithm must be one we offered in pubKeyCredParams; the key
    # must also be usable, or every later login would fail.
    try:
        decoded = decode_credential_public_key(attested.credential_public_key)
        decoded_public_key_to_cryptography(decoded)
    except Exception as exc:
        raise WebAuthnError("bad attestation") from exc
    if decoded.alg not in SUPPORTED_ALGORITHMS:
        raise WebAuthnError("unsupported algorithm")

    # Steps 18-21 (attestation statement) and everything above again, by py_webauthn.
    credential = {
        "id": _b64url(credential_id),
        "rawId": _b64url(credential_id),
        "type": "public-key",
        "response": {
            "clientDataJSON": _b64url(client_data_json),
            "attestationObject": _b64url(attestation_object),
            "transports": list(transports),
        },
    }
    try:
        verified = verify_registration_response(
            credential=credential,
            expected_challenge=bytes(challenge),
            expected_rp_id=rp.rp_id,
            expected_origin=list(rp.origins),
            require_user_presence=True,
            supported_pub_key_algs=list(SUPPORTED_ALGORITHMS),
        )
    except Exception as exc:
        raise WebAuthnError("bad attestation") from exc

    known = {t.value for t in AuthenticatorTransport}
    return RegisteredCredential(
        credential_id=bytes(verified.credential_id),
        public_key=bytes(verified.credential_public_key),
        sign_count=verified.sign_count,
        aaguid=verified.aaguid,
        transports=tuple(t for t in transports if t in known),
        user_verified=verified.user_verified,
        backup_eligible=auth_data.flags.be,
        backed_up=verified.credential_backed_up,
    )


def verify_authentication(
    rp: RelyingParty,
    *,
    challenge: bytes,
    credential_id: bytes,
    authenticator_data: bytes,
    client_data_json: bytes,
    signature: bytes,
    user_handle: bytes | None,
    credential_public_key: bytes,
    stored_sign_count: int,
    expected_user_handle: bytes | None = None,
) -> int:
    """Verify an assertion (WebAuthn §7.2); return the new sign count to store.

    The caller has already found the credential by ``credential_id`` (§7.2 steps 5-7)
    and passes its owner's user handle as ``expected_user_handle``: a non-empty
    ``user_handle`` that differs from it (or any non-empty one when it is None) fails.
    Raises :class:`WebAuthnError`.
    """
    # Step 6: a returned user handle must identify the credential's owner.
    if user_handle and (
        expected_user_handle is None or not hmac.compare_digest(user_handle, expected_user_handle)
    ):
        raise WebAuthnError("user handle mismatch")
    # Steps 10-15: clientDataJSON.
    _check_client_data(rp, client_data_json, expected_type="webauthn.get", challenge=challenge)
    # Steps 16-17: rpIdHash and the UP flag.
    try:
        auth_data = parse_authenticator_data(bytes(authenticator_data))
    except Exception as exc:
        raise WebAuthnError("malformed authenticator data") from exc
    _check_authenticator_data(rp, auth_data.rp_id_hash, auth_data.flags)
    # The stored key must decode; a failure here is the server's data, not the client's.
    try:
        decoded_public_key_to_cryptography(decode_credential_public_key(credential_public_key))
    except Exception as exc:
        raise WebAuthnError("bad public key") from exc

    # Step 20: the signature, with everything above checked again, by py_webauthn. Its
    # counter check runs before the signature, so it is given 0 (which disables it) and
    # step 21 is applied below, once the signature is known to be good.
    credential: dict[str, Any] = {
        "id": _b64url(credential_id),
        "rawId": _b64url(credential_id),
        "type": "public-key",
        "response": {
            "clientDataJSON": _b64url(client_data_json),
            "authenticatorData": _b64url(authenticator_data),
            "signature": _b64url(signature),
        },
    }
    if user_handle:
        credential["response"]["userHandle"] = _b64url(user_handle)
    try:
        verified = verify_authentication_response(
            credential=credential,
            expected_challenge=bytes(challenge),
            expected_rp_id=rp.rp_id,
            expected_origin=list(rp.origins),
            credential_public_key=bytes(credential_public_key),
            credential_current_sign_count=0,
        )
    except Exception as exc:
        raise WebAuthnError("bad signature") from exc

    # Step 21: if either count is non-zero the new one must be greater, else the
    # authenticator may have been cloned. Both zero means the authenticator has no counter.
    new_count = int(verified.new_sign_count)
    if (new_count or stored_sign_count) and new_count <= stored_sign_count:
        raise WebAuthnError("sign count regression")
    return new_count


def extract_challenge(client_data_json: bytes) -> bytes | None:
    """The challenge named in clientDataJSON, or None if it cannot be read.

    For looking up the stored challenge only; the ceremony itself is verified by
    :func:`verify_registration` / :func:`verify_authentication`.
    """
    try:
        data = orjson.loads(client_data_json)
    except (TypeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    value = data.get("challenge")
    if not isinstance(value, str):
        return None
    challenge = _unb64url(value)
    return challenge or None


# -- helpers -----------------------------------------------------------------------------


def _check_challenge(challenge: bytes) -> None:
    if len(challenge) < MIN_CHALLENGE_BYTES:
        raise ValueError("challenge must be at least 16 random bytes")


def _check_client_data(
    rp: RelyingParty, client_data_json: bytes, *, expected_type: str, challenge: bytes
) -> None:
    # WebAuthn §7.1 steps 5-6 / §7.2 steps 10-11: parse the JSON.
    try:
        data = orjson.loads(client_data_json)
    except (TypeError, ValueError) as exc:
        raise WebAuthnError("malformed client data") from exc
    if not isinstance(data, dict):
        raise WebAuthnError("malformed client data")
    type_ = data.get("type")
    encoded_challenge = data.get("challenge")
    origin = data.get("origin")
    if not (
        isinstance(type_, str) and isinstance(encoded_challenge, str) and isinstance(origin, str)
    ):
        raise WebAuthnError("malformed client data")
    # §7.1 step 7 / §7.2 step 12: the type prevents replaying one ceremony as the other.
    if type_ != expected_type:
        raise WebAuthnError("wrong client data type")
    # §7.1 step 8 / §7.2 step 13.
    received = _unb64url(encoded_challenge)
    if received is None or not hmac.compare_digest(received, bytes(challenge)):
        raise WebAuthnError("challenge mismatch")
    # §7.1 step 9 / §7.2 step 14: an exact match against the configured origins.
    if origin not in rp.origins:
        raise WebAuthnError("origin not allowed")
    # L3 §7.1 steps 10-11 / §7.2 steps 15-16: we never expect to run in a cross-origin
    # iframe, so crossOrigin must not be true and topOrigin must be absent.
    if data.get("crossOrigin") is True or "topOrigin" in data:
        raise WebAuthnError("cross-origin not allowed")


def _check_authenticator_data(
    rp: RelyingParty, rp_id_hash: bytes, flags: AuthenticatorDataFlags
) -> None:
    # §7.1 step 13 / §7.2 step 15 (L2): rpIdHash is SHA-256 of our RP ID.
    expected = hashlib.sha256(rp.rp_id.encode("utf-8")).digest()
    if not hmac.compare_digest(bytes(rp_id_hash), expected):
        raise WebAuthnError("rp id mismatch")
    # §7.1 step 14 / §7.2 step 16 (L2): the UP flag must be set.
    if not flags.up:
        raise WebAuthnError("user not present")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes | None:
    """Strict base64url (RFC 4648 §5), padding optional; None if malformed."""
    stripped = text.rstrip("=")
    if len(text) - len(stripped) > 2 or len(stripped) % 4 == 1:
        return None
    if not _B64URL.fullmatch(stripped):
        return None
    return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
