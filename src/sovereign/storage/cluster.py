"""SQL of cluster mode (SPEC §12.27): seq allocation in the event transaction, the
database-decided guards of ops, and the reads a node catches up with.

Cluster mode keeps ``conversations.last_seq`` / ``last_ts_us`` exact (every event
transaction moves them under the row's lock); a single node keeps them only as a floor
(its head is its newest event), so :func:`exact_heads_txn` fixes them at start-up.
"""

from __future__ import annotations

from sovereign.storage import messaging as sql
from sovereign.storage.database import Conn


def exact_heads_txn(conn: Conn, heads: list[tuple[int, int, str, int]]) -> None:
    """``conversations.last_seq`` / ``last_ts_us`` become exact (never lowered)."""
    conn.executemany(
        "UPDATE conversations SET last_seq = ?, last_ts_us = ?"
        " WHERE conversation_id = ? AND last_seq < ?",
        heads,
    )


def load_one_txn(
    conn: Conn, conversation_id: str
) -> tuple[list[sql.ConversationRecord], list[sql.MemberRecord]]:
    row = conn.execute(
        "SELECT conversation_id, title, created_by, created_at_us, last_seq, last_ts_us,"
        " purged_seq, mls_group_id, mls_epoch, group_info, group_info_epoch"
        " FROM conversations WHERE conversation_id = ?",
        (conversation_id,),
    ).fetchone()
    if row is None:
        return [], []
    members = [
        sql.MemberRecord(*r)
        for r in conn.execute(
            "SELECT conversation_id, user_id, role, joined_seq, joined_at_us, left_seq"
            " FROM members WHERE conversation_id = ? ORDER BY joined_seq",
            (conversation_id,),
        )
    ]
    return [sql.ConversationRecord(*row)], members


def mls_txn(
    conn: Conn, conversation_id: str
) -> tuple[bytes | None, int, bytes | None, int | None] | None:
    row = conn.execute(
        "SELECT mls_group_id, mls_epoch, group_info, group_info_epoch FROM conversations"
        " WHERE conversation_id = ?",
        (conversation_id,),
    ).fetchone()
    if row is None:
        return None
    return (
        None if row[0] is None else bytes(row[0]),
        int(row[1]),
        None if row[2] is None else bytes(row[2]),
        None if row[3] is None else int(row[3]),
    )


def heads_txn(conn: Conn, users: list[str]) -> tuple[dict[str, int], set[str]]:
    """The exact head (cluster mode keeps ``last_seq`` exact) of every conversation
    ``users`` are or were members of, and the set of those conversations."""
    heads: dict[str, int] = {}
    for i in range(0, len(users), 500):
        chunk = users[i : i + 500]
        marks = ",".join("?" * len(chunk))
        for r in conn.execute(
            "SELECT DISTINCT c.conversation_id, c.last_seq FROM conversations c"
            " JOIN members m ON m.conversation_id = c.conversation_id"
            f" WHERE m.user_id IN ({marks})",
            chunk,
        ):
            heads[str(r[0])] = int(r[1])
    return heads, set(heads)


def closed_txn(conn: Conn, users: list[str], sessions: list[str]) -> tuple[list[str], list[str]]:
    gone_users: list[str] = []
    gone_sessions: list[str] = []
    for i in range(0, len(users), 500):
        chunk = users[i : i + 500]
        marks = ",".join("?" * len(chunk))
        gone_users += [
            str(r[0])
            for r in conn.execute(
                f"SELECT user_id FROM users WHERE user_id IN ({marks}) AND enabled = 0", chunk
            )
        ]
    for i in range(0, len(sessions), 500):
        chunk = sessions[i : i + 500]
        marks = ",".join("?" * len(chunk))
        gone_sessions += [
            str(r[0])
            for r in conn.execute(
                f"SELECT session_id FROM sessions WHERE session_id IN ({marks})"
                " AND revoked_at_us IS NOT NULL",
                chunk,
            )
        ]
    return gone_users, gone_sessions


# -- the event transaction -----------------------------------------------------------------


def allocate_seqs_txn(conn: Conn, conversation_id: str, n: int) -> tuple[int, int]:
    """Take ``n`` seqs of a conversation: returns (the last seq before them, the last
    timestamp). The UPDATE locks the row until COMMIT, so writers of one conversation
    on different nodes are serialised and the seq stays dense and unique."""
    row = conn.execute(
        "UPDATE conversations SET last_seq = last_seq + ? WHERE conversation_id = ?"
        " RETURNING last_seq, last_ts_us",
        (n, conversation_id),
    ).fetchone()
    if row is None:
        raise LookupError(f"conversation {conversation_id} has no row")
    return int(row[0]) - n, int(row[1])


def lock_conversation_txn(conn: Conn, conversation_id: str) -> None:
    """Take the conversation row's lock until COMMIT (PostgreSQL; SQLite's writer lock
    already covers the database). A no-op UPDATE: portable, unlike FOR UPDATE."""
    conn.execute(
        "UPDATE conversations SET last_seq = last_seq WHERE conversation_id = ?",
        (conversation_id,),
    )


def set_last_ts_txn(conn: Conn, conversation_id: str, ts_us: int) -> None:
    conn.execute(
        "UPDATE conversations SET last_ts_us = ? WHERE conversation_id = ?",
        (ts_us, conversation_id),
    )


def claim_send_request_txn(
    conn: Conn, user_id: str, request_id: str, event_id: str, now_us: int, since_us: int
) -> bytes | None:
    """Idempotency decided by the database: the (user, request_id) row is claimed for
    ``event_id`` unless a claim newer than ``since_us`` exists; then the original
    event's payload is returned (None: claimed, go on). A concurrent claim on another
    node waits on the unique key until that transaction ends (PostgreSQL), so the
    loser sees the winner's committed event."""
    claimed = conn.execute(
        "INSERT INTO send_requests (user_id, request_id, event_id, created_at_us)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, request_id) DO UPDATE SET"
        " event_id = excluded.event_id, created_at_us = excluded.created_at_us"
        " WHERE send_requests.created_at_us < ?",
        (user_id, request_id, event_id, now_us, since_us),
    ).rowcount
    if claimed:
        return None
    row = conn.execute(
        "SELECT e.payload FROM send_requests r JOIN events e ON e.event_id = r.event_id"
        " WHERE r.user_id = ? AND r.request_id = ?",
        (user_id, request_id),
    ).fetchone()
    return b"" if row is None else bytes(row[0])


def advance_epoch_txn(
    conn: Conn,
    conversation_id: str,
    epoch: int,
    group_id: bytes,
    group_info: bytes | None,
    group_info_epoch: int | None,
) -> bool:
    """One winning commit per epoch (SPEC §12.5): the epoch moves from ``epoch`` to
    ``epoch + 1`` only if it is still ``epoch`` (and the group id is unbound or the
    same); False: another commit won it."""
    return (
        conn.execute(
            "UPDATE conversations SET mls_group_id = ?, mls_epoch = ?, group_info = ?,"
            " group_info_epoch = ? WHERE conversation_id = ? AND mls_epoch = ?"
            " AND (mls_group_id IS NULL OR mls_group_id = ?)",
            (group_id, epoch + 1, group_info, group_info_epoch, conversation_id, epoch, group_id),
        ).rowcount
        == 1
    )


def member_state_txn(conn: Conn, conversation_id: str, user_id: str) -> tuple[bool, str]:
    """(currently a member, role) of ``user_id`` in the database, read under the
    conversation row's lock: a no-op UPDATE takes it first, so a concurrent membership
    change on another node has committed (and is seen: PostgreSQL's READ COMMITTED
    reads each statement's snapshot) or waits for this one."""
    lock_conversation_txn(conn, conversation_id)
    row = conn.execute(
        "SELECT role, left_seq FROM members WHERE conversation_id = ? AND user_id = ?",
        (conversation_id, user_id),
    ).fetchone()
    if row is None:
        return False, ""
    return row[1] is None, str(row[0])
