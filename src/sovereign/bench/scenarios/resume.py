"""``resume``: storms of reconnecting devices.

``--concurrency`` tasks each loop: open a TCP connection and the WebSocket upgrade (from
the next 127.0.0.x source address), AUTH_REQUEST{session_token}, wait for AUTH_SUCCESS
and the offline sync up to SYNC_COMPLETE, then close (close frame, server drops TCP).
Each task cycles through its own accounts (devices). One resume = one full cycle; its
latency is connect → SYNC_COMPLETE.

``--backlog N`` first gives every device N undelivered messages (accounts are paired in
a conversation; each sends N to the other, nobody acks), so each resume also streams N
events (plus the pair's two GROUP_MEMBER_ADDED) before SYNC_COMPLETE.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

from sovereign.bench import stats
from sovereign.bench.client import BenchClient, BenchError, connect
from sovereign.bench.scenarios.base import Outcome, Phase, Spec, WorkerBase, split
from sovereign.bench.server import Account
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

_now = time.monotonic_ns


class ResumeWorker(WorkerBase):
    def __init__(self, index: int, common: dict[str, Any]) -> None:
        super().__init__(index, common)
        self.accounts: list[tuple[str, str]] = []
        self.concurrency = 1
        self.running = False
        self.cap = math.inf
        self._reset()

    def _reset(self) -> None:
        self.resumes = self.failures = self.backlog_events = self.started = 0
        self.latency = stats.new_samples()
        self.connect_latency = stats.new_samples()

    async def setup(self, step: int, data: dict[str, Any]) -> dict[str, Any]:
        self.accounts = [(t, u) for t, u in data["accounts"]]
        self.concurrency = max(1, int(data["concurrency"]))
        backlog = int(data["backlog"])
        if backlog > 0:
            await self._make_backlog(backlog, data["size"], int(data["connect_concurrency"]))
        return {"accounts": len(self.accounts)}

    async def _make_backlog(self, n: int, size: int, concurrency: int) -> None:
        sem = asyncio.Semaphore(max(1, concurrency // 2))

        async def pair(a: tuple[str, str], b: tuple[str, str]) -> None:
            async with sem:
                ca = await self.open(lambda: BenchClient(None), a[0])
                cb = await self.open(lambda: BenchClient(None), b[0])
                try:
                    conv = pb.GroupCreated.FromString(
                        await ca.request(
                            T.GROUP_CREATE,
                            pb.GroupCreate(title="resume", member_ids=[b[1]]).SerializeToString(),
                            T.GROUP_CREATED,
                        )
                    ).conversation_id
                    body = b"\xa5" * size
                    for c in (ca, cb):
                        for _ in range(n):
                            await c.request(
                                T.MESSAGE_SEND,
                                pb.MessageSend(
                                    conversation_id=conv,
                                    encrypted_payload=body,
                                    message_type="text",
                                ).SerializeToString(),
                                T.MESSAGE_RECEIVE,
                            )
                finally:
                    for c in (ca, cb):
                        c.closing = True
                        c.close()
                    await asyncio.gather(ca.wait_closed(), cb.wait_closed())

        accts = self.accounts
        await asyncio.gather(*(pair(accts[i], accts[i + 1]) for i in range(0, len(accts) - 1, 2)))

    def begin(self, name: str, params: dict[str, Any]) -> None:
        super().begin(name, params)
        self._reset()
        cap = params.get("cap")
        self.cap = math.inf if cap is None else int(cap)

    async def _loop(self, tokens: list[str], deadline: float) -> None:
        i = 0
        while time.monotonic() < deadline and self.started < self.cap:
            token = tokens[i % len(tokens)]
            i += 1
            self.started += 1
            t0 = _now()
            c: BenchClient | None = None
            try:
                c = await connect(lambda: BenchClient(None), self.url, local_addr=self.addrs.next())
                t1 = _now()
                delivered = await c.resume(token, timeout=30.0)
            except BenchError as exc:
                self.failures += 1
                self.failure(exc)
                if c is not None:
                    c.closing = True
                    c.close()
                    await c.wait_closed(2.0)
                await asyncio.sleep(0.05)
                continue
            now = _now()
            stats.add_ns(self.latency, now - t0)
            stats.add_ns(self.connect_latency, t1 - t0)
            self.resumes += 1
            self.backlog_events += delivered
            self.last_t = now / 1e9
            c.closing = True
            c.close()
            await c.wait_closed(5.0)

    async def issue(self, params: dict[str, Any], start: float, deadline: float) -> None:
        tokens = [t for t, _ in self.accounts]
        if not tokens:
            return
        n = min(self.concurrency, len(tokens))
        shares = [tokens[i::n] for i in range(n)]
        self.running = True
        try:
            await asyncio.gather(*(self._loop(s, deadline) for s in shares))
        finally:
            self.running = False

    def progress(self) -> dict[str, Any]:
        return {
            "resumes": self.resumes,
            "failures": self.failures,
            "drained": not self.running,
            "last_t": self.last_t,
        }

    def finish(self) -> dict[str, Any]:
        out = super().finish()
        out.update(self.progress())
        out.update(
            backlog_events=self.backlog_events,
            latency=self.latency,
            connect_latency=self.connect_latency,
        )
        return out


class ResumeSpec(Spec):
    name = "resume"

    def accounts(self) -> int:
        users = self.args.users or self.args.concurrency
        return max(int(users), int(self.args.procs))

    def connections(self) -> int:
        return int(self.args.concurrency) * 2

    def plans(self, accounts: Sequence[Account], procs: int) -> list[dict[str, Any]]:
        conc = [len(s) for s in split(list(range(self.args.concurrency)), procs)]
        return [
            {
                "accounts": [(a.token, a.user_id) for a in share],
                "concurrency": c,
                "backlog": self.args.backlog,
                "size": self.args.size,
                "connect_concurrency": self.args.connect_concurrency,
            }
            for share, c in zip(split(accounts, procs), conc, strict=True)
        ]

    def next_phase(self, done: list[Outcome]) -> Phase | None:
        if done:
            return None
        cap = None if self.args.count is None else math.ceil(self.args.count / self.args.procs)
        return Phase("storm", {"cap": cap}, float(self.args.duration))

    def progress_line(self, phase: Phase, sums: dict[str, float], rates: dict[str, float]) -> str:
        rate = rates.get("resumes", 0.0)
        return (
            f"resumes {int(sums.get('resumes', 0)):,} ({rate:,.0f}/s)  "
            f"failures {int(sums.get('failures', 0)):,}"
        )

    def summarise(self, out: Outcome) -> dict[str, Any]:
        resumes, failures = out.total("resumes"), out.total("failures")
        per_s = resumes / out.wall_s if out.wall_s > 0 else 0.0
        backlog = self.args.backlog
        expected_events = (2 * backlog + 2) * resumes if backlog else None
        s: dict[str, Any] = {
            "concurrency": self.args.concurrency,
            "connections": self.args.concurrency,
            "devices": self.accounts(),
            "backlog_per_device": backlog,
            "resumes": resumes,
            "failures": failures,
            "backlog_events": out.total("backlog_events"),
            "resumes_per_s": round(per_s, 1),
            "unit": "resumes",
            "count": resumes,
            "latency_ms": {
                "resume": stats.summary(out.samples("latency")),
                "connect": stats.summary(out.samples("connect_latency")),
            },
            "headline_latency": "resume",
        }
        s["checks"] = {"no failed resume": failures == 0, "some resumes": resumes > 0}
        if expected_events is not None:
            # Each device sees the pair's 2 ADDED events minus its own (it joined at seq 1
            # or 2) plus all 2N messages: 2N+1 for the creator, 2N for the other.
            s["checks"]["every resume streamed its backlog"] = (
                out.total("backlog_events") >= 2 * backlog * resumes
            )
        return s
