"""What the client hands to the application: :class:`Event`, :class:`Device`,
:class:`HistoryPage`, and the type tables that classify server messages (SPEC §3, §5)."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from google.protobuf.message import Message

from sovereign.protocol.types import MessageType
from sovereign.v1 import sovereign_pb2 as pb

__all__ = [
    "DURABLE_CONVERSATION_TYPES",
    "DURABLE_TYPES",
    "EPHEMERAL_TYPES",
    "PAYLOAD_CLASSES",
    "Device",
    "DeviceAdded",
    "DeviceInfo",
    "Event",
    "HistoryPage",
    "UserInfo",
    "decode_event",
    "decode_payload",
]

T = MessageType
M = TypeVar("M", bound=Message)

#: The protobuf message class of every type a server sends (and PING/PONG both ways).
PAYLOAD_CLASSES: Final[Mapping[int, type[Message]]] = {
    T.AUTH_CHALLENGE: pb.AuthChallenge,
    T.AUTH_SUCCESS: pb.AuthSuccess,
    T.AUTH_ERROR: pb.AuthError,
    T.AUTH_REGISTER_CHALLENGE: pb.AuthRegisterChallenge,
    T.AUTH_REGISTER_SUCCESS: pb.AuthRegisterSuccess,
    T.MESSAGE_RECEIVE: pb.MessageReceive,
    T.MESSAGE_DELIVERED: pb.MessageDelivered,
    T.MESSAGE_HISTORY_RESPONSE: pb.HistoryResponse,
    T.MESSAGE_READ_RECEIPT: pb.ReadReceipt,
    T.SYNC_COMPLETE: pb.SyncComplete,
    T.GROUP_CREATED: pb.GroupCreated,
    T.GROUP_MEMBER_ADDED: pb.GroupMemberAdded,
    T.GROUP_MEMBER_REMOVED: pb.GroupMemberRemoved,
    T.CONVERSATION_LIST: pb.ConversationList,
    T.MLS_KEY_PACKAGE_RESPONSE: pb.MLSKeyPackageResponse,
    T.MLS_WELCOME_RECEIVE: pb.MLSWelcomeReceive,
    T.MLS_COMMIT_BROADCAST: pb.MLSCommitBroadcast,
    T.MLS_KEY_PACKAGE_LOW: pb.KeyPackageLow,
    T.MLS_GROUP_INFO: pb.GroupInfo,
    T.PRESENCE_NOTIFY: pb.PresenceNotify,
    T.TYPING_NOTIFY: pb.TypingNotify,
    T.USER_INFO: pb.UserInfo,
    T.DEVICE_LIST: pb.DeviceList,
    T.DEVICE_ADDED: pb.DeviceAdded,
    T.PING: pb.Ping,
    T.PONG: pb.Pong,
    T.ERROR: pb.Error,
    T.ACK: pb.Ack,
}

#: Conversation events: kept in the per-conversation log, carry a dense ``seq`` (SPEC §5).
DURABLE_CONVERSATION_TYPES: Final = frozenset(
    {T.MESSAGE_RECEIVE, T.MLS_COMMIT_BROADCAST, T.GROUP_MEMBER_ADDED, T.GROUP_MEMBER_REMOVED}
)
#: Everything the server stores until this device acknowledges it (SPEC §5).
DURABLE_TYPES: Final = DURABLE_CONVERSATION_TYPES | {T.MLS_WELCOME_RECEIVE}
#: Best-effort notifications: never queued, never acknowledged.
EPHEMERAL_TYPES: Final = frozenset(
    {
        T.PRESENCE_NOTIFY,
        T.TYPING_NOTIFY,
        T.MESSAGE_READ_RECEIPT,
        T.MESSAGE_DELIVERED,
        T.MLS_KEY_PACKAGE_LOW,
        T.SYNC_COMPLETE,
        T.DEVICE_ADDED,
    }
)


#: Pushed when a device of a user you share a conversation with (or of your own user)
#: uploads KeyPackages for the first time (SPEC §12.29): ``Event.message`` of a
#: ``MessageType.DEVICE_ADDED`` event; fetch that user's KeyPackages to add the device
#: to your MLS groups.
DeviceAdded = pb.DeviceAdded
#: One of your devices, as :meth:`Client.devices` lists them (times in Unix ms).
DeviceInfo = pb.Device
#: What :meth:`Client.lookup_user` answers.
UserInfo = pb.UserInfo


def decode_payload(msg_type: int, payload: bytes) -> Any:
    """Parse ``payload`` as the message class of ``msg_type`` (raw bytes if unknown)."""
    cls = PAYLOAD_CLASSES.get(msg_type)
    if cls is None:
        return payload
    return cls.FromString(payload)


def _as_type(msg_type: int) -> MessageType | int:
    try:
        return MessageType(msg_type)
    except ValueError:
        return msg_type


@dataclass(frozen=True, slots=True)
class Event:
    """One server push (or a history entry) as the application sees it.

    ``message`` is the parsed protobuf (``pb.MessageReceive`` for MESSAGE_RECEIVE, …;
    the raw payload bytes for a type this SDK does not know). ``replayed`` is True for
    events the client fetched itself through MESSAGE_HISTORY_REQUEST to close a seq gap
    (and for every event of a :class:`HistoryPage`).

    Convenience properties read the common fields without caring about the type:
    ``conversation_id``, ``seq``, ``event_id`` (MESSAGE_RECEIVE's ``message_id``, the
    others' ``event_id``), ``sender_id`` and ``durable``.
    """

    type: MessageType | int
    message: Any
    request_id: str = ""
    replayed: bool = False

    @property
    def durable(self) -> bool:
        """True for events the server keeps until acknowledged (SPEC §5)."""
        return self.type in DURABLE_TYPES

    @property
    def conversation_id(self) -> str:
        """The conversation the event belongs to, or ``""``."""
        value = getattr(self.message, "conversation_id", "")
        return value if isinstance(value, str) else ""

    @property
    def seq(self) -> int:
        """The per-conversation sequence number, or 0 (welcomes, ephemeral events)."""
        if self.type in DURABLE_CONVERSATION_TYPES:
            return int(self.message.seq)
        return 0

    @property
    def event_id(self) -> str:
        """The server id (ULID) of a durable event, or ``""``."""
        if self.type == T.MESSAGE_RECEIVE:
            return str(self.message.message_id)
        if self.type in DURABLE_TYPES:
            return str(self.message.event_id)
        return ""

    @property
    def sender_id(self) -> str:
        """``sender_id`` (messages, commits, welcomes) or the acting user, or ``""``."""
        for name in ("sender_id", "added_by", "removed_by", "user_id"):
            value = getattr(self.message, name, None)
            if isinstance(value, str):
                return value
        return ""

    @property
    def type_name(self) -> str:
        """``"MESSAGE_RECEIVE"`` etc. (the number as text for unknown types)."""
        t = self.type
        return t.name if isinstance(t, MessageType) else str(t)

    def expect(self, cls: builtins.type[M]) -> M:
        """``message`` typed as ``cls``; raises TypeError if it is something else."""
        if not isinstance(self.message, cls):
            raise TypeError(f"{self.type_name} carries {type(self.message).__name__}, not {cls}")
        return self.message

    def __repr__(self) -> str:
        parts = [self.type_name]
        if self.conversation_id:
            parts.append(f"conversation={self.conversation_id}")
        if self.seq:
            parts.append(f"seq={self.seq}")
        if self.event_id:
            parts.append(f"id={self.event_id}")
        if self.replayed:
            parts.append("replayed")
        return f"<Event {' '.join(parts)}>"


def decode_event(
    msg_type: int, payload: bytes, request_id: str = "", *, replayed: bool = False
) -> Event:
    """Build an :class:`Event` from an Envelope's type and payload."""
    return Event(_as_type(msg_type), decode_payload(msg_type, payload), request_id, replayed)


@dataclass(slots=True)
class Device:
    """This client's session, i.e. its device (SPEC §4: "a device is one session").

    ``token`` is the session token: persist it (it is a credential) and pass it to
    ``Client(token=…)`` or :meth:`Client.resume` to come back as the same device with
    the same delivery cursors. It is left out of ``repr``.
    """

    token: str = field(repr=False)
    user_id: str
    username: str = ""
    display_name: str = ""
    is_admin: bool = False
    server_name: str = ""


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One MESSAGE_HISTORY_RESPONSE: events in ascending seq order (SPEC §12.4)."""

    events: list[Event]
    next_cursor_seq: int
    has_more: bool
