"""Reconnect backoff: 1, 2, 4, 8, 16, 30, 30, … seconds, each times a jitter in [0.5, 1.0).

Both the base schedule and the random source are injectable so tests run it in
milliseconds and deterministically::

    Backoff((0.01, 0.02), random=lambda: 1.0).delay(5)  # 0.02
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Iterator, Sequence
from typing import Final

__all__ = ["DEFAULT_SCHEDULE", "Backoff"]

#: Base delays in seconds; the last one repeats for every later attempt.
DEFAULT_SCHEDULE: Final[tuple[float, ...]] = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


class Backoff:
    """Delay before reconnect attempt ``n`` (0-based): ``schedule[min(n, last)] * jitter``.

    ``jitter`` is drawn uniformly from ``[low, high]`` with ``random()`` (a function
    returning a float in [0, 1), ``random.random`` by default), so several clients that
    lost the same server do not come back in lock-step.
    """

    __slots__ = ("_random", "high", "low", "schedule")

    def __init__(
        self,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        *,
        jitter: tuple[float, float] = (0.5, 1.0),
        random: Callable[[], float] = _random.random,
    ) -> None:
        if not schedule:
            raise ValueError("backoff schedule must not be empty")
        if any(d < 0 for d in schedule):
            raise ValueError("backoff delays must be >= 0")
        low, high = jitter
        if not 0 <= low <= high:
            raise ValueError("jitter must satisfy 0 <= low <= high")
        self.schedule: tuple[float, ...] = tuple(float(d) for d in schedule)
        self.low = float(low)
        self.high = float(high)
        self._random = random

    def base(self, attempt: int) -> float:
        """The un-jittered delay before attempt ``attempt`` (0-based)."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        return self.schedule[min(attempt, len(self.schedule) - 1)]

    def delay(self, attempt: int) -> float:
        """The jittered delay in seconds before attempt ``attempt`` (0-based)."""
        factor = self.low + (self.high - self.low) * self._random()
        return self.base(attempt) * factor

    def delays(self) -> Iterator[float]:
        """An endless iterator of jittered delays: attempt 0, 1, 2, …"""
        attempt = 0
        while True:
            yield self.delay(attempt)
            attempt += 1

    def __repr__(self) -> str:
        return f"Backoff({self.schedule!r}, jitter=({self.low}, {self.high}))"
