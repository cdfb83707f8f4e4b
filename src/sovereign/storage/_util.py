"""Small helpers shared by the stores."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sovereign.storage.database import Conn

#: Ids per statement in an IN-list: well under SQLite's and PostgreSQL's parameter limits.
IN_CHUNK = 500


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
