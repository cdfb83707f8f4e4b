"""Per-minute samples for the dashboard's charts: connections and messages per minute
over the last hour (SPEC §10 "live counts"). In memory only; a restart starts empty."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

MINUTES = 60


class MinuteSeries:
    """``sample()`` is called every few seconds; each minute keeps the highest
    connection count seen in it and the messages stored during it."""

    def __init__(
        self,
        now_s: Callable[[], float],
        connections: Callable[[], int],
        messages_total: Callable[[], int],
    ) -> None:
        self._now = now_s
        self._connections = connections
        self._messages = messages_total
        self._rows: deque[list[int]] = deque(maxlen=MINUTES)  # [minute, conns, msgs]
        self._last_total = messages_total()

    def sample(self) -> None:
        minute = int(self._now() // 60)
        total = self._messages()
        new, self._last_total = max(0, total - self._last_total), total
        conns = self._connections()
        if self._rows and self._rows[-1][0] == minute:
            row = self._rows[-1]
            row[1] = max(row[1], conns)
            row[2] += new
        else:
            self._rows.append([minute, conns, new])

    def body(self) -> dict[str, list[dict[str, int]]]:
        """The last hour, one point per minute (minutes without samples are zero)."""
        self.sample()
        by_minute = {r[0]: r for r in self._rows}
        now = int(self._now() // 60)
        points = []
        for m in range(now - MINUTES + 1, now + 1):
            r = by_minute.get(m)
            points.append(
                {"t": m * 60_000, "connections": r[1] if r else 0, "messages": r[2] if r else 0}
            )
        return {"points": points}
