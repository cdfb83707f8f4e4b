"""Messaging, group, receipt, typing and presence handlers (SPEC §3, §5, §6, §12.1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sovereign.api.parsing import Handler, catching_up, catching_up_later, later, now
from sovereign.codec import payloads
from sovereign.protocol.types import MessageType as T
from sovereign.services.session import Session
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.services import Services


def install(table: dict[int, Handler], svc: Services) -> None:
    out, tasks = svc.outbox, svc.tasks
    delivery, groups, eph, history = svc.delivery, svc.groups, svc.ephemeral, svc.history

    async def conversation_list(s: Session, rid: str, _m: pb.ConversationListRequest) -> None:
        await groups.list_conversations(s, rid)

    # Cluster mode: what names a conversation is decided again once this node has
    # caught up with the database on it, if its memory refused (SPEC §12.27).
    catch_up = svc.cluster.catch_up_conversation if svc.cluster is not None else None
    # The two payloads of every message: decoded by the codec, not protobuf's runtime.
    table[T.MESSAGE_SEND] = now(
        out, payloads.MessageSend, catching_up(tasks, catch_up, delivery.send_message)
    )
    table[T.MESSAGE_ACK] = now(out, payloads.MessageAck, delivery.ack)
    table[T.MESSAGE_HISTORY_REQUEST] = later(
        out, tasks, pb.HistoryRequest, catching_up_later(catch_up, history.history)
    )
    table[T.MESSAGE_READ] = later(
        out, tasks, pb.ReadMarker, catching_up_later(catch_up, eph.mark_read)
    )
    table[T.GROUP_CREATE] = later(out, tasks, pb.GroupCreate, groups.create_group)
    table[T.GROUP_INVITE] = later(
        out, tasks, pb.GroupInvite, catching_up_later(catch_up, groups.invite)
    )
    table[T.GROUP_REMOVE] = now(out, pb.GroupRemove, catching_up(tasks, catch_up, groups.remove))
    table[T.GROUP_LEAVE] = now(out, pb.GroupLeave, catching_up(tasks, catch_up, groups.leave))
    table[T.CONVERSATION_LIST_REQUEST] = later(
        out, tasks, pb.ConversationListRequest, conversation_list
    )
    table[T.TYPING] = now(out, pb.Typing, catching_up(tasks, catch_up, eph.typing))
    table[T.PRESENCE_UPDATE] = now(out, pb.PresenceUpdate, eph.set_presence)
