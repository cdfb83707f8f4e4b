"""One writer thread doing group commit, and a pool of readers: :class:`Database`.

:class:`SqliteDatabase` (here) is the default engine; ``storage/postgres.py`` has
``PostgresDatabase``, the same class over asyncpg (what differs is in ``_startup``,
``_set_durable`` and ``_before_close``; see ``engines.py``). What follows describes
SQLite; PostgreSQL behaves the same with its own spelling (``synchronous_commit``
for ``synchronous``, no WAL checkpointing, no file backup).

Theory of operation (SPEC §5 "durable before acknowledged", §11 storage):

- Exactly one connection writes, from one dedicated thread. ``write(fn)`` queues ``fn``;
  the thread takes everything queued (up to ``max_batch``) and runs it inside ONE
  transaction (``BEGIN IMMEDIATE`` … ``COMMIT``): one fsync for many writes. Each ``fn``
  of a batch of several runs inside its own SAVEPOINT, so a failing ``fn`` undoes only
  its own work and gets its exception while the rest of the batch still commits; a
  write alone in its batch needs none (its failure rolls the transaction back).
- Commits on the event loop (SQLite, ``inline_ms`` > 0): the event log hands its batch,
  with the writes riding on it, over with ``hold()`` … ``release()``. While the writer
  thread is idle and the last durable commit took less than ``inline_ms``, ``release``
  runs that batch right there, on the loop, in the same way the thread would. The
  hand-off to the thread and back (a queue put, a futex wake-up, the GIL, a
  ``call_soon_threadsafe`` wake-up of the loop) cost more CPU than the commit at
  everyday load, and the batch waited for the commit anyway (one in flight). A slow
  disk sends the next commit back to the thread (and a quick one there brings them
  back), so the loop is never held up by more than one slow commit: an SQLite
  write lock held by another process (an admin command's write) makes ``BEGIN`` wait,
  which is one such slow commit. Whoever uses the writer connection holds
  ``_batch_gate``, so the two never overlap; the loop never waits for it (it queues
  instead).
- A write's future is resolved only after COMMIT returned, so "awaited" means
  "durable" (``synchronous=FULL``). All futures of a batch are resolved by ONE
  ``call_soon_threadsafe`` (one loop wake-up per batch, not per write), or at once
  when the batch committed on the loop (their callbacks still run later).
- If SQLite aborts the whole transaction, or COMMIT fails, every write whose work was
  lost gets a :class:`DatabaseError`; a write that failed on its own keeps its own error.
- A batch that starts with only non-durable writes (delivery cursors, ``durable=False``)
  waits up to ``lazy_ms`` for a durable write to share its transaction, if durable
  writes are coming (one started within ``2 * lazy_ms``): on the writer thread, or,
  with commits on the loop, on the loop (``release`` takes them along). At everyday
  load an ack arrives between two messages: this turns two commits per message (the
  event's, then the cursor's) into one, with the cursor pages in the event's commit.
  Durable writes never wait.
- With ``checkpoint_s`` > 0 the WAL is copied back into the database file by a
  checkpointer thread on its own connection, not by the writer inside a COMMIT: a
  checkpoint of a large WAL takes tens of milliseconds or more, and every commit
  waiting behind it would wait that long. Every ``checkpoint_s`` PASSIVE checkpoints
  copy the bulk without holding up anyone, then one more copies what was committed
  meanwhile between two batches of the writer (``_batch_gate``), so that the WAL is
  wholly copied and the writer's next commit starts it over from its top. PASSIVE
  alone never catches up while commits keep coming, so the WAL grew until the writer's
  backstop below checkpointed 64 MB inside one COMMIT (seen at a steady 1,000 msgs/s:
  +9.5 MB/s); a RESTART checkpoint holds the write lock, and a BEGIN that finds it
  taken backs off in SQLite's busy steps (1, 2, 5, 10 ms...): commits stalled ~19 ms.
  The writer keeps SQLite's automatic checkpoint only as that backstop, for a WAL that
  grew past ``BACKSTOP_WAL_BYTES`` (a reader holding a snapshot for long can cause it).
- Reads run on ``readers`` read-only connections in a small thread pool; WAL lets them
  run beside the writer. Each read runs in one read transaction, so ``fn`` sees one
  consistent snapshot of committed data.
- Opening, migrating, checkpointing and closing happen on the writer thread (and the
  checkpointer's); the loop runs only the event log's quick commits, above.

Write functions must not COMMIT or ROLLBACK themselves (they may use their own
SAVEPOINTs). Cancelling an awaiting ``write()`` does not un-queue it: it may still
commit. Exceptions that are ``sqlite3.Error`` reach callers as :class:`DatabaseError`
(chained); every other exception passes through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

from sovereign.stats import BATCH_BOUNDS, COMMIT_BOUNDS, Histogram
from sovereign.storage import walvfs
from sovereign.storage.engines import ENGINE, SqliteEngine
from sovereign.storage.errors import DatabaseClosed, DatabaseError, MigrationError, StorageError

log = logging.getLogger("sovereign.storage")

T = TypeVar("T")

#: What a ``_txn`` function receives. One alias, so the engine seam stays in one place.
Conn: TypeAlias = sqlite3.Connection

_BACKGROUND: set[asyncio.Task[None]] = set()

#: The attribute :func:`replayable` sets on a write.
_REPLAYABLE = "_sovereign_replayable"


def replayable(fn: T) -> T:
    """Mark a write (a function, a ``partial``, or a class whose instances are writes:
    marked once, not per write) as safe to run again from the start once its
    transaction has been rolled back: it changes nothing but the database and reads
    nothing but the database and its arguments. A batch whose writes are all marked
    runs them in one transaction without a SAVEPOINT each; only if one of them fails
    are they run again, each in its own (:meth:`Database._run_batch`)."""
    setattr(fn, _REPLAYABLE, True)
    return fn


_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
#: The writer checkpoints the WAL itself only past this size (the checkpointer thread
#: normally keeps it far smaller).
BACKSTOP_WAL_BYTES = 64 * 1024 * 1024
#: Unheld PASSIVE rounds of a checkpoint (each copies what the writer committed during
#: the one before), before the round between two batches.
PASSIVE_ROUNDS = 2
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)(?:\.([a-z]+))?\.sql$")


@dataclass(frozen=True, slots=True)
class DatabaseStats:
    """Counters for /metrics (read without locking: plain ints under the GIL)."""

    batches_committed: int
    writes_committed: int
    writes_failed: int
    largest_batch: int
    queue_depth: int


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


# An outcome: (future, exception or None, result).
_Outcome: TypeAlias = tuple["asyncio.Future[Any]", BaseException | None, Any]


class _Stop:
    """Queue sentinel: drain what came before, then shut down."""

    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future[None]) -> None:
        self.fut = fut


_QueueItem: TypeAlias = "tuple[Callable[[Conn], Any], asyncio.Future[Any], bool] | _Stop"


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():  # the awaiting task may have been cancelled
        fut.set_result(result)


def _reject(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class ReaderPool:
    """The reader threads. A read is one queue put, and one ``call_soon_threadsafe``
    that resolves the caller's asyncio future when it is done.

    ``loop.run_in_executor`` with a ``ThreadPoolExecutor`` made, per read, a
    concurrent Future (with its own Condition and lock), a work item and an asyncio
    Future chained to it by two callbacks: ~13% of the event loop in a resume storm
    (py-spy), where every resume is a read (docs/performance.md)."""

    def __init__(self, threads: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._shut = False
        self._threads = [
            threading.Thread(target=self._main, name=f"{name}_{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(
        self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], fn: Any, *args: Any
    ) -> None:
        """Run ``fn(*args)`` on a reader thread; its result or exception goes to ``fut``
        through ``loop``. RuntimeError once shut down (as ThreadPoolExecutor)."""
        with self._lock:
            if self._shut:
                raise RuntimeError("reader pool is shut down")
            self._jobs.put((loop, fut, fn, args))

    def shutdown(self) -> None:
        """Refuse new reads; the queued and in-flight ones finish first."""
        with self._lock:
            if not self._shut:
                self._shut = True
                for _ in self._threads:
                    self._jobs.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()

    def _main(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            loop, fut, fn, args = job
            answer: Callable[[asyncio.Future[Any], Any], None]
            try:
                answer, value = _resolve, fn(*args)
            except BaseException as exc:  # as ThreadPoolExecutor: the caller gets it
                answer, value = _reject, exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(answer, fut, value)
            job = loop = fut = fn = args = value = None  # nothing kept while idle


class Database:
    """Group commit on one writer thread plus a pool of reader threads, for any engine.

    An engine subclass provides the connections (``_startup``), how a batch's
    durability is set (``_set_durable``), what runs before the connections close
    (``_before_close``) and which exceptions are the driver's (``_db_errors``: they
    reach callers as DatabaseError). The writer and reader connections speak the
    ``sqlite3`` connection API (PostgreSQL through an adapter), so the batch loop
    below, a SAVEPOINT per write after a transaction's first included, is the same for
    every engine."""

    #: The engine's name ("sqlite", "postgres").
    engine_name: str = ""
    #: The driver's exceptions: mapped to DatabaseError.
    _db_errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    #: What a reader runs to start its one read transaction (a consistent snapshot).
    _READ_BEGIN = "BEGIN"

    def __init__(
        self, *, max_batch: int, readers: int, lazy_ms: float = 0.0, inline_ms: float = 0.0
    ) -> None:
        # Use open(); the constructor only records settings.
        if max_batch < 1 or readers < 1:
            raise ValueError("max_batch and readers must be >= 1")
        self._lazy_s = max(0.0, lazy_ms) / 1000
        self._inline_s = max(0.0, inline_ms) / 1000
        #: Writes held for :meth:`release` (None: not holding).
        self._held: list[tuple[Callable[[Conn], Any], asyncio.Future[Any], bool]] | None = None
        #: Non-durable writes waiting (up to ``lazy_ms``) for a durable batch to share its
        #: commit, when commits may run on the loop (else the thread gathers them).
        self._lazy: list[tuple[Callable[[Conn], Any], asyncio.Future[Any], bool]] = []
        self._lazy_timer: asyncio.TimerHandle | None = None
        # Writes queued for the writer thread (counted by the loop) and writes it has
        # finished with (counted by the thread): equal, the thread is not using the
        # connection. Each is written by one thread only.
        self._queued = 0
        self._finished = 0
        #: How long the last batch took, from BEGIN to the end of COMMIT (seconds).
        self._last_commit_s = 0.0
        #: Batches committed on the event loop (:meth:`release`).
        self.inline_batches = 0
        self._last_durable = -1e9  # monotonic start of the last batch with a durable write
        self.max_batch = max_batch
        self._n_readers = readers
        self._queue: queue.SimpleQueue[_QueueItem] = queue.SimpleQueue()
        #: Held by the writer thread around each batch: another thread that takes it
        #: knows no transaction is open or starting (the SQLite checkpointer's last
        #: round). Uncontended, it costs the writer ~0.1 us per batch.
        self._batch_gate = threading.Lock()
        self._sync_full = True  # the writer connection's current durability
        self._closed = True  # until open() finishes
        self._dead = False  # the writer thread has shut down
        self._lock = threading.Lock()
        self._closing: asyncio.Future[None] | None = None
        self._writer: threading.Thread | None = None
        self._wconn: Any = None
        self._rconns: list[Any] = []
        self._rfree: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._rpool: ReaderPool | None = None
        self.schema_version = 0
        # metrics
        self._batches = 0
        self._writes_ok = 0
        self._writes_failed = 0
        self._largest = 0
        # Written by the writer thread only; read by /metrics (SPEC §12.25).
        self.batch_sizes = Histogram(BATCH_BOUNDS)
        self.commit_seconds = Histogram(COMMIT_BOUNDS)

    # -- lifecycle ------------------------------------------------------------
    async def _start(self) -> None:
        """Start the writer thread; returns once it has opened and migrated."""
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Daemon: a process that exits without close() must not hang on this thread;
        # WAL makes an unclean exit as safe as a crash (PostgreSQL rolls back).
        writer = threading.Thread(
            target=self._writer_main, args=(started,), name="sovereign-db-writer", daemon=True
        )
        writer.start()
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:
            # Cancelled mid-open: close it once it has opened, so nothing leaks.
            task = asyncio.get_running_loop().create_task(self._close_after_open(started, writer))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
            raise
        self._writer = writer
        self._closed = False

    async def _close_after_open(
        self, started: asyncio.Future[None], writer: threading.Thread
    ) -> None:
        try:
            await started
        except BaseException:
            return  # the thread already cleaned up
        self._writer = writer
        self._closed = False
        await self.close()

    async def close(self) -> None:
        """Finish queued writes, checkpoint the WAL, close every connection.

        Idempotent. After close, :meth:`write` and :meth:`read` raise DatabaseClosed.
        """
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lazy = self._take_lazy()
        refused: list[_Outcome] = []
        with self._lock:
            if self._writer is None or self._dead:
                self._closed = True
                refused = [(fut, DatabaseClosed("database is closed"), None) for _, fut, _ in lazy]
            else:
                self._closed = True
                self._closing = closing
                self._enqueue(lazy)  # committed before the stop
                self._queue.put(_Stop(closing))
        if self._closing is not closing:  # the writer had already stopped
            _settle(refused)
            return
        await asyncio.shield(closing)

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- public API -------------------------------------------------------------
    async def write(
        self, fn: Callable[[Conn], T], *, durable: bool = True, long: bool = False
    ) -> T:
        """Run ``fn(conn)`` on the writer inside a group-committed transaction.

        Returns ``fn``'s result once the transaction holding it has committed.
        ``durable=False`` is for state whose loss in a power cut is harmless (delivery
        cursors: at worst events are delivered again): a batch of only such writes
        commits with ``synchronous=NORMAL`` (no fsync; measured here ~100 us of CPU per
        FULL commit vs ~20 us). They become durable with the next FULL commit or
        checkpoint, as WAL frames are synced in order. ``long=True``: a write that takes
        milliseconds (the idempotency fold) runs on the writer thread, never on the loop.
        """
        return await self.submit(fn, durable=durable, long=long)

    def submit(
        self, fn: Callable[[Conn], T], *, durable: bool = True, long: bool = False
    ) -> asyncio.Future[T]:
        """:meth:`write`, queued now: the future resolves as ``write`` returns. Writes
        submitted in one go, with nothing awaited between them, reach the writer
        together and share its wake-up and its transaction (EventLog riders)."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        item = (fn, fut, durable)
        # The lock pairs with _shutdown: a write is either queued before the writer's
        # final drain (and answered) or refused here, never stranded.
        with self._lock:
            if self._closed:
                raise DatabaseClosed("database is closed")
            if self._held is not None and not long:
                self._held.append(item)
                return fut
            if not durable and not long and self._inline_s > 0:
                self._lazy.append(item)  # below, outside the lock
            else:
                self._enqueue((item,))
                return fut
        if self._lazy_timer is None:
            # Commits on the loop: the lazy wait is kept here, not on the thread.
            loop = asyncio.get_running_loop()
            coming = time.monotonic() - self._last_durable < 2 * self._lazy_s
            self._lazy_timer = loop.call_later(self._lazy_s if coming else 0, self._flush_lazy)
        return fut

    def hold(self) -> None:
        """Keep the writes submitted from now until :meth:`release` together: they go
        to storage as one batch (the event log's batch and the writes riding with it)."""
        self._held = []

    def release(self) -> None:
        """Send the writes held since :meth:`hold`, and any non-durable writes waiting
        for company, as one batch (:meth:`_send`)."""
        held, self._held = self._held, None
        if self._lazy:
            held = self._take_lazy() + (held or [])
        if held:
            self._send(held)

    def _flush_lazy(self) -> None:
        """Non-durable writes waited ``lazy_ms`` and no durable batch came: alone."""
        self._lazy_timer = None
        if self._lazy:
            self._send(self._take_lazy())

    def _take_lazy(self) -> list[tuple[Callable[[Conn], Any], asyncio.Future[Any], bool]]:
        lazy, self._lazy = self._lazy, []
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        return lazy

    def _send(self, batch: list[tuple[Callable[[Conn], Any], asyncio.Future[Any], bool]]) -> None:
        """One batch to storage. While the writer thread is idle and durable commits are
        quick (the last one took less than ``inline_ms``), it commits here, on the event
        loop, before this returns: no hand-off to the thread and back, which costs more
        CPU than the commit itself at everyday load (docs/performance.md, twelfth
        session). Otherwise it is queued for the thread. Either way the futures'
        callbacks run later, from the loop."""
        if (
            self._inline_s > 0
            and not self._closed
            and self._last_commit_s < self._inline_s
            and self._queued == self._finished
            and self._batch_gate.acquire(blocking=False)  # the checkpointer's last round
        ):
            outcomes: list[_Outcome] = []
            try:
                self._run_batch(batch, outcomes)
            except Exception:  # the futures have their errors (_run_batch's finally)
                log.exception("storage: a commit on the event loop failed")
            finally:
                self._batch_gate.release()
                self.inline_batches += 1
                _settle(outcomes)
            return
        with self._lock:
            if not self._closed:
                self._enqueue(batch)
                return
        _settle([(fut, DatabaseClosed("database is closed"), None) for _, fut, _ in batch])

    def _enqueue(
        self, items: Sequence[tuple[Callable[[Conn], Any], asyncio.Future[Any], bool]]
    ) -> None:
        """Queue writes for the writer thread, counted in ``_queued`` (with ``_lock``
        held): the loop commits only while the thread has finished all it was given."""
        self._queued += len(items)
        for item in items:
            self._queue.put(item)

    async def read(self, fn: Callable[[Conn], T]) -> T:
        """Run ``fn(conn)`` on a read-only connection, in one read transaction."""
        return await self._on_reader(fn, True)

    @property
    def writer_alive(self) -> bool:
        """The writer thread is running and taking writes (``/readyz``, SPEC §12.25)."""
        w = self._writer
        return w is not None and w.is_alive() and not self._dead and not self._closed

    def stats(self) -> DatabaseStats:
        return DatabaseStats(
            batches_committed=self._batches,
            writes_committed=self._writes_ok,
            writes_failed=self._writes_failed,
            largest_batch=self._largest,
            queue_depth=self._queue.qsize(),
        )

    @property
    def batches_committed(self) -> int:
        return self._batches

    @property
    def writes_committed(self) -> int:
        return self._writes_ok

    @property
    def largest_batch(self) -> int:
        return self._largest

    # -- readers ----------------------------------------------------------------
    async def _on_reader(self, fn: Callable[[Conn], T], snapshot: bool) -> T:
        if self._closed or self._rpool is None:
            raise DatabaseClosed("database is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        try:
            self._rpool.submit(loop, fut, self._run_read, fn, snapshot)
        except RuntimeError:  # pool shut down between the check and the submit
            raise DatabaseClosed("database is closed") from None
        return await fut

    def _run_read(self, fn: Callable[[Conn], T], snapshot: bool) -> T:
        # The pool has exactly as many threads as connections: one is always free.
        conn = self._rfree.get()
        try:
            if snapshot:
                conn.execute(self._READ_BEGIN)
            return fn(conn)
        except self._db_errors as exc:
            raise _db_error("read failed", exc) from exc
        finally:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except self._db_errors:
                    log.exception("reader rollback failed")
            self._rfree.put(conn)

    # -- writer thread ----------------------------------------------------------
    def _writer_main(self, started: asyncio.Future[None]) -> None:
        loop = started.get_loop()
        try:
            self._startup()
        except BaseException as exc:
            self._close_connections()
            err = exc if isinstance(exc, StorageError) else _db_error("open failed", exc)
            _call_soon(loop, _settle, [(started, err, None)])
            return
        _call_soon(loop, _settle, [(started, None, None)])
        stop: _Stop | None = None
        try:
            stop = self._serve()
        except BaseException:
            log.exception("storage writer crashed")
        finally:
            self._shutdown(stop)

    def _serve(self) -> _Stop:
        q = self._queue
        limit = self.max_batch
        # With commits on the loop (inline_ms), non-durable writes have waited there.
        lazy = self._lazy_s if self._inline_s == 0 else 0.0
        while True:
            first = q.get()
            if isinstance(first, _Stop):
                return first
            batch = [first]
            stop: _Stop | None = None
            # Only while durable writes are coming (one started within 2 * lazy): at a
            # quiet time the wait would buy nothing and cost a wake-up.
            if lazy > 0 and not first[2] and time.monotonic() - self._last_durable < 2 * lazy:
                stop = self._gather_lazy(batch, lazy)
            while stop is None and len(batch) < limit:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stop = item
                    break
                batch.append(item)
            outcomes: list[_Outcome] = []
            try:
                with self._batch_gate:
                    self._run_batch(batch, outcomes)
            finally:
                self._finished += len(batch)  # done with the connection: before the answers
                _post(outcomes)
            if stop is not None:
                return stop

    def _gather_lazy(
        self, batch: list[tuple[Callable[[Conn], Any], asyncio.Future[Any], bool]], wait: float
    ) -> _Stop | None:
        """Non-durable writes only so far: take what arrives within ``wait`` seconds,
        until a durable write (whose commit they then share) or a stop."""
        q = self._queue
        deadline = time.monotonic() + wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                item = q.get(timeout=left)
            except queue.Empty:
                return None
            if isinstance(item, _Stop):
                return item
            batch.append(item)
            if item[2]:
                return None
        return None

    def _run_batch(
        self,
        batch: list[tuple[Callable[[Conn], Any], asyncio.Future[Any], bool]],
        outcomes: list[_Outcome],
    ) -> None:
        """Run ``batch`` in one transaction; every write's outcome goes into ``outcomes``
        (the caller answers them), even when this raises."""
        conn = self._wconn
        assert conn is not None
        size = len(batch)
        durable = batch[0][2] if size == 1 else any(item[2] for item in batch)
        if durable:
            self._last_durable = time.monotonic()
        if durable != self._sync_full:  # outside any transaction, as SQLite requires
            self._set_durable(conn, durable)
            self._sync_full = durable
        pending: list[tuple[asyncio.Future[Any], Any]] = []  # done, awaiting COMMIT
        committed = False
        ok = 0  # writes answered with their result (the rest of ``outcomes`` failed)
        started = time.perf_counter()
        try:
            if size > 1 and self._all_at_once(conn, batch, outcomes):
                committed = True
                ok = size
                batch = []  # all answered: nothing left for the loop below
            for i, (fn, fut, _durable) in enumerate(batch):
                # The write that opens a transaction needs no SAVEPOINT: if it fails,
                # rolling the transaction back undoes exactly its work, and the next
                # write opens a new one. Two statements fewer per commit (of 4 alone, of
                # 8 with a riding cursor write: docs/performance.md), and no page copied
                # into a savepoint's journal before it is first changed.
                opens = not conn.in_transaction
                if opens:
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                    except self._db_errors as exc:
                        # Without a transaction nothing left in this batch can run.
                        outcomes += [
                            (f, _db_error("BEGIN failed", exc), None) for _, f, _ in batch[i:]
                        ]
                        break
                try:
                    if opens:
                        result = fn(conn)
                        if not conn.in_transaction:
                            # It ended the transaction itself (a bug: a SAVEPOINT's
                            # RELEASE would catch it): what it left is not known.
                            raise RuntimeError("a write ended the writer's transaction")
                    else:
                        conn.execute("SAVEPOINT batch_item")
                        result = fn(conn)
                        conn.execute("RELEASE batch_item")
                except Exception as exc:
                    err = (
                        _db_error("write failed", exc) if isinstance(exc, self._db_errors) else exc
                    )
                    outcomes.append((fut, err, None))
                    if opens:  # nothing else in it: ``pending`` is empty
                        self._rollback_all(conn)
                    elif not self._rollback_item(conn):
                        # SQLite rolled back the whole transaction (e.g. SQLITE_FULL): the
                        # earlier writes of this batch went with it.
                        outcomes += [
                            (f, _db_error("transaction aborted", exc), None) for f, _ in pending
                        ]
                        pending.clear()
                else:
                    pending.append((fut, result))
            if conn.in_transaction:
                try:
                    conn.execute("COMMIT")
                    committed = True
                except self._db_errors as exc:
                    self._rollback_all(conn)
                    outcomes += [(f, _db_error("COMMIT failed", exc), None) for f, _ in pending]
                else:
                    for f, r in pending:  # a loop, not a comprehension's call: 1-2 here
                        outcomes.append((f, None, r))
                    ok = len(pending)
                pending.clear()
        except BaseException as exc:  # a bug here must never leave a caller waiting
            self._rollback_all(conn)
            seen = {id(o[0]) for o in outcomes}
            outcomes += [
                (f, _db_error("writer failed", exc), None) for _, f, _ in batch if id(f) not in seen
            ]
            raise
        finally:
            took = time.perf_counter() - started
            if durable:  # what the disk takes decides where the next commits run
                self._last_commit_s = took
            if committed:
                self._batches += 1
                if size > self._largest:
                    self._largest = size
                self.batch_sizes.observe(size)
                self.commit_seconds.observe(took)
            self._writes_ok += ok
            self._writes_failed += len(outcomes) - ok

    def _all_at_once(
        self,
        conn: Any,
        batch: list[tuple[Callable[[Conn], Any], asyncio.Future[Any], bool]],
        outcomes: list[_Outcome],
    ) -> bool:
        """Commit ``batch`` with no SAVEPOINT per write, if every write in it is
        :func:`replayable`: at everyday load a commit holds a cursor write riding with
        an event batch, and the second one's savepoint cost ~15k instructions (SQLite
        copies each page into the savepoint's journal before its first change:
        docs/performance.md, seventeenth session). True once committed, the writes'
        results in ``outcomes``; False, with nothing changed, if a write is not
        replayable or anything failed (rolled back: the caller runs the batch again,
        write by write, and whatever failed fails there alone)."""
        for fn, _fut, _durable in batch:
            if not getattr(fn, _REPLAYABLE, False):
                return False
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [fn(conn) for fn, _fut, _durable in batch]
            if not conn.in_transaction:
                return False  # a write ended it (the careful run says which)
            conn.execute("COMMIT")
        except Exception:
            self._rollback_all(conn)
            return False
        for (_fn, fut, _durable), result in zip(batch, results, strict=True):
            outcomes.append((fut, None, result))
        return True

    def _shutdown(self, stop: _Stop | None) -> None:
        with self._lock:
            self._closed = True
            self._dead = True
        # Anything queued after the stop (or left by a crash) is refused, not dropped.
        leftovers: list[_Outcome] = []
        stops = [stop] if stop is not None else []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Stop):
                stops.append(item)
            else:
                leftovers.append((item[1], DatabaseClosed("database is closed"), None))
        _post(leftovers)
        if self._rpool is not None:
            self._rpool.shutdown()  # in-flight reads finish first
        self._before_close()
        with self._batch_gate:  # a commit on the loop that began before _closed was set
            self._close_connections()
        _post([(s.fut, None, None) for s in stops])

    def _close_connections(self) -> None:
        for r in self._rconns:
            r.close()
        self._rconns.clear()
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    def _rollback_item(self, conn: Any) -> bool:
        """Undo one write's SAVEPOINT; False if the enclosing transaction is gone."""
        if not conn.in_transaction:
            return False
        try:
            conn.execute("ROLLBACK TO batch_item")
            conn.execute("RELEASE batch_item")
            return True
        except self._db_errors:
            self._rollback_all(conn)
            return False

    def _rollback_all(self, conn: Any) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except self._db_errors:
                log.exception("ROLLBACK failed")

    # -- engine hooks ---------------------------------------------------------------
    def _startup(self) -> None:
        """On the writer thread: connect, migrate, open the readers and their pool."""
        raise NotImplementedError

    def _set_durable(self, conn: Any, durable: bool) -> None:
        """Outside a transaction: make the next commits durable (fsync) or not."""
        raise NotImplementedError

    def _before_close(self) -> None:
        """On the writer thread, after the last batch, before the connections close."""

    def size_bytes(self) -> int:
        """The database's size in bytes (admin ``info``, SPEC §10)."""
        raise NotImplementedError

    async def backup(
        self, dest: str | Path, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """A consistent copy of the database in one file (SQLite only)."""
        raise NotImplementedError


class SqliteDatabase(Database):
    """The SQLite database: a single group-committing writer plus read-only readers."""

    engine_name = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        max_batch: int,
        readers: int,
        busy_timeout_ms: int,
        migrations: Traversable,
        engine: SqliteEngine = ENGINE,
        lazy_ms: float = 0.0,
        checkpoint_s: float = 0.0,
        coalesce_wal: bool = True,
        inline_ms: float = 0.0,
    ) -> None:
        super().__init__(max_batch=max_batch, readers=readers, lazy_ms=lazy_ms, inline_ms=inline_ms)
        self.path = path
        self._coalesce_wal = coalesce_wal
        #: Whether the writer's WAL writes go through the coalescing shim (walvfs.py).
        self.wal_coalesced = False
        self._checkpoint_s = max(0.0, checkpoint_s)
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()
        self.engine = engine
        self._busy_timeout_ms = busy_timeout_ms
        self._migrations = migrations

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        max_batch: int = 512,
        readers: int = 2,
        busy_timeout_ms: int = 5000,
        migrations: Traversable | Path | None = None,
        lazy_ms: float = 0.0,
        checkpoint_s: float = 0.0,
        coalesce_wal: bool = True,
        inline_ms: float = 0.0,
    ) -> SqliteDatabase:
        """Create (if needed), migrate and open the database at ``path`` (SPEC §11).

        ``lazy_ms``: how long a batch of only non-durable writes waits for a durable
        write to join it (see the module docstring); 0 commits it at once.
        ``checkpoint_s``: how often a checkpointer thread copies the WAL back; 0 leaves
        checkpoints to SQLite's automatic checkpoint inside the writer's COMMIT.
        ``coalesce_wal``: the writer's WAL frames of a commit reach the file one write per
        page, durable commits padded to a 4 KiB boundary (``storage/walvfs.py``), where
        the compiled shim can run."""
        p = Path(path)
        if str(path) == ":memory:":
            raise ValueError("Database needs a file: readers and the writer share it")
        ENGINE.check_version()
        mig = migrations if migrations is not None else default_migrations()
        db = cls(
            p,
            max_batch=max_batch,
            readers=readers,
            busy_timeout_ms=busy_timeout_ms,
            migrations=mig,
            lazy_ms=lazy_ms,
            checkpoint_s=checkpoint_s,
            coalesce_wal=coalesce_wal,
            inline_ms=inline_ms,
        )
        await db._start()
        return db

    async def backup(
        self, dest: str | Path, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Write a consistent copy of the database to ``dest`` (SPEC §11 ``backup``).

        Uses SQLite's online backup API on a reader in one step, i.e. from one WAL
        snapshot, so writers keep going. The copy is written beside ``dest`` and
        renamed into place, so ``dest`` is either absent or complete.
        """
        target = Path(dest)
        if target.resolve() == self.path.resolve():
            raise ValueError("backup destination is the live database")
        await self._on_reader(lambda conn: _backup_to(conn, target, progress), False)

    def size_bytes(self) -> int:
        """Database plus WAL size on disk (admin ``info``, SPEC §10)."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def _startup(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        target, self.wal_coalesced = walvfs.writer_uri(self.path, self._coalesce_wal)
        # Not only this thread's: release() commits on the event loop while this thread
        # is idle (never both at once).
        conn = sqlite3.connect(
            target, uri=True, isolation_level=None, cached_statements=256, check_same_thread=False
        )
        self._wconn = conn
        self.engine.configure_writer(conn, self._busy_timeout_ms)
        self.schema_version = apply_migrations(
            conn, load_migrations(self._migrations, self.engine.name)
        )
        uri = self.path.resolve().as_uri() + "?mode=ro"
        for _ in range(self._n_readers):
            r = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            self._rconns.append(r)
            self.engine.configure_reader(r, self._busy_timeout_ms)
            self._rfree.put(r)
        self._rpool = ReaderPool(self._n_readers, "sovereign-db-read")
        if self._checkpoint_s > 0:
            page = int(conn.execute("PRAGMA page_size").fetchone()[0])
            conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_WAL_BYTES // page}")
            cconn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            cconn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            cconn.execute("PRAGMA synchronous = FULL")  # fsync the database after copying
            self._checkpointer = threading.Thread(
                target=self._checkpoint_main,
                args=(cconn,),
                name="sovereign-db-checkpoint",
                daemon=True,
            )
            self._checkpointer.start()

    def _checkpoint_main(self, conn: sqlite3.Connection) -> None:
        """Every ``checkpoint_s``: :meth:`_checkpoint_round`."""
        try:
            while not self._checkpoint_stop.wait(self._checkpoint_s):
                try:
                    self._checkpoint_round(conn, self._batch_gate)
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint failed: %s", exc)
        finally:
            conn.close()

    @staticmethod
    def _checkpoint_round(conn: sqlite3.Connection, gate: threading.Lock) -> None:
        """``PASSIVE_ROUNDS`` PASSIVE checkpoints (they wait for nobody: the first copies
        the bulk, the next what was committed meanwhile), then one more with ``gate``
        held, between two batches of the writer, which copies the last frames. Unless a
        reader kept an older snapshot, the WAL is then wholly copied and the writer's
        next commit starts it over from its top (if a read is running just then, the
        next round tries again)."""
        for _ in range(PASSIVE_ROUNDS):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        with gate:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _set_durable(self, conn: Any, durable: bool) -> None:
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")

    def _before_close(self) -> None:
        if self._checkpointer is not None:
            self._checkpoint_stop.set()
            self._checkpointer.join()
        conn = self._wconn
        if conn is not None:
            try:
                # Fold the WAL back so the closed database is one self-contained file.
                with self._batch_gate:  # after the checkpointer's join: it takes the gate
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                log.exception("WAL checkpoint at close failed")


# -- helpers -------------------------------------------------------------------------


def _db_error(what: str, exc: BaseException) -> DatabaseError:
    err = DatabaseError(f"{what}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _settle(outcomes: list[_Outcome]) -> None:
    """Runs on the event loop: resolve a whole batch in one callback."""
    for fut, exc, result in outcomes:
        if fut.done():  # the caller gave up (cancelled)
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def _call_soon(loop: asyncio.AbstractEventLoop, cb: Callable[..., Any], arg: Any) -> None:
    with contextlib.suppress(RuntimeError):  # loop closed: nobody is left to wait
        loop.call_soon_threadsafe(cb, arg)


def _post(outcomes: list[_Outcome]) -> None:
    """One ``call_soon_threadsafe`` per event loop per batch (normally one loop)."""
    if not outcomes:
        return
    loop = outcomes[0][0].get_loop()
    if all(o[0].get_loop() is loop for o in outcomes):
        _call_soon(loop, _settle, outcomes)
        return
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for o in outcomes:
        by_loop.setdefault(o[0].get_loop(), []).append(o)
    for lp, items in by_loop.items():
        _call_soon(lp, _settle, items)


BACKUP_STEP_PAGES = 1024


def _backup_to(
    conn: sqlite3.Connection,
    dest: Path,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    tmp.unlink(missing_ok=True)
    out = sqlite3.connect(tmp, isolation_level=None)
    try:
        if progress is None:
            conn.backup(out)  # pages=-1: one step, one snapshot
        else:
            # In steps, for a progress report (``progress(done, total)`` in pages). The
            # read transaction held across the steps pins one WAL snapshot: writers
            # go on, and every step copies from that same snapshot.
            conn.execute("BEGIN")
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                conn.backup(
                    out,
                    pages=BACKUP_STEP_PAGES,
                    progress=lambda _status, remaining, total: progress(total - remaining, total),
                )
            finally:
                conn.execute("ROLLBACK")
        # A single self-contained file (no -wal sidecar) is what an operator copies.
        out.execute("PRAGMA journal_mode = DELETE")
        ok = out.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise StorageError(f"backup failed its integrity check: {ok}")
    finally:
        out.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


# -- migrations --------------------------------------------------------------------


def default_migrations() -> Traversable:
    return resources.files("sovereign.storage").joinpath("migrations")


def load_migrations(directory: Traversable | Path, engine: str) -> list[Migration]:
    """Numbered ``NNNN_name.sql`` files in order; ``NNNN_name.<engine>.sql`` wins over
    the generic file of the same number; other engines' files are ignored."""
    chosen: dict[int, tuple[bool, str, Traversable | Path]] = {}
    for entry in directory.iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m is None:
            continue
        version, name, eng = int(m.group(1)), m.group(2), m.group(3)
        if eng is not None and eng != engine:
            continue
        specific = eng is not None
        prev = chosen.get(version)
        if prev is not None:
            if prev[1] != name:
                raise MigrationError(f"two migrations numbered {version:04d}: {prev[1]}, {name}")
            if prev[0] or not specific:
                continue
        chosen[version] = (specific, name, entry)
    return [
        Migration(v, name, entry.read_text(encoding="utf-8"))
        for v, (_, name, entry) in sorted(chosen.items())
    ]


def split_statements(script: str) -> Iterator[str]:
    """Split a script into statements (triggers and quoted ';' stay intact)."""
    pieces = script.split(";")
    buf = ""
    for i, piece in enumerate(pieces):
        buf += piece if i == len(pieces) - 1 else piece + ";"
        if sqlite3.complete_statement(buf):
            if not _blank(buf):
                yield buf
            buf = ""
    if not _blank(buf):
        if sqlite3.complete_statement(buf + ";"):  # last statement without its ';'
            yield buf
        else:
            raise MigrationError(f"incomplete SQL statement: {buf.strip()[:80]!r}")


def _blank(sql: str) -> bool:
    """Only whitespace, ';' and comments."""
    return not _COMMENTS.sub("", sql).strip(" \t\r\n;")


def missing_migrations(applied: set[int], migrations: list[Migration]) -> list[Migration]:
    """The migrations a database with ``applied`` versions still needs, in order (both
    engines). A schema newer than every migration this code ships is refused: never run
    old code against a newer schema."""
    known = max((m.version for m in migrations), default=0)
    newest = max(applied, default=0)
    if newest > known:
        raise MigrationError(
            f"database schema version {newest} is newer than this server ({known})"
        )
    return [m for m in migrations if m.version not in applied]


def apply_migrations(conn: sqlite3.Connection, migrations: list[Migration]) -> int:
    """Apply each missing migration in its own transaction; returns the schema version.

    Safe to re-run and against a concurrent opener: each migration re-checks
    ``schema_version`` under the write lock before applying.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_us INTEGER NOT NULL"
        ") STRICT"
    )
    applied = {int(r[0]) for r in conn.execute("SELECT version FROM schema_version")}
    for m in missing_migrations(applied, migrations):
        conn.execute("BEGIN IMMEDIATE")
        try:
            again = conn.execute(
                "SELECT 1 FROM schema_version WHERE version = ?", (m.version,)
            ).fetchone()
            if again is None:
                # Most are instant; one that rebuilds a table (0006) takes as long as
                # copying it, and the operator should see what the start waits for.
                log.info("applying migration %04d_%s", m.version, m.name)
                for stmt in split_statements(m.sql):
                    conn.execute(stmt)
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at_us) VALUES (?, ?, ?)",
                    (m.version, m.name, time.time_ns() // 1000),
                )
                log.info("applied migration %04d_%s", m.version, m.name)
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(f"migration {m.version:04d}_{m.name} failed: {exc}") from exc
        applied.add(m.version)
    return max(applied, default=0)
