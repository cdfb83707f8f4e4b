"""Message type numbers (SPEC §3) as a plain IntEnum, free of the protobuf runtime.

The numbers are wire facts; ``tests/unit/test_protocol_types.py`` checks they equal
the generated ``sovereign.v1`` enum so the two can never drift apart.
"""

from __future__ import annotations

from enum import IntEnum


class MessageType(IntEnum):
    UNSPECIFIED = 0
    AUTH_REQUEST = 1
    AUTH_CHALLENGE = 2
    AUTH_RESPONSE = 3
    AUTH_SUCCESS = 4
    AUTH_ERROR = 5
    AUTH_REGISTER_REQUEST = 6
    AUTH_REGISTER_CHALLENGE = 7
    AUTH_REGISTER_RESPONSE = 8
    AUTH_REGISTER_SUCCESS = 9
    MESSAGE_SEND = 20
    MESSAGE_RECEIVE = 21
    MESSAGE_ACK = 22
    MESSAGE_DELIVERED = 23
    MESSAGE_HISTORY_REQUEST = 24
    MESSAGE_HISTORY_RESPONSE = 25
    MESSAGE_READ = 26
    MESSAGE_READ_RECEIPT = 27
    SYNC_COMPLETE = 28
    GROUP_CREATE = 30
    GROUP_CREATED = 31
    GROUP_INVITE = 32
    GROUP_MEMBER_ADDED = 33
    GROUP_MEMBER_REMOVED = 34
    GROUP_LEAVE = 35
    GROUP_REMOVE = 36
    CONVERSATION_LIST_REQUEST = 37
    CONVERSATION_LIST = 38
    MLS_KEY_PACKAGE_UPLOAD = 40
    MLS_KEY_PACKAGE_FETCH = 41
    MLS_KEY_PACKAGE_RESPONSE = 42
    MLS_WELCOME = 43
    MLS_WELCOME_RECEIVE = 44
    MLS_COMMIT = 45
    MLS_COMMIT_BROADCAST = 46
    MLS_KEY_PACKAGE_LOW = 47
    MLS_GROUP_INFO_FETCH = 48
    MLS_GROUP_INFO = 49
    PRESENCE_UPDATE = 50
    PRESENCE_NOTIFY = 51
    TYPING = 52
    TYPING_NOTIFY = 53
    USER_LOOKUP = 54
    USER_INFO = 55
    DEVICE_LIST_REQUEST = 56
    DEVICE_LIST = 57
    DEVICE_REVOKE = 58
    PROFILE_UPDATE = 59
    PING = 60
    PONG = 61
    ERROR = 62
    ACK = 63
    DEVICE_ADDED = 64


T = MessageType

#: Accepted before READY (SPEC §12.7).
PRE_AUTH_TYPES = frozenset(
    {
        T.AUTH_REQUEST,
        T.AUTH_RESPONSE,
        T.AUTH_REGISTER_REQUEST,
        T.AUTH_REGISTER_RESPONSE,
        T.PING,
    }
)
