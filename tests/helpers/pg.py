"""Throwaway PostgreSQL databases for tests (the machine's local server).

``SOVEREIGN_TEST_PG`` names the server to use as an admin DSN (default
``postgresql://postgres@127.0.0.1:5432/postgres``: trust auth, user postgres). Each
database is created with a unique name and dropped by whoever created it. Without a
server, tests that need one skip with the reason, except under ``CI=true`` where they
fail: CI must never silently skip the PostgreSQL half.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

T = TypeVar("T")

ADMIN_DSN = os.environ.get("SOVEREIGN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
#: Every test database's name starts with this (``.ci/run`` drops leftovers).
PREFIX = "sov_test_"

_available: bool | None = None
_why = ""


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh loop in another thread (safe to call from
    sync code that may itself run under an event loop)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["v"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller
            box["e"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]  # type: ignore[no-any-return]


async def _probe() -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=3)
    await conn.close()


def available() -> tuple[bool, str]:
    global _available, _why
    if _available is None:
        try:
            run_sync(_probe())
            _available = True
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            _available = False
            _why = f"no PostgreSQL at {_redacted(ADMIN_DSN)} ({type(exc).__name__}: {exc})"
    return _available, _why


def require() -> None:
    """Skip (fail under CI=true) when no PostgreSQL server answers."""
    ok, why = available()
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; CI must run the PostgreSQL tests (.ci/run starts a server)")
    pytest.skip(why)


def _redacted(dsn: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{parts.username or ''}@{host}{port}", parts.path, "", ""))


def dsn_for(name: str) -> str:
    parts = urlsplit(ADMIN_DSN)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


def create_database() -> tuple[str, str]:
    """A new empty database: (name, dsn)."""
    require()
    name = f"{PREFIX}{os.getpid()}_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    run_sync(create())
    return name, dsn_for(name)


def drop_database(name: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    run_sync(drop())


async def truncate_all(dsn: str) -> None:
    """Empty every table but schema_version (fast isolation between tests)."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r[0]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                " AND tablename <> 'schema_version'"
            )
        ]
        if tables:
            await conn.execute(
                "TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE"
            )
    finally:
        await conn.close()
