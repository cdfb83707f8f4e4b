"""A user's devices (SPEC §12.29): listing and revoking one in one transaction.

A device is a session (SPEC §4). Revoking one revokes its session and removes what
only it could use: its KeyPackage pool (nobody may add a revoked device to a group)
and its pending welcomes. Welcomes are stored once per recipient *user* (SPEC §12.15),
so a welcome that no remaining active device of the user still waits for is deleted
(with its acknowledgements); one another device still needs stays for that device.
"""

from __future__ import annotations

from sovereign.storage.database import Conn
from sovereign.storage.sessions import _COLS, SessionRow, _session


def device_session_txn(conn: Conn, device_id: str) -> SessionRow | None:
    row = conn.execute(f"SELECT {_COLS} FROM sessions WHERE device_id = ?", (device_id,)).fetchone()
    return _session(row) if row is not None else None


def revoke_device_txn(conn: Conn, user_id: str, device_id: str, now_us: int) -> str | None:
    """Revoke ``device_id`` if it is an active device of ``user_id``; returns its
    session id, or None (unknown, another user's, already revoked or expired)."""
    row = conn.execute(
        "UPDATE sessions SET revoked_at_us = ? WHERE device_id = ? AND user_id = ?"
        " AND kind = 'device' AND revoked_at_us IS NULL AND expires_at_us > ?"
        " RETURNING session_id",
        (now_us, device_id, user_id, now_us),
    ).fetchone()
    if row is None:
        return None
    conn.execute("DELETE FROM key_packages WHERE device_id = ?", (device_id,))
    # Welcomes no active device of the user still waits for (SPEC §12.12: a device
    # waits only for welcomes stored after it was created).
    conn.execute(
        "DELETE FROM welcomes WHERE user_id = ? AND NOT EXISTS ("
        " SELECT 1 FROM sessions s WHERE s.user_id = welcomes.user_id AND s.kind = 'device'"
        " AND s.revoked_at_us IS NULL AND s.expires_at_us > ?"
        " AND s.created_at_us <= welcomes.ts_us AND NOT EXISTS ("
        "  SELECT 1 FROM welcome_acks a WHERE a.device_id = s.device_id"
        "  AND a.event_id = welcomes.event_id))",
        (user_id, now_us),
    )
    conn.execute(
        "DELETE FROM welcome_acks WHERE device_id = ? OR event_id NOT IN"
        " (SELECT event_id FROM welcomes WHERE user_id = ?) AND device_id IN"
        " (SELECT device_id FROM sessions WHERE user_id = ?)",
        (device_id, user_id, user_id),
    )
    return str(row[0])
