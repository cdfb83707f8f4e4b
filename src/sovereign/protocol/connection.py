"""Connection state machine (SPEC §4). No I/O: the transport feeds it events and
carries out the decisions it returns.

Theory of operation
-------------------
A connection exists from the WebSocket upgrade on. Its phases::

    CONNECTING --upgrade--> AUTHENTICATING --auth ok--> READY --> CLOSED
                                  |                        |
                                  +--------- close --------+

Rules (each cites SPEC):

* AUTHENTICATING must end within ``auth_timeout`` of the upgrade, else close 4001.
  Frames, PINGs included, do not extend it (§12.7).
* In every phase a connection that receives nothing for ``idle_timeout`` is closed
  with 4008; every received frame restarts that clock (§12.7).
* Before READY only the pre-auth types are accepted; anything else is a fatal
  1006 and close 4007 (§4, §12.7). The check itself lives in the dispatcher.
* Liveness (§12.31): after ``ping_interval`` without a received frame the server
  sends a WebSocket ping (once); when nothing arrives within ``ping_timeout`` after
  it the connection is closed with 4008, so a dead peer goes within
  ``ping_interval + ping_timeout`` (45 s by default) instead of ``idle_timeout``.
* Up to ``max_auth_failures`` failed attempts are answered with a non-fatal
  AuthError; the next failure is fatal and closes 4002 (§4).
* CLOSED is terminal: every later event is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from sovereign.errors import CloseCode


class Phase(IntEnum):
    CONNECTING = 0
    AUTHENTICATING = 1
    READY = 2
    CLOSED = 3


@dataclass(frozen=True, slots=True)
class Timeouts:
    auth_timeout: float
    idle_timeout: float
    max_auth_failures: int
    ping_interval: float = 30.0
    ping_timeout: float = 15.0


# Allowed transitions: a table, not scattered ifs.
_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.CONNECTING: frozenset({Phase.AUTHENTICATING, Phase.CLOSED}),
    Phase.AUTHENTICATING: frozenset({Phase.READY, Phase.CLOSED}),
    Phase.READY: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


class ConnectionState:
    """Per-connection protocol state. Small on purpose: one exists per socket."""

    __slots__ = (
        "auth_failures",
        "close_code",
        "last_received",
        "opened_at",
        "phase",
        "ping_sent_at",
    )

    def __init__(self) -> None:
        self.phase = Phase.CONNECTING
        self.opened_at = 0.0
        self.last_received = 0.0
        self.auth_failures = 0
        self.close_code: int | None = None
        self.ping_sent_at = 0.0  # the last server ping, if after ``last_received``

    # -- transitions --------------------------------------------------------
    def _move(self, to: Phase) -> None:
        if to not in _TRANSITIONS[self.phase]:
            raise InvalidTransition(f"{self.phase.name} -> {to.name}")
        self.phase = to

    def upgraded(self, now: float) -> None:
        self._move(Phase.AUTHENTICATING)
        self.opened_at = now
        self.last_received = now

    def authenticated(self) -> None:
        self._move(Phase.READY)

    def closing(self, code: int) -> bool:
        """Enter CLOSED; returns False if already closed (the caller sends nothing)."""
        if self.phase is Phase.CLOSED:
            return False
        self.phase = Phase.CLOSED
        self.close_code = code
        return True

    # -- events -------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def frame_received(self, now: float) -> None:
        self.last_received = now

    def auth_failed(self, limits: Timeouts) -> bool:
        """Record one failed attempt; True when this one must be fatal (close 4002)."""
        self.auth_failures += 1
        return self.auth_failures > limits.max_auth_failures

    def expired(self, now: float, limits: Timeouts) -> CloseCode | None:
        """The close code a timer owes this connection at ``now``, if any."""
        if self.phase is Phase.AUTHENTICATING and now - self.opened_at >= limits.auth_timeout:
            return CloseCode.AUTH_TIMEOUT
        if self.phase in (Phase.AUTHENTICATING, Phase.READY):
            if now - self.last_received >= limits.idle_timeout:
                return CloseCode.IDLE_TIMEOUT
            pinged = self.ping_sent_at
            if pinged > self.last_received and now - pinged >= limits.ping_timeout:
                return CloseCode.IDLE_TIMEOUT  # §12.31: no answer to the server's ping
        return None

    def ping_due(self, now: float, limits: Timeouts) -> bool:
        """True when the server owes this connection a ping now (records it as sent)."""
        if self.phase not in (Phase.AUTHENTICATING, Phase.READY):
            return False
        if self.ping_sent_at > self.last_received:
            return False  # one ping per quiet spell: waiting for anything from the peer
        if now - self.last_received < limits.ping_interval:
            return False
        self.ping_sent_at = now
        return True
