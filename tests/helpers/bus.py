"""An in-process stand-in for the Redis transport of cluster notifications.

:class:`Hub` connects any number of :class:`HubBus` (one per node) on one event loop.
It implements ``sovereign.services.ports.Bus`` exactly as the port promises and no
better: delivery is asynchronous (``call_soon``, as a network hop would be), never to
the publishing node, lost while a node is disconnected, and ``on_resync`` runs after a
reconnection. It is a double for the *transport* only: the services and the database
under test are real.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

_ids = itertools.count(1)


class Hub:
    def __init__(self) -> None:
        self.buses: list[HubBus] = []
        #: payloads dropped because a receiver (or the sender) was disconnected
        self.dropped = 0
        self.delivered = 0

    def bus(self) -> HubBus:
        b = HubBus(self)
        self.buses.append(b)
        return b

    def _fan(self, sender: HubBus, payload: bytes) -> None:
        if not sender.connected:
            self.dropped += 1
            return
        loop = asyncio.get_running_loop()
        for b in self.buses:
            if b is sender or not b.started:
                continue
            if not b.connected:
                self.dropped += 1
                continue
            loop.call_soon(b._receive, payload)

    async def settle(self) -> None:
        """Let every delivery queued so far (and what it queues in turn) run."""
        for _ in range(5):
            await asyncio.sleep(0)


class HubBus:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.node_id = f"node{next(_ids)}"
        self._connected = True
        self.started = False
        self._on_message: Callable[[bytes], None] | None = None
        self._on_resync: Callable[[], Awaitable[None]] | None = None
        self.published = 0

    # -- the port -------------------------------------------------------------------
    def publish(self, payload: bytes) -> None:
        self.published += 1
        self.hub._fan(self, bytes(payload))

    def set_handlers(
        self,
        on_message: Callable[[bytes], None],
        on_resync: Callable[[], Awaitable[None]],
    ) -> None:
        self._on_message = on_message
        self._on_resync = on_resync

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False
        self._connected = False

    # -- what tests do to the link ----------------------------------------------------
    def disconnect(self) -> None:
        """The link drops: nothing in or out until :meth:`reconnect`."""
        self._connected = False

    async def reconnect(self) -> None:
        """The link is back: ``on_resync`` runs, as the Redis bus does after a reconnect."""
        self._connected = True
        if self._on_resync is not None:
            await self._on_resync()

    def _receive(self, payload: bytes) -> None:
        if self._connected and self.started and self._on_message is not None:
            self.hub.delivered += 1
            self._on_message(payload)
