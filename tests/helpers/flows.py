"""Real WebAuthn ceremonies over a real connection, for tests."""

from __future__ import annotations

from dataclasses import dataclass

from sovereign.client.authenticator import SoftwareAuthenticator
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.server import ORIGIN
from tests.helpers.wsclient import WsClient


@dataclass
class Account:
    user_id: str
    username: str
    token: str
    authenticator: SoftwareAuthenticator


async def register(
    client: WsClient,
    username: str,
    *,
    invite_code: str = "",
    authenticator: SoftwareAuthenticator | None = None,
    display_name: str = "",
    sync: bool = True,
) -> Account:
    auth = authenticator or SoftwareAuthenticator()
    challenge = await client.request(
        T.AUTH_REGISTER_REQUEST,
        pb.AuthRegisterRequest(
            username=username, display_name=display_name or username, invite_code=invite_code
        ),
        T.AUTH_REGISTER_CHALLENGE,
    )
    ok = await client.request(
        T.AUTH_REGISTER_RESPONSE,
        registration_response(auth, challenge.credential_creation_options),
        T.AUTH_REGISTER_SUCCESS,
    )
    if sync:
        await client.until_sync()
    return Account(ok.user_id, username, ok.session_token, auth)


def registration_response(
    auth: SoftwareAuthenticator, options: bytes, origin: str = ORIGIN
) -> pb.AuthRegisterResponse:
    """A real attestation by ``auth`` for these creation options, as the wire message."""
    att = auth.create(options, origin)
    return pb.AuthRegisterResponse(
        credential_id=att["credential_id"],
        authenticator_data=att["authenticator_data"],
        client_data_json=att["client_data_json"],
        attestation_object=att["attestation_object"],
    )


def assertion_response(
    auth: SoftwareAuthenticator, options: bytes, origin: str = ORIGIN, **knobs: object
) -> pb.AuthResponse:
    a = auth.get(options, origin, **knobs)
    return pb.AuthResponse(
        credential_id=a["credential_id"],
        authenticator_data=a["authenticator_data"],
        client_data_json=a["client_data_json"],
        signature=a["signature"],
        user_handle=a["user_handle"] or b"",
    )


async def login(client: WsClient, account: Account, *, sync: bool = True) -> pb.AuthSuccess:
    challenge = await client.request(
        T.AUTH_REQUEST, pb.AuthRequest(username=account.username), T.AUTH_CHALLENGE
    )
    success: pb.AuthSuccess = await client.request(
        T.AUTH_RESPONSE,
        assertion_response(account.authenticator, challenge.credential_request_options),
        T.AUTH_SUCCESS,
    )
    if sync:
        await client.until_sync()
    return success


async def resume(client: WsClient, token: str, *, sync: bool = True) -> pb.AuthSuccess:
    """Resume by token; with ``sync`` also consume the backlog up to SYNC_COMPLETE."""
    success: pb.AuthSuccess = await client.request(
        T.AUTH_REQUEST, pb.AuthRequest(session_token=token), T.AUTH_SUCCESS
    )
    if sync:
        await client.until_sync()
    return success
