"""Envelope handlers: parse a payload, authorise, call a service (SPEC §2, §3).

Each module registers sync handlers ``(session, type, request_id, payload)`` in the
handler table the dispatcher indexes by type. A handler parses the payload before
returning (the payload is borrowed from the transport's read buffer) and hands async
work to ``services.tasks.spawn``, which turns any failure into exactly one error
response (SPEC §2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sovereign.api.parsing import Handler

if TYPE_CHECKING:
    from sovereign.services import Services

__all__ = ["Handler", "handler_table"]


def handler_table(svc: Services) -> dict[int, Handler]:
    from sovereign.api import auth, core, directory, messaging, mls

    table: dict[int, Handler] = {}
    for module in (core, auth, messaging, mls, directory):
        module.install(table, svc)
    return table
