"""Policy: auth, connections, delivery, groups, ephemeral signals, history, MLS.

Services are built from explicit ports (:mod:`sovereign.services.ports`), raise
:class:`~sovereign.errors.SovereignError` with registry codes, and leave SQL to
:mod:`sovereign.storage`. :func:`sovereign.services.compose.build_services` builds them;
:class:`Services` is what it returns and what the API layer receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sovereign.config import Config
    from sovereign.services.auth import AuthService
    from sovereign.services.cluster import ClusterService
    from sovereign.services.connections import ConnectionService
    from sovereign.services.delivery import DeliveryService
    from sovereign.services.directory import DirectoryService
    from sovereign.services.ephemeral import EphemeralService
    from sovereign.services.eventlog import EventLog
    from sovereign.services.groups import GroupService
    from sovereign.services.history import HistoryService
    from sovereign.services.mls import MlsService
    from sovereign.services.ports import Outbox
    from sovereign.services.state import ConversationState
    from sovereign.services.tasks import TaskRunner


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    outbox: Outbox
    tasks: TaskRunner
    state: ConversationState
    eventlog: EventLog
    auth: AuthService
    connections: ConnectionService
    delivery: DeliveryService
    groups: GroupService
    ephemeral: EphemeralService
    history: HistoryService
    mls: MlsService
    directory: DirectoryService
    #: cluster mode only (SPEC §12.27); None on a single node
    cluster: ClusterService | None = None
