-- 0004: a session's kind (SPEC §12.28). 'device' is a client install (a device, with
-- cursors and KeyPackages); 'admin' is a browser panel sign-in: it authenticates only
-- the admin API (12 h, never sliding) and is refused as a WebSocket session.
ALTER TABLE sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'device' CHECK (kind IN ('device', 'admin'));
