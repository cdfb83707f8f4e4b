-- 0007: a device's cursor and its user's delivered position share one B-tree, keyed
-- by conversation first.
--
-- Every acknowledgement moves two rows: the device's cursor, and (the first time one of
-- the user's devices passes a message) the user's delivered position. They lived in two
-- tables keyed differently, cursors by (device_id, conversation_id) and delivery by
-- (conversation_id, user_id), so a commit of acks wrote a leaf page of each: a WAL census
-- at a fixed 1,000 msgs/s counted 1.6 cursor and 1.6 delivery pages per commit, of ~15.
-- Now both are rows of `cursors`, keyed (conversation_id, user_id, device_id); the
-- delivered position is the row whose device_id is '' (device ids are never empty), so
-- it sits next to the cursors of the user's devices in that conversation and one leaf
-- takes both writes. A device's cursors (read at each resume) are found through
-- cursors_by_device; an ack changes only acked_seq, which that index does not hold, so
-- the index is written only when a row is added or dropped.
--
-- Cursors of devices that no longer exist (no sessions row) are left behind: nothing
-- reads them.
CREATE TABLE cursors_0007 (
    conversation_id  TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    device_id        TEXT    NOT NULL,                      -- '' : the user's delivered position
    acked_seq        INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id, device_id)
) STRICT, WITHOUT ROWID;

INSERT INTO cursors_0007 (conversation_id, user_id, device_id, acked_seq)
    SELECT c.conversation_id, s.user_id, c.device_id, c.acked_seq
    FROM cursors c JOIN sessions s ON s.device_id = c.device_id;

INSERT INTO cursors_0007 (conversation_id, user_id, device_id, acked_seq)
    SELECT conversation_id, user_id, '', up_to_seq FROM delivery;

DROP TABLE cursors;

DROP TABLE delivery;

ALTER TABLE cursors_0007 RENAME TO cursors;

CREATE INDEX cursors_by_device ON cursors (device_id, conversation_id);
