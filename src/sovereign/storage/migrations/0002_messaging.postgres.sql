-- 0002 (PostgreSQL): the same schema as 0002_messaging.sqlite.sql (see there).
-- SQLite's WITHOUT ROWID tables are ordinary tables here (their primary key is the
-- same); a fillfactor below 100 on the tables upserted in place (cursors, delivery,
-- read_markers) leaves room for HOT updates, which skip index writes.

CREATE TABLE conversations (
    conversation_id  TEXT    NOT NULL PRIMARY KEY,
    title            TEXT    NOT NULL DEFAULT '',
    created_by       TEXT    NOT NULL,
    created_at_us    BIGINT  NOT NULL,
    last_seq         BIGINT  NOT NULL DEFAULT 0,
    last_ts_us       BIGINT  NOT NULL DEFAULT 0,
    purged_seq       BIGINT  NOT NULL DEFAULT 0,
    mls_group_id     BYTEA,
    mls_epoch        BIGINT  NOT NULL DEFAULT 0,
    group_info       BYTEA,
    group_info_epoch BIGINT
);

CREATE TABLE members (
    conversation_id  TEXT    NOT NULL REFERENCES conversations (conversation_id) ON DELETE CASCADE,
    user_id          TEXT    NOT NULL,
    role             TEXT    NOT NULL,
    joined_seq       BIGINT  NOT NULL,
    joined_at_us     BIGINT  NOT NULL,
    left_seq         BIGINT,
    PRIMARY KEY (conversation_id, user_id)
);

CREATE INDEX members_by_user ON members (user_id);

CREATE TABLE events (
    conversation_id  TEXT    NOT NULL,
    seq              BIGINT  NOT NULL,
    event_id         TEXT    NOT NULL UNIQUE,
    type             INTEGER NOT NULL,
    sender_id        TEXT    NOT NULL,
    ts_us            BIGINT  NOT NULL,
    payload          BYTEA   NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);

CREATE TABLE welcomes (
    event_id         TEXT    NOT NULL PRIMARY KEY,
    user_id          TEXT    NOT NULL,
    conversation_id  TEXT    NOT NULL,
    sender_id        TEXT    NOT NULL,
    ts_us            BIGINT  NOT NULL,
    payload          BYTEA   NOT NULL
);

CREATE INDEX welcomes_by_user ON welcomes (user_id, event_id);

CREATE TABLE welcome_acks (
    device_id        TEXT    NOT NULL,
    event_id         TEXT    NOT NULL,
    PRIMARY KEY (device_id, event_id)
);

CREATE TABLE cursors (
    device_id        TEXT    NOT NULL,
    conversation_id  TEXT    NOT NULL,
    acked_seq        BIGINT  NOT NULL,
    PRIMARY KEY (device_id, conversation_id)
) WITH (fillfactor = 70);

CREATE TABLE delivery (
    conversation_id  TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    up_to_seq        BIGINT  NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITH (fillfactor = 70);

CREATE TABLE read_markers (
    conversation_id  TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    up_to_seq        BIGINT  NOT NULL,
    updated_at_us    BIGINT  NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITH (fillfactor = 70);

CREATE TABLE send_requests (
    user_id          TEXT    NOT NULL,
    request_id       TEXT    NOT NULL,
    event_id         TEXT    NOT NULL,
    created_at_us    BIGINT  NOT NULL,
    PRIMARY KEY (user_id, request_id)
);
