"""Stub for the compiled fan-out (twin: sovereign.transport.fanout)."""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sovereign.transport.fanout import FanoutConn

__all__ = ["append_ws_frame", "collect", "fanout", "fanout_conns", "write_frame", "ws_frame"]

def ws_frame(envelope: bytes | bytearray | memoryview) -> bytes: ...
def append_ws_frame(out: bytearray, envelope: bytes | bytearray | memoryview) -> None: ...
def write_frame(conn: FanoutConn, frame: bytes, buffer_limit: int) -> bool: ...
def fanout(
    frame: bytes,
    by_user: Mapping[str, Sequence[FanoutConn]],
    user_ids: Iterable[str],
    exclude: object | None,
    buffer_limit: int,
) -> int: ...
def fanout_conns(
    frame: bytes, conns: Iterable[FanoutConn], exclude: object | None, buffer_limit: int
) -> int: ...
def collect(
    frame: bytes,
    by_user: Mapping[str, Sequence[FanoutConn]],
    user_ids: Iterable[str],
    exclude: object | None,
    pending: dict[Any, bytearray],
) -> int: ...
