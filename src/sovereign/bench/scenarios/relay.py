"""``relay``: the 1:1 durable message cycle, many pairs at once.

Each pair (A, B) shares one conversation. A sends MESSAGE_SEND; the server commits it
(group commit, ``synchronous=FULL``) and answers A with the echo MESSAGE_RECEIVE, then
pushes MESSAGE_RECEIVE to B; B acks (cumulatively: the last id of each read burst, with
a request_id, so the server answers Ack); the server tells A with MESSAGE_DELIVERED.
A message counts once A got its MESSAGE_DELIVERED.

Latencies (from a CLOCK_MONOTONIC timestamp inside the encrypted payload):

- ``delivery``: send → B has the push (the headline "send-to-delivery");
- ``commit``: send → A has the echo (durable);
- ``cycle``: send → A has MESSAGE_DELIVERED.

Phases: ``full`` is a closed loop with ``--window`` messages in flight per pair;
``half`` / ``fixed`` are open loops at a fixed total rate, timestamps taken at the
*intended* send time so a stalled generator cannot hide latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from picows import WSFrame

from sovereign.bench import stats
from sovereign.bench.client import BINARY, BenchClient
from sovereign.bench.scenarios.base import Outcome, Phase, Spec, WorkerBase, split
from sovereign.bench.server import Account
from sovereign.codec import decode_envelope, encode_envelope
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

_TS = struct.Struct("<q")
_MESSAGE_SEND = int(T.MESSAGE_SEND)
_MESSAGE_ACK = int(T.MESSAGE_ACK)
_RECEIVE = int(T.MESSAGE_RECEIVE)
_DELIVERED = int(T.MESSAGE_DELIVERED)
_ACK = int(T.ACK)
_ERROR = int(T.ERROR)
_now = time.monotonic_ns
# FromString takes any buffer (upb); typed as Any so memoryviews need no copy.
_parse_receive: Callable[[Any], pb.MessageReceive] = pb.MessageReceive.FromString
_parse_delivered: Callable[[Any], pb.MessageDelivered] = pb.MessageDelivered.FromString
_parse_error: Callable[[Any], pb.Error] = pb.Error.FromString


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def message_send_parts(conversation_id: str, size: int) -> tuple[bytes, bytes]:
    """MessageSend{conversation_id, encrypted_payload (``size`` bytes), message_type
    "text"} as (bytes before the payload, bytes after it): a send is one concatenation."""
    conv = conversation_id.encode()
    head = b"\x0a" + varint(len(conv)) + conv + b"\x12" + varint(size)
    return head, b"\x1a\x04text"


def payload_pad(size: int) -> bytes:
    return b"\xa5" * max(0, size - _TS.size)


class Pair:
    __slots__ = (
        "a",
        "b",
        "completed",
        "conv",
        "head",
        "k",
        "pad",
        "pending_ack",
        "rid_prefix",
        "sent",
        "tail",
        "w",
        "wait_delivered",
        "wait_echo",
    )

    def __init__(self, w: RelayWorker, index: int) -> None:
        self.w = w
        self.a: Sender | None = None
        self.b: Receiver | None = None
        self.conv = ""
        self.head = self.tail = b""
        self.pad = payload_pad(w.size)
        self.rid_prefix = f"{w.nonce}{w.index}.{index}."
        self.k = 0
        self.sent = 0
        self.completed = 0
        self.wait_echo: deque[int] = deque()
        self.wait_delivered: deque[tuple[int, int]] = deque()
        self.pending_ack = ""

    def send(self, t_ns: int) -> None:
        a = self.a
        assert a is not None and a.transport is not None
        self.k += 1
        body = self.head + _TS.pack(t_ns) + self.pad + self.tail
        a.transport.send(BINARY, encode_envelope(_MESSAGE_SEND, f"{self.rid_prefix}{self.k}", body))
        self.sent += 1
        self.wait_echo.append(t_ns)
        self.w.sent += 1

    def on_echo(self, buf: memoryview) -> None:
        _t, rid, payload = decode_envelope(buf)
        if not rid:
            return  # another device's message: not in this scenario
        now = _now()
        t_ns = self.wait_echo.popleft()
        stats.add_ns(self.w.commit, now - t_ns)
        self.wait_delivered.append((_parse_receive(payload).seq, t_ns))
        self.w.echoed += 1

    def on_delivered(self, buf: memoryview) -> None:
        up_to = _parse_delivered(decode_envelope(buf)[2]).up_to_seq
        now = _now()
        w = self.w
        waiting = self.wait_delivered
        n = 0
        while waiting and waiting[0][0] <= up_to:
            stats.add_ns(w.cycle, now - waiting.popleft()[1])
            n += 1
        if n:
            self.completed += n
            w.completed += n
            w.last_t = now / 1e9
            if w.closed_loop and w.issuing:
                self.refill(now)

    def refill(self, now: int) -> None:
        w = self.w
        while self.sent - self.completed < w.window and w.issuing:
            if w.sent >= w.cap:
                w.stop_issuing()
                return
            self.send(now)

    def on_receive(self, buf: memoryview, last: bool) -> None:
        payload = decode_envelope(buf)[2]
        mr = _parse_receive(payload)
        now = _now()
        w = self.w
        stats.add_ns(w.delivery, now - _TS.unpack_from(mr.encrypted_payload)[0])
        w.received += 1
        self.pending_ack = mr.message_id
        if last:
            self.flush_ack()

    def flush_ack(self) -> None:
        b = self.b
        if self.pending_ack and b is not None and b.transport is not None:
            ack = pb.MessageAck(message_id=self.pending_ack).SerializeToString()
            b.transport.send(BINARY, encode_envelope(_MESSAGE_ACK, "k", ack))
            self.pending_ack = ""
            self.w.acks_sent += 1


class Sender(BenchClient):
    pair: Pair

    def on_frame(self, frame: WSFrame) -> None:
        buf = frame.get_payload_as_memoryview()
        t = buf[1]
        if t == _RECEIVE:
            self.pair.on_echo(buf)
        elif t == _DELIVERED:
            self.pair.on_delivered(buf)
        elif t == _ERROR:
            self.pair.w.error(buf)


class Receiver(BenchClient):
    pair: Pair

    def on_frame(self, frame: WSFrame) -> None:
        buf = frame.get_payload_as_memoryview()
        t = buf[1]
        if t == _RECEIVE:
            self.pair.on_receive(buf, frame.last_in_buffer)
            return
        if t == _ACK:
            self.pair.w.acks += 1
        elif t == _ERROR:
            self.pair.w.error(buf)
        if frame.last_in_buffer:
            self.pair.flush_ack()


class RelayWorker(WorkerBase):
    def __init__(self, index: int, common: dict[str, Any]) -> None:
        super().__init__(index, common)
        self.pairs: list[Pair] = []
        self.size = 200
        self.window = 8
        self.nonce = ""
        self.closed_loop = True
        self.issuing = False
        self.cap = math.inf
        self._done = asyncio.Event()
        self._reset()

    def _reset(self) -> None:
        self.sent = self.echoed = self.received = self.completed = 0
        self.acks = self.acks_sent = self.skipped = 0
        self.delivery = stats.new_samples()
        self.commit = stats.new_samples()
        self.cycle = stats.new_samples()

    def error(self, buf: memoryview) -> None:
        code = _parse_error(decode_envelope(buf)[2]).code
        self.errors[code] = self.errors.get(code, 0) + 1

    async def setup(self, step: int, data: dict[str, Any]) -> dict[str, Any]:
        self.size = int(data["size"])
        self.window = int(data["window"])
        self.nonce = data["nonce"]
        pairs = data["pairs"]
        self.pairs = [Pair(self, i) for i in range(len(pairs))]
        tokens: list[str] = []
        for a_token, b_token, _b_user in pairs:
            tokens += [a_token, b_token]
        factories = [lambda: Sender(self), lambda: Receiver(self)] * len(pairs)
        clients = await self.open_many(factories, tokens, data["concurrency"])
        for i, pair in enumerate(self.pairs):
            a, b = clients[2 * i], clients[2 * i + 1]
            assert isinstance(a, Sender) and isinstance(b, Receiver)
            a.pair = b.pair = pair
            pair.a, pair.b = a, b

        sem = asyncio.Semaphore(64)

        async def create(pair: Pair, b_user: str) -> None:
            async with sem:
                assert pair.a is not None
                created = pb.GroupCreated.FromString(
                    await pair.a.request(
                        T.GROUP_CREATE,
                        pb.GroupCreate(title="relay", member_ids=[b_user]).SerializeToString(),
                        T.GROUP_CREATED,
                    )
                )
                pair.conv = created.conversation_id
                pair.head, pair.tail = message_send_parts(pair.conv, self.size)

        await asyncio.gather(
            *(create(p, b) for p, (_a, _b, b) in zip(self.pairs, pairs, strict=True))
        )
        await self.quiet()
        for c in self.clients:
            c.setup = False
        return {"pairs": len(self.pairs)}

    def begin(self, name: str, params: dict[str, Any]) -> None:
        super().begin(name, params)
        self._reset()
        self.closed_loop = params["rate"] is None
        cap = params.get("cap")
        self.cap = math.inf if cap is None else int(cap)
        self._done = asyncio.Event()

    def stop_issuing(self) -> None:
        self.issuing = False
        self._done.set()

    async def issue(self, params: dict[str, Any], start: float, deadline: float) -> None:
        self.issuing = True
        try:
            if self.closed_loop:
                now = _now()
                for pair in self.pairs:
                    pair.refill(now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), max(0.0, deadline - time.monotonic()))
            else:
                await self._open_loop(float(params["rate"]), start, deadline)
        finally:
            self.issuing = False

    async def _open_loop(self, rate: float, start: float, deadline: float) -> None:
        """Send at ``rate`` msgs/s (this worker's share), round-robin over the pairs,
        stamping each message with its intended send time."""
        pairs = self.pairs
        if not pairs or rate <= 0:
            return
        interval_ns = 1e9 / rate
        start_ns = int(start * 1e9)
        i = 0
        issued = 0
        limit = 10_000  # in flight per pair before we skip it (the server is drowning)
        n = len(pairs)
        while self.issuing:
            now = _now()
            if now >= deadline * 1e9:
                break
            due = int((now - start_ns) / interval_ns) + 1
            while issued < due and self.sent < self.cap:
                pair = pairs[i % n]
                i += 1
                t_intended = start_ns + int(issued * interval_ns)
                issued += 1
                if pair.sent - pair.completed >= limit:
                    self.skipped += 1
                    continue
                pair.send(t_intended)
            if self.sent >= self.cap:
                break
            await asyncio.sleep(0.001)

    def progress(self) -> dict[str, Any]:
        inflight = sum(p.sent - p.completed for p in self.pairs)
        return {
            "sent": self.sent,
            "echoed": self.echoed,
            "received": self.received,
            "completed": self.completed,
            "inflight": inflight,
            "drained": inflight == 0 and self.received >= self.sent,
            "last_t": self.last_t,
        }

    def finish(self) -> dict[str, Any]:
        out = super().finish()
        out.update(self.progress())
        out.update(
            acks=self.acks,
            acks_sent=self.acks_sent,
            skipped=self.skipped,
            delivery=self.delivery,
            commit=self.commit,
            cycle=self.cycle,
        )
        return out


class RelaySpec(Spec):
    name = "relay"

    def accounts(self) -> int:
        return 2 * int(self.args.pairs)

    def plans(self, accounts: Sequence[Account], procs: int) -> list[dict[str, Any]]:
        pairs = [
            (accounts[2 * i].token, accounts[2 * i + 1].token, accounts[2 * i + 1].user_id)
            for i in range(int(self.args.pairs))
        ]
        return [
            {
                "pairs": share,
                "size": self.args.size,
                "window": self.args.window,
                "nonce": self.args.nonce,
                "concurrency": self.args.connect_concurrency,
            }
            for share in split(pairs, procs)
        ]

    def _cap(self) -> int | None:
        m = self.args.messages
        return None if m is None else math.ceil(m / self.args.procs)

    def next_phase(self, done: list[Outcome]) -> Phase | None:
        rate = str(self.args.rate)
        d = float(self.args.duration)
        if rate == "max":
            return Phase("full", {"rate": None, "cap": self._cap()}, d) if not done else None
        if rate == "half":
            if not done:
                return Phase("full", {"rate": None, "cap": self._cap()}, d)
            if len(done) == 1:
                full = done[0].summary.get("messages_per_s") or 0.0
                if full <= 0:
                    return None
                half = full / 2
                return Phase(
                    "half", {"rate": half / self.args.procs, "cap": self._cap(), "total": half}, d
                )
            return None
        if done:
            return None
        total = float(rate)
        return Phase(
            "fixed", {"rate": total / self.args.procs, "cap": self._cap(), "total": total}, d
        )

    def complete(self, phase: Phase, progress: list[dict[str, Any]]) -> bool:
        return all(p.get("drained") for p in progress)

    def progress_line(self, phase: Phase, sums: dict[str, float], rates: dict[str, float]) -> str:
        rate = rates.get("completed", 0.0)
        return (
            f"sent {int(sums.get('sent', 0)):,}  delivered {int(sums.get('received', 0)):,}  "
            f"cycles done {int(sums.get('completed', 0)):,} ({rate:,.0f}/s)  "
            f"in flight {int(sums.get('inflight', 0)):,}"
        )

    def summarise(self, out: Outcome) -> dict[str, Any]:
        sent, echoed = out.total("sent"), out.total("echoed")
        received, completed = out.total("received"), out.total("completed")
        per_s = completed / out.wall_s if out.wall_s > 0 else 0.0
        s: dict[str, Any] = {
            "pairs": self.args.pairs,
            "connections": 2 * self.args.pairs,
            "mode": "closed loop" if out.phase.params["rate"] is None else "open loop",
            "window": self.args.window if out.phase.params["rate"] is None else None,
            "target_rate": out.phase.params.get("total"),
            "payload_bytes": self.args.size,
            "sent": sent,
            "echoed": echoed,
            "received": received,
            "completed": completed,
            "acks_sent": out.total("acks_sent"),
            "acks_answered": out.total("acks"),
            "skipped": out.total("skipped"),
            "messages_per_s": round(per_s, 1),
            "unit": "msgs",
            "count": completed,
            "latency_ms": {
                "delivery": stats.summary(out.samples("delivery")),
                "commit": stats.summary(out.samples("commit")),
                "cycle": stats.summary(out.samples("cycle")),
            },
            "headline_latency": "delivery",
        }
        s["checks"] = {
            "every send echoed": sent == echoed,
            "every message delivered to the peer": received == sent,
            "every message reported delivered": completed == sent,
        }
        return s
