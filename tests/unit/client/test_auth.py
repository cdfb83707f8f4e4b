"""The auth ceremonies (sovereign.client.auth) without a server: a fake session and a
fake request table that answers each step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from sovereign.client.auth import Auth
from sovereign.client.errors import ClientError, SessionEnded, SovereignClientError
from sovereign.client.events import Device
from sovereign.errors import CloseCode, ErrorCode
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb


@dataclass(eq=False)
class FakeSession:
    device: Device | None = None
    opened: list[object] = field(default_factory=list)
    abandoned: list[object] = field(default_factory=list)

    def check_open(self) -> None:
        pass

    async def open(self) -> object:
        conn = object()
        self.opened.append(conn)
        return conn

    def abandon(self, conn: object) -> None:
        self.abandoned.append(conn)

    def is_current(self, conn: object) -> bool:
        return conn is self.opened[-1]

    def mark_ready(self, conn: object, device: Device) -> None:
        self.device = device


@dataclass(eq=False)
class FakeRequests:
    """Answers AUTH_REQUEST{session_token} with ``answer``: a response or an exception."""

    answer: tuple[int, bytes] | Exception

    async def call(
        self,
        msg_type: int,
        payload: bytes,
        *,
        on_response: Callable[[int, bytes], None] | None = None,
        **_: Any,
    ) -> tuple[int, bytes]:
        assert pb.AuthRequest.FromString(payload).session_token == "tok"
        if isinstance(self.answer, Exception):
            raise self.answer
        if on_response is not None:
            on_response(*self.answer)
        return self.answer


def make(answer: tuple[int, bytes] | Exception) -> tuple[Auth, FakeSession]:
    session = FakeSession()
    settings = SimpleNamespace(authenticator=None, origin="http://x", request_timeout=1.0)
    return Auth(settings, session, FakeRequests(answer)), session


async def test_resume_marks_the_connection_ready_with_the_device() -> None:
    success = pb.AuthSuccess(session_token="tok2", user_id="u1", username="ann")
    auth, session = make((T.AUTH_SUCCESS, success.SerializeToString()))
    device = await auth.resume("tok")
    assert (device.token, device.user_id, device.username) == ("tok2", "u1", "ann")
    assert session.device is device and session.abandoned == []
    with pytest.raises(ClientError, match="already authenticated as u1"):
        await auth.resume("tok")


@pytest.mark.parametrize(
    ("code", "close_code"),
    [
        (ErrorCode.INVALID_CREDENTIAL, None),  # not fatal: no close follows
        (ErrorCode.EXPIRED_SESSION, CloseCode.SESSION_INVALID),
        (ErrorCode.SESSION_REVOKED, CloseCode.SESSION_INVALID),
        (ErrorCode.ACCOUNT_DISABLED, CloseCode.ACCOUNT_DISABLED),
        (ErrorCode.SERVICE_UNAVAILABLE, CloseCode.INTERNAL_ERROR),  # fatal, not auth
    ],
)
async def test_a_refused_resume_after_a_drop_ends_the_session(
    code: ErrorCode, close_code: CloseCode | None
) -> None:
    error = SovereignClientError(code)
    auth, session = make(error)
    with pytest.raises(SessionEnded) as ended:
        await auth.resume_after_drop("tok")
    assert ended.value.close_code == close_code and ended.value.error is error
    assert session.abandoned == session.opened  # the failed connection was closed


async def test_other_refusals_leave_the_reconnect_loop_going() -> None:
    auth, _ = make(SovereignClientError(ErrorCode.CHALLENGE_FAILED))
    with pytest.raises(SovereignClientError):
        await auth.resume_after_drop("tok")
