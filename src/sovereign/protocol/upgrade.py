"""HTTP upgrade policy for the main listener (SPEC §1, §4, §10, §12.10). No I/O.

The listener answers only ``GET /ws`` (the WebSocket endpoint) and ``GET /healthz``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address

SUBPROTOCOL = "sovereign.v1"


@dataclass(frozen=True, slots=True)
class UpgradeDecision:
    status: int  # 101 accept, 200 health, else the HTTP error
    subprotocol: str | None = None
    reason: str = ""


#: The two acceptances, shared (immutable): none is built per upgrade.
ACCEPT = UpgradeDecision(101)
ACCEPT_SUBPROTOCOL = UpgradeDecision(101, subprotocol=SUBPROTOCOL)


def parse_subprotocols(values: Collection[str]) -> list[str]:
    """``Sec-WebSocket-Protocol`` may repeat and hold comma-separated tokens (RFC 6455 §4.1)."""
    out: list[str] = []
    for value in values:
        out.extend(p.strip() for p in value.split(",") if p.strip())
    return out


def decide(
    *,
    method: str,
    path: str,
    origin: str | None,
    offered_subprotocols: list[str],
    allowed_origins: Collection[str],
    active_connections: int,
    max_connections: int,
    accepting: bool = True,
) -> UpgradeDecision:
    route = path.split("?", 1)[0]
    if method != "GET":
        return UpgradeDecision(405, reason="method not allowed")
    if route == "/healthz":
        return UpgradeDecision(200, reason="ok")
    if route != "/ws":
        return UpgradeDecision(404, reason="not found")
    if not accepting:
        return UpgradeDecision(503, reason="server shutting down")
    # SPEC §12.10: browsers always send Origin; native clients send none and pass.
    if origin is not None and origin not in allowed_origins:
        return UpgradeDecision(403, reason="origin not allowed")
    # SPEC §1: offered but not ours -> 400; none offered -> accept without one.
    accept = ACCEPT
    if offered_subprotocols:
        if SUBPROTOCOL not in offered_subprotocols:
            return UpgradeDecision(400, reason=f"subprotocol {SUBPROTOCOL} required")
        accept = ACCEPT_SUBPROTOCOL
    if active_connections >= max_connections:
        return UpgradeDecision(503, reason="server at connection limit")
    return accept


def client_ip(
    peer_ip: str,
    forwarded_for: Collection[str],
    trusted: Collection[IPv4Network | IPv6Network],
) -> str:
    """The source IP the per-IP limits count (SPEC §12.32).

    The socket's peer, unless that peer is a trusted reverse proxy: then the
    ``X-Forwarded-For`` chain is read from the right, skipping trusted proxies, and
    the first address that is not one is the client. A malformed entry ends the walk
    at the last trusted hop (a client cannot forge its way past a proxy that appends).
    """
    if not trusted or not forwarded_for:
        return peer_ip
    hops = [p.strip() for value in forwarded_for for p in value.split(",") if p.strip()]
    current = peer_ip
    for hop in [peer_ip, *reversed(hops)]:
        try:
            addr = ip_address(hop)
        except ValueError:
            return current
        current = str(addr)
        if not any(addr in net for net in trusted):
            return current
    return current
