"""SQL of cluster mode (SPEC §12.27): seq allocation in the event transaction, the
database-decided guards of ops, and the reads a node catches up with.

Cluster mode keeps ``conversations.last_seq`` / ``last_ts_us`` exact (every event
transaction moves them under the row's lock); a single node keeps them only as a floor
(its head is its newest event), so :func:`exact_heads_txn` fixes them at start-up.
"""

from __future__ import annotations

from sovereign.storage import messaging as sql
from sovereign.storage._util import rows_in
from sovereign.storage.database import Conn
from sovereign.storage.engines import SQLITE, per_engine


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
    heads = {
        str(r[0]): int(r[1])
        for r in rows_in(
            conn,
            "SELECT DISTINCT c.conversation_id, c.last_seq FROM conversations c"
            " JOIN members m ON m.conversation_id = c.conversation_id"
            " WHERE m.user_id IN ({marks})",
            users,
        )
    }
    return heads, set(heads)


def closed_txn(conn: Conn, users: list[str], sessions: list[str]) -> tuple[list[str], list[str]]:
    gone_users = [
        str(r[0])
        for r in rows_in(
            conn, "SELECT user_id FROM users WHERE user_id IN ({marks}) AND enabled = 0", users
        )
    ]
    gone_sessions = [
        str(r[0])
        for r in rows_in(
            conn,
            "SELECT session_id FROM sessions WHERE session_id IN ({marks})"
            " AND revoked_at_us IS NOT NULL",
            sessions,
        )
    ]
    return gone_users, gone_sessions


def purged_txn(conn: Conn, conversation_ids: list[str] | None) -> dict[str, int]:
    """``purged_seq`` of these conversations (None: of every conversation retention has
    touched), as another node's retention pass left it."""
    if conversation_ids is None:
        return {
            str(r[0]): int(r[1])
            for r in conn.execute(
                "SELECT conversation_id, purged_seq FROM conversations WHERE purged_seq > 0"
            )
        }
    return {
        str(r[0]): int(r[1])
        for r in rows_in(
            conn,
            "SELECT conversation_id, purged_seq FROM conversations"
            " WHERE conversation_id IN ({marks})",
            conversation_ids,
        )
    }


# -- the event transaction -----------------------------------------------------------------


#: ``lock_heads_txn``'s statement per IN-list length (PostgreSQL adds FOR UPDATE).
_LOCK_HEADS: dict[int, str] = {}
LOCK_HEADS_CHUNK = 500


def _lock_heads_sql(n: int) -> str:
    text = _LOCK_HEADS.get(n)
    if text is None:
        marks = ",".join("?" * n)
        text = _LOCK_HEADS[n] = per_engine(
            lambda eng: (
                "SELECT conversation_id, last_seq, last_ts_us FROM conversations"
                f" WHERE conversation_id IN ({marks}) ORDER BY conversation_id"
                + ("" if eng is SQLITE else " FOR UPDATE")
            )
        )
    return text


def lock_heads_txn(conn: Conn, conversation_ids: list[str]) -> dict[str, list[int]]:
    """Lock the rows of ``conversation_ids`` (sorted: one global order, so two nodes'
    batches never deadlock) until COMMIT and return each one's [last_seq, last_ts_us]:
    one round trip per 500 conversations, however many ops the batch holds. On
    PostgreSQL ``FOR UPDATE`` locks the rows in ``ORDER BY`` order; SQLite's writer
    lock already covers the database. A missing row is simply absent."""
    heads: dict[str, list[int]] = {}
    for i in range(0, len(conversation_ids), LOCK_HEADS_CHUNK):
        chunk = conversation_ids[i : i + LOCK_HEADS_CHUNK]
        for r in conn.execute(_lock_heads_sql(len(chunk)), chunk):
            heads[str(r[0])] = [int(r[1]), int(r[2])]
    return heads


def set_heads_txn(conn: Conn, heads: list[tuple[int, int, str]]) -> None:
    """(last_seq, last_ts_us, conversation_id) of rows locked by ``lock_heads_txn``: one
    pipelined round trip."""
    conn.executemany(
        "UPDATE conversations SET last_seq = ?, last_ts_us = ? WHERE conversation_id = ?",
        heads,
    )


def lock_conversation_txn(conn: Conn, conversation_id: str) -> None:
    """Take the conversation row's lock until COMMIT (PostgreSQL; SQLite's writer lock
    already covers the database). A no-op UPDATE: portable, unlike FOR UPDATE."""
    conn.execute(
        "UPDATE conversations SET last_seq = last_seq WHERE conversation_id = ?",
        (conversation_id,),
    )


def claim_send_request_txn(
    conn: Conn, user_id: str, request_id: str, event_id: str, now_us: int, since_us: int
) -> bytes | None:
    """Idempotency decided by the database: the (user, request_id) row is claimed for
    ``event_id`` unless a claim newer than ``since_us`` exists; then the original
    event's payload is returned (None: claimed, go on). A concurrent claim on another
    node waits on the unique key until that transaction ends (PostgreSQL), so the
    loser sees the winner's committed event."""
    claimed = conn.execute(_CLAIM, (user_id, request_id, event_id, now_us, since_us)).rowcount
    if claimed:
        return None
    row = conn.execute(
        "SELECT e.payload FROM send_requests r JOIN events e ON e.event_id = r.event_id"
        " WHERE r.user_id = ? AND r.request_id = ?",
        (user_id, request_id),
    ).fetchone()
    return b"" if row is None else bytes(row[0])


# A claim's row is in generation 0. PostgreSQL (cluster mode's engine) keys the table by
# (user_id, request_id); SQLite, where the tests also run two nodes, by generation
# first (migration 0008), so with every claim in one generation the key is unique
# there too.
_CLAIM = per_engine(
    lambda e: (
        "INSERT INTO send_requests (gen, user_id, request_id, event_id, created_at_us)"
        f" VALUES (0, ?, ?, ?, ?) ON CONFLICT ({e.send_request_key()}) DO UPDATE SET"
        " event_id = excluded.event_id, created_at_us = excluded.created_at_us"
        " WHERE send_requests.created_at_us < ?"
    )
)


class SendClaim:
    """An idempotent MESSAGE_SEND's guard (``Op.guard``): called alone it is
    :func:`claim_send_request_txn`; the event log claims every SendClaim of a batch in
    one statement instead (:func:`claim_send_requests_txn`)."""

    __slots__ = ("event_id", "now_us", "request_id", "since_us", "user_id")

    def __init__(
        self, user_id: str, request_id: str, event_id: str, now_us: int, since_us: int
    ) -> None:
        self.user_id = user_id
        self.request_id = request_id
        self.event_id = event_id
        self.now_us = now_us
        self.since_us = since_us

    def __call__(self, conn: Conn) -> bytes | None:
        return claim_send_request_txn(
            conn, self.user_id, self.request_id, self.event_id, self.now_us, self.since_us
        )


_CLAIMS: dict[int, str] = {}


def _claims_sql(n: int) -> str:
    text = _CLAIMS.get(n)
    if text is None:
        values = ",".join(["(?, ?, ?, CAST(? AS BIGINT))"] * n)
        # Rows go in key order (one global lock order for the unique keys); WHERE 1 = 1
        # keeps SQLite's parser from reading ON CONFLICT as a join's ON.
        text = _CLAIMS[n] = per_engine(
            lambda e: (
                "INSERT INTO send_requests (gen, user_id, request_id, event_id, created_at_us)"
                f" SELECT 0, column1, column2, column3, column4 FROM (VALUES {values}) AS v"
                " WHERE 1 = 1 ORDER BY column1, column2"
                f" ON CONFLICT ({e.send_request_key()}) DO UPDATE SET"
                " event_id = excluded.event_id, created_at_us = excluded.created_at_us"
                " WHERE send_requests.created_at_us < excluded.created_at_us - ?"
                " RETURNING user_id, request_id"
            )
        )
    return text


def batchable_claims(claims: list[SendClaim]) -> bool:
    """Whether :func:`claim_send_requests_txn` may take ``claims`` in one statement:
    distinct keys (one statement may not update a row twice) and one window."""
    if len(claims) < 2:
        return False
    window = claims[0].now_us - claims[0].since_us
    keys = set()
    for c in claims:
        if c.now_us - c.since_us != window:
            return False
        keys.add((c.user_id, c.request_id))
    return len(keys) == len(claims)


def claim_send_requests_txn(conn: Conn, claims: list[SendClaim]) -> list[bytes | None]:
    """:func:`claim_send_request_txn` for many claims (see :func:`batchable_claims`) in
    one statement per 500: each claim's verdict, in order. A claim newer than the
    window holds: that request's original payload is read (one statement each, rare)."""
    window = claims[0].now_us - claims[0].since_us
    claimed: set[tuple[str, str]] = set()
    ordered = sorted(claims, key=lambda c: (c.user_id, c.request_id))
    for i in range(0, len(ordered), LOCK_HEADS_CHUNK):
        chunk = ordered[i : i + LOCK_HEADS_CHUNK]
        params: list[object] = []
        for c in chunk:
            params += (c.user_id, c.request_id, c.event_id, c.now_us)
        params.append(window)
        for r in conn.execute(_claims_sql(len(chunk)), params):
            claimed.add((str(r[0]), str(r[1])))
    out: list[bytes | None] = []
    for c in claims:
        if (c.user_id, c.request_id) in claimed:
            out.append(None)
            continue
        row = conn.execute(
            "SELECT e.payload FROM send_requests r JOIN events e ON e.event_id = r.event_id"
            " WHERE r.user_id = ? AND r.request_id = ?",
            (c.user_id, c.request_id),
        ).fetchone()
        out.append(b"" if row is None else bytes(row[0]))
    return out


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
