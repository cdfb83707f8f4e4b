from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from sovereign.storage import (
    Database,
    DatabaseClosed,
    DatabaseError,
    MigrationError,
    SqliteDatabase,
)
from sovereign.storage import database as database_mod
from sovereign.storage import messaging as msql
from sovereign.storage.database import default_migrations, load_migrations, split_statements
from tests.helpers.gate import Gate

# The migrations the code ships; tests add theirs after the last one.
SHIPPED = [(m.version, m.name) for m in load_migrations(default_migrations(), "sqlite")]
LATEST = SHIPPED[-1][0]
NEXT = f"{LATEST + 1:04d}"


def _insert(value: str) -> Callable[[sqlite3.Connection], str]:
    """A write fn adding one row (settings is a handy key/value table)."""

    def fn(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO settings (key, value) VALUES (?, '1')", (value,))
        return value

    return fn


def _keys(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT key FROM settings ORDER BY key")]


def _half_then_fail(conn: sqlite3.Connection) -> None:
    """A write that fails after a change of its own (which must not stay)."""
    conn.execute("INSERT INTO settings (key, value) VALUES ('bad', '1')")
    raise RuntimeError("boom")


def _bad_rows(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM settings WHERE key = 'bad'").fetchone()[0])


async def _one_batch(db: Database, *fns: Callable[[sqlite3.Connection], object]) -> list[object]:
    """``fns`` written as one batch (queued behind a write that holds the writer); their
    results or exceptions, in order."""
    gate = Gate()  # one per batch: a released gate stays open
    first = asyncio.ensure_future(db.write(gate.fn))
    await gate.wait_entered()
    futs = [asyncio.ensure_future(db.write(fn)) for fn in fns]
    await asyncio.sleep(0)
    gate.release()
    await first
    return await asyncio.gather(*futs, return_exceptions=True)


# -- opening, pragmas, migrations ------------------------------------------------------


@pytest.mark.usefixtures("sqlite_only")
async def test_open_creates_parent_dir_and_sets_pragmas(db: Database, db_path: Path) -> None:
    assert db_path.exists()

    def pragmas(conn: sqlite3.Connection) -> tuple[str, int, int, int]:
        return (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
            conn.execute("PRAGMA foreign_keys").fetchone()[0],
            conn.execute("PRAGMA busy_timeout").fetchone()[0],
        )

    mode, sync, fks, busy = await db.write(pragmas)
    assert mode == "wal"
    assert sync == 2  # FULL (SPEC §11)
    assert fks == 1
    assert busy == 5000
    # Readers see the same WAL database and return sqlite3.Row.
    row = await db.read(lambda c: c.execute("PRAGMA journal_mode").fetchone())
    assert isinstance(row, sqlite3.Row)
    assert row[0] == "wal"


async def test_readers_are_read_only(db: Database) -> None:
    with pytest.raises(DatabaseError):
        await db.read(lambda c: c.execute("INSERT INTO settings VALUES ('k', '1')"))


async def test_migrations_applied_once_and_idempotent(db_path: Path) -> None:
    def versions(conn: sqlite3.Connection) -> list[tuple[int, str]]:
        return [tuple(r) for r in conn.execute("SELECT version, name FROM schema_version")]

    for _ in range(3):
        db = await SqliteDatabase.open(db_path)
        try:
            assert db.schema_version == LATEST
            assert await db.read(versions) == SHIPPED
            assert SHIPPED[0] == (1, "auth")
            tables = await db.read(
                lambda c: {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
            )
            assert {"users", "credentials", "sessions", "challenges", "invites", "settings"} <= (
                tables
            )
        finally:
            await db.close()


def _migrations_dir(tmp_path: Path, extra: dict[str, str], below: int | None = None) -> Path:
    """The shipped migrations (only those numbered below ``below``, if given) plus
    ``extra``."""
    d = tmp_path / "migrations"
    d.mkdir(exist_ok=True)
    for entry in default_migrations().iterdir():
        if entry.name.endswith(".sql") and (below is None or int(entry.name[:4]) < below):
            (d / entry.name).write_text(entry.read_text())
    for name, sql in extra.items():
        (d / name).write_text(sql)
    return d


async def test_new_migration_applied_on_reopen(tmp_path: Path, db_path: Path) -> None:
    (await SqliteDatabase.open(db_path)).schema_version  # noqa: B018
    db = await SqliteDatabase.open(db_path)
    await db.close()
    mig = _migrations_dir(tmp_path, {f"{NEXT}_extra.sql": "CREATE TABLE extra (x INTEGER) STRICT;"})
    db = await SqliteDatabase.open(db_path, migrations=mig)
    try:
        assert db.schema_version == LATEST + 1
        assert await db.read(lambda c: c.execute("SELECT COUNT(*) FROM extra").fetchone()[0]) == 0
    finally:
        await db.close()


async def test_refuses_schema_newer_than_code(tmp_path: Path, db_path: Path) -> None:
    mig = _migrations_dir(tmp_path, {f"{NEXT}_extra.sql": "CREATE TABLE extra (x INTEGER);"})
    await (await SqliteDatabase.open(db_path, migrations=mig)).close()
    with pytest.raises(MigrationError, match="newer"):
        await SqliteDatabase.open(db_path)


def _event_rows(n: int, conv: str) -> list[tuple[str, int, str, int, str, int, bytes]]:
    """``n`` events of ~360 bytes (a 200-byte ciphertext in its MessageReceive), as the
    relay benchmark stores them."""
    return [
        (conv, seq, f"01J{conv[-3:]}{seq:020d}", 21, "01JSENDER0000000000000000", seq, bytes(300))
        for seq in range(1, n + 1)
    ]


async def test_0006_keeps_every_event_and_drops_without_rowid(
    tmp_path: Path, db_path: Path
) -> None:
    """A database made before 0006 (events WITHOUT ROWID) keeps every event, key and
    constraint when 0006 rebuilds the table as a rowid table."""
    db = await SqliteDatabase.open(db_path, migrations=_migrations_dir(tmp_path, {}, below=6))
    assert db.schema_version == 5
    rows = _event_rows(40, "01JCONVA") + _event_rows(25, "01JCONVB")

    def fill(conn: sqlite3.Connection) -> None:
        for conv in ("01JCONVA", "01JCONVB"):
            conn.execute(
                "INSERT INTO conversations (conversation_id, created_by, created_at_us)"
                " VALUES (?, 'u', 0)",
                (conv,),
            )
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    await db.write(fill)
    await db.close()
    before = sqlite3.connect(db_path)
    assert (
        "WITHOUT ROWID"
        in before.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()[0]
    )
    before.close()

    db = await SqliteDatabase.open(db_path)
    try:
        assert db.schema_version >= 6
        got = await db.read(
            lambda c: [
                tuple(r)
                for r in c.execute(
                    "SELECT conversation_id, seq, event_id, type, sender_id, ts_us, payload"
                    " FROM events ORDER BY conversation_id, seq"
                )
            ]
        )
        assert got == sorted(rows)
        # A rowid table now (a WITHOUT ROWID table has no rowid column) ...
        assert (
            await db.read(lambda c: c.execute("SELECT max(rowid) FROM events").fetchone()[0]) == 65
        )
        # ... with both keys still enforced.
        for dup in ((*rows[0][:2], "01JNEWID", *rows[0][3:]), ("01JCONVA", 99, *rows[0][2:])):
            with pytest.raises(DatabaseError):
                await db.write(
                    lambda c, d=dup: c.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", d)
                )
    finally:
        await db.close()


#: Before 0007: (device_id, conversation_id, acked_seq) cursors and (conversation_id,
#: user_id, up_to_seq) delivered positions, two tables. "D-GONE" has no session left.
_PRE_0007_CURSORS = [("D-A1", "C1", 4), ("D-A2", "C1", 6), ("D-B1", "C1", 3), ("D-GONE", "C1", 9)]
_PRE_0007_DELIVERY = [("C1", "U-A", 6), ("C1", "U-B", 3), ("C2", "U-A", 1)]


def _pre_0007_fill(conn: sqlite3.Connection) -> None:
    for uid in ("U-A", "U-B"):
        conn.execute(
            "INSERT INTO users (user_id, username, username_key, created_at_us)"
            " VALUES (?, ?, ?, 0)",
            (uid, uid, uid.lower()),
        )
    for dev, uid in (("D-A1", "U-A"), ("D-A2", "U-A"), ("D-B1", "U-B")):
        conn.execute(
            "INSERT INTO sessions (session_id, device_id, user_id, token_hash, created_at_us,"
            " expires_at_us, last_seen_at_us) VALUES (?, ?, ?, ?, 0, 1, 0)",
            ("S-" + dev, dev, uid, dev.encode()),
        )
    conn.executemany("INSERT INTO cursors VALUES (?, ?, ?)", _PRE_0007_CURSORS)
    conn.executemany("INSERT INTO delivery VALUES (?, ?, ?)", _PRE_0007_DELIVERY)


async def test_0007_moves_cursors_and_delivered_positions_into_one_table(
    tmp_path: Path, db_path: Path
) -> None:
    """A database made before 0007 keeps every cursor of a living device and every
    delivered position, now rows of one table keyed by conversation, user, device."""
    db = await SqliteDatabase.open(db_path, migrations=_migrations_dir(tmp_path, {}, below=7))
    assert db.schema_version == 6
    await db.write(_pre_0007_fill)
    await db.close()

    db = await SqliteDatabase.open(db_path)
    try:
        assert db.schema_version >= 7
        rows = await db.read(
            lambda c: sorted(tuple(r) for r in c.execute("SELECT * FROM cursors").fetchall())
        )
        assert rows == [
            ("C1", "U-A", "", 6),
            ("C1", "U-A", "D-A1", 4),
            ("C1", "U-A", "D-A2", 6),
            ("C1", "U-B", "", 3),
            ("C1", "U-B", "D-B1", 3),
            ("C2", "U-A", "", 1),
        ]
        assert await db.read(lambda c: msql.load_cursors_txn(c, "D-A2")) == {"C1": 6}
        assert await db.read(lambda c: msql.load_delivery_txn(c, "C2", "U-A")) == 1
        assert await db.read(lambda c: msql.load_delivery_txn(c, "C2", "U-B")) is None
        tables = await db.read(
            lambda c: {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
        )
        assert "delivery" not in tables and "cursors_by_device" in tables
        # a device's cursors are found through the index, not a scan of the table
        plan = await db.read(
            lambda c: " ".join(
                str(r[-1])
                for r in c.execute(
                    "EXPLAIN QUERY PLAN SELECT conversation_id, acked_seq FROM cursors"
                    " WHERE device_id = ?",
                    ("D-A1",),
                )
            )
        )
        assert "cursors_by_device" in plan, plan
    finally:
        await db.close()


async def test_0008_keeps_every_idempotency_key_in_generation_zero(
    tmp_path: Path, db_path: Path
) -> None:
    """A database made before 0008 keeps every stored key, now in generation 0 of a
    table keyed by generation first, and the keys are still found and paged."""
    db = await SqliteDatabase.open(db_path, migrations=_migrations_dir(tmp_path, {}, below=8))
    assert db.schema_version == 7
    keys = [(f"U{i % 3}", f"r{i}", f"E{i}", 1000 + i) for i in range(7)]
    await db.write(lambda c: c.executemany("INSERT INTO send_requests VALUES (?, ?, ?, ?)", keys))
    await db.close()

    db = await SqliteDatabase.open(db_path)
    try:
        assert db.schema_version >= 8
        rows = await db.read(
            lambda c: sorted(tuple(r) for r in c.execute("SELECT * FROM send_requests"))
        )
        assert rows == sorted((0, *k) for k in keys)
        found = await db.read(lambda c: msql.send_request_event_txn(c, "U1", "r4", 0))
        assert found == ("E4", None)
        page = await db.read(lambda c: msql.send_request_keys_txn(c, 1003, None, 100))
        assert page == sorted((0, u, r, t) for u, r, _e, t in keys if t >= 1003)
    finally:
        await db.close()


async def test_0009_marks_the_stored_keys_folded(tmp_path: Path, db_path: Path) -> None:
    """A database made before 0009 has every key in send_requests already: the fold's
    mark starts at its newest event, so a start reads nothing back from event rows; a
    new database has no mark and nothing to read."""
    db = await SqliteDatabase.open(db_path, migrations=_migrations_dir(tmp_path, {}, below=9))
    assert db.schema_version == 8

    def fill(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO conversations (conversation_id, created_by, created_at_us)"
            " VALUES ('01JCONVA', 'u', 0)"
        )
        conn.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", _event_rows(5, "01JCONVA")
        )
        conn.execute("INSERT INTO send_requests VALUES (0, 'U', 'r', 'E', 1000)")

    await db.write(fill)
    newest = await db.read(lambda c: c.execute("SELECT max(event_id) FROM events").fetchone()[0])
    await db.close()

    db = await SqliteDatabase.open(db_path)
    try:
        assert db.schema_version >= 9
        assert await db.read(msql.unfolded_send_requests_txn) == ([], newest)
        mark = await db.read(lambda c: c.execute("SELECT * FROM send_request_folds").fetchall())
        assert [tuple(r) for r in mark] == [(1, newest)]
        nulls = await db.read(
            lambda c: c.execute("SELECT count(*) FROM events WHERE request_id IS NULL").fetchone()
        )
        assert nulls[0] == 5
    finally:
        await db.close()
    fresh = await SqliteDatabase.open(tmp_path / "fresh.db")
    try:
        assert await fresh.read(msql.unfolded_send_requests_txn) == ([], "")
    finally:
        await fresh.close()


async def test_events_of_everyday_size_need_no_overflow_pages(db_path: Path) -> None:
    """Why 0006: a ~360-byte event fits in its 1 KiB leaf page. WITHOUT ROWID capped a cell
    at 231 bytes, so each such event also wrote an overflow page of its own."""
    db = await SqliteDatabase.open(db_path)

    def fill(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO conversations (conversation_id, created_by, created_at_us)"
            " VALUES ('01JCONVA', 'u', 0)"
        )
        conn.executemany(
            "INSERT INTO events (conversation_id, seq, event_id, type, sender_id, ts_us, payload)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            _event_rows(200, "01JCONVA"),
        )

    def pages(conn: sqlite3.Connection) -> dict[str, int]:
        try:
            found = conn.execute(
                "SELECT pagetype, count(*) FROM dbstat WHERE name = 'events' GROUP BY pagetype"
            ).fetchall()
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table")
        return {str(r[0]): int(r[1]) for r in found}

    try:
        await db.write(fill)
        by_type = await db.write(pages)
        assert "overflow" not in by_type, by_type
        assert by_type["leaf"] <= 200 // 2  # two or more events per leaf
    finally:
        await db.close()


async def test_checkpointer_restarts_the_wal_under_steady_writes(db_path: Path) -> None:
    """Commits that never pause must not grow the WAL without end: PASSIVE checkpoints
    alone never catch up with them (the WAL grew to the 64 MB backstop, then a commit
    paid for checkpointing all of it); the last round, between two batches of the writer,
    catches up, and the writer starts the WAL over."""
    db = await SqliteDatabase.open(db_path, checkpoint_s=0.02)
    wal = db_path.with_name(db_path.name + "-wal")

    def resets() -> int:
        return int.from_bytes(wal.read_bytes()[12:16], "big")  # header: checkpoint sequence

    try:
        await db.write(_insert("first"))
        before = resets()
        until = time.monotonic() + 1.0

        async def steady(i: int) -> None:
            n = 0
            while time.monotonic() < until:
                await db.write(_insert(f"{i}-{n}"))
                n += 1

        await asyncio.gather(*(steady(i) for i in range(4)))
        assert resets() > before
    finally:
        await db.close()


async def test_failed_migration_rolls_back_and_open_fails_cleanly(
    tmp_path: Path, db_path: Path
) -> None:
    before = {t.name for t in threading.enumerate()}
    mig = _migrations_dir(
        tmp_path,
        {f"{NEXT}_bad.sql": "CREATE TABLE half (x INTEGER);\nINSERT INTO nowhere VALUES (1);\n"},
    )
    with pytest.raises(MigrationError, match=f"{NEXT}_bad"):
        await SqliteDatabase.open(db_path, migrations=mig)
    # The shipped ones committed in their own transactions; the bad one left nothing.
    db = await SqliteDatabase.open(db_path)
    try:
        assert db.schema_version == LATEST
        names = await db.read(lambda c: [r[0] for r in c.execute("SELECT name FROM sqlite_master")])
        assert "half" not in names
    finally:
        await db.close()
    for _ in range(100):  # the failed opener's writer thread is gone
        if "sovereign-db-writer" not in {t.name for t in threading.enumerate()} - before:
            break
        await asyncio.sleep(0.01)
    assert "sovereign-db-writer" not in {t.name for t in threading.enumerate()} - before


def test_engine_specific_migration_wins(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("generic;")
    (tmp_path / "0001_a.sqlite.sql").write_text("sqlite;")
    (tmp_path / "0001_a.postgres.sql").write_text("postgres;")
    (tmp_path / "0002_b.postgres.sql").write_text("pg only;")
    (tmp_path / "0003_c.sql").write_text("c;")
    (tmp_path / "README.md").write_text("ignored")
    got = load_migrations(tmp_path, "sqlite")
    assert [(m.version, m.name, m.sql) for m in got] == [(1, "a", "sqlite;"), (3, "c", "c;")]


def test_duplicate_migration_numbers_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("x;")
    (tmp_path / "0001_b.sql").write_text("y;")
    with pytest.raises(MigrationError, match="two migrations"):
        load_migrations(tmp_path, "sqlite")


def test_split_statements_keeps_triggers_and_quoted_semicolons() -> None:
    script = """
    -- a comment; with a semicolon
    CREATE TABLE t (x TEXT);
    INSERT INTO t VALUES ('a;b');
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN
        INSERT INTO t VALUES ('c'); SELECT 1;
    END;
    -- trailing comment
    """
    stmts = list(split_statements(script))
    assert len(stmts) == 3
    assert "'a;b'" in stmts[1]
    assert stmts[2].rstrip().endswith("END;")
    conn = sqlite3.connect(":memory:")
    try:
        for s in stmts:
            conn.execute(s)
    finally:
        conn.close()


async def test_memory_path_refused() -> None:
    with pytest.raises(ValueError):
        await SqliteDatabase.open(":memory:")


# -- group commit ------------------------------------------------------------------------


async def test_concurrent_writes_are_group_committed(db: Database) -> None:
    results = await asyncio.gather(*(db.write(_insert(f"k{i:03d}")) for i in range(200)))
    assert results == [f"k{i:03d}" for i in range(200)]
    stats = db.stats()
    assert stats.writes_committed == 200
    assert stats.batches_committed < 50, stats  # far fewer transactions than writes
    assert stats.largest_batch > 1
    assert await db.read(_keys) == [f"k{i:03d}" for i in range(200)]


async def test_queued_writes_form_one_batch_resolved_by_one_callback(
    db: Database, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    settle_calls: list[int] = []
    real = loop.call_soon_threadsafe

    def counting(cb, *args, **kw):  # type: ignore[no-untyped-def]
        if cb is database_mod._settle:
            settle_calls.append(len(args[0]))
        return real(cb, *args, **kw)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    first = asyncio.ensure_future(db.write(gate.fn))
    await gate.wait_entered()
    rest = [asyncio.ensure_future(db.write(_insert(f"k{i:03d}"))) for i in range(200)]
    await asyncio.sleep(0)  # every task has queued its write
    gate.release()
    assert await first == "gate"
    assert await asyncio.gather(*rest) == [f"k{i:03d}" for i in range(200)]
    assert settle_calls == [1, 200]  # one wake-up per batch, not per write
    stats = db.stats()
    assert (stats.batches_committed, stats.largest_batch) == (2, 200)


async def test_max_batch_caps_a_transaction(db_path: Path, gate: Gate) -> None:
    db = await SqliteDatabase.open(db_path, max_batch=50)
    try:
        first = asyncio.ensure_future(db.write(gate.fn))
        await gate.wait_entered()
        rest = [asyncio.ensure_future(db.write(_insert(f"k{i:03d}"))) for i in range(200)]
        await asyncio.sleep(0)
        gate.release()
        await first
        await asyncio.gather(*rest)
        assert db.stats().batches_committed == 1 + 4
        assert db.largest_batch == 50
    finally:
        await db.close()


async def test_failing_write_rolls_back_only_itself(db: Database, gate: Gate) -> None:
    def sql_error(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    first = asyncio.ensure_future(db.write(gate.fn))
    await gate.wait_entered()
    futs = [
        asyncio.ensure_future(db.write(_insert("a"))),
        asyncio.ensure_future(db.write(_half_then_fail)),
        asyncio.ensure_future(db.write(_insert("b"))),
        asyncio.ensure_future(db.write(sql_error)),
        asyncio.ensure_future(db.write(_insert("c"))),
    ]
    await asyncio.sleep(0)
    gate.release()
    await first
    res = await asyncio.gather(*futs, return_exceptions=True)
    assert res[0] == "a" and res[2] == "b" and res[4] == "c"
    assert isinstance(res[1], RuntimeError)  # the fn's own exception, unchanged
    assert isinstance(res[3], DatabaseError)  # sqlite3 errors arrive typed
    assert isinstance(res[3].__cause__, (sqlite3.OperationalError, asyncpg.UndefinedTableError))
    assert await db.read(_keys) == ["a", "b", "c"]
    assert db.stats().batches_committed == 2
    assert db.stats().writes_failed == 2


async def test_a_write_alone_in_its_batch_fails_alone(db: Database) -> None:
    """A batch of one write runs without a SAVEPOINT; its failure, whatever the kind,
    rolls the transaction back: nothing of it stays, and the writer goes on."""

    def sql_error(conn: sqlite3.Connection) -> None:
        _insert("half")(conn)
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    def abort(conn: sqlite3.Connection) -> None:
        _insert("gone")(conn)
        conn.execute("ROLLBACK")
        raise RuntimeError("aborted")

    assert await db.write(_insert("a")) == "a"
    with pytest.raises(RuntimeError, match="boom"):
        await db.write(_half_then_fail)
    with pytest.raises(DatabaseError):
        await db.write(sql_error)
    with pytest.raises(RuntimeError, match="aborted"):
        await db.write(abort)
    assert await db.write(_insert("b")) == "b"
    assert await db.read(_keys) == ["a", "b"]
    assert await db.read(_bad_rows) == 0
    stats = db.stats()
    assert (stats.writes_failed, stats.batches_committed) == (3, 2)


async def test_a_failing_write_that_opens_a_transaction_leaves_the_rest_to_a_new_one(
    db: Database,
) -> None:
    """The write that opens a transaction runs without a SAVEPOINT: its failure rolls
    that transaction back, and the batch's next write opens another."""

    def ends_it(conn: sqlite3.Connection) -> str:
        _insert("ended")(conn)
        conn.execute("ROLLBACK")
        return "no error raised"

    batches = db.stats().batches_committed
    res = await _one_batch(db, _half_then_fail, _insert("a"), _half_then_fail, _insert("b"))
    assert isinstance(res[0], RuntimeError) and isinstance(res[2], RuntimeError), res
    assert res[1] == "a" and res[3] == "b"
    assert await db.read(_keys) == ["a", "b"]
    assert await db.read(_bad_rows) == 0
    assert db.stats().batches_committed == batches + 2  # the gate's, then a's and b's

    # A write that ends the transaction itself, raising nothing, is refused, not
    # answered as stored (nor left unanswered).
    with pytest.raises(RuntimeError, match="ended the writer's transaction"):
        await db.write(ends_it)
    assert await db.write(_insert("c")) == "c"
    assert await db.read(_keys) == ["a", "b", "c"]


@pytest.mark.usefixtures("sqlite_only")  # the statements SQLite ran, from its trace hook
async def test_a_transactions_first_write_needs_no_savepoint(db: Database, gate: Gate) -> None:
    ran: list[str] = []
    # The writer's connection belongs to its thread: hooked from a write.
    await db.write(lambda c: c.set_trace_callback(ran.append))
    try:
        ran.clear()
        await db.write(_insert("alone"))
        assert "COMMIT" in ran
        assert not [s for s in ran if "batch_item" in s], ran
        first = asyncio.ensure_future(db.write(gate.fn))
        await gate.wait_entered()
        pair = [asyncio.ensure_future(db.write(_insert(k))) for k in ("x", "y")]
        await asyncio.sleep(0)
        ran.clear()
        gate.release()
        await first
        assert await asyncio.gather(*pair) == ["x", "y"]
        assert ran.count("SAVEPOINT batch_item") == 1, ran  # y's: x opened it
    finally:
        await db.write(lambda c: c.set_trace_callback(None))


async def test_replayable_writes_commit_together_and_fail_alone(db: Database) -> None:
    """A batch of replayable writes runs without a SAVEPOINT each; when one fails, the
    batch is rolled back and run again write by write: that one fails alone, the others
    commit, and what they did is in the database once."""
    runs: dict[str, int] = {}

    def counted(value: str) -> Callable[[sqlite3.Connection], str]:
        def fn(conn: sqlite3.Connection) -> str:
            runs[value] = runs.get(value, 0) + 1
            return _insert(value)(conn)

        return database_mod.replayable(fn)

    assert await _one_batch(db, counted("a"), counted("b")) == ["a", "b"]
    assert runs == {"a": 1, "b": 1}  # together, once
    # A function of its own: the mark must not stay on the shared helper.
    failing = database_mod.replayable(lambda c: _half_then_fail(c))
    res = await _one_batch(db, counted("c"), failing, counted("d"))
    assert res[0] == "c" and isinstance(res[1], RuntimeError) and res[2] == "d", res
    # Tried together up to the failure, then one by one.
    assert runs == {"a": 1, "b": 1, "c": 2, "d": 1}
    assert await db.read(_keys) == ["a", "b", "c", "d"]
    assert await db.read(_bad_rows) == 0
    assert db.stats().writes_failed == 1


@pytest.mark.usefixtures("sqlite_only")  # the statements SQLite ran, from its trace hook
async def test_only_a_batch_of_replayable_writes_goes_without_savepoints(db: Database) -> None:
    ran: list[str] = []
    await db.write(lambda c: c.set_trace_callback(ran.append))
    try:
        for fns, savepoints in (
            ((database_mod.replayable(_insert("x")), database_mod.replayable(_insert("y"))), 0),
            ((database_mod.replayable(_insert("z")), _insert("w")), 1),
        ):
            gate = Gate()
            first = asyncio.ensure_future(db.write(gate.fn))
            await gate.wait_entered()
            futs = [asyncio.ensure_future(db.write(fn)) for fn in fns]
            await asyncio.sleep(0)
            ran.clear()
            gate.release()
            await first
            await asyncio.gather(*futs)
            assert ran.count("SAVEPOINT batch_item") == savepoints, ran
            ours = ran[ran.index("BEGIN IMMEDIATE") :]  # after the gate's COMMIT
            assert ours.count("COMMIT") == 1 and ours[-1] == "COMMIT", ran
    finally:
        await db.write(lambda c: c.set_trace_callback(None))


@pytest.mark.usefixtures("sqlite_only")  # PostgreSQL: no deferrable constraint to trip
async def test_failed_commit_fails_every_write_in_the_batch(db: Database, gate: Gate) -> None:
    def deferred_violation(conn: sqlite3.Connection) -> str:
        # Deferred FK checks run at COMMIT: the whole batch's COMMIT fails.
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute(
            "INSERT INTO credentials (credential_id, user_id, public_key, created_at_us)"
            " VALUES (x'01', 'nobody', x'00', 0)"
        )
        return "ok?"

    first = asyncio.ensure_future(db.write(gate.fn))
    await gate.wait_entered()
    futs = [
        asyncio.ensure_future(db.write(_insert("a"))),
        asyncio.ensure_future(db.write(deferred_violation)),
        asyncio.ensure_future(db.write(_insert("b"))),
    ]
    await asyncio.sleep(0)
    gate.release()
    await first
    res = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, DatabaseError) and "COMMIT" in str(r) for r in res), res
    assert await db.read(_keys) == []
    # The writer carries on.
    assert await db.write(_insert("after")) == "after"
    assert await db.read(_keys) == ["after"]


async def test_write_that_ends_the_transaction_fails_earlier_writes(
    db: Database, gate: Gate
) -> None:
    def abort(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")  # what SQLite does itself on e.g. SQLITE_FULL
        raise RuntimeError("aborted")

    first = asyncio.ensure_future(db.write(gate.fn))
    await gate.wait_entered()
    futs = [
        asyncio.ensure_future(db.write(_insert("a"))),
        asyncio.ensure_future(db.write(abort)),
        asyncio.ensure_future(db.write(_insert("b"))),
    ]
    await asyncio.sleep(0)
    gate.release()
    res = await asyncio.gather(first, *futs, return_exceptions=True)
    assert res[0] == "gate"  # its own batch
    # "a" was lost with the transaction: it must not report success.
    assert isinstance(res[1], DatabaseError) and "aborted" in str(res[1])
    assert isinstance(res[2], RuntimeError)
    assert res[3] == "b"  # ran in a fresh transaction
    assert await db.read(_keys) == ["b"]


async def test_writes_compose_in_one_transaction(db: Database) -> None:
    def two_then_fail(conn: sqlite3.Connection) -> None:
        _insert("x")(conn)
        _insert("y")(conn)
        raise ValueError("all or nothing")

    with pytest.raises(ValueError):
        await db.write(two_then_fail)
    assert await db.read(_keys) == []


async def test_cancelled_waiter_does_not_break_the_batch(db: Database, gate: Gate) -> None:
    first = asyncio.ensure_future(db.write(gate.fn))
    await gate.wait_entered()
    doomed = asyncio.ensure_future(db.write(_insert("a")))
    kept = asyncio.ensure_future(db.write(_insert("b")))
    await asyncio.sleep(0)
    doomed.cancel()
    gate.release()
    await first
    assert await kept == "b"
    with pytest.raises(asyncio.CancelledError):
        await doomed
    # Cancelling the waiter does not un-queue the write (documented).
    assert await db.read(_keys) == ["a", "b"]


# -- reads -------------------------------------------------------------------------------


async def test_reads_do_not_see_uncommitted_writes(db: Database) -> None:
    inserted = threading.Event()
    release = threading.Event()

    def slow_write(conn: sqlite3.Connection) -> None:
        _insert("pending")(conn)
        inserted.set()
        assert release.wait(10)

    fut = asyncio.ensure_future(db.write(slow_write))
    try:
        while not inserted.is_set():
            await asyncio.sleep(0.001)
        assert await db.read(_keys) == []  # WAL: the reader sees the last commit
    finally:
        release.set()
    await fut
    assert await db.read(_keys) == ["pending"]


async def test_reads_run_concurrently(db: Database) -> None:
    barrier = threading.Barrier(2, timeout=5)

    def meet(conn: sqlite3.Connection) -> int:
        barrier.wait()  # BrokenBarrierError unless both readers run at once
        return int(conn.execute("SELECT 1").fetchone()[0])

    assert list(await asyncio.gather(db.read(meet), db.read(meet))) == [1, 1]


async def test_read_sees_one_snapshot(db: Database) -> None:
    seen_second: list[list[str]] = []
    first_done = threading.Event()
    write_done = threading.Event()

    def two_queries(conn: sqlite3.Connection) -> list[str]:
        first = _keys(conn)
        first_done.set()
        assert write_done.wait(5)
        seen_second.append(_keys(conn))
        return first

    reader = asyncio.ensure_future(db.read(two_queries))
    while not first_done.is_set():
        await asyncio.sleep(0.001)
    await db.write(_insert("new"))
    write_done.set()
    assert await reader == []
    assert seen_second == [[]]  # same snapshot within one read()


# -- durability, close, backup -----------------------------------------------------------


async def test_data_survives_close_and_reopen(db_path: Path) -> None:
    db = await SqliteDatabase.open(db_path)
    await asyncio.gather(*(db.write(_insert(f"k{i}")) for i in range(10)))
    await db.close()
    assert not Path(f"{db_path}-wal").exists() or Path(f"{db_path}-wal").stat().st_size == 0
    db = await SqliteDatabase.open(db_path)
    try:
        assert len(await db.read(_keys)) == 10
    finally:
        await db.close()


async def test_close_drains_queue_then_refuses(db_path: Path) -> None:
    db = await SqliteDatabase.open(db_path)
    pending = [asyncio.ensure_future(db.write(_insert(f"k{i}"))) for i in range(50)]
    await asyncio.sleep(0)  # queued
    await db.close()
    assert len(await asyncio.gather(*pending)) == 50  # nothing queued before close is lost
    assert db.closed
    with pytest.raises(DatabaseClosed):
        await db.write(_insert("late"))
    with pytest.raises(DatabaseClosed):
        await db.read(_keys)
    with pytest.raises(DatabaseClosed):
        await db.backup(db_path.parent / "b.db")
    await db.close()  # idempotent
    db = await SqliteDatabase.open(db_path)
    try:
        assert len(await db.read(_keys)) == 50
    finally:
        await db.close()


async def test_concurrent_close_calls(db_path: Path) -> None:
    db = await SqliteDatabase.open(db_path)
    await asyncio.gather(db.close(), db.close(), db.close())
    assert db.closed


@pytest.mark.usefixtures("sqlite_only")
async def test_backup_is_consistent_and_openable(db: Database, tmp_path: Path) -> None:
    await asyncio.gather(*(db.write(_insert(f"k{i:03d}")) for i in range(100)))

    async def keep_writing() -> None:
        for i in range(100):
            await db.write(_insert(f"z{i:03d}"))

    writer = asyncio.ensure_future(keep_writing())
    dest = tmp_path / "backups" / "copy.db"
    await db.backup(dest)
    await writer
    assert dest.exists()
    assert not (tmp_path / "backups" / "copy.db.partial").exists()
    assert not Path(f"{dest}-wal").exists()
    conn = sqlite3.connect(dest)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        keys = [r[0] for r in conn.execute("SELECT key FROM settings ORDER BY key")]
        assert keys[:100] == [f"k{i:03d}" for i in range(100)]
        z = keys[100:]
        assert z == [f"z{i:03d}" for i in range(len(z))]  # a prefix: one snapshot
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == LATEST
    finally:
        conn.close()
    # The copy opens as a live database too.
    copy = await SqliteDatabase.open(dest)
    try:
        assert len(await copy.read(_keys)) == len(keys)
    finally:
        await copy.close()


@pytest.mark.usefixtures("sqlite_only")
async def test_backup_refuses_live_path(db: Database, db_path: Path) -> None:
    with pytest.raises(ValueError):
        await db.backup(db_path)


async def test_two_databases_on_one_file_serialize_writes(db_path: Path) -> None:
    a = await SqliteDatabase.open(db_path)
    b = await SqliteDatabase.open(db_path)
    try:
        await asyncio.gather(
            *(a.write(_insert(f"a{i}")) for i in range(50)),
            *(b.write(_insert(f"b{i}")) for i in range(50)),
        )
        assert len(await a.read(_keys)) == 100
    finally:
        await a.close()
        await b.close()


async def test_size_bytes(db: Database) -> None:
    assert db.size_bytes() > 0


async def test_read_passes_other_exceptions_through(db: Database) -> None:
    def boom(conn: sqlite3.Connection) -> None:
        raise KeyError("mine")

    with pytest.raises(KeyError):
        await db.read(boom)
    assert await db.read(_keys) == []  # the reader connection is still usable


async def test_cancelled_open_leaks_nothing(db_path: Path) -> None:
    def writers() -> int:
        return sum(t.name == "sovereign-db-writer" for t in threading.enumerate())

    before = writers()
    task = asyncio.ensure_future(SqliteDatabase.open(db_path))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):
        if writers() == before:
            break
        await asyncio.sleep(0.01)
    assert writers() == before


async def test_non_durable_batches_commit_without_fsync_and_durable_ones_with(
    db: Database, gate: Gate, engine: str
) -> None:
    def mode(conn: sqlite3.Connection) -> int:
        if engine == "postgres":  # synchronous_commit off / on, as NORMAL / FULL
            on = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()[0]
            return {"off": 1, "on": 2}[on]
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    assert await db.write(mode, durable=False) == 1  # NORMAL
    assert await db.write(mode) == 2  # FULL
    # One durable write makes its whole batch durable: hold the writer so that three
    # writes queue up behind the gate and form one batch.
    held = asyncio.ensure_future(db.write(gate.fn, durable=False))
    await gate.wait_entered()
    mixed = [
        asyncio.ensure_future(db.write(mode, durable=False)),
        asyncio.ensure_future(db.write(mode)),
        asyncio.ensure_future(db.write(mode, durable=False)),
    ]
    await asyncio.sleep(0.01)
    gate.release()
    assert await held == "gate"
    assert await asyncio.gather(*mixed) == [2, 2, 2]
    assert await db.write(mode, durable=False) == 1
