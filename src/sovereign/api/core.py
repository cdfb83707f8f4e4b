"""PING/PONG (SPEC §3, §4): answered at once, in any phase."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sovereign.api.parsing import Handler, parse
from sovereign.protocol.types import MessageType as T
from sovereign.services.session import Session
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.services import Services


def install(table: dict[int, Handler], svc: Services) -> None:
    outbox = svc.outbox

    def on_ping(s: Session, _t: int, rid: str, payload: memoryview) -> None:
        ping = parse(outbox, s, pb.Ping, payload, rid)
        if ping is not None:
            outbox.send(s, T.PONG, rid, pb.Pong(timestamp=ping.timestamp))

    def on_pong(s: Session, _t: int, rid: str, payload: memoryview) -> None:
        # SPEC §3: C->S PONG is allowed (answering a server PING); it only refreshes idle.
        if parse(outbox, s, pb.Pong, payload, rid) is not None and rid:
            outbox.send(s, T.ACK, rid, pb.Ack(count=0))

    table[T.PING] = on_ping
    table[T.PONG] = on_pong
