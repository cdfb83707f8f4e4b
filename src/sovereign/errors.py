"""One error registry (SPEC §8) and the WebSocket close codes (SPEC §4).

Services raise :class:`SovereignError` with a registry code; the transport renders an
``Error`` envelope (or ``AuthError`` for auth failures), the admin API renders
``{"error": {"code", "message"}}`` with the registry's HTTP status. Internal details
never reach a client: unexpected exceptions become 9001 with a generic message.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    code: int
    name: str
    fatal: bool
    http_status: int
    #: For fatal codes: the WebSocket close code that follows the error (SPEC §4, §12.20).
    close_code: int | None = None
    #: Rendered as AUTH_ERROR rather than ERROR (SPEC §12.7).
    auth: bool = False


class ErrorCode(IntEnum):
    INVALID_CREDENTIAL = 1001
    EXPIRED_SESSION = 1002
    REGISTRATION_FAILED = 1003
    CHALLENGE_FAILED = 1004
    SESSION_REVOKED = 1005
    AUTH_REQUIRED = 1006
    NOT_GROUP_ADMIN = 2001
    NOT_GROUP_MEMBER = 2002
    NOT_ADMIN = 2003
    ACCOUNT_DISABLED = 2004
    MALFORMED_MESSAGE = 3001
    UNKNOWN_MESSAGE_TYPE = 3002
    MESSAGE_TOO_LARGE = 3003
    RATE_LIMITED = 3004
    INVALID_ENVELOPE = 3005
    GROUP_NOT_FOUND = 4001
    ALREADY_MEMBER = 4002
    NOT_MEMBER = 4003
    CANNOT_REMOVE_SELF = 4004
    GROUP_FULL = 4005
    USER_NOT_FOUND = 4006
    INVALID_KEY_PACKAGE = 5001
    INVALID_COMMIT = 5002
    INVALID_WELCOME = 5003
    EPOCH_MISMATCH = 5004
    NO_KEY_PACKAGE_AVAILABLE = 5005
    NO_GROUP_INFO = 5006
    INTERNAL_ERROR = 9001
    DATABASE_ERROR = 9002
    SERVICE_UNAVAILABLE = 9003


class CloseCode(IntEnum):
    """WebSocket close codes (SPEC §4)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003  # text frame
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # slow reader dropped; not in SPEC §4, see docs/decisions.md
    AUTH_TIMEOUT = 4001
    AUTH_FAILED = 4002
    TOO_MANY_CONNECTIONS = 4003
    SESSION_INVALID = 4004  # expired or revoked
    ACCOUNT_DISABLED = 4005
    SERVER_SHUTDOWN = 4006
    PROTOCOL_ERROR = 4007
    IDLE_TIMEOUT = 4008


def _info(
    code: ErrorCode,
    name: str,
    fatal: bool,
    http: int,
    close: CloseCode | None = None,
    *,
    auth: bool = False,
) -> ErrorInfo:
    if fatal and close is None:
        raise ValueError(f"fatal error {code} needs a close code")
    return ErrorInfo(int(code), name, fatal, http, None if close is None else int(close), auth)


E = ErrorCode
REGISTRY: dict[int, ErrorInfo] = {
    i.code: i
    for i in (
        _info(E.INVALID_CREDENTIAL, "InvalidCredential", False, 401, auth=True),
        _info(E.EXPIRED_SESSION, "ExpiredSession", True, 401, CloseCode.SESSION_INVALID, auth=True),
        _info(E.REGISTRATION_FAILED, "RegistrationFailed", False, 400, auth=True),
        _info(E.CHALLENGE_FAILED, "ChallengeFailed", False, 401, auth=True),
        _info(E.SESSION_REVOKED, "SessionRevoked", True, 401, CloseCode.SESSION_INVALID, auth=True),
        _info(E.AUTH_REQUIRED, "AuthRequired", True, 401, CloseCode.PROTOCOL_ERROR),
        _info(E.NOT_GROUP_ADMIN, "NotGroupAdmin", False, 403),
        _info(E.NOT_GROUP_MEMBER, "NotGroupMember", False, 403),
        _info(E.NOT_ADMIN, "NotAdmin", False, 403),
        _info(
            E.ACCOUNT_DISABLED, "AccountDisabled", True, 403, CloseCode.ACCOUNT_DISABLED, auth=True
        ),
        _info(E.MALFORMED_MESSAGE, "MalformedMessage", False, 400),
        _info(E.UNKNOWN_MESSAGE_TYPE, "UnknownMessageType", False, 400),
        _info(E.MESSAGE_TOO_LARGE, "MessageTooLarge", False, 413),
        _info(E.RATE_LIMITED, "RateLimited", False, 429),
        _info(E.INVALID_ENVELOPE, "InvalidEnvelope", False, 400),
        _info(E.GROUP_NOT_FOUND, "GroupNotFound", False, 404),
        _info(E.ALREADY_MEMBER, "AlreadyMember", False, 409),
        _info(E.NOT_MEMBER, "NotMember", False, 404),
        _info(E.CANNOT_REMOVE_SELF, "CannotRemoveSelf", False, 400),
        _info(E.GROUP_FULL, "GroupFull", False, 409),
        _info(E.USER_NOT_FOUND, "UserNotFound", False, 404),
        _info(E.INVALID_KEY_PACKAGE, "InvalidKeyPackage", False, 400),
        _info(E.INVALID_COMMIT, "InvalidCommit", False, 400),
        _info(E.INVALID_WELCOME, "InvalidWelcome", False, 400),
        _info(E.EPOCH_MISMATCH, "EpochMismatch", False, 409),
        _info(E.NO_KEY_PACKAGE_AVAILABLE, "NoKeyPackageAvailable", False, 404),
        _info(E.NO_GROUP_INFO, "NoGroupInfo", False, 404),
        _info(E.INTERNAL_ERROR, "InternalError", False, 500),
        _info(E.DATABASE_ERROR, "DatabaseError", False, 500),
        _info(E.SERVICE_UNAVAILABLE, "ServiceUnavailable", True, 503, CloseCode.INTERNAL_ERROR),
    )
}

#: Codes that are reported with an AUTH_ERROR envelope rather than ERROR (SPEC §12.7).
AUTH_ERROR_CODES = frozenset(code for code, i in REGISTRY.items() if i.auth)


def info(code: int) -> ErrorInfo:
    return REGISTRY[code]


class SovereignError(Exception):
    """A client-visible protocol error carrying a registry code.

    ``message`` is shown to the client: it must never hold secrets, tokens,
    payloads or internal details.
    """

    __slots__ = ("code", "message", "retry_after_ms")

    def __init__(self, code: int, message: str = "", *, retry_after_ms: int = 0) -> None:
        if code not in REGISTRY:
            raise ValueError(f"unregistered error code {code}")
        self.code = int(code)
        self.message = message or REGISTRY[code].name
        self.retry_after_ms = retry_after_ms
        super().__init__(self.code, self.message)

    @property
    def fatal(self) -> bool:
        return REGISTRY[self.code].fatal

    @property
    def name(self) -> str:
        return REGISTRY[self.code].name

    def __repr__(self) -> str:
        return f"SovereignError({self.code} {self.name}: {self.message!r})"
