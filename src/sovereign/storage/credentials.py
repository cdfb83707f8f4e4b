"""WebAuthn credentials (passkeys) of each user (SPEC §4)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import msgspec

from sovereign.clock import SYSTEM_CLOCK
from sovereign.storage.database import Conn, Database
from sovereign.storage.engines import (
    INTEGRITY_ERRORS,
    is_foreign_key_violation,
    is_unique_violation,
)
from sovereign.storage.errors import CredentialExists, NotFound


class CredentialRow(msgspec.Struct, frozen=True, kw_only=True):
    credential_id: bytes
    user_id: str
    public_key: bytes
    sign_count: int
    transports: tuple[str, ...]
    aaguid: str
    created_at_us: int
    last_used_at_us: int | None


_COLS = (
    "credential_id, user_id, public_key, sign_count, transports, aaguid,"
    " created_at_us, last_used_at_us"
)
_decode_transports = msgspec.json.Decoder(tuple[str, ...]).decode


def _credential(r: sqlite3.Row) -> CredentialRow:
    return CredentialRow(
        credential_id=r[0],
        user_id=r[1],
        public_key=r[2],
        sign_count=r[3],
        transports=_decode_transports(r[4]),
        aaguid=r[5],
        created_at_us=r[6],
        last_used_at_us=r[7],
    )


def add_credential_txn(
    conn: Conn,
    user_id: str,
    credential_id: bytes,
    public_key: bytes,
    sign_count: int,
    transports: Sequence[str],
    aaguid: str,
    *,
    now_us: int,
) -> CredentialRow:
    """Raises CredentialExists for a known credential id, NotFound for an unknown user."""
    try:
        r = conn.execute(
            f"INSERT INTO credentials (credential_id, user_id, public_key, sign_count,"
            f" transports, aaguid, created_at_us) VALUES (?, ?, ?, ?, ?, ?, ?)"
            f" RETURNING {_COLS}",
            (
                credential_id,
                user_id,
                public_key,
                sign_count,
                msgspec.json.encode(list(transports)).decode(),
                aaguid,
                now_us,
            ),
        ).fetchone()
    except INTEGRITY_ERRORS as exc:
        if is_unique_violation(exc):
            raise CredentialExists(credential_id.hex()) from exc
        if is_foreign_key_violation(exc):
            raise NotFound(f"user {user_id}") from exc
        raise
    return _credential(r)


def get_credential_txn(conn: Conn, credential_id: bytes) -> CredentialRow | None:
    r = conn.execute(
        f"SELECT {_COLS} FROM credentials WHERE credential_id = ?", (credential_id,)
    ).fetchone()
    return _credential(r) if r is not None else None


def list_credentials_txn(conn: Conn, user_id: str) -> list[CredentialRow]:
    rows = conn.execute(
        f"SELECT {_COLS} FROM credentials WHERE user_id = ? ORDER BY created_at_us, credential_id",
        (user_id,),
    ).fetchall()
    return [_credential(r) for r in rows]


def update_sign_count_txn(
    conn: Conn, credential_id: bytes, new_count: int, used_at_us: int
) -> bool:
    """Compare-and-set of the signature counter; False (nothing written) on regression.

    WebAuthn §6.1.1 / §7.2 step 21: the new count must be greater than the stored one,
    unless both are 0 (an authenticator without a counter). Checked in the UPDATE
    itself, so two racing assertions with the same count cannot both pass.
    """
    cur = conn.execute(
        "UPDATE credentials SET sign_count = ?, last_used_at_us = ?"
        " WHERE credential_id = ? AND (sign_count < ? OR (sign_count = 0 AND ? = 0))",
        (new_count, used_at_us, credential_id, new_count, new_count),
    )
    return cur.rowcount == 1


def delete_credential_txn(conn: Conn, credential_id: bytes) -> bool:
    return (
        conn.execute("DELETE FROM credentials WHERE credential_id = ?", (credential_id,)).rowcount
        > 0
    )


def delete_credentials_for_user_txn(conn: Conn, user_id: str) -> int:
    return conn.execute("DELETE FROM credentials WHERE user_id = ?", (user_id,)).rowcount


class CredentialStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(
        self,
        user_id: str,
        credential_id: bytes,
        public_key: bytes,
        sign_count: int,
        transports: Sequence[str],
        aaguid: str,
        *,
        now: int | None = None,
    ) -> CredentialRow:
        t = now if now is not None else SYSTEM_CLOCK.now_us()
        return await self._db.write(
            lambda c: add_credential_txn(
                c, user_id, credential_id, public_key, sign_count, transports, aaguid, now_us=t
            )
        )

    async def get(self, credential_id: bytes) -> CredentialRow | None:
        return await self._db.read(lambda c: get_credential_txn(c, credential_id))

    async def list_for_user(self, user_id: str) -> list[CredentialRow]:
        return await self._db.read(lambda c: list_credentials_txn(c, user_id))

    async def update_sign_count(self, credential_id: bytes, new_count: int, used_at: int) -> bool:
        """False if the count would not move forward (possible cloned authenticator)."""
        return await self._db.write(
            lambda c: update_sign_count_txn(c, credential_id, new_count, used_at)
        )

    async def delete(self, credential_id: bytes) -> bool:
        return await self._db.write(lambda c: delete_credential_txn(c, credential_id))

    async def delete_for_user(self, user_id: str) -> int:
        return await self._db.write(lambda c: delete_credentials_for_user_txn(c, user_id))
