"""Sessions, which are devices (SPEC §4, §12.12).

The token itself is never stored, only its SHA-256 (``token_hash``); look-up is by that
digest. ``device_id`` is random and opaque, never derived from the token. Delivery
cursors and KeyPackage pools hang off the device (SPEC §5, §7).
"""

from __future__ import annotations

import builtins
import secrets
import sqlite3

import msgspec

from sovereign.clock import SYSTEM_CLOCK
from sovereign.storage._util import clamp_page
from sovereign.storage.database import Conn, Database
from sovereign.storage.engines import (
    INTEGRITY_ERRORS,
    is_foreign_key_violation,
    is_unique_violation,
)
from sovereign.storage.errors import AlreadyExists, NotFound

#: Longer user agents are cut: the column is for display, not forensics.
MAX_USER_AGENT = 512


class SessionRow(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    device_id: str
    user_id: str
    token_hash: bytes
    credential_id: bytes | None
    user_agent: str
    created_at_us: int
    expires_at_us: int
    last_seen_at_us: int
    revoked_at_us: int | None
    kind: str = "device"  # 'device' | 'admin' (SPEC §12.28)

    @property
    def revoked(self) -> bool:
        return self.revoked_at_us is not None

    def expired(self, now_us: int) -> bool:
        return self.expires_at_us <= now_us

    def active(self, now_us: int) -> bool:
        return self.revoked_at_us is None and self.expires_at_us > now_us


_COLS = (
    "session_id, device_id, user_id, token_hash, credential_id, user_agent,"
    " created_at_us, expires_at_us, last_seen_at_us, revoked_at_us, kind"
)


def new_session_id() -> str:
    """A random session id that never starts with "-": an operator passes it to
    ``sovereign session revoke``, where argparse would take "-..." for an option."""
    while True:
        sid = secrets.token_urlsafe(16)
        if sid[0] != "-":
            return sid


def _session(r: sqlite3.Row) -> SessionRow:
    return SessionRow(
        session_id=r[0],
        device_id=r[1],
        user_id=r[2],
        token_hash=r[3],
        credential_id=r[4],
        user_agent=r[5],
        created_at_us=r[6],
        expires_at_us=r[7],
        last_seen_at_us=r[8],
        revoked_at_us=r[9],
        kind=r[10],
    )


def create_session_txn(
    conn: Conn,
    user_id: str,
    token_hash: bytes,
    expires_at_us: int,
    *,
    now_us: int,
    credential_id: bytes | None = None,
    user_agent: str = "",
    kind: str = "device",
) -> SessionRow:
    """A new session = a new device (or an admin panel sign-in, ``kind='admin'``).
    Raises NotFound for an unknown user."""
    try:
        r = conn.execute(
            f"INSERT INTO sessions (session_id, device_id, user_id, token_hash, credential_id,"
            f" user_agent, created_at_us, expires_at_us, last_seen_at_us, kind)"
            f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {_COLS}",
            (
                new_session_id(),
                secrets.token_urlsafe(16),
                user_id,
                token_hash,
                credential_id,
                user_agent[:MAX_USER_AGENT],
                now_us,
                expires_at_us,
                now_us,
                kind,
            ),
        ).fetchone()
    except INTEGRITY_ERRORS as exc:
        if is_foreign_key_violation(exc):
            raise NotFound(f"user {user_id} or its credential") from exc
        if is_unique_violation(exc):  # same token hash twice: a caller bug
            raise AlreadyExists("session token") from exc
        raise
    return _session(r)


def get_session_txn(conn: Conn, session_id: str) -> SessionRow | None:
    r = conn.execute(f"SELECT {_COLS} FROM sessions WHERE session_id = ?", (session_id,))
    row = r.fetchone()
    return _session(row) if row is not None else None


def get_session_by_token_hash_txn(conn: Conn, token_hash: bytes) -> SessionRow | None:
    # An index look-up on the digest: timing reveals nothing useful about the token,
    # since finding a token from its SHA-256 is infeasible (SPEC §4).
    r = conn.execute(f"SELECT {_COLS} FROM sessions WHERE token_hash = ?", (token_hash,))
    row = r.fetchone()
    return _session(row) if row is not None else None


def extend_session_txn(
    conn: Conn, session_id: str, new_expires_at_us: int, now_us: int
) -> SessionRow | None:
    """Sliding expiry on resume (SPEC §4, §12.9); returns the updated session.

    None if it is unknown, revoked or already expired: checked in the UPDATE itself,
    so a revocation racing a resume can never be undone by it.
    """
    r = conn.execute(
        f"UPDATE sessions SET expires_at_us = ?, last_seen_at_us = ?"
        f" WHERE session_id = ? AND revoked_at_us IS NULL AND expires_at_us > ?"
        f" RETURNING {_COLS}",
        (new_expires_at_us, now_us, session_id, now_us),
    ).fetchone()
    return _session(r) if r is not None else None


def touch_session_txn(conn: Conn, session_id: str, now_us: int) -> bool:
    cur = conn.execute(
        "UPDATE sessions SET last_seen_at_us = ? WHERE session_id = ? AND revoked_at_us IS NULL",
        (now_us, session_id),
    )
    return cur.rowcount == 1


def revoke_session_txn(conn: Conn, session_id: str, now_us: int) -> bool:
    """True if this call revoked it (False: unknown or already revoked)."""
    cur = conn.execute(
        "UPDATE sessions SET revoked_at_us = ? WHERE session_id = ? AND revoked_at_us IS NULL",
        (now_us, session_id),
    )
    return cur.rowcount == 1


def revoke_user_sessions_txn(conn: Conn, user_id: str, now_us: int) -> list[str]:
    """Revoke every live session of a user; returns their ids (to close connections)."""
    rows = conn.execute(
        "UPDATE sessions SET revoked_at_us = ? WHERE user_id = ? AND revoked_at_us IS NULL"
        " RETURNING session_id",
        (now_us, user_id),
    ).fetchall()
    return sorted(r[0] for r in rows)


def _filter(user_id: str | None, active_at_us: int | None) -> tuple[str, tuple[object, ...]]:
    clauses: list[str] = []
    args: list[object] = []
    if user_id is not None:
        clauses.append("user_id = ?")
        args.append(user_id)
    if active_at_us is not None:
        clauses.append("revoked_at_us IS NULL AND expires_at_us > ?")
        args.append(active_at_us)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def list_sessions_txn(
    conn: Conn,
    user_id: str | None = None,
    offset: int = 0,
    limit: int = 100,
    *,
    active_at_us: int | None = None,
) -> list[SessionRow]:
    """Newest first. ``active_at_us``: only sessions neither revoked nor expired then."""
    offset, limit = clamp_page(offset, limit)
    where, args = _filter(user_id, active_at_us)
    rows = conn.execute(
        f"SELECT {_COLS} FROM sessions{where}"
        f" ORDER BY created_at_us DESC, session_id LIMIT ? OFFSET ?",
        (*args, limit, offset),
    ).fetchall()
    return [_session(r) for r in rows]


def count_sessions_txn(
    conn: Conn, user_id: str | None = None, *, active_at_us: int | None = None
) -> int:
    where, args = _filter(user_id, active_at_us)
    return int(conn.execute(f"SELECT COUNT(*) FROM sessions{where}", args).fetchone()[0])


class SessionStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        user_id: str,
        token_hash: bytes,
        expires_at_us: int,
        credential_id: bytes | None = None,
        user_agent: str = "",
        *,
        now: int | None = None,
        kind: str = "device",
    ) -> SessionRow:
        t = now if now is not None else SYSTEM_CLOCK.now_us()
        return await self._db.write(
            lambda c: create_session_txn(
                c,
                user_id,
                token_hash,
                expires_at_us,
                now_us=t,
                credential_id=credential_id,
                user_agent=user_agent,
                kind=kind,
            )
        )

    async def get(self, session_id: str) -> SessionRow | None:
        return await self._db.read(lambda c: get_session_txn(c, session_id))

    async def get_by_token_hash(self, token_hash: bytes) -> SessionRow | None:
        return await self._db.read(lambda c: get_session_by_token_hash_txn(c, token_hash))

    async def extend(self, session_id: str, new_expires_at_us: int, now: int) -> SessionRow | None:
        return await self._db.write(
            lambda c: extend_session_txn(c, session_id, new_expires_at_us, now)
        )

    async def touch(self, session_id: str, now: int) -> bool:
        return await self._db.write(lambda c: touch_session_txn(c, session_id, now))

    async def revoke(self, session_id: str, now: int) -> bool:
        return await self._db.write(lambda c: revoke_session_txn(c, session_id, now))

    async def revoke_all_for_user(self, user_id: str, now: int) -> builtins.list[str]:
        return await self._db.write(lambda c: revoke_user_sessions_txn(c, user_id, now))

    async def list(
        self,
        user_id: str | None = None,
        offset: int = 0,
        limit: int = 100,
        *,
        active_at_us: int | None = None,
    ) -> builtins.list[SessionRow]:
        return await self._db.read(
            lambda c: list_sessions_txn(c, user_id, offset, limit, active_at_us=active_at_us)
        )

    async def count(self, user_id: str | None = None, *, active_at_us: int | None = None) -> int:
        return await self._db.read(
            lambda c: count_sessions_txn(c, user_id, active_at_us=active_at_us)
        )
