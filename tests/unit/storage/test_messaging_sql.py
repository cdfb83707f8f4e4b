"""The messaging store's upserts: delivery state only moves forward, repeats are no-ops."""

from __future__ import annotations

from collections.abc import Callable

from sovereign.storage import Conn, Database
from sovereign.storage import messaging as m


def _conv(conn: Conn, conv: str = "c1") -> None:
    m.insert_conversation_txn(conn, m.ConversationRecord(conv, "t", "u1", 1))


async def test_cursors_delivery_and_read_markers_never_move_back(db: Database) -> None:
    def save(seq: int, at: int) -> Callable[[Conn], None]:
        def fn(conn: Conn) -> None:
            m.save_delivery_state_txn(
                conn,
                positions=[("c1", "u1", "d1", seq), ("c1", "u1", m.DELIVERED, seq)],
                dropped_cursors=[],
                welcome_acks=[("d1", "w1")],
                read_markers=[("c1", "u1", seq, at)],
            )

        return fn

    await db.write(_conv)
    await db.write(save(5, 100))
    await db.write(save(3, 200))  # older positions: kept at 5; the marker's time moves
    await db.write(save(3, 200))  # and again: the welcome ack is already there

    def state(conn: Conn) -> tuple[object, ...]:
        return (
            m.load_cursors_txn(conn, "d1"),
            m.load_delivery_txn(conn, "c1", "u1"),
            tuple(conn.execute("SELECT up_to_seq, updated_at_us FROM read_markers").fetchone()),
            [tuple(r) for r in conn.execute("SELECT device_id, event_id FROM welcome_acks")],
        )

    assert await db.read(state) == ({"c1": 5}, 5, (5, 200), [("d1", "w1")])
    await db.write(save(7, 300))
    assert (await db.read(state))[:3] == ({"c1": 7}, 7, (7, 300))
    # a cursor moved alone leaves the delivered position where it was, and back
    await db.write(
        lambda c: m.save_delivery_state_txn(
            c, [("c1", "u1", "d1", 9), ("c1", "u2", m.DELIVERED, 8)], [], [], []
        )
    )
    assert (await db.read(state))[:2] == ({"c1": 9}, 7)
    assert await db.read(lambda c: m.load_delivery_txn(c, "c1", "u2")) == 8
    # a dropped cursor goes; the delivered position stays
    await db.write(lambda c: m.save_delivery_state_txn(c, [], [("d1", "c1")], [], []))
    assert (await db.read(state))[:2] == ({}, 7)


async def test_device_cursors_start_once(db: Database) -> None:
    await db.write(_conv)
    await db.write(lambda c: m.start_device_cursors_txn(c, "d1", "u1", [("c1", 4)]))
    await db.write(lambda c: m.start_device_cursors_txn(c, "d1", "u1", [("c1", 9)]))  # no-op
    assert await db.read(lambda c: m.load_cursors_txn(c, "d1")) == {"c1": 4}


async def test_purge_only_raises_purged_seq(db: Database) -> None:
    await db.write(_conv)
    rows = [("c1", seq, f"E{seq:02d}", 1, "u1", seq, b"x", None) for seq in range(1, 6)]
    await db.write(lambda c: m.insert_events_txn(c, rows))
    assert await db.write(lambda c: m.purge_events_txn(c, "E04")) == {"c1": 3}
    assert await db.write(lambda c: m.purge_events_txn(c, "E02")) == {}  # nothing left below

    def purged_seq(conn: Conn) -> int:
        return int(conn.execute("SELECT purged_seq FROM conversations").fetchone()[0])

    assert await db.read(purged_seq) == 3
    # Retention never lowers it, e.g. below a position set by an earlier, wider purge.
    await db.write(lambda c: c.execute("UPDATE conversations SET purged_seq = 20"))
    await db.write(lambda c: m.insert_events_txn(c, [("c1", 12, "E00", 1, "u1", 12, b"x", None)]))
    assert await db.write(lambda c: m.purge_events_txn(c, "E01")) == {"c1": 12}
    assert await db.read(purged_seq) == 20


# -- idempotency keys (migration 0008: generations on SQLite) -----------------------------


async def test_a_stored_key_is_found_in_any_generation_within_the_window(db: Database) -> None:
    await db.write(_conv)
    await db.write(
        lambda c: m.insert_events_txn(
            c, [("c1", s, f"E{s}", 1, "u1", 1000 + s, b"p%d" % s, None) for s in (1, 2, 3)]
        )
    )
    rows = [(g, "u1", f"r{g}", f"E{g + 1}", 1000 + g) for g in range(3)]
    rows.append((2, "u1", "gone", "E9", 1005))  # its event removed by retention
    await db.write(lambda c: m.insert_send_requests_txn(c, rows))

    def find(rid: str, since: int = 0) -> Callable[[Conn], object]:
        return lambda c: m.send_request_event_txn(c, "u1", rid, since)

    assert [await db.read(find(f"r{g}")) for g in range(3)] == [
        ("E1", b"p1"),
        ("E2", b"p2"),
        ("E3", b"p3"),
    ]
    assert await db.read(find("gone")) == ("E9", None)
    assert await db.read(find("r9")) is None  # never stored
    assert await db.read(find("r0", since=1001)) is None  # stored before the window
    assert await db.read(lambda c: m.send_request_event_txn(c, "u2", "r0", 0)) is None


async def test_a_key_stored_again_after_the_window_answers_with_the_newer_row(
    db: Database,
) -> None:
    await db.write(lambda c: m.insert_send_requests_txn(c, [(0, "u1", "k", "E-old", 100)]))
    await db.write(lambda c: m.insert_send_requests_txn(c, [(7, "u1", "k", "E-new", 9000)]))
    for since in (0, 5000):
        got = await db.read(lambda c, s=since: m.send_request_event_txn(c, "u1", "k", s))
        assert got == ("E-new", None)
    # again in the same generation: the row is replaced, not doubled
    await db.write(lambda c: m.insert_send_requests_txn(c, [(7, "u1", "k", "E-3", 9500)]))
    assert await db.read(lambda c: m.send_request_event_txn(c, "u1", "k", 0)) == ("E-3", None)


async def test_keys_page_in_primary_key_order_once_each_and_skip_expired_rows(
    db: Database,
) -> None:
    rows = [(i % 4, f"u{i % 3}", f"r{i}", f"e{i}", 1000 + i) for i in range(14)]
    await db.write(lambda c: m.insert_send_requests_txn(c, rows))
    got: list[tuple[int, str, str, int]] = []
    after = None
    while True:
        page = await db.read(
            lambda c, a=after: m.send_request_keys_txn(c, since_us=1002, after=a, limit=4)
        )
        got.extend(page)
        if len(page) < 4:
            break
        after = page[-1][:3]
    want = [(g, u, r, t) for g, u, r, _e, t in rows if t >= 1002]
    # SQLite's primary key leads with the generation; PostgreSQL's is (user, request).
    order = (lambda k: k[:3]) if db.engine_name == "sqlite" else (lambda k: k[1:3])
    assert got == sorted(want, key=order)


async def test_purge_deletes_the_keys_stored_before_the_cutoff_and_no_other(
    db: Database,
) -> None:
    # Generations in time order (as the server stores them): 0 and 1 wholly old, 2
    # straddles the cutoff, 3 new.
    rows = [
        (0, "u1", "a", "E1", 100),
        (0, "u2", "b", "E2", 110),
        (1, "u1", "c", "E3", 200),
        (2, "u1", "d", "E4", 300),
        (2, "u2", "e", "E5", 400),
        (2, "u3", "f", "E6", 500),
        (3, "u1", "g", "E7", 600),
    ]
    await db.write(lambda c: m.insert_send_requests_txn(c, rows))

    def left(conn: Conn) -> list[str]:
        return sorted(str(r[0]) for r in conn.execute("SELECT request_id FROM send_requests"))

    assert await db.write(lambda c: m.purge_send_requests_txn(c, 400)) == 4
    assert await db.read(left) == ["e", "f", "g"]
    assert await db.write(lambda c: m.purge_send_requests_txn(c, 400)) == 0
    assert await db.write(lambda c: m.purge_send_requests_txn(c, 10_000)) == 3
    assert await db.read(left) == []
    assert await db.write(lambda c: m.purge_send_requests_txn(c, 10_000)) == 0


# -- keys in event rows, folded a generation at a time (migration 0009) --------------------


def _send(seq: int, event_id: str, rid: str | None, user: str = "u1") -> m.EventRow:
    return ("c1", seq, event_id, 1, user, 1000 + seq, b"p%d" % seq, rid)


def _stored(conn: Conn) -> list[tuple[object, ...]]:
    return sorted(
        tuple(r)
        for r in conn.execute(
            "SELECT gen, user_id, request_id, event_id, created_at_us FROM send_requests"
        )
    )


async def test_a_fold_copies_the_keys_after_its_mark_once(db: Database) -> None:
    await db.write(_conv)
    await db.write(
        lambda c: m.insert_events_txn(
            c, [_send(1, "E1", "a"), _send(2, "E2", None), _send(3, "E3", "b", "u2")]
        )
    )
    assert await db.read(m.unfolded_send_requests_txn) == (
        [("u1", "a", "E1", 1001), ("u2", "b", "E3", 1003)],
        "E3",
    )
    assert await db.write(lambda c: m.fold_send_requests_txn(c, 4)) == 2
    assert await db.read(_stored) == [(4, "u1", "a", "E1", 1001), (4, "u2", "b", "E3", 1003)]
    assert await db.read(m.unfolded_send_requests_txn) == ([], "E3")
    assert await db.write(lambda c: m.fold_send_requests_txn(c, 5)) == 0  # nothing new
    # Events after the mark (a newer one without a key still moves it).
    await db.write(lambda c: m.insert_events_txn(c, [_send(4, "E4", "c"), _send(5, "E5", None)]))
    assert await db.read(m.unfolded_send_requests_txn) == ([("u1", "c", "E4", 1004)], "E5")
    assert await db.write(lambda c: m.fold_send_requests_txn(c, 5)) == 1
    assert (await db.read(_stored))[-1] == (5, "u1", "c", "E4", 1004)
    assert await db.read(m.unfolded_send_requests_txn) == ([], "E5")
    # Folded keys are found as every stored key is.
    assert await db.read(lambda c: m.send_request_event_txn(c, "u2", "b", 0)) == ("E3", b"p3")


async def test_a_key_used_twice_before_its_fold_keeps_the_newer_event(db: Database) -> None:
    if db.engine_name != "sqlite":
        return  # PostgreSQL does not fold (one upsert may not meet a key twice there)
    await db.write(_conv)
    await db.write(lambda c: m.insert_events_txn(c, [_send(1, "E1", "k"), _send(2, "E2", "k")]))
    assert await db.write(lambda c: m.fold_send_requests_txn(c, 0)) == 2  # two upserts
    assert await db.read(_stored) == [(0, "u1", "k", "E2", 1002)]
