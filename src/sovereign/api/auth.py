"""AUTH_* handlers (SPEC §4, §12.7): ceremonies over the connection state machine."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

from sovereign.api.parsing import Handler, parse
from sovereign.errors import AUTH_ERROR_CODES, CloseCode, ErrorCode, SovereignError
from sovereign.protocol.connection import Timeouts
from sovereign.protocol.types import MessageType as T
from sovereign.services.auth import AuthResult
from sovereign.services.session import Session, SyncState
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.services import Services

log = logging.getLogger("sovereign.api.auth")
#: SPEC §12.32: auth failures and limit hits, rate-limited; never a token or a name.
abuse = logging.getLogger("sovereign.abuse")
M = TypeVar("M", bound=Message)


def install(table: dict[int, Handler], svc: Services) -> None:
    auth, conns, outbox, tasks = svc.auth, svc.connections, svc.outbox, svc.tasks
    delivery = svc.delivery
    cfg = svc.config
    limits = Timeouts(cfg.auth_timeout, cfg.idle_timeout, cfg.max_auth_failures)

    async def guarded(s: Session, rid: str, work: Coroutine[Any, Any, None]) -> None:
        """Run one ceremony step; answer auth failures and count them (SPEC §4)."""
        try:
            await work
        except SovereignError as exc:
            if exc.code not in AUTH_ERROR_CODES:
                raise
            abuse.info(
                "auth failure conn=%s ip=%s error=%s", s.conn_id, s.link.source_ip(), exc.code
            )
            outbox.send_error(s, exc.code, rid, exc.message)  # fatal ones close too
            if not exc.fatal and s.state.auth_failed(limits):
                outbox.close(s, CloseCode.AUTH_FAILED, "too many failed attempts")

    def become_ready(s: Session, result: AuthResult) -> bool:
        return conns.authenticated(
            s,
            user_id=result.user.user_id,
            username=result.user.username,
            session_id=result.session.session_id,
            device_id=result.session.device_id,
            is_admin=result.user.is_admin,
        )

    def step(
        cls: type[M],
        work: Callable[[Session, str, M], Coroutine[Any, Any, None]],
        limited: bool = False,
        register: bool = False,
    ) -> Handler:
        """One ceremony step: parse, refuse once READY, apply the per-IP limits of
        SPEC §12.32 to the first step of a ceremony, run ``work`` guarded."""

        def handler(s: Session, _t: int, rid: str, payload: memoryview) -> None:
            msg = parse(outbox, s, cls, payload, rid)
            if msg is None:
                return
            if s.ready:
                outbox.send_error(s, ErrorCode.MALFORMED_MESSAGE, rid, "already authenticated")
                return
            if limited:
                ip = s.link.source_ip()
                wait_ms = auth.rate_limit(ip, register)
                if wait_ms:
                    abuse.info(
                        "auth rate limit conn=%s ip=%s %s",
                        s.conn_id,
                        ip,
                        "register" if register else "auth",
                    )
                    outbox.send_error(
                        s,
                        ErrorCode.RATE_LIMITED,
                        rid,
                        "too many attempts from this address",
                        wait_ms,
                    )
                    return
            tasks.spawn(s, rid, guarded(s, rid, work(s, rid, msg)))

        return handler

    # AUTH_REQUEST{username} -> AUTH_CHALLENGE ; AUTH_REQUEST{session_token} -> AUTH_SUCCESS
    async def auth_request(s: Session, rid: str, req: pb.AuthRequest) -> None:
        # SPEC §12.26: original clients resume with the token in ``username``
        # (43 base64url characters; a username is at most 32).
        token = req.session_token or (req.username if auth.is_token_shaped(req.username) else "")
        if token:
            # The device's sync reads ride on the token's read (one reader hop, not two).
            sync, device_read = delivery.resume_read()
            result = await auth.resume(token, device_read)
            if become_ready(s, result):
                s.sync = sync  # delivery's on_ready (send_success) takes it from here
                send_success(s, rid, result)
            return
        challenge, options = await auth.login_begin(req.username)
        outbox.send(
            s,
            T.AUTH_CHALLENGE,
            rid,
            pb.AuthChallenge(challenge=challenge, credential_request_options=options),
        )

    async def auth_response(s: Session, rid: str, resp: pb.AuthResponse) -> None:
        result = await auth.login_finish(
            credential_id=resp.credential_id,
            authenticator_data=resp.authenticator_data,
            client_data_json=resp.client_data_json,
            signature=resp.signature,
            user_handle=resp.user_handle,
            user_agent=s.link.user_agent(),
        )
        if become_ready(s, result):
            send_success(s, rid, result)

    async def register_request(s: Session, rid: str, req: pb.AuthRegisterRequest) -> None:
        challenge, options = await auth.register_begin(
            req.username, req.display_name, req.invite_code
        )
        outbox.send(
            s,
            T.AUTH_REGISTER_CHALLENGE,
            rid,
            pb.AuthRegisterChallenge(challenge=challenge, credential_creation_options=options),
        )

    async def register_response(s: Session, rid: str, resp: pb.AuthRegisterResponse) -> None:
        result = await auth.register_finish(
            credential_id=resp.credential_id,
            authenticator_data=resp.authenticator_data,
            client_data_json=resp.client_data_json,
            attestation_object=resp.attestation_object,
            user_agent=s.link.user_agent(),
        )
        if become_ready(s, result):
            outbox.send(
                s,
                T.AUTH_REGISTER_SUCCESS,
                rid,
                pb.AuthRegisterSuccess(user_id=result.user.user_id, session_token=result.token),
            )
            conns.ready(s)

    def send_success(s: Session, rid: str, result: AuthResult) -> None:
        """AUTH_SUCCESS, in the READY sync's first write (SyncState.head): with no backlog
        to read, one write carries it, SYNC_COMPLETE and presence."""
        if s.sync is None:
            s.sync = SyncState()
        s.sync.head = outbox.response_frame(
            T.AUTH_SUCCESS,
            rid,
            pb.AuthSuccess(
                session_token=result.token,
                user_id=result.user.user_id,
                username=result.user.username,
                display_name=result.user.display_name,
                is_admin=result.user.is_admin,
                server_name=svc.config.server_name,
            ),
        )
        conns.ready(s)

    table[T.AUTH_REQUEST] = step(pb.AuthRequest, auth_request, limited=True)
    table[T.AUTH_RESPONSE] = step(pb.AuthResponse, auth_response)
    table[T.AUTH_REGISTER_REQUEST] = step(
        pb.AuthRegisterRequest, register_request, limited=True, register=True
    )
    table[T.AUTH_REGISTER_RESPONSE] = step(pb.AuthRegisterResponse, register_response)
