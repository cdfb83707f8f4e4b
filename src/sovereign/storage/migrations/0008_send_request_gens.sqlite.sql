-- 0008: idempotency keys are kept in generations, so that storing one writes the pages
-- that the keys stored just before it wrote.
--
-- send_requests was keyed (user_id, request_id). A request_id is client-chosen and the
-- SPEC recommends UUIDv4, so each new key landed on a random leaf of a table holding
-- 24 h of keys: one more page in the commit's WAL frames, and, once the table is larger
-- than what a checkpoint interval touches, one more scattered page (a 4 KiB block of
-- the database file) in every checkpoint. Measured with the load tool (200 pairs, fixed
-- phases after a full-speed phase, uuid4 request ids): 22.6 KB written per message at
-- 1,000 msgs/s, 9.1 KB with no keys stored at all (docs/performance.md).
--
-- Now the key leads with `gen`, a number the server raises every few thousand keys
-- (services/idempotency.py, GEN_KEYS). The keys of one generation share a small range
-- of leaves at the right edge of the tree, so a checkpoint interval's keys land on a
-- few hundred pages, wherever their request_ids sort. A lookup by (user_id, request_id)
-- -- only on a Bloom-filter hit -- seeks once per generation (messaging.py). A key
-- reused after the 24 h window may be stored twice, in two generations; a lookup takes
-- the newest within the window. PostgreSQL keeps (user_id, request_id) unique: cluster
-- mode's claim relies on it (0008_send_request_gens.postgres.sql).
--
-- Existing keys become generation 0.
CREATE TABLE send_requests_0008 (
    gen              INTEGER NOT NULL,
    user_id          TEXT    NOT NULL,
    request_id       TEXT    NOT NULL,
    event_id         TEXT    NOT NULL,
    created_at_us    INTEGER NOT NULL,
    PRIMARY KEY (gen, user_id, request_id)
) STRICT, WITHOUT ROWID;

INSERT INTO send_requests_0008 (gen, user_id, request_id, event_id, created_at_us)
    SELECT 0, user_id, request_id, event_id, created_at_us FROM send_requests;

DROP TABLE send_requests;

ALTER TABLE send_requests_0008 RENAME TO send_requests;
