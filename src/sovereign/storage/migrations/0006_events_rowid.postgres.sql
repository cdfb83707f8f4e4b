-- 0006: on SQLite, events becomes a rowid table (see 0006_events_rowid.sqlite.sql).
-- PostgreSQL tables are heaps with separate indexes already: nothing to change. The
-- number is taken here too so both engines report the same schema version
-- (`sovereign migrate-to-postgres` compares them).
SELECT 1;
