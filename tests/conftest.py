"""Shared fixtures. Integration tests start the real server on 127.0.0.1 with a
temporary data directory; nothing stands in for the server, SQLite or WebAuthn."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.helpers import pg
from tests.helpers.gate import Gate
from tests.helpers.server import RunningServer, running_server

# Async tests run on uvloop (what production uses). SOVEREIGN_TEST_LOOP=asyncio runs
# them on the stdlib loop instead, =both runs every async test on each.
_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    choice = os.environ.get("SOVEREIGN_TEST_LOOP", "uvloop")
    if choice == "both":
        if item.get_closest_marker("server_in_subprocess"):
            # Its servers are child processes on uvloop whatever the test runs on: a
            # second pass would run only the test's own driver on the stdlib loop (the
            # crash, cluster and CLI tests: ~1.5 of CI's minutes on a fast machine).
            return {"uvloop": _LOOPS["uvloop"]}
        return dict(_LOOPS)
    return {choice: _LOOPS[choice]}


@pytest.fixture(autouse=pg.STORAGE == "postgres")
def _drop_pg_databases() -> Iterator[None]:
    """SOVEREIGN_TEST_STORAGE=postgres: drop the databases this test's servers used."""
    yield
    pg.drop_test_databases()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with running_server(tmp_path / "data") as srv:
        yield srv


@pytest.fixture
def server_with(
    tmp_path: Path,
) -> Callable[..., AbstractAsyncContextManager[RunningServer]]:
    """``async with server_with(auth_timeout=1) as srv:`` for per-test limits."""
    counter = iter(range(1000))

    def make(**overrides: Any) -> AbstractAsyncContextManager[RunningServer]:
        return running_server(tmp_path / f"data{next(counter)}", **overrides)

    return make


@pytest.fixture
def gate() -> Iterator[Gate]:
    """A write that holds the database writer thread (storage and service tests)."""
    g = Gate()
    yield g
    g.release()  # never leave the writer blocked if a test fails
