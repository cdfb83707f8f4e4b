"""Throwaway PostgreSQL databases for tests (the machine's local server).

``SOVEREIGN_TEST_PG`` names the server to use as an admin DSN (default
``postgresql://postgres@127.0.0.1:5432/postgres``: trust auth, user postgres). Each
database is created with a unique name and dropped by whoever created it. Without a
server, tests that need one skip with the reason, except under ``CI=true`` where they
fail: CI must never silently skip the PostgreSQL half.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import uuid
from collections.abc import Coroutine
from pathlib import Path
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
    """Empty every table but schema_version (fast isolation between tests).

    DELETE, not TRUNCATE: on tables this small TRUNCATE's new files and fsyncs cost
    ~900 ms per test here, DELETE a few ms (every foreign key cascades or nulls)."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r[0]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                " AND tablename <> 'schema_version'"
            )
        ]
        sequences = [
            r[0]
            for r in await conn.fetch(
                "SELECT sequencename FROM pg_sequences WHERE schemaname = current_schema()"
            )
        ]
        script = ["SET synchronous_commit TO off", "BEGIN"]
        script += [f'DELETE FROM "{t}"' for t in tables]
        script += [f'ALTER SEQUENCE "{q}" RESTART' for q in sequences]
        await conn.execute("; ".join([*script, "COMMIT"]))
    finally:
        await conn.close()


# -- the integration suite on PostgreSQL (SOVEREIGN_TEST_STORAGE=postgres) -------------

#: "postgres" runs every test server on a throwaway PostgreSQL database.
STORAGE = os.environ.get("SOVEREIGN_TEST_STORAGE", "sqlite")
_template: str | None = None
#: data dir -> (database name, dsn), created during the current test.
_by_data_dir: dict[str, tuple[str, str]] = {}


def _migrated_template() -> str:
    """A migrated database that new ones are copied from (CREATE DATABASE … TEMPLATE:
    no migration run per test server). Dropped at exit."""
    global _template
    if _template is None:
        from sovereign.storage.postgres import PostgresDatabase

        name, dsn = create_database()

        async def migrate() -> None:
            await (await PostgresDatabase.connect(dsn, readers=1)).close()

        run_sync(migrate())
        _template = name
        atexit.register(drop_database, name)
    return _template


def database_for(data_dir: Path | str) -> str:
    """The DSN of the database standing for ``data_dir`` (a restart of a server on the
    same data dir finds its data again). Dropped by :func:`drop_test_databases`."""
    key = str(Path(data_dir).resolve())
    found = _by_data_dir.get(key)
    if found is not None:
        return found[1]
    template = _migrated_template()
    name = f"{PREFIX}{os.getpid()}_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        finally:
            await conn.close()

    run_sync(create())
    _by_data_dir[key] = (name, dsn_for(name))
    return dsn_for(name)


def server_env(data_dir: Path | str) -> dict[str, str]:
    """Environment for a ``sovereign`` child process on ``data_dir``'s database."""
    if STORAGE != "postgres":
        return {}
    return {"SOVEREIGN_STORAGE": "postgres", "SOVEREIGN_POSTGRES_DSN": database_for(data_dir)}


def stored_bytes(dsn: str) -> bytes:
    """Every value of every table, raw (bytea as its bytes): for "no plaintext is
    stored" checks, PostgreSQL's counterpart of reading the SQLite files."""

    async def dump() -> bytes:
        conn = await asyncpg.connect(dsn)
        out = bytearray()
        try:
            for (table,) in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            ):
                for row in await conn.fetch(f'SELECT * FROM "{table}"'):
                    for v in row.values():
                        if isinstance(v, bytes):
                            out += v
                        elif v is not None:
                            out += str(v).encode()
        finally:
            await conn.close()
        return bytes(out)

    return run_sync(dump())


def sqlite_only(why: str) -> pytest.MarkDecorator:
    """Skip under SOVEREIGN_TEST_STORAGE=postgres: the test is about SQLite's files."""
    return pytest.mark.skipif(STORAGE == "postgres", reason=f"SQLite-specific: {why}")


def drop_test_databases() -> None:
    while _by_data_dir:
        _, (name, _) = _by_data_dir.popitem()
        drop_database(name)


def drop_leftovers() -> list[str]:
    """Drop test databases whose creating process is gone (a killed test run);
    databases of live processes (another run on this machine) are left alone."""

    async def sweep() -> list[str]:
        conn = await asyncpg.connect(ADMIN_DSN)
        dropped: list[str] = []
        try:
            for r in await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1", PREFIX + "%"
            ):
                name = str(r[0])
                pid = name[len(PREFIX) :].split("_", 1)[0]
                if pid.isdigit() and _alive(int(pid)):
                    continue
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                dropped.append(name)
        finally:
            await conn.close()
        return dropped

    return run_sync(sweep())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":  # .ci/run: python -m tests.helpers.pg
    ok, why = available()
    if not ok:
        raise SystemExit(why)
    for n in drop_leftovers():
        print(f"dropped leftover test database {n}")
