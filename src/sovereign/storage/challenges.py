"""WebAuthn challenges: single use, short-lived (SPEC §4: expires in 60 s).

``consume`` is one UPDATE on the writer (``… WHERE consumed = 0 AND expires_at_us > now``),
so of any number of concurrent consumers exactly one gets the row.
"""

from __future__ import annotations

import sqlite3
from typing import Final, Literal, get_args

import msgspec

from sovereign.clock import SYSTEM_CLOCK
from sovereign.storage.database import Conn, Database
from sovereign.storage.engines import (
    INTEGRITY_ERRORS,
    is_unique_violation,
)
from sovereign.storage.errors import AlreadyExists

Purpose = Literal["register", "login", "admin_login"]
PURPOSES: Final[frozenset[str]] = frozenset(get_args(Purpose))


class ChallengeRow(msgspec.Struct, frozen=True, kw_only=True):
    challenge: bytes
    purpose: str
    user_id: str | None
    username: str | None
    display_name: str | None
    invite_code: str | None
    created_at_us: int
    expires_at_us: int


_COLS = (
    "challenge, purpose, user_id, username, display_name, invite_code, created_at_us, expires_at_us"
)


def _challenge(r: sqlite3.Row) -> ChallengeRow:
    return ChallengeRow(
        challenge=r[0],
        purpose=r[1],
        user_id=r[2],
        username=r[3],
        display_name=r[4],
        invite_code=r[5],
        created_at_us=r[6],
        expires_at_us=r[7],
    )


def put_challenge_txn(
    conn: Conn,
    challenge: bytes,
    purpose: Purpose,
    expires_at_us: int,
    *,
    now_us: int,
    user_id: str | None = None,
    username: str | None = None,
    display_name: str | None = None,
    invite_code: str | None = None,
) -> None:
    """Store a challenge with the ceremony context it must be answered in."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown challenge purpose {purpose!r}")
    try:
        conn.execute(
            "INSERT INTO challenges (challenge, purpose, user_id, username, display_name,"
            " invite_code, created_at_us, expires_at_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                challenge,
                purpose,
                user_id,
                username,
                display_name,
                invite_code,
                now_us,
                expires_at_us,
            ),
        )
    except INTEGRITY_ERRORS as exc:
        if is_unique_violation(exc):
            raise AlreadyExists("challenge") from exc
        raise


def consume_challenge_txn(
    conn: Conn, challenge: bytes, purpose: Purpose, now_us: int
) -> ChallengeRow | None:
    """Mark used and return it; None if unknown, used, expired or for another purpose
    (a wrong-purpose attempt does not use it up)."""
    r = conn.execute(
        f"UPDATE challenges SET consumed = 1"
        f" WHERE challenge = ? AND purpose = ? AND consumed = 0 AND expires_at_us > ?"
        f" RETURNING {_COLS}",
        (challenge, purpose, now_us),
    ).fetchone()
    return _challenge(r) if r is not None else None


def purge_challenges_txn(conn: Conn, now_us: int) -> int:
    """Delete used and expired challenges; returns how many."""
    cur = conn.execute("DELETE FROM challenges WHERE consumed = 1 OR expires_at_us <= ?", (now_us,))
    return cur.rowcount


class ChallengeStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def put(
        self,
        challenge: bytes,
        purpose: Purpose,
        expires_at_us: int,
        *,
        user_id: str | None = None,
        username: str | None = None,
        display_name: str | None = None,
        invite_code: str | None = None,
        now: int | None = None,
    ) -> None:
        t = now if now is not None else SYSTEM_CLOCK.now_us()
        await self._db.write(
            lambda c: put_challenge_txn(
                c,
                challenge,
                purpose,
                expires_at_us,
                now_us=t,
                user_id=user_id,
                username=username,
                display_name=display_name,
                invite_code=invite_code,
            )
        )

    async def consume(self, challenge: bytes, purpose: Purpose, now: int) -> ChallengeRow | None:
        return await self._db.write(lambda c: consume_challenge_txn(c, challenge, purpose, now))

    async def purge_expired(self, now: int) -> int:
        return await self._db.write(lambda c: purge_challenges_txn(c, now))
