"""In-memory conversation state and the event log writer (SPEC §5).

Theory of operation
-------------------
Conversations, members, sequence counters and MLS epochs live in memory, loaded at
start-up; the hot path reads nothing from disk. Every change to a conversation is an
:class:`Op`, built synchronously on the event loop: it validates against memory,
applies itself to memory at once (so the next request sees it), allocates dense seqs
and strictly increasing timestamps, and records how to undo itself.

:class:`EventLog` writes ops to SQLite in batches with exactly one batch in flight:
while one transaction commits, new ops queue; when it returns, everything queued goes
in the next transaction (group commit). Only after the commit does an op run its
effects (echo to the sender, fan-out). In a stream of sends the next batch waits
``gather_s`` (1 ms in the server) before it starts, so more ops share its commit. If a
transaction fails, every op of the batch is undone in reverse order (no other batch is
in flight, so memory returns exactly to the committed state) and fails with 9002 — a
seq is never burned, never reused.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec

from sovereign import implementations
from sovereign.protocol.types import MessageType as T
from sovereign.stats import Histogram
from sovereign.storage import cluster as csql
from sovereign.storage import messaging as sql
from sovereign.storage.database import Conn, Database, replayable
from sovereign.v1 import sovereign_pb2 as pb

#: Event ids (also for groups and MLS), from the compiled generator or its twin:
#: one generator, so one monotonic state, per process.
new_ulid = implementations.load("ids").new_ulid

log = logging.getLogger("sovereign.eventlog")

RECENT_EVENTS = 512  # per conversation, for acks and MESSAGE_DELIVERED without disk reads
#: Batches starting within this long of each other form a stream (EventLog.submit).
STREAM_S = 0.002
#: How long a batch in a stream waits for company (the server's setting; EventLog's
#: default is 0). Measured, relay 200 pairs at a fixed 1,000 msgs/s, two interleaved
#: A/B pairs of runs: server CPU per message 434 -> 363 and 406 -> 338 us, disk written
#: 17.0 -> 14.1 KB per message; p99 send -> delivery gains up to ~1-2 ms (libuv timers
#: have millisecond resolution).
EVENT_GATHER_S = 0.001
#: How long a cursor write in a stream of sends waits to go with the next event batch
#: (DeliveryWriter, EventLog.ride): as the writer thread's own wait for cursor writes
#: (CURSOR_LAZY_MS in storage), which it replaces on this path.
CURSOR_RIDE_S = 0.002
#: Cluster mode: the joined (or left) seq of a membership change still committing on
#: this node, until the database assigns the real one (services/cluster.py). Higher
#: than any real seq, so another node's events before it never reach a member too
#: early, and still reach a leaving one (SPEC §12.13).
PENDING_SEQ = 1 << 62


class Member:
    __slots__ = ("joined_at_us", "joined_seq", "left_seq", "role", "user_id")

    def __init__(
        self,
        user_id: str,
        role: str,
        joined_seq: int,
        joined_at_us: int,
        left_seq: int | None = None,
    ) -> None:
        self.user_id = user_id
        self.role = role
        self.joined_seq = joined_seq
        self.joined_at_us = joined_at_us
        self.left_seq = left_seq


class Conv:
    """One conversation's state. ``last_seq`` includes queued ops; ``committed_seq``
    only what is durable (offline sync and history never go past it)."""

    __slots__ = (
        "_recipients",
        "committed_seq",
        "conversation_id",
        "created_at_us",
        "created_by",
        "epoch",
        "former",
        "group_id",
        "group_info",
        "group_info_epoch",
        "last_seq",
        "last_ts_us",
        "members",
        "purged_seq",
        "recent",
        "title",
    )

    def __init__(
        self, conversation_id: str, title: str, created_by: str, created_at_us: int
    ) -> None:
        self.conversation_id = conversation_id
        self.title = title
        self.created_by = created_by
        self.created_at_us = created_at_us
        self.last_seq = 0
        self.committed_seq = 0
        self.last_ts_us = 0
        self.purged_seq = 0
        self.group_id: bytes | None = None
        self.epoch = 0
        self.group_info: bytes | None = None
        self.group_info_epoch: int | None = None
        self.members: dict[str, Member] = {}  # current, in join order
        self.former: dict[str, Member] = {}  # removed or left (left_seq set)
        # the latest committed events, oldest first
        self.recent: deque[EventInfo] = deque(maxlen=RECENT_EVENTS)
        self._recipients: tuple[str, ...] | None = None

    @property
    def recipients(self) -> tuple[str, ...]:
        """Current member ids; a cached tuple, so an event captures it for free."""
        r = self._recipients
        if r is None:
            r = self._recipients = tuple(self.members)
        return r

    def membership_changed(self) -> None:
        self._recipients = None

    def member_view(self, user_id: str) -> Member | None:
        """The membership that governs what ``user_id`` may see (current or former)."""
        return self.members.get(user_id) or self.former.get(user_id)


class EventInfo(msgspec.Struct, gc=False, frozen=True):
    """What acks and MESSAGE_DELIVERED need of a committed event, without a disk read:
    one per event, shared by its conversation's ``recent`` window and the event index.

    Not tracked by the cyclic collector (``gc=False``; it holds only strings and ints).
    The long-lived caches take one of these per message. As GC-tracked tuples, they
    grew the young generation at a steady rate while allocations and frees balanced
    and no collection ran, so the next one, whenever it came, walked all of them.
    Measured: 47,000-74,000 young objects, 8-54 ms in one pause.
    """

    conv_id: str
    seq: int
    event_id: str
    type: int
    sender_id: str


class Event:
    """A durable conversation event, allocated but maybe not yet committed."""

    __slots__ = (
        "conv",
        "event_id",
        "info",
        "payload",
        "recipients",
        "request_id",
        "sender_id",
        "seq",
        "ts_us",
        "type",
    )

    def __init__(
        self, conv: Conv, type_: int, sender_id: str, seq: int, event_id: str, ts_us: int
    ) -> None:
        self.conv = conv
        self.type = int(type_)  # a plain int, never the (GC-tracked) IntEnum member
        self.sender_id = sender_id
        self.seq = seq
        self.event_id = event_id
        self.ts_us = ts_us
        self.payload = b""
        self.recipients: tuple[str, ...] = ()
        self.info: EventInfo | None = None
        #: A MESSAGE_SEND's idempotency key's request_id, stored in the event row
        #: (migration 0009).
        self.request_id: str | None = None

    def record(self) -> EventInfo:
        """Its :class:`EventInfo`, made once (the recent window and the index share it)."""
        info = self.info
        if info is None:
            info = self.info = EventInfo(
                self.conv.conversation_id, self.seq, self.event_id, self.type, self.sender_id
            )
        return info

    def row(self) -> sql.EventRow:
        return (
            self.conv.conversation_id,
            self.seq,
            self.event_id,
            self.type,
            self.sender_id,
            self.ts_us,
            self.payload,
            self.request_id,
        )


class Op:
    """One request's change: events, extra SQL, memory undo, and post-commit effects."""

    __slots__ = (
        "before",
        "conflict",
        "events",
        "fail",
        "finish",
        "guard",
        "send_request",
        "txns",
        "undos",
    )

    def __init__(self) -> None:
        self.events: list[Event] = []
        # Cluster mode only (ClusterEventLog): ``before`` runs ahead of the seq
        # allocation (it creates the conversations row); ``guard`` is the op's first
        # statement and decides against the database, not memory, whether it may
        # proceed: it returns None, or a value handed to ``conflict`` after the COMMIT
        # (the op is then skipped and undone, the rest of its batch commits).
        # (None, not a list: nothing allocated per op on a single node)
        self.before: list[Callable[[Conn], None]] | None = None
        self.guard: Callable[[Conn], object] | None = None
        self.conflict: Callable[[object], None] | None = None
        # (gen, user_id, request_id, event_id, ts_us) of an idempotent MESSAGE_SEND
        self.send_request: tuple[int, str, str, str, int] | None = None
        self.txns: list[Callable[[Conn], None]] = []
        self.undos: list[Callable[[], object]] = []
        self.finish: Callable[[], None] | None = None
        self.fail: Callable[[BaseException], None] | None = None

    def allocate(self, conv: Conv, type_: int, sender_id: str, now_us: int) -> Event:
        """Next seq and a strictly increasing timestamp, even if the clock steps back."""
        prev_seq, prev_ts = conv.last_seq, conv.last_ts_us
        ts = now_us if now_us > prev_ts else prev_ts + 1
        ev = Event(conv, type_, sender_id, prev_seq + 1, new_ulid(ts // 1000), ts)
        conv.last_seq = ev.seq
        conv.last_ts_us = ts

        def undo() -> None:
            conv.last_seq, conv.last_ts_us = prev_seq, prev_ts

        self.undos.append(undo)
        self.events.append(ev)
        return ev

    def on_undo(self, fn: Callable[[], object]) -> None:
        self.undos.append(fn)


@replayable
class _Inserts:
    """A batch's rows, inserted: its whole transaction when no op brings SQL of its own
    (replayable: it writes its own rows and reads nothing)."""

    __slots__ = ("requests", "rows")

    def __init__(
        self, rows: list[sql.EventRow], requests: list[tuple[int, str, str, str, int]]
    ) -> None:
        self.rows = rows
        self.requests = requests

    def __call__(self, conn: Conn) -> None:
        if self.rows:
            # No conversations-row update: a head is its newest event (load_state).
            sql.insert_events_txn(conn, self.rows)
        if self.requests:
            sql.insert_send_requests_txn(conn, self.requests)


class EventLog:
    #: False: seqs come from memory (one process owns the database); see ClusterEventLog.
    clustered = False

    def __init__(
        self,
        db: Database,
        cork: Callable[[], None] = lambda: None,
        uncork: Callable[[], None] = lambda: None,
        gather_s: float = 0.0,
        *,
        latency: Histogram | None = None,
        now_us: Callable[[], int] | None = None,
    ) -> None:
        self.db = db
        # A batch that would start within STREAM_S of the previous one waits gather_s
        # for company (see submit).
        self.gather_s = gather_s
        self.stream_s = STREAM_S
        self._last_start = -1e9
        # /metrics: seconds from an event's server timestamp (taken when the request
        # was handled) to its COMMIT; None when metrics are off (SPEC §12.25).
        self.latency = latency if now_us is not None else None
        self.now_us = now_us
        # Effects of one committed batch are corked: frames per connection are joined
        # into one write (the outbox's cork/uncork).
        self.cork = cork
        self.uncork = uncork
        self._queue: list[Op] = []
        #: Called as the next batch is handed to storage, just before it: writers that
        #: queue their own write then share the writer's wake-up and transaction
        #: (DeliveryWriter: cursor writes in a stream of sends). See :meth:`ride`.
        self._riders: list[Callable[[], None]] = []
        self._busy = False
        #: The batch in flight committed on the loop (Database.release): the loop read
        #: no frames meanwhile.
        self._held_loop = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.batches = 0
        self.events_written = 0

    def submit(self, op: Op) -> None:
        self._queue.append(op)
        if not self._busy:
            self._busy = True
            self._idle.clear()
            loop = asyncio.get_running_loop()
            now = loop.time()
            # In a stream of sends (the last batch started moments ago) a short wait
            # gathers the next ones into the same commit: the fixed cost of a commit
            # (transaction, fsync, thread hops, wake-ups) is shared. A lone send, or
            # one at a quiet time, starts at once.
            if self.gather_s > 0 and now - self._last_start < self.stream_s:
                loop.call_later(self.gather_s, self._start)
            else:
                loop.call_soon(self._start)

    def ride(self, submit: Callable[[], None]) -> bool:
        """Call ``submit`` (which queues a write of its own) just before the next batch
        goes to storage — if one is likely soon: a batch started within ``stream_s``. False
        otherwise, or in cluster mode: nothing will call ``submit``. Costs nothing when
        no batch comes: the caller's own fallback (a timer) still submits, and
        ``submit`` must tolerate being called after that (once it has run, a no-op)."""
        if self.clustered:
            return False
        if asyncio.get_running_loop().time() - self._last_start >= self.stream_s:
            return False
        self._riders.append(submit)
        return True

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_start = loop.time()
        # One loop iteration more before the batch is cut: frames read meanwhile join
        # it. (The batch used to start in a task's first step, one iteration later;
        # cutting it at once gave smaller batches: more commits, more CPU per message.)
        loop.call_soon(self._next)

    # One batch in flight, driven by callbacks rather than a task: a batch costs one
    # future and one callback on the loop, not a task, three coroutines and their
    # resumptions (these fixed costs are paid per commit, and a commit at 1,000 msgs/s
    # holds ~4 sends: docs/performance.md, sixth session).
    def _next(self) -> None:
        """Hand everything queued to storage as one batch, or go idle."""
        if not self._queue:
            self._busy = False
            self._idle.set()
            return
        batch, self._queue = self._queue, []
        db = self.db
        try:
            txn = self._txn(batch)
            # The riders' writes and the batch go to storage as one batch, which may
            # commit right here (Database.release).
            db.hold()
            try:
                if self._riders:
                    riders, self._riders = self._riders, []
                    for submit in riders:
                        try:
                            submit()
                        except Exception:  # never at the cost of this batch
                            log.exception("a write riding with an event batch failed to queue")
                fut = db.submit(txn)
            finally:
                db.release()
        except Exception as exc:  # storage closed, or a bug building the batch
            # The same path as a failed COMMIT: undone, answered, then the next batch.
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
        self._held_loop = fut.done()
        fut.add_done_callback(partial(self._written, batch))

    def _written(self, batch: list[Op], fut: asyncio.Future[Any]) -> None:
        try:
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is not None:
                self._failed(batch, exc)
            else:
                self._committed(batch, fut.result())
        finally:
            # whatever went wrong above, the log never stays busy
            if self._held_loop:
                # The commit held the loop: sends that came meanwhile are still unread.
                # One iteration more, so they form the next batch now, as they would
                # have if read during a commit on the writer thread, rather than wait
                # for the next gather.
                self._held_loop = False
                asyncio.get_running_loop().call_soon(self._next)
            else:
                self._next()

    def _txn(self, batch: list[Op]) -> Callable[[Conn], Any]:
        """The one transaction of ``batch`` (runs on the writer thread, or on the loop:
        Database.release)."""
        rows: list[sql.EventRow] = []
        txns: list[Callable[[Conn], None]] = []
        requests: list[tuple[int, str, str, str, int]] = []
        for op in batch:
            for ev in op.events:
                rows.append(ev.row())
            if op.before:
                txns.extend(op.before)
            if op.txns:
                txns.extend(op.txns)
            if op.send_request is not None:
                requests.append(op.send_request)

        if not txns:  # nearly every batch: replayable, marked once on its class
            return _Inserts(rows, requests)

        def txn(conn: Conn) -> None:
            # Extra SQL first: it creates conversations and members the events refer to.
            for fn in txns:
                fn(conn)
            _Inserts(rows, requests)(conn)

        return txn

    def _failed(self, batch: list[Op], exc: BaseException) -> None:
        """The batch's transaction failed: undo every op (newest first), answer each."""
        log.error("event batch of %d ops failed: %s", len(batch), exc)
        for op in reversed(batch):
            for undo in reversed(op.undos):
                undo()
        for op in batch:
            if op.fail is not None:
                op.fail(exc)

    def _committed(self, batch: list[Op], result: Any) -> None:
        self.batches += 1
        latency = self.latency
        if latency is not None and self.now_us is not None:
            now = self.now_us()
            for op in batch:
                for ev in op.events:
                    latency.observe((now - ev.ts_us) / 1e6)
        self.cork()
        try:
            self._finish(batch)
        finally:
            self.uncork()

    def _finish(self, batch: list[Op]) -> None:
        for op in batch:
            self.events_written += len(op.events)
            for ev in op.events:
                conv = ev.conv
                conv.committed_seq = ev.seq
                conv.recent.append(ev.record())
            if op.finish is not None:
                try:
                    op.finish()
                except Exception:
                    log.exception("post-commit effect failed")

    async def wait_idle(self) -> None:
        await self._idle.wait()


#: Event payload classes whose ``seq`` and ``server_timestamp`` the database assigns in
#: cluster mode (ClusterEventLog re-renders a payload built with a provisional seq).
RENDERED: dict[int, type[Any]] = {
    T.MESSAGE_RECEIVE: pb.MessageReceive,
    T.GROUP_MEMBER_ADDED: pb.GroupMemberAdded,
    T.GROUP_MEMBER_REMOVED: pb.GroupMemberRemoved,
    T.MLS_COMMIT_BROADCAST: pb.MLSCommitBroadcast,
}


def assign_seqs(events: list[Event], head: list[int]) -> None:
    """Cluster mode (SPEC §12.27): the seqs of ``events`` (one conversation) come from
    the database, in the transaction that stores them: ``head`` is the conversation
    row's [last_seq, last_ts_us], read under its lock (``csql.lock_heads_txn``), so
    writers of one conversation on different nodes are serialised until COMMIT and the
    seq stays dense and unique; timestamps stay strictly increasing per conversation.
    ``head`` moves past the events. Runs on the writer: it rewrites each event's seq,
    timestamp and payload in place (nothing on the loop reads an event between submit
    and its op's finish or fail)."""
    seq, prev_ts = head
    for ev in events:
        seq += 1
        ts = ev.ts_us if ev.ts_us > prev_ts else prev_ts + 1
        if seq != ev.seq or ts != ev.ts_us:
            ev.seq, ev.ts_us = seq, ts
            cls = RENDERED.get(ev.type)
            if cls is not None:
                msg = cls.FromString(ev.payload)
                msg.seq = seq
                msg.server_timestamp = ts
                ev.payload = msg.SerializeToString()
        prev_ts = ts
    head[0], head[1] = seq, prev_ts


class ClusterEventLog(EventLog):
    """The event log of a cluster node (SPEC §12.27): same group commit, but seqs are
    allocated in the database (:func:`assign_seqs`), every op may carry a ``guard``
    decided by the database, and what happens after COMMIT is handed to ``committed``
    (the cluster service: ordered local fan-out and the notification to other nodes)
    instead of running ``op.finish`` directly."""

    clustered = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: set by compose: (ops that committed) -> ordered effects + bus notification
        self.committed: Callable[[list[Op]], None] = _finish_all
        #: set by compose: an op lost to the database's verdict (memory was stale)
        self.conflicted: Callable[[Op], None] = lambda op: None
        #: event_id -> op, from submit until its op finished or failed (the resync
        #: path must not deliver a local event before its own op does)
        self.inflight: dict[str, Op] = {}

    def submit(self, op: Op) -> None:
        for ev in op.events:
            self.inflight[ev.event_id] = op
        super().submit(op)

    def _txn(self, batch: list[Op]) -> Callable[[Conn], Any]:
        # A constant number of round trips per batch, not several per op: on
        # PostgreSQL each statement is a round trip from the writer thread, and with a
        # few hundred ops in flight a batch of per-op statements took a second while
        # the next ops queued behind it (docs/scaling.md, "Measured"). So: every
        # conversation row of the batch is locked and its head read in one statement
        # (sorted: two nodes' batches never take rows in opposite orders and deadlock),
        # the batch's idempotency claims go in one statement, seqs are assigned from
        # the heads in memory, and the events and the new heads are written at the end
        # (pipelined). An op with extra SQL or another kind of guard sees the database
        # as before: what earlier ops of the batch wrote is flushed ahead of it.
        conv_ids = sorted({op.events[0].conv.conversation_id for op in batch if op.events})
        claims = [op.guard for op in batch if isinstance(op.guard, csql.SendClaim)]
        batch_claims = csql.batchable_claims(claims)

        def txn(conn: Conn) -> list[object]:
            heads = csql.lock_heads_txn(conn, conv_ids)
            claimed: dict[int, object] = {}
            if batch_claims:
                found = csql.claim_send_requests_txn(conn, claims)
                claimed = {id(c): v for c, v in zip(claims, found, strict=True)}
            rows: list[sql.EventRow] = []
            moved: set[str] = set()

            def flush() -> None:
                if rows:
                    sql.insert_events_txn(conn, rows)
                    rows.clear()
                if moved:
                    csql.set_heads_txn(conn, [(heads[c][0], heads[c][1], c) for c in sorted(moved)])
                    moved.clear()

            verdicts: list[object] = []
            for op in batch:
                guard = op.guard
                if guard is not None:
                    if id(guard) in claimed:
                        verdict = claimed[id(guard)]
                    else:
                        flush()
                        verdict = guard(conn)
                    if verdict is not None:
                        verdicts.append(verdict)
                        continue
                if op.before:
                    flush()
                    for fn in op.before:
                        fn(conn)
                if op.events:
                    conv_id = op.events[0].conv.conversation_id
                    head = heads.get(conv_id)
                    if head is None:  # created by this op's ``before``
                        head = csql.lock_heads_txn(conn, [conv_id]).get(conv_id)
                        if head is None:
                            raise LookupError(f"conversation {conv_id} has no row")
                        heads[conv_id] = head
                    assign_seqs(op.events, head)
                    moved.add(conv_id)
                if op.txns:
                    flush()
                    for fn in op.txns:
                        fn(conn)
                if op.events:
                    rows.extend(ev.row() for ev in op.events)
                if op.send_request is not None:
                    flush()
                    sql.insert_send_requests_txn(conn, [op.send_request])
                verdicts.append(None)
            flush()
            return verdicts

        return txn

    def _failed(self, batch: list[Op], exc: BaseException) -> None:
        inflight = self.inflight
        for op in batch:
            for ev in op.events:
                inflight.pop(ev.event_id, None)
        super()._failed(batch, exc)

    def _committed(self, batch: list[Op], result: Any) -> None:
        verdicts: list[object] = result
        inflight = self.inflight
        self.batches += 1
        done: list[Op] = []
        for op, verdict in zip(batch, verdicts, strict=True):
            if verdict is None:
                done.append(op)
                self.events_written += len(op.events)
                continue
            for ev in op.events:
                inflight.pop(ev.event_id, None)
            for undo in reversed(op.undos):
                undo()
            if op.conflict is not None:
                try:
                    op.conflict(verdict)
                except Exception:
                    log.exception("conflict answer failed")
            self.conflicted(op)
        latency = self.latency
        now = self.now_us() if latency is not None and self.now_us is not None else 0
        for op in done:
            for ev in op.events:
                conv = ev.conv
                if ev.seq > conv.last_seq:
                    conv.last_seq, conv.last_ts_us = ev.seq, ev.ts_us
                if latency is not None:
                    latency.observe(max(0, now - ev.ts_us) / 1e6)
        self.cork()
        try:
            self.committed(done)
        finally:
            self.uncork()
        for op in done:
            for ev in op.events:
                inflight.pop(ev.event_id, None)


def _finish_all(batch: list[Op]) -> None:
    for op in batch:
        if op.finish is not None:
            op.finish()


def load_state(
    records: tuple[list[sql.ConversationRecord], list[sql.MemberRecord]],
) -> dict[str, Conv]:
    convs: dict[str, Conv] = {}
    for r in records[0]:
        c = Conv(r.conversation_id, r.title, r.created_by, r.created_at_us)
        c.last_seq = c.committed_seq = r.last_seq
        c.last_ts_us = r.last_ts_us
        c.purged_seq = r.purged_seq
        c.group_id = r.mls_group_id
        c.epoch = r.mls_epoch
        c.group_info = r.group_info
        c.group_info_epoch = r.group_info_epoch
        convs[c.conversation_id] = c
    for m in records[1]:
        conv = convs.get(m.conversation_id)
        if conv is None:
            continue
        member = Member(m.user_id, m.role, m.joined_seq, m.joined_at_us, m.left_seq)
        (conv.former if m.left_seq is not None else conv.members)[m.user_id] = member
    return convs
