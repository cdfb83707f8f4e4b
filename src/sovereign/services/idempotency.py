"""Idempotent MESSAGE_SEND keys in bounded memory (SPEC §5: a MESSAGE_SEND repeated by
the same user with the same request_id within 24 h returns the original MESSAGE_RECEIVE
and stores nothing).

Theory of operation
-------------------
The durable record is the ``send_requests`` table: (user_id, request_id) -> event id,
in *generations* (``gen``, raised every :data:`GEN_KEYS` keys and at each start). On
SQLite the table's key leads with it (migration 0008), and on one node a send's key
is first stored in its event row, in the event's own commit; every :data:`GEN_KEYS`
committed keys, one statement copies the keys of the events after the *fold's mark*
into ``send_requests`` and moves the mark (migration 0009: ``fold_send_requests_txn``).
Until that fold commits, the committed keys it has not copied are in memory
(``unfolded``, ``folding``; read back from the event rows at start-up). PostgreSQL,
and cluster mode, write the ``send_requests`` row in the event's transaction.

Memory only has to answer one question
fast, for every send: *could this key already be stored?* Almost always the answer is
"certainly not" (a new message), and that must cost no storage read. Three tiers:

1. ``pending``: keys whose original is still in the event log's queue, not committed
   (so not in storage either). A retry joins the original and gets its echo. Never
   evicted; bounded by the queue (one entry per uncommitted send).
2. ``recent``: the newest :data:`RECENT_MAX` committed keys -> event id (oldest out).
   A retry of a recent send (the usual case: the client lost the echo and resent at
   once) is answered without a storage read for the key.
3. A Bloom filter of every key used within the window, one bit array of
   :data:`FILTER_BITS` bits per :data:`PERIOD_US` (12 h) of send time, at most
   ``IDEMPOTENCY_US / PERIOD_US + 1`` = 3 arrays. A filter has no false negatives: a
   key it has not seen was certainly not used in the window, so the send goes ahead
   with no read. A key it may have seen (an older retry, or a false positive) is
   looked up in ``unfolded`` / ``folding``, else costs ONE storage read
   (``send_requests`` joined to the event; on SQLite one seek per generation kept).

Memory is therefore fixed: 3 x FILTER_BITS / 8 bytes for the filters (6 MiB), plus
RECENT_MAX small entries (~0.2 KB each, ~2 MB), plus up to about 2 x GEN_KEYS unfolded
keys, whatever the traffic. What traffic
changes is the filter's false-positive rate, so the share of new sends that pay one
read (see docs/performance.md, "Memory bounds"). A restart rebuilds the filters from
``send_requests`` (keys only, in primary-key pages).

A storage read runs while other sends go on. If the original commits during that
read, the read may not see it and the recent tier may already have let it go again
(under heavy traffic); :meth:`SendRequests.watch` records the event id of a watched
key committed meanwhile, so the check still finds the original (never a duplicate).

What every send calls, and the state it touches, is ``KeyFilter``
(``services/keyfilter.py``, compiled as ``sovereign._fast.keyfilter`` where built);
``SendRequests`` adds the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sovereign import implementations
from sovereign.services.ids import ulid_ms
from sovereign.services.keyfilter import Key

if TYPE_CHECKING:
    from sovereign.services.keyfilter import KeyFilter
else:  # the compiled filter, or its twin (the per-send calls: services/keyfilter.py)
    KeyFilter = implementations.load("keyfilter").KeyFilter

#: SPEC §5: the idempotency window.
IDEMPOTENCY_US = 24 * 3600 * 1_000_000
#: Committed keys kept with their event id (tier 2). ~0.2 KB each.
RECENT_MAX = 10_000
#: Bits per period's Bloom filter (a power of two): 2^24 bits = 2 MiB. With K = 3, a
#: period (12 h) of 500,000 new keys gives ~0.06% false positives per array, 2,000,000
#: gives ~2.7%; each false positive is one indexed read, never a wrong answer.
FILTER_BITS = 1 << 24
#: Send time covered by one filter; the window needs IDEMPOTENCY_US / PERIOD_US + 1.
PERIOD_US = 12 * 3600 * 1_000_000
#: Start-up: keys read from storage per page.
LOAD_PAGE = 5000
#: Keys per generation of the stored keys (SQLite keys ``send_requests`` by generation
#: first, migration 0008). A generation's keys share a small range of leaves; on SQLite
#: they are written together, sorted, by a fold of this many keys (migration 0009),
#: which holds the writer ~1.5-3 ms on a grown database here (7-14 ms for 4,096). A
#: storage check seeks once per generation in the table (measured here: ~0.3 ms for 100
#: generations, ~0.8 ms for 256, on a reader thread). See docs/performance.md.
GEN_KEYS = 1024
#: ...but no more than about this many generations in the window: with more keys than
#: GEN_KEYS * MAX_GENS in the filters' periods, a new generation takes a share of them
#: instead (a storage check stays under ~1 ms; such a generation takes several folds,
#: or rows one per send as on PostgreSQL, and its keys' locality fades with its size).
MAX_GENS = 256


class SendRequests(KeyFilter):
    """The idempotency keys of MESSAGE_SEND: ``pending``, ``recent`` and the filters.

    What every send calls (``maybe_stored``, ``begin``, ``committed``, ``undo``, ``add``)
    and the state it touches are :class:`KeyFilter`'s, compiled where built; this class
    adds what runs rarely."""

    def __init__(
        self,
        recent_max: int = RECENT_MAX,
        filter_bits: int = FILTER_BITS,
        window_us: int = IDEMPOTENCY_US,
        period_us: int = PERIOD_US,
        gen_keys: int | None = None,
        max_gens: int = MAX_GENS,
    ) -> None:
        gen_keys = GEN_KEYS if gen_keys is None else gen_keys
        if window_us <= 0 or max_gens <= 0:
            raise ValueError("bad idempotency sizes")
        super().__init__(recent_max, filter_bits, period_us, gen_keys)
        self.window_us = window_us
        #: The generation new keys are stored in, and how many more it takes.
        self.max_gens = max_gens
        self.gen = 0
        self._gen_left = gen_keys
        self._gen_filled = 0  # keys folded into generation ``gen`` so far
        #: Counters for /metrics-style reporting and tests.
        self.storage_checks = 0

    def known(self, key: Key, now_us: int) -> str | None:
        """The event id of a recent committed send with this key, or None."""
        event_id = self.recent.get(key)
        if event_id is not None and ulid_ms(event_id) * 1000 < now_us - self.window_us:
            return None  # past the window (not purged yet): a new message
        return event_id

    def next_gen(self) -> int:
        """The generation to store a new key's row in (PostgreSQL, cluster mode: a row per
        send); a new one every :meth:`_gen_size` keys. Folds count their own."""
        if self._gen_left:
            self._gen_left -= 1
        else:
            self.gen += 1
            self._gen_left = self._gen_size() - 1
        return self.gen

    # -- folding (SQLite on one node) ---------------------------------------------------
    def unfolded_event(self, key: Key, now_us: int) -> str | None:
        """The event id of a committed send with this key whose key is not in
        ``send_requests`` yet (not folded, or its fold not committed), or None."""
        event_id = self.unfolded.get(key)
        if event_id is None and self.folding is not None:
            event_id = self.folding.get(key)
        if event_id is not None and ulid_ms(event_id) * 1000 < now_us - self.window_us:
            return None  # past the window: a new message
        return event_id

    def start_fold(self) -> int:
        """:data:`GEN_KEYS` keys were committed since the last fold: returns the
        generation to fold them into. The fold copies every event's key after the mark,
        so it also takes any committed since this call; until it commits its keys are
        in ``folding``. A generation takes folds until it holds :meth:`_gen_size` keys
        (one fold at everyday load; with many keys in the window, a few, each bounded
        by GEN_KEYS keys: a fold holds the writer)."""
        self.folding, self.unfolded = self.unfolded, {}
        return self.gen

    def fold_done(self, copied: int | None) -> None:
        """The fold committed, having copied ``copied`` keys (they are in
        ``send_requests`` now), or failed (None: they stay in memory, and the next fold
        copies them from the events again)."""
        folding, self.folding = self.folding, None
        if copied is None:
            if folding:
                folding.update(self.unfolded)
                self.unfolded = folding
            return
        self._gen_filled += copied
        if self._gen_filled >= self._gen_size():
            self.gen += 1
            self._gen_filled = 0

    def load_unfolded(self, rows: list[tuple[str, str, str, int]]) -> None:
        """Start-up, after :meth:`load_page`: (user_id, request_id, event_id, ts_us) of
        stored sends whose keys were not folded yet, oldest first. The next fold takes
        them into the generation new keys go to."""
        unfolded = self.unfolded
        for user_id, request_id, event_id, ts_us in rows:
            key = (user_id, request_id)
            self.add(key, ts_us)
            unfolded[key] = event_id

    # -- storage checks -----------------------------------------------------------------
    def watch(self, key: Key) -> None:
        """A storage read for ``key`` starts: note a commit of it until :meth:`unwatch`."""
        self.storage_checks += 1
        self._watching[key] = self._watching.get(key, 0) + 1

    def unwatch(self, key: Key) -> str | None:
        """The read is over: the event id if ``key`` was committed meanwhile."""
        n = self._watching[key] - 1
        if n:
            self._watching[key] = n
            return self._committed.get(key)
        del self._watching[key]
        return self._committed.pop(key, None)

    # -- the filters --------------------------------------------------------------------
    def purge(self, now_us: int) -> None:
        """Forget what is past the window: whole filters, and old recent keys."""
        since = now_us - self.window_us
        oldest = since // self.period_us  # the period holding the window's start
        expired = [p for p in self._periods if p < oldest]
        for p in expired:
            del self._periods[p]
        for p in [p for p in self._counts if p < oldest]:
            del self._counts[p]
        if expired:
            self._filters_changed()
        recent = self.recent
        since_ms = since // 1000
        while recent:
            key, event_id = next(iter(recent.items()))
            if ulid_ms(event_id) >= since_ms:
                break
            del recent[key]

    @property
    def filter_bytes(self) -> int:
        return self._bytes * len(self._periods)

    def load_page(self, rows: list[tuple[int, str, str, int]]) -> None:
        """Start-up: (gen, user_id, request_id, created_at_us) of stored keys. New keys
        go to a generation after every one loaded."""
        add = self.add
        top = -1
        for gen, user_id, request_id, created in rows:
            add((user_id, request_id), created)
            if gen > top:
                top = gen
        if top >= self.gen:
            self.gen = top + 1
            self._gen_left = self._gen_size()

    def _gen_size(self) -> int:
        """Keys per new generation: GEN_KEYS, or a MAX_GENS-th of the keys counted in the
        filters' periods when that is more."""
        return max(self.gen_keys, sum(self._counts.values()) // self.max_gens)
