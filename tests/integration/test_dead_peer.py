"""A dead peer: the network under an established connection stops carrying packets
(SPEC §12.31). Runs in a private network namespace (``unshare -rn``) so that nothing
outside it is touched: ``iptables -j DROP`` on the client's port when iptables exists,
else the namespace's loopback link is taken down. Skipped, with the reason, where a
namespace cannot be created."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import pg

CHILD = textwrap.dedent(
    """
    import asyncio, json, shutil, subprocess, sys, time
    sys.path[:0] = {paths!r}
    from tests.helpers.server import running_server
    from tests.helpers.wsclient import WsClient
    from sovereign.protocol.types import MessageType as T
    from sovereign.v1 import sovereign_pb2 as pb

    async def main():
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        async with running_server(
            __import__("pathlib").Path({data!r}), ping_interval=1.0, ping_timeout=1.0,
            idle_timeout=60,
        ) as srv:
            user = await srv.app.auth.create_user("deadpeer")
            _, token = await srv.app.auth.create_session(user.user_id)
            c = await WsClient.connect(srv.url)
            await c.request(T.AUTH_REQUEST, pb.AuthRequest(session_token=token), T.AUTH_SUCCESS)
            await c.until_sync()
            port = c.transport.underlying_transport.get_extra_info("sockname")[1]
            if shutil.which("iptables"):
                method = "iptables DROP"
                for chain, opt in (("INPUT", "--sport"), ("OUTPUT", "--dport")):
                    subprocess.run(["iptables", "-A", chain, "-p", "tcp", opt, str(port),
                                    "-j", "DROP"], check=True)
            else:
                method = "loopback link down"
                subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
            t0 = time.monotonic()
            while srv.app.connection_count() and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.05)
            print(json.dumps({{"method": method, "dropped_after": time.monotonic() - t0,
                               "left": srv.app.connection_count()}}))
            c.transport.disconnect(graceful=False)

    __import__("uvloop").run(main())
    """
)


@pg.sqlite_only("the server runs in a private network namespace: no PostgreSQL there")
def test_dead_peer_is_dropped_by_server_pings(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        pytest.skip("needs unshare(1) and ip(8) to build a private network namespace")
    probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    root = str(Path(__file__).parents[2])
    script = CHILD.format(paths=[root, os.path.join(root, "src")], data=str(tmp_path / "data"))
    proc = subprocess.run(
        [unshare, "-rn", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("dead peer:", result)
    assert result["left"] == 0, result
    # ping after 1 s of silence, 4008 one more second later, then the 1 s close linger
    assert result["dropped_after"] < 6.0, result
