"""A software WebAuthn authenticator: real ES256 ceremonies for bots and tests.

:class:`SoftwareAuthenticator` plays two roles at once:

* the WebAuthn *client* (the browser's part): it reads the options JSON a Relying Party
  made with ``webauthn.options_to_json()`` and builds ``clientDataJSON`` (WebAuthn §5.8.1);
* a CTAP2-style *platform authenticator*: ``authenticatorMakeCredential`` (CTAP2 §6.1)
  and ``authenticatorGetAssertion`` (CTAP2 §6.2) with P-256 keys (COSE alg -7, ES256)
  and "none" attestation (WebAuthn §8.7). Every credential is discoverable (a passkey)
  and reports user verification, like a platform authenticator behind a device PIN.

The responses are plain bytes that map one-to-one onto the protobuf messages
``AuthRegisterResponse`` and ``AuthResponse`` (SPEC Appendix A). Nothing here touches the
network or the disk; :meth:`SoftwareAuthenticator.export` and
:meth:`SoftwareAuthenticator.import_` give a JSON-serialisable form a bot can persist.

Negative-test knobs are keyword arguments of :meth:`~SoftwareAuthenticator.create` and
:meth:`~SoftwareAuthenticator.get`: a wrong origin is just another ``origin``; ``rp_id``
hashes another RP ID into authenticatorData; ``challenge`` answers another challenge;
``user_present=False`` clears UP; ``sign_count`` forces the counter (a cloned or reset
authenticator); ``corrupt_signature`` flips a bit of the signature; ``client_data_type``
changes clientData's ``type``. A real clone is :meth:`export` + :meth:`import_`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypedDict
from urllib.parse import urlsplit

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "AssertionResponse",
    "AuthenticatorError",
    "RegistrationResponse",
    "SoftwareAuthenticator",
    "SoftwareCredential",
]

COSE_ALG_ES256: Final = -7
COSE_ALG_RS256: Final = -257
# WebAuthn §6.5.1: an authenticator without attestation reports an all-zero AAGUID.
AAGUID: Final = bytes(16)

# WebAuthn §6.1 authenticator data flags.
FLAG_UP: Final = 0x01  # user present
FLAG_UV: Final = 0x04  # user verified
FLAG_AT: Final = 0x40  # attested credential data included

MAX_SIGN_COUNT: Final = 2**32 - 1  # WebAuthn §6.1: signCount is a 32-bit unsigned integer
MAX_USER_HANDLE: Final = 64  # WebAuthn §5.4.3: user.id is at most 64 bytes
EXPORT_FORMAT: Final = "sovereign-software-authenticator"
EXPORT_VERSION: Final = 1


class AuthenticatorError(Exception):
    """The client or authenticator refused the ceremony (bad options, no credential, ...)."""


class RegistrationResponse(TypedDict):
    """Fields of ``AuthRegisterResponse`` (raw bytes)."""

    credential_id: bytes
    client_data_json: bytes
    attestation_object: bytes
    authenticator_data: bytes


class AssertionResponse(TypedDict):
    """Fields of ``AuthResponse`` (raw bytes)."""

    credential_id: bytes
    authenticator_data: bytes
    client_data_json: bytes
    signature: bytes
    user_handle: bytes


@dataclass(eq=False)
class SoftwareCredential:
    """One discoverable credential (WebAuthn §6.2.2 "client-side discoverable")."""

    credential_id: bytes
    private_key: ec.EllipticCurvePrivateKey
    rp_id: str
    user_handle: bytes
    user_name: str = ""
    sign_count: int = 0

    def public_key_cose(self) -> bytes:
        """The credential public key as a COSE_Key (WebAuthn §6.5.1.1, RFC 9053 §7.1.1)."""
        numbers = self.private_key.public_key().public_numbers()
        # kty 2 (EC2), alg -7 (ES256), crv 1 (P-256), x and y as 32-byte big-endian
        # coordinates; CTAP2 §8 canonical CBOR orders the keys 1, 3, -1, -2, -3.
        cose_key = {
            1: 2,
            3: COSE_ALG_ES256,
            -1: 1,
            -2: numbers.x.to_bytes(32, "big"),
            -3: numbers.y.to_bytes(32, "big"),
        }
        return cbor2.dumps(cose_key, canonical=True)


class SoftwareAuthenticator:
    """An in-memory ES256 passkey authenticator with "none" attestation.

    ``use_counter=False`` makes it report a signature counter that is always 0, as many
    synced passkey providers do (WebAuthn §6.1.1). ``enforce_rp_id_scope=True`` makes the
    client refuse an RP ID that is not the origin's host or a parent domain of it, as a
    browser does (WebAuthn §5.1.3 step 8, §5.1.4.1 step 9); native clients need not.
    """

    def __init__(self, *, use_counter: bool = True, enforce_rp_id_scope: bool = False) -> None:
        self.use_counter = use_counter
        self.enforce_rp_id_scope = enforce_rp_id_scope
        self._credentials: list[SoftwareCredential] = []  # in creation order

    @property
    def credentials(self) -> tuple[SoftwareCredential, ...]:
        """The credentials held, oldest first."""
        return tuple(self._credentials)

    def credential(self, credential_id: bytes) -> SoftwareCredential:
        for cred in self._credentials:
            if cred.credential_id == credential_id:
                return cred
        raise KeyError(credential_id)

    # -- registration: navigator.credentials.create() + authenticatorMakeCredential --------

    def create(
        self,
        options_json: bytes | str | Mapping[str, Any],
        origin: str,
        *,
        rp_id: str | None = None,
        challenge: bytes | None = None,
        client_data_type: str = "webauthn.create",
        user_present: bool = True,
        user_verified: bool = True,
        sign_count: int | None = None,
    ) -> RegistrationResponse:
        """Make a new credential for PublicKeyCredentialCreationOptions JSON.

        ``rp_id`` hashes that RP ID into authenticatorData instead of the options' one (the
        credential is still scoped to the options' RP); ``challenge`` puts another challenge
        in clientData; ``sign_count`` sets the new credential's counter.
        """
        options = _load_options(options_json)
        rp = options.get("rp")
        if not isinstance(rp, Mapping):
            raise AuthenticatorError("options.rp missing")
        scope = self._rp_id(rp.get("id"), origin)
        user = options.get("user")
        if not isinstance(user, Mapping):
            raise AuthenticatorError("options.user missing")
        user_handle = _decode_field(user.get("id"), "user.id")
        # WebAuthn §5.4.3: user.id is 1 to 64 bytes.
        if not 1 <= len(user_handle) <= MAX_USER_HANDLE:
            raise AuthenticatorError("user.id must be 1 to 64 bytes")
        user_name = user.get("name")
        options_challenge = _decode_field(options.get("challenge"), "challenge")

        # WebAuthn §5.1.3 step 10: an empty pubKeyCredParams means ES256 and RS256.
        params = options.get("pubKeyCredParams") or [
            {"type": "public-key", "alg": COSE_ALG_ES256},
            {"type": "public-key", "alg": COSE_ALG_RS256},
        ]
        if not isinstance(params, list) or not any(
            isinstance(p, Mapping) and p.get("type") == "public-key" and p.get("alg") == -7
            for p in params
        ):
            # CTAP2 §6.1.2 step 2: CTAP2_ERR_UNSUPPORTED_ALGORITHM.
            raise AuthenticatorError("no supported algorithm (only ES256)")

        # CTAP2 §6.1.2 step 3: a credential of ours in excludeList -> CREDENTIAL_EXCLUDED.
        excluded = _descriptor_ids(options.get("excludeCredentials"), "excludeCredentials")
        if any(c.rp_id == scope and c.credential_id in excluded for c in self._credentials):
            raise AuthenticatorError("credential excluded")

        # WebAuthn §5.1.3 steps 12-13: collected client data and its hash.
        client_data_json = _client_data_json(
            client_data_type,
            options_challenge if challenge is None else challenge,
            origin,
        )

        cred = SoftwareCredential(
            credential_id=secrets.token_bytes(32),
            private_key=ec.generate_private_key(ec.SECP256R1()),
            rp_id=scope,
            user_handle=user_handle,
            user_name=user_name if isinstance(user_name, str) else "",
            sign_count=_check_count(0 if sign_count is None else sign_count),
        )
        # CTAP2 §6.1.2 step 17: a discoverable credential for the same RP and user handle
        # replaces the existing one.
        self._credentials = [
            c for c in self._credentials if not (c.rp_id == scope and c.user_handle == user_handle)
        ]
        self._credentials.append(cred)

        # WebAuthn §6.5.2 attested credential data: aaguid (16) || credentialIdLength (2,
        # big-endian) || credentialId || credentialPublicKey (COSE_Key).
        attested = (
            AAGUID
            + len(cred.credential_id).to_bytes(2, "big")
            + cred.credential_id
            + cred.public_key_cose()
        )
        flags = FLAG_AT | _presence_flags(user_present, user_verified)
        authenticator_data = (
            _authenticator_data(scope if rp_id is None else rp_id, flags, cred.sign_count)
            + attested
        )
        # WebAuthn §6.5.4 attestation object, §8.7 "none" format: empty attStmt; CTAP2 §8
        # canonical CBOR orders the keys fmt, attStmt, authData.
        attestation_object = cbor2.dumps(
            {"fmt": "none", "attStmt": {}, "authData": authenticator_data}, canonical=True
        )
        return RegistrationResponse(
            credential_id=cred.credential_id,
            client_data_json=client_data_json,
            attestation_object=attestation_object,
            authenticator_data=authenticator_data,
        )

    # -- authentication: navigator.credentials.get() + authenticatorGetAssertion ----------

    def get(
        self,
        options_json: bytes | str | Mapping[str, Any],
        origin: str,
        *,
        credential_id: bytes | None = None,
        rp_id: str | None = None,
        challenge: bytes | None = None,
        client_data_type: str = "webauthn.get",
        user_present: bool = True,
        user_verified: bool = True,
        sign_count: int | None = None,
        corrupt_signature: bool = False,
    ) -> AssertionResponse:
        """Sign an assertion for PublicKeyCredentialRequestOptions JSON.

        The credential is one in ``allowCredentials`` if that is non-empty, else the newest
        discoverable one for the RP; ``credential_id`` narrows the choice. ``rp_id`` hashes
        that RP ID into authenticatorData (the credential is still looked up under the
        options' RP). ``sign_count`` sets the counter to that value instead of
        incrementing it (a cloned or reset authenticator).
        """
        options = _load_options(options_json)
        scope = self._rp_id(options.get("rpId"), origin)
        options_challenge = _decode_field(options.get("challenge"), "challenge")
        allowed = _descriptor_ids(options.get("allowCredentials"), "allowCredentials")

        # CTAP2 §6.2.2 steps 6-7: credentials for the RP, restricted to allowList when
        # present, most recently created first.
        candidates = [
            c
            for c in reversed(self._credentials)
            if c.rp_id == scope
            and (not allowed or c.credential_id in allowed)
            and (credential_id is None or c.credential_id == credential_id)
        ]
        if not candidates:
            raise AuthenticatorError("no credential for this RP")  # CTAP2_ERR_NO_CREDENTIALS
        cred = candidates[0]

        # CTAP2 §6.2.2 step 11: the signature counter goes up with every assertion.
        if sign_count is not None:
            cred.sign_count = _check_count(sign_count)
        elif self.use_counter:
            cred.sign_count = _check_count(cred.sign_count + 1)

        # WebAuthn §5.1.4.1 steps 10-11: collected client data.
        client_data_json = _client_data_json(
            client_data_type,
            options_challenge if challenge is None else challenge,
            origin,
        )
        # WebAuthn §6.3.3 step 9: no attested credential data in an assertion.
        authenticator_data = _authenticator_data(
            scope if rp_id is None else rp_id,
            _presence_flags(user_present, user_verified),
            cred.sign_count,
        )
        # WebAuthn §6.3.3 step 11: sign authenticatorData || SHA-256(clientDataJSON);
        # ES256 signatures are ASN.1 DER (WebAuthn §6.5.5).
        signature = cred.private_key.sign(
            authenticator_data + hashlib.sha256(client_data_json).digest(),
            ec.ECDSA(hashes.SHA256()),
        )
        if corrupt_signature:
            # Flip the low bit of s: still well-formed DER, no longer a valid signature.
            signature = signature[:-1] + bytes([signature[-1] ^ 0x01])
        return AssertionResponse(
            credential_id=cred.credential_id,
            authenticator_data=authenticator_data,
            client_data_json=client_data_json,
            signature=signature,
            # WebAuthn §6.3.3 step 12: discoverable credentials return the user handle.
            user_handle=cred.user_handle,
        )

    # -- persistence ---------------------------------------------------------------------

    def export(self, password: bytes | None = None) -> dict[str, Any]:
        """A JSON-serialisable snapshot: keys as PKCS#8 PEM (encrypted if ``password``)."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.NoEncryption()
            if password is None
            else serialization.BestAvailableEncryption(password)
        )
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "use_counter": self.use_counter,
            "enforce_rp_id_scope": self.enforce_rp_id_scope,
            "credentials": [
                {
                    "credential_id": _b64url(c.credential_id),
                    "rp_id": c.rp_id,
                    "user_handle": _b64url(c.user_handle),
                    "user_name": c.user_name,
                    "sign_count": c.sign_count,
                    "private_key": c.private_key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        encryption,
                    ).decode("ascii"),
                }
                for c in self._credentials
            ],
        }

    @classmethod
    def import_(
        cls, data: Mapping[str, Any] | str | bytes, password: bytes | None = None
    ) -> SoftwareAuthenticator:
        """Rebuild an authenticator from :meth:`export` output (a dict or its JSON)."""
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise ValueError("authenticator export is not JSON") from exc
        if (
            not isinstance(data, Mapping)
            or data.get("format") != EXPORT_FORMAT
            or data.get("version") != EXPORT_VERSION
            or not isinstance(data.get("credentials"), list)
        ):
            raise ValueError("not a software authenticator export (version 1)")
        auth = cls(
            use_counter=bool(data.get("use_counter", True)),
            enforce_rp_id_scope=bool(data.get("enforce_rp_id_scope", False)),
        )
        for item in data["credentials"]:
            try:
                key = serialization.load_pem_private_key(
                    item["private_key"].encode("ascii"), password=password
                )
                if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
                    key.curve, ec.SECP256R1
                ):
                    raise ValueError("credential key is not a P-256 key")
                cred = SoftwareCredential(
                    credential_id=_unb64url(item["credential_id"]),
                    private_key=key,
                    rp_id=str(item["rp_id"]),
                    user_handle=_unb64url(item["user_handle"]),
                    user_name=str(item.get("user_name", "")),
                    sign_count=_check_count(int(item.get("sign_count", 0))),
                )
            except (KeyError, TypeError, ValueError, AuthenticatorError) as exc:
                raise ValueError(f"bad credential in authenticator export: {exc}") from exc
            auth._credentials.append(cred)
        return auth

    # -- helpers -------------------------------------------------------------------------

    def _rp_id(self, value: object, origin: str) -> str:
        host = urlsplit(origin).hostname
        # WebAuthn §5.1.3 step 7 / §5.1.4.1 step 8: rp.id defaults to the origin's
        # effective domain.
        if value is None:
            if not host:
                raise AuthenticatorError("no RP ID and origin has no host")
            return host
        if not isinstance(value, str) or not value:
            raise AuthenticatorError("RP ID must be a non-empty string")
        # WebAuthn §5.1.3 step 8: the RP ID must be the origin's effective domain or a
        # registrable suffix of it (approximated without the public suffix list).
        if self.enforce_rp_id_scope and not (
            host and (host == value or host.endswith("." + value))
        ):
            raise AuthenticatorError("RP ID is not valid for this origin")
        return value


def _load_options(options_json: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(options_json, Mapping):
        options: object = options_json
    else:
        try:
            options = json.loads(options_json)
        except ValueError as exc:
            raise AuthenticatorError("options are not JSON") from exc
    # Accept the navigator.credentials.*({publicKey: ...}) wrapper too.
    if isinstance(options, Mapping) and isinstance(options.get("publicKey"), Mapping):
        options = options["publicKey"]
    if not isinstance(options, Mapping):
        raise AuthenticatorError("options are not a JSON object")
    return options


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected a base64url string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _decode_field(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise AuthenticatorError(f"options.{name} missing")
    try:
        return _unb64url(value)
    except ValueError as exc:
        raise AuthenticatorError(f"options.{name} is not base64url") from exc


def _descriptor_ids(value: object, name: str) -> set[bytes]:
    # WebAuthn §5.8.3 PublicKeyCredentialDescriptor; entries of other types are skipped.
    if value is None:
        return set()
    if not isinstance(value, list):
        raise AuthenticatorError(f"options.{name} is not a list")
    return {
        _decode_field(d.get("id"), f"{name}.id")
        for d in value
        if isinstance(d, Mapping) and d.get("type", "public-key") == "public-key"
    }


def _client_data_json(type_: str, challenge: bytes, origin: str) -> bytes:
    # WebAuthn §5.8.1.1: the client's serialization is compact JSON with type, challenge,
    # origin and crossOrigin first, in that order (what the limited verification
    # algorithm of §5.8.1.2 expects).
    parts = (
        f'"type":{json.dumps(type_, ensure_ascii=False)}',
        f'"challenge":{json.dumps(_b64url(challenge))}',
        f'"origin":{json.dumps(origin, ensure_ascii=False)}',
        '"crossOrigin":false',
    )
    return ("{" + ",".join(parts) + "}").encode("utf-8")


def _presence_flags(user_present: bool, user_verified: bool) -> int:
    return (FLAG_UP if user_present else 0) | (FLAG_UV if user_verified else 0)


def _authenticator_data(rp_id: str, flags: int, sign_count: int) -> bytes:
    # WebAuthn §6.1 authenticator data layout: rpIdHash (32) || flags (1) ||
    # signCount (4, big-endian) || [attestedCredentialData] || [extensions].
    rp_id_hash = hashlib.sha256(rp_id.encode("utf-8")).digest()
    return rp_id_hash + bytes([flags]) + sign_count.to_bytes(4, "big")


def _check_count(value: int) -> int:
    if not 0 <= value <= MAX_SIGN_COUNT:
        raise AuthenticatorError("sign count out of range")
    return value
