"""The thin layer where SQL engines differ (Synapse's ``storage/engines``).

SQL in the stores is written once, for SQLite (≥ 3.37) and PostgreSQL alike, using only
what both accept: ``RETURNING``; ``ON CONFLICT (…) DO UPDATE`` / ``DO NOTHING``, never
``INSERT OR IGNORE`` / ``OR REPLACE``; ``COALESCE``, never ``IFNULL``; ``lower(col) LIKE
lower(?)``, because SQLite's ``LIKE`` ignores ASCII case and PostgreSQL's does not;
booleans as 0/1 integers (every engine's schema stores them so); and, inside ``DO UPDATE
SET``, the existing row's columns qualified with the table name (PostgreSQL finds a bare
``col`` ambiguous with ``excluded.col``). ``tests/unit/storage/test_portable_sql.py``
refuses SQLite-only constructs in the store modules and compiles every statement it can
find against the migrated SQLite schema.

What cannot be written once lives here, and nothing else should branch on the engine:

- connection set-up (pragmas), and how a unique or foreign-key violation is recognised;
- which migration files apply: ``NNNN_name.sql`` for every engine, ``NNNN_name.<engine>.sql``
  for one. DDL differs (``STRICT``, ``WITHOUT ROWID``, ``AUTOINCREMENT``, ``BLOB``,
  ``COLLATE NOCASE`` are SQLite's), so the shipped migrations are ``*.sqlite.sql`` and a
  PostgreSQL engine brings its own ``*.postgres.sql`` of the same numbers and names;
- SQL fragments with no common spelling, e.g. :meth:`SqliteEngine.greatest`. A store
  splices them into module-level statement constants built once at import, so no query
  is formatted per call. Why a fragment rather than the portable ``CASE WHEN a > b THEN
  a ELSE b END``: the CASE repeats each operand, so ``max(purged_seq, ?)`` would bind its
  parameter twice, and every statement using it reads worse; both engines have a native
  two-argument maximum (SQLite's scalar ``max``, PostgreSQL's ``GREATEST``). Because the
  fragments are spliced at import, :data:`ENGINE` is chosen before the store modules are
  imported; a process serving two engines at once would need a statement table per
  engine.

Parameters stay SQLite's ``?`` and the stores keep the ``sqlite3`` connection API
(``execute``, ``executemany``, ``fetchone``, ``rowcount``) for now. A PostgreSQL engine
adds a sibling class and a connection adapter that rewrites ``?`` to ``$1, $2, …`` once
per distinct statement (cached; asyncpg prepares statements anyway), passes Python
booleans as 0/1 if the driver refuses them for integer columns, and recognises asyncpg's
``UniqueViolationError`` / ``ForeignKeyViolationError`` in ``is_unique_violation`` /
``is_foreign_key_violation``. The statement text itself is never rewritten per engine
beyond that placeholder translation.
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
    def greatest(a: str, b: str) -> str:
        """SQL for the larger of two NOT NULL expressions (PostgreSQL: ``GREATEST(a, b)``).

        Only for operands that are never NULL: SQLite's ``max`` returns NULL if either
        is NULL, PostgreSQL's ``GREATEST`` ignores NULLs.
        """
        return f"max({a}, {b})"

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
