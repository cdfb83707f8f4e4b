"""``sovereign migrate-to-postgres``: a SQLite data dir made by the real server (users,
passkeys, sessions, a conversation with events, KeyPackages) copied into a throwaway
PostgreSQL database, then served from PostgreSQL: the same accounts log in, the same
history comes back. And ``backup`` / ``restore`` on PostgreSQL point at pg_dump."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from sovereign.protocol.types import MessageType as T
from sovereign.storage import SqliteDatabase
from sovereign.storage.migrate import COPY_ORDER, NOT_COPIED, copy_to_postgres, sqlite_tables
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import pg
from tests.helpers.flows import login, register
from tests.helpers.server import run_cli, running_server
from tests.helpers.wsclient import WsClient
from tests.integration.test_messaging import create_group, send


@pytest.fixture
def empty_pg() -> Iterator[str]:
    name, dsn = pg.create_database()
    try:
        yield dsn
    finally:
        pg.drop_database(name)


def _counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in COPY_ORDER}


async def _pg_counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {t: int(await conn.fetchval(f"SELECT COUNT(*) FROM {t}")) for t in COPY_ORDER}
    finally:
        await conn.close()


async def test_copy_sqlite_data_dir_into_postgres_and_serve_it(
    tmp_path: Path, empty_pg: str
) -> None:
    data = tmp_path / "data"
    sqlite_only = {"storage": "sqlite", "postgres_dsn": ""}
    async with running_server(data, **sqlite_only) as srv:
        a, b = await WsClient.connect(srv.url), await WsClient.connect(srv.url)
        alice, bob = await register(a, "alice"), await register(b, "Bob")
        conv = (await create_group(a, "family", bob.user_id)).conversation_id
        sent = [await send(a, conv, f"msg {i}".encode()) for i in range(5)]
        await a.close()
        await b.close()
    before = _counts(data / "sovereign.db")
    assert before["users"] == 2 and before["credentials"] == 2 and before["events"] >= 5
    # The sends' idempotency keys are still only in their event rows (fewer than a
    # generation: migration 0009); PostgreSQL gets them as send_requests rows.
    assert before["send_requests"] == 0
    before["send_requests"] = len(sent)

    r = await asyncio.to_thread(
        run_cli, "migrate-to-postgres", "--data-dir", str(data), "--postgres-dsn", empty_pg
    )
    assert r.returncode == 0, r.stderr
    for table in COPY_ORDER:
        assert f"copied {table}: {before[table]} rows (verified)" in r.stdout
    assert 'storage = "postgres"' in r.stdout and "postgres_dsn" in r.stdout
    assert empty_pg not in r.stdout  # the DSN may hold a password: not echoed
    assert await _pg_counts(empty_pg) == before

    # A second run refuses: the target is no longer empty.
    again = await asyncio.to_thread(
        run_cli, "migrate-to-postgres", "--data-dir", str(data), "--postgres-dsn", empty_pg
    )
    assert again.returncode != 0 and "not empty" in again.stderr

    # Served from PostgreSQL: the passkey logs in, the history is there, new messages
    # continue the sequence.
    async with running_server(
        tmp_path / "pgdata", storage="postgres", postgres_dsn=empty_pg
    ) as srv:
        c = await WsClient.connect(srv.url)
        ok = await login(c, alice)
        assert ok.user_id == alice.user_id
        page = await c.request(
            T.MESSAGE_HISTORY_REQUEST,
            pb.HistoryRequest(conversation_id=conv, limit=50),
            T.MESSAGE_HISTORY_RESPONSE,
        )
        bodies = [
            pb.MessageReceive.FromString(e.payload).encrypted_payload
            for e in page.events
            if e.type == T.MESSAGE_RECEIVE
        ]
        assert bodies == [f"msg {i}".encode() for i in range(5)]
        nxt = await send(c, conv, b"after the move")
        assert nxt.seq == sent[-1].seq + 1
        await c.close()


async def test_a_request_id_kept_in_two_generations_is_copied_once_the_newer(
    tmp_path: Path, empty_pg: str
) -> None:
    db = tmp_path / "sovereign.db"
    await (await SqliteDatabase.open(db)).close()
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO send_requests (gen, user_id, request_id, event_id, created_at_us)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                (0, "u1", "k", "E-old", 100),
                (3, "u1", "k", "E-new", 9000),
                (3, "u1", "j", "E-j", 9001),
            ],
        )
    said: list[str] = []
    copied = await copy_to_postgres(db, empty_pg, say=said.append)
    assert copied["send_requests"] == 2
    assert "copied send_requests: 2 rows (verified)" in said
    conn2 = await asyncpg.connect(empty_pg)
    try:
        rows = await conn2.fetch("SELECT gen, user_id, request_id, event_id FROM send_requests")
    finally:
        await conn2.close()
    assert sorted(tuple(r) for r in rows) == [(3, "u1", "j", "E-j"), (3, "u1", "k", "E-new")]


def test_copy_order_names_every_table(tmp_path: Path) -> None:
    """A new table must be placed in COPY_ORDER (the copy refuses unknown tables)."""
    from sovereign.storage.database import apply_migrations, default_migrations, load_migrations

    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    try:
        apply_migrations(conn, load_migrations(default_migrations(), "sqlite"))
        assert sqlite_tables(conn) == set(COPY_ORDER) | NOT_COPIED
    finally:
        conn.close()


async def test_backup_and_restore_on_postgres_say_pg_dump(tmp_path: Path) -> None:
    env = {"SOVEREIGN_STORAGE": "postgres", "SOVEREIGN_POSTGRES_DSN": "postgresql://x@127.0.0.1/x"}
    for args in (("backup", str(tmp_path / "b.db")), ("restore", str(tmp_path / "b.db"))):
        r = await asyncio.to_thread(run_cli, *args, "--data-dir", str(tmp_path), env=env)
        assert r.returncode == 1, r
        assert "pg_dump" in r.stderr and "SQLite" in r.stderr
        assert r.stderr.startswith("sovereign: error: ")
