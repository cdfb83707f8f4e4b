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

#: Page size of NEW databases (an existing file keeps its own: changing it needs a
#: VACUUM outside WAL mode, which no start-up should do unasked). Each commit writes
#: whole pages of every B-tree it touches — at everyday load one event touches about
#: five (the event, its id index, the idempotency row, two cursor rows), most in
#: different places — so smaller pages write less. Measured (relay, 200 pairs, fixed
#: 1,000 msgs/s, one run each, checkpoint every 10,000 pages): 4 KiB pages 29.0 KB
#: written per message, 2 KiB 19.5 KB, 1 KiB 14.3 KB, server CPU within the noise.
PAGE_SIZE: Final = 1024
#: WAL size that triggers the writer's automatic checkpoint. SQLite's default (1,000
#: pages) copied the same hot pages back into the database file every ~170 commits;
#: ~16 MB lets each hot page be written once per checkpoint for many more commits
#: (4 KiB pages, 1,000 msgs/s, 1,000 -> 10,000 pages: 42.0 -> 29.0 KB per message).
WAL_CHECKPOINT_BYTES: Final = 16 * 1024 * 1024


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
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # a no-op once the file has pages
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
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_BYTES // page}")

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
