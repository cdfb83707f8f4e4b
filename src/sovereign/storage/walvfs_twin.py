"""Pure-Python twin of ``sovereign._fast.walvfs`` (same API; see storage/walvfs.py).

SQLite's VFS can only be extended in C: a twin in Python would run inside every write
SQLite makes, with the GIL released around it. So the twin registers nothing and says
so, and the writer keeps SQLite's default VFS, which writes the same database (two
writes per WAL frame, commits not aligned to pages of the WAL). It is what runs under
``SOVEREIGN_PURE=1`` or without a C compiler.
"""

from __future__ import annotations

#: :func:`install`'s answer: not an SQLite code; "this implementation cannot do it".
UNAVAILABLE = -2


def install(
    find_addr: int, register_addr: int, name: str, buffer_bytes: int, sector_bytes: int
) -> int:
    """Register nothing (see the module docstring): always :data:`UNAVAILABLE`."""
    del find_addr, register_addr, name, buffer_bytes, sector_bytes
    return UNAVAILABLE


def counters() -> tuple[int, int]:
    """(WAL writes SQLite asked for, writes passed on): nothing goes through here."""
    return 0, 0
