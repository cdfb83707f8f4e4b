"""Stub for the compiled dispatcher (twin: sovereign.protocol.dispatch)."""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["MAX_TYPES", "Dispatcher", "TokenBucket"]

MAX_TYPES: int

class TokenBucket:
    def __init__(self, rate_per_s: float, burst: int, now: float) -> None: ...
    def take(self, now: float) -> int: ...
    def reconfigure(self, rate_per_s: float, burst: int) -> None: ...
    @property
    def rate_per_s(self) -> float: ...
    @property
    def burst(self) -> int: ...
    @property
    def tokens(self) -> float: ...

class Dispatcher:
    def __init__(
        self,
        handlers: Mapping[int, Callable[[Any, int, str, memoryview], object]],
        pre_auth_types: Iterable[int],
        max_envelope_bytes: int,
        max_request_id_bytes: int = 64,
    ) -> None: ...
    def set_max_envelope_bytes(self, n: int) -> None: ...
    @property
    def max_envelope_bytes(self) -> int: ...
    @property
    def max_request_id_bytes(self) -> int: ...
    def dispatch(
        self,
        conn: Any,
        bucket: TokenBucket,
        buf: bytes | bytearray | memoryview,
        ready: bool,
        now: float,
    ) -> int: ...
