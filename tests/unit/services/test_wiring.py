"""The harness must be the server's composition, with only the outbox and clock
swapped: a test of a service wired differently from production proves nothing."""

from __future__ import annotations

from typing import Any

import msgspec

from sovereign.server import App
from sovereign.services import Services
from tests.helpers.services import Harness


def wiring(svc: Services, extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For each service: which port or service each attribute and hook is."""
    known: dict[int, str] = {id(v): k for k, v in extra.items()}
    # (an absent service, e.g. ``cluster`` on a single node, is None: not a port)
    known.update(
        {id(getattr(svc, f)): f for f in svc.__dataclass_fields__ if getattr(svc, f) is not None}
    )
    known[id(svc.delivery.writer)] = "delivery.writer"
    known[id(svc.delivery.eventlog)] = "eventlog"

    def describe(value: Any) -> Any:
        if isinstance(value, list):
            return [describe(v) for v in value]
        owner = getattr(value, "__self__", None)
        if owner is not None and id(owner) in known:
            return f"{known[id(owner)]}.{value.__name__}"
        return known.get(id(value))

    out: dict[str, dict[str, Any]] = {}
    for name in svc.__dataclass_fields__:
        obj = getattr(svc, name)
        attrs = getattr(obj, "__dict__", {})
        described = {a: describe(v) for a, v in attrs.items()}
        out[name] = {a: d for a, d in described.items() if d not in (None, [])}
    eventlog = svc.delivery.eventlog
    out["eventlog"] = {"cork": describe(eventlog.cork), "uncork": describe(eventlog.uncork)}
    return out


async def test_harness_is_wired_as_the_server(h: Harness) -> None:
    # Metrics off: with them on the server also counts READYs with a hook of its own.
    app = App(msgspec.structs.replace(h.config, metrics=False), h.storage, h.clock)
    common = {"storage": h.storage, "db": h.storage.db, "clock": h.clock}
    common |= {"users": h.storage.users, "sessions": h.storage.sessions}
    expected = wiring(app.services, common)
    assert wiring(h.services, common) == expected
    # The comparison is not vacuous: the hooks and the shared ports are in it.
    assert expected["connections"]["ready_hooks"] == ["delivery.on_ready"]
    assert expected["delivery"]["after_sync"] == ["mls.on_sync_end"]
    assert expected["delivery"]["sync_tail"] == ["mls.sync_tail"]
    assert expected["delivery"]["sync_reads"] == ["mls.sync_read"]
    assert expected["groups"]["introduce"] == "ephemeral.introduce"
    assert expected["ephemeral"]["writer"] == "delivery.writer"
    assert expected["eventlog"] == {"cork": "outbox.cork", "uncork": "outbox.uncork"}
