"""Commits on the event loop (``Database(inline_ms=...)``, SQLite): a batch sent with
``hold``/``release`` commits right there while the writer thread is idle and durable
commits are quick; otherwise it goes to the thread as before. Non-durable writes wait
on the loop for a durable batch to share its commit. Real SQLite files throughout."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sovereign.storage import DatabaseClosed, DatabaseError, SqliteDatabase
from tests.helpers.gate import Gate


def _insert(key: str, where: list[str] | None = None) -> Callable[[sqlite3.Connection], str]:
    """Adds one settings row; records the thread it ran on in ``where``."""

    def fn(conn: sqlite3.Connection) -> str:
        if where is not None:
            where.append(threading.current_thread().name)
        conn.execute("INSERT INTO settings (key, value) VALUES (?, '1')", (key,))
        return key

    return fn


def _keys(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT key FROM settings ORDER BY key")]


def _sync_mode(where: list[int]) -> Callable[[sqlite3.Connection], None]:
    def fn(conn: sqlite3.Connection) -> None:
        where.append(int(conn.execute("PRAGMA synchronous").fetchone()[0]))

    return fn


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SqliteDatabase]:
    d = await SqliteDatabase.open(tmp_path / "sovereign.db", inline_ms=50, lazy_ms=50)
    try:
        yield d
    finally:
        await d.close()


def _held(db: SqliteDatabase, *writes: tuple[Callable[..., Any], bool]) -> list[Any]:
    db.hold()
    try:
        return [db.submit(fn, durable=durable) for fn, durable in writes]
    finally:
        db.release()


async def test_a_held_batch_commits_on_the_loop_while_the_writer_is_idle(
    db: SqliteDatabase,
) -> None:
    where: list[str] = []
    futs = _held(db, (_insert("a", where), True), (_insert("b", where), False))
    # Committed before release() returned: no await in between.
    assert [f.done() for f in futs] == [True, True]
    assert [f.result() for f in futs] == ["a", "b"]
    assert where == [threading.current_thread().name] * 2
    assert db.inline_batches == 1
    assert db.stats().batches_committed == 1  # one transaction for both
    assert await db.read(_keys) == ["a", "b"]


async def test_a_held_batch_goes_to_the_writer_thread_while_it_is_busy(
    db: SqliteDatabase,
) -> None:
    gate = Gate()
    first = asyncio.ensure_future(db.write(gate.fn))
    await gate.wait_entered()
    where: list[str] = []
    (fut,) = _held(db, (_insert("a", where), True))
    assert not fut.done()
    gate.release()
    assert await first == "gate"
    assert await fut == "a"
    assert where == ["sovereign-db-writer"]
    assert db.inline_batches == 0
    # The thread is idle again: the next batch commits on the loop.
    (fut,) = _held(db, (_insert("b", where), True))
    assert fut.done() and where[-1] == threading.current_thread().name


async def test_after_a_slow_durable_commit_the_next_goes_to_the_writer_thread(
    db: SqliteDatabase,
) -> None:
    def slow(conn: sqlite3.Connection) -> str:
        time.sleep(0.08)  # longer than inline_ms (50 ms): a slow disk, say
        return "slow"

    (fut,) = _held(db, (slow, True))
    assert fut.result() == "slow"  # on the loop: it could not know beforehand
    where: list[str] = []
    (fut,) = _held(db, (_insert("a", where), True))
    assert await fut == "a"
    assert where == ["sovereign-db-writer"]
    # That one was quick: commits come back to the loop.
    (fut,) = _held(db, (_insert("b", where), True))
    assert fut.done() and where[-1] == threading.current_thread().name
    assert db.inline_batches == 2


async def test_a_slow_non_durable_commit_does_not_move_commits_off_the_loop(
    db: SqliteDatabase,
) -> None:
    def slow(conn: sqlite3.Connection) -> None:
        time.sleep(0.08)

    (fut,) = _held(db, (slow, False))  # no fsync: it says nothing about the disk
    assert fut.done()
    where: list[str] = []
    (fut,) = _held(db, (_insert("a", where), True))
    assert fut.done() and where == [threading.current_thread().name]


async def test_the_checkpointers_last_round_sends_the_batch_to_the_thread(
    db: SqliteDatabase,
) -> None:
    # The checkpointer holds the gate for its last round, between two batches: the loop
    # must not wait for it, so the batch goes to the thread, which does.
    gate = db._batch_gate
    gate.acquire()
    try:
        where: list[str] = []
        (fut,) = _held(db, (_insert("a", where), True))
        await asyncio.sleep(0.05)
        assert not fut.done()
    finally:
        gate.release()
    assert await fut == "a"
    assert where == ["sovereign-db-writer"]


async def test_a_failing_write_in_a_loop_commit_fails_alone(db: SqliteDatabase) -> None:
    def boom(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO settings (key, value) VALUES ('x', '1')")
        raise ValueError("boom")

    def bad_sql(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    futs = _held(db, (_insert("a"), True), (boom, True), (bad_sql, True), (_insert("b"), True))
    assert all(f.done() for f in futs)
    assert futs[0].result() == "a" and futs[3].result() == "b"
    with pytest.raises(ValueError, match="boom"):
        futs[1].result()
    with pytest.raises(DatabaseError, match="no_such_table"):
        futs[2].result()
    assert await db.read(_keys) == ["a", "b"]  # boom's own row was undone


async def test_a_lone_write_that_fails_on_the_loop_rolls_back(db: SqliteDatabase) -> None:
    def boom(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO settings (key, value) VALUES ('x', '1')")
        raise ValueError("boom")

    (fut,) = _held(db, (boom, True))
    with pytest.raises(ValueError, match="boom"):
        fut.result()
    (fut,) = _held(db, (_insert("a"), True))
    assert fut.result() == "a"
    assert await db.read(_keys) == ["a"]


async def test_non_durable_writes_wait_on_the_loop_for_a_durable_batch(
    db: SqliteDatabase,
) -> None:
    (first,) = _held(db, (_insert("first"), True))  # durable writes are coming
    assert first.result() == "first"
    batches = db.stats().batches_committed
    modes: list[int] = []
    lazy = db.submit(_sync_mode(modes), durable=False)
    await asyncio.sleep(0.01)  # well within lazy_ms (50 ms)
    assert not lazy.done()
    (durable,) = _held(db, (_insert("a"), True))
    # Both in the durable batch's commit, on the loop, the lazy write first.
    assert lazy.done() and durable.done()
    assert modes == [2]  # FULL: it shared the durable commit
    assert db.stats().batches_committed == batches + 1


async def test_non_durable_writes_alone_commit_after_lazy_ms_without_fsync(
    db: SqliteDatabase,
) -> None:
    await db.write(_insert("first"))  # durable writes are coming: the lazy wait applies
    modes: list[int] = []
    t0 = time.monotonic()
    await db.write(_sync_mode(modes), durable=False)
    assert time.monotonic() - t0 >= 0.045  # waited lazy_ms for company
    assert modes == [1]  # NORMAL: alone, no fsync


async def test_at_a_quiet_time_a_non_durable_write_does_not_wait(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "q.db", inline_ms=50, lazy_ms=2000)
    try:
        t0 = time.monotonic()
        await db.write(_insert("a"), durable=False)  # no durable write lately
        assert time.monotonic() - t0 < 1.0
    finally:
        await db.close()


async def test_close_commits_the_non_durable_writes_still_waiting(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = await SqliteDatabase.open(path, inline_ms=50, lazy_ms=5000)
    await db.write(_insert("first"))
    lazy = db.submit(_insert("waiting"), durable=False)
    assert not lazy.done()
    await db.close()
    assert lazy.result() == "waiting"
    with pytest.raises(DatabaseClosed):
        db.submit(_insert("late"), durable=False)
    db = await SqliteDatabase.open(path)
    try:
        assert await db.read(_keys) == ["first", "waiting"]
    finally:
        await db.close()


async def test_a_held_batch_after_close_is_refused(db: SqliteDatabase) -> None:
    db.hold()
    fut = db.submit(_insert("a"))
    await db.close()
    db.release()
    with pytest.raises(DatabaseClosed):
        fut.result()


async def test_inline_ms_zero_keeps_every_commit_on_the_thread(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "t.db", inline_ms=0, lazy_ms=50)
    try:
        where: list[str] = []
        (fut,) = _held(db, (_insert("a", where), True))
        assert await fut == "a"
        lazy = db.submit(_insert("b", where), durable=False)
        assert await lazy == "b"
        assert where == ["sovereign-db-writer"] * 2
        assert db.inline_batches == 0
    finally:
        await db.close()


async def test_a_long_write_runs_on_the_writer_thread_even_when_held(db: SqliteDatabase) -> None:
    where: list[str] = []
    db.hold()
    try:
        fut = db.submit(_insert("fold", where), durable=False, long=True)
    finally:
        db.release()
    assert await fut == "fold"
    assert await db.write(_insert("alone", where), durable=False, long=True) == "alone"
    assert where == ["sovereign-db-writer"] * 2
    assert db.inline_batches == 0
