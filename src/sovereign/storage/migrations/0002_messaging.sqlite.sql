-- 0002: conversations, the per-conversation event log, delivery cursors (SPEC §5, §6).
-- Nothing is written per recipient when an event is stored: delivery state is one
-- cursor per (device, conversation), moved by acks.

CREATE TABLE conversations (
    conversation_id  TEXT    NOT NULL PRIMARY KEY,          -- ULID
    title            TEXT    NOT NULL DEFAULT '',
    created_by       TEXT    NOT NULL,
    created_at_us    INTEGER NOT NULL,
    last_seq         INTEGER NOT NULL DEFAULT 0,            -- dense, never reused
    last_ts_us       INTEGER NOT NULL DEFAULT 0,            -- strictly increasing
    purged_seq       INTEGER NOT NULL DEFAULT 0,            -- highest seq removed by retention
    mls_group_id     BLOB,                                  -- bound by the first commit
    mls_epoch        INTEGER NOT NULL DEFAULT 0,
    group_info       BLOB,
    group_info_epoch INTEGER
) STRICT;

-- Current and former members. A removed member keeps its row with left_seq set so it
-- can still ack up to its own GROUP_MEMBER_REMOVED (SPEC §12.14).
CREATE TABLE members (
    conversation_id  TEXT    NOT NULL REFERENCES conversations (conversation_id) ON DELETE CASCADE,
    user_id          TEXT    NOT NULL,
    role             TEXT    NOT NULL,                      -- 'admin' | 'member'
    joined_seq       INTEGER NOT NULL,                      -- seq of the latest GROUP_MEMBER_ADDED
    joined_at_us     INTEGER NOT NULL,
    left_seq         INTEGER,                               -- NULL while a member
    PRIMARY KEY (conversation_id, user_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX members_by_user ON members (user_id);

-- The durable conversation events. payload is the serialized typed message
-- (MessageReceive, GroupMemberAdded, ...) exactly as it is sent; event_id is a ULID, so
-- it also orders events by time (retention deletes by event_id range).
CREATE TABLE events (
    conversation_id  TEXT    NOT NULL,
    seq              INTEGER NOT NULL,
    event_id         TEXT    NOT NULL UNIQUE,
    type             INTEGER NOT NULL,
    sender_id        TEXT    NOT NULL,
    ts_us            INTEGER NOT NULL,
    payload          BLOB    NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) STRICT, WITHOUT ROWID;

-- MLS welcomes: one event per recipient user, acked per device (SPEC §12.15).
CREATE TABLE welcomes (
    event_id         TEXT    NOT NULL PRIMARY KEY,
    user_id          TEXT    NOT NULL,
    conversation_id  TEXT    NOT NULL,
    sender_id        TEXT    NOT NULL,
    ts_us            INTEGER NOT NULL,
    payload          BLOB    NOT NULL
) STRICT;

CREATE INDEX welcomes_by_user ON welcomes (user_id, event_id);

CREATE TABLE welcome_acks (
    device_id        TEXT    NOT NULL,
    event_id         TEXT    NOT NULL,
    PRIMARY KEY (device_id, event_id)
) STRICT, WITHOUT ROWID;

-- Delivery state: the highest acknowledged seq per (device, conversation).
CREATE TABLE cursors (
    device_id        TEXT    NOT NULL,
    conversation_id  TEXT    NOT NULL,
    acked_seq        INTEGER NOT NULL,
    PRIMARY KEY (device_id, conversation_id)
) STRICT, WITHOUT ROWID;

-- A user's delivered position per conversation: moved only by acks (SPEC §12.22); it
-- decides when MESSAGE_DELIVERED is owed to senders.
CREATE TABLE delivery (
    conversation_id  TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    up_to_seq        INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) STRICT, WITHOUT ROWID;

-- The latest read marker per (user, conversation) (SPEC §5).
CREATE TABLE read_markers (
    conversation_id  TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    up_to_seq        INTEGER NOT NULL,
    updated_at_us    INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) STRICT, WITHOUT ROWID;

-- Idempotent MESSAGE_SEND: (user, request_id) -> the stored event, for 24 h (SPEC §5).
CREATE TABLE send_requests (
    user_id          TEXT    NOT NULL,
    request_id       TEXT    NOT NULL,
    event_id         TEXT    NOT NULL,
    created_at_us    INTEGER NOT NULL,
    PRIMARY KEY (user_id, request_id)
) STRICT, WITHOUT ROWID;
