"""The Sovereign Python client SDK (asyncio) and a software WebAuthn authenticator.

::

    from sovereign.client import Client, MessageType

    async with Client("ws://127.0.0.1:8080/ws", token=TOKEN) as client:
        async for event in client.events(MessageType.MESSAGE_RECEIVE):
            print(event.message.sender_id, event.message.encrypted_payload)

See ``docs/client.md`` for the guide and :mod:`sovereign.client.client` for the
theory of operation (reconnect, acks, dedupe, gap repair).
"""

from sovereign.client.authenticator import (
    AssertionResponse,
    AuthenticatorError,
    RegistrationResponse,
    SoftwareAuthenticator,
)
from sovereign.client.backoff import DEFAULT_SCHEDULE, Backoff
from sovereign.client.client import (
    FATAL_CLOSE_CODES,
    IDEMPOTENT_TYPES,
    Authenticator,
    Client,
    ClientState,
    EventHandler,
    EventStream,
)
from sovereign.client.errors import (
    ClientClosed,
    ClientError,
    ConnectError,
    ConnectionLost,
    NotAuthenticated,
    ProtocolViolation,
    RequestTimeout,
    SessionEnded,
    SovereignClientError,
)
from sovereign.client.events import (
    DURABLE_CONVERSATION_TYPES,
    DURABLE_TYPES,
    EPHEMERAL_TYPES,
    Device,
    DeviceAdded,
    DeviceInfo,
    Event,
    HistoryPage,
    UserInfo,
)
from sovereign.client.tracking import AckBatch, AckTracker, SeqTracker, Verdict
from sovereign.protocol.types import MessageType

__all__ = [
    "DEFAULT_SCHEDULE",
    "DURABLE_CONVERSATION_TYPES",
    "DURABLE_TYPES",
    "EPHEMERAL_TYPES",
    "FATAL_CLOSE_CODES",
    "IDEMPOTENT_TYPES",
    "AckBatch",
    "AckTracker",
    "AssertionResponse",
    "Authenticator",
    "AuthenticatorError",
    "Backoff",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientState",
    "ConnectError",
    "ConnectionLost",
    "Device",
    "DeviceAdded",
    "DeviceInfo",
    "Event",
    "EventHandler",
    "EventStream",
    "HistoryPage",
    "MessageType",
    "NotAuthenticated",
    "ProtocolViolation",
    "RegistrationResponse",
    "RequestTimeout",
    "SeqTracker",
    "SessionEnded",
    "SoftwareAuthenticator",
    "SovereignClientError",
    "UserInfo",
    "Verdict",
]
