"""SQL for conversations, the event log, cursors and receipts (SPEC §5, §6).

The messaging service keeps conversations, members and sequence counters in memory
(the hot path reads nothing from disk) and writes through these ``*_txn`` functions,
many events per transaction. Reads here serve offline sync and history pages.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sovereign.storage._util import insert_rows, rows_in
from sovereign.storage.database import Conn
from sovereign.storage.engines import Engine, per_engine

#: The ``cursors`` row whose device_id is this holds the user's delivered position in
#: the conversation (device ids are never empty): it sits next to the cursors of the
#: user's devices, so an ack that moves both writes one leaf page (migration 0007).
DELIVERED = ""

# Delivery state only moves forward: an upsert keeps the larger of the stored and the
# new position. Built once here, per engine (``greatest`` is engine SQL, see engines.py).
# Rows are (conversation_id, user_id, device_id, seq): cursors and delivered positions.
_SAVE_POSITION = per_engine(
    lambda e: (
        "INSERT INTO cursors (conversation_id, user_id, device_id, acked_seq) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (conversation_id, user_id, device_id) DO UPDATE SET acked_seq = "
        + e.greatest("cursors.acked_seq", "excluded.acked_seq")
    )
)
_SAVE_READ_MARKER = per_engine(
    lambda e: (
        "INSERT INTO read_markers (conversation_id, user_id, up_to_seq, updated_at_us)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (conversation_id, user_id) DO UPDATE SET up_to_seq = "
        + e.greatest("read_markers.up_to_seq", "excluded.up_to_seq")
        + ", updated_at_us = excluded.updated_at_us"
    )
)


# Idempotency keys (migration 0008): SQLite keys them by generation first, PostgreSQL
# by (user_id, request_id) alone (engines.py), so the upsert names each engine's key.
# Rows are (gen, user_id, request_id, event_id, created_at_us).
def _store_send_requests(engine: Engine, rows: str) -> str:
    """Store ``rows`` (gen, user_id, request_id, event_id, created_at_us): a key stored
    again replaces its row in the same generation."""
    return (
        f"INSERT INTO send_requests (gen, user_id, request_id, event_id, created_at_us) {rows}"
        f" ON CONFLICT ({engine.send_request_key()}) DO UPDATE SET"
        " gen = excluded.gen, event_id = excluded.event_id,"
        " created_at_us = excluded.created_at_us"
    )


_INSERT_SEND_REQUEST = per_engine(lambda e: _store_send_requests(e, "VALUES (?, ?, ?, ?, ?)"))
# A generation's keys, folded from the event rows after the mark (migration 0009), in
# event order: a key used twice keeps the newer event.
_FOLD_SEND_REQUESTS = per_engine(
    lambda e: _store_send_requests(
        e,
        "SELECT ?, sender_id, request_id, event_id, ts_us FROM events"
        " WHERE event_id > ? AND request_id IS NOT NULL ORDER BY event_id",
    )
)


# The start-up load's pages, in each engine's key order (keyset paging): the first page,
# then the pages after a key (as many parameters as the engine's key has columns).
def _keys_sql(engine: Engine, after: bool) -> str:
    key = engine.send_request_key()
    marks = ", ".join("?" * len(key.split(",")))
    where = f"({key}) > ({marks}) AND " if after else ""
    return (
        "SELECT gen, user_id, request_id, created_at_us FROM send_requests"
        f" WHERE {where}created_at_us >= ? ORDER BY {key} LIMIT ?"
    )


_KEYS_FIRST = per_engine(lambda e: _keys_sql(e, after=False))
_KEYS_AFTER = per_engine(lambda e: _keys_sql(e, after=True))


def _send_request_event_sql(engine: Engine) -> str:
    with_gens, rows = engine.send_request_gens()
    return (
        f"{with_gens}SELECT r.event_id, e.payload FROM {rows}"
        " LEFT JOIN events e ON e.event_id = r.event_id"
        " WHERE r.user_id = ? AND r.request_id = ? AND r.created_at_us >= ?"
        " ORDER BY r.created_at_us DESC LIMIT 1"
    )


_SEND_REQUEST_EVENT = per_engine(_send_request_event_sql)
# Retention also records the head it removed: once a conversation's newest events are
# gone, the conversations row is where its last seq and timestamp survive (see
# load_conversations_txn).
_RAISE_PURGED_SEQ = per_engine(
    lambda e: (
        "UPDATE conversations SET purged_seq = "
        + e.greatest("purged_seq", "?")
        + ", last_seq = "
        + e.greatest("last_seq", "?")
        + ", last_ts_us = "
        + e.greatest("last_ts_us", "?")
        + " WHERE conversation_id = ?"
    )
)


@dataclass(slots=True)
class ConversationRecord:
    conversation_id: str
    title: str
    created_by: str
    created_at_us: int
    last_seq: int = 0
    last_ts_us: int = 0
    purged_seq: int = 0
    mls_group_id: bytes | None = None
    mls_epoch: int = 0
    group_info: bytes | None = None
    group_info_epoch: int | None = None


@dataclass(slots=True)
class MemberRecord:
    conversation_id: str
    user_id: str
    role: str
    joined_seq: int
    joined_at_us: int
    left_seq: int | None = None


#: (conversation_id, seq, event_id, type, sender_id, ts_us, payload, request_id)
EventRow = tuple[str, int, str, int, str, int, bytes, str | None]
#: (seq, event_id, type, sender_id, ts_us, payload)
StoredEvent = tuple[int, str, int, str, int, bytes]
#: (event_id, conversation_id, sender_id, ts_us, payload)
StoredWelcome = tuple[str, str, str, int, bytes]


# -- load at start-up -------------------------------------------------------------------


def load_conversations_txn(conn: Conn) -> tuple[list[ConversationRecord], list[MemberRecord]]:
    """Conversations and members. A conversation's head (last seq and timestamp) is its
    newest stored event: the event batch does not rewrite the conversations row (one
    B-tree page less per commit); ``last_seq`` / ``last_ts_us`` there are a floor, kept
    by retention for conversations whose newest events it removed."""
    convs = [
        ConversationRecord(*row)
        for row in conn.execute(
            "SELECT conversation_id, title, created_by, created_at_us, last_seq, last_ts_us,"
            " purged_seq, mls_group_id, mls_epoch, group_info, group_info_epoch"
            " FROM conversations"
        )
    ]
    for rec in convs:
        row = conn.execute(
            "SELECT seq, ts_us FROM events WHERE conversation_id = ? ORDER BY seq DESC LIMIT 1",
            (rec.conversation_id,),
        ).fetchone()
        rec.last_seq = max(rec.last_seq, rec.purged_seq, int(row[0]) if row else 0)
        rec.last_ts_us = max(rec.last_ts_us, int(row[1]) if row else 0)
    members = [
        MemberRecord(*row)
        for row in conn.execute(
            "SELECT conversation_id, user_id, role, joined_seq, joined_at_us, left_seq"
            " FROM members ORDER BY conversation_id, joined_seq"
        )
    ]
    return convs, members


# -- the event batch --------------------------------------------------------------------


def insert_events_txn(conn: Conn, events: Sequence[EventRow]) -> None:
    insert_rows(
        conn,
        "INSERT INTO events"
        " (conversation_id, seq, event_id, type, sender_id, ts_us, payload, request_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        events,
    )


def insert_conversation_txn(conn: Conn, rec: ConversationRecord) -> None:
    conn.execute(
        "INSERT INTO conversations (conversation_id, title, created_by, created_at_us)"
        " VALUES (?, ?, ?, ?)",
        (rec.conversation_id, rec.title, rec.created_by, rec.created_at_us),
    )


def join_members_txn(
    conn: Conn, conversation_id: str, joins: list[tuple[str, str, int, int]]
) -> None:
    """Members (user_id, role, joined_seq, joined_at_us) join (or rejoin): membership,
    and every device of each starts at its GROUP_MEMBER_ADDED seq - 1, as does the
    user's delivered position (SPEC §5). Three statements for any number of members, not
    three per member: on PostgreSQL each statement is a round trip."""
    conn.executemany(
        "INSERT INTO members (conversation_id, user_id, role, joined_seq, joined_at_us, left_seq)"
        " VALUES (?, ?, ?, ?, ?, NULL)"
        " ON CONFLICT (conversation_id, user_id) DO UPDATE SET role = excluded.role,"
        " joined_seq = excluded.joined_seq, joined_at_us = excluded.joined_at_us, left_seq = NULL",
        [(conversation_id, uid, role, seq, ts) for uid, role, seq, ts in joins],
    )
    conn.executemany(
        "INSERT INTO cursors (conversation_id, user_id, device_id, acked_seq)"
        " SELECT ?, user_id, device_id, ? FROM sessions WHERE user_id = ? AND revoked_at_us IS NULL"
        " ON CONFLICT (conversation_id, user_id, device_id)"
        " DO UPDATE SET acked_seq = excluded.acked_seq",
        [(conversation_id, seq - 1, uid) for uid, _role, seq, _ts in joins],
    )
    conn.executemany(
        "INSERT INTO cursors (conversation_id, user_id, device_id, acked_seq) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (conversation_id, user_id, device_id)"
        " DO UPDATE SET acked_seq = excluded.acked_seq",
        [(conversation_id, uid, DELIVERED, seq - 1) for uid, _role, seq, _ts in joins],
    )


def mark_member_left_txn(conn: Conn, conversation_id: str, user_id: str, left_seq: int) -> None:
    conn.execute(
        "UPDATE members SET left_seq = ?, role = 'member'"
        " WHERE conversation_id = ? AND user_id = ?",
        (left_seq, conversation_id, user_id),
    )


def set_role_txn(conn: Conn, conversation_id: str, user_id: str, role: str) -> None:
    conn.execute(
        "UPDATE members SET role = ? WHERE conversation_id = ? AND user_id = ?",
        (role, conversation_id, user_id),
    )


def start_device_cursors_txn(
    conn: Conn, device_id: str, user_id: str, cursors: Iterable[tuple[str, int]]
) -> None:
    """A device created after its user joined starts at the current last seq (§12.12)."""
    conn.executemany(
        "INSERT INTO cursors (conversation_id, user_id, device_id, acked_seq) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (conversation_id, user_id, device_id) DO NOTHING",
        [(conv, user_id, device_id, seq) for conv, seq in cursors],
    )


def insert_send_requests_txn(conn: Conn, rows: Sequence[tuple[int, str, str, str, int]]) -> None:
    """(gen, user_id, request_id, event_id, created_at_us) of idempotent sends, one
    batch. A key stored again (only ever after the 24 h window) replaces its row in the
    same generation; in another generation it is a second row (migration 0008), and
    :func:`send_request_event_txn` takes the newer."""
    insert_rows(conn, _INSERT_SEND_REQUEST, rows)


def fold_send_requests_txn(conn: Conn, gen: int) -> int:
    """Copy the idempotency keys of the events after the fold's mark into
    ``send_requests`` as generation ``gen``, and move the mark to the newest event;
    returns how many keys were copied (SQLite, single node: migration 0009).

    Exact by construction: one transaction reads the events it folds and sets the mark
    to the newest of them, whatever the server's memory holds. Event ids only grow
    (services/ids.py: monotonic, and started past the newest stored id), so every
    event committed after this one is after the mark."""
    mark = _fold_mark(conn)
    newest = conn.execute("SELECT max(event_id) FROM events").fetchone()[0]
    if newest is None or newest <= mark:
        return 0
    n = conn.execute(_FOLD_SEND_REQUESTS, (gen, mark)).rowcount
    conn.execute(
        "INSERT INTO send_request_folds (id, event_id) VALUES (1, ?)"
        " ON CONFLICT (id) DO UPDATE SET event_id = excluded.event_id",
        (newest,),
    )
    return int(n)


def _fold_mark(conn: Conn) -> str:
    """The newest event whose key is in ``send_requests`` ("": none folded yet)."""
    row = conn.execute("SELECT event_id FROM send_request_folds WHERE id = 1").fetchone()
    return str(row[0]) if row else ""


def unfolded_send_requests_txn(conn: Conn) -> tuple[list[tuple[str, str, str, int]], str]:
    """Start-up (SQLite, single node): (user_id, request_id, event_id, ts_us) of the
    idempotent sends after the fold's mark, oldest first, and the newest stored event
    id ("" if none), past which the server's new ids must start."""
    mark = _fold_mark(conn)
    rows = [
        (str(r[0]), str(r[1]), str(r[2]), int(r[3]))
        for r in conn.execute(
            "SELECT sender_id, request_id, event_id, ts_us FROM events"
            " WHERE event_id > ? AND request_id IS NOT NULL ORDER BY event_id",
            (mark,),
        )
    ]
    newest = conn.execute("SELECT max(event_id) FROM events").fetchone()[0]
    return rows, "" if newest is None else str(newest)


def insert_welcome_txn(
    conn: Conn,
    event_id: str,
    user_id: str,
    conversation_id: str,
    sender_id: str,
    ts_us: int,
    payload: bytes,
) -> None:
    conn.execute(
        "INSERT INTO welcomes (event_id, user_id, conversation_id, sender_id, ts_us, payload)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (event_id, user_id, conversation_id, sender_id, ts_us, payload),
    )


def update_mls_txn(
    conn: Conn,
    conversation_id: str,
    group_id: bytes | None,
    epoch: int,
    group_info: bytes | None,
    group_info_epoch: int | None,
) -> None:
    conn.execute(
        "UPDATE conversations SET mls_group_id = ?, mls_epoch = ?, group_info = ?,"
        " group_info_epoch = ? WHERE conversation_id = ?",
        (group_id, epoch, group_info, group_info_epoch, conversation_id),
    )


# -- coalesced delivery-state writes -------------------------------------------------------


def save_delivery_state_txn(
    conn: Conn,
    positions: Sequence[tuple[str, str, str, int]],
    dropped_cursors: Sequence[tuple[str, str]],
    welcome_acks: Sequence[tuple[str, str]],
    read_markers: Sequence[tuple[str, str, int, int]],
) -> None:
    """One transaction for everything acks and read markers moved since the last flush:
    ``positions`` (conversation_id, user_id, device_id, seq), cursors and delivered
    positions (device_id :data:`DELIVERED`) alike; ``dropped_cursors`` (device_id,
    conversation_id)."""
    if positions:
        insert_rows(conn, _SAVE_POSITION, positions)
    if dropped_cursors:
        conn.executemany(
            "DELETE FROM cursors WHERE device_id = ? AND conversation_id = ?", dropped_cursors
        )
    if welcome_acks:
        conn.executemany(
            "INSERT INTO welcome_acks (device_id, event_id) VALUES (?, ?)"
            " ON CONFLICT (device_id, event_id) DO NOTHING",
            welcome_acks,
        )
    if read_markers:
        conn.executemany(_SAVE_READ_MARKER, read_markers)


# -- reads ----------------------------------------------------------------------------


def load_device_txn(conn: Conn, session_id: str, device_id: str) -> tuple[int, dict[str, int]]:
    """(created_at_us of the device's session, its cursors): one read for a READY."""
    row = conn.execute(
        "SELECT created_at_us FROM sessions WHERE session_id = ?", (session_id,)
    ).fetchone()
    return (int(row[0]) if row else 0), load_cursors_txn(conn, device_id)


def load_device_sync_txn(
    conn: Conn,
    session_id: str,
    device_id: str,
    user_id: str,
    extra: Sequence[Callable[[Conn, str], None]] = (),
) -> tuple[int, dict[str, int], list[StoredWelcome]]:
    """What a READY needs of a device not in memory, in one read: its session's
    created_at_us, its cursors and its pending welcomes (one reader hop, not two),
    then the ``extra`` reads other services asked for (they keep their own results)."""
    created, cursors = load_device_txn(conn, session_id, device_id)
    return created, cursors, device_extras_txn(conn, device_id, user_id, created, extra)


def device_extras_txn(
    conn: Conn,
    device_id: str,
    user_id: str,
    created_at_us: int,
    extra: Sequence[Callable[[Conn, str], None]] = (),
) -> list[StoredWelcome]:
    """A device's pending welcomes, then the ``extra`` reads of other services (each
    gets the device id and keeps its own result)."""
    welcomes = pending_welcomes_txn(conn, user_id, device_id, created_at_us)
    for read in extra:
        read(conn, device_id)
    return welcomes


def load_cursors_txn(conn: Conn, device_id: str) -> dict[str, int]:
    return {
        conv: seq
        for conv, seq in conn.execute(
            "SELECT conversation_id, acked_seq FROM cursors WHERE device_id = ?", (device_id,)
        )
    }


def load_delivery_txn(conn: Conn, conversation_id: str, user_id: str) -> int | None:
    row = conn.execute(
        "SELECT acked_seq FROM cursors WHERE conversation_id = ? AND user_id = ? AND device_id = ?",
        (conversation_id, user_id, DELIVERED),
    ).fetchone()
    return None if row is None else int(row[0])


def read_marker_txn(conn: Conn, conversation_id: str, user_id: str) -> int:
    row = conn.execute(
        "SELECT up_to_seq FROM read_markers WHERE conversation_id = ? AND user_id = ?",
        (conversation_id, user_id),
    ).fetchone()
    return 0 if row is None else int(row[0])


def events_after_txn(
    conn: Conn, conversation_id: str, after_seq: int, up_to_seq: int, limit: int
) -> list[StoredEvent]:
    """Events with after_seq < seq <= up_to_seq, ascending, at most ``limit``."""
    return [
        tuple(r)
        for r in conn.execute(
            "SELECT seq, event_id, type, sender_id, ts_us, payload FROM events"
            " WHERE conversation_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (conversation_id, after_seq, up_to_seq, limit),
        )
    ]


def events_before_txn(
    conn: Conn, conversation_id: str, before_seq: int, min_seq: int, limit: int
) -> list[StoredEvent]:
    """Events with min_seq <= seq < before_seq, the newest ``limit`` of them, ascending."""
    rows = [
        tuple(r)
        for r in conn.execute(
            "SELECT seq, event_id, type, sender_id, ts_us, payload FROM events"
            " WHERE conversation_id = ? AND seq < ? AND seq >= ? ORDER BY seq DESC LIMIT ?",
            (conversation_id, before_seq, min_seq, limit),
        )
    ]
    rows.reverse()
    return rows


def event_by_id_txn(conn: Conn, event_id: str) -> tuple[str, int, int, str] | None:
    """(conversation_id, seq, type, sender_id) of a stored conversation event."""
    row = conn.execute(
        "SELECT conversation_id, seq, type, sender_id FROM events WHERE event_id = ?",
        (event_id,),
    ).fetchone()
    return None if row is None else (row[0], int(row[1]), int(row[2]), row[3])


def ack_lookup_txn(
    conn: Conn, event_ids: list[str]
) -> tuple[dict[str, tuple[str, int, int, str]], dict[str, str]]:
    """For the ids of one MESSAGE_ACK, in one transaction (SPEC §12.32: no per-id round
    trip): the conversation events among them as (conversation_id, seq, type,
    sender_id), and the welcomes among the rest as their recipient user."""
    events = {
        row[0]: (row[1], int(row[2]), int(row[3]), row[4])
        for row in rows_in(
            conn,
            "SELECT event_id, conversation_id, seq, type, sender_id FROM events"
            " WHERE event_id IN ({marks})",
            event_ids,
        )
    }
    rest = [e for e in event_ids if e not in events]
    owners = {
        row[0]: str(row[1])
        for row in rows_in(
            conn, "SELECT event_id, user_id FROM welcomes WHERE event_id IN ({marks})", rest
        )
    }
    return events, owners


def event_payload_txn(conn: Conn, event_id: str) -> tuple[str, int, bytes] | None:
    row = conn.execute(
        "SELECT conversation_id, type, payload FROM events WHERE event_id = ?", (event_id,)
    ).fetchone()
    return None if row is None else (row[0], int(row[1]), bytes(row[2]))


def welcome_owner_txn(conn: Conn, event_id: str) -> str | None:
    row = conn.execute("SELECT user_id FROM welcomes WHERE event_id = ?", (event_id,)).fetchone()
    return None if row is None else str(row[0])


def pending_welcomes_txn(
    conn: Conn, user_id: str, device_id: str, since_us: int
) -> list[StoredWelcome]:
    """Welcomes stored after the device existed that the device has not acked (§12.12)."""
    return [
        tuple(r)
        for r in conn.execute(
            "SELECT w.event_id, w.conversation_id, w.sender_id, w.ts_us, w.payload"
            " FROM welcomes w WHERE w.user_id = ? AND w.ts_us >= ? AND NOT EXISTS"
            " (SELECT 1 FROM welcome_acks a WHERE a.device_id = ? AND a.event_id = w.event_id)"
            " ORDER BY w.event_id",
            (user_id, since_us, device_id),
        )
    ]


def send_request_keys_txn(
    conn: Conn, since_us: int, after: tuple[int, str, str] | None, limit: int
) -> list[tuple[int, str, str, int]]:
    """(gen, user_id, request_id, created_at_us) of idempotency keys newer than
    ``since_us``, in primary-key order after ``after`` (a row's first three values): a
    page of the start-up load (keyset paging on the primary key: no sort, no extra
    index). The primary key differs per engine (:meth:`SqliteEngine.send_request_key`),
    so the page's order and ``after``'s comparison do too."""
    if after is None:
        cur = conn.execute(_KEYS_FIRST, (since_us, limit))
    else:
        key = after if _is_sqlite(conn) else after[1:]  # PostgreSQL's key has no gen
        cur = conn.execute(_KEYS_AFTER, (*key, since_us, limit))
    return [(int(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in cur]


def _is_sqlite(conn: Conn) -> bool:
    return isinstance(conn, sqlite3.Connection)


def send_request_event_txn(
    conn: Conn, user_id: str, request_id: str, since_us: int
) -> tuple[str, bytes | None] | None:
    """The stored send with this idempotency key within the window: (event id, its
    MessageReceive payload, None if retention removed the event), or None if the key is
    not stored. SQLite seeks once per generation kept (one per 1,024 keys and per
    start, at most ~256 of the former: services/idempotency.py); PostgreSQL reads its
    unique key once."""
    row = conn.execute(_SEND_REQUEST_EVENT, (user_id, request_id, since_us)).fetchone()
    if row is None:
        return None
    return str(row[0]), None if row[1] is None else bytes(row[1])


# -- retention ------------------------------------------------------------------------


def purge_events_txn(conn: Conn, before_event_id: str) -> dict[str, int]:
    """Delete events older than the cutoff ULID; returns conversation -> highest purged seq."""
    purged: dict[str, int] = {}
    newest_ts: dict[str, int] = {}
    for conv, seq, ts in conn.execute(
        "DELETE FROM events WHERE event_id < ? RETURNING conversation_id, seq, ts_us",
        (before_event_id,),
    ).fetchall():
        if seq > purged.get(conv, 0):
            purged[conv] = int(seq)
        if ts > newest_ts.get(conv, 0):
            newest_ts[conv] = int(ts)
    conn.executemany(
        _RAISE_PURGED_SEQ,
        [(seq, seq, newest_ts[conv], conv) for conv, seq in purged.items()],
    )
    conn.execute("DELETE FROM welcomes WHERE event_id < ?", (before_event_id,))
    return purged


def purge_send_requests_txn(conn: Conn, before_us: int) -> int:
    """Delete the idempotency keys stored before ``before_us``; returns how many.

    On SQLite the hourly pass reads what it deletes, not the whole day of keys (one
    writer transaction: 446,515 keys took 36 ms to scan here). Generations are stored
    in time order, so whole generations go by key range, the oldest first, until one
    still holds a key of the window; that one is scanned for its older keys. A key
    that a stepped-back clock put in a later generation waits until its generation's
    turn: harmless meanwhile, since a check only takes keys within the window.
    PostgreSQL, keyed by (user_id, request_id), scans."""
    if not _is_sqlite(conn):
        return conn.execute(
            "DELETE FROM send_requests WHERE created_at_us < ?", (before_us,)
        ).rowcount
    gen = conn.execute("SELECT min(gen) FROM send_requests").fetchone()[0]
    while gen is not None:
        newest = conn.execute(
            "SELECT max(created_at_us) FROM send_requests WHERE gen = ?", (gen,)
        ).fetchone()[0]
        if newest >= before_us:
            break
        gen = conn.execute("SELECT min(gen) FROM send_requests WHERE gen > ?", (gen,)).fetchone()[0]
    if gen is None:
        return conn.execute("DELETE FROM send_requests").rowcount
    whole = conn.execute("DELETE FROM send_requests WHERE gen < ?", (gen,)).rowcount
    part = conn.execute(
        "DELETE FROM send_requests WHERE gen = ? AND created_at_us < ?", (gen, before_us)
    ).rowcount
    return whole + part
