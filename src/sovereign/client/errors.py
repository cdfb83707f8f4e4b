"""Exceptions raised by :mod:`sovereign.client`.

Everything the SDK raises on purpose derives from :class:`ClientError`::

    ClientError
    ├── SovereignClientError   the server answered Error / AuthError (has .code)
    ├── ConnectError           the WebSocket could not be opened (HTTP status if any)
    ├── ConnectionLost         the connection dropped while a request was in flight
    ├── RequestTimeout         no response within the request timeout (also a TimeoutError)
    ├── SessionEnded           terminal: the server ended the session (4002/4003/4004/4005)
    ├── ClientClosed           the application called Client.close()
    ├── NotAuthenticated       a request before register/login/resume
    └── ProtocolViolation      the server answered with an unexpected message type
"""

from __future__ import annotations

from sovereign.errors import REGISTRY

__all__ = [
    "ClientClosed",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "NotAuthenticated",
    "ProtocolViolation",
    "RequestTimeout",
    "SessionEnded",
    "SovereignClientError",
]


class ClientError(Exception):
    """Base class of every exception the Sovereign client raises on purpose."""


class SovereignClientError(ClientError):
    """The server answered a request with ``Error`` or ``AuthError`` (SPEC §8).

    ``code`` is the registry code (e.g. 3004 RateLimited, 4001 GroupNotFound),
    ``retry_after_ms`` is set for 3004, ``fatal`` mirrors ``Error.fatal`` (AuthErrors
    with a fatal code are reported fatal too).
    """

    def __init__(
        self,
        code: int,
        message: str = "",
        retry_after_ms: int = 0,
        *,
        fatal: bool | None = None,
        request_type: int = 0,
    ) -> None:
        info = REGISTRY.get(code)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.fatal = (info.fatal if info is not None else False) if fatal is None else fatal
        self.request_type = request_type
        super().__init__(code, message)

    @property
    def name(self) -> str:
        """The registry name of ``code`` ("RateLimited", ...), or ``"Unknown"``."""
        info = REGISTRY.get(self.code)
        return info.name if info is not None else "Unknown"

    def __str__(self) -> str:
        extra = f", retry after {self.retry_after_ms} ms" if self.retry_after_ms else ""
        return f"{self.code} {self.name}: {self.message}{extra}"

    def __repr__(self) -> str:
        return f"SovereignClientError({self.code}, {self.message!r}, {self.retry_after_ms})"


class ConnectError(ClientError):
    """Opening the WebSocket failed (refused, TLS, HTTP 400/403/503, timeout)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ConnectionLost(ClientError):
    """The connection closed before the response arrived.

    ``close_code`` is the WebSocket close code the server sent, or 1006 when the socket
    dropped without one (or the client dropped it after a missed PONG).
    """

    def __init__(self, close_code: int = 1006, reason: str = "") -> None:
        self.close_code = close_code
        self.reason = reason
        super().__init__(
            f"connection lost (close code {close_code}{': ' + reason if reason else ''})"
        )


class RequestTimeout(ClientError, TimeoutError):
    """No response arrived within the request timeout."""


class SessionEnded(ClientError):
    """Terminal: the session can not continue, the client will not reconnect.

    Raised by :meth:`Client.wait_closed`, by pending requests and by event iterators
    when the server closed with 4002 (auth failed), 4003 (too many connections),
    4004 (session expired or revoked) or 4005 (account disabled), or when resuming
    the session failed for good (``error`` holds the AuthError, e.g. 1005).
    """

    def __init__(
        self,
        close_code: int | None,
        reason: str = "",
        *,
        error: SovereignClientError | None = None,
    ) -> None:
        self.close_code = close_code
        self.reason = reason
        self.error = error
        parts = []
        if close_code is not None:
            parts.append(f"close code {close_code}")
        if error is not None:
            parts.append(str(error))
        if reason:
            parts.append(reason)
        super().__init__("session ended: " + "; ".join(parts))


class ClientClosed(ClientError):
    """The client was closed by the application (:meth:`Client.close`)."""

    def __init__(self, message: str = "client closed") -> None:
        super().__init__(message)


class NotAuthenticated(ClientError):
    """A request needs a session: call register(), login() or resume() first."""


class ProtocolViolation(ClientError):
    """The server sent something the SPEC does not allow here (e.g. a wrong response type)."""
