"""Payload parsing shared by every handler (SPEC §2, §12.7)."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import DecodeError, Message

if TYPE_CHECKING:
    from sovereign.transport.ws import Connection

M = TypeVar("M", bound=Message)


def parse(conn: Connection, cls: type[M], payload: memoryview, request_id: str) -> M | None:
    """Parse ``payload`` as ``cls``; on failure answer the error and return None.

    After READY an unparseable payload is a non-fatal 3001. Before READY only
    parseable AUTH_* / PING are accepted, so it is the fatal 1006 (SPEC §12.7).
    """
    try:
        return cls.FromString(payload)  # type: ignore[arg-type]  # upb takes any buffer
    except (DecodeError, ValueError):
        if conn.ready:
            conn.send_error(3001, request_id, f"payload is not a valid {cls.__name__}")
        else:
            conn.send_error(1006, request_id, f"payload is not a valid {cls.__name__}")
        return None
