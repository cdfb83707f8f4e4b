-- 0004 (PostgreSQL): a session's kind; see 0004_admin_sessions.sqlite.sql.
ALTER TABLE sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'device' CHECK (kind IN ('device', 'admin'));
