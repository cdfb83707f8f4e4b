"""Pure delivery bookkeeping (no I/O): dedupe and gap detection by seq, and the ack
batcher. The client drives them; tests drive them directly.

SPEC §5: conversation events carry a ``seq`` that is dense per conversation, starting
at 1. The server delivers at least once (everything above the device's cursor on every
new connection), so the client dedupes by (conversation, seq) and by event id; a live
event whose seq jumps means the client missed something and must page history.
Acks are cumulative per conversation; welcomes are acked one by one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["AckBatch", "AckTracker", "SeqTracker", "Verdict"]


class Verdict(Enum):
    """How a conversation event relates to what this device has already seen."""

    FIRST = "first"  # no earlier event known for the conversation: a starting point
    NEXT = "next"  # exactly last + 1 (or an event without seq, not seen before)
    GAP = "gap"  # seq > last + 1: events are missing in between
    DUPLICATE = "duplicate"  # seq <= last, or its id was seen before


class SeqTracker:
    """Last seq seen per conversation plus a bounded LRU of event ids.

    Memory is one integer per conversation and at most ``id_capacity`` ids. The id set is
    the second line of defence (welcomes have no seq; a conversation that was forgotten
    after this user's removal may see a late redelivery).
    """

    __slots__ = ("_ids", "_last", "id_capacity")

    def __init__(self, id_capacity: int = 10_000) -> None:
        if id_capacity < 1:
            raise ValueError("id_capacity must be >= 1")
        self.id_capacity = id_capacity
        self._last: dict[str, int] = {}
        self._ids: OrderedDict[str, None] = OrderedDict()

    def last(self, conversation_id: str) -> int | None:
        """The highest seq seen in the conversation, or None if it is unknown."""
        return self._last.get(conversation_id)

    def check(self, conversation_id: str, seq: int, event_id: str = "") -> Verdict:
        """Classify an event without recording it."""
        if event_id and event_id in self._ids:
            return Verdict.DUPLICATE
        if seq <= 0:  # no seq: only the id can tell
            return Verdict.NEXT
        last = self._last.get(conversation_id)
        if last is None:
            return Verdict.FIRST
        if seq <= last:
            return Verdict.DUPLICATE
        if seq == last + 1:
            return Verdict.NEXT
        return Verdict.GAP

    def advance(self, conversation_id: str, seq: int, event_id: str = "") -> None:
        """Record an accepted event: last seq moves up (never down), id remembered."""
        if seq > 0 and seq > self._last.get(conversation_id, 0):
            self._last[conversation_id] = seq
        if event_id:
            self.remember(event_id)

    def seen_id(self, event_id: str) -> bool:
        """True if ``event_id`` is in the LRU."""
        return event_id in self._ids

    def remember(self, event_id: str) -> None:
        """Put ``event_id`` in the LRU (evicting the oldest when full)."""
        ids = self._ids
        if event_id in ids:
            ids.move_to_end(event_id)
            return
        ids[event_id] = None
        if len(ids) > self.id_capacity:
            ids.popitem(last=False)

    def forget(self, conversation_id: str) -> None:
        """Drop the conversation's starting point (after this user left or was removed:
        a later re-add starts a fresh seq range without a false gap)."""
        self._last.pop(conversation_id, None)

    def conversations(self) -> dict[str, int]:
        """A copy of the last seq per conversation."""
        return dict(self._last)


@dataclass(slots=True)
class AckBatch:
    """What one MESSAGE_ACK carries: ``message_ids`` (newest acked event per
    conversation, then each welcome id) and the entries to put back if it fails."""

    message_ids: list[str]
    entries: list[tuple[str, int, str]] = field(default_factory=list)  # (conv, seq, id)
    welcomes: list[str] = field(default_factory=list)
    loose: list[str] = field(default_factory=list)  # durable ids without a seq

    def __bool__(self) -> bool:
        return bool(self.message_ids)


class AckTracker:
    """Cumulative-per-conversation ack batching that never acks past an unseen event.

    * :meth:`delivered` — an event was handed to the application (not yet processed);
    * :meth:`seen` — the application is done with it: it may be acknowledged;
    * :meth:`take` — the batch to send now: per conversation the newest seen event below
      the oldest still-outstanding one (an ack of seq N acknowledges everything up to N,
      SPEC §5), plus every seen welcome;
    * :meth:`redelivered` — the server sent an event again that the app had already
      processed: our ack was lost, so ack it again (unless still outstanding);
    * :meth:`requeue` — a batch whose MESSAGE_ACK failed goes back.
    """

    __slots__ = ("_loose", "_outstanding", "_ready", "_welcomes", "_welcomes_outstanding")

    def __init__(self) -> None:
        self._outstanding: dict[str, set[int]] = {}
        self._ready: dict[str, dict[int, str]] = {}
        self._welcomes: dict[str, None] = {}  # insertion-ordered set
        self._welcomes_outstanding: set[str] = set()
        self._loose: dict[str, None] = {}

    # -- conversation events ---------------------------------------------------------
    def delivered(self, conversation_id: str, seq: int, event_id: str) -> None:
        """The event is with the application; hold acks at or above it."""
        if seq > 0:
            self._outstanding.setdefault(conversation_id, set()).add(seq)

    def seen(self, conversation_id: str, seq: int, event_id: str) -> None:
        """The application processed the event: it may be acknowledged."""
        if not event_id:
            return
        if seq <= 0:
            self._loose[event_id] = None
            return
        out = self._outstanding.get(conversation_id)
        if out is not None:
            out.discard(seq)
            if not out:
                del self._outstanding[conversation_id]
        self._ready.setdefault(conversation_id, {})[seq] = event_id

    def discard(self, conversation_id: str, seq: int) -> None:
        """Stop holding ``seq`` without acknowledging it (it was never processed)."""
        out = self._outstanding.get(conversation_id)
        if out is not None:
            out.discard(seq)
            if not out:
                del self._outstanding[conversation_id]

    def redelivered(self, conversation_id: str, seq: int, event_id: str) -> None:
        """A duplicate arrived: ack it again unless the app still holds it."""
        if not event_id:
            return
        if seq > 0 and seq in self._outstanding.get(conversation_id, ()):
            return
        self.seen(conversation_id, seq, event_id)

    # -- welcomes ----------------------------------------------------------------------
    def welcome_delivered(self, event_id: str) -> None:
        """A welcome is with the application."""
        self._welcomes_outstanding.add(event_id)

    def welcome_seen(self, event_id: str) -> None:
        """The application processed a welcome: ack it (welcomes are acked one by one)."""
        self._welcomes_outstanding.discard(event_id)
        self._welcomes[event_id] = None

    def welcome_redelivered(self, event_id: str) -> None:
        """A duplicate welcome arrived: ack it again unless the app still holds it."""
        if event_id not in self._welcomes_outstanding:
            self._welcomes[event_id] = None

    # -- batching ----------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """True if :meth:`take` would return a non-empty batch."""
        if self._welcomes or self._loose:
            return True
        for conv, ready in self._ready.items():
            out = self._outstanding.get(conv)
            limit = min(out) if out else None
            if limit is None or any(s < limit for s in ready):
                return True
        return False

    def take(self, limit: int | None = None) -> AckBatch:
        """Remove and return what to acknowledge now: at most ``limit`` ids (the rest
        stays pending for the next batch; an Envelope is limited in size)."""
        batch = AckBatch([])

        def full() -> bool:
            return limit is not None and len(batch.message_ids) >= limit

        for conv in list(self._ready):
            if full():
                break
            ready = self._ready[conv]
            out = self._outstanding.get(conv)
            low = min(out) if out else None
            eligible = [s for s in ready if low is None or s < low]
            if not eligible:
                continue
            best = max(eligible)
            event_id = ready[best]
            for s in eligible:
                del ready[s]
            if not ready:
                del self._ready[conv]
            batch.entries.append((conv, best, event_id))
            batch.message_ids.append(event_id)
        for source, into in ((self._loose, batch.loose), (self._welcomes, batch.welcomes)):
            while source and not full():
                event_id = next(iter(source))
                del source[event_id]
                into.append(event_id)
                batch.message_ids.append(event_id)
        return batch

    def requeue(self, batch: AckBatch) -> None:
        """Put a failed batch back so the next flush sends it again."""
        for conv, seq, event_id in batch.entries:
            self._ready.setdefault(conv, {}).setdefault(seq, event_id)
        for event_id in batch.loose:
            self._loose[event_id] = None
        for event_id in batch.welcomes:
            self._welcomes[event_id] = None

    def clear_outstanding(self) -> None:
        """Forget every hold (events handed out will not be processed any more)."""
        self._outstanding.clear()
        self._welcomes_outstanding.clear()
