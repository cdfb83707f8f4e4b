"""Bytes per entry of the per-message in-memory structures, measured with tracemalloc.

``python -m benchmarks.memory_entries`` (from the repository root) fills each structure
with ``--entries`` synthetic messages shaped like the soak's (``make soak``): a few
hundred users, request ids as the soak client and real clients (UUIDv4) send them,
ULID event ids from the server's own generator — and reports the heap growth per
entry and the structure's ceiling at its cap.

- ``idempotency (before)``: what ``DeliveryService`` held until the bounded tiers, a
  ``dict`` of (user_id, request_id) -> (ts_us, event_id), capped at 500,000;
- ``idempotency recent tier``: :class:`~sovereign.services.idempotency.SendRequests`'s
  ``recent`` (key -> event id), capped at ``RECENT_MAX``;
- ``idempotency filters``: its Bloom filters, a fixed size whatever the entries;
- ``conversation recent window``: each conversation's last ``RECENT_EVENTS`` events
  (for MESSAGE_DELIVERED), bounded per conversation, so by busy conversations;
- ``event index``: :meth:`~sovereign.services.state.ConversationState.index_put`'s
  ``OrderedDict`` (event id -> ``EventInfo``), before and after its cap changed.

Strings are counted with the structure that holds them (an upper bound: in the server
an event id may be shared with a conversation's recent window while it is in it).
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable

from sovereign.services import idempotency as idem
from sovereign.services import state as state_mod
from sovereign.services.eventlog import RECENT_EVENTS, EventInfo
from sovereign.services.ids import new_ulid

USERS = 200
CONVS = 100
T0_US = 1_780_000_000_000_000


def _measure(fill: Callable[[], object]) -> tuple[int, object]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = fill()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, kept


def _inputs(n: int, uuids: bool) -> list[tuple[str, str, str, int, str]]:
    users = [new_ulid() for _ in range(USERS)]
    convs = [new_ulid() for _ in range(CONVS)]
    out = []
    for i in range(n):
        rid = str(uuid.uuid4()) if uuids else f"m{i}"
        ts = T0_US + i * 5000
        out.append((users[i % USERS], rid, new_ulid(ts // 1000), ts, convs[i % CONVS]))
    return out


def run(n: int, uuids: bool) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}

    def report(name: str, nbytes: int, entries: int, cap: int | None) -> None:
        per = nbytes / entries
        row = {"entries": entries, "bytes": nbytes, "bytes_per_entry": round(per, 1)}
        if cap is not None:
            row["cap"] = cap
            row["ceiling_mb"] = round(per * cap / 1e6, 1)
        results[name] = row

    # The inputs are built before measuring; each structure gets fresh strings (copies)
    # so that it is charged for the strings it keeps alive.
    rows = _inputs(n, uuids)

    def old_idempotency() -> object:
        d: dict[tuple[str, str], tuple[int, str]] = {}
        for user, rid, eid, ts, _conv in rows:
            d[(user, "".join(rid))] = (ts + 0, "".join(eid))
        return d

    nbytes, kept = _measure(old_idempotency)
    report("idempotency (before): dict key -> (ts, event id)", nbytes, n, 500_000)
    del kept

    m = min(n, idem.RECENT_MAX)

    def recent_tier() -> object:
        s = idem.SendRequests(filter_bits=8)
        for user, rid, eid, _ts, _conv in rows[:m]:
            s.committed((user, "".join(rid)), "".join(eid))
        return s

    nbytes, kept = _measure(recent_tier)
    report("idempotency recent tier: key -> event id", nbytes, m, idem.RECENT_MAX)
    del kept

    def filters() -> object:
        s = idem.SendRequests()
        for user, rid, _eid, ts, _conv in rows:
            s.add((user, rid), ts)
        return s

    nbytes, kept = _measure(filters)
    results["idempotency filters (fixed)"] = {
        "entries": n,
        "bytes": nbytes,
        "bytes_per_entry": round(nbytes / n, 1),
        "ceiling_mb": round(
            idem.FILTER_BITS / 8 * (idem.IDEMPOTENCY_US // idem.PERIOD_US + 1) / 1e6, 1
        ),
    }
    del kept

    seqs = list(range(1000, 1000 + n))

    def event_index() -> object:
        idx: OrderedDict[str, EventInfo] = OrderedDict()
        for (user, _rid, eid, _ts, conv), seq in zip(rows, seqs, strict=True):
            event_id = "".join(eid)
            idx[event_id] = EventInfo(conv, seq + 0, event_id, 1, user)
        return idx

    nbytes, kept = _measure(event_index)
    report("event index: event id -> (conv, seq, type, sender)", nbytes, n, 200_000)
    results["event index: event id -> (conv, seq, type, sender)"]["ceiling_now_mb"] = round(
        nbytes / n * state_mod.EVENT_INDEX_MAX / 1e6, 1
    )
    results["event index: event id -> (conv, seq, type, sender)"]["cap_now"] = (
        state_mod.EVENT_INDEX_MAX
    )
    del kept

    def conv_recent() -> object:
        # eventlog.Conv.recent: the EventInfo of a conversation's newest RECENT_EVENTS
        # committed events, per conversation that had traffic (in the server the event
        # index shares these records while they are in both).
        windows = [deque(maxlen=RECENT_EVENTS) for _ in range(CONVS)]
        for i, ((user, _rid, eid, _ts, conv), seq) in enumerate(zip(rows, seqs, strict=True)):
            windows[i % CONVS].append(EventInfo(conv, seq + 0, "".join(eid), 1, user))
        return windows

    nbytes, kept = _measure(conv_recent)
    full = min(n, CONVS * RECENT_EVENTS)
    results["conversation recent window (per conversation)"] = {
        "entries": full,
        "bytes": nbytes,
        "bytes_per_entry": round(nbytes / full, 1),
        "cap_per_conversation": RECENT_EVENTS,
        "mb_per_busy_conversation": round(nbytes / full * RECENT_EVENTS / 1e6, 3),
    }
    del kept
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--uuid", action="store_true", help="UUIDv4 request ids (default: m<N>)")
    args = ap.parse_args()
    res = run(args.entries, args.uuid)
    for name, row in res.items():
        print(f"{name:58s} {json.dumps(row)}")


if __name__ == "__main__":
    main()
