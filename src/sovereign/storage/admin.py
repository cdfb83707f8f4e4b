"""Read-only queries for the admin API's views (SPEC §10, §12.24).

Nothing here returns a payload byte: counts, ids and times only.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from sovereign.storage._util import clamp_page
from sovereign.storage.database import Conn
from sovereign.storage.keypackages import delete_user_packages_txn
from sovereign.storage.users import delete_user_txn as _delete_user_row_txn

#: MessageType.MLS_COMMIT_BROADCAST (SPEC §3); storage does not import the protocol.
MLS_COMMIT_BROADCAST = 46


class DevicePool(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    username: str
    device_id: str
    key_packages: int  # ordinary, available (last-resort excluded)
    has_last_resort: bool


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def last_commits_txn(conn: Conn, conversation_ids: Sequence[str]) -> dict[str, int]:
    """conversation id -> server timestamp (µs) of its latest stored MLS commit."""
    if not conversation_ids:
        return {}
    rows = conn.execute(
        f"SELECT conversation_id, MAX(ts_us) FROM events WHERE type = ?"
        f" AND conversation_id IN ({_marks(len(conversation_ids))}) GROUP BY conversation_id",
        (MLS_COMMIT_BROADCAST, *conversation_ids),
    ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def pending_welcomes_txn(conn: Conn, conversation_ids: Sequence[str]) -> dict[str, int]:
    """conversation id -> welcomes no device of their recipient has acknowledged yet."""
    if not conversation_ids:
        return {}
    rows = conn.execute(
        f"SELECT w.conversation_id, COUNT(*) FROM welcomes w"
        f" WHERE w.conversation_id IN ({_marks(len(conversation_ids))})"
        f" AND NOT EXISTS (SELECT 1 FROM welcome_acks a WHERE a.event_id = w.event_id)"
        f" GROUP BY w.conversation_id",
        tuple(conversation_ids),
    ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


_ACTIVE_DEVICES = (
    " FROM sessions s JOIN users u ON u.user_id = s.user_id"
    " WHERE s.kind = 'device' AND s.revoked_at_us IS NULL AND s.expires_at_us > ?"
)
_ORDINARY = (
    "(SELECT COUNT(*) FROM key_packages k WHERE k.device_id = s.device_id AND k.last_resort = 0)"
)
_LAST_RESORT = (
    "EXISTS (SELECT 1 FROM key_packages k WHERE k.device_id = s.device_id AND k.last_resort = 1)"
)


def device_pools_txn(conn: Conn, now_us: int, offset: int, limit: int) -> list[DevicePool]:
    """Active devices with their KeyPackage pools, by username then device id."""
    offset, limit = clamp_page(offset, limit)
    rows = conn.execute(
        f"SELECT s.user_id, u.username, s.device_id, {_ORDINARY}, {_LAST_RESORT}"
        f"{_ACTIVE_DEVICES} ORDER BY u.username, s.device_id LIMIT ? OFFSET ?",
        (now_us, limit, offset),
    ).fetchall()
    return [
        DevicePool(
            user_id=r[0],
            username=r[1],
            device_id=r[2],
            key_packages=int(r[3]),
            has_last_resort=bool(r[4]),
        )
        for r in rows
    ]


def count_devices_txn(conn: Conn, now_us: int) -> int:
    return int(conn.execute(f"SELECT COUNT(*){_ACTIVE_DEVICES}", (now_us,)).fetchone()[0])


def count_pools_below_txn(conn: Conn, now_us: int, minimum: int) -> int:
    """Active devices holding fewer than ``minimum`` ordinary KeyPackages."""
    return int(
        conn.execute(
            f"SELECT COUNT(*){_ACTIVE_DEVICES} AND {_ORDINARY} < ?", (now_us, minimum)
        ).fetchone()[0]
    )


def count_events_txn(conn: Conn) -> int:
    """Stored conversation events (SPEC §10 ``total_messages``), from the heads."""
    r = conn.execute("SELECT COALESCE(SUM(last_seq - purged_seq), 0) FROM conversations")
    return int(r.fetchone()[0])


def delete_user_txn(conn: Conn, user_id: str) -> bool:
    """An account and what hangs off it: KeyPackages, then the user row (credentials and
    sessions cascade). Group membership is ended before, through the event log."""
    delete_user_packages_txn(conn, user_id)
    return _delete_user_row_txn(conn, user_id)
