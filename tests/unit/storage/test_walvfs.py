"""WAL write coalescing (storage/walvfs.py, _fast/walvfs.h): fewer writes, the same
bytes, every commit in the file before anyone else can see it, and nothing that was
acknowledged lost when the process is killed."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sovereign.storage import walvfs
from sovereign.storage.database import SqliteDatabase
from tests.helpers.twins import load_twin

Conn = sqlite3.Connection


@pytest.fixture(autouse=True)
def _compiled() -> None:
    """A missing shim would make every test here pass on the default VFS: fail instead,
    unless a pure-Python install is intended (tests/helpers/twins.py's rule)."""
    if walvfs.install() is None:
        if os.environ.get("SOVEREIGN_ALLOW_PURE") == "1":
            pytest.skip("WAL coalescing not available (SOVEREIGN_ALLOW_PURE=1)")
        pytest.fail("WAL coalescing is not available: build the extensions (make install)")


def _schema(conn: Conn) -> None:
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB)")
    conn.execute("CREATE TABLE h (k TEXT PRIMARY KEY, n INTEGER) STRICT, WITHOUT ROWID")


def _rows(rng: random.Random, n: int, size: int) -> list[tuple[str, bytes]]:
    return [(f"{rng.getrandbits(64):016x}", rng.randbytes(size)) for _ in range(n)]


async def test_a_commit_reaches_the_file_in_page_sized_writes(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "a.db", checkpoint_s=0)
    try:
        assert db.wal_coalesced
        await db.write(_schema)
        rng = random.Random(1)
        asked0, calls0 = walvfs.counters()
        for _ in range(100):  # ~4 KiB of rows per commit: several 1 KiB pages
            batch = _rows(rng, 10, 300)
            await db.write(
                lambda c, b=batch: c.executemany("INSERT INTO t (k, v) VALUES (?, ?)", b)
            )
        asked, calls = walvfs.counters()
        asked, calls = asked - asked0, calls - calls0
        # SQLite asked for two writes per frame; the file got one per 4 KiB page touched
        assert asked >= 100 * 2 * 4, asked
        assert calls <= asked / 3, (asked, calls)
        assert await db.read(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 1000
    finally:
        await db.close()


async def test_without_the_shim_nothing_goes_through_it(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "b.db", checkpoint_s=0, coalesce_wal=False)
    try:
        assert not db.wal_coalesced
        before = walvfs.counters()
        await db.write(_schema)
        await db.write(lambda c: c.execute("INSERT INTO t (k, v) VALUES ('a', x'00')"))
        assert walvfs.counters() == before
    finally:
        await db.close()


@pytest.mark.parametrize("durable", [True, False], ids=["FULL", "NORMAL"])
async def test_every_commit_is_visible_to_other_connections_at_once(
    tmp_path: Path, durable: bool
) -> None:
    """A NORMAL commit has no fsync, so no xSync tells the shim to write: the commit
    frame itself must. Another connection (default VFS, its own file handle) reads
    each row as soon as the write that stored it has returned."""
    path = tmp_path / "c.db"
    db = await SqliteDatabase.open(path, checkpoint_s=0)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await db.write(_schema)
        for i in range(200):
            await db.write(
                lambda c, i=i: c.execute(
                    "INSERT INTO t (k, v) VALUES (?, ?)", (str(i), bytes(500))
                ),
                durable=durable,
            )
            got = other.execute("SELECT count(*), max(id) FROM t").fetchone()
            assert got == (i + 1, i + 1)
    finally:
        other.close()
        await db.close()


def _wal_end_in_page(path: Path) -> int:
    """Where the WAL's last frame ends, counted from the start of its 4 KiB page (a
    fresh WAL that only grows: its size is where SQLite's frames end)."""
    return os.path.getsize(f"{path}-wal") % walvfs.SECTOR_BYTES


@pytest.mark.parametrize("coalesce", [True, False], ids=["shim", "default-VFS"])
async def test_a_durable_commit_ends_on_a_page_of_the_wal(tmp_path: Path, coalesce: bool) -> None:
    """Each synced commit is padded (SQLite's copies of its last frame) until its last
    frame reaches the next 4 KiB boundary, so the next commit starts on a page that no
    fsync has written yet; a NORMAL commit is not padded. Without the shim a commit
    ends anywhere in a page (about a quarter of them within a frame of a boundary)."""
    path = tmp_path / "p.db"
    db = await SqliteDatabase.open(path, checkpoint_s=0, coalesce_wal=coalesce)
    frame = 1024 + 24  # engines.PAGE_SIZE, the writer's page size, plus the frame header
    try:
        await db.write(_schema)
        rng = random.Random(5)
        aligned = {True: 0, False: 0}
        commits = {True: 0, False: 0}
        for i in range(120):
            durable = i % 3 != 0
            rows = _rows(rng, rng.choice([1, 3, 12]), rng.choice([40, 300]))
            await db.write(
                lambda c, r=rows: c.executemany("INSERT INTO t (k, v) VALUES (?, ?)", r),
                durable=durable,
            )
            commits[durable] += 1
            # the last frame crossed (or ended on) a 4 KiB boundary
            aligned[durable] += _wal_end_in_page(path) < frame
        if coalesce:
            assert aligned[True] == commits[True] == 80
        else:
            assert aligned[True] < commits[True] * 0.6, aligned
        assert aligned[False] < commits[False] * 0.6, aligned  # NORMAL: never padded
    finally:
        await db.close()


@pytest.mark.parametrize("size", [40, 300, 1000])
async def test_a_durable_commit_is_whole_in_the_file_when_published(
    tmp_path: Path, size: int
) -> None:
    """SQLite writes the padding frame that crosses the 4 KiB boundary in two parts with
    the fsync between them, and publishes the commit after the second: that part must
    be in the file by then, whether the boundary falls in the frame's header or in its
    page. Another connection (default VFS, its own file handle) reads every row, the
    last page written (the one the padding repeats) included, after each commit."""
    path = tmp_path / "w.db"
    db = await SqliteDatabase.open(path, checkpoint_s=0)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await db.write(_schema)
        rng = random.Random(size)
        expected: dict[str, bytes] = {}
        for _ in range(150):
            rows = _rows(rng, rng.randrange(1, 4), size)
            await db.write(lambda c, r=rows: c.executemany("INSERT INTO t (k, v) VALUES (?, ?)", r))
            expected.update(rows)
            got = dict(other.execute("SELECT k, v FROM t").fetchall())
            assert got == expected
    finally:
        other.close()
        await db.close()


def _wal_connection(path: Path, *, shim: bool) -> Conn:
    """A connection in WAL mode with 1 KiB pages and no automatic checkpoint, through the
    shim or on SQLite's default VFS, with the table ``t`` (id, v)."""
    if shim:
        uri, on = walvfs.writer_uri(path, True)
        assert on
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA page_size = 1024")  # a no-op once the file has pages
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
    return conn


def test_a_wal_begun_elsewhere_is_written_through_until_its_header_is_seen(
    tmp_path: Path,
) -> None:
    """The shim finds frames from the WAL header's page size. Joining a WAL that another
    connection began (the wal-index already valid, so SQLite never reads the file's
    header), it has none: it buffers nothing, every write goes straight to the file,
    and nothing is lost. Once the WAL starts over (its header written through the
    shim) it gathers again."""
    path = tmp_path / "j.db"
    first = _wal_connection(path, shim=False)
    first.execute("INSERT INTO t (v) VALUES (x'00')")  # the WAL has begun, with frames
    shim = _wal_connection(path, shim=True)
    try:
        asked0, calls0 = walvfs.counters()
        for i in range(20):
            shim.execute("INSERT INTO t (v) VALUES (?)", (bytes(700 + i),))
            assert first.execute("SELECT count(*) FROM t").fetchone()[0] == i + 2
        asked, calls = walvfs.counters()
        assert asked - asked0 >= 20 * 2
        assert calls - calls0 == asked - asked0  # nothing gathered: written through
        # A checkpoint that copies everything lets the next commit start the WAL over.
        assert first.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        asked0, calls0 = walvfs.counters()
        for i in range(20):
            shim.execute("INSERT INTO t (v) VALUES (?)", (bytes(1500 + i),))
        asked, calls = walvfs.counters()
        assert calls - calls0 < (asked - asked0) / 2  # gathering again
        assert first.execute("SELECT count(*) FROM t").fetchone()[0] == 41
    finally:
        shim.close()
        first.close()


async def _workload(path: Path, coalesce: bool, seed: int) -> list[tuple[object, ...]]:
    """Small and large transactions, rows rewritten in place, savepoints rolled back
    (failing writes), and checkpoints that start the WAL over."""
    db = await SqliteDatabase.open(path, checkpoint_s=0.05, coalesce_wal=coalesce)
    rng = random.Random(seed)
    try:
        assert db.wal_coalesced == coalesce
        await db.write(_schema)
        for step in range(300):
            rows = _rows(rng, rng.choice([1, 5, 40]), rng.choice([50, 400, 3000]))
            keys = [str(rng.randrange(500)) for _ in range(rng.randrange(1, 30))]
            fail = step % 7 == 3

            def fn(
                c: Conn,
                rows: list[tuple[str, bytes]] = rows,
                keys: list[str] = keys,
                fail: bool = fail,
            ) -> None:
                c.executemany("INSERT INTO t (k, v) VALUES (?, ?)", rows)
                c.executemany(
                    "INSERT INTO h VALUES (?, 1) ON CONFLICT (k) DO UPDATE SET n = n + 1",
                    [(k,) for k in keys],
                )
                if fail:
                    raise ValueError("undo this write only")

            try:
                await db.write(fn, durable=step % 2 == 0)
            except ValueError:
                assert fail
            if step == 150:  # one transaction far larger than the shim's buffer
                big = _rows(rng, 400, 2000)
                await db.write(
                    lambda c, b=big: c.executemany("INSERT INTO t (k, v) VALUES (?, ?)", b)
                )
        dump: list[tuple[object, ...]] = await db.read(
            lambda c: (
                [tuple(r) for r in c.execute("SELECT * FROM t ORDER BY id")]
                + [tuple(r) for r in c.execute("SELECT * FROM h ORDER BY k")]
            )
        )
    finally:
        await db.close()
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        check.close()
    return dump


async def test_the_same_database_with_and_without_the_shim(tmp_path: Path) -> None:
    with_shim = await _workload(tmp_path / "on.db", True, seed=7)
    without = await _workload(tmp_path / "off.db", False, seed=7)
    assert len(with_shim) > 1000
    assert with_shim == without


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from sovereign.storage.database import SqliteDatabase

    async def main():
        db = await SqliteDatabase.open(sys.argv[1], checkpoint_s=0.05)
        assert db.wal_coalesced
        await db.write(lambda c: c.execute(
            "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)"))
        i = int(sys.argv[2])
        while True:
            i += 1
            await db.write(lambda c, i=i: c.executemany(
                "INSERT INTO t (id, v) VALUES (?, ?)",
                [(i * 100 + j, bytes(200 + 37 * j)) for j in range(1 + i % 9)]))
            print(i, flush=True)  # acknowledged: its commit returned

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_killed_writer_loses_nothing_it_acknowledged(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "k.db"
    rng = random.Random(seed)
    acked = 0  # every write up to this one was acknowledged
    for _ in range(3):  # kill, reopen, go on, kill again
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), str(acked)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        target = acked + rng.randrange(50, 400)
        last = acked
        for line in child.stdout:
            last = int(line)
            if last >= target:
                break
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        assert last > acked, "the child stored nothing"
        acked = last
        check = sqlite3.connect(path)
        try:
            assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            ids = {r[0] // 100 for r in check.execute("SELECT id FROM t")}
        finally:
            check.close()
        missing = set(range(1, acked + 1)) - ids
        assert not missing, sorted(missing)[:10]
        acked = max(ids)  # stored but not acknowledged is fine; the next child goes on


def test_register_once(tmp_path: Path) -> None:
    """install() is idempotent and the VFS serves any number of connections."""
    assert walvfs.install() == walvfs.install() == walvfs.VFS_NAME
    uri, on = walvfs.writer_uri(tmp_path / "d.db", True)
    assert on and uri.endswith(f"?vfs={walvfs.VFS_NAME}")
    conns = [sqlite3.connect(uri, uri=True, isolation_level=None) for _ in range(3)]
    try:
        conns[0].execute("PRAGMA journal_mode = WAL")
        conns[0].execute("CREATE TABLE x (a)")
        conns[1].execute("INSERT INTO x VALUES (1)")
        assert conns[2].execute("SELECT a FROM x").fetchall() == [(1,)]
    finally:
        for c in conns:
            c.close()
    assert walvfs.writer_uri(tmp_path / "d.db", False) == (str(tmp_path / "d.db"), False)


def test_the_twin_has_the_api_and_registers_nothing() -> None:
    compiled, twin = load_twin("walvfs", "compiled"), load_twin("walvfs", "python")
    for name in ("install", "counters"):
        assert callable(getattr(compiled, name)) and callable(getattr(twin, name))
    assert twin.install(1, 2, "x", 4096, 4096) == twin.UNAVAILABLE != 0
    assert twin.counters() == (0, 0)
    assert compiled.install(1, 2, "x", 4096, 4096) == 0  # already installed: changes nothing


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_the_files_alone_hold_every_commit(tmp_path: Path, synchronous: str) -> None:
    """What a process crash leaves is the files: copied while the writer still has them
    open, they must recover to every committed row. A small page cache makes SQLite
    spill pages to the WAL mid-transaction, write some of them again in place and then
    rewrite frame checksums after the commit frame (its ``iReCksum`` path): those
    writes too must be in the file when the commit returns, with or without an fsync."""
    path = tmp_path / "e.db"
    conn = _wal_connection(path, shim=True)
    try:
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA cache_size = 8")  # pages: spills inside a transaction
        rng = random.Random(3)
        expected: dict[int, bytes] = {}
        for txn in range(12):
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(60):  # far more pages than the cache holds, some twice
                key = rng.randrange(150)
                value = rng.randbytes(rng.choice([100, 700]))
                conn.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (key, value))
                expected[key] = value
            conn.execute("COMMIT")
            copy = tmp_path / f"copy{txn}"
            copy.mkdir()
            for suffix in ("", "-wal"):
                src = Path(f"{path}{suffix}")
                (copy / f"e.db{suffix}").write_bytes(src.read_bytes())
            recovered = sqlite3.connect(copy / "e.db")
            try:
                assert recovered.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                got = dict(recovered.execute("SELECT id, v FROM t").fetchall())
            finally:
                recovered.close()
            assert got == expected, f"after transaction {txn}"
    finally:
        conn.close()
