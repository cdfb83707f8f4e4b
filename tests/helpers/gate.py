"""A write that holds the database writer thread until released (storage tests, and
service tests that need a commit to stay pending)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading


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
