from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sovereign.storage import Database, Storage, open_storage


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "sovereign.db"


@pytest.fixture
async def db(db_path: Path) -> AsyncIterator[Database]:
    d = await Database.open(db_path)
    try:
        yield d
    finally:
        await d.close()


@pytest.fixture
async def storage(db_path: Path) -> AsyncIterator[Storage]:
    s = await open_storage(db_path)
    try:
        yield s
    finally:
        await s.close()
