"""Envelope dispatch and per-connection rate limiting (pure-Python twin).

Compiled twin: ``sovereign._fast.dispatch`` (same API, same verdicts, same arithmetic).
The dispatcher only decides; it never sends. Every rejection is reported through
``conn.reject(code, request_id, retry_after_ms)`` and the code is returned; the caller
renders the ``Error`` and, for fatal codes (1006), closes the connection (SPEC §4, §8).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sovereign.codec.envelope import EnvelopeError, decode_envelope
from sovereign.errors import ErrorCode

__all__ = ["MAX_TYPES", "Dispatcher", "Handler", "TokenBucket"]

Handler = Callable[[Any, int, str, memoryview], object]

# Handlers live in a table indexed by type; the compiled twin uses a C array of this size.
MAX_TYPES = 128
_MAX_RETRY_MS = 0xFFFF_FFFF  # Error.retry_after_ms is a uint32 (Appendix A)

# Error codes (SPEC §8).
_AUTH_REQUIRED = int(ErrorCode.AUTH_REQUIRED)
_UNKNOWN_TYPE = int(ErrorCode.UNKNOWN_MESSAGE_TYPE)
_TOO_LARGE = int(ErrorCode.MESSAGE_TOO_LARGE)
_RATE_LIMITED = int(ErrorCode.RATE_LIMITED)
_INVALID_ENVELOPE = int(ErrorCode.INVALID_ENVELOPE)


class TokenBucket:
    """Per-connection token bucket (SPEC §9: default 30 msg/s, burst 10).

    Starts full; refills continuously at ``rate_per_s`` up to ``burst``. Times are
    seconds on a monotonic clock; a clock that goes backwards refills nothing.
    """

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self._rate, self._burst = _check_bucket(rate_per_s, burst)
        self._tokens = self._burst
        self._last = now

    def take(self, now: float) -> int:
        """Consume one token: 0 if one was available, else the ms until one is (>= 1)."""
        elapsed = now - self._last
        if elapsed > 0.0:
            tokens = self._tokens + elapsed * self._rate
            if tokens > self._burst:
                tokens = self._burst
            self._tokens = tokens
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0
        wait = (1.0 - self._tokens) / self._rate * 1000.0
        if wait >= _MAX_RETRY_MS:
            return _MAX_RETRY_MS
        ms = math.ceil(wait)
        return ms if ms >= 1 else 1

    def reconfigure(self, rate_per_s: float, burst: int) -> None:
        """Apply new settings; tokens above the new burst are dropped."""
        self._rate, self._burst = _check_bucket(rate_per_s, burst)
        if self._tokens > self._burst:
            self._tokens = self._burst

    @property
    def rate_per_s(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return int(self._burst)

    @property
    def tokens(self) -> float:
        """Tokens as of the last take() (not refilled to the present)."""
        return self._tokens


def _check_bucket(rate_per_s: float, burst: int) -> tuple[float, float]:
    rate = float(rate_per_s)
    if not 0.0 < rate < math.inf:
        raise ValueError("rate_per_s must be a positive finite number")
    b = operator.index(burst)
    if b < 1:
        raise ValueError("burst must be at least 1")
    return rate, float(b)


def _type_key(value: int, what: str) -> int:
    t = operator.index(value)
    if not 0 <= t < MAX_TYPES:
        raise ValueError(f"{what} {t} is outside 0..{MAX_TYPES - 1}")
    return t


def _check_size(value: int, what: str) -> int:
    n = operator.index(value)
    if n < 0:
        raise ValueError(f"{what} must be >= 0")
    return n


def _nbytes(buf: bytes | bytearray | memoryview) -> int:
    if isinstance(buf, (bytes, bytearray)):
        return len(buf)
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise BufferError("buffer is not C-contiguous")
    return mv.nbytes


class Dispatcher:
    """Routes one received Envelope to its handler, or reports why it cannot.

    Handler signature: ``handler(conn, type, request_id, payload)`` where ``payload`` is
    a zero-copy memoryview into the received buffer. Exceptions from a handler
    propagate (the caller answers 9001, SPEC §8).
    """

    __slots__ = ("_handlers", "_max_envelope_bytes", "_max_request_id_bytes", "_pre_auth")

    def __init__(
        self,
        handlers: Mapping[int, Handler],
        pre_auth_types: Iterable[int],
        max_envelope_bytes: int,
        max_request_id_bytes: int = 64,
    ) -> None:
        self._handlers: dict[int, Handler] = {}
        for key, handler in handlers.items():
            if handler is not None:
                self._handlers[_type_key(key, "handler type")] = handler
        self._pre_auth = frozenset(_type_key(t, "pre-auth type") for t in pre_auth_types)
        self._max_envelope_bytes = _check_size(max_envelope_bytes, "max_envelope_bytes")
        self._max_request_id_bytes = _check_size(max_request_id_bytes, "max_request_id_bytes")

    def set_max_envelope_bytes(self, n: int) -> None:
        self._max_envelope_bytes = _check_size(n, "max_envelope_bytes")

    @property
    def max_envelope_bytes(self) -> int:
        return self._max_envelope_bytes

    @property
    def max_request_id_bytes(self) -> int:
        return self._max_request_id_bytes

    def dispatch(
        self,
        conn: Any,
        bucket: TokenBucket,
        buf: bytes | bytearray | memoryview,
        ready: bool,
        now: float,
    ) -> int:
        """Handle one Envelope; returns 0 if a handler ran, else the rejection code."""
        # a. Size (SPEC §1: 3003, non-fatal; before READY anything odd is 1006, §12.7).
        if _nbytes(buf) > self._max_envelope_bytes:
            code = _TOO_LARGE if ready else _AUTH_REQUIRED
            conn.reject(code, "", 0)
            return code
        # b. Parse, request_id <= 64 bytes (SPEC §2: 3005; §12.8: empty request_id).
        try:
            msg_type, request_id, payload = decode_envelope(buf, self._max_request_id_bytes)
        except EnvelopeError:
            code = _INVALID_ENVELOPE if ready else _AUTH_REQUIRED
            conn.reject(code, "", 0)
            return code
        # c. Before READY only the pre-auth types (SPEC §4, §12.7).
        if not ready and msg_type not in self._pre_auth:
            conn.reject(_AUTH_REQUIRED, request_id, 0)
            return _AUTH_REQUIRED
        # d. Rate limit (SPEC §9: 3004 with retry_after_ms).
        retry = bucket.take(now)
        if retry:
            conn.reject(_RATE_LIMITED, request_id, retry)
            return _RATE_LIMITED
        # e. Unknown type (SPEC §2: 3002).
        handler = self._handlers.get(msg_type)
        if handler is None:
            conn.reject(_UNKNOWN_TYPE, request_id, 0)
            return _UNKNOWN_TYPE
        # f. Run it; exceptions propagate.
        handler(conn, msg_type, request_id, payload)
        return 0
