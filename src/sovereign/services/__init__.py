"""Policy: auth, connections, delivery, groups, ephemeral signals, history, MLS.

Services are built from explicit ports (:mod:`sovereign.services.ports`), raise
:class:`~sovereign.errors.SovereignError` with registry codes, and leave SQL to
:mod:`sovereign.storage`. :class:`Services` is what the composition root
(``sovereign.server``) hands the API layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sovereign.config import Config
    from sovereign.services.auth import AuthService
    from sovereign.services.connections import ConnectionService
    from sovereign.services.delivery import DeliveryService
    from sovereign.services.ephemeral import EphemeralService
    from sovereign.services.groups import GroupService
    from sovereign.services.history import HistoryService
    from sovereign.services.mls import MlsService
    from sovereign.services.ports import Outbox, Tasks
    from sovereign.services.state import ConversationState


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    outbox: Outbox
    tasks: Tasks
    state: ConversationState
    auth: AuthService
    connections: ConnectionService
    delivery: DeliveryService
    groups: GroupService
    ephemeral: EphemeralService
    history: HistoryService
    mls: MlsService
