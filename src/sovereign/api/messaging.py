"""Messaging, group, receipt, typing and presence handlers (SPEC §3, §5, §6, §12.1)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

from sovereign.api.parsing import parse
from sovereign.errors import SovereignError
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.server import App
    from sovereign.transport.ws import Connection

M = TypeVar("M", bound=Message)
Handler = Callable[["Connection", int, str, memoryview], None]


def now(cls: type[M], fn: Callable[[Connection, str, M], None]) -> Handler:
    """A handler whose work is synchronous (validated and queued before returning)."""

    def handler(conn: Connection, _t: int, rid: str, payload: memoryview) -> None:
        msg = parse(conn, cls, payload, rid)
        if msg is None:
            return
        try:
            fn(conn, rid, msg)
        except SovereignError as exc:
            conn.send_error(exc.code, rid, exc.message, exc.retry_after_ms)

    return handler


def later(
    app: App, cls: type[M], fn: Callable[[Connection, str, M], Coroutine[Any, Any, None]]
) -> Handler:
    """A handler that needs to await (storage reads, commits)."""

    def handler(conn: Connection, _t: int, rid: str, payload: memoryview) -> None:
        msg = parse(conn, cls, payload, rid)
        if msg is not None:
            app.spawn(conn, rid, fn(conn, rid, msg))

    return handler


def install(app: App) -> None:
    svc = app.messaging

    async def conversation_list(conn: Connection, rid: str, _m: pb.ConversationListRequest) -> None:
        await svc.list_conversations(conn, rid)

    h = app.handlers
    h[T.MESSAGE_SEND] = now(pb.MessageSend, svc.send_message)
    h[T.MESSAGE_ACK] = now(pb.MessageAck, svc.ack)
    h[T.MESSAGE_HISTORY_REQUEST] = later(app, pb.HistoryRequest, svc.history)
    h[T.MESSAGE_READ] = later(app, pb.ReadMarker, svc.mark_read)
    h[T.GROUP_CREATE] = later(app, pb.GroupCreate, svc.create_group)
    h[T.GROUP_INVITE] = later(app, pb.GroupInvite, svc.invite)
    h[T.GROUP_REMOVE] = now(pb.GroupRemove, svc.remove)
    h[T.GROUP_LEAVE] = now(pb.GroupLeave, svc.leave)
    h[T.CONVERSATION_LIST_REQUEST] = later(app, pb.ConversationListRequest, conversation_list)
    h[T.TYPING] = now(pb.Typing, svc.typing)
    h[T.PRESENCE_UPDATE] = now(pb.PresenceUpdate, svc.set_presence)
