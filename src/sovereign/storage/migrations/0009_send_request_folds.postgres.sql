-- 0009 (PostgreSQL): the columns and table of 0009_send_request_folds.sqlite.sql, so the
-- two schemas stay the same (`sovereign migrate-to-postgres` copies them). PostgreSQL
-- does not fold: cluster mode settles a request_id two nodes store at once by the
-- send_requests row written in the event's transaction (storage/cluster.py), and a
-- single node on PostgreSQL writes that row too. request_id is stored in the event row
-- here as well; send_request_folds stays empty unless a migration copies SQLite's mark.
ALTER TABLE events ADD COLUMN request_id TEXT;

CREATE TABLE send_request_folds (
    id               INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    event_id         TEXT    NOT NULL
);
