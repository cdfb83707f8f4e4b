-- 0001: accounts, passkeys, sessions (= devices), challenges, invites, settings.
-- SPEC §4 (auth, sessions, devices), §10 (admin API), §12.12 (device ids), §12.19 (bootstrap).
-- Timestamps are integer microseconds since the Unix epoch. Booleans are 0/1.
-- Foreign keys are IMMEDIATE on purpose: a DEFERRED violation would only surface at
-- COMMIT and fail every write of a group-committed batch, not just the guilty one.

CREATE TABLE users (
    user_id        TEXT    NOT NULL PRIMARY KEY,            -- ULID
    username       TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    -- NFKC-casefolded username: NOCASE folds ASCII only (and PostgreSQL has no NOCASE),
    -- so uniqueness and lookups use a key computed in Python (users.username_key).
    username_key   TEXT    NOT NULL UNIQUE,
    display_name   TEXT    NOT NULL DEFAULT '',
    is_admin       INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    enabled        INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    created_at_us  INTEGER NOT NULL
) STRICT;

CREATE INDEX users_admins ON users (user_id) WHERE is_admin = 1;

-- WebAuthn credentials (passkeys). A user may have several.
CREATE TABLE credentials (
    credential_id    BLOB    NOT NULL PRIMARY KEY,
    user_id          TEXT    NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    public_key       BLOB    NOT NULL,                      -- COSE_Key
    sign_count       INTEGER NOT NULL DEFAULT 0 CHECK (sign_count >= 0),
    transports       TEXT    NOT NULL DEFAULT '[]',         -- JSON array of strings
    aaguid           TEXT    NOT NULL DEFAULT '',
    created_at_us    INTEGER NOT NULL,
    last_used_at_us  INTEGER
) STRICT;

CREATE INDEX credentials_by_user ON credentials (user_id);

-- A session is a device (SPEC §4): one passkey login on one client install.
-- Only the SHA-256 of the session token is stored.
CREATE TABLE sessions (
    session_id       TEXT    NOT NULL PRIMARY KEY,
    device_id        TEXT    NOT NULL UNIQUE,               -- random, never derived from the token
    user_id          TEXT    NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    token_hash       BLOB    NOT NULL UNIQUE,
    credential_id    BLOB    REFERENCES credentials (credential_id) ON DELETE SET NULL,
    user_agent       TEXT    NOT NULL DEFAULT '',
    created_at_us    INTEGER NOT NULL,
    expires_at_us    INTEGER NOT NULL,
    last_seen_at_us  INTEGER NOT NULL,
    revoked_at_us    INTEGER
) STRICT;

CREATE INDEX sessions_by_user ON sessions (user_id, created_at_us);
CREATE INDEX sessions_by_credential ON sessions (credential_id);

-- WebAuthn challenges: single use, short-lived (60 s, SPEC §4).
-- No foreign key on user_id: a registration challenge names a user id that does not
-- exist until the ceremony completes.
CREATE TABLE challenges (
    challenge      BLOB    NOT NULL PRIMARY KEY,
    purpose        TEXT    NOT NULL,                        -- checked in challenges.py
    user_id        TEXT,
    username       TEXT,
    display_name   TEXT,
    invite_code    TEXT,
    created_at_us  INTEGER NOT NULL,
    expires_at_us  INTEGER NOT NULL,
    consumed       INTEGER NOT NULL DEFAULT 0 CHECK (consumed IN (0, 1))
) STRICT;

CREATE INDEX challenges_by_expiry ON challenges (expires_at_us);

-- Invite codes (SPEC §4 registration policy) and the first-admin bootstrap code
-- (SPEC §10, §12.19). Only the SHA-256 of a code is stored.
CREATE TABLE invites (
    code_hash      BLOB    NOT NULL PRIMARY KEY,
    created_by     TEXT    REFERENCES users (user_id) ON DELETE SET NULL,
    created_at_us  INTEGER NOT NULL,
    expires_at_us  INTEGER,                                 -- NULL: never expires
    used_by        TEXT    REFERENCES users (user_id) ON DELETE SET NULL,
    used_at_us     INTEGER,                                 -- NULL: unused (used_by may be nulled)
    is_bootstrap   INTEGER NOT NULL DEFAULT 0 CHECK (is_bootstrap IN (0, 1))
) STRICT;

CREATE INDEX invites_by_created ON invites (created_at_us);

-- Runtime settings changed through the admin API (SPEC §10); value is JSON.
CREATE TABLE settings (
    key    TEXT NOT NULL PRIMARY KEY,
    value  TEXT NOT NULL
) STRICT;
