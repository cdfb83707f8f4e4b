"""The per-send part of the idempotency keys (pure-Python twin of
``sovereign._fast.keyfilter``; the component "keyfilter" in ``sovereign.implementations``).

:class:`KeyFilter` holds the state every MESSAGE_SEND touches, and the three calls each
one makes: :meth:`~KeyFilter.maybe_stored` (could this key already be stored?),
:meth:`~KeyFilter.begin` (it is queued for commit: pending, and into the filter of its
period) and :meth:`~KeyFilter.committed` (the recent tier, and the keys not folded yet).
``services/idempotency.py``'s ``SendRequests`` builds on it (the theory of operation is
there) and adds what runs rarely: folds, storage checks, purges, start-up loads.

Both implementations keep the same state in the same attributes, and the same bits in
the same filter arrays (the parity tests compare them after the same calls).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sovereign.services.eventlog import Op

Key = tuple[str, str]  # (user_id, request_id)


class KeyFilter:
    """``pending``, ``recent`` and the Bloom filters of the idempotency keys."""

    def __init__(self, recent_max: int, filter_bits: int, period_us: int, gen_keys: int) -> None:
        if filter_bits < 8 or filter_bits & (filter_bits - 1):
            raise ValueError("filter_bits must be a power of two >= 8")
        if recent_max < 0 or period_us <= 0 or gen_keys <= 0:
            raise ValueError("bad idempotency sizes")
        self.recent_max = recent_max
        self.period_us = period_us
        self.gen_keys = gen_keys
        self.pending: dict[Key, Op] = {}
        self.recent: OrderedDict[Key, str] = OrderedDict()
        self._mask = filter_bits - 1
        self._bytes = filter_bits // 8
        self._periods: dict[int, bytearray] = {}  # period number -> filter bits
        # The same arrays as a list (the per-send test iterates it: no dict view), and
        # the newest period's array (nearly every add lands there: no dict lookup).
        self._filters: list[bytearray] = []
        self._newest_p: int | None = None
        self._newest: bytearray = bytearray()
        self._counts: dict[int, int] = {}  # period number -> keys added in it
        self._watching: dict[Key, int] = {}  # key -> storage checks in flight
        self._committed: dict[Key, str] = {}  # watched keys committed meanwhile
        #: SQLite on one node: committed keys not yet folded into ``send_requests``
        #: (-> event id), and, while a fold is in flight, the keys it copies.
        self.fold = False
        self.unfolded: dict[Key, str] = {}
        self.folding: dict[Key, str] | None = None

    def maybe_stored(self, key: Key) -> bool:
        """False when ``key`` was certainly not used in the window (no storage read
        needed); True when it may have been (look it up in storage)."""
        h = hash(key)
        mask = self._mask
        i1 = h & mask
        step = (h >> 32) | 1
        i2 = (i1 + step) & mask
        i3 = (i2 + step) & mask
        for bits in self._filters:
            if (
                bits[i1 >> 3] >> (i1 & 7) & 1
                and bits[i2 >> 3] >> (i2 & 7) & 1
                and bits[i3 >> 3] >> (i3 & 7) & 1
            ):
                return True
        return False

    def add(self, key: Key, ts_us: int) -> None:
        """Put ``key`` (a send at ``ts_us``) in the filter of its period."""
        p = ts_us // self.period_us
        self._counts[p] = self._counts.get(p, 0) + 1
        bits = self._newest if p == self._newest_p else self._periods.get(p) or self._period(p)
        h = hash(key)
        mask = self._mask
        i = h & mask
        step = (h >> 32) | 1
        bits[i >> 3] |= 1 << (i & 7)
        i = (i + step) & mask
        bits[i >> 3] |= 1 << (i & 7)
        i = (i + step) & mask
        bits[i >> 3] |= 1 << (i & 7)

    def begin(self, key: Key, op: Op, ts_us: int) -> None:
        """A new send with ``key`` is queued for commit (``op``)."""
        self.pending[key] = op
        self.add(key, ts_us)

    def undo(self, key: Key) -> None:
        """Its commit failed: the key was not spent (its filter bits stay: harmless)."""
        self.pending.pop(key, None)

    def committed(self, key: Key, event_id: str) -> bool:
        """Its commit succeeded: remember the event id among the recent keys (and, when
        folding, among the unfolded ones). True when a fold is due."""
        self.pending.pop(key, None)
        recent = self.recent
        recent[key] = event_id
        if len(recent) > self.recent_max:
            recent.popitem(last=False)
        if self._watching and key in self._watching:
            self._committed[key] = event_id
        if self.fold:
            unfolded = self.unfolded
            unfolded[key] = event_id
            return len(unfolded) >= self.gen_keys and self.folding is None
        return False

    def _period(self, p: int) -> bytearray:
        periods = self._periods
        if periods and p < min(periods):
            # The clock stepped back past the oldest filter kept: the oldest one covers
            # it (a key must never be missing from every filter while in the window).
            return periods[min(periods)]
        bits = periods[p] = bytearray(self._bytes)
        self._filters_changed()
        return bits

    def _filters_changed(self) -> None:
        periods = self._periods
        self._filters = list(periods.values())
        if periods:
            self._newest_p = max(periods)
            self._newest = periods[self._newest_p]
        else:
            self._newest_p, self._newest = None, bytearray()
