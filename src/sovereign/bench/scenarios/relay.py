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
``probe@N``, ``half`` and ``fixed@N`` are open loops at a fixed total rate, timestamps
taken at the *intended* send time so a stalled generator cannot hide latency. The
probes search the **open-loop capacity**: the highest fixed rate the server sustains
with p99 send → delivery under ``CAPACITY_P99_MS``; ``half`` runs at half of it (half
of a deep-pipeline closed-loop burst is no half load at all: the server is still
saturated there).

``baseline`` (:class:`BaselineSpec`) runs the same load generator against a bare picows
echo server first (phase ``echo``: every connection keeps ``--window`` frames of the
size of a MESSAGE_SEND in flight and gets them back), then the relay phases, so the
relay is reported as a fraction of what the transport alone does on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import struct
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from os import urandom as _urandom
from typing import Any

from picows import WSFrame

from sovereign.bench import stats
from sovereign.bench.client import BINARY, BenchClient, connect
from sovereign.bench.echo import DURABLE_MARK
from sovereign.bench.scenarios.base import Outcome, Phase, Spec, WorkerBase, split
from sovereign.bench.server import Account
from sovereign.codec import decode_envelope, encode_envelope
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

_TS = struct.Struct("<q")
#: What pads an echo frame to the size of a MESSAGE_SEND (never DURABLE_MARK).
_PAD_BYTE = b"\xa5"
#: Messages in flight on one pair (or echo connection) past which an open loop skips it:
#: the server is drowning, and the phase reports the skips.
_DROWNING = 10_000
_MESSAGE_SEND = int(T.MESSAGE_SEND)
_MESSAGE_ACK = int(T.MESSAGE_ACK)
_RECEIVE = int(T.MESSAGE_RECEIVE)
_DELIVERED = int(T.MESSAGE_DELIVERED)
_ACK = int(T.ACK)
_ERROR = int(T.ERROR)
_now = time.monotonic_ns
#: A fixed rate is sustained when p99 send -> delivery stays under this (issue 12).
CAPACITY_P99_MS = 50.0
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
        rid = _urandom(16).hex() if self.w.random_ids else f"{self.rid_prefix}{self.k}"
        a.transport.send(BINARY, encode_envelope(_MESSAGE_SEND, rid, body))
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


class EchoClient(BenchClient):
    """A connection to the bare echo server: ``--window`` frames in flight, each the
    size of a relay MESSAGE_SEND, stamped with its send time in the first 8 bytes."""

    w: RelayWorker
    inflight = 0
    #: Open loop: the connection that sends when this one's frame comes back (the
    #: relay's peer acks after its delivery, which follows the send).
    peer: EchoClient | None = None

    def fire(self) -> None:
        w = self.w
        t = self.transport
        if t is None:
            return
        while self.inflight < w.window and w.issuing:
            if w.sent >= w.cap:
                w.stop_issuing()
                return
            self.stamp(_now())

    def stamp(self, t_ns: int) -> None:
        """One frame stamped with ``t_ns`` (its send time, or its intended send time in
        an open loop)."""
        t = self.transport
        assert t is not None
        t.send(BINARY, _TS.pack(t_ns) + self.w.echo_pad)
        self.inflight += 1
        self.w.sent += 1

    def on_frame(self, frame: WSFrame) -> None:
        buf = frame.get_payload_as_memoryview()
        now = _now()
        w = self.w
        t_ns = _TS.unpack_from(buf)[0]
        stats.add_ns(w.delivery, now - t_ns)
        self.inflight -= 1
        w.received += 1
        w.completed += 1
        w.last_t = now / 1e9
        if w.closed_loop:
            if w.issuing:
                self.fire()
        elif self.peer is not None:
            self.peer.stamp(t_ns)  # after the issuing ends too: every message has both


class RelayWorker(WorkerBase):
    def __init__(self, index: int, common: dict[str, Any]) -> None:
        super().__init__(index, common)
        self.pairs: list[Pair] = []
        self.size = 200
        self.window = 8
        self.nonce = ""
        self.random_ids = False
        self.closed_loop = True
        self.issuing = False
        self.cap = math.inf
        self._done = asyncio.Event()
        self.echoes: list[EchoClient] = []
        self.echo_mode = False
        self.echo_pad = b""
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
        self.random_ids = data.get("request_ids") == "uuid4"
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
        echo_url = data.get("echo_url")
        if echo_url:
            await self._open_echoes(echo_url, 2 * len(pairs), data["concurrency"], data["envelope"])
        return {"pairs": len(self.pairs)}

    async def _open_echoes(self, url: str, n: int, concurrency: int, size: int) -> None:
        """As many echo connections as relay connections, from the same addresses."""
        sem = asyncio.Semaphore(max(1, concurrency))
        self.echo_pad = _PAD_BYTE * max(1, size - _TS.size)

        def make() -> EchoClient:
            c = EchoClient(self)
            c.w = self
            c.setup = False
            return c

        async def one() -> EchoClient:
            async with sem:
                return await connect(make, url, local_addr=self.addrs.next())

        self.echoes = list(await asyncio.gather(*(one() for _ in range(n))))
        self.clients.extend(self.echoes)

    def begin(self, name: str, params: dict[str, Any]) -> None:
        super().begin(name, params)
        self._reset()
        self.closed_loop = params["rate"] is None
        self.echo_mode = bool(params.get("echo"))
        if self.echo_mode:
            # The ninth byte (after the timestamp) asks the echo server for durability.
            mark = bytes([DURABLE_MARK]) if params.get("durable") else _PAD_BYTE
            self.echo_pad = mark + self.echo_pad[1:]
        cap = params.get("cap")
        self.cap = math.inf if cap is None else int(cap)
        self._done = asyncio.Event()

    def stop_issuing(self) -> None:
        self.issuing = False
        self._done.set()

    async def issue(self, params: dict[str, Any], start: float, deadline: float) -> None:
        self.issuing = True
        try:
            if self.echo_mode and not self.closed_loop:
                await self._echo_open_loop(float(params["rate"]), start, deadline)
            elif self.echo_mode:
                for c in self.echoes:
                    c.fire()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), max(0.0, deadline - time.monotonic()))
            elif self.closed_loop:
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
        n = len(pairs)

        def issue(k: int, t_intended: int) -> bool:
            pair = pairs[k % n]
            if pair.sent - pair.completed >= _DROWNING:
                return False
            pair.send(t_intended)
            return True

        await self._paced(rate, start, deadline, issue)

    async def _echo_open_loop(self, rate: float, start: float, deadline: float) -> None:
        """The relay's frames at ``rate`` msgs/s against the bare echo server: each
        message is a frame on a sender's connection and, once that one is back, a frame
        on its peer's (the relay's send, then the peer's ack after the delivery), so the
        server wakes for each as it would for the relay. Both carry the intended send
        time: the peer's latency is the whole chain's."""
        echoes = self.echoes
        n = len(echoes) // 2
        if not n or rate <= 0:
            return
        for k in range(n):
            echoes[2 * k].peer = echoes[2 * k + 1]

        def issue(k: int, t_intended: int) -> bool:
            a = echoes[2 * (k % n)]
            if a.inflight >= _DROWNING:
                return False
            a.stamp(t_intended)
            return True

        await self._paced(rate, start, deadline, issue)

    async def _paced(
        self, rate: float, start: float, deadline: float, issue: Callable[[int, int], bool]
    ) -> None:
        """``issue(k, t_intended)`` for messages k = 0, 1, ... at ``rate`` a second from
        ``start`` until ``deadline`` or the cap, each with its intended send time (so a
        stalled generator cannot hide latency); ``issue`` returns False when it skipped
        the message because its target is drowning."""
        interval_ns = 1e9 / rate
        start_ns = int(start * 1e9)
        issued = 0
        while self.issuing:
            now = _now()
            if now >= deadline * 1e9:
                break
            due = int((now - start_ns) / interval_ns) + 1
            while issued < due and self.sent < self.cap:
                if not issue(issued, start_ns + int(issued * interval_ns)):
                    self.skipped += 1
                issued += 1
            if self.sent >= self.cap:
                break
            await asyncio.sleep(0.001)

    def progress(self) -> dict[str, Any]:
        if self.echo_mode:
            inflight = sum(c.inflight for c in self.echoes)
        else:
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

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self._done: list[Outcome] = []
        self._plan: Generator[Phase, None, None] | None = None
        #: The open-loop capacity found by the probes (msgs/s), None if not searched.
        self.capacity: float | None = None

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
                "request_ids": self.args.request_ids,
                "concurrency": self.args.connect_concurrency,
                **self.extra_plan(),
            }
            for share in split(pairs, procs)
        ]

    def extra_plan(self) -> dict[str, Any]:
        return {}

    def _cap(self) -> int | None:
        m = self.args.messages
        return None if m is None else math.ceil(m / self.args.procs)

    def _open(self, name: str, total: float, duration: float) -> Phase:
        return Phase(
            name,
            {"rate": total / self.args.procs, "cap": self._cap(), "total": total},
            duration,
        )

    def next_phase(self, done: list[Outcome]) -> Phase | None:
        self._done = done
        if self._plan is None:
            self._plan = self.phases()
        return next(self._plan, None)

    def phases(self) -> Generator[Phase, None, None]:
        """The phases in order; each ``yield`` returns after that phase ran (its
        outcome is ``self._done[-1]``)."""
        rate = str(self.args.rate)
        d = float(self.args.duration)
        if rate in ("max", "half"):
            yield Phase("full", {"rate": None, "cap": self._cap()}, d)
            full = float(self._done[-1].summary.get("messages_per_s") or 0.0)
            if rate == "half" and full > 0:
                capacity = yield from self.search_capacity(full)
                if capacity > 0:
                    yield self._open("half", capacity / 2, d)
        else:
            for total in _rates(rate):
                yield self._open(f"fixed@{total:g}", total, d)
        for total in _rates(self.args.fixed or ""):
            yield self._open(f"fixed@{total:g}", total, d)

    def search_capacity(self, full: float) -> Generator[Phase, None, float]:
        """Open-loop probes for the highest rate with p99 delivery < CAPACITY_P99_MS:
        up by 1.5x from a third of the closed-loop rate while it holds, then bisect
        (geometrically) between the best rate that held and the lowest that did not,
        until they are within 10% or ``--probes`` phases ran."""
        best, worst = 0.0, math.inf
        rate = max(50.0, full / 3)
        for _ in range(int(self.args.probes)):
            yield self._open(f"probe@{rate:.0f}", rate, float(self.args.probe_duration))
            if sustained(self._done[-1]):
                best = rate
            else:
                worst = rate
            if worst == math.inf:
                rate *= 1.5
            elif best == 0.0:
                rate = worst / 2
                if rate < 50:
                    break
            elif worst / best <= 1.1:
                break
            else:
                rate = math.sqrt(best * worst)
        self.capacity = best
        return best

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
            "request_ids": self.args.request_ids,
            "sent": sent,
            "echoed": echoed,
            "received": received,
            "completed": completed,
            "acks_sent": out.total("acks_sent"),
            "acks_answered": out.total("acks"),
            "skipped": out.total("skipped"),
            "messages_per_s": round(per_s, 1),
            "open_loop_capacity": self.capacity if out.phase.name == "half" else None,
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


def _rates(text: str) -> list[float]:
    return [float(r) for r in text.split(",") if r.strip()]


def sustained(out: Outcome) -> bool:
    """The open loop kept up: everything drained, nothing skipped, p99 < the bound."""
    s = out.summary
    p99 = (s.get("latency_ms", {}).get("delivery") or {}).get("p99_ms")
    return (
        out.complete
        and not s.get("skipped")
        and s.get("received") == s.get("sent")
        and p99 is not None
        and p99 < CAPACITY_P99_MS
    )


class BaselineSpec(RelaySpec):
    """``baseline``: a bare picows echo server (``sovereign.bench.echo``) under the same
    load generator, then the relay phases, in one run. ``args.echo_url`` and
    ``args.echo_pid`` are set by the tool once it has spawned the echo server."""

    name = "baseline"

    def extra_plan(self) -> dict[str, Any]:
        envelope = len(message_send_parts("0" * 26, self.args.size)[0]) + self.args.size + 10
        return {"echo_url": self.args.echo_url, "envelope": envelope}

    def phases(self) -> Generator[Phase, None, None]:
        d = float(self.args.duration)
        phase = Phase("echo", {"rate": None, "echo": True, "cap": self._cap()}, d)
        phase.pid = int(self.args.echo_pid)
        yield phase
        # The floor at everyday load: the relay's frames at each fixed rate against the
        # bare transport, so a fixed@N phase has the same wake-ups to compare with.
        # ``durable@N``: the same, each frame echoed once fdatasync'd in batches shaped
        # like the relay's (sovereign.bench.echo.DurableLog): the design's floor. At
        # every fixed rate the relay will run (--rate numbers and --fixed).
        rate = str(self.args.rate)
        fixed = [] if rate in ("max", "half") else _rates(rate)
        fixed += [r for r in _rates(self.args.fixed or "") if r not in fixed]
        for total in fixed:
            for name, durable in (("echo", False), ("durable", True)):
                phase = self._open(f"{name}@{total:g}", total, d)
                phase.params.update(echo=True, durable=durable)
                phase.pid = int(self.args.echo_pid)
                yield phase
        yield from super().phases()

    def summarise(self, out: Outcome) -> dict[str, Any]:
        if not out.phase.params.get("echo"):
            return super().summarise(out)
        sent, received = out.total("sent"), out.total("received")
        closed = out.phase.params["rate"] is None
        # Closed loop: every frame is a message (the transport's rate). Open loop: a
        # message is the relay's pair of frames in (send, ack), each echoed.
        count = received if closed else received // 2
        per_s = count / out.wall_s if out.wall_s > 0 else 0.0
        return {
            "connections": 2 * self.args.pairs,
            "mode": "closed loop" if closed else "open loop, 2 frames per message",
            "window": self.args.window if closed else None,
            "target_rate": out.phase.params.get("total"),
            "server": "bare picows echo"
            + (", each frame after an fdatasync" if out.phase.params.get("durable") else ""),
            "sent": sent,
            "received": received,
            "skipped": out.total("skipped"),
            "messages_per_s": round(per_s, 1),
            "unit": "msgs",
            "count": count,
            "latency_ms": {"echo": stats.summary(out.samples("delivery"))},
            "headline_latency": "echo",
            "checks": {"every frame echoed": sent == received},
        }
