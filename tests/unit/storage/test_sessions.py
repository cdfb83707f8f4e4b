from __future__ import annotations

import pytest

from sovereign.storage import AlreadyExists, NotFound, Storage

DAY = 86_400_000_000


async def test_create_and_lookup(storage: Storage) -> None:
    u = await storage.users.create("alice")
    s = await storage.sessions.create(
        u.user_id, b"h1" * 16, expires_at_us=30 * DAY, user_agent="ua/1", now=DAY
    )
    assert s.user_id == u.user_id
    assert len(s.session_id) >= 22 and len(s.device_id) >= 22
    assert s.session_id != s.device_id
    assert (s.created_at_us, s.last_seen_at_us, s.expires_at_us) == (DAY, DAY, 30 * DAY)
    assert s.revoked_at_us is None and s.credential_id is None
    assert s.active(DAY) and not s.expired(DAY) and not s.revoked
    assert await storage.sessions.get(s.session_id) == s
    assert await storage.sessions.get_by_token_hash(b"h1" * 16) == s
    assert await storage.sessions.get_by_token_hash(b"x" * 32) is None
    s2 = await storage.sessions.create(u.user_id, b"h2" * 16, 30 * DAY)
    assert s2.device_id != s.device_id  # every session is a new device (SPEC §4)


async def test_create_errors(storage: Storage) -> None:
    u = await storage.users.create("bob")
    await storage.sessions.create(u.user_id, b"h" * 32, DAY)
    with pytest.raises(AlreadyExists):
        await storage.sessions.create(u.user_id, b"h" * 32, DAY)
    with pytest.raises(NotFound):
        await storage.sessions.create("nobody", b"g" * 32, DAY)
    with pytest.raises(NotFound):
        await storage.sessions.create(u.user_id, b"g" * 32, DAY, credential_id=b"nope")


async def test_user_agent_is_truncated(storage: Storage) -> None:
    u = await storage.users.create("carol")
    s = await storage.sessions.create(u.user_id, b"h" * 32, DAY, user_agent="x" * 5000)
    assert len(s.user_agent) == 512


async def test_extend_and_touch(storage: Storage) -> None:
    u = await storage.users.create("dan")
    s = await storage.sessions.create(u.user_id, b"h" * 32, 10 * DAY, now=DAY)
    ext = await storage.sessions.extend(s.session_id, 40 * DAY, now=2 * DAY)
    assert ext is not None and (ext.expires_at_us, ext.last_seen_at_us) == (40 * DAY, 2 * DAY)
    assert await storage.sessions.get(s.session_id) == ext
    assert await storage.sessions.touch(s.session_id, now=3 * DAY) is True
    got = await storage.sessions.get(s.session_id)
    assert got is not None and got.last_seen_at_us == 3 * DAY
    # An expired session is never revived.
    assert await storage.sessions.extend(s.session_id, 90 * DAY, now=41 * DAY) is None
    assert await storage.sessions.extend("missing", 90 * DAY, now=DAY) is None


async def test_revoke(storage: Storage) -> None:
    u = await storage.users.create("erin")
    s = await storage.sessions.create(u.user_id, b"h" * 32, 10 * DAY)
    assert await storage.sessions.revoke(s.session_id, now=5) is True
    assert await storage.sessions.revoke(s.session_id, now=6) is False  # already revoked
    got = await storage.sessions.get(s.session_id)
    assert got is not None and got.revoked_at_us == 5 and got.revoked and not got.active(0)
    assert await storage.sessions.extend(s.session_id, 20 * DAY, now=1) is None
    assert await storage.sessions.touch(s.session_id, now=1) is False
    assert await storage.sessions.revoke("missing", now=1) is False


async def test_revoke_all_for_user(storage: Storage) -> None:
    u = await storage.users.create("fay")
    other = await storage.users.create("gus")
    mine = [await storage.sessions.create(u.user_id, bytes([i]) * 32, DAY) for i in range(3)]
    theirs = await storage.sessions.create(other.user_id, b"o" * 32, DAY)
    await storage.sessions.revoke(mine[0].session_id, now=1)
    revoked = await storage.sessions.revoke_all_for_user(u.user_id, now=2)
    assert revoked == sorted(s.session_id for s in mine[1:])
    assert await storage.sessions.revoke_all_for_user(u.user_id, now=3) == []
    t = await storage.sessions.get(theirs.session_id)
    assert t is not None and t.revoked_at_us is None
    first = await storage.sessions.get(mine[0].session_id)
    assert first is not None and first.revoked_at_us == 1  # first revocation kept


async def test_list_and_count(storage: Storage) -> None:
    a = await storage.users.create("hal")
    b = await storage.users.create("ivy")
    sa = [
        await storage.sessions.create(a.user_id, bytes([i]) * 32, 10 * DAY, now=i)
        for i in range(1, 4)
    ]
    sb = await storage.sessions.create(b.user_id, b"b" * 32, DAY, now=10)
    everything = await storage.sessions.list()
    assert [s.session_id for s in everything] == [sb.session_id] + [
        s.session_id for s in reversed(sa)
    ]  # newest first
    assert [s.session_id for s in await storage.sessions.list(a.user_id, offset=1, limit=1)] == [
        sa[1].session_id
    ]
    await storage.sessions.revoke(sa[0].session_id, now=20)
    active = await storage.sessions.list(a.user_id, active_at_us=5 * DAY)
    assert {s.session_id for s in active} == {sa[1].session_id, sa[2].session_id}
    assert await storage.sessions.count() == 4
    assert await storage.sessions.count(a.user_id) == 3
    assert await storage.sessions.count(active_at_us=5 * DAY) == 2  # b's expired by then


def test_session_ids_never_start_with_a_dash() -> None:
    """An operator passes them to `sovereign session revoke`, where argparse takes
    "-..." for an option (1 token_urlsafe id in 64 starts with one)."""
    from sovereign.storage.sessions import new_session_id

    ids = [new_session_id() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids) and all(len(i) == 22 for i in ids)
