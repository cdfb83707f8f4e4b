"""Idempotency keys in bounded memory (services/idempotency.py; SPEC §5: a retry within
24 h returns the original MESSAGE_RECEIVE and stores nothing).

The structure alone first (eviction, the filters' periods, watching a key), then the
delivery service over real SQLite with tiers small enough to overflow: a retry after
its key left memory still gets the original from storage in one read, a new send reads
nothing, and a retry racing its own uncommitted original is never a second message.
"""

from __future__ import annotations

import asyncio
import functools
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sovereign.errors import ErrorCode
from sovereign.protocol.types import MessageType as T
from sovereign.services import delivery as delivery_mod
from sovereign.services import idempotency as idempotency_mod
from sovereign.services import ids
from sovereign.services.eventlog import Op
from sovereign.services.idempotency import (
    FILTER_BITS,
    IDEMPOTENCY_US,
    PERIOD_US,
    SendRequests,
    ulid_ms,
)
from sovereign.services.session import Session
from sovereign.storage import messaging as sql
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.gate import Gate
from tests.helpers.services import Harness, HarnessWith, World, build_world

HOUR_US = 3600 * 1_000_000
T0 = 1_900_000_000_000_000  # a period boundary is not special: see the tests that cross one


def key(i: int, user: str = "u1") -> tuple[str, str]:
    return (user, f"rid-{i}")


_n = iter(range(1, 1 << 30))


def ulid_at(ms: int) -> str:
    """A ULID of millisecond ``ms`` (not ids.new_ulid: it is monotonic per process)."""
    return ids.encode((ms << 80) | next(_n))


# -- the structure ----------------------------------------------------------------------


def test_recent_tier_keeps_the_newest_keys_and_lets_the_oldest_go() -> None:
    r = SendRequests(recent_max=3)
    eids = [ulid_at(T0 // 1000 + i) for i in range(5)]
    for i, eid in enumerate(eids):
        r.begin(key(i), Op(), T0 + i)
        assert key(i) in r.pending
        r.committed(key(i), eid)
        assert key(i) not in r.pending
    assert list(r.recent) == [key(2), key(3), key(4)]
    assert [r.known(key(i), T0 + 10) for i in range(5)] == [None, None, *eids[2:]]
    # Let go of from memory, never from the filter: every key still needs a storage check.
    assert all(r.maybe_stored(key(i)) for i in range(5))


def row_gen(r: SendRequests, k: tuple[str, str], ts_us: int) -> int:
    """A send stored with its own send_requests row: the generation of that row."""
    r.begin(k, Op(), ts_us)
    return r.next_gen()


def test_keys_go_to_generations_of_gen_keys_and_a_restart_starts_a_new_one() -> None:
    r = SendRequests(gen_keys=3)
    assert [row_gen(r, key(i), T0 + i) for i in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    loaded = SendRequests(gen_keys=3)
    loaded.load_page([(4, "u1", "a", T0), (2, "u2", "b", T0)])
    loaded.load_page([(1, "u1", "c", T0)])  # a later page of lower generations
    assert [row_gen(loaded, key(i), T0) for i in range(4)] == [5, 5, 5, 6]
    assert all(loaded.maybe_stored(k) for k in [("u1", "a"), ("u2", "b"), ("u1", "c")])
    with pytest.raises(ValueError):
        SendRequests(gen_keys=0)


def test_with_many_keys_in_the_window_generations_grow_and_shrink_again() -> None:
    r = SendRequests(gen_keys=2, max_gens=3, period_us=PERIOD_US, window_us=IDEMPOTENCY_US)
    r.load_page([(0, "u0", f"old{i}", T0) for i in range(12)])  # 12 keys: 4 per generation
    assert r.gen == 1
    gens = [row_gen(r, key(i), T0 + i) for i in range(10)]
    # 16 keys counted when generation 2 starts: 5 each; 21 when generation 3 does: 7.
    assert gens == [1] * 4 + [2] * 5 + [3]
    # A day later the keys counted then have left the window: 2 per generation again
    # once generation 3 is full.
    later = T0 + IDEMPOTENCY_US + 2 * PERIOD_US
    r.purge(later)
    gens = [row_gen(r, key(100 + i), later + i) for i in range(10)]
    assert gens == [3] * 6 + [4, 4, 5, 5]


def test_folds_come_every_gen_keys_and_fill_a_generation_to_its_size() -> None:
    r = SendRequests(gen_keys=2, max_gens=3)
    r.fold = True
    r.load_page([(0, "u0", f"old{i}", T0) for i in range(12)])
    assert r.gen == 1

    def commit(i: int) -> bool:
        r.begin(key(i), Op(), T0 + i)
        return r.committed(key(i), ulid_at(T0 // 1000 + i))

    assert [commit(0), commit(1)] == [False, True]
    assert r.start_fold() == 1 and set(r.folding or ()) == {key(0), key(1)}
    assert r.unfolded_event(key(0), T0) is not None  # found while its fold is in flight
    assert [commit(2), commit(3)] == [False, False]  # one fold at a time
    r.fold_done(2)
    # 16 keys counted in the window: 16 // 3 = 5 per generation; 2 folded so far.
    assert r.gen == 1 and r.folding is None
    assert r.unfolded_event(key(0), T0) is None and r.unfolded_event(key(3), T0) is not None
    assert commit(4)
    assert r.start_fold() == 1
    r.fold_done(3)
    assert r.gen == 2  # 5 keys folded into generation 1: the next starts
    assert commit(5) is False and commit(6) is True
    r.start_fold()
    r.fold_done(None)  # failed: its keys are back, with those committed meanwhile
    assert set(r.unfolded) == {key(5), key(6)} and r.gen == 2
    assert r.unfolded_event(key(5), T0 + IDEMPOTENCY_US + 10_000_000) is None  # too old


def test_a_pending_key_is_never_evicted_and_a_failed_commit_forgets_it() -> None:
    r = SendRequests(recent_max=1)
    op = Op()
    r.begin(key(0), op, T0)
    for i in range(1, 10):  # many commits while key(0) waits: it stays pending
        r.begin(key(i), Op(), T0 + i)
        r.committed(key(i), ulid_at(T0 // 1000))
    assert r.pending == {key(0): op}
    r.undo(key(0))
    assert r.pending == {} and r.known(key(0), T0) is None


def test_filter_has_no_false_negatives_and_few_false_positives() -> None:
    r = SendRequests()
    rng = random.Random(7)
    used = [("u" + str(rng.randrange(300)), f"{rng.getrandbits(64):x}") for _ in range(50_000)]
    for i, k in enumerate(used):
        r.add(k, T0 + i)
    assert all(r.maybe_stored(k) for k in used)
    fresh = [("u" + str(rng.randrange(300)), f"new-{i}") for i in range(50_000)]
    false_positives = sum(r.maybe_stored(k) for k in fresh)
    # 50,000 keys in 2^24 bits with 3 probes: ~7e-7 expected; allow a handful.
    assert false_positives <= 5
    assert r.filter_bytes == FILTER_BITS // 8  # one period so far


def test_a_key_is_kept_for_the_whole_window_across_period_boundaries_then_forgotten() -> None:
    r = SendRequests(filter_bits=1 << 16)
    start = (T0 // PERIOD_US + 1) * PERIOD_US - 1  # the last microsecond of a period
    r.add(key(1), start)
    r.add(key(2), start + 1)  # the first of the next period
    for now in (start, start + PERIOD_US, start + IDEMPOTENCY_US):
        r.purge(now)
        assert r.maybe_stored(key(1)) and r.maybe_stored(key(2)), now
    r.purge(start + IDEMPOTENCY_US + 1)  # key(1) is now past the window
    assert not r.maybe_stored(key(1))
    assert r.maybe_stored(key(2))
    r.purge(start + IDEMPOTENCY_US + PERIOD_US + 2)
    assert not r.maybe_stored(key(2))
    assert r.filter_bytes == 0  # nothing older than the window is held


def test_begin_and_add_fill_the_right_filter_after_every_filter_was_purged() -> None:
    # add() and begin() keep the newest period's array at hand: it must follow the
    # filters as they are created and purged (never a bit set in a dropped array).
    r = SendRequests(filter_bits=1 << 16)
    r.begin(key(1), Op(), T0)
    r.purge(T0 + 3 * IDEMPOTENCY_US)
    assert r.filter_bytes == 0 and not r.maybe_stored(key(1))
    later = (T0 // PERIOD_US + 7) * PERIOD_US  # the first microsecond of a period
    r.begin(key(2), Op(), later)
    r.add(key(3), later + PERIOD_US)  # a newer period: the newest array changes
    r.begin(key(4), Op(), later + PERIOD_US + 1)
    assert all(r.maybe_stored(key(i)) for i in (2, 3, 4))
    r.purge(later + PERIOD_US + IDEMPOTENCY_US)  # drops key(2)'s period only
    assert not r.maybe_stored(key(2))
    assert r.maybe_stored(key(3)) and r.maybe_stored(key(4))
    r.begin(key(5), Op(), later + PERIOD_US + 2)
    assert r.maybe_stored(key(5)) and r.filter_bytes == (1 << 16) // 8


def test_at_most_three_filters_whatever_the_traffic() -> None:
    r = SendRequests(filter_bits=1 << 10)
    for hour in range(24 * 7):
        now = T0 + hour * HOUR_US
        for i in range(20):
            r.add(key(hour * 100 + i), now)
        r.purge(now)
        assert len(r._periods) <= IDEMPOTENCY_US // PERIOD_US + 1
    assert r.filter_bytes <= 3 * (1 << 10) // 8


def test_a_clock_stepped_back_past_the_oldest_filter_uses_the_oldest() -> None:
    r = SendRequests(filter_bits=1 << 16)
    r.add(key(1), T0)
    r.add(key(2), T0 - 10 * IDEMPOTENCY_US)  # NTP stepped far back
    assert r.filter_bytes == (1 << 16) // 8  # no filter for a period long gone
    assert r.maybe_stored(key(2))
    r.purge(T0)
    assert r.maybe_stored(key(2))  # kept as long as the oldest filter is


def test_recent_keys_past_the_window_are_not_known_and_are_purged() -> None:
    r = SendRequests()
    old = ulid_at(T0 // 1000)
    r.committed(key(1), old)
    assert r.known(key(1), T0 + IDEMPOTENCY_US) == old
    assert r.known(key(1), T0 + IDEMPOTENCY_US + 2000) is None  # before any purge
    r.committed(key(2), ulid_at((T0 + IDEMPOTENCY_US) // 1000))
    r.purge(T0 + IDEMPOTENCY_US + 2000)
    assert list(r.recent) == [key(2)]


def test_watch_reports_a_commit_during_a_storage_read_even_once_evicted() -> None:
    r = SendRequests(recent_max=0)  # evicted as soon as committed
    eid = ulid_at(T0 // 1000)
    r.watch(key(1))
    r.watch(key(1))  # two retries reading at once
    r.committed(key(9), ulid_at(T0 // 1000))  # not watched: not recorded
    r.committed(key(1), eid)
    assert r.recent == {}
    assert r.unwatch(key(1)) == eid
    assert r.unwatch(key(1)) == eid
    assert r._watching == {} and r._committed == {}
    r.watch(key(1))
    assert r.unwatch(key(1)) is None  # nothing committed during this one
    assert r.storage_checks == 3


def test_ulid_time_is_read_back() -> None:
    for ms in (0, 1, 1_733_000_000_123, (1 << 48) - 1):
        assert ulid_ms(ids.encode((ms << 80) | 12345)) == ms


def test_bad_sizes_are_refused() -> None:
    for kwargs in ({"filter_bits": 1000}, {"filter_bits": 4}, {"recent_max": -1}):
        with pytest.raises(ValueError):
            SendRequests(**kwargs)  # type: ignore[arg-type]


# -- the delivery service over real storage -----------------------------------------------


def send_req(conv_id: str, payload: bytes = b"ciphertext") -> pb.MessageSend:
    return pb.MessageSend(conversation_id=conv_id, encrypted_payload=payload)


async def send_rid(h: Harness, s: Session, conv_id: str, rid: str) -> Any:
    """MESSAGE_SEND with a request_id; the echo (everything ``s`` got so far taken)."""
    h.request(s, T.MESSAGE_SEND, send_req(conv_id), rid)
    await h.settle()
    [echo] = [f for f in h.outbox.take(s) if f.request_id == rid]
    assert echo.type == T.MESSAGE_RECEIVE, echo
    return echo.msg


def small(h: Harness, **sizes: Any) -> SendRequests:
    """Idempotency tiers small enough for a test to overflow (set before any send)."""
    r = h.delivery.requests = SendRequests(**sizes)
    return r


def saturate(h: Harness) -> SendRequests:
    """Every bit of the current period's filter set: every key is "maybe stored", so
    every send with a request_id goes through the storage read."""
    r = h.delivery.requests
    r.add(("nobody", "nothing"), h.clock.now_us())
    for bits in r._periods.values():
        bits[:] = b"\xff" * len(bits)
    return r


async def test_retry_after_its_key_left_memory_gets_the_original_from_storage(
    h: Harness, world: World
) -> None:
    w = world
    r = small(h, recent_max=2)
    first = await send_rid(h, w.a1, w.conv, "first")
    for i in range(5):
        await send_rid(h, w.a1, w.conv, f"later-{i}")
    assert (w.alice.user_id, "first") not in r.recent  # evicted
    assert r.storage_checks == 0  # new sends read nothing
    h.outbox.take(w.b1)
    h.request(w.a1, T.MESSAGE_SEND, send_req(w.conv, b"retry"), "first")
    await h.settle()
    [again] = h.outbox.take(w.a1)
    assert (again.type, again.request_id, again.msg) == (T.MESSAGE_RECEIVE, "first", first)
    assert r.storage_checks == 1  # one indexed read
    assert h.outbox.take(w.b1) == []  # nothing stored, nothing fanned out
    assert await h.stored_seqs(w.conv) == [1, 2, 3, 4, 5, 6, 7, 8]


async def test_a_filter_false_positive_costs_one_read_and_sends_a_new_message(
    h: Harness, world: World
) -> None:
    w = world
    r = saturate(h)
    checks = r.storage_checks
    echo = await send_rid(h, w.a1, w.conv, "never-used")
    assert r.storage_checks == checks + 1
    assert echo.seq == 3 and echo.encrypted_payload == b"ciphertext"


async def test_retry_racing_its_uncommitted_original_on_the_storage_path(
    h: Harness, world: World, gate: Gate
) -> None:
    w = world
    small(h, recent_max=0)
    saturate(h)  # every key goes through storage
    held = await hold_writer(h, gate)
    # The original and its retry both read storage (nothing there); the first to come
    # back (either: two reader threads) queues the send, the other finds it pending
    # and joins it.
    h.request(w.a1, T.MESSAGE_SEND, send_req(w.conv, b"one"), "race")
    h.request(w.a1, T.MESSAGE_SEND, send_req(w.conv, b"two"), "race")
    for _ in range(2000):  # both reads are done once no request task is left
        if h.tasks.pending == 0:
            break
        await asyncio.sleep(0.005)
    assert list(h.delivery.requests.pending) == [(w.alice.user_id, "race")]
    assert h.delivery.requests.storage_checks == 2
    gate.release()
    await held
    await h.settle()
    first, second = h.outbox.take(w.a1)
    assert first.request_id == second.request_id == "race" and first.msg == second.msg
    assert first.msg.seq == 3 and first.msg.encrypted_payload in (b"one", b"two")
    assert [f.msg.seq for f in h.outbox.take(w.b1)] == [3]
    assert await h.stored_seqs(w.conv) == [1, 2, 3]


async def test_original_committed_and_evicted_during_the_retrys_read_is_still_found(
    h: Harness, world: World
) -> None:
    """The read of retry R runs before its original O commits, O commits and leaves
    memory, then R comes back: not in storage as R saw it, not pending, not recent —
    only ``watch`` knows. Without it R would store a second message."""
    w = world
    r = small(h, recent_max=0)
    saturate(h)
    real = h.db.read
    r_read_done = asyncio.Event()
    go_on = asyncio.Event()
    calls = 0

    async def read(fn: Any) -> Any:
        nonlocal calls
        mine = (
            isinstance(fn, functools.partial)
            and fn.func is sql.send_request_event_txn
            and fn.keywords["request_id"] == "twice"
        )
        if mine:
            calls += 1
        result = await real(fn)
        if mine and calls == 1:  # R: its read is over, its answer held back
            r_read_done.set()
            await go_on.wait()
        return result

    h.db.read = read  # type: ignore[method-assign]
    h.request(w.a1, T.MESSAGE_SEND, send_req(w.conv, b"R"), "twice")
    await asyncio.wait_for(r_read_done.wait(), 10)
    h.request(w.a1, T.MESSAGE_SEND, send_req(w.conv, b"O"), "twice")
    got: list[Any] = []
    for _ in range(400):  # O reads (nothing), sends, commits, is evicted
        got += h.outbox.take(w.b1)
        if got:
            break
        await asyncio.sleep(0.005)
    [pushed] = got
    assert r.recent == {} and r.pending == {}
    go_on.set()
    await h.settle()
    first, second = h.outbox.take(w.a1)
    assert first.msg == second.msg == pushed.msg
    assert first.msg.encrypted_payload == b"O"
    assert h.outbox.take(w.b1) == []
    assert await h.stored_seqs(w.conv) == [1, 2, 3]


async def test_retry_whose_original_retention_removed_is_an_error_not_a_duplicate(
    h: Harness, world: World
) -> None:
    w = world
    small(h, recent_max=0)
    await send_rid(h, w.a1, w.conv, "gone")
    await h.db.write(
        lambda c: c.execute("DELETE FROM events WHERE conversation_id = ? AND seq = 3", (w.conv,))
    )
    h.request(w.a1, T.MESSAGE_SEND, send_req(w.conv), "gone")
    await h.settle()
    [err] = h.outbox.take(w.a1)
    assert (err.type, err.request_id, err.msg.code) == (T.ERROR, "gone", ErrorCode.INTERNAL_ERROR)
    assert await h.stored_seqs(w.conv) == [1, 2]


async def test_restart_rebuilds_the_filters_from_storage_in_pages(
    harness_with: HarnessWith, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_mod, "LOAD_PAGE", 3)
    monkeypatch.setattr(idempotency_mod, "GEN_KEYS", 3)  # the keys span generations

    def gens(conn: Any) -> list[int]:
        return [int(g) for (g,) in conn.execute("SELECT DISTINCT gen FROM send_requests")]

    def gen_ids(gen: int) -> Any:
        def read(conn: Any) -> list[str]:
            return [
                str(r)
                for (r,) in conn.execute(
                    "SELECT request_id FROM send_requests WHERE gen = ? ORDER BY request_id",
                    (gen,),
                )
            ]

        return read

    def unfolded_ids(conn: Any) -> list[str]:
        return [request_id for _, request_id, _, _ in sql.unfolded_send_requests_txn(conn)[0]]

    data = tmp_path / "restart"
    async with harness_with(data_dir=data) as h:
        w = await build_world(h)
        originals = [await send_rid(h, w.a1, w.conv, f"p{i}") for i in range(7)]
        # Full generations are folded (p0-p2, then p3-p5); p6 is only in its event row.
        assert await h.db.read(gens) == [0, 1]
        assert await h.db.read(unfolded_ids) == ["p6"]
        clock = h.clock
    async with harness_with(data_dir=data, clock=clock) as h:
        r = h.delivery.requests
        assert r.recent == {} and r.filter_bytes > 0
        assert r.gen == 2  # new keys start a generation after every stored one
        assert list(r.unfolded) == [(w.alice.user_id, "p6")]  # read back from events
        a1 = await h.connect(w.alice)
        h.request(a1, T.MESSAGE_SEND, send_req(w.conv), "brand-new")
        await h.settle()
        assert r.storage_checks == 0  # a new key: the filter says so, no read
        for i in range(len(originals)):  # every page was loaded
            h.request(a1, T.MESSAGE_SEND, send_req(w.conv, b"again"), f"p{i}")
        await h.settle()
        answers = {f.request_id: f.msg for f in h.outbox.take(a1) if f.request_id}
        assert [answers[f"p{i}"] for i in range(7)] == originals
        assert r.storage_checks == 6  # p6 was answered from memory
        assert await h.stored_seqs(w.conv) == list(range(1, 11))
        # Two more new keys fill generation 2 (p6 counts in it) and start the next:
        # the fold takes p6 from before the restart with the new ones.
        await send_rid(h, a1, w.conv, "new-2")
        await send_rid(h, a1, w.conv, "new-3")
        assert await h.db.read(gens) == [0, 1, 2]
        assert await h.db.read(gen_ids(2)) == ["brand-new", "new-2", "p6"]
        assert await h.db.read(unfolded_ids) == ["new-3"]


async def hold_writer(h: Harness, gate: Gate) -> asyncio.Future[str]:
    held = asyncio.ensure_future(h.db.write(gate.fn))
    await gate.wait_entered()
    return held


async def test_a_failed_fold_keeps_its_keys_and_the_next_fold_takes_them(
    harness_with: HarnessWith, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folds that do not commit (an error here; a crash before a fold's commit leaves
    the database the same) lose no key: they stay in memory, in their event rows after
    the unmoved mark, a restart reads them back, and the next fold copies them."""
    monkeypatch.setattr(idempotency_mod, "GEN_KEYS", 2)
    real = sql.fold_send_requests_txn
    calls: list[int] = []
    failing = [True]

    def fold(conn: Any, gen: int) -> int:
        calls.append(gen)
        if failing[0]:
            raise sqlite3.OperationalError("disk I/O error (test)")
        return real(conn, gen)

    monkeypatch.setattr(sql, "fold_send_requests_txn", fold)

    def stored(conn: Any) -> list[str]:
        rows = conn.execute("SELECT request_id FROM send_requests ORDER BY request_id")
        return [str(r) for (r,) in rows]

    data = tmp_path / "fold"
    async with harness_with(data_dir=data) as h:
        w = await build_world(h)
        r = h.delivery.requests
        first = [await send_rid(h, w.a1, w.conv, f"p{i}") for i in range(3)]
        assert calls == [0, 0]  # due at p1 and again at p2: both failed
        assert await h.db.read(stored) == []
        assert r.folding is None and {k[1] for k in r.unfolded} == {"p0", "p1", "p2"}
        h.request(w.a1, T.MESSAGE_SEND, send_req(w.conv, b"again"), "p0")
        await h.settle()
        [again] = [f.msg for f in h.outbox.take(w.a1) if f.request_id == "p0"]
        assert again == first[0] and r.storage_checks == 0  # answered from memory
        clock = h.clock
    failing[0] = False
    async with harness_with(data_dir=data, clock=clock) as h:
        r = h.delivery.requests
        assert {k[1] for k in r.unfolded} == {"p0", "p1", "p2"}  # read back from events
        assert r.gen == 0  # nothing was stored
        a1 = await h.connect(w.alice)
        await send_rid(h, a1, w.conv, "p3")  # a fold is due: it takes all four
        assert calls == [0, 0, 0]
        assert await h.db.read(stored) == ["p0", "p1", "p2", "p3"]
        assert r.unfolded == {} and r.gen == 1  # generation 0 holds its 2 keys (and more)
        h.request(a1, T.MESSAGE_SEND, send_req(w.conv, b"again"), "p1")
        await h.settle()
        [again] = [f.msg for f in h.outbox.take(a1) if f.request_id == "p1"]
        assert again == first[1] and r.storage_checks == 1  # found in send_requests
        assert await h.stored_seqs(w.conv) == list(range(1, 3 + 4))
