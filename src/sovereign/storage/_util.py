"""Small helpers shared by the stores."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sovereign.storage.database import Conn

#: Ids per statement in an IN-list: well under SQLite's and PostgreSQL's parameter limits.
IN_CHUNK = 500
#: Rows per statement when SQLite inserts many (:func:`insert_rows`): at most this many
#: statement texts per INSERT (one per row count), and 16 x 7 parameters per statement.
ROWS_CHUNK = 16


def like_pattern(term: str) -> str:
    """A ``LIKE … ESCAPE '\\'`` pattern matching ``term`` anywhere, wildcards escaped."""
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def clamp_page(offset: int, limit: int, max_limit: int = 1000) -> tuple[int, int]:
    """Sanitise paging arguments (SPEC §10 lists: offset, limit)."""
    return max(0, int(offset)), max(0, min(int(limit), max_limit))


def rows_in(conn: Conn, sql: str, ids: Sequence[str]) -> Iterator[Any]:
    """The rows of ``sql`` for every id in ``ids``: ``{marks}`` in ``sql`` is where the
    IN-list goes, one statement per ``IN_CHUNK`` ids."""
    for i in range(0, len(ids), IN_CHUNK):
        chunk = ids[i : i + IN_CHUNK]
        yield from conn.execute(sql.format(marks=",".join("?" * len(chunk))), chunk)


def insert_rows(conn: Conn, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """``conn.executemany(sql, rows)`` for a one-row ``INSERT ... VALUES (?, ...) [ON
    CONFLICT ...]``, which SQLite runs as statements of up to :data:`ROWS_CHUNK` rows.

    Why: executemany binds and steps once per row, from Python, letting go of the GIL
    around each step; one statement per chunk does a batch's rows in one call. Measured
    (docs/performance.md, seventh session): ``send_batched`` (50 rows per commit) -7%
    of instructions; at 1,000 msgs/s (~4 rows per commit) nothing the load tool can see,
    and the writer's context switches did not fall.

    Inside a transaction, where the stores run it, the effect is executemany's: SQLite
    inserts the rows of a VALUES list one after another, each upsert seeing the rows
    before it, and a failing row fails the call (outside one, a failing chunk would also
    undo its earlier rows, where executemany keeps them). PostgreSQL keeps executemany
    (a statement's upsert may not meet the same key twice there, and its executemany is
    already one pipelined round trip)."""
    n = len(rows)
    if not n:
        return
    if not isinstance(conn, sqlite3.Connection):
        conn.executemany(sql, rows)
        return
    if n == 1:
        conn.execute(sql, rows[0])
        return
    for i in range(0, n, ROWS_CHUNK):
        chunk = rows[i : i + ROWS_CHUNK]
        # chain, not a comprehension: the values are copied in C, not one opcode loop
        # per value (8 per event row: ~46 opcodes per message in send_batched).
        conn.execute(_multi_row(sql, len(chunk)), tuple(chain.from_iterable(chunk)))


_MULTI: dict[tuple[str, int], str] = {}


def _multi_row(sql: str, n: int) -> str:
    """``sql`` (one ``VALUES (...)`` group) with its group repeated ``n`` times."""
    key = (sql, n)
    text = _MULTI.get(key)
    if text is None:
        head, sep, rest = sql.partition(" VALUES (")
        group, close, tail = rest.partition(")")
        if not sep or not close:
            raise ValueError(f"not a one-row INSERT ... VALUES (...): {sql!r}")
        row = f"({group})"
        text = _MULTI[key] = f"{head} VALUES {', '.join([row] * n)}{tail}"
    return text
