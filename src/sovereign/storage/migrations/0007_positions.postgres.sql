-- 0007 (PostgreSQL): the same change as 0007_positions.sqlite.sql (see there): a
-- device's cursor and its user's delivered position (device_id '') become rows of one
-- table keyed (conversation_id, user_id, device_id). Here it keeps SQL written once and
-- the schemas alike; the fillfactor leaves room for HOT updates as before.
CREATE TABLE cursors_0007 (
    conversation_id  TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    device_id        TEXT    NOT NULL,
    acked_seq        BIGINT  NOT NULL,
    PRIMARY KEY (conversation_id, user_id, device_id)
) WITH (fillfactor = 70);

INSERT INTO cursors_0007 (conversation_id, user_id, device_id, acked_seq)
    SELECT c.conversation_id, s.user_id, c.device_id, c.acked_seq
    FROM cursors c JOIN sessions s ON s.device_id = c.device_id;

INSERT INTO cursors_0007 (conversation_id, user_id, device_id, acked_seq)
    SELECT conversation_id, user_id, '', up_to_seq FROM delivery;

DROP TABLE cursors;

DROP TABLE delivery;

ALTER TABLE cursors_0007 RENAME TO cursors;

ALTER INDEX cursors_0007_pkey RENAME TO cursors_pkey;

CREATE INDEX cursors_by_device ON cursors (device_id, conversation_id);
