"""Invite codes and the first-admin bootstrap code (SPEC §4, §10, §12.19).

Only the SHA-256 of a code is stored (``code_hash``): a database leak reveals no usable
code. ``consume`` is one conditional UPDATE on the writer, so a code is used once even
under concurrent registrations; compose ``consume_invite_txn`` with
``create_user_txn`` in one write so a failed registration does not burn the code.
"""

from __future__ import annotations

import builtins
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


class InviteRow(msgspec.Struct, frozen=True, kw_only=True):
    code_hash: bytes
    created_by: str | None
    created_at_us: int
    expires_at_us: int | None
    used_by: str | None
    used_at_us: int | None
    is_bootstrap: bool

    @property
    def used(self) -> bool:
        return self.used_at_us is not None

    def usable(self, now_us: int) -> bool:
        return self.used_at_us is None and (
            self.expires_at_us is None or self.expires_at_us > now_us
        )


_COLS = "code_hash, created_by, created_at_us, expires_at_us, used_by, used_at_us, is_bootstrap"


def _invite(r: sqlite3.Row) -> InviteRow:
    return InviteRow(
        code_hash=r[0],
        created_by=r[1],
        created_at_us=r[2],
        expires_at_us=r[3],
        used_by=r[4],
        used_at_us=r[5],
        is_bootstrap=bool(r[6]),
    )


def create_invite_txn(
    conn: Conn,
    code_hash: bytes,
    created_by: str | None,
    expires_at_us: int | None,
    *,
    now_us: int,
    is_bootstrap: bool = False,
) -> InviteRow:
    try:
        r = conn.execute(
            f"INSERT INTO invites (code_hash, created_by, created_at_us, expires_at_us,"
            f" is_bootstrap) VALUES (?, ?, ?, ?, ?) RETURNING {_COLS}",
            (code_hash, created_by, now_us, expires_at_us, is_bootstrap),
        ).fetchone()
    except INTEGRITY_ERRORS as exc:
        if is_unique_violation(exc):
            raise AlreadyExists("invite") from exc
        if is_foreign_key_violation(exc):
            raise NotFound(f"user {created_by}") from exc
        raise
    return _invite(r)


def get_invite_txn(conn: Conn, code_hash: bytes) -> InviteRow | None:
    r = conn.execute(f"SELECT {_COLS} FROM invites WHERE code_hash = ?", (code_hash,)).fetchone()
    return _invite(r) if r is not None else None


def consume_invite_txn(
    conn: Conn, code_hash: bytes, user_id: str, now_us: int, *, bootstrap_only: bool = False
) -> bool:
    """Use the code for ``user_id`` (who must exist); False if unknown, used or expired
    (or not the bootstrap code when ``bootstrap_only``)."""
    sql = (
        "UPDATE invites SET used_by = ?, used_at_us = ?"
        " WHERE code_hash = ? AND used_at_us IS NULL"
        " AND (expires_at_us IS NULL OR expires_at_us > ?)"
    )
    if bootstrap_only:
        sql += " AND is_bootstrap = 1"
    try:
        cur = conn.execute(sql, (user_id, now_us, code_hash, now_us))
    except INTEGRITY_ERRORS as exc:
        if is_foreign_key_violation(exc):
            raise NotFound(f"user {user_id}") from exc
        raise
    return cur.rowcount == 1


def list_invites_txn(
    conn: Conn, offset: int = 0, limit: int = 100, *, include_used: bool = True
) -> list[InviteRow]:
    """Newest first."""
    offset, limit = clamp_page(offset, limit)
    where = "" if include_used else " WHERE used_at_us IS NULL"
    rows = conn.execute(
        f"SELECT {_COLS} FROM invites{where} ORDER BY created_at_us DESC, code_hash"
        f" LIMIT ? OFFSET ?",
        (limit, offset),
    ).fetchall()
    return [_invite(r) for r in rows]


def count_invites_txn(conn: Conn, *, include_used: bool = True) -> int:
    where = "" if include_used else " WHERE used_at_us IS NULL"
    return int(conn.execute(f"SELECT COUNT(*) FROM invites{where}").fetchone()[0])


def delete_invite_txn(conn: Conn, code_hash: bytes) -> bool:
    return conn.execute("DELETE FROM invites WHERE code_hash = ?", (code_hash,)).rowcount > 0


def has_unused_bootstrap_txn(conn: Conn, now_us: int) -> bool:
    r = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM invites WHERE is_bootstrap = 1 AND used_at_us IS NULL"
        " AND (expires_at_us IS NULL OR expires_at_us > ?))",
        (now_us,),
    ).fetchone()
    return bool(r[0])


def delete_unused_bootstrap_txn(conn: Conn) -> int:
    """Forget unused bootstrap codes, e.g. before issuing a fresh one at start-up (only
    the hash is kept, so an old code cannot be printed again)."""
    cur = conn.execute("DELETE FROM invites WHERE is_bootstrap = 1 AND used_at_us IS NULL")
    return cur.rowcount


def replace_bootstrap_txn(conn: Conn, code_hash: bytes, now_us: int) -> InviteRow:
    """Issue a fresh bootstrap code, dropping any unused one (SPEC §10 first admin)."""
    delete_unused_bootstrap_txn(conn)
    return create_invite_txn(conn, code_hash, None, None, now_us=now_us, is_bootstrap=True)


class InviteStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        code_hash: bytes,
        created_by: str | None,
        expires_at_us: int | None,
        is_bootstrap: bool = False,
        *,
        now: int | None = None,
    ) -> InviteRow:
        t = now if now is not None else SYSTEM_CLOCK.now_us()
        return await self._db.write(
            lambda c: create_invite_txn(
                c, code_hash, created_by, expires_at_us, now_us=t, is_bootstrap=is_bootstrap
            )
        )

    async def get(self, code_hash: bytes) -> InviteRow | None:
        return await self._db.read(lambda c: get_invite_txn(c, code_hash))

    async def consume(
        self, code_hash: bytes, user_id: str, now: int, *, bootstrap_only: bool = False
    ) -> bool:
        return await self._db.write(
            lambda c: consume_invite_txn(c, code_hash, user_id, now, bootstrap_only=bootstrap_only)
        )

    async def list(
        self, offset: int = 0, limit: int = 100, *, include_used: bool = True
    ) -> builtins.list[InviteRow]:
        return await self._db.read(
            lambda c: list_invites_txn(c, offset, limit, include_used=include_used)
        )

    async def count(self, *, include_used: bool = True) -> int:
        return await self._db.read(lambda c: count_invites_txn(c, include_used=include_used))

    async def delete(self, code_hash: bytes) -> bool:
        return await self._db.write(lambda c: delete_invite_txn(c, code_hash))

    async def has_unused_bootstrap(self, now: int | None = None) -> bool:
        t = now if now is not None else SYSTEM_CLOCK.now_us()
        return await self._db.read(lambda c: has_unused_bootstrap_txn(c, t))

    async def delete_unused_bootstrap(self) -> int:
        return await self._db.write(delete_unused_bootstrap_txn)

    async def replace_bootstrap(self, code_hash: bytes, now: int | None = None) -> InviteRow:
        """One transaction: forget unused bootstrap codes, store the new one's hash."""
        t = now if now is not None else SYSTEM_CLOCK.now_us()
        return await self._db.write(lambda c: replace_bootstrap_txn(c, code_hash, t))
