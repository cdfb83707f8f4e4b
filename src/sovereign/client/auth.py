"""The auth ceremonies (SPEC §4, §12.7): register, login and resume.

* register: AUTH_REGISTER_REQUEST → AUTH_REGISTER_CHALLENGE → the authenticator makes
  a credential → AUTH_REGISTER_RESPONSE → AUTH_REGISTER_SUCCESS;
* login: AUTH_REQUEST{username} → AUTH_CHALLENGE → the authenticator signs an
  assertion → AUTH_RESPONSE → AUTH_SUCCESS (every login is a new device);
* resume: AUTH_REQUEST{session_token} → AUTH_SUCCESS (the same device and cursors).

Each ceremony opens a fresh connection through the session, sends its steps bound to
that connection, and on success marks it READY synchronously, before any later frame of
it is processed (the sync backlog follows right behind). A failed ceremony closes its
connection. One ceremony runs at a time, the reconnect loop's resume included.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, TypeVar

from google.protobuf.message import Message

from sovereign.client._transport import Connection
from sovereign.client.authenticator import AssertionResponse, RegistrationResponse
from sovereign.client.errors import ClientError, SessionEnded, SovereignClientError
from sovereign.client.events import Device
from sovereign.client.requests import parse_response
from sovereign.errors import REGISTRY, ErrorCode
from sovereign.protocol.types import MessageType
from sovereign.v1 import sovereign_pb2 as pb

__all__ = ["TERMINAL_AUTH_CODES", "Auth", "AuthSettings", "Authenticator"]

T = MessageType
M = TypeVar("M", bound=Message)

#: AuthError codes that make resuming a session pointless: unknown token, expired,
#: revoked, account disabled (SPEC §12.7).
TERMINAL_AUTH_CODES: Final = frozenset(
    {
        ErrorCode.INVALID_CREDENTIAL,
        ErrorCode.EXPIRED_SESSION,
        ErrorCode.SESSION_REVOKED,
        ErrorCode.ACCOUNT_DISABLED,
    }
)
_SUCCESS: Final = frozenset({T.AUTH_SUCCESS, T.AUTH_REGISTER_SUCCESS})


class Authenticator(Protocol):
    """A WebAuthn authenticator the client can drive (sync or async).

    :class:`~sovereign.client.authenticator.SoftwareAuthenticator` is one; a wrapper
    around a hardware key or an OS passkey API can be another. ``options_json`` is the
    server's PublicKeyCredentialCreationOptions / RequestOptions JSON; ``origin`` the
    web origin to put in clientDataJSON (it must be one of the server's ``rp_origins``).
    """

    def create(
        self, options_json: bytes, origin: str
    ) -> RegistrationResponse | Awaitable[RegistrationResponse]:
        """Make a credential: credential_id, client_data_json, attestation_object, …"""
        ...

    def get(
        self, options_json: bytes, origin: str
    ) -> AssertionResponse | Awaitable[AssertionResponse]:
        """Sign an assertion: credential_id, authenticator_data, client_data_json, …"""
        ...


class AuthSettings(Protocol):
    """The client options the ceremonies read (live: changing them on the client counts)."""

    @property
    def authenticator(self) -> Authenticator | None: ...
    @property
    def origin(self) -> str: ...
    @property
    def request_timeout(self) -> float: ...


class Connector(Protocol):
    """What a ceremony needs from the session."""

    @property
    def device(self) -> Device | None: ...
    def check_open(self) -> None: ...
    async def open(self) -> Connection: ...
    def abandon(self, conn: Connection) -> None: ...
    def is_current(self, conn: Connection) -> bool: ...
    def mark_ready(self, conn: Connection, device: Device) -> None: ...


class Caller(Protocol):
    """How a ceremony sends its steps (the request table)."""

    async def call(
        self,
        msg_type: int,
        payload: bytes,
        *,
        timeout: float | None = None,
        bound: Connection | None = None,
        on_response: Callable[[int, bytes], None] | None = None,
    ) -> tuple[int, bytes]: ...


class Auth:
    """Runs the ceremonies for one client. See the module docstring."""

    def __init__(self, settings: AuthSettings, session: Connector, requests: Caller) -> None:
        self._settings = settings
        self._session = session
        self._requests = requests
        self._lock = asyncio.Lock()

    async def register(self, username: str, display_name: str, invite_code: str) -> Device:
        authenticator = self._require_authenticator()

        async def steps(conn: Connection) -> None:
            challenge = await self._step(
                conn,
                T.AUTH_REGISTER_REQUEST,
                pb.AuthRegisterRequest(
                    username=username, display_name=display_name, invite_code=invite_code
                ),
                T.AUTH_REGISTER_CHALLENGE,
                pb.AuthRegisterChallenge,
            )
            att: RegistrationResponse = await _maybe_await(
                authenticator.create(
                    bytes(challenge.credential_creation_options), self._settings.origin
                )
            )
            await self._step(
                conn,
                T.AUTH_REGISTER_RESPONSE,
                pb.AuthRegisterResponse(
                    credential_id=att["credential_id"],
                    authenticator_data=att["authenticator_data"],
                    client_data_json=att["client_data_json"],
                    attestation_object=att["attestation_object"],
                ),
                T.AUTH_REGISTER_SUCCESS,
                pb.AuthRegisterSuccess,
                username=username,
                display_name=display_name or username,
            )

        return await self._ceremony(steps)

    async def login(self, username: str) -> Device:
        authenticator = self._require_authenticator()

        async def steps(conn: Connection) -> None:
            challenge = await self._step(
                conn,
                T.AUTH_REQUEST,
                pb.AuthRequest(username=username),
                T.AUTH_CHALLENGE,
                pb.AuthChallenge,
            )
            assertion: AssertionResponse = await _maybe_await(
                authenticator.get(
                    bytes(challenge.credential_request_options), self._settings.origin
                )
            )
            await self._step(
                conn,
                T.AUTH_RESPONSE,
                pb.AuthResponse(
                    credential_id=assertion["credential_id"],
                    authenticator_data=assertion["authenticator_data"],
                    client_data_json=assertion["client_data_json"],
                    signature=assertion["signature"],
                    user_handle=assertion["user_handle"] or b"",
                ),
                T.AUTH_SUCCESS,
                pb.AuthSuccess,
            )

        return await self._ceremony(steps)

    async def _ceremony(self, steps: Callable[[Connection], Awaitable[None]]) -> Device:
        """A passkey ceremony on a fresh connection, one at a time; on any failure the
        connection is abandoned (closed) and the error raised."""
        async with self._lock:
            self._check_can_authenticate()
            conn = await self._session.open()
            try:
                await steps(conn)
            except BaseException:
                self._session.abandon(conn)
                raise
        return self._device()

    async def resume(self, token: str) -> Device:
        async with self._lock:
            self._check_can_authenticate()
            await self._resume_on_new_connection(token)
        return self._device()

    async def resume_after_drop(self, token: str) -> None:
        """The reconnect loop's resume (the device is known already). Raises
        :class:`SessionEnded` when the server refuses the token for good."""
        try:
            async with self._lock:
                await self._resume_on_new_connection(token)
        except SovereignClientError as exc:
            if exc.code in TERMINAL_AUTH_CODES or exc.fatal:
                raise SessionEnded(
                    _close_code_after(exc.code), "resume refused", error=exc
                ) from exc
            raise

    async def _resume_on_new_connection(self, token: str) -> None:
        conn = await self._session.open()
        try:
            await self._step(
                conn,
                T.AUTH_REQUEST,
                pb.AuthRequest(session_token=token),
                T.AUTH_SUCCESS,
                pb.AuthSuccess,
            )
        except BaseException:
            self._session.abandon(conn)
            raise

    def _require_authenticator(self) -> Authenticator:
        authenticator = self._settings.authenticator
        if authenticator is None:
            raise ValueError("this needs an authenticator: Client(url, authenticator=...)")
        return authenticator

    def _check_can_authenticate(self) -> None:
        self._session.check_open()
        device = self._session.device
        if device is not None:
            raise ClientError(
                f"already authenticated as {device.user_id}; use a new Client for another device"
            )

    def _device(self) -> Device:
        device = self._session.device
        assert device is not None  # set by _authenticated before the last step returned
        return device

    async def _step(
        self,
        conn: Connection,
        msg_type: MessageType,
        message: Message,
        expect: MessageType,
        cls: type[M],
        *,
        username: str = "",
        display_name: str = "",
    ) -> M:
        def on_response(rtype: int, payload: bytes) -> None:
            if rtype in _SUCCESS:
                self._authenticated(conn, rtype, payload, username, display_name)

        rtype, payload = await self._requests.call(
            msg_type,
            message.SerializeToString(),
            bound=conn,
            on_response=on_response if expect in _SUCCESS else None,
            timeout=self._settings.request_timeout,
        )
        return parse_response(msg_type, rtype, payload, expect, cls)

    def _authenticated(
        self, conn: Connection, rtype: int, payload: bytes, username: str, display_name: str
    ) -> None:
        """Runs synchronously on AUTH_SUCCESS / AUTH_REGISTER_SUCCESS, before any event of
        the new connection is processed (the sync backlog follows right behind)."""
        if not self._session.is_current(conn):
            return
        if rtype == T.AUTH_SUCCESS:
            s = pb.AuthSuccess.FromString(payload)
            device = Device(
                token=s.session_token,
                user_id=s.user_id,
                username=s.username,
                display_name=s.display_name,
                is_admin=s.is_admin,
                server_name=s.server_name,
            )
        else:
            r = pb.AuthRegisterSuccess.FromString(payload)
            device = Device(
                token=r.session_token,
                user_id=r.user_id,
                username=username,
                display_name=display_name,
            )
        self._session.mark_ready(conn, device)


async def _maybe_await(value: Any) -> Any:
    """An authenticator may be sync or async."""
    if inspect.isawaitable(value):
        return await value
    return value


def _close_code_after(code: int) -> int | None:
    """The close code the server follows a fatal error ``code`` with (None: not fatal,
    or a code this client does not know)."""
    info = REGISTRY.get(code)
    return info.close_code if info is not None else None
