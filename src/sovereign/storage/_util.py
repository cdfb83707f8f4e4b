"""Small helpers shared by the stores."""

from __future__ import annotations


def like_pattern(term: str) -> str:
    """A ``LIKE … ESCAPE '\\'`` pattern matching ``term`` anywhere, wildcards escaped."""
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def clamp_page(offset: int, limit: int, max_limit: int = 1000) -> tuple[int, int]:
    """Sanitise paging arguments (SPEC §10 lists: offset, limit)."""
    return max(0, int(offset)), max(0, min(int(limit), max_limit))
