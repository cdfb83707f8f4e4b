"""Envelope handlers: parse a payload, call a service, render the response.

Each module registers sync handlers ``(conn, type, request_id, payload)`` in
``app.handlers``. A handler parses the payload before returning (the payload is
borrowed from the transport's read buffer) and hands async work to ``app.spawn``,
which turns any failure into exactly one error response (SPEC §2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sovereign.server import App


def install(app: App) -> None:
    from sovereign.api import auth, core, messaging, mls

    core.install(app)
    auth.install(app)
    messaging.install(app)
    mls.install(app)
