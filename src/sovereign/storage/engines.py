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
  builds such a statement once at import with :func:`per_engine`, which returns
  SQLite's text (the stores' module constants stay plain strings: SQLite's hot path
  pays nothing) and records every other engine's text under it; the PostgreSQL
  connection adapter looks its variant up once per distinct statement, when it
  prepares it. So one process can serve both engines (the tests run both in one
  pytest), and nothing formats a query per call. Why a fragment rather than the
  portable ``CASE WHEN a > b THEN a ELSE b END``: the CASE repeats each operand, so
  ``max(purged_seq, ?)`` would bind its parameter twice, and every statement using it
  reads worse; both engines have a native two-argument maximum (SQLite's scalar
  ``max``, PostgreSQL's ``GREATEST``).

Parameters stay SQLite's ``?`` and the stores keep the ``sqlite3`` connection API
(``execute``, ``executemany``, ``fetchone``, ``rowcount``). The PostgreSQL engine's
connection adapter (``storage/postgres.py``) rewrites ``?`` to ``$1, $2, …`` once per
distinct statement (cached with the prepared statement) and raises asyncpg's errors,
which :func:`is_unique_violation` / :func:`is_foreign_key_violation` recognise like
SQLite's (a store catches :data:`INTEGRITY_ERRORS`). The statement text itself is never
rewritten per engine beyond that placeholder translation.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Final, Protocol

import asyncpg

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
        # The writer's page cache: 4 MiB (the default is 2). Not more: every commit that
        # split a B-tree page walks SQLite's whole page-cache hash table (balance_nonroot
        # renumbers pages through a temporary page number past the pending byte, and the
        # commit then truncates the cache above the database's size). With 16 MiB that
        # walk was ~6% of the server's CPU at 1,000 msgs/s (perf), and the writer took
        # 10% more CPU per message than with 4 MiB, on a fresh and on a grown database
        # alike (docs/performance.md).
        conn.execute("PRAGMA cache_size = -4096")
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
    def skip_locked() -> str:
        """Appended to a ``SELECT … FOR UPDATE`` sub-select that picks a row to consume
        (PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so concurrent transactions from other
        processes never pick the same row). SQLite has one writer: nothing to skip."""
        return ""

    @staticmethod
    def send_request_key() -> str:
        """The primary key of ``send_requests``: generation first (migration 0008), so
        the keys stored together share leaves whatever their request_ids."""
        return "gen, user_id, request_id"

    @staticmethod
    def send_request_gens() -> tuple[str, str]:
        """(a ``WITH`` prefix, a ``FROM`` source) that give the rows of ``send_requests``
        as ``r`` such that ``r.user_id = ? AND r.request_id = ?`` seeks once per
        generation: the generations are enumerated one seek each (``min(gen) > g``),
        and ``CROSS JOIN`` keeps them the outer loop."""
        return (
            "WITH RECURSIVE gens(gen) AS (SELECT min(gen) FROM send_requests UNION ALL"
            " SELECT (SELECT min(gen) FROM send_requests WHERE gen > gens.gen) FROM gens"
            " WHERE gens.gen IS NOT NULL) ",
            "gens CROSS JOIN send_requests r ON r.gen = gens.gen",
        )

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


class PostgresEngine:
    name: Final = "postgres"
    # ON CONFLICT, RETURNING, SKIP LOCKED: 9.5; we test on 15.
    min_version: Final = (12, 0)

    @staticmethod
    def greatest(a: str, b: str) -> str:
        return f"GREATEST({a}, {b})"

    @staticmethod
    def skip_locked() -> str:
        return " FOR UPDATE SKIP LOCKED"

    @staticmethod
    def send_request_key() -> str:
        """(user_id, request_id) stays unique here: cluster mode's claim needs it
        (0008_send_request_gens.postgres.sql)."""
        return "user_id, request_id"

    @staticmethod
    def send_request_gens() -> tuple[str, str]:
        return "", "send_requests r"


class Engine(Protocol):
    @property
    def name(self) -> str: ...

    def greatest(self, a: str, b: str) -> str: ...

    def skip_locked(self) -> str: ...

    def send_request_key(self) -> str: ...

    def send_request_gens(self) -> tuple[str, str]: ...


SQLITE: Final = SqliteEngine()
POSTGRES: Final = PostgresEngine()
#: Kept for callers that only ever meant SQLite (its version check, its pragmas).
ENGINE: Final = SQLITE

#: What a store catches around an INSERT that may hit a constraint, on any engine.
INTEGRITY_ERRORS: Final = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)

#: SQLite's text of a statement -> {engine name: that engine's text}, for statements
#: whose text differs per engine (see :func:`per_engine`).
_VARIANTS: dict[str, dict[str, str]] = {}


def per_engine(build: Callable[[Engine], str]) -> str:
    """Build a statement for every engine once (at import); returns SQLite's text.

    Other engines' texts are recorded under SQLite's and found by :func:`variant`
    when that engine's adapter first prepares the statement."""
    text = build(SQLITE)
    for eng in (POSTGRES,):
        other = build(eng)
        if other != text:
            _VARIANTS.setdefault(text, {})[eng.name] = other
    return text


def variant(sql: str, engine: str) -> str:
    """``engine``'s text of a statement the stores wrote (SQLite's text)."""
    v = _VARIANTS.get(sql)
    return sql if v is None else v.get(engine, sql)


def is_unique_violation(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.UniqueViolationError) or SqliteEngine.is_unique_violation(exc)


def is_foreign_key_violation(exc: BaseException) -> bool:
    return isinstance(
        exc, asyncpg.ForeignKeyViolationError
    ) or SqliteEngine.is_foreign_key_violation(exc)


def violated_constraint(exc: BaseException) -> str:
    """Which constraint, as ``table.column`` (SQLite) or the constraint name
    (PostgreSQL: ``users_pkey``, ``users_username_key_key``); "" if unknown."""
    name = getattr(exc, "constraint_name", None)
    if isinstance(name, str):
        return name
    msg = str(exc)
    return msg.split(":", 1)[1].strip() if ":" in msg else ""
