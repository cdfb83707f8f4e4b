"""AUTH_* handlers (SPEC §4, §12.7): ceremonies over the connection state machine."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

from sovereign.api.parsing import parse
from sovereign.errors import AUTH_ERROR_CODES, CloseCode, SovereignError
from sovereign.protocol.types import MessageType as T
from sovereign.services.auth import AuthResult
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.server import App
    from sovereign.transport.ws import Connection

log = logging.getLogger("sovereign.api.auth")
M = TypeVar("M", bound=Message)

_CLOSE_FOR: dict[int, int] = {
    1002: CloseCode.SESSION_INVALID,
    1005: CloseCode.SESSION_INVALID,
    2004: CloseCode.ACCOUNT_DISABLED,
}


def install(app: App) -> None:
    auth = app.auth

    def user_agent(conn: Connection) -> str:
        t = conn.transport
        return (t.request.headers.get("User-Agent", "") if t is not None else "")[:200]

    async def guarded(conn: Connection, request_id: str, work: object) -> None:
        """Run one ceremony step; map failures to AuthError and count them (SPEC §4)."""
        try:
            await work  # type: ignore[misc]
        except SovereignError as exc:
            if exc.code not in AUTH_ERROR_CODES:
                raise
            fatal_close = _CLOSE_FOR.get(exc.code)
            conn.send(
                T.AUTH_ERROR, request_id, pb.AuthError(error_code=exc.code, message=exc.message)
            )
            if fatal_close is not None:
                conn.close(fatal_close, exc.name)
            elif conn.state.auth_failed(app.timeouts):
                conn.close(CloseCode.AUTH_FAILED, "too many failed attempts")

    def become_ready(conn: Connection, result: AuthResult) -> bool:
        return app.mark_ready(
            conn,
            user_id=result.user.user_id,
            username=result.user.username,
            session_id=result.session.session_id,
            device_id=result.session.device_id,
            is_admin=result.user.is_admin,
        )

    def step(
        cls: type[M], work: Callable[[Connection, str, M], Coroutine[Any, Any, None]]
    ) -> Callable[[Connection, int, str, memoryview], None]:
        """One ceremony step: parse, refuse once READY, run ``work`` guarded."""

        def handler(conn: Connection, _t: int, rid: str, payload: memoryview) -> None:
            msg = parse(conn, cls, payload, rid)
            if msg is None:
                return
            if conn.ready:
                conn.send_error(3001, rid, "already authenticated")
                return
            app.spawn(conn, rid, guarded(conn, rid, work(conn, rid, msg)))

        return handler

    # AUTH_REQUEST{username} -> AUTH_CHALLENGE ; AUTH_REQUEST{session_token} -> AUTH_SUCCESS
    async def auth_request(conn: Connection, rid: str, req: pb.AuthRequest) -> None:
        if req.session_token:
            result = await auth.resume(req.session_token)
            if become_ready(conn, result):
                send_success(conn, rid, result)
            return
        challenge, options = await auth.login_begin(req.username)
        conn.send(
            T.AUTH_CHALLENGE,
            rid,
            pb.AuthChallenge(challenge=challenge, credential_request_options=options),
        )

    async def auth_response(conn: Connection, rid: str, resp: pb.AuthResponse) -> None:
        result = await auth.login_finish(
            credential_id=resp.credential_id,
            authenticator_data=resp.authenticator_data,
            client_data_json=resp.client_data_json,
            signature=resp.signature,
            user_handle=resp.user_handle,
            user_agent=user_agent(conn),
        )
        if become_ready(conn, result):
            send_success(conn, rid, result)

    async def register_request(conn: Connection, rid: str, req: pb.AuthRegisterRequest) -> None:
        challenge, options = await auth.register_begin(
            req.username, req.display_name, req.invite_code
        )
        conn.send(
            T.AUTH_REGISTER_CHALLENGE,
            rid,
            pb.AuthRegisterChallenge(challenge=challenge, credential_creation_options=options),
        )

    async def register_response(conn: Connection, rid: str, resp: pb.AuthRegisterResponse) -> None:
        result = await auth.register_finish(
            credential_id=resp.credential_id,
            authenticator_data=resp.authenticator_data,
            client_data_json=resp.client_data_json,
            attestation_object=resp.attestation_object,
            user_agent=user_agent(conn),
        )
        if become_ready(conn, result):
            conn.send(
                T.AUTH_REGISTER_SUCCESS,
                rid,
                pb.AuthRegisterSuccess(user_id=result.user.user_id, session_token=result.token),
            )
            app.on_ready(conn)

    def send_success(conn: Connection, rid: str, result: AuthResult) -> None:
        conn.send(
            T.AUTH_SUCCESS,
            rid,
            pb.AuthSuccess(
                session_token=result.token,
                user_id=result.user.user_id,
                username=result.user.username,
                display_name=result.user.display_name,
                is_admin=result.user.is_admin,
                server_name=app.config.server_name,
            ),
        )
        app.on_ready(conn)

    app.handlers[T.AUTH_REQUEST] = step(pb.AuthRequest, auth_request)
    app.handlers[T.AUTH_RESPONSE] = step(pb.AuthResponse, auth_response)
    app.handlers[T.AUTH_REGISTER_REQUEST] = step(pb.AuthRegisterRequest, register_request)
    app.handlers[T.AUTH_REGISTER_RESPONSE] = step(pb.AuthRegisterResponse, register_response)
