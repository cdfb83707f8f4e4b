"""Storage fixtures: ``db`` and ``storage`` run every test on both engines.

SQLite gets a fresh file per test. PostgreSQL gets one throwaway database per test
session (created, migrated once, dropped at the end: tests/helpers/pg.py), emptied
before each test by one DELETE script: measured here ~30-50 ms, against ~900 ms for
TRUNCATE and more for a new database per test. A test that is inherently SQLite's
(file pragmas, the backup file) asks for ``sqlite_only``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sovereign.storage import Database, SqliteDatabase, Storage, open_storage
from sovereign.storage.postgres import PostgresDatabase
from tests.helpers import pg

# Under SOVEREIGN_TEST_STORAGE=postgres (make test-postgres) only PostgreSQL: the
# main pass already ran both.
ENGINES = ["postgres"] if pg.STORAGE == "postgres" else ["sqlite", "postgres"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def pg_session_dsn() -> Iterator[str]:
    """One migrated database for the whole session (dropped at the end)."""
    name, dsn = pg.create_database()

    async def migrate() -> None:
        await (await PostgresDatabase.connect(dsn, readers=1)).close()

    try:
        pg.run_sync(migrate())
        yield dsn
    finally:
        pg.drop_database(name)


@pytest.fixture
def pg_dsn(pg_session_dsn: str) -> str:
    """The session database, empty (every table truncated)."""
    pg.run_sync(pg.truncate_all(pg_session_dsn))
    return pg_session_dsn


@pytest.fixture
def engine_dsn(engine: str, request: pytest.FixtureRequest) -> str:
    """The PostgreSQL DSN when the engine is PostgreSQL, else "" (SQLite)."""
    return str(request.getfixturevalue("pg_dsn")) if engine == "postgres" else ""


@pytest.fixture
def sqlite_only(engine: str) -> None:
    if engine != "sqlite":
        pytest.skip("SQLite-specific (file, pragmas or its backup API)")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "sovereign.db"


@pytest.fixture
async def db(engine_dsn: str, db_path: Path) -> AsyncIterator[Database]:
    if engine_dsn:
        d: Database = await PostgresDatabase.connect(engine_dsn)
    else:
        d = await SqliteDatabase.open(db_path)
    try:
        yield d
    finally:
        await d.close()


@pytest.fixture
async def storage(engine_dsn: str, db_path: Path) -> AsyncIterator[Storage]:
    s = await open_storage(db_path, postgres_dsn=engine_dsn)
    try:
        yield s
    finally:
        await s.close()
