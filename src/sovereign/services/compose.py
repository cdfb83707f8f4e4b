"""Build the services over their ports and wire the hooks between them.

The one place that knows how the services fit together: the composition root
(``server.App``) calls it with the real outbox, the service tests with a fake one.
"""

from __future__ import annotations

from sovereign.clock import Clock
from sovereign.config import Config
from sovereign.services import Services
from sovereign.services.auth import AuthService
from sovereign.services.cluster import ClusterService
from sovereign.services.connections import ConnectionService
from sovereign.services.delivery import DeliveryService
from sovereign.services.directory import DirectoryService
from sovereign.services.ephemeral import EphemeralService
from sovereign.services.eventlog import ClusterEventLog, EventLog
from sovereign.services.groups import GroupService
from sovereign.services.history import HistoryService
from sovereign.services.mls import MlsService
from sovereign.services.ports import Bus, NullBus, NullPeers, Outbox, Peers
from sovereign.services.state import ConversationState
from sovereign.services.tasks import TaskRunner
from sovereign.stats import MlsStats, ServerStats
from sovereign.storage import Storage


def build_services(
    config: Config,
    storage: Storage,
    outbox: Outbox,
    clock: Clock,
    *,
    stats: ServerStats | None = None,
    mls_stats: MlsStats | None = None,
    gather_s: float = 0.0,
    ride_s: float = 0.0,
    bus: Bus | None = None,
) -> Services:
    """``stats`` (None: metrics off) and ``mls_stats`` are the counters the admin
    listener reads (SPEC §12.24, §12.25); ``gather_s`` is how long an event batch in a
    stream of sends waits for company (the server's EVENT_GATHER_S; tests use 0), and
    ``ride_s`` how long a cursor write in such a stream waits to go with the next event
    batch (the server's CURSOR_RIDE_S; 0: it goes at once).

    ``bus``: cluster mode (SPEC §12.27) when it is not a :class:`NullBus` — seqs and
    conflicts are decided in the database (ClusterEventLog) and the services tell the
    other nodes through ``ClusterService``. A single node keeps the in-memory path."""
    db = storage.db
    tasks = TaskRunner(outbox)
    clustered = bus is not None and not isinstance(bus, NullBus)
    log_cls = ClusterEventLog if clustered else EventLog
    eventlog = log_cls(
        db,
        outbox.cork,
        outbox.uncork,
        gather_s,
        latency=stats.send_commit if stats is not None else None,
        now_us=clock.now_us,
    )
    state = ConversationState(db, storage.users)
    cluster: ClusterService | None = None
    peers: Peers = NullPeers()
    if clustered:
        assert bus is not None and isinstance(eventlog, ClusterEventLog)
        cluster = ClusterService(db, state, eventlog, outbox, clock, tasks, bus)
        eventlog.committed = cluster.committed
        eventlog.conflicted = cluster.conflicted
        peers = cluster
    auth = AuthService(config, storage, clock)
    conns = ConnectionService(config, storage.users, storage.sessions, outbox, clock, peers)
    delivery = DeliveryService(
        config, db, state, eventlog, outbox, clock, tasks, peers, ride_s=ride_s
    )
    ephemeral = EphemeralService(db, state, outbox, clock, delivery.writer, peers)
    groups = GroupService(config, state, eventlog, outbox, clock, delivery, ephemeral.introduce)
    history = HistoryService(config, db, state, outbox, clock, peers)
    mls = MlsService(config, db, state, eventlog, outbox, clock, delivery, mls_stats)
    directory = DirectoryService(db, storage.users, storage.sessions, state, conns, outbox, clock)
    # How they hear of each other (SPEC §4 "On READY" order): a new device starts its
    # cursors; READY starts the offline sync; its end checks the KeyPackage pool and
    # makes the connection live, which re-aggregates presence; a close undoes both.
    auth.device_hooks.append(delivery.device_created)
    conns.ready_hooks.append(delivery.on_ready)
    conns.closed_hooks.extend((delivery.detach, ephemeral.on_closed))
    delivery.sync_tail.append(mls.sync_tail)
    delivery.after_sync.append(mls.on_sync_end)
    if not clustered:  # other nodes' KeyPackage writes are not counted: it reads again
        delivery.sync_reads.append(mls.sync_read)  # its count, read with the device
    delivery.went_live.append(ephemeral.on_live)
    mls.first_upload.append(directory.device_announced)  # DEVICE_ADDED (SPEC §12.29)
    if cluster is not None:
        # Another node's events fan out here; its presence and connections re-aggregate.
        cluster.bind(delivery)
        cluster.presence_hooks.append(ephemeral.presence_changed)
        cluster.cap_hooks.append(conns.enforce_cap)
        cluster.introduce_hooks.append(ephemeral.introduce)
    return Services(
        config=config,
        outbox=outbox,
        tasks=tasks,
        state=state,
        eventlog=eventlog,
        auth=auth,
        connections=conns,
        delivery=delivery,
        groups=groups,
        ephemeral=ephemeral,
        history=history,
        mls=mls,
        directory=directory,
        cluster=cluster,
    )
