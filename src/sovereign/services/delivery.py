"""Delivery: sends, idempotency, offline sync, acks and MESSAGE_DELIVERED (SPEC §4 READY,
§5, §12.1, §12.12, §12.14-§12.16, §12.22).

Theory of operation
-------------------
A MESSAGE_SEND becomes an :class:`~sovereign.services.eventlog.Op` built in memory (no
disk read) and committed by the event log in a group commit; after the commit the
sender gets its echo (the response) and every other live connection of every member
gets the event, encoded once. Nothing is written per recipient: a device has a cursor
per conversation (the highest acked seq), and on READY it gets everything above its
cursors (per conversation in seq order), its pending welcomes, SYNC_COMPLETE and the
presence of its contacts. Events committed while that backlog streams wait in the
session's :class:`~sovereign.services.session.SyncState` and follow it without
duplicates; only then does the connection go live for direct fan-out.

Acks move cursors in memory and are written in coalesced batches
(:class:`DeliveryWriter`); the first device of a user to pass a message moves that
user's delivered position and sends MESSAGE_DELIVERED to the senders it passed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from sovereign import implementations
from sovereign.clock import Clock
from sovereign.codec import encode_envelope, encode_message_delivered, encode_message_receive
from sovereign.codec.payloads import MessageAck, MessageSend
from sovereign.config import Config
from sovereign.errors import CloseCode, ErrorCode, SovereignError
from sovereign.protocol.types import MessageType as T
from sovereign.services import ids
from sovereign.services.eventlog import Conv, Event, EventInfo, EventLog, Op
from sovereign.services.idempotency import IDEMPOTENCY_US, LOAD_PAGE, SendRequests
from sovereign.services.ports import NullPeers, Outbox, Peers, Tasks
from sovereign.services.session import Session, SyncState
from sovereign.services.state import ConversationState, Device
from sovereign.storage import cluster as csql
from sovereign.storage import messaging as sql
from sovereign.storage.database import Conn, Database, replayable
from sovereign.storage.errors import StorageError
from sovereign.storage.sessions import SessionRow
from sovereign.v1 import sovereign_pb2 as pb

log = logging.getLogger("sovereign.delivery")

SYNC_PAGE = 500
SYNC_CHUNK_BYTES = 64 * 1024
#: SPEC §12.32: ids in one MESSAGE_ACK (message_id and message_ids together).
MAX_ACK_IDS = 1000


class DeliveryWriter:
    """Coalesces cursor, delivered-position, welcome-ack and read-marker writes: everything
    that accumulates while one transaction commits goes into the next (SPEC §5).

    In a stream of sends (``ride_s`` > 0) the write rides with the next event batch: it
    is queued to storage just before that batch, so both reach the writer thread in one
    wake-up and share one transaction (:meth:`EventLog.ride`); if no batch starts within
    ``ride_s``, it goes alone. Without riding, a cursor write woke the writer thread
    only for it to wait there for the event write (Database ``lazy_ms``)."""

    def __init__(
        self,
        db: Database,
        outbox: Outbox,
        clock: Clock,
        eventlog: EventLog | None = None,
        ride_s: float = 0.0,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.clock = clock
        self.eventlog = eventlog
        self.ride_s = ride_s
        #: (conversation_id, user_id, device_id) -> seq: devices' cursors, and users'
        #: delivered positions under device_id ``sql.DELIVERED`` (one table, see 0007)
        self.positions: dict[tuple[str, str, str], int] = {}
        #: (device_id, conversation_id) of cursors to delete
        self.dropped: set[tuple[str, str]] = set()
        self.welcome_acks: set[tuple[str, str]] = set()
        self.read_markers: dict[tuple[str, str], int] = {}
        self._waiters: list[Callable[[BaseException | None], None]] = []
        self._busy = False
        #: set while a write waits to ride with the next event batch
        self._ride_timer: asyncio.TimerHandle | None = None
        self._flushing = 0
        self.rides = 0  # writes that went with an event batch (tests, docs)

    @property
    def busy(self) -> bool:
        """A write is queued, waiting to ride or in flight (tests settle on this)."""
        return self._busy

    def cursor(self, dev: Device, conv_id: str, seq: int) -> None:
        # Cursors only move forward: two acks of one device may interleave across an
        # await, and the older one must not overwrite the newer pending value.
        self.dropped.discard((dev.device_id, conv_id))
        key = (conv_id, dev.user_id, dev.device_id)
        prev = self.positions.get(key)
        if prev is None or seq > prev:
            self.positions[key] = seq

    def drop_cursor(self, dev: Device, conv_id: str) -> None:
        self.positions.pop((conv_id, dev.user_id, dev.device_id), None)
        self.dropped.add((dev.device_id, conv_id))

    def delivered(self, conv_id: str, user_id: str, seq: int) -> None:
        """The user's delivered position moved (callers only ever move it forward)."""
        self.positions[(conv_id, user_id, sql.DELIVERED)] = seq

    def after(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(None)`` once everything recorded so far is committed, or
        ``callback(error)`` if that write failed. No task or future per caller."""
        self._waiters.append(callback)
        if not self._busy:
            self._busy = True
            self._kick()

    async def flush(self) -> None:
        """Resolve once everything recorded so far is committed (a write waiting to
        ride with an event batch goes now)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(exc: BaseException | None) -> None:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(SovereignError(ErrorCode.DATABASE_ERROR, "could not store"))

        self._flushing += 1  # no riding until it resolves: a flush never waits for it
        try:
            self.after(done)
            if self._ride_timer is not None:
                self._ride()
            await fut
        finally:
            self._flushing -= 1

    def _kick(self) -> None:
        """Write what is recorded: with the next event batch if one is likely soon
        (waiting at most ``ride_s``), else now."""
        log_ = self.eventlog
        if self.ride_s > 0 and not self._flushing and log_ is not None and log_.ride(self._ride):
            loop = asyncio.get_running_loop()
            self._ride_timer = loop.call_later(self.ride_s, self._ride)
        else:
            # Next iteration, as a task's first step was: every ack read in this one
            # joins the write.
            asyncio.get_running_loop().call_soon(self._write)

    def _ride(self) -> None:
        """Queue the write now: called by the event log just before its batch goes to
        storage, or by the timer when no batch came. Whichever is second does nothing."""
        timer = self._ride_timer
        if timer is None:
            return
        self._ride_timer = None
        timer.cancel()
        self.rides += 1
        self._write()

    # One write in flight, driven by callbacks as the event log's batches are: a write
    # costs one future and one callback on the loop, not a task and its resumptions.
    def _write(self) -> None:
        """Queue one write of everything recorded; its waiters are answered when it
        commits (or at once, if there is nothing to write)."""
        waiters, write = self._take()
        if write is None:
            self._settled(waiters, None)
            return
        try:
            # Not durable: losing an ack in a power cut only redelivers.
            fut = self.db.submit(write, durable=False)
        except Exception as exc:  # storage closed
            log.error("delivery state write failed: %s", exc)
            self._settled(waiters, exc)
            return
        fut.add_done_callback(partial(self._written, waiters))

    def _written(
        self, waiters: list[Callable[[BaseException | None], None]], fut: asyncio.Future[None]
    ) -> None:
        error = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if error is not None:
            log.error("delivery state write failed: %s", error)
        self._settled(waiters, error)

    def _settled(
        self, waiters: list[Callable[[BaseException | None], None]], error: BaseException | None
    ) -> None:
        self._answer(waiters, error)
        if self._waiters:  # recorded while that write committed: the next one
            self._kick()
        else:
            self._busy = False

    def _take(
        self,
    ) -> tuple[list[Callable[[BaseException | None], None]], Callable[[Conn], None] | None]:
        """The waiters so far, and one write of everything recorded for them (None if
        there is nothing to write)."""
        waiters, self._waiters = self._waiters, []
        # Most writes hold cursors and delivered positions only: the other kinds are
        # taken (and the clock read) only when there are some.
        positions: list[tuple[str, str, str, int]] = []
        dropped: list[tuple[str, str]] = []
        acks: list[tuple[str, str]] = []
        marks: list[tuple[str, str, int, int]] = []
        if self.positions:
            positions = [(c, u, d, s) for (c, u, d), s in self.positions.items()]
            self.positions = {}
        if self.dropped:
            dropped = list(self.dropped)
            self.dropped = set()
        if self.welcome_acks:
            acks = list(self.welcome_acks)
            self.welcome_acks = set()
        if self.read_markers:
            now = self.clock.now_us()
            marks = [(c, u, s, now) for (c, u), s in self.read_markers.items()]
            self.read_markers = {}
        if not (positions or dropped or acks or marks):
            return waiters, None
        return waiters, _StateWrite(positions, dropped, acks, marks)

    def _answer(
        self, waiters: list[Callable[[BaseException | None], None]], error: BaseException | None
    ) -> None:
        self.outbox.cork()  # the acks' responses: one write per connection
        try:
            for cb in waiters:
                try:
                    cb(error)
                except Exception:
                    log.exception("ack completion failed")
        finally:
            self.outbox.uncork()


@replayable
class _StateWrite:
    """One write of delivery state (replayable: upserts and deletes of its own rows,
    marked once on the class rather than on each write)."""

    __slots__ = ("acks", "dropped", "marks", "positions")

    def __init__(
        self,
        positions: list[tuple[str, str, str, int]],
        dropped: list[tuple[str, str]],
        acks: list[tuple[str, str]],
        marks: list[tuple[str, str, int, int]],
    ) -> None:
        self.positions, self.dropped, self.acks, self.marks = positions, dropped, acks, marks

    def __call__(self, conn: Conn) -> None:
        sql.save_delivery_state_txn(conn, self.positions, self.dropped, self.acks, self.marks)


class DeliveryService:
    def __init__(
        self,
        config: Config,
        db: Database,
        state: ConversationState,
        eventlog: EventLog,
        outbox: Outbox,
        clock: Clock,
        tasks: Tasks,
        peers: Peers | None = None,
        ride_s: float = 0.0,
    ) -> None:
        self.config = config
        self.db = db
        self.state = state
        self.eventlog = eventlog
        #: Cluster mode (SPEC §12.27): welcomes, MESSAGE_DELIVERED and delivered
        #: positions reach the other nodes.
        self.peers: Peers = peers if peers is not None else NullPeers()
        self.outbox = outbox
        self.clock = clock
        self.tasks = tasks
        self.writer = DeliveryWriter(db, outbox, clock, eventlog, ride_s)
        #: Idempotency keys in bounded memory, storage behind (services/idempotency.py).
        self.requests = SendRequests()
        # SQLite on one node: keys ride in the event rows and are folded (migration 0009).
        self.requests.fold = db.engine_name == "sqlite" and not eventlog.clustered
        self.syncing: set[Session] = set()
        #: Called as the sync's last write is made, after presence: frames to end it
        #: with (the MLS service's MLS_KEY_PACKAGE_LOW, when it can tell without a read).
        self.sync_tail: list[Callable[[Session], bytes]] = []
        #: Awaited after that write (SPEC §4): what a sync tail could not decide (the
        #: MLS service's LOW when its count must be read).
        self.after_sync: list[Callable[[Session], Awaitable[None]]] = []
        #: Reads that ride on the sync's read of a device not in memory, in the same
        #: transaction (a reader hop each saved in a resume storm): each gets the
        #: session and returns a function of the connection that keeps its result.
        self.sync_reads: list[Callable[[SyncState], Callable[[Conn, str], None]]] = []
        #: Welcomes pushed so far: a welcome list read before it changed may be stale.
        self._welcome_pushes = 0
        #: Called once a connection takes live events (presence aggregation).
        self.went_live: list[Callable[[Session], None]] = []

    async def load(self) -> None:
        """The idempotency filters from the stored keys of the window (keys only, in
        pages: memory stays bounded however many there are)."""
        since = self.clock.now_us() - IDEMPOTENCY_US
        after: tuple[int, str, str] | None = None
        total = 0
        while True:
            rows = await self.db.read(
                partial(sql.send_request_keys_txn, since_us=since, after=after, limit=LOAD_PAGE)
            )
            self.requests.load_page(rows)
            total += len(rows)
            if len(rows) < LOAD_PAGE:
                break
            after = rows[-1][:3]
        requests = self.requests
        if requests.fold:
            unfolded, newest = await self.db.read(sql.unfolded_send_requests_txn)
            ids.start_after(newest, implementations.load("ids"))
            requests.load_unfolded(unfolded)
            total += len(unfolded)
        log.info("loaded %d idempotency keys", total)

    async def stop(self) -> None:
        await self.eventlog.wait_idle()
        await self.writer.flush()

    def submit(
        self, s: Session, rid: str, op: Op, finish: Callable[[], None], failure: str
    ) -> None:
        """Commit ``op`` (group commit); ``finish`` runs after the commit, a failed
        commit answers the requester 9002 with ``failure`` (SPEC §8)."""
        outbox = self.outbox
        op.finish = finish
        op.fail = lambda exc: outbox.send_error(s, ErrorCode.DATABASE_ERROR, rid, failure)
        self.eventlog.submit(op)

    # -- fan-out ----------------------------------------------------------------------
    def publish(self, ev: Event, exclude: Session | None) -> None:
        """Fan one committed event out: encode once, write to every live connection of
        every recipient except ``exclude`` (the requester, who gets its echo)."""
        frame = self.outbox.frame(encode_envelope(ev.type, "", ev.payload))
        self.outbox.publish(frame, ev.recipients, exclude)
        if self.syncing:
            conv_id = ev.conv.conversation_id
            for s in self.syncing:
                if s is not exclude and s.user_id in ev.recipients and s.sync is not None:
                    s.sync.buffer.append((conv_id, ev.seq, "", frame))

    def push_welcome(
        self, recipient: str, frame: bytes, event_id: str, payload: bytes | None = None
    ) -> None:
        """A stored welcome to the recipient's live connections, or after its backlog;
        with ``payload``, to its connections on the other nodes of a cluster too."""
        self._welcome_pushes += 1
        self.outbox.publish(frame, (recipient,), None)
        if payload is not None and self.peers.clustered:
            self.peers.welcome(recipient, event_id, payload)
        for s in self.syncing:
            if s.user_id == recipient and s.sync is not None:
                s.sync.buffer.append(("", 0, event_id, frame))

    # -- MESSAGE_SEND (SPEC §5, §12.1, §12.16) -------------------------------------------
    def send_message(self, s: Session, rid: str, req: MessageSend) -> None:
        """Idempotency is checked first: a retry of a stored send returns the original
        echo even if the sender has since left the conversation (docs/decisions.md)."""
        user_id = s.user_id
        key = (user_id, rid)
        requests = self.requests
        if rid:
            pending = requests.pending.get(key)
            if pending is not None:  # the original is still committing: answer with it
                self._join_pending(s, rid, pending)
                return
            # A new key (nearly every send) is in neither tier: no clock read for it.
            if key in requests.recent:
                event_id = requests.known(key, self.clock.now_us())
                if event_id is not None:
                    self.tasks.spawn(s, rid, self._replay_send(s, rid, event_id))
                    return
        conv = self.state.conv_for_member(req.conversation_id, user_id)
        if len(req.encrypted_payload) > self.config.max_message_size_bytes:
            raise SovereignError(
                ErrorCode.MESSAGE_TOO_LARGE, "encrypted_payload exceeds max_message_size_bytes"
            )
        if rid and requests.maybe_stored(key):
            # Older than the recent tier (or a filter false positive): in memory if its
            # key is not folded yet, else one storage read.
            event_id = requests.unfolded_event(key, self.clock.now_us())
            if event_id is not None:
                self.tasks.spawn(s, rid, self._replay_send(s, rid, event_id))
            else:
                self.tasks.spawn(s, rid, self._send_checked(s, rid, req, conv))
            return
        self._send_now(s, rid, req, conv)

    def _join_pending(self, s: Session, rid: str, prior: Op) -> None:
        prev_finish, prev_fail = prior.finish, prior.fail
        echo = prior.events[0]
        outbox = self.outbox

        def finish_both() -> None:
            if prev_finish is not None:
                prev_finish()
            outbox.send_payload(s, T.MESSAGE_RECEIVE, rid, echo.payload)

        def fail_both(exc: BaseException) -> None:
            if prev_fail is not None:
                prev_fail(exc)
            outbox.send_error(s, ErrorCode.DATABASE_ERROR, rid, "could not store the message")

        prior.finish, prior.fail = finish_both, fail_both
        prev_conflict = prior.conflict
        if prev_conflict is not None:

            def conflict_both(verdict: object) -> None:
                prev_conflict(verdict)
                self._answer_original(s, rid, verdict)

            prior.conflict = conflict_both

    def _answer_original(self, s: Session, rid: str, verdict: object) -> None:
        """Cluster mode: the database said another node stored this request first;
        answer with that original event (never a second one, never 9002)."""
        if isinstance(verdict, bytes) and verdict:
            self.outbox.send_payload(s, T.MESSAGE_RECEIVE, rid, verdict)
        else:
            self.outbox.send_error(
                s, ErrorCode.INTERNAL_ERROR, rid, "original message no longer stored"
            )

    async def _send_checked(self, s: Session, rid: str, req: MessageSend, conv: Conv) -> None:
        """A request_id not in memory may be in storage: one indexed read (the key and
        its event's payload). The original may also commit during the read: ``watch``
        catches it even if the recent tier has already let it go."""
        key = (s.user_id, rid)
        requests = self.requests
        since = self.clock.now_us() - IDEMPOTENCY_US
        requests.watch(key)
        try:
            found = await self.db.read(
                partial(
                    sql.send_request_event_txn,
                    user_id=s.user_id,
                    request_id=rid,
                    since_us=since,
                )
            )
        finally:
            committed = requests.unwatch(key)
        if found is not None:
            if found[1] is None:
                raise SovereignError(ErrorCode.INTERNAL_ERROR, "original message no longer stored")
            self.outbox.send_payload(s, T.MESSAGE_RECEIVE, rid, found[1])
            return
        if committed is not None:  # the original committed while we read
            await self._replay_send(s, rid, committed)
            return
        if key in requests.pending or requests.known(key, self.clock.now_us()) is not None:
            # Raced with a duplicate that is now committing or committed: answer with it.
            self.send_message(s, rid, req)
            return
        self._send_now(s, rid, req, self.state.conv_for_member(conv.conversation_id, s.user_id))

    async def _replay_send(self, s: Session, rid: str, event_id: str) -> None:
        row = await self.db.read(lambda c: sql.event_payload_txn(c, event_id))
        if row is None:
            raise SovereignError(ErrorCode.INTERNAL_ERROR, "original message no longer stored")
        self.outbox.send_payload(s, T.MESSAGE_RECEIVE, rid, row[2])

    def _send_now(self, s: Session, rid: str, req: MessageSend, conv: Conv) -> None:
        user_id = s.user_id
        op = Op()
        ev = op.allocate(conv, T.MESSAGE_RECEIVE, user_id, self.clock.now_us())
        ev.recipients = conv.recipients
        ev.payload = encode_message_receive(
            ev.event_id,
            conv.conversation_id,
            user_id,
            req.encrypted_payload,
            ev.ts_us,
            req.message_type,
            ev.seq,
        )
        requests = self.requests
        key = (user_id, rid)
        if rid:
            requests.begin(key, op, ev.ts_us)
            op.on_undo(partial(requests.undo, key))
            # In the event row; on SQLite with one node its only record until a fold
            # copies it (requests.fold), elsewhere with a send_requests row as well.
            ev.request_id = rid
            if self.eventlog.clustered:
                # The database decides (another node may hold the same request_id).
                since = ev.ts_us - IDEMPOTENCY_US
                op.guard = csql.SendClaim(user_id, rid, ev.event_id, ev.ts_us, since)
                op.conflict = lambda verdict: self._answer_original(s, rid, verdict)
            elif not requests.fold:
                op.send_request = (requests.next_gen(), user_id, rid, ev.event_id, ev.ts_us)
        outbox = self.outbox

        def finish() -> None:
            if rid and requests.committed(key, ev.event_id):
                self.tasks.background(self._fold(requests.start_fold()))
            self.state.index(ev)
            outbox.send_payload(s, T.MESSAGE_RECEIVE, rid, ev.payload)  # the echo = response
            self.publish(ev, s)

        self.submit(s, rid, op, finish, "could not store the message")

    async def _fold(self, gen: int) -> None:
        """Copy the keys of the sends stored since the last fold into ``send_requests``
        as generation ``gen`` (SQLite, one node: migration 0009). Not durable on its own
        (no fsync): it becomes durable with the next event batch's commit, and if it fails
        or a crash loses it, the keys are still in their event rows, after the fold's
        mark. It holds the writer 1.5-3.5 ms: on the writer thread (``long``), not the
        event loop."""
        copied = None
        try:
            copied = await self.db.write(
                partial(sql.fold_send_requests_txn, gen=gen), durable=False, long=True
            )
        except StorageError as exc:
            log.warning("folding idempotency keys failed (kept in memory): %s", exc)
        finally:
            self.requests.fold_done(copied)

    def purge_idempotency(self) -> None:
        """Forget request_ids older than the 24 h window (filters and recent keys)."""
        self.requests.purge(self.clock.now_us())

    async def purge_stored_idempotency(self) -> None:
        since = self.clock.now_us() - IDEMPOTENCY_US
        await self.db.write(partial(sql.purge_send_requests_txn, before_us=since))
        self.purge_idempotency()

    # -- devices and sync (SPEC §4 READY, §5, §12.12) -----------------------------------
    async def device_created(self, device_id: str, user_id: str) -> None:
        """A device created after its user joined starts at the current last seq."""
        convs = self.state.convs
        pairs = [(cid, convs[cid].committed_seq) for cid in self.state.user_convs.get(user_id, ())]
        if pairs:
            await self.db.write(
                partial(
                    sql.start_device_cursors_txn,
                    device_id=device_id,
                    user_id=user_id,
                    cursors=pairs,
                )
            )

    async def device(self, s: Session) -> Device:
        """The device's delivery state, loading its cursors on first use."""
        devices = self.state.devices
        dev = devices.get(s.device_id)
        if dev is None:
            created, cursors = await self.db.read(
                partial(sql.load_device_txn, session_id=s.session_id, device_id=s.device_id)
            )
            dev = self._device_loaded(s, created, cursors)
        return dev

    def _device_loaded(self, s: Session, created: int, cursors: dict[str, int]) -> Device:
        devices = self.state.devices
        dev = devices.get(s.device_id)  # another connection may have won
        if dev is None:
            dev = Device(s.device_id, s.user_id, created)
            dev.cursors = cursors
            devices[s.device_id] = dev
        return dev

    def detach(self, s: Session) -> None:
        self.syncing.discard(s)
        devices = self.state.devices
        dev = devices.get(s.device_id)
        if dev is not None:
            if s in dev.sessions:
                dev.sessions.remove(s)
            if not dev.sessions:
                del devices[s.device_id]

    def resume_read(self) -> tuple[SyncState, Callable[[Conn, SessionRow], None]]:
        """A sync state and a read to run in the resume's own transaction, once the
        token has found its session (a reader hop less per resume: docs/performance.md).

        The read keeps, in the sync state, what a READY needs of the device if it is
        not in memory then: created_at_us (the session row's), cursors, pending
        welcomes and the ``sync_reads``. Hand the state to the connection
        (``s.sync``) before :meth:`on_ready`. Cursors and the count are as safe read
        here as at the sync (see :meth:`_sync`); welcomes stand only if none was
        pushed in between: one pushed before the session is syncing would be in
        neither the read nor its buffer, so then the sync reads them again."""
        sync = SyncState(self._welcome_pushes)
        extra = [read(sync) for read in self.sync_reads]

        def read(conn: Conn, session: SessionRow) -> None:
            device_id = session.device_id
            created = session.created_at_us
            cursors = sql.load_cursors_txn(conn, device_id)
            welcomes = sql.device_extras_txn(conn, device_id, session.user_id, created, extra)
            sync.device = (created, cursors, welcomes)

        return sync, read

    def on_ready(self, s: Session) -> None:
        if s.sync is None:  # else from send_success (AUTH_SUCCESS ahead), or resume_read
            s.sync = SyncState()
        self.syncing.add(s)
        self.tasks.background(self._sync_or_close(s))

    async def _sync_or_close(self, s: Session) -> None:
        try:
            await self._sync(s)
        except Exception:
            # A device must never sit READY without its backlog: drop the connection so
            # the client reconnects and the sync starts over from its cursors.
            log.exception("offline sync failed for device %s", s.device_id)
            self.outbox.close(s, CloseCode.INTERNAL_ERROR, "sync failed")

    async def _sync(self, s: Session) -> None:
        """Backlog above the device's cursors, per conversation in seq order, then its
        welcomes, then SYNC_COMPLETE; then presence and buffered live events (SPEC §4)."""
        sync = s.sync
        assert sync is not None
        outbox = self.outbox
        append = outbox.append_frame
        out = bytearray(sync.head)  # AUTH_SUCCESS first, in the same write if no read
        try:
            # A resume storm is mostly reader hops: a device not in memory comes with
            # its pending welcomes in one read (a welcome stored after it is pushed to
            # this session's SyncState buffer, so nothing falls between).
            welcomes: list[sql.StoredWelcome] | None = None
            dev = self.state.devices.get(s.device_id)
            pre, sync.device = sync.device, None
            if dev is None and pre is not None:  # read with the token (resume_read)
                created, cursors, welcomes = pre
                if sync.welcome_mark != self._welcome_pushes:
                    welcomes = None  # read again below, now that the session buffers
                dev = self._device_loaded(s, created, cursors)
            elif dev is None:
                out = await self._head_out(s, out)
                created, cursors, welcomes = await self.db.read(
                    partial(
                        sql.load_device_sync_txn,
                        session_id=s.session_id,
                        device_id=s.device_id,
                        user_id=s.user_id,
                        extra=[read(sync) for read in self.sync_reads],
                    )
                )
                dev = self._device_loaded(s, created, cursors)
            dev.sessions.append(s)
            delivered = 0
            truncated: list[str] = []
            for conv_id, conv, start, upto in self._sync_ranges(s.user_id, dev):
                if conv.purged_seq > start:
                    truncated.append(conv_id)
                after = start
                while after < upto:
                    out = await self._head_out(s, out)
                    rows = await self.db.read(
                        partial(
                            sql.events_after_txn,
                            conversation_id=conv_id,
                            after_seq=after,
                            up_to_seq=upto,
                            limit=SYNC_PAGE,
                        )
                    )
                    if not rows:
                        break
                    for seq, _eid, type_, _s, _ts, payload in rows:
                        append(out, encode_envelope(type_, "", payload))
                        delivered += 1
                        after = seq
                    if len(out) >= SYNC_CHUNK_BYTES:
                        await outbox.write_backlog(s, out)
                        out = bytearray()
                sync.synced_upto[conv_id] = upto
            if welcomes is None:
                out = await self._head_out(s, out)
                welcomes = await self.db.read(
                    lambda c: sql.pending_welcomes_txn(
                        c, s.user_id, dev.device_id, dev.created_at_us
                    )
                )
            for event_id, _conv, _sender, _ts, payload in welcomes:
                append(out, encode_envelope(T.MLS_WELCOME_RECEIVE, "", payload))
                sync.synced_welcomes.add(event_id)
                delivered += 1
            done = pb.SyncComplete(delivered=delivered, truncated_conversation_ids=truncated)
            append(out, encode_envelope(T.SYNC_COMPLETE, "", done.SerializeToString()))
            # Presence of online contacts (SPEC §4, §12.11).
            presence = self.state.presence
            for uid in self.state.contacts(s.user_id):
                status = presence.get(uid)
                if status is not None and status != "offline":
                    note = pb.PresenceNotify(user_id=uid, status=status)
                    append(out, encode_envelope(T.PRESENCE_NOTIFY, "", note.SerializeToString()))
            for end in self.sync_tail:  # MLS_KEY_PACKAGE_LOW, in this write
                out += end(s)
            await outbox.write_backlog(s, out)
            for hook in self.after_sync:  # or after it, when a read decides
                await hook(s)
            # Live events committed meanwhile, minus what the backlog already carried.
            tail = bytearray()
            for conv_id, seq, welcome_id, frame in sync.buffer:
                if welcome_id:
                    if welcome_id in sync.synced_welcomes:
                        continue
                elif seq <= sync.synced_upto.get(conv_id, 0):
                    continue
                tail += frame
            if tail:
                await outbox.write_backlog(s, tail)
        finally:
            self.syncing.discard(s)
            s.sync = None
        if outbox.go_live(s):
            for live_hook in self.went_live:
                live_hook(s)

    async def _head_out(self, s: Session, out: bytearray) -> bytearray:
        """Before a sync's read: the frames ahead of its backlog (``SyncState.head``,
        the AUTH_SUCCESS) leave now, never behind storage. Returns the buffer to go on."""
        sync = s.sync
        if sync is None or not sync.head:
            return out
        sync.head = b""
        await self.outbox.write_backlog(s, out)
        return bytearray()

    def _sync_ranges(self, user_id: str, dev: Device) -> list[tuple[str, Conv, int, int]]:
        state = self.state
        ranges = []
        for conv_id in (*state.user_convs.get(user_id, ()), *state.user_former.get(user_id, ())):
            conv = state.convs[conv_id]
            m = conv.member_view(user_id)
            if m is None:
                continue
            cursor = dev.cursors.get(conv_id)
            if cursor is None and m.left_seq is not None:
                continue  # acked its own removal: the cursor was dropped (§12.14)
            if cursor is None:
                # §12.12: a device created after its user joined starts at the last seq
                # (normally written at device creation; this covers older devices).
                cursor = (
                    conv.committed_seq if dev.created_at_us > m.joined_at_us else m.joined_seq - 1
                )
                dev.cursors[conv_id] = cursor
                self.writer.cursor(dev, conv_id, cursor)
            cursor = max(cursor, m.joined_seq - 1)
            upto = conv.committed_seq if m.left_seq is None else min(m.left_seq, conv.committed_seq)
            if upto > cursor:
                ranges.append((conv_id, conv, cursor, upto))
            elif conv.purged_seq > cursor:
                ranges.append((conv_id, conv, cursor, cursor))
        return ranges

    # -- acks and delivered (SPEC §5, §12.14, §12.15, §12.22) ----------------------------
    def ack(self, s: Session, rid: str, req: MessageAck) -> None:
        """MESSAGE_ACK. Fast path with everything in memory: no task, no disk read; the
        response follows the coalesced cursor write (DeliveryWriter.after)."""
        first, more = req.message_id, req.message_ids
        if not more:  # one id, as most acks carry: no dedup to do
            ids = [first] if first else []
        else:
            if len(more) + (1 if first else 0) > MAX_ACK_IDS:
                # SPEC §12.32: the work of one request is bounded.
                raise SovereignError(
                    ErrorCode.MALFORMED_MESSAGE,
                    f"MESSAGE_ACK carries more than {MAX_ACK_IDS} ids",
                )
            # Order kept, duplicates dropped: a dict, not a list scan (was quadratic).
            ids = list(dict.fromkeys(i for i in (first, *more) if i))
        state = self.state
        dev = state.devices.get(s.device_id)
        index, delivered, user_id = state.event_index, state.delivered, s.user_id
        # A loop, not any() over a generator: most acks carry one id.
        slow = dev is None
        if not slow:
            for i in ids:
                info = index.get(i)
                if info is None or (info.conv_id, user_id) not in delivered:
                    slow = True
                    break
        if slow:
            self.tasks.spawn(s, rid, self._ack_slow(s, rid, ids))
            return
        assert dev is not None
        self._ack_apply(s, rid, dev, ids, {})

    async def _ack_slow(self, s: Session, rid: str, ids: list[str]) -> None:
        """Load what the fast path lacks (older events, welcomes, delivered positions):
        every unknown id in one storage read, then one read per conversation whose
        delivered position is not in memory."""
        dev = await self.device(s)
        state = self.state
        index = state.event_index
        unknown = [i for i in ids if i not in index]
        owners: dict[str, str | None] = {}
        found: dict[str, EventInfo] = {}
        if unknown:
            rows, welcome_owners = await self.db.read(
                partial(sql.ack_lookup_txn, event_ids=unknown)
            )
            for event_id, (conv_id, seq, type_, sender_id) in rows.items():
                info = found[event_id] = EventInfo(conv_id, seq, event_id, type_, sender_id)
                state.index_put(event_id, info)
            owners.update(welcome_owners)
        conv_ids = {
            info.conv_id for info in (index.get(i) or found.get(i) for i in ids) if info is not None
        }
        for conv_id in conv_ids:
            conv = state.convs.get(conv_id)
            if conv is not None:
                await self.delivered_position(conv, s.user_id)
        self._ack_apply(s, rid, dev, ids, owners, found)

    def _ack_apply(
        self,
        s: Session,
        rid: str,
        dev: Device,
        ids: list[str],
        welcome_owners: dict[str, str | None],
        loaded: dict[str, EventInfo] | None = None,
    ) -> None:
        user_id = s.user_id
        writer = self.writer
        convs = self.state.convs
        index = self.state.event_index
        moved = 0
        touched: dict[str, int] = {}
        for event_id in ids:
            # ``loaded``: looked up for this ack (the bounded index may have let go).
            info = index.get(event_id) or (loaded.get(event_id) if loaded else None)
            if info is None:
                key = (dev.device_id, event_id)
                if welcome_owners.get(event_id) == user_id and key not in writer.welcome_acks:
                    writer.welcome_acks.add(key)  # welcomes are acked one by one (§12.15)
                    moved += 1
                continue
            conv_id, seq = info.conv_id, info.seq
            conv = convs.get(conv_id)
            m = conv.member_view(user_id) if conv is not None else None
            if m is None or seq < m.joined_seq or (m.left_seq is not None and seq > m.left_seq):
                continue  # §12.14: ids the user may not see are ignored
            cur = dev.cursors.get(conv_id)
            if cur is None:
                if m.left_seq is not None:
                    continue  # its cursor there was dropped after it acked its removal
                cur = m.joined_seq - 1
            if seq > cur:
                dev.cursors[conv_id] = seq
                touched[conv_id] = seq
                moved += 1
        delivered_msgs: list[tuple[str, bytes]] = []
        for conv_id, seq in touched.items():
            conv = convs[conv_id]
            m = conv.member_view(user_id)
            assert m is not None
            if m.left_seq is not None and seq >= m.left_seq:
                # Acked its own GROUP_MEMBER_REMOVED: the cursor there is dropped (§12.14).
                dev.cursors.pop(conv_id, None)
                writer.drop_cursor(dev, conv_id)
            else:
                writer.cursor(dev, conv_id, dev.cursors[conv_id])
            delivered_msgs.extend(self._advance_delivered(conv, user_id, seq))
        outbox = self.outbox

        def done(error: BaseException | None) -> None:
            if error is not None:
                outbox.send_error(
                    s, ErrorCode.DATABASE_ERROR, rid, "could not store the acknowledgement"
                )
                return
            for sender, payload in delivered_msgs:
                self._delivered(sender, payload)
            if rid:
                outbox.send_payload(s, T.ACK, rid, _ack_payload(moved))

        writer.after(done)

    async def delivered_position(self, conv: Conv, user_id: str) -> int:
        delivered = self.state.delivered
        key = (conv.conversation_id, user_id)
        pos = delivered.get(key)
        if pos is None:
            stored = await self.db.read(
                partial(sql.load_delivery_txn, conversation_id=key[0], user_id=user_id)
            )
            m = conv.member_view(user_id)
            pos = stored if stored is not None else (m.joined_seq - 1 if m else 0)
            pos = delivered.setdefault(key, pos)
        return pos

    def _advance_delivered(self, conv: Conv, user_id: str, seq: int) -> list[tuple[str, bytes]]:
        """The first device of a user to pass messages moves its delivered position; each
        sender passed gets one MESSAGE_DELIVERED naming its last message (§12.14)."""
        delivered = self.state.delivered
        key = (conv.conversation_id, user_id)
        pos = delivered[key]  # loaded by ack / _ack_slow
        if seq <= pos:
            return []
        delivered[key] = seq
        self.writer.delivered(key[0], user_id, seq)
        if self.peers.clustered:
            self.peers.position(0, key[0], user_id, seq)
        recent = conv.recent
        if not recent or recent[0].seq > pos + 1:
            # Older than the in-memory window: look the senders up in storage.
            self.tasks.background(self._delivered_from_storage(conv, user_id, pos, seq))
            return []
        last_by_sender: dict[str, str] = {}
        for info in reversed(recent):  # newest first: stop early
            if info.seq <= pos:
                break
            sender = info.sender_id
            if info.seq <= seq and info.type == T.MESSAGE_RECEIVE and sender != user_id:
                last_by_sender.setdefault(sender, info.event_id)
        return _delivered_msgs(conv, user_id, seq, last_by_sender)

    async def _delivered_from_storage(self, conv: Conv, user_id: str, pos: int, seq: int) -> None:
        rows = await self.db.read(
            partial(
                sql.events_after_txn,
                conversation_id=conv.conversation_id,
                after_seq=pos,
                up_to_seq=seq,
                limit=1_000_000,
            )
        )
        last_by_sender: dict[str, str] = {}
        for _s, event_id, type_, sender, _ts, _p in rows:
            if type_ == T.MESSAGE_RECEIVE and sender != user_id:
                last_by_sender[sender] = event_id
        msgs = _delivered_msgs(conv, user_id, seq, last_by_sender)
        await self.writer.flush()
        for sender, payload in msgs:
            self._delivered(sender, payload)

    def _delivered(self, sender: str, payload: bytes) -> None:
        """MESSAGE_DELIVERED (a serialized MessageDelivered) to the sender's
        connections, on every node (§12.14)."""
        env = encode_envelope(T.MESSAGE_DELIVERED, "", payload)
        self.outbox.publish(self.outbox.frame(env), (sender,), None)
        if self.peers.clustered:
            self.peers.push((sender,), env)


#: Serialized Ack{count} for the counts one MESSAGE_ACK usually moves (protobuf's
#: runtime took 0.5 us to build one, once per ack).
_ACK_PAYLOADS = tuple(pb.Ack(count=n).SerializeToString() for n in range(128))


def _ack_payload(count: int) -> bytes:
    if count < len(_ACK_PAYLOADS):
        return _ACK_PAYLOADS[count]
    return pb.Ack(count=count).SerializeToString()


def _delivered_msgs(
    conv: Conv, user_id: str, seq: int, last_by_sender: dict[str, str]
) -> list[tuple[str, bytes]]:
    """(sender, serialized MessageDelivered) for each sender passed."""
    conv_id = conv.conversation_id
    return [
        (sender, encode_message_delivered(event_id, user_id, conv_id, seq))
        for sender, event_id in last_by_sender.items()
    ]
