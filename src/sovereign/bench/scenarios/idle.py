"""``idle``: many authenticated, idle connections with heartbeats.

Phase ``connect`` opens ``--connections`` connections (each: TCP + upgrade + resume up
to SYNC_COMPLETE, ``--connect-concurrency`` at a time per process) and measures the
ramp. The server's RSS is read before it (baseline) and ``--settle`` s after it. Phase
``hold`` keeps them all open for ``--duration`` s, each sending PING every
``--heartbeat`` s (phases spread evenly), and reads RSS again. RSS per connection is
(RSS after - baseline) / connections. The server keeps its default idle timeout (90 s)
here, so a missed heartbeat would show up as lost connections.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

from picows import WSFrame

from sovereign.bench import stats
from sovereign.bench.client import BINARY, BenchClient, BenchError
from sovereign.bench.scenarios.base import Outcome, Phase, Spec, WorkerBase, split
from sovereign.bench.server import Account
from sovereign.codec import decode_envelope, encode_envelope
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

_now = time.monotonic_ns
_PONG = int(T.PONG)
_ERROR = int(T.ERROR)


class IdleClient(BenchClient):
    w: IdleWorker

    def on_frame(self, frame: WSFrame) -> None:
        buf = frame.get_payload_as_memoryview()
        if buf[1] == _PONG:
            w = self.w
            w.pongs += 1
            w.last_t = time.monotonic()
        elif buf[1] == _ERROR:
            code = pb.Error.FromString(bytes(decode_envelope(buf)[2])).code
            self.w.errors[code] = self.w.errors.get(code, 0) + 1


class IdleWorker(WorkerBase):
    def __init__(self, index: int, common: dict[str, Any]) -> None:
        super().__init__(index, common)
        self.tokens: list[str] = []
        self.concurrency = 64
        self.running = False
        self.conns: list[IdleClient] = []
        self._reset()

    def _reset(self) -> None:
        self.connected = self.failures = self.pings = self.pongs = 0
        self.latency = stats.new_samples()

    async def setup(self, step: int, data: dict[str, Any]) -> dict[str, Any]:
        self.tokens = list(data["tokens"])
        self.concurrency = int(data["concurrency"])
        return {"accounts": len(self.tokens)}

    def begin(self, name: str, params: dict[str, Any]) -> None:
        super().begin(name, params)
        self._reset()

    def _factory(self) -> IdleClient:
        c = IdleClient(self)
        c.w = self
        return c

    async def _connect_all(self) -> None:
        sem = asyncio.Semaphore(max(1, self.concurrency))

        async def one(token: str) -> None:
            async with sem:
                t0 = _now()
                try:
                    c = await self.open(self._factory, token, retries=2, read_buffer=1024)
                except BenchError:
                    self.failures += 1
                    return
                now = _now()
                stats.add_ns(self.latency, now - t0)
                c.setup = False
                self.conns.append(c)
                self.clients.append(c)
                self.connected += 1
                self.last_t = now / 1e9

        await asyncio.gather(*(one(t) for t in self.tokens))

    async def _heartbeat(self, every: float, start: float, deadline: float) -> None:
        conns = list(self.conns)
        random.Random(self.index).shuffle(conns)
        n = len(conns)
        if not n:
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            return
        interval = every / n  # one connection's ping every `interval` seconds
        sent = 0
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            due = int((now - start) / interval) + 1
            while sent < due:
                c = conns[sent % n]
                sent += 1
                t = c.transport
                if t is not None and not c.disconnected:
                    ping = pb.Ping(timestamp=time.time_ns() // 1000).SerializeToString()
                    t.send(BINARY, encode_envelope(T.PING, "", ping))
                    self.pings += 1
            await asyncio.sleep(min(0.05, max(0.001, interval)))

    async def issue(self, params: dict[str, Any], start: float, deadline: float) -> None:
        self.running = True
        try:
            if params["what"] == "connect":
                await self._connect_all()
            else:
                await self._heartbeat(float(params["heartbeat"]), start, deadline)
        finally:
            self.running = False

    def progress(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "failures": self.failures,
            "pings": self.pings,
            "pongs": self.pongs,
            "open": sum(1 for c in self.conns if not c.disconnected),
            "drained": not self.running and self.pongs >= self.pings - self.lost_count,
            "last_t": self.last_t,
        }

    def finish(self) -> dict[str, Any]:
        out = super().finish()
        out.update(self.progress())
        out["latency"] = self.latency
        return out


class IdleSpec(Spec):
    name = "idle"
    server_env = {"SOVEREIGN_IDLE_TIMEOUT": "90"}

    def accounts(self) -> int:
        return int(self.args.connections)

    def plans(self, accounts: Sequence[Account], procs: int) -> list[dict[str, Any]]:
        return [
            {"tokens": [a.token for a in share], "concurrency": self.args.connect_concurrency}
            for share in split(accounts, procs)
        ]

    def next_phase(self, done: list[Outcome]) -> Phase | None:
        if not done:
            return Phase("connect", {"what": "connect"}, 0.0, memory=True, settle=self.args.settle)
        if len(done) == 1:
            return Phase(
                "hold",
                {"what": "hold", "heartbeat": self.args.heartbeat},
                float(self.args.duration),
                memory=True,
            )
        return None

    def progress_line(self, phase: Phase, sums: dict[str, float], rates: dict[str, float]) -> str:
        if phase.params["what"] == "connect":
            rate = rates.get("connected", 0.0)
            return (
                f"connected {int(sums.get('connected', 0)):,}/{self.accounts():,} "
                f"({rate:,.0f}/s)  failures {int(sums.get('failures', 0)):,}"
            )
        return (
            f"open {int(sums.get('open', 0)):,}  pings {int(sums.get('pings', 0)):,}  "
            f"pongs {int(sums.get('pongs', 0)):,}"
        )

    def summarise(self, out: Outcome) -> dict[str, Any]:
        n = self.accounts()
        if out.phase.params["what"] == "connect":
            connected = out.total("connected")
            self.baseline = out.mem_before
            s: dict[str, Any] = {
                "connections": connected,
                "failures": out.total("failures"),
                "connections_per_s": round(connected / out.wall_s, 1) if out.wall_s > 0 else 0.0,
                "unit": "connections",
                "count": connected,
                "latency_ms": {"connect_and_resume": stats.summary(out.samples("latency"))},
                "headline_latency": "connect_and_resume",
            }
            s.update(self._memory(out, connected))
            s["checks"] = {
                "every connection authenticated": connected == n,
                "none lost": out.total("lost") == 0,
            }
            return s
        open_ = out.total("open")
        s = {
            "connections": open_,
            "heartbeat_s": self.args.heartbeat,
            "pings": out.total("pings"),
            "pongs": out.total("pongs"),
            "unit": "pongs",
            "count": out.total("pongs"),
            "server_cpu_share": round(out.server_cpu_s / out.wall_s, 4)
            if out.server_cpu_s is not None and out.wall_s > 0
            else None,
        }
        s.update(self._memory(out, open_))
        s["checks"] = {
            "every ping answered": out.total("pongs") == out.total("pings"),
            "no connection lost": out.total("lost") == 0,
        }
        return s

    def _memory(self, out: Outcome, conns: int) -> dict[str, Any]:
        base = getattr(self, "baseline", None)
        after = out.mem_after
        if base is None or after is None:
            return {"server_rss_kb_before": None, "server_rss_kb_after": None}
        delta = after.rss_kb - base.rss_kb
        return {
            "server_rss_kb_before": base.rss_kb,
            "server_rss_kb_after": after.rss_kb,
            "server_rss_peak_kb": after.hwm_kb,
            "server_open_fds": out.fds_after,
            "rss_kb_per_connection": round(delta / conns, 2) if conns else None,
            "anon_kb_per_connection": round((after.anon_kb - base.anon_kb) / conns, 2)
            if conns
            else None,
        }
