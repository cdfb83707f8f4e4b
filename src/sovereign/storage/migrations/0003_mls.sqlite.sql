-- 0003: MLS KeyPackage pools, one per device (SPEC §7, §12.6, §12.17, §12.22).
-- Ordinary packages are handed out oldest first and consumed; a device keeps at most one
-- last-resort package, returned but never consumed. The hash refuses duplicates.

CREATE TABLE key_packages (
    kp_id            INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    device_id        TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    data             BLOB    NOT NULL,
    hash             BLOB    NOT NULL UNIQUE,               -- SHA-256 of data
    last_resort      INTEGER NOT NULL DEFAULT 0 CHECK (last_resort IN (0, 1)),
    created_at_us    INTEGER NOT NULL
) STRICT;

CREATE INDEX key_packages_by_device ON key_packages (device_id, last_resort, kp_id);
CREATE INDEX key_packages_by_user ON key_packages (user_id);
