"""PostgreSQL-only storage behaviour: the schema matches SQLite's, every store
statement prepares, migrations, the adapter, cross-process KeyPackage consumption,
reconnecting after the server dropped the connection. (The engine-neutral storage
tests run on PostgreSQL too, through the ``db`` / ``storage`` fixtures.)"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sovereign.storage import DatabaseError, MigrationError, StorageError
from sovereign.storage import keypackages as kp
from sovereign.storage.database import apply_migrations, default_migrations, load_migrations
from sovereign.storage.engines import POSTGRES, variant
from sovereign.storage.postgres import PostgresDatabase, to_dollar_params
from sovereign.storage.sessions import create_session_txn
from sovereign.storage.users import create_user_txn
from tests.helpers import pg
from tests.unit.storage.test_portable_sql import STORE_MODULES, statements

# -- the schema -----------------------------------------------------------------------


def _sqlite_schema() -> dict[str, Any]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        apply_migrations(conn, load_migrations(default_migrations(), "sqlite"))
        out: dict[str, Any] = {}
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        for t in tables:
            info = conn.execute(f"PRAGMA table_info({t})").fetchall()
            cols = {r[1]: bool(r[3]) or r[5] > 0 for r in info}  # name -> NOT NULL
            pk = tuple(r[1] for r in sorted(info, key=lambda r: r[5]) if r[5] > 0)
            uniques: set[tuple[str, ...]] = set()
            indexes: dict[str, tuple[str, ...]] = {}
            for _, name, unique, origin, _partial in conn.execute(f"PRAGMA index_list({t})"):
                idx_cols = tuple(
                    r[2] for r in conn.execute(f"PRAGMA index_info({name})").fetchall()
                )
                if origin == "u" and unique:
                    uniques.add(idx_cols)
                elif origin == "c":
                    indexes[name] = idx_cols
            out[t] = {"columns": cols, "pk": pk, "unique": uniques, "indexes": indexes}
        return out
    finally:
        conn.close()


async def _pg_schema(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        out: dict[str, Any] = {}
        tables = [
            r[0]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                " ORDER BY tablename"
            )
        ]
        for t in tables:
            cols = {
                r[0]: r[1] == "NO"
                for r in await conn.fetch(
                    "SELECT column_name, is_nullable FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = $1",
                    t,
                )
            }
            cons = await conn.fetch(
                "SELECT c.conname, c.contype::text AS contype,"
                " array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, i)"
                "  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n"
                "  ORDER BY k.i) AS cols"
                " FROM pg_constraint c WHERE c.conrelid = $1::regclass",
                t,
            )
            pk = next((tuple(r["cols"]) for r in cons if r["contype"] == "p"), ())
            uniques = {tuple(r["cols"]) for r in cons if r["contype"] == "u"}
            owned = {r["conname"] for r in cons}
            indexes: dict[str, tuple[str, ...]] = {}
            for r in await conn.fetch(
                "SELECT i.relname,"
                " array(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY k(n, o)"
                "  JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.n"
                "  ORDER BY k.o) AS cols"
                " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
                " WHERE x.indrelid = $1::regclass",
                t,
            ):
                if r["relname"] not in owned:  # constraints' own indexes are above
                    indexes[r["relname"]] = tuple(r["cols"])
            out[t] = {"columns": cols, "pk": pk, "unique": uniques, "indexes": indexes}
        return out
    finally:
        await conn.close()


async def test_schema_matches_sqlite(pg_dsn: str) -> None:
    """Tables, columns (and NOT NULL), primary keys, unique constraints and indexes are
    the same on both engines: the two migration sets cannot drift apart unnoticed."""
    lite, post = _sqlite_schema(), await _pg_schema(pg_dsn)
    assert sorted(lite) == sorted(post)
    # The one deliberate difference (migration 0008): SQLite keys the idempotency rows
    # by generation first, PostgreSQL keeps (user_id, request_id) unique for cluster mode.
    assert lite["send_requests"].pop("pk") == ("gen", "user_id", "request_id")
    assert post["send_requests"].pop("pk") == ("user_id", "request_id")
    for table in lite:
        assert lite[table] == post[table], table


@pytest.mark.parametrize("name", STORE_MODULES)
async def test_every_statement_prepares_on_postgres(name: str, pg_dsn: str) -> None:
    """What ``test_every_statement_compiles_on_sqlite`` does for SQLite: every store
    statement, as the adapter sends it (PostgreSQL's variant, ``$n`` parameters)."""
    found = list(dict.fromkeys(statements(name)))
    conn = await asyncpg.connect(pg_dsn)
    try:
        for sql in found:
            try:
                await conn.prepare(to_dollar_params(variant(sql, POSTGRES.name)))
            except asyncpg.PostgresError as exc:
                pytest.fail(f"{name}: {exc}: {sql}")
    finally:
        await conn.close()


def test_placeholders_outside_quotes_only() -> None:
    assert to_dollar_params("SELECT ? , '?' , \"a?\" -- ?\n, ?") == (
        "SELECT $1 , '?' , \"a?\" -- ?\n, $2"
    )
    assert to_dollar_params("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', $1"


def test_engine_variants_are_registered() -> None:
    sql = kp._CONSUME_OLDEST
    assert "SKIP LOCKED" not in sql
    assert "FOR UPDATE SKIP LOCKED" in variant(sql, "postgres")


# -- migrations -------------------------------------------------------------------------


@pytest.fixture
def fresh_dsn() -> Iterator[str]:
    name, dsn = pg.create_database()
    try:
        yield dsn
    finally:
        pg.drop_database(name)


def _migrations_dir(tmp_path: Path, extra: dict[str, str], below: int | None = None) -> Path:
    d = tmp_path / "migrations"
    d.mkdir(parents=True, exist_ok=True)
    for entry in default_migrations().iterdir():
        if entry.name.endswith(".sql") and (below is None or int(entry.name[:4]) < below):
            (d / entry.name).write_text(entry.read_text())
    for name, sql in extra.items():
        (d / name).write_text(sql)
    return d


async def test_migrations_once_newer_refused_failed_rolled_back(
    fresh_dsn: str, tmp_path: Path
) -> None:
    latest = load_migrations(default_migrations(), "postgres")[-1].version
    nxt = f"{latest + 1:04d}"
    for _ in range(2):  # idempotent
        db = await PostgresDatabase.connect(fresh_dsn, readers=1)
        assert db.schema_version == latest
        await db.close()
    bad = _migrations_dir(
        tmp_path / "bad",
        {f"{nxt}_bad.postgres.sql": "CREATE TABLE half (x INT);\nINSERT INTO nowhere VALUES (1);"},
    )
    with pytest.raises(MigrationError, match=f"{nxt}_bad"):
        await PostgresDatabase.connect(fresh_dsn, readers=1, migrations=bad)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('half')") is None
    finally:
        await conn.close()
    good = _migrations_dir(
        tmp_path / "good", {f"{nxt}_extra.postgres.sql": "CREATE TABLE extra (x INT);"}
    )
    db = await PostgresDatabase.connect(fresh_dsn, readers=1, migrations=good)
    assert db.schema_version == latest + 1
    await db.close()
    with pytest.raises(MigrationError, match="newer"):
        await PostgresDatabase.connect(fresh_dsn, readers=1)


async def test_0007_moves_cursors_and_delivered_positions_into_one_table(
    fresh_dsn: str, tmp_path: Path
) -> None:
    """The PostgreSQL side of 0007 (the SQLite side: test_database.py)."""
    db = await PostgresDatabase.connect(
        fresh_dsn, readers=1, migrations=_migrations_dir(tmp_path, {}, below=7)
    )
    assert db.schema_version == 6
    await db.close()
    conn = await asyncpg.connect(fresh_dsn)
    try:
        for uid in ("U-A", "U-B"):
            await conn.execute(
                "INSERT INTO users (user_id, username, username_key, created_at_us)"
                " VALUES ($1, $1, lower($1), 0)",
                uid,
            )
        for dev, uid in (("D-A1", "U-A"), ("D-B1", "U-B")):
            await conn.execute(
                "INSERT INTO sessions (session_id, device_id, user_id, token_hash, created_at_us,"
                " expires_at_us, last_seen_at_us) VALUES ($1, $2, $3, $4, 0, 1, 0)",
                "S-" + dev,
                dev,
                uid,
                dev.encode(),
            )
        await conn.executemany(
            "INSERT INTO cursors VALUES ($1, $2, $3)",
            [("D-A1", "C1", 4), ("D-B1", "C1", 3), ("D-GONE", "C1", 9)],
        )
        await conn.executemany(
            "INSERT INTO delivery VALUES ($1, $2, $3)", [("C1", "U-A", 4), ("C2", "U-B", 1)]
        )
    finally:
        await conn.close()
    db = await PostgresDatabase.connect(fresh_dsn, readers=1)
    await db.close()
    conn = await asyncpg.connect(fresh_dsn)
    try:
        rows = sorted(tuple(r) for r in await conn.fetch("SELECT * FROM cursors"))
        assert rows == [
            ("C1", "U-A", "", 4),
            ("C1", "U-A", "D-A1", 4),
            ("C1", "U-B", "D-B1", 3),
            ("C2", "U-B", "", 1),
        ]
        assert await conn.fetchval("SELECT to_regclass('delivery')") is None
        assert await conn.fetchval("SELECT to_regclass('cursors_by_device')") is not None
    finally:
        await conn.close()


async def test_concurrent_openers_migrate_once(fresh_dsn: str) -> None:
    dbs = await asyncio.gather(*(PostgresDatabase.connect(fresh_dsn, readers=1) for _ in range(3)))
    try:
        assert {d.schema_version for d in dbs} == {
            load_migrations(default_migrations(), "postgres")[-1].version
        }
    finally:
        for d in dbs:
            await d.close()


# -- behaviour ---------------------------------------------------------------------------


async def test_backup_says_pg_dump_and_size_is_known(pg_dsn: str) -> None:
    db = await PostgresDatabase.connect(pg_dsn, readers=1)
    try:
        assert db.size_bytes() > 0
        with pytest.raises(StorageError, match="pg_dump"):
            await db.backup("/tmp/never-written.db")
    finally:
        await db.close()


async def test_keypackages_never_handed_out_twice_across_processes(pg_dsn: str) -> None:
    """Two Database objects (= two server processes) fetching the same pool at once:
    each ordinary package goes to exactly one fetch (FOR UPDATE SKIP LOCKED)."""
    a = await PostgresDatabase.connect(pg_dsn, readers=1)
    b = await PostgresDatabase.connect(pg_dsn, readers=1)
    try:

        def setup(conn: Any) -> str:
            user = create_user_txn(conn, "kp", "", False, now_us=1)
            s = create_session_txn(conn, user.user_id, b"t" * 32, 10**18, now_us=1)
            kp.upload_txn(
                conn,
                device_id=s.device_id,
                user_id=user.user_id,
                ordinary=[(i, b"pkg%03d" % i) for i in range(60)],
                last_resort=None,
                max_per_device=100,
                now_us=1,
            )
            return user.user_id

        uid = await a.write(setup)
        results = await asyncio.gather(
            *(db.write(lambda c: kp.fetch_txn(c, uid)) for _ in range(40) for db in (a, b))
        )
        got = [p.data for r in results for p in r]
        assert len(got) == len(set(got)) == 60  # every package once; 20 fetches found none
        assert sum(1 for r in results if not r) == 20
    finally:
        await a.close()
        await b.close()


async def test_writer_reconnects_after_the_server_dropped_it(pg_dsn: str) -> None:
    db = await PostgresDatabase.connect(pg_dsn, readers=1)
    try:
        pid = await db.write(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0])
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        # The write that meets the dead connection fails as a DatabaseError...
        with pytest.raises(DatabaseError):
            for _ in range(50):
                await db.write(lambda c: c.execute("SELECT 1").fetchone())
                await asyncio.sleep(0.01)
        # ...and the next transaction runs on a new connection.
        new_pid = await db.write(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0])
        assert new_pid != pid
        assert db.writer_alive
    finally:
        await db.close()


async def test_integrity_errors_map_like_sqlite(pg_dsn: str) -> None:
    db = await PostgresDatabase.connect(pg_dsn, readers=1)
    try:
        await db.write(lambda c: c.execute("INSERT INTO settings (key, value) VALUES ('k', '1')"))
        with pytest.raises(DatabaseError) as info:
            await db.write(
                lambda c: c.execute("INSERT INTO settings (key, value) VALUES ('k', '2')")
            )
        assert isinstance(info.value.__cause__, asyncpg.UniqueViolationError)
        # The writer goes on.
        rows = await db.read(lambda c: c.execute("SELECT value FROM settings").fetchall())
        assert [r[0] for r in rows] == ["1"]
    finally:
        await db.close()
