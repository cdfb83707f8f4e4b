"""``mixed``: realistic traffic from many users at a fixed total rate.

Every user holds one connection and is in one 1:1 conversation and one group of
``--group-size`` (conversations are formed among the users of one load process). An
open loop issues ``--rate`` actions/s, each by a random user, drawn by ``--mix``
weights from: ``message`` (MESSAGE_SEND → echo), ``typing`` (TYPING → Ack),
``read`` (MESSAGE_READ up to the last seen seq → Ack), ``presence`` (online/away →
Ack), ``history`` (a backward page of 50 → HISTORY_RESPONSE), ``list``
(CONVERSATION_LIST), ``ping`` (PING → PONG) and ``reconnect`` (close, reconnect,
resume → SYNC_COMPLETE; only when the user has nothing in flight). Clients decode
every frame like a real client, ack received messages cumulatively per read burst
(MESSAGE_ACK with a request_id → Ack) and deduplicate by message id.

Correctness: after the phase drains, every member of a conversation has received every
message sent into it by someone else exactly once after deduplication (live or from
the resume backlog).
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Sequence
from typing import Any

from picows import WSFrame

from sovereign.bench import stats
from sovereign.bench.client import BINARY, BenchClient, BenchError, connect
from sovereign.bench.scenarios.base import Outcome, Phase, Spec, WorkerBase, split
from sovereign.bench.server import Account
from sovereign.codec import decode_envelope, encode_envelope
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

KINDS = ("message", "typing", "read", "presence", "history", "list", "ping", "reconnect")
DEFAULT_MIX = "message=40,typing=15,read=10,history=8,presence=5,list=2,ping=18,reconnect=2"
_TS = struct.Struct("<q")
_now = time.monotonic_ns
_RESPONSES = {
    int(T.ACK),
    int(T.MESSAGE_HISTORY_RESPONSE),
    int(T.CONVERSATION_LIST),
    int(T.PONG),
}


def parse_mix(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in KINDS:
            raise ValueError(f"unknown action {key!r} in --mix (known: {', '.join(KINDS)})")
        out[key] = float(value)
    if not out or sum(out.values()) <= 0:
        raise ValueError("--mix needs at least one positive weight")
    return out


class User:
    __slots__ = (
        "busy",
        "client",
        "convs",
        "inflight",
        "last_seq",
        "pending_ack",
        "seen",
        "sync_waiter",
        "token",
        "user_id",
        "w",
    )

    def __init__(self, w: MixedWorker, token: str, user_id: str) -> None:
        self.w = w
        self.token = token
        self.user_id = user_id
        self.client: MixedClient | None = None
        self.convs: list[tuple[str, int]] = []
        self.last_seq: dict[str, int] = {}
        self.inflight: dict[str, tuple[str, int, int]] = {}
        self.seen: set[str] = set()
        self.pending_ack = ""
        self.busy = False
        self.sync_waiter: asyncio.Future[None] | None = None

    def request(self, kind: str, msg_type: int, payload: bytes, extra: int = 0) -> None:
        c = self.client
        if c is None or c.transport is None or c.disconnected:
            return
        w = self.w
        w.rid += 1
        rid = f"{w.nonce}{w.index}.{w.rid}"
        self.inflight[rid] = (kind, _now(), extra)
        c.transport.send(BINARY, encode_envelope(msg_type, rid, payload))
        w.issued[kind] = w.issued.get(kind, 0) + 1

    def complete(self, rid: str, failed: bool = False) -> None:
        entry = self.inflight.pop(rid, None)
        if entry is None:
            return
        kind, t0, extra = entry
        w = self.w
        if failed:
            w.failed[kind] = w.failed.get(kind, 0) + 1
            return
        w.done[kind] = w.done.get(kind, 0) + 1
        stats.add_ns(w.samples.setdefault(kind, stats.new_samples()), _now() - t0)
        if kind == "message":
            w.expected += extra
        w.last_t = time.monotonic()

    def on_frame(self, client: MixedClient, frame: WSFrame) -> None:
        t, rid, payload = decode_envelope(frame.get_payload_as_memoryview())
        w = self.w
        if t == T.MESSAGE_RECEIVE:
            if rid:
                self.complete(rid)
            else:
                mr = pb.MessageReceive.FromString(bytes(payload))
                if mr.sender_id == self.user_id:
                    # Its own message, from the resume backlog (above its cursor, SPEC §5)
                    w.own += 1
                elif mr.message_id in self.seen:
                    w.duplicates += 1
                else:
                    self.seen.add(mr.message_id)
                    w.unique += 1
                    stats.add_ns(w.delivery, _now() - _TS.unpack_from(mr.encrypted_payload)[0])
                    w.last_t = time.monotonic()
                if mr.seq > self.last_seq.get(mr.conversation_id, 0):
                    self.last_seq[mr.conversation_id] = mr.seq
                self.pending_ack = mr.message_id
        elif t in _RESPONSES:
            self.complete(rid)
        elif t == T.ERROR:
            code = pb.Error.FromString(bytes(payload)).code
            w.errors[code] = w.errors.get(code, 0) + 1
            self.complete(rid, failed=True)
        elif t == T.SYNC_COMPLETE:
            if self.sync_waiter is not None and not self.sync_waiter.done():
                self.sync_waiter.set_result(None)
        elif t == T.AUTH_ERROR:
            if self.sync_waiter is not None and not self.sync_waiter.done():
                self.sync_waiter.set_exception(BenchError("AuthError on resume"))
        elif t != T.AUTH_SUCCESS:
            w.pushes[int(t)] = w.pushes.get(int(t), 0) + 1
        if frame.last_in_buffer and self.pending_ack and client is self.client and not self.busy:
            ack = pb.MessageAck(message_id=self.pending_ack).SerializeToString()
            self.pending_ack = ""
            self.request("ack", T.MESSAGE_ACK, ack)


class MixedClient(BenchClient):
    user: User

    def on_frame(self, frame: WSFrame) -> None:
        self.user.on_frame(self, frame)


class MixedWorker(WorkerBase):
    def __init__(self, index: int, common: dict[str, Any]) -> None:
        super().__init__(index, common)
        self.users: list[User] = []
        self.nonce = ""
        self.size = 200
        self.mix: dict[str, float] = {}
        self.rid = 0
        self.reconnecting: set[asyncio.Task[None]] = set()
        self.running = False
        self._reset()

    def _reset(self) -> None:
        self.issued: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.samples: dict[str, Any] = {}
        self.pushes: dict[int, int] = {}
        self.delivery = stats.new_samples()
        self.expected = self.unique = self.duplicates = self.skipped = self.own = 0

    def _client(self, user: User) -> MixedClient:
        c = MixedClient(self)
        c.user = user
        return c

    async def setup(self, step: int, data: dict[str, Any]) -> dict[str, Any]:
        self.nonce = data["nonce"]
        self.size = int(data["size"])
        self.mix = dict(data["mix"])
        self.users = [User(self, t, u) for t, u in data["accounts"]]
        clients = await self.open_many(
            [lambda u=u: self._client(u) for u in self.users],  # type: ignore[misc]
            [u.token for u in self.users],
            data["concurrency"],
        )
        for u, c in zip(self.users, clients, strict=True):
            u.client = c
        groups: list[list[User]] = [self.users[i : i + 2] for i in range(0, len(self.users), 2)]
        g = max(2, int(data["group_size"]))
        groups += [self.users[i : i + g] for i in range(0, len(self.users), g)]
        sem = asyncio.Semaphore(32)

        async def create(members: list[User]) -> None:
            if len(members) < 2:
                return
            async with sem:
                creator = members[0].client
                assert creator is not None
                created = pb.GroupCreated.FromString(
                    await creator.request(
                        T.GROUP_CREATE,
                        pb.GroupCreate(
                            title="mixed", member_ids=[m.user_id for m in members[1:]]
                        ).SerializeToString(),
                        T.GROUP_CREATED,
                    )
                )
                for m in members:
                    m.convs.append((created.conversation_id, len(members)))

        await asyncio.gather(*(create(m) for m in groups))
        await self.quiet()
        for client in self.clients:
            client.setup = False
        return {"users": len(self.users), "conversations": sum(len(g) >= 2 for g in groups)}

    def begin(self, name: str, params: dict[str, Any]) -> None:
        super().begin(name, params)
        self._reset()

    async def _reconnect(self, user: User) -> None:
        t0 = _now()
        old = user.client
        try:
            if old is not None:
                old.closing = True
                old.close()
                await old.wait_closed(5.0)
            c = await connect(lambda: self._client(user), self.url, local_addr=self.addrs.next())
            c.setup = False
            user.client = c
            user.sync_waiter = asyncio.get_running_loop().create_future()
            c.send(
                T.AUTH_REQUEST, "auth", pb.AuthRequest(session_token=user.token).SerializeToString()
            )
            async with asyncio.timeout(30.0):
                await user.sync_waiter
        except (BenchError, TimeoutError) as exc:
            self.failed["reconnect"] = self.failed.get("reconnect", 0) + 1
            self.failure(exc)
        else:
            self.done["reconnect"] = self.done.get("reconnect", 0) + 1
            stats.add_ns(self.samples.setdefault("reconnect", stats.new_samples()), _now() - t0)
        finally:
            user.sync_waiter = None
            user.busy = False

    def _act(self, user: User, kind: str, rng: random.Random) -> None:
        if kind == "reconnect":
            if user.inflight:
                self.skipped += 1
                return
            user.busy = True
            self.issued["reconnect"] = self.issued.get("reconnect", 0) + 1
            task = asyncio.get_running_loop().create_task(self._reconnect(user))
            self.reconnecting.add(task)
            task.add_done_callback(self.reconnecting.discard)
            return
        conv, size = rng.choice(user.convs) if user.convs else ("", 0)
        if kind == "message" and conv:
            body = _TS.pack(_now()) + b"\xa5" * max(0, self.size - 8)
            ms = pb.MessageSend(conversation_id=conv, encrypted_payload=body, message_type="text")
            user.request(kind, T.MESSAGE_SEND, ms.SerializeToString(), size - 1)
        elif kind == "typing" and conv:
            user.request(
                kind, T.TYPING, pb.Typing(conversation_id=conv, typing=True).SerializeToString()
            )
        elif kind == "read" and conv:
            rm = pb.ReadMarker(conversation_id=conv, up_to_seq=user.last_seq.get(conv, 0))
            user.request(kind, T.MESSAGE_READ, rm.SerializeToString())
        elif kind == "presence":
            status = rng.choice(("online", "away"))
            user.request(
                kind, T.PRESENCE_UPDATE, pb.PresenceUpdate(status=status).SerializeToString()
            )
        elif kind == "history" and conv:
            hr = pb.HistoryRequest(
                conversation_id=conv, cursor_seq=0, limit=50, direction=pb.HISTORY_BACKWARD
            )
            user.request(kind, T.MESSAGE_HISTORY_REQUEST, hr.SerializeToString())
        elif kind == "list":
            user.request(kind, T.CONVERSATION_LIST_REQUEST, b"")
        elif kind == "ping":
            user.request(
                kind, T.PING, pb.Ping(timestamp=time.time_ns() // 1000).SerializeToString()
            )
        else:
            self.skipped += 1

    async def issue(self, params: dict[str, Any], start: float, deadline: float) -> None:
        rate = float(params["rate"])
        if not self.users or rate <= 0:
            return
        rng = random.Random(self.index * 7919 + 1)
        kinds = list(self.mix)
        weights = [self.mix[k] for k in kinds]
        interval = 1.0 / rate
        issued = 0
        self.running = True
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                due = int((now - start) / interval) + 1
                picks = rng.choices(kinds, weights, k=max(0, due - issued))
                for kind in picks:
                    issued += 1
                    user = rng.choice(self.users)
                    if user.busy:
                        self.skipped += 1
                        continue
                    self._act(user, kind, rng)
                await asyncio.sleep(0.001)
            if self.reconnecting:
                await asyncio.wait(list(self.reconnecting), timeout=60.0)
        finally:
            self.running = False

    def progress(self) -> dict[str, Any]:
        inflight = sum(len(u.inflight) for u in self.users)
        busy = sum(1 for u in self.users if u.busy)
        return {
            "ops": sum(self.done.values()),
            "issued": sum(self.issued.values()),
            "unique": self.unique,
            "expected": self.expected,
            "inflight": inflight,
            "drained": not self.running
            and inflight == 0
            and busy == 0
            and self.unique >= self.expected,
            "last_t": self.last_t,
        }

    def finish(self) -> dict[str, Any]:
        out = super().finish()
        out.update(self.progress())
        out.update(
            issued_by_kind=dict(self.issued),
            done_by_kind=dict(self.done),
            failed_by_kind=dict(self.failed),
            samples_by_kind=dict(self.samples),
            pushes=dict(self.pushes),
            duplicates=self.duplicates,
            own_in_backlog=self.own,
            skipped=self.skipped,
            delivery=self.delivery,
        )
        return out


class MixedSpec(Spec):
    name = "mixed"

    def accounts(self) -> int:
        return int(self.args.users)

    def plans(self, accounts: Sequence[Account], procs: int) -> list[dict[str, Any]]:
        mix = parse_mix(self.args.mix)
        return [
            {
                "accounts": [(a.token, a.user_id) for a in share],
                "nonce": self.args.nonce,
                "size": self.args.size,
                "mix": mix,
                "group_size": self.args.group_size,
                "concurrency": self.args.connect_concurrency,
            }
            for share in split(accounts, procs)
        ]

    def next_phase(self, done: list[Outcome]) -> Phase | None:
        if done:
            return None
        rate = float(self.args.rate) / self.args.procs
        return Phase("mixed", {"rate": rate}, float(self.args.duration))

    def progress_line(self, phase: Phase, sums: dict[str, float], rates: dict[str, float]) -> str:
        rate = rates.get("ops", 0.0)
        return (
            f"ops {int(sums.get('ops', 0)):,} ({rate:,.0f}/s)  "
            f"deliveries {int(sums.get('unique', 0)):,}/{int(sums.get('expected', 0)):,}  "
            f"in flight {int(sums.get('inflight', 0)):,}"
        )

    def summarise(self, out: Outcome) -> dict[str, Any]:
        def merged(key: str) -> dict[str, int]:
            total: dict[str, int] = {}
            for r in out.results:
                for k, v in r.get(key, {}).items():
                    total[str(k)] = total.get(str(k), 0) + int(v)
            return total

        done, issued, failed = (
            merged("done_by_kind"),
            merged("issued_by_kind"),
            merged("failed_by_kind"),
        )
        ops = sum(done.values())
        by_kind: dict[str, Any] = {}
        for kind in sorted(set(issued) | set(done)):
            parts = [
                r["samples_by_kind"][kind] for r in out.results if kind in r["samples_by_kind"]
            ]
            lat = stats.summary(parts)
            by_kind[kind] = {
                "issued": issued.get(kind, 0),
                "done": done.get(kind, 0),
                "failed": failed.get(kind, 0),
                "p50_ms": lat["p50_ms"] if lat else None,
                "p99_ms": lat["p99_ms"] if lat else None,
            }
        unique, expected = out.total("unique"), out.total("expected")
        push_names = {
            (T(int(k)).name if int(k) in T._value2member_map_ else k): v
            for k, v in merged("pushes").items()
        }
        s: dict[str, Any] = {
            "users": self.accounts(),
            "connections": self.accounts(),
            "group_size": self.args.group_size,
            "target_rate": self.args.rate,
            "ops": ops,
            "ops_per_s": round(ops / out.wall_s, 1) if out.wall_s > 0 else 0.0,
            "by_kind": by_kind,
            "deliveries_unique": unique,
            "deliveries_expected": expected,
            "duplicates": out.total("duplicates"),
            "own_messages_in_resume_backlog": out.total("own_in_backlog"),
            "skipped": out.total("skipped"),
            "pushes": push_names,
            "unit": "ops",
            "count": ops,
            "latency_ms": {"delivery": stats.summary(out.samples("delivery"))},
            "headline_latency": "delivery",
        }
        s["checks"] = {
            "every message reached every other member once": unique == expected,
            "no request failed": sum(failed.values()) == 0,
        }
        return s
