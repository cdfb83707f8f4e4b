"""Storage: all SQL lives here (Synapse-style layering, SPEC §11).

``Database`` is one group-committing writer thread and read-only readers, on SQLite
(``SqliteDatabase``, the default) or PostgreSQL (``storage.postgres.PostgresDatabase``);
:func:`open_storage` picks the engine.
Each store owns the SQL of one table family. Every write also exists as a ``*_txn``
function taking a connection, so a service can compose several writes into ONE
``Database.write`` call (one transaction, all or nothing), e.g.::

    def register(conn):
        user = create_user_txn(conn, name, display, False, now_us=t)
        if not consume_invite_txn(conn, code_hash, user.user_id, t):
            raise InviteInvalid()  # rolls back the user too
        return user

    user = await storage.db.write(register)
"""

from __future__ import annotations

from pathlib import Path

from sovereign.storage.challenges import ChallengeRow, ChallengeStore, Purpose
from sovereign.storage.credentials import CredentialRow, CredentialStore
from sovereign.storage.database import Conn, Database, DatabaseStats, SqliteDatabase
from sovereign.storage.errors import (
    AlreadyExists,
    CredentialExists,
    DatabaseClosed,
    DatabaseError,
    InviteUnusable,
    MigrationError,
    NotFound,
    StorageError,
    UsernameTaken,
)
from sovereign.storage.invites import InviteRow, InviteStore
from sovereign.storage.registration import NewCredential, register_user_txn
from sovereign.storage.sessions import SessionRow, SessionStore
from sovereign.storage.settings import SettingsStore
from sovereign.storage.users import UserRow, UserStore

__all__ = [
    "AlreadyExists",
    "ChallengeRow",
    "ChallengeStore",
    "Conn",
    "CredentialExists",
    "CredentialRow",
    "CredentialStore",
    "Database",
    "DatabaseClosed",
    "DatabaseError",
    "DatabaseStats",
    "InviteRow",
    "InviteStore",
    "InviteUnusable",
    "MigrationError",
    "NewCredential",
    "NotFound",
    "Purpose",
    "SessionRow",
    "SessionStore",
    "SettingsStore",
    "SqliteDatabase",
    "Storage",
    "StorageError",
    "UserRow",
    "UserStore",
    "UsernameTaken",
    "open_storage",
]


class Storage:
    """Every store over one Database (the composition root holds one of these)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.users = UserStore(db)
        self.credentials = CredentialStore(db)
        self.sessions = SessionStore(db)
        self.challenges = ChallengeStore(db)
        self.invites = InviteStore(db)
        self.settings = SettingsStore(db)

    async def register_user(
        self,
        *,
        user_id: str,
        username: str,
        display_name: str,
        credential: NewCredential,
        invite_hash: bytes | None,
        token_hash: bytes,
        session_expires_at_us: int,
        now_us: int,
        user_agent: str = "",
    ) -> tuple[UserRow, SessionRow, bool]:
        """User + passkey + invite use + first session in ONE transaction; returns
        (user, session, used_bootstrap). See ``registration.register_user_txn``."""
        return await self.db.write(
            lambda c: register_user_txn(
                c,
                user_id=user_id,
                username=username,
                display_name=display_name,
                credential=credential,
                invite_hash=invite_hash,
                token_hash=token_hash,
                session_expires_at_us=session_expires_at_us,
                now_us=now_us,
                user_agent=user_agent,
            )
        )

    async def close(self) -> None:
        await self.db.close()

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


#: How long cursor writes wait for an event commit to ride on (Database ``lazy_ms``).
#: Measured at 1,000 msgs/s (200 pairs): acks arrive between messages, so 2 ms folds
#: nearly every cursor write into the next event transaction; an ack's answer waits at
#: most this long, event deliveries never.
CURSOR_LAZY_MS = 2.0
#: How often the checkpointer thread copies the WAL back into the database file
#: (Database ``checkpoint_s``): off the writer's COMMIT path, so a checkpoint never
#: holds up a commit; ~2 s of writes lets hot pages be copied once per interval.
CHECKPOINT_S = 2.0
#: An event batch commits on the event loop, not the writer thread, while the writer
#: thread is idle and the last commit took less than this (Database ``inline_ms``).
#: Measured (docs/performance.md, twelfth session): the hand-off to the thread and
#: back cost more CPU at everyday load than the commit; a fast disk's durable commit
#: takes 0.3-0.7 ms here. A slower disk (an SD card) keeps every commit on the thread.
INLINE_COMMIT_MS = 2.0


async def open_storage(
    path: str | Path,
    *,
    postgres_dsn: str = "",
    max_batch: int = 512,
    readers: int = 2,
    busy_timeout_ms: int = 5000,
    lazy_ms: float = CURSOR_LAZY_MS,
    checkpoint_s: float = CHECKPOINT_S,
    coalesce_wal: bool = True,
    inline_ms: float = INLINE_COMMIT_MS,
) -> Storage:
    """Open (creating and migrating as needed) the database: PostgreSQL at
    ``postgres_dsn`` if one is given, else the SQLite database at ``path``."""
    if postgres_dsn:
        from sovereign.storage.postgres import PostgresDatabase

        pg = await PostgresDatabase.connect(
            postgres_dsn, max_batch=max_batch, readers=readers, lazy_ms=lazy_ms
        )
        return Storage(pg)
    db = await SqliteDatabase.open(
        path,
        max_batch=max_batch,
        readers=readers,
        busy_timeout_ms=busy_timeout_ms,
        lazy_ms=lazy_ms,
        checkpoint_s=checkpoint_s,
        coalesce_wal=coalesce_wal,
        inline_ms=inline_ms,
    )
    return Storage(db)
