"""PostgreSQL: the same group-committing Database, over asyncpg (SPEC §11).

The stores' ``*_txn`` functions are synchronous and speak the ``sqlite3`` connection
API. Here each writer or reader thread owns one asyncpg connection and a private event
loop that never runs on its own: :class:`PgConnection` drives it with
``run_until_complete`` for each statement, so the functions run unchanged.

What the adapter does, and only this (see ``engines.py``):

- ``?`` placeholders become ``$1, $2, …`` once per distinct statement, and the
  statement is prepared once (asyncpg caches the plan server-side). A statement whose
  text differs per engine (``engines.per_engine``) is swapped for PostgreSQL's text
  at that moment.
- ``executemany`` is asyncpg's pipelined ``executemany``: one round trip per batch of
  rows, not one per row.
- Transaction control is deferred and merged: ``BEGIN``, ``SAVEPOINT batch_item`` and
  ``RELEASE batch_item`` are queued and sent in one simple-query round trip together
  with whatever comes next (the next item's SAVEPOINT, COMMIT); a write that ran no
  SQL costs nothing. The write that opens a transaction has no SAVEPOINT
  (``Database._run_batch``), so a batch of one write costs BEGIN and COMMIT, as many
  round trips as a bare transaction.
- ``rowcount`` comes from the command tag (``UPDATE 3``) or the rows returned.

Errors are asyncpg's (``asyncpg.PostgresError``) or, when the server is gone, its
interface and OS errors: the Database maps them all to DatabaseError, and the writer
reconnects before its next transaction when its connection was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from asyncpg.prepared_stmt import PreparedStatement

from sovereign.storage.database import (
    Database,
    Migration,
    ReaderPool,
    default_migrations,
    load_migrations,
    missing_migrations,
)
from sovereign.storage.engines import POSTGRES, variant
from sovereign.storage.errors import MigrationError, StorageError

log = logging.getLogger("sovereign.storage")

T = TypeVar("T")

#: Exceptions of the driver and of a lost server; they reach callers as DatabaseError.
PG_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    asyncio.TimeoutError,
)

#: A lock key for migrations (several processes may open one database at once).
_MIGRATION_LOCK = 0x50_56_45_52_45_49_47  # "SOVEREIG"
#: Prepared statements kept per connection before the cache starts over (dynamic SQL,
#: e.g. IN lists of every length, would otherwise grow it without bound).
STATEMENT_CACHE = 2048
#: How often the writer refreshes the database size for ``size_bytes`` (seconds).
SIZE_REFRESH_S = 10.0

_COMMAND_ROWS = re.compile(r"(\d+)$")


def to_dollar_params(sql: str) -> str:
    """``?`` -> ``$1, $2, …``, outside quoted strings, identifiers and comments."""
    out: list[str] = []
    n = 0
    i = 0
    size = len(sql)
    while i < size:
        c = sql[i]
        if c == "?":
            n += 1
            out.append(f"${n}")
        elif c in "'\"":
            j = sql.find(c, i + 1)
            while j != -1 and j + 1 < size and sql[j + 1] == c:  # doubled quote
                j = sql.find(c, j + 2)
            end = size if j == -1 else j + 1
            out.append(sql[i:end])
            i = end
            continue
        elif c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            end = size if j == -1 else j
            out.append(sql[i:end])
            i = end
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


class PgCursor:
    """What ``execute`` returns: the rows (already fetched) and ``rowcount``."""

    __slots__ = ("_pos", "_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self._pos = 0
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        if self._pos >= len(self._rows):
            return None
        row = self._rows[self._pos]
        self._pos += 1
        return row

    def fetchall(self) -> list[Any]:
        rows = self._rows[self._pos :]
        self._pos = len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        while self._pos < len(self._rows):
            row = self._rows[self._pos]
            self._pos += 1
            yield row


_EMPTY = PgCursor([], -1)

# Transaction control the adapter defers (see the module docstring).
_BEGIN = "BEGIN IMMEDIATE"
_SAVEPOINT = "SAVEPOINT batch_item"
_RELEASE = "RELEASE batch_item"
_ROLLBACK_TO = "ROLLBACK TO batch_item"
_CONTROL = frozenset({"BEGIN", _BEGIN, _SAVEPOINT, _RELEASE, _ROLLBACK_TO, "COMMIT", "ROLLBACK"})


class PgConnection:
    """A synchronous, ``sqlite3.Connection``-shaped view of one asyncpg connection.

    Used by one thread at a time (the writer, or whichever reader thread holds it).
    """

    def __init__(self, dsn: str, *, read_only: bool = False, connect_timeout: float = 10.0) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout
        self._loop = asyncio.new_event_loop()
        self._read_only = read_only
        self._conn: asyncpg.Connection[Any] | None = None
        self._stmts: dict[str, PreparedStatement[Any]] = {}
        self._pending: list[str] = []  # deferred transaction control, sent with the next
        self._session: list[str] = []  # deferred session settings (kept until sent)
        self._in_txn = False  # BEGIN seen (maybe not sent yet)
        self._sp_wanted = False  # SAVEPOINT batch_item seen, not sent
        self._sp_open = False  # SAVEPOINT batch_item sent, not released
        self._begin_sent = False
        self.connect()

    # -- connection ----------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def connect(self) -> None:
        conn: asyncpg.Connection[Any] = self._run(
            asyncpg.connect(self._dsn, timeout=self._timeout, statement_cache_size=0)
        )
        self._conn = conn
        self._stmts.clear()

    @property
    def raw(self) -> asyncpg.Connection[Any]:
        assert self._conn is not None
        return self._conn

    def run(self, coro_fn: Callable[[asyncpg.Connection[Any]], Coroutine[Any, Any, T]]) -> T:
        """Run ``coro_fn(asyncpg connection)`` on this connection's loop."""
        return self._run(coro_fn(self.raw))

    @property
    def broken(self) -> bool:
        return self._conn is None or self._conn.is_closed()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                self._run(conn.close(timeout=5))
            except Exception:
                conn.terminate()
        self._loop.close()

    # -- transaction state -----------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        return self._in_txn

    def _flush(self, extra: str | None = None) -> None:
        """Send deferred control statements (plus ``extra``) in one round trip."""
        if self._sp_wanted:
            self._pending.append(_SAVEPOINT)
            self._sp_wanted = False
            self._sp_open = True
        if extra is not None:
            self._pending.append(extra)
        if not self._pending and not self._session:
            return
        script = "; ".join(self._session + self._pending)
        self._pending.clear()
        self._session.clear()
        if self._in_txn:
            self._begin_sent = True
        self._run(self.raw.execute(script))

    def set_session(self, sql: str) -> None:
        """A session setting (``SET …``), sent with the next round trip; never dropped,
        even by a transaction that ends up sending nothing."""
        self._session.append(sql)

    def _control(self, sql: str) -> PgCursor:
        if sql in ("BEGIN", _BEGIN):
            if self._in_txn:
                raise asyncpg.InterfaceError("BEGIN inside a transaction")
            if self.broken:  # the server went away since the last transaction
                self.connect()
            self._in_txn = True
            self._begin_sent = False
            self._pending.append(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if self._read_only else "BEGIN"
            )
        elif sql == _SAVEPOINT:
            if self._sp_open:  # a SAVEPOINT inside an unreleased one: send it as asked
                self._flush(_SAVEPOINT)
            else:
                self._sp_wanted = True
        elif sql == _RELEASE:
            if self._sp_wanted:  # the write ran no SQL: nothing to release
                self._sp_wanted = False
            elif self._sp_open:
                self._pending.append(_RELEASE)
                self._sp_open = False
        elif sql == _ROLLBACK_TO:
            if self._sp_wanted:
                self._sp_wanted = False
            elif self._sp_open:
                # Sent now: the transaction is unusable until it is rolled back to here.
                self._pending.append(_ROLLBACK_TO)
                self._pending.append(_RELEASE)
                self._sp_open = False
                self._flush()
        elif sql == "COMMIT":
            self._sp_wanted = False
            try:
                if self._begin_sent:
                    self._flush("COMMIT")
                else:
                    self._pending.clear()  # nothing ran: no round trip at all
            finally:
                self._end_txn()
        else:  # ROLLBACK
            self._sp_wanted = False
            sent = self._begin_sent
            self._pending.clear()
            self._end_txn()
            if sent and not self.broken:
                self._run(self.raw.execute("ROLLBACK"))
        return _EMPTY

    def _end_txn(self) -> None:
        self._in_txn = False
        self._begin_sent = False
        self._sp_open = False
        self._sp_wanted = False

    # -- statements ------------------------------------------------------------------
    def _prepare(self, sql: str) -> PreparedStatement[Any]:
        stmt = self._stmts.get(sql)
        if stmt is None:
            if len(self._stmts) >= STATEMENT_CACHE:
                self._stmts.clear()
            text = to_dollar_params(variant(sql, POSTGRES.name))
            stmt = self._run(self.raw.prepare(text))
            self._stmts[sql] = stmt
        return stmt

    def execute(self, sql: str, params: Sequence[Any] = ()) -> PgCursor:
        if sql in _CONTROL:
            return self._control(sql)
        if self._pending or self._sp_wanted or self._session:
            self._flush()
        stmt = self._prepare(sql)
        rows = self._run(stmt.fetch(*params))
        if rows:
            return PgCursor(rows, len(rows))
        m = _COMMAND_ROWS.search(stmt.get_statusmsg() or "")
        return PgCursor(rows, int(m.group(1)) if m else -1)

    def executemany(self, sql: str, seq_of_params: Iterable[Sequence[Any]]) -> PgCursor:
        rows = [tuple(p) for p in seq_of_params]
        if not rows:
            return _EMPTY
        if self._pending or self._sp_wanted or self._session:
            self._flush()
        stmt = self._prepare(sql)
        self._run(stmt.executemany(rows))
        return PgCursor([], -1)


# -- migrations ---------------------------------------------------------------------


async def _apply_migrations(conn: asyncpg.Connection[Any], migrations: list[Migration]) -> int:
    """Apply each missing migration in its own transaction; returns the schema version.

    A session advisory lock serialises processes opening the same database at once
    (cluster mode): the second waits, then finds the migrations applied."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_us BIGINT NOT NULL)"
        )
        applied = {int(r[0]) for r in await conn.fetch("SELECT version FROM schema_version")}
        for m in missing_migrations(applied, migrations):
            log.info("applying migration %04d_%s (postgres)", m.version, m.name)
            try:
                async with conn.transaction():
                    await conn.execute(m.sql)  # a script: simple query protocol
                    await conn.execute(
                        "INSERT INTO schema_version (version, name, applied_at_us)"
                        " VALUES ($1, $2, $3)",
                        m.version,
                        m.name,
                        time.time_ns() // 1000,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {m.version:04d}_{m.name} failed: {exc}") from exc
            log.info("applied migration %04d_%s (postgres)", m.version, m.name)
            applied.add(m.version)
        return max(applied, default=0)
    finally:
        with contextlib.suppress(*PG_ERRORS):
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


# -- the database ------------------------------------------------------------------------


class PostgresDatabase(Database):
    """PostgreSQL with the SQLite Database's behaviour: one group-committing writer
    connection (a transaction per batch, a SAVEPOINT per write), reader connections
    running each read in one REPEATABLE READ, READ ONLY transaction (one snapshot)."""

    engine_name = "postgres"
    _db_errors = PG_ERRORS
    _READ_BEGIN = "BEGIN"

    def __init__(
        self,
        dsn: str,
        *,
        max_batch: int,
        readers: int,
        migrations: Traversable | Path,
        lazy_ms: float = 0.0,
    ) -> None:
        super().__init__(max_batch=max_batch, readers=readers, lazy_ms=lazy_ms)
        self.dsn = dsn
        self._migrations = migrations
        self._size = 0
        self._size_at = 0.0

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        max_batch: int = 512,
        readers: int = 2,
        migrations: Traversable | Path | None = None,
        lazy_ms: float = 0.0,
    ) -> PostgresDatabase:
        """Connect to the database named by ``dsn``, migrate it, start the writer."""
        if not dsn:
            raise StorageError("postgres_dsn is empty")
        mig = migrations if migrations is not None else default_migrations()
        db = cls(dsn, max_batch=max_batch, readers=readers, migrations=mig, lazy_ms=lazy_ms)
        await db._start()
        return db

    def _startup(self) -> None:
        conn = PgConnection(self.dsn)
        self._wconn = conn
        version = conn.raw.get_server_version()
        if (version.major, version.minor) < POSTGRES.min_version:
            want = ".".join(map(str, POSTGRES.min_version))
            raise StorageError(
                f"PostgreSQL {version.major}.{version.minor} is too old: need {want}+"
            )
        self.schema_version = conn.run(
            lambda c: _apply_migrations(c, load_migrations(self._migrations, POSTGRES.name))
        )
        self._refresh_size()
        for _ in range(self._n_readers):
            r = PgConnection(self.dsn, read_only=True)
            self._rconns.append(r)
            self._rfree.put(r)
        self._rpool = ReaderPool(self._n_readers, "sovereign-db-read")

    def _set_durable(self, conn: Any, durable: bool) -> None:
        # Session-level, outside the transaction; sent with the next round trip.
        conn.set_session(f"SET synchronous_commit TO {'on' if durable else 'off'}")

    def _refresh_size(self) -> None:
        conn = self._wconn
        if conn is None or conn.in_transaction or conn.broken:
            return
        with contextlib.suppress(*PG_ERRORS):
            self._size = int(
                conn.run(lambda c: c.fetchval("SELECT pg_database_size(current_database())"))
            )
            self._size_at = time.monotonic()

    def _run_batch(self, batch: list[Any], outcomes: list[Any]) -> None:
        super()._run_batch(batch, outcomes)
        if time.monotonic() - self._size_at > SIZE_REFRESH_S:
            self._refresh_size()

    def size_bytes(self) -> int:
        """The database's size (``pg_database_size``) as of at most ~10 s of writes ago."""
        return self._size

    async def backup(
        self, dest: str | Path, progress: Callable[[int, int], None] | None = None
    ) -> None:
        raise StorageError(BACKUP_HOWTO)


BACKUP_HOWTO = (
    "sovereign backup copies SQLite databases only; on PostgreSQL use pg_dump, e.g.\n"
    "  pg_dump --format=custom --file=sovereign.dump 'DSN'\n"
    "and restore into an empty database with\n"
    "  pg_restore --dbname='DSN' --no-owner sovereign.dump"
)
