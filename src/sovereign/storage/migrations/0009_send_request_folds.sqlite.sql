-- 0009: a send's idempotency key rides in its event row; the keys go to send_requests a
-- generation at a time.
--
-- With 0008 every idempotent send still wrote its send_requests row in the event's
-- commit: at everyday load, with about one message per commit, one more page of the
-- WAL per commit (a WAL census counted 1.43 of 5.71 frames per commit), and that page
-- again in the next checkpoint. Now MESSAGE_SEND events keep their request_id in the
-- event row, which the commit writes anyway, and the server copies a generation's keys
-- into send_requests in one statement once the generation is full
-- (services/idempotency.py, storage/messaging.py: fold_send_requests_txn).
--
-- send_request_folds holds the fold's mark: the newest event id whose key is in
-- send_requests. The keys of events after it are read back into memory at start-up.
-- Event ids only grow (a ULID, monotonic in the server, which starts past the newest
-- stored id), so an event after the mark is one whose key is not folded yet.
--
-- The keys already stored are folded: the mark starts at the newest event.
ALTER TABLE events ADD COLUMN request_id TEXT;

CREATE TABLE send_request_folds (
    id               INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    event_id         TEXT    NOT NULL
) STRICT;

INSERT INTO send_request_folds (id, event_id) SELECT 1, max(event_id) FROM events
    WHERE event_id IS NOT NULL HAVING max(event_id) IS NOT NULL;
