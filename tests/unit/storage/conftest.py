from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
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


class Gate:
    """A write that holds the writer thread until released, so later writes queue up
    behind it and form one batch."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def fn(self, conn: sqlite3.Connection) -> str:
        self.entered.set()
        assert self.released.wait(10), "gate never released"
        return "gate"

    async def wait_entered(self) -> None:
        for _ in range(10_000):
            if self.entered.is_set():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("gate write never started")

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release()  # never leave the writer blocked if a test fails
