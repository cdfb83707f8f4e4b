"""Counters the hot path can afford (SPEC §12.25).

The request path counts in plain ints, dicts and lists: one dict ``get`` + store, or
one ``bisect`` into a short tuple for a histogram. Nothing here knows Prometheus: the
admin listener's collector (``sovereign.admin.metrics``) reads these objects at scrape
time and renders them, so a message never calls into ``prometheus_client``.

Thread-safety: the storage writer thread updates its own histograms; every other
counter is touched only on the event loop. Reads from a scrape may see a counter a
moment old, never a torn value (single stores under the GIL).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Sequence


class Histogram:
    """Cumulative-on-read histogram: ``observe`` adds to one bucket, a scrape sums.

    ``bounds`` are the upper bounds (inclusive, as in Prometheus ``le``); values above
    the last bound land in the implicit ``+Inf`` bucket.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    # Per commit and per event: the total count is the buckets' sum, taken at scrape
    # time (cumulative), not kept here.
    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs, ending with (+inf, count)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


#: Seconds: from a MESSAGE_SEND's arrival (its server timestamp) to its COMMIT.
LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Writes per group-committed transaction.
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Seconds one writer transaction took (BEGIN … COMMIT, fsync included).
COMMIT_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServerStats:
    """Counters of the request path, owned by the composition root and handed to the
    parts that count (outbox, event log, MLS service, ``server.App``)."""

    def __init__(self) -> None:
        self.connections_opened = 0
        self.envelopes_in: dict[int, int] = {}  # message type -> count
        self.envelopes_out: dict[int, int] = {}  # message type -> count (fan-out per copy)
        self.closes: dict[int, int] = {}  # close code -> count
        self.errors_sent: dict[int, int] = {}  # error code -> count (auth outcomes, 5004)
        self.auth_success = 0
        self.deliveries = 0  # frames of committed events written to live connections
        self.send_commit = Histogram(LATENCY_BOUNDS)


class MlsStats:
    """Per-conversation refusals of commits with 5004 EpochMismatch (SPEC §12.24).

    Kept in memory (not across restarts: documented in docs/operations.md); a
    conversation's deque holds the wall-clock seconds of its refusals within a window.
    """

    WINDOW_S = 86_400.0

    def __init__(self) -> None:
        self.epoch_conflicts = 0
        self._refused: dict[str, deque[float]] = {}

    def refused(self, conversation_id: str, now_s: float) -> None:
        self.epoch_conflicts += 1
        q = self._refused.get(conversation_id)
        if q is None:
            q = self._refused[conversation_id] = deque()
        q.append(now_s)
        self._trim(q, now_s)

    def refused_within_window(self, conversation_id: str, now_s: float) -> int:
        q = self._refused.get(conversation_id)
        if not q:
            return 0
        self._trim(q, now_s)
        return len(q)

    def _trim(self, q: deque[float], now_s: float) -> None:
        cutoff = now_s - self.WINDOW_S
        while q and q[0] < cutoff:
            q.popleft()
