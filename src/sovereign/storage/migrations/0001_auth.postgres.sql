-- 0001 (PostgreSQL): the same schema as 0001_auth.sqlite.sql; see there for what each
-- table is. Differences are only spelling: BIGINT for SQLite's INTEGER (int64), BYTEA
-- for BLOB, SMALLINT 0/1 for booleans (stored as SQLite stores them), and a
-- case-insensitive collation where SQLite says COLLATE NOCASE.
-- Uniqueness of usernames is decided by username_key (NFKC-casefolded in Python); the
-- collation keeps "username" itself unique and ordered without regard to case, as
-- SQLite's NOCASE does (ICU folds every letter's case, NOCASE only ASCII's; the key
-- already made any such pair collide).

CREATE COLLATION IF NOT EXISTS sovereign_nocase (
    provider = icu, locale = 'und-u-ks-level2', deterministic = false
);

CREATE TABLE users (
    user_id        TEXT     NOT NULL PRIMARY KEY,
    username       TEXT     NOT NULL COLLATE sovereign_nocase UNIQUE,
    username_key   TEXT     NOT NULL UNIQUE,
    display_name   TEXT     NOT NULL DEFAULT '',
    is_admin       SMALLINT NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    enabled        SMALLINT NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    created_at_us  BIGINT   NOT NULL
);

CREATE INDEX users_admins ON users (user_id) WHERE is_admin = 1;

CREATE TABLE credentials (
    credential_id    BYTEA   NOT NULL PRIMARY KEY,
    user_id          TEXT    NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    public_key       BYTEA   NOT NULL,
    sign_count       BIGINT  NOT NULL DEFAULT 0 CHECK (sign_count >= 0),
    transports       TEXT    NOT NULL DEFAULT '[]',
    aaguid           TEXT    NOT NULL DEFAULT '',
    created_at_us    BIGINT  NOT NULL,
    last_used_at_us  BIGINT
);

CREATE INDEX credentials_by_user ON credentials (user_id);

CREATE TABLE sessions (
    session_id       TEXT    NOT NULL PRIMARY KEY,
    device_id        TEXT    NOT NULL UNIQUE,
    user_id          TEXT    NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    token_hash       BYTEA   NOT NULL UNIQUE,
    credential_id    BYTEA   REFERENCES credentials (credential_id) ON DELETE SET NULL,
    user_agent       TEXT    NOT NULL DEFAULT '',
    created_at_us    BIGINT  NOT NULL,
    expires_at_us    BIGINT  NOT NULL,
    last_seen_at_us  BIGINT  NOT NULL,
    revoked_at_us    BIGINT
);

CREATE INDEX sessions_by_user ON sessions (user_id, created_at_us);
CREATE INDEX sessions_by_credential ON sessions (credential_id);

CREATE TABLE challenges (
    challenge      BYTEA    NOT NULL PRIMARY KEY,
    purpose        TEXT     NOT NULL,
    user_id        TEXT,
    username       TEXT,
    display_name   TEXT,
    invite_code    TEXT,
    created_at_us  BIGINT   NOT NULL,
    expires_at_us  BIGINT   NOT NULL,
    consumed       SMALLINT NOT NULL DEFAULT 0 CHECK (consumed IN (0, 1))
);

CREATE INDEX challenges_by_expiry ON challenges (expires_at_us);

CREATE TABLE invites (
    code_hash      BYTEA    NOT NULL PRIMARY KEY,
    created_by     TEXT     REFERENCES users (user_id) ON DELETE SET NULL,
    created_at_us  BIGINT   NOT NULL,
    expires_at_us  BIGINT,
    used_by        TEXT     REFERENCES users (user_id) ON DELETE SET NULL,
    used_at_us     BIGINT,
    is_bootstrap   SMALLINT NOT NULL DEFAULT 0 CHECK (is_bootstrap IN (0, 1))
);

CREATE INDEX invites_by_created ON invites (created_at_us);

CREATE TABLE settings (
    key    TEXT NOT NULL PRIMARY KEY,
    value  TEXT NOT NULL
);
