"""Real WebAuthn ceremonies: SoftwareAuthenticator against sovereign.auth.webauthn."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any

import cbor2
import pytest
from webauthn.helpers import decode_credential_public_key

from sovereign.auth.webauthn import (
    RegisteredCredential,
    RelyingParty,
    WebAuthnError,
    authentication_options,
    extract_challenge,
    registration_options,
    verify_authentication,
    verify_registration,
)
from sovereign.client.authenticator import (
    AssertionResponse,
    AuthenticatorError,
    RegistrationResponse,
    SoftwareAuthenticator,
)

ORIGIN = "http://localhost:8080"
RP = RelyingParty(rp_id="localhost", rp_name="Sovereign", origins=(ORIGIN, "https://chat.test"))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_challenge() -> bytes:
    return secrets.token_bytes(32)


def reg_options(user_id: bytes, challenge: bytes, **kw: Any) -> bytes:
    return registration_options(
        RP, user_id=user_id, username="alice", display_name="Alice", challenge=challenge, **kw
    )


def verify_reg(resp: RegistrationResponse, challenge: bytes) -> RegisteredCredential:
    return verify_registration(
        RP,
        challenge=challenge,
        credential_id=resp["credential_id"],
        client_data_json=resp["client_data_json"],
        attestation_object=resp["attestation_object"],
    )


def register(
    auth: SoftwareAuthenticator, user_id: bytes | None = None
) -> tuple[RegisteredCredential, bytes]:
    user_id = user_id or secrets.token_bytes(16)
    challenge = new_challenge()
    resp = auth.create(reg_options(user_id, challenge), ORIGIN)
    return verify_reg(resp, challenge), user_id


def verify_auth(
    resp: AssertionResponse,
    challenge: bytes,
    cred: RegisteredCredential,
    user_id: bytes,
    stored_sign_count: int | None = None,
) -> int:
    return verify_authentication(
        RP,
        challenge=challenge,
        credential_id=resp["credential_id"],
        authenticator_data=resp["authenticator_data"],
        client_data_json=resp["client_data_json"],
        signature=resp["signature"],
        user_handle=resp["user_handle"],
        credential_public_key=cred.public_key,
        stored_sign_count=cred.sign_count if stored_sign_count is None else stored_sign_count,
        expected_user_handle=user_id,
    )


def expect(reason: str) -> pytest.RaisesExc[WebAuthnError]:
    return pytest.raises(WebAuthnError, match=f"^{reason}$")


@pytest.fixture
def auth() -> SoftwareAuthenticator:
    return SoftwareAuthenticator()


@pytest.fixture
def registered(auth: SoftwareAuthenticator) -> tuple[RegisteredCredential, bytes]:
    return register(auth)


# -- options -------------------------------------------------------------------------------


def test_registration_options_json() -> None:
    challenge = new_challenge()
    opts = json.loads(reg_options(b"user-1", challenge, exclude_credential_ids=[b"old"]))
    assert opts["rp"] == {"id": "localhost", "name": "Sovereign"}
    assert opts["user"] == {"id": b64url(b"user-1"), "name": "alice", "displayName": "Alice"}
    assert opts["challenge"] == b64url(challenge)
    assert [p["alg"] for p in opts["pubKeyCredParams"]][:2] == [-7, -8]
    assert opts["authenticatorSelection"]["residentKey"] == "preferred"
    assert opts["authenticatorSelection"]["userVerification"] == "preferred"
    assert opts["attestation"] == "none"
    assert opts["excludeCredentials"] == [{"id": b64url(b"old"), "type": "public-key"}]
    assert opts["timeout"] == 60000


def test_authentication_options_json() -> None:
    challenge = new_challenge()
    opts = json.loads(
        authentication_options(RP, challenge=challenge, allow_credential_ids=[b"c1"], timeout_ms=5)
    )
    assert opts["rpId"] == "localhost"
    assert opts["challenge"] == b64url(challenge)
    assert opts["allowCredentials"] == [{"id": b64url(b"c1"), "type": "public-key"}]
    assert opts["userVerification"] == "preferred"
    assert opts["timeout"] == 5


def test_options_reject_programmer_errors() -> None:
    with pytest.raises(ValueError):
        reg_options(b"user", b"short")
    with pytest.raises(ValueError):
        reg_options(b"", new_challenge())
    with pytest.raises(ValueError):
        reg_options(b"x" * 65, new_challenge())
    with pytest.raises(ValueError):
        authentication_options(RP, challenge=b"short")


# -- positive ceremonies ---------------------------------------------------------------------


def test_registration(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"user-1", challenge), ORIGIN)
    cred = verify_reg(resp, challenge)
    assert cred.credential_id == resp["credential_id"]
    assert len(cred.credential_id) == 32
    (held,) = auth.credentials
    assert held.credential_id == cred.credential_id
    assert held.rp_id == "localhost"
    assert held.user_handle == b"user-1"
    assert held.user_name == "alice"
    assert cred.public_key == held.public_key_cose()
    assert decode_credential_public_key(cred.public_key).alg == -7
    assert cred.sign_count == 0
    assert cred.aaguid == "00000000-0000-0000-0000-000000000000"
    assert cred.user_verified
    assert not cred.backup_eligible
    assert cred.transports == ()
    # The attestation object embeds exactly the authenticator data returned alongside.
    att = cbor2.loads(resp["attestation_object"])
    assert att == {"fmt": "none", "attStmt": {}, "authData": resp["authenticator_data"]}
    assert resp["authenticator_data"][:32] == hashlib.sha256(b"localhost").digest()
    assert resp["authenticator_data"][32] == 0x45  # UP | UV | AT
    client_data = json.loads(resp["client_data_json"])
    assert client_data == {
        "type": "webauthn.create",
        "challenge": b64url(challenge),
        "origin": ORIGIN,
        "crossOrigin": False,
    }


def test_registration_keeps_known_transports(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"u", challenge), ORIGIN)
    cred = verify_registration(
        RP,
        challenge=challenge,
        credential_id=resp["credential_id"],
        client_data_json=resp["client_data_json"],
        attestation_object=resp["attestation_object"],
        transports=["internal", "bogus", "hybrid"],
    )
    assert cred.transports == ("internal", "hybrid")


def test_authentication_counts_up(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    stored = cred.sign_count
    for expected in (1, 2, 3):
        challenge = new_challenge()
        resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN)
        assert resp["credential_id"] == cred.credential_id
        assert resp["user_handle"] == user_id
        stored = verify_auth(resp, challenge, cred, user_id, stored_sign_count=stored)
        assert stored == expected


def test_authentication_with_allow_list_and_second_origin(auth: SoftwareAuthenticator) -> None:
    first, user_1 = register(auth)
    second, _user_2 = register(auth)
    challenge = new_challenge()
    options = authentication_options(
        RP, challenge=challenge, allow_credential_ids=[first.credential_id]
    )
    resp = auth.get(options, "https://chat.test")
    assert resp["credential_id"] == first.credential_id
    assert verify_auth(resp, challenge, first, user_1) == 1
    # Without an allow list the newest discoverable credential answers.
    challenge = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN)
    assert resp["credential_id"] == second.credential_id


def test_counterless_authenticator_both_zero_is_allowed() -> None:
    auth = SoftwareAuthenticator(use_counter=False)
    cred, user_id = register(auth)
    for _ in range(2):
        challenge = new_challenge()
        resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN)
        assert verify_auth(resp, challenge, cred, user_id) == 0


def test_empty_user_handle_is_not_checked(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, _ = registered
    challenge = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN)
    resp["user_handle"] = b""
    new_count = verify_authentication(
        RP,
        challenge=challenge,
        credential_id=resp["credential_id"],
        authenticator_data=resp["authenticator_data"],
        client_data_json=resp["client_data_json"],
        signature=resp["signature"],
        user_handle=None,
        credential_public_key=cred.public_key,
        stored_sign_count=0,
    )
    assert new_count == 1


def test_export_import_round_trip(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    challenge = new_challenge()
    stored = verify_auth(
        auth.get(authentication_options(RP, challenge=challenge), ORIGIN), challenge, cred, user_id
    )
    for password in (None, b"hunter2"):
        restored = SoftwareAuthenticator.import_(json.dumps(auth.export(password)), password)
        (held,) = restored.credentials
        assert held.credential_id == cred.credential_id
        assert held.user_handle == user_id
        assert held.sign_count == stored
        assert held.public_key_cose() == cred.public_key
    challenge = new_challenge()
    resp = restored.get(authentication_options(RP, challenge=challenge), ORIGIN)
    assert verify_auth(resp, challenge, cred, user_id, stored_sign_count=stored) == stored + 1


def test_import_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        SoftwareAuthenticator.import_(b"not json")
    with pytest.raises(ValueError):
        SoftwareAuthenticator.import_({"format": "other", "version": 1, "credentials": []})
    bad = SoftwareAuthenticator().export()
    bad["credentials"] = [{"credential_id": "AA", "rp_id": "x", "user_handle": "AA"}]
    with pytest.raises(ValueError):
        SoftwareAuthenticator.import_(bad)


def test_extract_challenge() -> None:
    challenge = new_challenge()
    client_data = json.dumps({"type": "webauthn.get", "challenge": b64url(challenge)}).encode()
    assert extract_challenge(client_data) == challenge
    padded = json.dumps({"challenge": base64.urlsafe_b64encode(b"abcd").decode()}).encode()
    assert extract_challenge(padded) == b"abcd"
    for junk in (
        b"",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"challenge": 5}',
        b'{"challenge": "a+b/"}',
        b'{"challenge": "abcde"}',
        b'{"challenge": ""}',
        b'{"nope": "AAAA"}',
    ):
        assert extract_challenge(junk) is None


# -- registration failures -------------------------------------------------------------------


def test_registration_wrong_origin(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"u", challenge), "https://evil.test")
    with expect("origin not allowed"):
        verify_reg(resp, challenge)


def test_registration_wrong_rp_id(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"u", challenge), ORIGIN, rp_id="evil.test")
    with expect("rp id mismatch"):
        verify_reg(resp, challenge)


def test_registration_challenge_mismatch(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"u", challenge), ORIGIN)
    with expect("challenge mismatch"):
        verify_reg(resp, new_challenge())
    resp = auth.create(reg_options(b"u", challenge), ORIGIN, challenge=new_challenge())
    with expect("challenge mismatch"):
        verify_reg(resp, challenge)


def test_registration_user_not_present(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"u", challenge), ORIGIN, user_present=False)
    with expect("user not present"):
        verify_reg(resp, challenge)


def test_registration_wrong_type(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"u", challenge), ORIGIN, client_data_type="webauthn.get")
    with expect("wrong client data type"):
        verify_reg(resp, challenge)


def test_registration_attestation_for_another_credential(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"u1", challenge), ORIGIN)
    other = auth.create(reg_options(b"u2", new_challenge()), ORIGIN)
    resp["credential_id"] = other["credential_id"]
    with expect("credential id mismatch"):
        verify_reg(resp, challenge)


def test_registration_bad_attestation_objects(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"u", challenge), ORIGIN)
    auth_data = resp["authenticator_data"]
    for attestation_object in (
        b"\xff garbage",
        cbor2.dumps([1, 2]),
        # "none" attestation must have an empty statement (WebAuthn §8.7).
        cbor2.dumps({"fmt": "none", "attStmt": {"sig": b"x"}, "authData": auth_data}),
        cbor2.dumps({"fmt": "made-up", "attStmt": {}, "authData": auth_data}),
        # A self-attestation claim whose signature does not verify.
        cbor2.dumps({"fmt": "packed", "attStmt": {"alg": -7, "sig": b"0"}, "authData": auth_data}),
        # No attested credential data (AT clear).
        cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data[:37]}),
        cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data[:-3]}),
    ):
        resp["attestation_object"] = attestation_object
        with expect("bad attestation"):
            verify_reg(resp, challenge)


def test_registration_malformed_client_data(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"u", challenge), ORIGIN)
    for client_data in (b"", b"\xff", b"[]", b'{"type": "webauthn.create"}'):
        resp["client_data_json"] = client_data
        with expect("malformed client data"):
            verify_reg(resp, challenge)


def test_registration_cross_origin_rejected(auth: SoftwareAuthenticator) -> None:
    challenge = new_challenge()
    resp = auth.create(reg_options(b"u", challenge), ORIGIN)
    client_data = json.loads(resp["client_data_json"])
    client_data["crossOrigin"] = True
    resp["client_data_json"] = json.dumps(client_data).encode()
    with expect("cross-origin not allowed"):
        verify_reg(resp, challenge)


def test_authenticator_refuses_excluded_and_unsupported(auth: SoftwareAuthenticator) -> None:
    cred, user_id = register(auth)
    options = reg_options(user_id, new_challenge(), exclude_credential_ids=[cred.credential_id])
    with pytest.raises(AuthenticatorError, match="excluded"):
        auth.create(options, ORIGIN)
    rs256_only = json.loads(reg_options(b"u", new_challenge()))
    rs256_only["pubKeyCredParams"] = [{"type": "public-key", "alg": -257}]
    with pytest.raises(AuthenticatorError, match="algorithm"):
        auth.create(rs256_only, ORIGIN)


# -- authentication failures -----------------------------------------------------------------


def test_authentication_wrong_origin(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    challenge = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=challenge), "https://evil.test")
    with expect("origin not allowed"):
        verify_auth(resp, challenge, cred, user_id)


def test_authentication_wrong_rp_id(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    challenge = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN, rp_id="evil.test")
    with expect("rp id mismatch"):
        verify_auth(resp, challenge, cred, user_id)


def test_authentication_replayed_or_other_challenge(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    first = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=first), ORIGIN)
    stored = verify_auth(resp, first, cred, user_id)
    # A replay answers an old challenge, not the one the server issued now.
    with expect("challenge mismatch"):
        verify_auth(resp, new_challenge(), cred, user_id, stored_sign_count=stored)
    challenge = new_challenge()
    resp = auth.get(
        authentication_options(RP, challenge=challenge), ORIGIN, challenge=new_challenge()
    )
    with expect("challenge mismatch"):
        verify_auth(resp, challenge, cred, user_id, stored_sign_count=stored)


def test_authentication_user_not_present(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    challenge = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN, user_present=False)
    assert resp["authenticator_data"][32] & 0x01 == 0
    with expect("user not present"):
        verify_auth(resp, challenge, cred, user_id)


def test_authentication_cloned_authenticator(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    clone = SoftwareAuthenticator.import_(auth.export())
    challenge = new_challenge()
    stored = verify_auth(
        auth.get(authentication_options(RP, challenge=challenge), ORIGIN), challenge, cred, user_id
    )
    assert stored == 1
    challenge = new_challenge()
    resp = clone.get(authentication_options(RP, challenge=challenge), ORIGIN)
    with expect("sign count regression"):
        verify_auth(resp, challenge, cred, user_id, stored_sign_count=stored)


def test_authentication_forced_counter_regression(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    for forced, stored in ((5, 5), (4, 5), (0, 5)):
        challenge = new_challenge()
        resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN, sign_count=forced)
        with expect("sign count regression"):
            verify_auth(resp, challenge, cred, user_id, stored_sign_count=stored)
    challenge = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN, sign_count=6)
    assert verify_auth(resp, challenge, cred, user_id, stored_sign_count=5) == 6


def test_authentication_corrupted_signature(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    challenge = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN, corrupt_signature=True)
    with expect("bad signature"):
        verify_auth(resp, challenge, cred, user_id)
    # A bad signature is reported as such even when the counter also went backwards.
    challenge = new_challenge()
    resp = auth.get(
        authentication_options(RP, challenge=challenge),
        ORIGIN,
        corrupt_signature=True,
        sign_count=1,
    )
    with expect("bad signature"):
        verify_auth(resp, challenge, cred, user_id, stored_sign_count=9)
    resp["signature"] = b"not DER"
    with expect("bad signature"):
        verify_auth(resp, challenge, cred, user_id)


def test_authentication_tampered_authenticator_data(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    challenge = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN)
    data = bytearray(resp["authenticator_data"])
    data[-1] ^= 0x10  # raise the counter after signing
    resp["authenticator_data"] = bytes(data)
    with expect("bad signature"):
        verify_auth(resp, challenge, cred, user_id)
    resp["authenticator_data"] = b"short"
    with expect("malformed authenticator data"):
        verify_auth(resp, challenge, cred, user_id)


def test_authentication_wrong_type(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    challenge = new_challenge()
    resp = auth.get(
        authentication_options(RP, challenge=challenge), ORIGIN, client_data_type="webauthn.create"
    )
    with expect("wrong client data type"):
        verify_auth(resp, challenge, cred, user_id)


def test_authentication_user_handle_mismatch(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, _ = registered
    challenge = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN)
    with expect("user handle mismatch"):
        verify_auth(resp, challenge, cred, b"someone-else")
    with expect("user handle mismatch"):
        verify_authentication(
            RP,
            challenge=challenge,
            credential_id=resp["credential_id"],
            authenticator_data=resp["authenticator_data"],
            client_data_json=resp["client_data_json"],
            signature=resp["signature"],
            user_handle=resp["user_handle"],
            credential_public_key=cred.public_key,
            stored_sign_count=0,
        )


def test_authentication_signature_by_another_key(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    impostor = SoftwareAuthenticator()
    register(impostor, user_id)
    challenge = new_challenge()
    resp = impostor.get(authentication_options(RP, challenge=challenge), ORIGIN)
    resp["credential_id"] = cred.credential_id  # claim the victim's credential
    with expect("bad signature"):
        verify_auth(resp, challenge, cred, user_id)


def test_authentication_bad_stored_key(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    cred, user_id = registered
    challenge = new_challenge()
    resp = auth.get(authentication_options(RP, challenge=challenge), ORIGIN)
    broken = RegisteredCredential(
        credential_id=cred.credential_id,
        public_key=cbor2.dumps({1: 2, 3: -7}),
        sign_count=0,
        aaguid=cred.aaguid,
    )
    with expect("bad public key"):
        verify_auth(resp, challenge, broken, user_id)


def test_authenticator_finds_no_credential(
    auth: SoftwareAuthenticator, registered: tuple[RegisteredCredential, bytes]
) -> None:
    options = authentication_options(RP, challenge=new_challenge(), allow_credential_ids=[b"x"])
    with pytest.raises(AuthenticatorError):
        auth.get(options, ORIGIN)
    other_rp = json.loads(authentication_options(RP, challenge=new_challenge()))
    other_rp["rpId"] = "elsewhere.test"
    with pytest.raises(AuthenticatorError):
        auth.get(other_rp, ORIGIN)
    with pytest.raises(AuthenticatorError):
        SoftwareAuthenticator(enforce_rp_id_scope=True).create(
            reg_options(b"u", new_challenge()), "https://evil.test"
        )
