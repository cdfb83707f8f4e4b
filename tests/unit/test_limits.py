"""Per-IP limiter and the client IP behind proxies (SPEC §12.32), without sockets."""

from __future__ import annotations

from ipaddress import ip_network

from sovereign.protocol.upgrade import client_ip
from sovereign.services.limits import PerIpLimiter


def test_bucket_refills_at_its_rate_and_caps_at_burst() -> None:
    lim = PerIpLimiter(rate_per_second=0.5, burst=2)
    assert lim.take("a", 0.0) == 0.0
    assert lim.take("a", 0.0) == 0.0
    assert lim.take("a", 0.0) == 2.0  # one token every 2 s
    assert lim.take("b", 0.0) == 0.0  # per IP
    assert lim.take("a", 2.0) == 0.0
    assert lim.take("a", 100.0) == 0.0 and lim.take("a", 100.0) == 0.0
    assert lim.take("a", 100.0) > 0  # refilled to the burst, not beyond


def test_memory_is_bounded_and_forgets_the_oldest() -> None:
    lim = PerIpLimiter(rate_per_second=1.0, burst=1, max_entries=100)
    for i in range(1000):
        lim.take(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(lim) == 100
    assert lim.take("10.0.0.0", 0.0) == 0.0  # forgotten = full again
    assert lim.take("10.0.3.231", 0.0) > 0  # among the newest: still empty


TRUSTED = (ip_network("10.0.0.0/8"), ip_network("::1/128"))


def test_client_ip_without_a_trusted_proxy_is_the_peer() -> None:
    assert client_ip("203.0.113.5", ["198.51.100.1"], TRUSTED) == "203.0.113.5"
    assert client_ip("10.0.0.2", ["198.51.100.1"], ()) == "10.0.0.2"


def test_client_ip_behind_proxies_reads_right_to_left() -> None:
    assert client_ip("10.0.0.2", ["198.51.100.1"], TRUSTED) == "198.51.100.1"
    # a client-forged hop on the left does not win over the proxy's entry
    assert client_ip("10.0.0.2", ["1.2.3.4, 198.51.100.1"], TRUSTED) == "198.51.100.1"
    # two proxies
    assert client_ip("10.0.0.2", ["198.51.100.1", "10.9.9.9"], TRUSTED) == "198.51.100.1"
    # garbage stops the walk at the last trusted hop
    assert client_ip("10.0.0.2", ["not-an-ip"], TRUSTED) == "10.0.0.2"
    assert client_ip("::1", ["2001:db8::7"], TRUSTED) == "2001:db8::7"
