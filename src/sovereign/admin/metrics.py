"""``/metrics``: Prometheus text, names prefixed ``sovereign_`` (SPEC §12.25).

The request path counts in plain ints and dicts (:mod:`sovereign.stats`, the storage
writer's histograms, the outbox's refusals); this collector reads them when Prometheus
scrapes, so no message ever calls into ``prometheus_client``. No label carries a user
id, a token or a payload: labels are message type names, close codes and outcomes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sovereign.errors import REGISTRY, ErrorCode
from sovereign.protocol.types import MessageType
from sovereign.stats import Histogram, MlsStats, ServerStats


@dataclass
class Sources:
    """What the collector reads; gathered by the composition root."""

    stats: ServerStats | None  # None: metrics = false (nothing counted on the hot path)
    mls: MlsStats
    connections: Callable[[], int]
    ready_connections: Callable[[], int]
    events_written: Callable[[], int]
    batch_sizes: Histogram
    commit_seconds: Histogram
    writes_committed: Callable[[], int]
    writes_failed: Callable[[], int]
    commits_on_loop: Callable[[], int]  # SQLite, sqlite_inline_commit_ms
    rejected: dict[int, int]  # outbox: envelope-level refusals by error code
    pools_below_min: Callable[[], int]  # refreshed before each scrape (a DB read)
    # cluster mode (SPEC §12.27): the bus's counters by name, and whether its link is up
    bus_counters: Callable[[], Mapping[str, int]] | None = None
    bus_connected: Callable[[], bool] | None = None


def _type_name(t: int) -> str:
    try:
        return MessageType(t).name
    except ValueError:
        return "UNKNOWN"


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if b == float("inf") else repr(float(b)), n) for b, n in h.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


class SovereignCollector(Collector):
    def __init__(self, src: Sources) -> None:
        self.src = src

    def collect(self) -> Iterator[Metric]:
        src = self.src
        g = GaugeMetricFamily(
            "sovereign_connections", "Open WebSocket connections", labels=["state"]
        )
        g.add_metric(["open"], src.connections())
        g.add_metric(["ready"], src.ready_connections())
        yield g
        yield CounterMetricFamily(
            "sovereign_events_stored", "Conversation events committed", value=src.events_written()
        )
        c = CounterMetricFamily("sovereign_storage_writes", "Storage writes", labels=["outcome"])
        c.add_metric(["committed"], src.writes_committed())
        c.add_metric(["failed"], src.writes_failed())
        yield c
        yield _histogram(
            "sovereign_writer_batch_size", "Writes per group-committed transaction", src.batch_sizes
        )
        yield _histogram(
            "sovereign_writer_commit_seconds",
            "Duration of one writer transaction (BEGIN to COMMIT)",
            src.commit_seconds,
        )
        yield CounterMetricFamily(
            "sovereign_writer_commits_on_loop",
            "Writer transactions run on the event loop, not the writer thread",
            value=src.commits_on_loop(),
        )
        yield CounterMetricFamily(
            "sovereign_mls_epoch_conflicts",
            "MLS commits refused with 5004 EpochMismatch",
            value=src.mls.epoch_conflicts,
        )
        yield GaugeMetricFamily(
            "sovereign_key_package_pools_below_min",
            "Active devices holding fewer KeyPackages than min_key_packages",
            value=src.pools_below_min(),
        )
        yield CounterMetricFamily(
            "sovereign_rate_limited",
            "Requests refused with 3004 RateLimited",
            value=src.rejected.get(ErrorCode.RATE_LIMITED, 0),
        )
        if src.bus_counters is not None and src.bus_connected is not None:
            yield GaugeMetricFamily(
                "sovereign_cluster_bus_connected",
                "1 while this node's link to Redis is up",
                value=1 if src.bus_connected() else 0,
            )
            c = CounterMetricFamily(
                "sovereign_cluster_bus_messages",
                "Cluster bus notifications by outcome",
                labels=["outcome"],
            )
            counters = src.bus_counters()
            for outcome in ("published", "received", "dropped", "malformed"):
                c.add_metric([outcome], counters.get(outcome, 0))
            yield c
            for name, doc in (
                ("reconnects", "Cluster bus links to Redis re-established after a loss"),
                ("resyncs", "Catch-ups from the database after a bus reconnection"),
            ):
                yield CounterMetricFamily(
                    f"sovereign_cluster_bus_{name}", doc, value=counters.get(name, 0)
                )
        stats = src.stats
        if stats is None:
            return
        yield CounterMetricFamily(
            "sovereign_connections_opened",
            "WebSocket connections accepted",
            value=stats.connections_opened,
        )
        auth = CounterMetricFamily("sovereign_auth", "Authentication outcomes", labels=["outcome"])
        auth.add_metric(["success"], stats.auth_success)
        for code, n in sorted(stats.errors_sent.items()):
            info = REGISTRY.get(code)
            if info is not None and info.auth:
                auth.add_metric([info.name], n)
        yield auth
        for name, doc, table in (
            ("sovereign_envelopes_in", "Envelopes received, by type", stats.envelopes_in),
            (
                "sovereign_envelopes_out",
                "Envelopes sent (each fan-out copy), by type",
                stats.envelopes_out,
            ),
        ):
            fam = CounterMetricFamily(name, doc, labels=["type"])
            for t, n in sorted(table.items()):
                fam.add_metric([_type_name(t)], n)
            yield fam
        yield CounterMetricFamily(
            "sovereign_deliveries",
            "Frames of committed events written to live connections (fan-out)",
            value=stats.deliveries,
        )
        closes = CounterMetricFamily(
            "sovereign_closes", "Connections closed, by close code", labels=["code"]
        )
        for code, n in sorted(stats.closes.items()):
            closes.add_metric([str(code)], n)
        yield closes
        errors = CounterMetricFamily(
            "sovereign_errors", "Error responses sent, by code", labels=["code"]
        )
        for code, n in sorted(stats.errors_sent.items()):
            errors.add_metric([str(code)], n)
        yield errors
        yield _histogram(
            "sovereign_send_commit_seconds",
            "From an event's server timestamp (request handled) to its COMMIT",
            stats.send_commit,
        )
