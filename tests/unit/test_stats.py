"""The plain counters behind /metrics and the dashboard (SPEC §12.24, §12.25)."""

from __future__ import annotations

from sovereign.admin.timeseries import MINUTES, MinuteSeries
from sovereign.stats import Histogram, MlsStats


def test_histogram_buckets_are_inclusive_upper_bounds_and_cumulative_on_read() -> None:
    h = Histogram((1, 2, 4))
    for v in (0.5, 1, 1.5, 2, 3, 4, 9):
        h.observe(v)
    h.observe(3)
    h.observe(3)
    assert h.cumulative() == [(1, 2), (2, 4), (4, 8), (float("inf"), 9)]
    assert h.sum == 0.5 + 1 + 1.5 + 2 + 3 + 4 + 9 + 6


def test_epoch_conflicts_per_conversation_within_24_hours() -> None:
    m = MlsStats()
    m.refused("a", 1_000)
    m.refused("a", 50_000)
    m.refused("b", 60_000)
    assert m.epoch_conflicts == 3
    assert m.refused_within_window("a", 60_000) == 2
    assert m.refused_within_window("a", 1_000 + 86_400 + 1) == 1  # the first aged out
    assert m.refused_within_window("c", 60_000) == 0


def test_minute_series_keeps_the_last_hour_per_minute() -> None:
    now = [3_600.0 * 10]
    conns = [3]
    total = [100]
    series = MinuteSeries(lambda: now[0], lambda: conns[0], lambda: total[0])
    total[0] = 107
    series.sample()
    conns[0] = 5
    series.sample()  # same minute: the peak of connections, messages added up
    now[0] += 60
    total[0] = 110
    conns[0] = 1
    series.sample()
    points = series.body()["points"]
    assert len(points) == MINUTES
    assert [(p["connections"], p["messages"]) for p in points[-2:]] == [(5, 7), (1, 3)]
    assert points[-1]["t"] == int(now[0] // 60) * 60_000
    now[0] += 3 * 3_600  # hours later: everything has scrolled out
    assert all(p["messages"] == 0 for p in series.body()["points"])
