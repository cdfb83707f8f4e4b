"""Per-source-IP limits on authentication and registration (SPEC §12.32).

A token bucket per IP: ``take`` spends one token and answers how long the caller
must wait when none is left. Memory is bounded: past ``max_entries`` IPs the oldest
buckets are forgotten (a forgotten bucket is a full one, so this only ever errs
towards letting an old IP in again, never towards refusing a new one).
"""

from __future__ import annotations

MAX_ENTRIES = 100_000


class PerIpLimiter:
    __slots__ = ("_buckets", "burst", "max_entries", "rate")

    def __init__(self, rate_per_second: float, burst: int, max_entries: int = MAX_ENTRIES) -> None:
        self.rate = rate_per_second
        self.burst = float(burst)
        self.max_entries = max_entries
        self._buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, at)

    def take(self, ip: str, now: float) -> float:
        """Spend one token for ``ip``; 0.0 if allowed, else seconds until one is left."""
        buckets = self._buckets
        tokens, at = buckets.pop(ip, (self.burst, now))  # re-inserted: newest last
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            buckets[ip] = (tokens - 1.0, now)
            wait = 0.0
        else:
            buckets[ip] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        if len(buckets) > self.max_entries:
            for old in list(buckets)[: len(buckets) - self.max_entries]:
                del buckets[old]
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
