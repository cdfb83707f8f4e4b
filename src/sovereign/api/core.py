"""PING/PONG (SPEC §3, §4): answered at once, in any phase."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sovereign.api.parsing import parse
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.server import App
    from sovereign.transport.ws import Connection


def install(app: App) -> None:
    def on_ping(conn: Connection, _t: int, request_id: str, payload: memoryview) -> None:
        ping = parse(conn, pb.Ping, payload, request_id)
        if ping is not None:
            conn.send(T.PONG, request_id, pb.Pong(timestamp=ping.timestamp))

    def on_pong(conn: Connection, _t: int, request_id: str, payload: memoryview) -> None:
        # SPEC §3: C->S PONG is allowed (answering a server PING); it only refreshes idle.
        if parse(conn, pb.Pong, payload, request_id) is not None and request_id:
            conn.send(T.ACK, request_id, pb.Ack(count=0))

    app.handlers[T.PING] = on_ping
    app.handlers[T.PONG] = on_pong
