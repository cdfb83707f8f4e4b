"""The thin layer where SQL engines differ (Synapse's ``storage/engines``).

SQL in the stores is written once, with ``?`` parameters, ``RETURNING`` and
``ON CONFLICT … DO UPDATE`` (both SQLite ≥ 3.35 and PostgreSQL). What cannot be written
once lives here: connection set-up, how a unique violation is recognised, and which
migration files apply (``NNNN_name.sql`` for every engine, ``NNNN_name.<engine>.sql``
for one). A PostgreSQL engine adds a sibling class; nothing else should branch on the
engine.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from sovereign.storage.errors import StorageError


class SqliteEngine:
    name: Final = "sqlite"
    # STRICT tables need 3.37; RETURNING needs 3.35.
    min_version: Final = (3, 37, 0)

    def check_version(self) -> None:
        if sqlite3.sqlite_version_info < self.min_version:
            want = ".".join(map(str, self.min_version))
            raise StorageError(f"SQLite {sqlite3.sqlite_version} is too old: need {want}+")

    def configure_writer(self, conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # WAL: readers never block the writer nor each other.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"cannot enable WAL journal mode (got {mode!r})")
        # SPEC §11: FULL so an acknowledged event survives power loss (SPEC §5).
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        # Statement journals and sorter spills stay in memory: under load the writer
        # otherwise created and unlinked /var/tmp/etilqs_* files several times a second.
        conn.execute("PRAGMA temp_store = MEMORY")
        # A larger page cache for the writer (default 2 MB): hot index pages stay put.
        conn.execute("PRAGMA cache_size = -16384")

    def configure_reader(self, conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA temp_store = MEMORY")

    @staticmethod
    def is_unique_violation(exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and getattr(exc, "sqlite_errorname", "") in (
            "SQLITE_CONSTRAINT_UNIQUE",
            "SQLITE_CONSTRAINT_PRIMARYKEY",
        )

    @staticmethod
    def is_foreign_key_violation(exc: BaseException) -> bool:
        return (
            isinstance(exc, sqlite3.IntegrityError)
            and getattr(exc, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_FOREIGNKEY"
        )


#: The engine the ``_txn`` functions consult (they receive only a connection).
ENGINE: Final = SqliteEngine()
