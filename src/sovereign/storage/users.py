"""Accounts (SPEC §4, §10).

Usernames are unique case-insensitively, by an NFKC-casefolded key (``username_key``),
so ``Alice``/``ALICE`` and fullwidth compatibility forms of the same letters collide.
Which characters a username may contain is the auth service's policy, not storage's.
"""

from __future__ import annotations

import builtins
import sqlite3
import unicodedata

import msgspec
from ulid import ULID

from sovereign.clock import SYSTEM_CLOCK
from sovereign.storage._util import clamp_page, like_pattern, rows_in
from sovereign.storage.database import Conn, Database
from sovereign.storage.engines import INTEGRITY_ERRORS, is_unique_violation, violated_constraint
from sovereign.storage.errors import NotFound, UsernameTaken


class UserRow(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    username: str
    display_name: str
    is_admin: bool
    enabled: bool
    created_at_us: int


_COLS = "user_id, username, display_name, is_admin, enabled, created_at_us"


def _user(r: sqlite3.Row) -> UserRow:
    return UserRow(
        user_id=r[0],
        username=r[1],
        display_name=r[2],
        is_admin=bool(r[3]),
        enabled=bool(r[4]),
        created_at_us=r[5],
    )


def username_key(username: str) -> str:
    """The uniqueness key of a username: NFKC(casefold(NFKC(name)))."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", username).casefold())


def new_user_id() -> str:
    return str(ULID())


# -- transaction functions (compose several in one Database.write) ------------------


def create_user_txn(
    conn: Conn,
    username: str,
    display_name: str,
    is_admin: bool,
    *,
    now_us: int,
    user_id: str | None = None,
    enabled: bool = True,
) -> UserRow:
    uid = user_id or new_user_id()
    try:
        row = conn.execute(
            f"INSERT INTO users (user_id, username, username_key, display_name, is_admin,"
            f" enabled, created_at_us) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {_COLS}",
            (uid, username, username_key(username), display_name, is_admin, enabled, now_us),
        ).fetchone()
    except INTEGRITY_ERRORS as exc:
        # A user_id collision is a caller bug, not a taken name (PostgreSQL names the
        # primary key's constraint users_pkey).
        if is_unique_violation(exc) and violated_constraint(exc) not in (
            "users.user_id",
            "users_pkey",
        ):
            raise UsernameTaken(username) from exc
        raise
    return _user(row)


def get_user_txn(conn: Conn, user_id: str) -> UserRow | None:
    r = conn.execute(f"SELECT {_COLS} FROM users WHERE user_id = ?", (user_id,)).fetchone()
    return _user(r) if r is not None else None


def get_users_txn(conn: Conn, user_ids: list[str]) -> dict[str, UserRow]:
    """The rows of those of ``user_ids`` that exist: one statement per 500 ids, not one
    round trip per user (a 1,000-member GROUP_CREATE names 999)."""
    sql_in = f"SELECT {_COLS} FROM users WHERE user_id IN ({{marks}})"
    return {u.user_id: u for u in map(_user, rows_in(conn, sql_in, user_ids))}


def get_user_by_username_txn(conn: Conn, username: str) -> UserRow | None:
    r = conn.execute(
        f"SELECT {_COLS} FROM users WHERE username_key = ?", (username_key(username),)
    ).fetchone()
    return _user(r) if r is not None else None


def _search_clause(search: str) -> tuple[str, tuple[str, ...]]:
    if not search:
        return "", ()
    return (
        # lower() on both sides: SQLite's LIKE ignores ASCII case, PostgreSQL's does not.
        " WHERE lower(username_key) LIKE lower(?) ESCAPE '\\'"
        " OR lower(display_name) LIKE lower(?) ESCAPE '\\'",
        (like_pattern(username_key(search)), like_pattern(search)),
    )


def list_users_txn(conn: Conn, search: str = "", offset: int = 0, limit: int = 50) -> list[UserRow]:
    offset, limit = clamp_page(offset, limit)
    where, args = _search_clause(search)
    rows = conn.execute(
        f"SELECT {_COLS} FROM users{where} ORDER BY username LIMIT ? OFFSET ?",
        (*args, limit, offset),
    ).fetchall()
    return [_user(r) for r in rows]


def count_users_txn(conn: Conn, search: str = "") -> int:
    where, args = _search_clause(search)
    return int(conn.execute(f"SELECT COUNT(*) FROM users{where}", args).fetchone()[0])


def update_user_txn(
    conn: Conn,
    user_id: str,
    *,
    display_name: str | None = None,
    is_admin: bool | None = None,
    enabled: bool | None = None,
) -> UserRow:
    """Change any of the given fields; raises NotFound for an unknown user."""
    sets: list[str] = []
    args: list[object] = []
    # Column names come from this fixed list, never from the caller.
    for col, val in (("display_name", display_name), ("is_admin", is_admin), ("enabled", enabled)):
        if val is not None:
            sets.append(f"{col} = ?")
            args.append(val)
    if not sets:
        row = get_user_txn(conn, user_id)
        if row is None:
            raise NotFound(f"user {user_id}")
        return row
    r = conn.execute(
        f"UPDATE users SET {', '.join(sets)} WHERE user_id = ? RETURNING {_COLS}",
        (*args, user_id),
    ).fetchone()
    if r is None:
        raise NotFound(f"user {user_id}")
    return _user(r)


def any_admin_txn(conn: Conn) -> bool:
    """True if an enabled admin exists (else the bootstrap flow applies, SPEC §10)."""
    r = conn.execute("SELECT EXISTS (SELECT 1 FROM users WHERE is_admin = 1 AND enabled = 1)")
    return bool(r.fetchone()[0])


def count_admins_txn(conn: Conn) -> int:
    """Enabled admins; compose with delete_user_txn to keep the last admin (SPEC §10)."""
    r = conn.execute("SELECT COUNT(*) FROM users WHERE is_admin = 1 AND enabled = 1")
    return int(r.fetchone()[0])


def delete_user_txn(conn: Conn, user_id: str) -> bool:
    """Delete a user; credentials and sessions go with it (ON DELETE CASCADE)."""
    return conn.execute("DELETE FROM users WHERE user_id = ?", (user_id,)).rowcount > 0


# -- store ----------------------------------------------------------------------------


class UserStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        username: str,
        display_name: str = "",
        is_admin: bool = False,
        *,
        user_id: str | None = None,
        now: int | None = None,
    ) -> UserRow:
        """Raises UsernameTaken if the name is taken (case-insensitively)."""
        t = now if now is not None else SYSTEM_CLOCK.now_us()
        return await self._db.write(
            lambda c: create_user_txn(
                c, username, display_name, is_admin, now_us=t, user_id=user_id
            )
        )

    async def get_by_id(self, user_id: str) -> UserRow | None:
        return await self._db.read(lambda c: get_user_txn(c, user_id))

    async def get_many(self, user_ids: list[str]) -> dict[str, UserRow]:
        return await self._db.read(lambda c: get_users_txn(c, user_ids))

    async def get_by_username(self, username: str) -> UserRow | None:
        return await self._db.read(lambda c: get_user_by_username_txn(c, username))

    async def list(
        self, search: str = "", offset: int = 0, limit: int = 50
    ) -> builtins.list[UserRow]:
        """Users ordered by username; ``search`` matches username or display name."""
        return await self._db.read(lambda c: list_users_txn(c, search, offset, limit))

    async def count(self, search: str = "") -> int:
        return await self._db.read(lambda c: count_users_txn(c, search))

    async def update(
        self,
        user_id: str,
        *,
        display_name: str | None = None,
        is_admin: bool | None = None,
        enabled: bool | None = None,
    ) -> UserRow:
        return await self._db.write(
            lambda c: update_user_txn(
                c, user_id, display_name=display_name, is_admin=is_admin, enabled=enabled
            )
        )

    async def set_enabled(self, user_id: str, enabled: bool) -> UserRow:
        return await self.update(user_id, enabled=enabled)

    async def set_admin(self, user_id: str, is_admin: bool) -> UserRow:
        return await self.update(user_id, is_admin=is_admin)

    async def set_display_name(self, user_id: str, display_name: str) -> UserRow:
        return await self.update(user_id, display_name=display_name)

    async def any_admin(self) -> bool:
        return await self._db.read(any_admin_txn)

    async def count_admins(self) -> int:
        return await self._db.read(count_admins_txn)

    async def delete(self, user_id: str) -> bool:
        return await self._db.write(lambda c: delete_user_txn(c, user_id))
