-- 0008 (PostgreSQL): the generation column of 0008_send_request_gens.sqlite.sql, so the
-- two schemas have the same columns (`sovereign migrate-to-postgres` copies them), but
-- not its key: here (user_id, request_id) stays the primary key. Cluster mode's claim
-- (storage/cluster.py) needs that uniqueness to settle a request_id two nodes store at
-- once, and PostgreSQL's heap appends rows wherever their key sorts, so the index is
-- the only structure the random request_ids scatter.
ALTER TABLE send_requests ADD COLUMN gen BIGINT NOT NULL DEFAULT 0;
