"""Delivery tracking: from pushed frames to the application, and back as acks (SPEC §5).

:class:`Delivery` takes every event the server pushes and

* **dedupes and orders** it (per conversation ``seq``, and by event id, with the
  :class:`~sovereign.client.tracking.SeqTracker`): a duplicate (the server resends what
  was not acknowledged yet) is not delivered twice but acknowledged again;
* **repairs gaps**: a seq jump holds that conversation's live events, pages
  MESSAGE_HISTORY_REQUEST forward from the last seq, delivers the missing events, then
  the held ones; SYNC_COMPLETE waits until every repair finished;
* **routes** it, in order, to the application's callbacks (run one at a time by one
  task), streams and ``wait_for`` waiters; until the first consumer registers, events
  wait in a bounded backlog (so nothing of the sync burst right after login is lost);
* **acknowledges** it once the application is done with it (every holder released it):
  at most every ``ack_interval`` one MESSAGE_ACK carries the newest id per conversation
  plus each welcome id (the :class:`~sovereign.client.tracking.AckTracker` never lets an
  ack pass an event the application still holds).

Our own MESSAGE_SEND / MLS_COMMIT echoes are not delivered (the caller has them as the
return value) but move the seq position and are acknowledged.

The session (:class:`Host`) says which connection is current and runs tasks; requests
(history pages, acks) go through a :class:`Caller`, the request table.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol

from google.protobuf.message import DecodeError

from sovereign.client._transport import Connection
from sovereign.client.errors import (
    ClientClosed,
    ClientError,
    ConnectionLost,
    ProtocolViolation,
    RequestTimeout,
    SessionEnded,
    SovereignClientError,
)
from sovereign.client.events import DURABLE_CONVERSATION_TYPES, Event, decode_event
from sovereign.client.requests import error_from, parse_response, type_name
from sovereign.client.tracking import AckTracker, SeqTracker, Verdict
from sovereign.errors import ErrorCode
from sovereign.protocol.types import MessageType
from sovereign.v1 import sovereign_pb2 as pb

__all__ = ["Caller", "Delivery", "DeliverySettings", "EventHandler", "Host", "StreamState"]

log = logging.getLogger("sovereign.client")

T = MessageType

EventHandler = Callable[[Event], Awaitable[None] | None]

# Requests whose response is "our own" durable event (SPEC §12.1).
_ECHO_REQUESTS: Final = frozenset({T.MESSAGE_SEND, T.MLS_COMMIT})
_ECHO_RESPONSES: Final = frozenset({T.MESSAGE_RECEIVE, T.MLS_COMMIT_BROADCAST})
_MAX_ACK_IDS = 1000  # ~29 KB of ids: well inside max_envelope_bytes (64 KiB)
_CLOSE_FLUSH_TIMEOUT = 2.0  # close() waits this long for the last MESSAGE_ACK


class DeliverySettings(Protocol):
    """The client options delivery reads (live: changing them on the client counts)."""

    @property
    def auto_ack(self) -> bool: ...
    @property
    def ack_interval(self) -> float: ...
    @property
    def history_page_limit(self) -> int: ...
    @property
    def max_backlog(self) -> int: ...


class Host(Protocol):
    """What delivery needs from the session."""

    @property
    def connection(self) -> Connection | None: ...
    @property
    def user_id(self) -> str: ...
    @property
    def closing(self) -> bool: ...
    @property
    def finished(self) -> bool: ...
    @property
    def terminal(self) -> ClientError | None: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...
    def notify(self) -> None: ...


class Caller(Protocol):
    """How delivery sends its own requests (history pages for gap repair, acks)."""

    async def call(
        self,
        msg_type: int,
        payload: bytes,
        *,
        bound: Connection | None = None,
        retry_rate_limited: bool = False,
        internal: bool = False,
    ) -> tuple[int, bytes]: ...


# -- what holds an event -----------------------------------------------------------------


class _Tracked:
    """An event on its way through the application; ``done`` runs when the last holder
    (callback pass, iterator, backlog) releases it."""

    __slots__ = ("done", "event", "holds")

    def __init__(self, event: Event, done: Callable[[Event], None]) -> None:
        self.event = event
        self.holds = 1
        self.done = done

    def hold(self) -> None:
        self.holds += 1

    def release(self) -> None:
        self.holds -= 1
        if self.holds == 0:
            self.done(self.event)


@dataclass(eq=False, slots=True)
class _Callback:
    types: frozenset[int] | None
    handler: EventHandler

    def matches(self, event: Event) -> bool:
        return self.types is None or int(event.type) in self.types


@dataclass(eq=False, slots=True)
class _Waiter:
    types: frozenset[int] | None
    predicate: Callable[[Event], bool] | None
    future: asyncio.Future[Event]

    def matches(self, event: Event) -> bool:
        if self.types is not None and int(event.type) not in self.types:
            return False
        return self.predicate is None or bool(self.predicate(event))


class StreamState:
    """The delivery side of an :class:`~sovereign.client.client.EventStream` (it
    outlives the stream object so an abandoned stream can be cleaned up by a weakref
    finalizer)."""

    __slots__ = ("closed", "current", "ended", "error", "queue", "types", "wakeup")

    def __init__(self, types: frozenset[int] | None) -> None:
        self.types = types
        self.queue: deque[_Tracked] = deque()
        self.current: _Tracked | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.ended = False
        self.closed = False
        self.error: BaseException | None = None

    def matches(self, event: Event) -> bool:
        return self.types is None or int(event.type) in self.types

    def push(self, tracked: _Tracked) -> None:
        self.queue.append(tracked)
        self.wake()

    def wake(self) -> None:
        w = self.wakeup
        if w is not None and not w.done():
            with contextlib.suppress(RuntimeError):  # its loop is already closed
                w.set_result(None)

    def release_current(self) -> None:
        cur = self.current
        if cur is not None:
            self.current = None
            cur.release()

    async def next_event(self) -> Event:
        """The next event; the previous one counts as processed. StopAsyncIteration
        when the stream or the client closed, the terminal error if the session ended."""
        self.release_current()
        while not self.queue:
            if self.closed:
                raise StopAsyncIteration
            if self.ended:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            self.wakeup = asyncio.get_running_loop().create_future()
            try:
                await self.wakeup
            finally:
                self.wakeup = None
        tracked = self.queue.popleft()
        self.current = tracked
        return tracked.event


class Delivery:
    """Pushed events in, ordered events out to consumers, acks back. See the module
    docstring."""

    def __init__(
        self, settings: DeliverySettings, host: Host, requests: Caller, dedupe_capacity: int
    ) -> None:
        self._settings = settings
        self._host = host
        self._requests = requests
        self._seq = SeqTracker(dedupe_capacity)
        self._acks = AckTracker()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._ack_flushing = False
        # conversation -> events that arrived during its gap repair (event, is our echo)
        self._held: dict[str, list[tuple[Event, bool]]] = {}
        self._repairs: dict[str, asyncio.Task[None]] = {}
        self._sync_deferred: Event | None = None
        self._last_sync: pb.SyncComplete | None = None
        self._synced = False
        self._callbacks: list[_Callback] = []
        self._streams: list[StreamState] = []
        self._waiters: list[_Waiter] = []
        self._backlog: deque[_Tracked] = deque()
        self._backlog_overflowed = False
        self._adopted: deque[_Tracked] = deque()
        self._release_scheduled = False
        self._cb_queue: deque[tuple[EventHandler, _Tracked]] = deque()
        self._cb_task: asyncio.Task[None] | None = None

    # -- what the client can read -------------------------------------------------------
    @property
    def last_sync(self) -> pb.SyncComplete | None:
        """The SYNC_COMPLETE of the current connection, once it arrived."""
        return self._last_sync if self._synced else None

    @property
    def truncated_conversation_ids(self) -> tuple[str, ...]:
        s = self._last_sync
        return tuple(s.truncated_conversation_ids) if s is not None else ()

    def last_seq(self, conversation_id: str) -> int | None:
        return self._seq.last(conversation_id)

    # -- the connection's life cycle ------------------------------------------------------
    def connection_ready(self) -> None:
        """A new connection is READY: its own SYNC_COMPLETE will follow; acks may go."""
        self._synced = False
        self._schedule_ack_flush()

    def connection_lost(self) -> None:
        """The connection is gone: stop its repairs and forget what they held."""
        current = asyncio.current_task()
        for task in self._repairs.values():
            if task is not current:
                task.cancel()
        self._repairs.clear()
        self._held.clear()  # never delivered: the server sends them again on resume
        self._sync_deferred = None
        self._synced = False
        self._cancel_ack_timer()

    def end(self, error: ClientError | None) -> None:
        """The client closed (None) or its session ended: end streams, fail waiters."""
        self._cancel_ack_timer()
        for st in self._streams:
            st.ended = True
            st.error = error
            st.wake()
        end = error if error is not None else ClientClosed()
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(end)
        self._waiters.clear()

    async def flush_before_close(self) -> None:
        """close(): send what is ready to acknowledge now, bounded in time."""
        self._cancel_ack_timer()
        conn = self._host.connection
        if conn is not None and conn.ready and self._settings.auto_ack and self._acks.pending:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._flush_acks(internal=True, reschedule=False), _CLOSE_FLUSH_TIMEOUT
                )

    # -- incoming ---------------------------------------------------------------------------
    def receive(self, msg_type: int, payload: bytes, request_id: str) -> None:
        """A server push on the READY connection."""
        try:
            event = decode_event(msg_type, payload, request_id)
        except DecodeError:
            log.warning("dropping an unparseable %s", type_name(msg_type))
            return
        if msg_type == T.ERROR:
            log.warning("server error: %s", error_from(0, msg_type, payload))
        self._ingest(event)

    def response_received(
        self, request_type: int, msg_type: int, payload: bytes, request_id: str
    ) -> None:
        """An answer to one of our requests. Our own MESSAGE_SEND / MLS_COMMIT echo: the
        caller has it as the return value; it still moves the seq position (or a later
        event would look like a gap) and is acknowledged like any event (SPEC §12.3)."""
        if request_type in _ECHO_REQUESTS and msg_type in _ECHO_RESPONSES:
            event = decode_event(msg_type, payload, request_id)
            self._ingest_conversation_event(event, own=True)

    def _ingest(self, event: Event) -> None:
        """Dedupe and order one pushed event, then deliver it (or hold it for a repair)."""
        t = event.type
        if t in DURABLE_CONVERSATION_TYPES:
            self._ingest_conversation_event(event, own=False)
        elif t == T.MLS_WELCOME_RECEIVE:
            eid = event.event_id
            if eid and self._seq.seen_id(eid):
                self._duplicate(event)
                return
            if eid:
                self._seq.remember(eid)
            self._route(event)
        elif t == T.SYNC_COMPLETE:
            if self._held:
                self._sync_deferred = event  # after the repairs in progress
            else:
                self._complete_sync(event)
        else:
            self._route(event)

    def _ingest_conversation_event(self, event: Event, *, own: bool) -> None:
        """``own``: our echo, to account for but not to deliver."""
        conv = event.conversation_id
        held = self._held.get(conv)
        if held is not None:
            held.append((event, own))
            return
        verdict = self._seq.check(conv, event.seq, event.event_id)
        if verdict is Verdict.DUPLICATE:
            self._duplicate(event)
        elif verdict is Verdict.GAP:
            self._held[conv] = [(event, own)]
            self._start_repair(conv)
        else:
            self._accept(event, own=own)

    def _accept(self, event: Event, *, own: bool = False) -> None:
        conv = event.conversation_id
        self._seq.advance(conv, event.seq, event.event_id)
        if own:
            if self._settings.auto_ack:
                self._acks.seen(conv, event.seq, event.event_id)
                self._schedule_ack_flush()
            return
        self._route(event)
        if event.type == T.GROUP_MEMBER_REMOVED and event.message.user_id == self._host.user_id:
            # We are out: nothing more comes from this conversation. A later re-add
            # starts from our new GROUP_MEMBER_ADDED (SPEC §12.13), not a gap.
            self._seq.forget(conv)

    def _duplicate(self, event: Event) -> None:
        log.debug("duplicate %r", event)
        if not self._settings.auto_ack:
            return
        if event.type == T.MLS_WELCOME_RECEIVE:
            self._acks.welcome_redelivered(event.event_id)
        else:
            self._acks.redelivered(event.conversation_id, event.seq, event.event_id)
        self._schedule_ack_flush()

    def _complete_sync(self, event: Event) -> None:
        self._last_sync = event.expect(pb.SyncComplete)
        self._synced = True
        if self._last_sync.truncated_conversation_ids:
            log.warning(
                "history lost to retention in %d conversation(s)",
                len(self._last_sync.truncated_conversation_ids),
            )
        self._route(event)
        self._host.notify()

    # -- gap repair ---------------------------------------------------------------------
    def _start_repair(self, conv: str) -> None:
        conn = self._host.connection
        if conn is None or not conn.ready:
            self._held.pop(conv, None)
            return
        last = self._seq.last(conv)
        log.info("seq gap in conversation %s after %s: paging history", conv, last)
        self._repairs[conv] = self._host.spawn(self._repair(conn, conv))

    async def _repair(self, conn: Connection, conv: str) -> None:
        cursor = self._seq.last(conv) or 0
        try:
            while True:
                held = self._held.get(conv)
                if held is None:
                    return
                target = max(e.seq for e, _ in held)
                if (self._seq.last(conv) or 0) >= target:
                    break
                rtype, payload = await self._requests.call(
                    T.MESSAGE_HISTORY_REQUEST,
                    pb.HistoryRequest(
                        conversation_id=conv,
                        cursor_seq=cursor,
                        limit=self._settings.history_page_limit,
                        direction=pb.HISTORY_FORWARD,
                    ).SerializeToString(),
                    bound=conn,
                    retry_rate_limited=True,
                )
                page = parse_response(
                    T.MESSAGE_HISTORY_REQUEST,
                    rtype,
                    payload,
                    T.MESSAGE_HISTORY_RESPONSE,
                    pb.HistoryResponse,
                )
                own = {e.seq for e, is_own in self._held.get(conv, ()) if is_own}
                for env in page.events:
                    ev = decode_event(env.type, env.payload, replayed=True)
                    if ev.type not in DURABLE_CONVERSATION_TYPES or ev.conversation_id != conv:
                        continue
                    if self._seq.check(conv, ev.seq, ev.event_id) is Verdict.DUPLICATE:
                        continue
                    self._accept(ev, own=ev.seq in own)
                if not page.has_more or not page.events or page.next_cursor_seq <= cursor:
                    break
                cursor = page.next_cursor_seq
        except (ConnectionLost, ClientClosed, SessionEnded):
            return  # state was reset; the server resends everything above our cursor
        except (SovereignClientError, ProtocolViolation, RequestTimeout, DecodeError) as exc:
            if conn is not self._host.connection:
                return
            log.warning("could not repair the gap in %s: %s; delivering what we have", conv, exc)
        if conn is self._host.connection:
            self._finish_repair(conv)

    def _finish_repair(self, conv: str) -> None:
        held = self._held.pop(conv, [])
        self._repairs.pop(conv, None)
        for ev, own in sorted(held, key=lambda item: item[0].seq):
            verdict = self._seq.check(conv, ev.seq, ev.event_id)
            if verdict is Verdict.DUPLICATE:
                self._duplicate(ev)
                continue
            if verdict is Verdict.GAP:
                log.warning(
                    "events %d..%d of %s are not available; continuing",
                    (self._seq.last(conv) or 0) + 1,
                    ev.seq - 1,
                    conv,
                )
            self._accept(ev, own=own)
        if not self._held and self._sync_deferred is not None:
            sync, self._sync_deferred = self._sync_deferred, None
            self._complete_sync(sync)

    # -- routing to the application ----------------------------------------------------
    def _route(self, event: Event) -> None:
        tracked = _Tracked(event, self._event_done)
        if self._settings.auto_ack and event.durable:
            if event.type == T.MLS_WELCOME_RECEIVE:
                self._acks.welcome_delivered(event.event_id)
            else:
                self._acks.delivered(event.conversation_id, event.seq, event.event_id)
        claimed = False
        for cb in self._callbacks:
            if cb.matches(event):
                tracked.hold()
                self._cb_queue.append((cb.handler, tracked))
                claimed = True
        for st in self._streams:
            if not st.closed and st.matches(event):
                tracked.hold()
                st.push(tracked)
                claimed = True
        for w in self._waiters:
            if not w.future.done() and w.matches(event):
                w.future.set_result(event)
                self._waiters.remove(w)
                claimed = True
                break
        if not claimed and not (self._callbacks or self._streams):
            tracked.hold()
            self._push_backlog(tracked)
        self._run_callbacks()
        tracked.release()

    def _event_done(self, event: Event) -> None:
        if not self._settings.auto_ack or not event.durable:
            return
        if event.type == T.MLS_WELCOME_RECEIVE:
            self._acks.welcome_seen(event.event_id)
        else:
            self._acks.seen(event.conversation_id, event.seq, event.event_id)
        self._schedule_ack_flush()

    def _push_backlog(self, tracked: _Tracked) -> None:
        self._backlog.append(tracked)
        limit = self._settings.max_backlog
        if len(self._backlog) > limit:
            if not self._backlog_overflowed:
                self._backlog_overflowed = True
                log.warning(
                    "more than %d events nobody consumed: dropping the oldest "
                    "(register a callback with on() or iterate events())",
                    limit,
                )
            self._backlog.popleft().release()

    def _adopt_backlog(self, take: Callable[[_Tracked], None]) -> None:
        """Give a new consumer the waiting events (in order) before any newer one.

        Every consumer registered in the same tick gets its copy (the events move to
        ``_adopted``); at the next tick those copies are what counts and the backlog's
        own hold is released (events no consumer wanted count as processed).
        """
        for tracked in self._adopted:
            take(tracked)
        for tracked in self._backlog:
            take(tracked)
        if not self._backlog:
            return
        self._adopted.extend(self._backlog)
        self._backlog.clear()
        if not self._release_scheduled:
            self._release_scheduled = True
            asyncio.get_running_loop().call_soon(self._release_adopted)

    def _release_adopted(self) -> None:
        self._release_scheduled = False
        adopted, self._adopted = self._adopted, deque()
        for tracked in adopted:
            tracked.release()

    def _run_callbacks(self) -> None:
        if self._cb_queue and (self._cb_task is None or self._cb_task.done()):
            self._cb_task = self._host.spawn(self._callback_runner())

    async def _callback_runner(self) -> None:
        queue = self._cb_queue
        while queue:
            handler, tracked = queue.popleft()
            try:
                result = handler(tracked.event)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                tracked.release()
                raise
            except (ClientClosed, SessionEnded):
                pass  # the client is going away; not a bug in the handler
            except Exception:
                log.exception("event handler %r failed on %r", handler, tracked.event)
            tracked.release()

    # -- consumers ----------------------------------------------------------------------
    def open_stream(self, types: frozenset[int] | None) -> StreamState:
        """A new stream of events of ``types`` (None: all), the backlog first."""
        state = StreamState(types)
        if not self._host.finished:
            self._streams.append(state)

            def take(tracked: _Tracked) -> None:
                if state.matches(tracked.event):
                    tracked.hold()
                    state.push(tracked)

            self._adopt_backlog(take)
        else:
            state.ended = True
            state.error = self._host.terminal
        return state

    def drop_stream(self, state: StreamState) -> None:
        """A stream was closed or garbage-collected."""
        if state.closed:
            return
        state.closed = True
        state.release_current()
        with contextlib.suppress(ValueError):
            self._streams.remove(state)
        leftover = list(state.queue)
        state.queue.clear()
        state.wake()
        if self._callbacks or self._streams:
            # The other consumers got these events themselves: nothing to hand over.
            for tracked in leftover:
                tracked.release()
        else:
            # Not processed by anyone: back to the backlog (front, in order) for the
            # next consumer or wait_for().
            self._backlog.extendleft(reversed(leftover))

    def add_callback(
        self, types: frozenset[int] | None, handler: EventHandler
    ) -> Callable[[], None]:
        """Run ``handler`` for events of ``types``; returns the unsubscribe function."""
        cb = _Callback(types, handler)
        self._callbacks.append(cb)

        def take(tracked: _Tracked) -> None:
            if cb.matches(tracked.event):
                tracked.hold()
                self._cb_queue.append((cb.handler, tracked))

        self._adopt_backlog(take)
        self._run_callbacks()

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(cb)

        return remove

    def remove_handler(self, handler: EventHandler) -> None:
        """Drop every registration of ``handler``."""
        self._callbacks = [cb for cb in self._callbacks if cb.handler is not handler]

    async def wait_for(
        self,
        types: frozenset[int] | None,
        predicate: Callable[[Event], bool] | None,
        timeout: float,
    ) -> Event:
        """The first matching event from the backlog, else the next to arrive."""
        waiter = _Waiter(types, predicate, asyncio.get_running_loop().create_future())
        for tracked in self._backlog:
            if waiter.matches(tracked.event):
                self._backlog.remove(tracked)
                tracked.release()
                return tracked.event
        for tracked in self._adopted:  # handed to a consumer this very tick
            if waiter.matches(tracked.event):
                return tracked.event
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    # -- acks ----------------------------------------------------------------------------
    def _cancel_ack_timer(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def _schedule_ack_flush(self, delay: float | None = None) -> None:
        if (
            not self._settings.auto_ack
            or self._ack_timer is not None
            or self._ack_flushing
            or self._host.closing
            or self._host.finished
        ):
            return
        conn = self._host.connection
        if conn is None or not conn.ready or not self._acks.pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # an EventStream finalized outside the loop
            return
        self._ack_timer = loop.call_later(
            self._settings.ack_interval if delay is None else delay, self._ack_timer_fired
        )

    def _ack_timer_fired(self) -> None:
        self._ack_timer = None
        if self._ack_flushing:
            return
        self._ack_flushing = True
        self._host.spawn(self._flush_acks())

    async def _flush_acks(self, *, internal: bool = False, reschedule: bool = True) -> None:
        self._ack_flushing = True
        retry_delay: float | None = None
        try:
            conn = self._host.connection
            if conn is None or not conn.ready:
                return
            batch = self._acks.take(_MAX_ACK_IDS)
            if not batch:
                return
            try:
                await self._requests.call(
                    T.MESSAGE_ACK,
                    pb.MessageAck(message_ids=batch.message_ids).SerializeToString(),
                    bound=conn,
                    internal=internal,
                )
            except SovereignClientError as exc:
                if exc.code == ErrorCode.RATE_LIMITED:
                    self._acks.requeue(batch)
                    retry_delay = max(exc.retry_after_ms / 1000.0, self._settings.ack_interval)
                else:
                    log.warning("MESSAGE_ACK refused: %s", exc)
            except ClientError:
                self._acks.requeue(batch)  # sent again on the next READY
        finally:
            self._ack_flushing = False
            if reschedule:
                self._schedule_ack_flush(retry_delay)
