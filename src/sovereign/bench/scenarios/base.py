"""What every scenario has: a coordinator-side :class:`Spec` and a per-process
:class:`WorkerBase`.

A scenario runs as: accounts provisioned → ``Spec.plans`` hands each worker its share
(setup step 0) → optional further setup steps (``Spec.step_data``) → phases from
``Spec.next_phase`` until it returns None. Each phase is measured on its own: wall time,
the server's CPU seconds, every worker's CPU seconds, and the scenario's counters and
latency samples, summarised by ``Spec.summarise``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from sovereign.bench.client import AddressPool, BenchClient, BenchError, connect
from sovereign.bench.procfs import Memory
from sovereign.bench.server import Account

C = TypeVar("C", bound=BenchClient)


@dataclass
class Phase:
    name: str
    params: dict[str, Any]
    duration: float
    memory: bool = False  # the scenario reports memory (snapshots are always taken)
    settle: float = 0.0  # seconds to wait after the phase before the "after" snapshot
    pid: int | None = None  # measure this process instead of the server (baseline echo)


@dataclass
class Outcome:
    """One measured phase, as the coordinator saw it."""

    phase: Phase
    wall_s: float
    server_cpu_s: float | None
    load_cpu_s: list[float]
    results: list[dict[str, Any]]
    complete: bool
    mem_before: Memory | None = None
    mem_after: Memory | None = None
    fds_after: int | None = None
    listen_drops: dict[str, int] = field(default_factory=dict)
    cpu_busy: dict[str, float] = field(default_factory=dict)  # machine, per CPU, in the phase
    coordinator_cpu_s: float = 0.0
    server_split: tuple[float, float] | None = None  # (user, system) CPU seconds
    #: cluster mode: CPU seconds by serving part (sovereign, postgres, redis)
    server_cpu_parts: dict[str, float] = field(default_factory=dict)
    server_io: dict[str, int] = field(default_factory=dict)  # /proc/PID/io deltas
    summary: dict[str, Any] = field(default_factory=dict)

    def total(self, key: str) -> int:
        return sum(int(r.get(key, 0)) for r in self.results)

    def samples(self, key: str) -> list[Any]:
        return [r[key] for r in self.results if key in r]


class Spec:
    """Coordinator side of a scenario."""

    name: ClassVar[str]
    #: Server settings for this scenario when the tool spawns the server.
    server_env: ClassVar[dict[str, str]] = {}

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def accounts(self) -> int:
        raise NotImplementedError

    def connections(self) -> int:
        """How many connections the workers hold at most (for fd planning)."""
        return self.accounts()

    def plans(self, accounts: Sequence[Account], procs: int) -> list[dict[str, Any]]:
        """Setup step 0: each worker's share."""
        raise NotImplementedError

    def steps(self) -> int:
        return 1

    def step_data(self, step: int, infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Data for setup step ``step`` (>= 1) from the workers' answers to the last."""
        return [{} for _ in infos]

    def next_phase(self, done: list[Outcome]) -> Phase | None:
        raise NotImplementedError

    def complete(self, phase: Phase, progress: list[dict[str, Any]]) -> bool:
        """Everything issued has been answered (checked once issuing stopped)."""
        return all(p.get("drained", False) for p in progress)

    def progress_line(self, phase: Phase, sums: dict[str, float], rates: dict[str, float]) -> str:
        """One progress line: ``sums`` over workers, ``rates`` per second since the last."""
        return ""

    def summarise(self, out: Outcome) -> dict[str, Any]:
        raise NotImplementedError


def split(items: Sequence[Any], procs: int) -> list[list[Any]]:
    """Round-robin ``items`` over ``procs`` workers."""
    return [list(items[i::procs]) for i in range(procs)]


class WorkerBase:
    """Process side of a scenario: holds the clients and the phase counters."""

    def __init__(self, index: int, common: dict[str, Any]) -> None:
        self.index = index
        self.common = common
        self.url: str = common["url"]
        host = urlsplit(self.url).hostname or "127.0.0.1"
        self.addrs = AddressPool(int(common.get("source_addrs", 1)), host, offset=index)
        self.clients: list[BenchClient] = []
        self.last_t = 0.0
        self.lost_count = 0
        self.close_codes: dict[int, int] = {}
        self.errors: dict[int, int] = {}
        self.connect_failures: dict[str, int] = {}

    # -- connections -------------------------------------------------------------------
    def lost(self, client: BenchClient) -> None:
        """A connection we did not close went away."""
        self.lost_count += 1
        code = client.close_code or 1006
        self.close_codes[code] = self.close_codes.get(code, 0) + 1

    def failure(self, exc: BaseException) -> None:
        key = str(exc)
        if len(key) > 120:
            key = key[:120]
        self.connect_failures[key] = self.connect_failures.get(key, 0) + 1

    async def open(
        self, factory: Callable[[], C], token: str, *, retries: int = 3, read_buffer: int = 4096
    ) -> C:
        """Connect (from the next source address) and resume with ``token``."""
        delay = 0.2
        for attempt in range(retries + 1):
            client: C | None = None
            try:
                client = await connect(
                    factory, self.url, local_addr=self.addrs.next(), read_buffer=read_buffer
                )
                await client.resume(token)
                return client
            except BenchError as exc:
                self.failure(exc)
                if client is not None:
                    client.closing = True
                    client.close()
                if attempt == retries:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def open_many(
        self,
        factories: Sequence[Callable[[], C]],
        tokens: Sequence[str],
        concurrency: int = 64,
        read_buffer: int = 4096,
    ) -> list[C]:
        """Open one connection per token (``factories[i]`` makes the i-th listener)."""
        sem = asyncio.Semaphore(max(1, concurrency))

        async def one(factory: Callable[[], C], token: str) -> C:
            async with sem:
                return await self.open(factory, token, read_buffer=read_buffer)

        out = await asyncio.gather(*(one(f, t) for f, t in zip(factories, tokens, strict=True)))
        self.clients.extend(out)
        return list(out)

    async def quiet(self, seconds: float = 0.3, limit: float = 30.0) -> None:
        """Wait until no setup push arrived for ``seconds`` (bounded by ``limit``)."""
        end = time.monotonic() + limit
        last = -1
        while time.monotonic() < end:
            now = sum(c.setup_pushes for c in self.clients)
            if now == last:
                return
            last = now
            await asyncio.sleep(seconds)

    async def teardown(self) -> None:
        for c in self.clients:
            c.close()
        if self.clients:
            await asyncio.gather(*(c.wait_closed(5.0) for c in self.clients))
        self.clients.clear()

    # -- phases ----------------------------------------------------------------------------
    async def setup(self, step: int, data: dict[str, Any]) -> dict[str, Any]:
        return {}

    def begin(self, name: str, params: dict[str, Any]) -> None:
        self.last_t = 0.0

    async def issue(self, params: dict[str, Any], start: float, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))

    def progress(self) -> dict[str, Any]:
        return {"drained": True, "last_t": self.last_t}

    def finish(self) -> dict[str, Any]:
        return {
            "last_t": self.last_t,
            "lost": self.lost_count,
            "close_codes": dict(self.close_codes),
            "errors": dict(self.errors),
            "connect_failures": dict(self.connect_failures),
        }


async def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
