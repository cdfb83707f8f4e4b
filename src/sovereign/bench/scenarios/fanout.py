"""``fanout``: one sender into a group whose every member is connected.

One phase per group size (``--groups 100,1000``). User 0 sends MESSAGE_SEND into the
group at full speed; every other member's connection receives MESSAGE_RECEIVE. Members
only count frames (the type is the Envelope's second byte); one member in
``--probe-every`` decodes the payload's timestamp for the send → delivery latency.

Flow control: the sender keeps at most ``--window`` messages uncommitted, and at most
``--window`` messages ahead of the members that live in its own process (a proxy for
all members, as every process gets an equal share and they share the load CPU). That
keeps the server's per-connection send buffers bounded instead of measuring how fast
it can fill kernel buffers. With ``--ack`` members also ack (cumulatively, per read
burst), which makes the server write cursors and send MESSAGE_DELIVERED to the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from picows import WSFrame

from sovereign.bench import stats
from sovereign.bench.client import BINARY, BenchClient
from sovereign.bench.scenarios.base import Outcome, Phase, Spec, WorkerBase
from sovereign.bench.scenarios.relay import message_send_parts, payload_pad
from sovereign.bench.server import Account
from sovereign.codec import decode_envelope, encode_envelope
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

_TS = struct.Struct("<q")
_RECEIVE = int(T.MESSAGE_RECEIVE)
_DELIVERED = int(T.MESSAGE_DELIVERED)
_ERROR = int(T.ERROR)
_MESSAGE_SEND = int(T.MESSAGE_SEND)
_MESSAGE_ACK = int(T.MESSAGE_ACK)
_now = time.monotonic_ns
_monotonic = time.monotonic
_parse_receive: Callable[[Any], pb.MessageReceive] = pb.MessageReceive.FromString


class Member(BenchClient):
    w: FanoutWorker
    probe = False
    pending_ack = ""

    def on_frame(self, frame: WSFrame) -> None:
        buf = frame.get_payload_as_memoryview()
        if buf[1] != _RECEIVE:
            if buf[1] == _ERROR:
                self.w.error(buf)
            return
        w = self.w
        w.received += 1
        w.last_t = _monotonic()
        if self.probe or w.ack:
            mr = _parse_receive(decode_envelope(buf)[2])
            if self.probe:
                stats.add_ns(w.latency, _now() - _TS.unpack_from(mr.encrypted_payload)[0])
            if w.ack:
                self.pending_ack = mr.message_id
                if frame.last_in_buffer:
                    ack = pb.MessageAck(message_id=self.pending_ack).SerializeToString()
                    self.send(_MESSAGE_ACK, "", ack)
        if w.blocked:
            w.wake()


class FanSender(BenchClient):
    w: FanoutWorker

    def on_frame(self, frame: WSFrame) -> None:
        buf = frame.get_payload_as_memoryview()
        t = buf[1]
        if t == _RECEIVE:
            self.w.on_echo()
        elif t == _DELIVERED:
            self.w.delivered_reports += 1
        elif t == _ERROR:
            self.w.error(buf)


class FanoutWorker(WorkerBase):
    def __init__(self, index: int, common: dict[str, Any]) -> None:
        super().__init__(index, common)
        self.users: list[tuple[int, str]] = []
        self.members: list[tuple[int, Member]] = []
        self.sender: FanSender | None = None
        self.groups: dict[int, str] = {}
        self.size = 200
        self.window = 32
        self.ack = False
        self.nonce = ""
        self.issuing = False
        self.blocked = False
        self.local_members = 0
        self.cap = math.inf
        self.head = self.tail = self.pad = b""
        self.k = 0
        self.wait_echo: deque[int] = deque()
        self._done = asyncio.Event()
        self._reset()

    def _reset(self) -> None:
        self.sent = self.echoed = self.received = self.delivered_reports = 0
        self.latency = stats.new_samples()
        self.commit = stats.new_samples()

    def error(self, buf: memoryview) -> None:
        code = pb.Error.FromString(bytes(decode_envelope(buf)[2])).code
        self.errors[code] = self.errors.get(code, 0) + 1

    async def setup(self, step: int, data: dict[str, Any]) -> dict[str, Any]:
        if step == 0:
            self.size = int(data["size"])
            self.window = int(data["window"])
            self.ack = bool(data["ack"])
            self.nonce = data["nonce"]
            self.users = [(int(i), t) for i, t in data["users"]]
            probe_every = max(1, int(data["probe_every"]))

            def factory_for(i: int) -> Any:
                if i == 0:
                    s = FanSender(self)
                    s.w = self
                    return s
                m = Member(self)
                m.w = self
                m.probe = i % probe_every == 1 % probe_every
                return m

            clients = await self.open_many(
                [partial(factory_for, i) for i, _ in self.users],
                [t for _, t in self.users],
                data["concurrency"],
            )
            for (i, _t), c in zip(self.users, clients, strict=True):
                if isinstance(c, FanSender):
                    self.sender = c
                else:
                    assert isinstance(c, Member)
                    self.members.append((i, c))
            return {"connected": len(clients)}
        if step == 1:
            if self.sender is not None:
                for size in data["groups"]:
                    created = pb.GroupCreated.FromString(
                        await self.sender.request(
                            T.GROUP_CREATE,
                            pb.GroupCreate(
                                title=f"fanout-{size}", member_ids=data["member_ids"][1:size]
                            ).SerializeToString(),
                            T.GROUP_CREATED,
                            timeout=120.0,
                        )
                    )
                    self.groups[size] = created.conversation_id
            return {"groups": {str(k): v for k, v in self.groups.items()}}
        await self.quiet(0.5, 120.0)
        for c in self.clients:
            c.setup = False
        return {}

    def begin(self, name: str, params: dict[str, Any]) -> None:
        super().begin(name, params)
        self._reset()
        size = int(params["group"])
        self.local_members = sum(1 for i, _ in self.members if 0 < i < size)
        cap = params.get("cap")
        self.cap = math.inf if cap is None else int(cap)
        self.head, self.tail = message_send_parts(params["conv"], self.size)
        self.pad = payload_pad(self.size)
        self.blocked = False
        self._done = asyncio.Event()

    # -- the sender --------------------------------------------------------------------
    def _can_send(self) -> bool:
        if self.sent - self.echoed >= self.window:
            return False
        if self.local_members:
            return self.sent - self.received / self.local_members < self.window
        return True

    def pump(self) -> None:
        s = self.sender
        if s is None or s.transport is None:
            return
        while self.issuing and self._can_send():
            if self.sent >= self.cap:
                self.issuing = False
                self._done.set()
                return
            t_ns = _now()
            self.k += 1
            body = self.head + _TS.pack(t_ns) + self.pad + self.tail
            s.transport.send(BINARY, encode_envelope(_MESSAGE_SEND, f"{self.nonce}f{self.k}", body))
            self.wait_echo.append(t_ns)
            self.sent += 1
        self.blocked = self.issuing

    def wake(self) -> None:
        self.blocked = False
        self.pump()

    def on_echo(self) -> None:
        if self.wait_echo:
            stats.add_ns(self.commit, _now() - self.wait_echo.popleft())
        self.echoed += 1
        if self.issuing:
            self.pump()

    async def issue(self, params: dict[str, Any], start: float, deadline: float) -> None:
        if self.sender is None:
            return
        self.issuing = True
        try:
            self.pump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), max(0.0, deadline - time.monotonic()))
        finally:
            self.issuing = False
            self.blocked = False

    def progress(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "echoed": self.echoed,
            "received": self.received,
            "drained": self.sent == self.echoed,
            "last_t": self.last_t,
        }

    def finish(self) -> dict[str, Any]:
        out = super().finish()
        out.update(self.progress())
        out.update(
            delivered_reports=self.delivered_reports, latency=self.latency, commit=self.commit
        )
        return out


class FanoutSpec(Spec):
    name = "fanout"

    def _sizes(self) -> list[int]:
        return [int(s) for s in self.args.groups]

    def accounts(self) -> int:
        return max(self._sizes())

    def plans(self, accounts: Sequence[Account], procs: int) -> list[dict[str, Any]]:
        self.user_ids = [a.user_id for a in accounts]
        users = [(i, a.token) for i, a in enumerate(accounts)]
        return [
            {
                "users": users[w::procs],
                "size": self.args.size,
                "window": self.args.window,
                "ack": self.args.ack,
                "nonce": self.args.nonce,
                "probe_every": self.args.probe_every,
                "concurrency": self.args.connect_concurrency,
            }
            for w in range(procs)
        ]

    def steps(self) -> int:
        return 3

    def step_data(self, step: int, infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if step == 1:
            return [{"groups": self._sizes(), "member_ids": self.user_ids} for _ in infos]
        self.convs = {int(k): v for i in infos for k, v in i.get("groups", {}).items()}
        return [{} for _ in infos]

    def next_phase(self, done: list[Outcome]) -> Phase | None:
        sizes = self._sizes()
        if len(done) >= len(sizes):
            return None
        size = sizes[len(done)]
        cap = self.args.messages
        return Phase(
            f"{size} members",
            {"group": size, "conv": self.convs[size], "cap": cap},
            float(self.args.duration),
        )

    def complete(self, phase: Phase, progress: list[dict[str, Any]]) -> bool:
        sent = sum(p.get("sent", 0) for p in progress)
        received = sum(p.get("received", 0) for p in progress)
        echoed = sum(p.get("echoed", 0) for p in progress)
        return bool(echoed == sent and received >= sent * (int(phase.params["group"]) - 1))

    def progress_line(self, phase: Phase, sums: dict[str, float], rates: dict[str, float]) -> str:
        rate = rates.get("received", 0.0)
        return (
            f"sent {int(sums.get('sent', 0)):,}  committed {int(sums.get('echoed', 0)):,}  "
            f"deliveries {int(sums.get('received', 0)):,} ({rate:,.0f}/s)"
        )

    def summarise(self, out: Outcome) -> dict[str, Any]:
        size = int(out.phase.params["group"])
        sent, echoed, received = out.total("sent"), out.total("echoed"), out.total("received")
        expected = sent * (size - 1)
        per_s = received / out.wall_s if out.wall_s > 0 else 0.0
        s: dict[str, Any] = {
            "group_members": size,
            "connections": self.accounts(),
            "window": self.args.window,
            "members_ack": self.args.ack,
            "payload_bytes": self.args.size,
            "messages_sent": sent,
            "messages_committed": echoed,
            "deliveries": received,
            "deliveries_expected": expected,
            "delivered_reports": out.total("delivered_reports"),
            "messages_per_s": round(sent / out.wall_s, 1) if out.wall_s > 0 else 0.0,
            "deliveries_per_s": round(per_s, 1),
            "unit": "deliveries",
            "count": received,
            "latency_ms": {
                "delivery": stats.summary(out.samples("latency")),
                "commit": stats.summary(out.samples("commit")),
            },
            "headline_latency": "delivery",
        }
        s["checks"] = {
            "every send committed": sent == echoed,
            "every member got every message": received == expected,
        }
        return s
