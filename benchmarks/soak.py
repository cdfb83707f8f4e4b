"""Soak: many clients sending and acking for a long time; does the server level off?

``make soak`` (``SOAK_MINUTES``, ``SOAK_CLIENTS``): a spawned ``sovereign serve`` on
127.0.0.1, ``clients`` accounts (token path) in pairs sharing one conversation; every
client sends one MESSAGE_SEND per second to its pair and acks what it receives
(cumulative MESSAGE_ACK with a request_id, once a second). Every 10 s the server's RSS
(``/proc/PID/status`` VmRSS) and open file descriptors are sampled.

The report (stdout, and JSON under ``.artifacts/``) gives the RSS slope (least squares,
MB per minute, over the samples after the first fifth: start-up and warm caches are not
a leak), the fd counts, and the message counts. It exits non-zero when a message is
lost (sent and echoed but never received by the peer), the fd count grows, or a client
is dropped. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from picows import WSFrame

from sovereign.bench.client import BenchClient, connect
from sovereign.bench.server import SpawnedServer, provision_tokens, server_environment
from sovereign.codec import decode_envelope
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

SAMPLE_EVERY = 10.0


class SoakClient(BenchClient):
    def __init__(self, owner: Any = None) -> None:
        super().__init__(owner)
        self.conv = ""
        self.sent = 0
        self.echoed = 0
        self.received = 0
        self.acked_responses = 0
        self.errors = 0
        self.last_received_id = ""
        self.seq = 0

    def on_frame(self, frame: WSFrame) -> None:
        msg_type, rid, payload = decode_envelope(frame.get_payload_as_bytes())
        if msg_type == T.MESSAGE_RECEIVE:
            if rid:
                self.echoed += 1
            else:
                self.received += 1
                self.last_received_id = pb.MessageReceive.FromString(bytes(payload)).message_id
        elif msg_type == T.ACK:
            self.acked_responses += 1
        elif msg_type in (T.ERROR, T.AUTH_ERROR):
            self.errors += 1

    def send_one(self) -> None:
        self.seq += 1
        body = pb.MessageSend(
            conversation_id=self.conv, encrypted_payload=os.urandom(200), message_type="text"
        )
        if self.send(T.MESSAGE_SEND, f"m{self.seq}", body.SerializeToString()):
            self.sent += 1

    def ack_latest(self) -> None:
        if self.last_received_id:
            ack = pb.MessageAck(message_id=self.last_received_id)
            self.send(T.MESSAGE_ACK, f"a{self.seq}", ack.SerializeToString())
            self.last_received_id = ""


def proc_sample(pid: int) -> tuple[float, int]:
    rss_kb = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB), in MB per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    if var == 0:
        return 0.0
    cov = sum((p[0] - mx) * (p[1] - my) for p in points)
    return cov / var * 60.0


async def run(clients: int, minutes: float, out: Path) -> int:
    data_dir = tempfile.mkdtemp(prefix="sovereign-soak-")
    accounts = await provision_tokens(data_dir, clients, "soak")
    log: list[str] = []
    server = SpawnedServer(
        data_dir, env=server_environment({}, os.environ), cpus=None, log=log.append
    )
    url = await asyncio.to_thread(server.start)
    conns: list[SoakClient] = []
    try:
        for acc in accounts:
            c = await connect(SoakClient, url)
            await c.resume(acc.token)
            conns.append(c)
        for a, b in zip(conns[0::2], conns[1::2], strict=True):
            other = accounts[conns.index(b)].user_id
            got = await a.request(
                T.GROUP_CREATE,
                pb.GroupCreate(title="soak", member_ids=[other]).SerializeToString(),
                T.GROUP_CREATED,
            )
            a.conv = b.conv = pb.GroupCreated.FromString(got).conversation_id
        await asyncio.sleep(1.0)  # the GROUP_MEMBER_ADDED pushes
        for c in conns:
            c.setup = False
        t0 = time.monotonic()
        end = t0 + minutes * 60
        samples: list[dict[str, float]] = []
        next_sample = t0
        tick = 0
        while True:
            now = time.monotonic()
            if now >= next_sample:
                rss, fds = proc_sample(server.pid)
                samples.append({"t": round(now - t0, 1), "rss_mb": round(rss, 2), "fds": fds})
                print(f"t={now - t0:7.0f}s rss={rss:7.1f} MB fds={fds}", flush=True)
                next_sample += SAMPLE_EVERY
            if now >= end:
                break
            # One message per client per second, spread over the second.
            for i, c in enumerate(conns):
                if i % 10 == tick % 10:
                    c.send_one()
                    c.ack_latest()
            tick += 1
            await asyncio.sleep(0.1)
        await asyncio.sleep(5.0)  # drain
        sent = sum(c.sent for c in conns)
        echoed = sum(c.echoed for c in conns)
        received = sum(c.received for c in conns)
        dropped = sum(1 for c in conns if c.disconnected)
        errors = sum(c.errors for c in conns)
        acks = sum(c.acked_responses for c in conns)
    finally:
        for c in conns:
            c.closing = True
            if c.transport is not None and not c.disconnected:
                c.transport.disconnect()
        code, _ = await asyncio.to_thread(server.stop)
    warm = samples[len(samples) // 5 :]
    slope = slope_per_minute([(s["t"], s["rss_mb"]) for s in warm])
    fds = [int(s["fds"]) for s in samples]
    report = {
        "clients": clients,
        "minutes": minutes,
        "messages_sent": sent,
        "messages_echoed": echoed,
        "messages_received_by_peer": received,
        "acks_answered": acks,
        "errors": errors,
        "clients_dropped": dropped,
        "rss_start_mb": samples[0]["rss_mb"],
        "rss_end_mb": samples[-1]["rss_mb"],
        "rss_max_mb": max(s["rss_mb"] for s in samples),
        "rss_slope_mb_per_min_after_warmup": round(slope, 3),
        "fds_first": fds[0],
        "fds_last": fds[-1],
        "fds_max": max(fds),
        "server_exit": code,
        "server_problem_lines": server.problem_count,
        "samples": samples,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    ok = (
        received == echoed == sent
        and dropped == 0
        and errors == 0
        and fds[-1] <= fds[0] + 5
        and code == 0
    )
    return 0 if ok else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--out", default=".artifacts/soak.json")
    args = p.parse_args()
    if args.clients < 2 or args.clients % 2:
        sys.exit("--clients must be an even number >= 2")
    sys.exit(asyncio.run(run(args.clients, args.minutes, Path(args.out))))


if __name__ == "__main__":
    main()
