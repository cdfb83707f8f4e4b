"""``_util.insert_rows``: many rows per SQLite statement, with executemany's effect.

The writer inserts a batch's events, idempotency keys and delivery positions with it;
each must end exactly as executemany would leave it, upserts that meet the same key
twice in one batch included, at every chunk boundary.
"""

from __future__ import annotations

import sqlite3

import pytest

from sovereign.storage._util import ROWS_CHUNK, insert_rows

# The shape of the delivery-position upsert: the larger position wins.
UPSERT = (
    "INSERT INTO pos (k, dev, seq) VALUES (?, ?, ?)"
    " ON CONFLICT (k, dev) DO UPDATE SET seq = max(pos.seq, excluded.seq)"
)


def _db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE pos (k TEXT, dev TEXT, seq INTEGER, PRIMARY KEY (k, dev))")
    return conn


def _rows(n: int) -> list[tuple[str, str, int]]:
    """``n`` rows over a few keys, so that keys repeat inside a chunk and across chunks,
    with positions that go down as well as up."""
    return [(f"c{i % 5}", f"d{i % 3}", (i * 7919) % 101) for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, 2, ROWS_CHUNK - 1, ROWS_CHUNK, ROWS_CHUNK + 1, 40])
def test_the_same_table_as_executemany(n: int) -> None:
    rows = _rows(n)
    ours, theirs = _db(), _db()
    insert_rows(ours, UPSERT, rows)
    theirs.executemany(UPSERT, rows)
    q = "SELECT k, dev, seq FROM pos ORDER BY k, dev"
    assert ours.execute(q).fetchall() == theirs.execute(q).fetchall()
    if n:
        assert ours.execute("SELECT count(*) FROM pos").fetchone()[0] > 0


def test_one_statement_per_chunk() -> None:
    conn = _db()
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    insert_rows(conn, UPSERT, _rows(2 * ROWS_CHUNK + 3))
    assert len(seen) == 3
    # The trace shows each statement with its values bound: one 'cN' key per row.
    assert [s.count("('c") for s in seen] == [ROWS_CHUNK, ROWS_CHUNK, 3]


def test_a_failing_chunk_raises_like_executemany() -> None:
    """A key met twice fails the statement with executemany's error; the writer runs
    it inside a transaction, and rolling that back leaves nothing of the batch."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    conn.execute("BEGIN")
    with pytest.raises(sqlite3.IntegrityError, match=r"UNIQUE constraint failed: t\.k"):
        insert_rows(conn, "INSERT INTO t (k) VALUES (?)", [(1,), (2,), (1,)])
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_not_a_one_row_insert_is_refused() -> None:
    with pytest.raises(ValueError, match="one-row INSERT"):
        insert_rows(_db(), "DELETE FROM pos WHERE k = ?", [("a",), ("b",)])
