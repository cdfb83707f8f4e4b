"""Copy a SQLite data directory into PostgreSQL (``sovereign migrate-to-postgres``).

Both databases are first brought to this version's schema (the same migrations the
server applies when it opens them). The target must be empty. Every table is copied
in dependency order (parents before the rows that reference them) inside ONE
PostgreSQL transaction, with binary COPY in chunks, then each table's row count is
compared with the source's before COMMIT: a mismatch rolls everything back, so the
target is either a complete copy or untouched.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from sovereign.storage.database import SqliteDatabase
from sovereign.storage.errors import StorageError
from sovereign.storage.postgres import PostgresDatabase

#: Every table, parents first. A table missing here fails the copy (and a unit test):
#: new tables must be placed deliberately.
COPY_ORDER: tuple[str, ...] = (
    "users",
    "credentials",
    "sessions",
    "challenges",
    "invites",
    "settings",
    "conversations",
    "members",
    "events",
    "welcomes",
    "welcome_acks",
    "cursors",
    "read_markers",
    "send_requests",
    "key_packages",
)
#: Tables read through a query rather than whole. SQLite may hold a request_id twice,
#: in two generations, once it was used again after the 24 h window (migration 0008);
#: PostgreSQL keeps one row per (user_id, request_id), and the newer is the one that
#: counts (SQLite takes a bare column's value from the row that ``max`` picked).
#: The keys not folded into send_requests yet are in their event rows, after the fold's
#: mark (migration 0009): PostgreSQL, which does not fold, gets them as rows.
_SOURCES = {
    "send_requests": "(SELECT gen, user_id, request_id, event_id, max(created_at_us)"
    " AS created_at_us FROM (SELECT gen, user_id, request_id, event_id, created_at_us"
    " FROM send_requests UNION ALL SELECT 0, sender_id, request_id, event_id, ts_us"
    " FROM events WHERE request_id IS NOT NULL AND event_id > coalesce((SELECT event_id"
    " FROM send_request_folds WHERE id = 1), '')) GROUP BY user_id, request_id)",
}
#: Tables with nothing to copy: the fold's mark means nothing where every key is a row.
NOT_COPIED = frozenset({"send_request_folds"})
#: Rows per COPY round trip.
CHUNK_ROWS = 5000
#: Tables with an identity column whose sequence must move past the copied ids.
_IDENTITY = {"key_packages": "kp_id"}


class MigrateError(StorageError):
    pass


def sqlite_tables(conn: sqlite3.Connection) -> set[str]:
    return {
        str(r[0])
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    } - {"schema_version"}


async def copy_to_postgres(
    sqlite_path: Path, dsn: str, say: Callable[[str], None] = print
) -> dict[str, int]:
    """Copy every table; returns table -> rows copied (verified). Raises MigrateError."""
    if not sqlite_path.is_file():
        raise MigrateError(f"{sqlite_path} does not exist")
    say(f"checking {sqlite_path} (migrating it to this version if needed)")
    src_db = await SqliteDatabase.open(sqlite_path)
    src_version = src_db.schema_version
    await src_db.close()
    say("checking the PostgreSQL database (applying migrations if needed)")
    dst_db = await PostgresDatabase.connect(dsn, readers=1)
    dst_version = dst_db.schema_version
    await dst_db.close()
    if src_version != dst_version:
        raise MigrateError(
            f"schema versions differ: SQLite {src_version}, PostgreSQL {dst_version}"
        )

    src = sqlite3.connect(f"{sqlite_path.resolve().as_uri()}?mode=ro", uri=True)
    dst: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
    try:
        unknown = sqlite_tables(src) - set(COPY_ORDER) - NOT_COPIED
        if unknown:
            raise MigrateError(f"tables this command does not know how to copy: {sorted(unknown)}")
        for table in COPY_ORDER:
            if await dst.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                raise MigrateError(
                    f"the PostgreSQL database is not empty (table {table} has rows);"
                    " migrate into a new, empty database"
                )
        src.execute("BEGIN")  # one snapshot of the source for every table
        copied: dict[str, int] = {}
        async with dst.transaction():
            for table in COPY_ORDER:
                cols = [
                    str(r[0])
                    for r in await dst.fetch(
                        "SELECT column_name FROM information_schema.columns"
                        " WHERE table_schema = current_schema() AND table_name = $1"
                        " ORDER BY ordinal_position",
                        table,
                    )
                ]
                src_cols = {str(r[1]) for r in src.execute(f"PRAGMA table_info({table})")}
                if set(cols) != src_cols:
                    raise MigrateError(
                        f"{table}: columns differ (SQLite {sorted(src_cols)}, PostgreSQL"
                        f" {sorted(cols)})"
                    )
                source = _SOURCES.get(table, table)
                expected = int(src.execute(f"SELECT COUNT(*) FROM {source}").fetchone()[0])
                cur = src.execute(f"SELECT {', '.join(cols)} FROM {source}")
                n = 0
                while rows := cur.fetchmany(CHUNK_ROWS):
                    await dst.copy_records_to_table(table, records=rows, columns=cols)
                    n += len(rows)
                    if expected > CHUNK_ROWS:
                        say(f"  {table}: {n}/{expected}")
                got = int(await dst.fetchval(f"SELECT COUNT(*) FROM {table}"))
                if got != expected or n != expected:
                    raise MigrateError(
                        f"{table}: {expected} rows in SQLite, {got} in PostgreSQL; nothing copied"
                    )
                copied[table] = got
                say(f"copied {table}: {got} rows (verified)")
            for table, col in _IDENTITY.items():
                await dst.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{col}'),"
                    f" COALESCE((SELECT max({col}) FROM {table}), 0) + 1, false)"
                )
        src.execute("ROLLBACK")
        return copied
    except (sqlite3.Error, asyncpg.PostgresError) as exc:
        raise MigrateError(f"copy failed, nothing was committed: {exc}") from exc
    finally:
        src.close()
        await dst.close()
