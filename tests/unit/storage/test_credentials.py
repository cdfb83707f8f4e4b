from __future__ import annotations

import asyncio

import pytest

from sovereign.storage import CredentialExists, NotFound, Storage


async def test_add_get_list(storage: Storage) -> None:
    u = await storage.users.create("alice")
    c = await storage.credentials.add(
        u.user_id, b"\x01" * 16, b"cose", 5, ["internal", "hybrid"], "aaguid-1", now=10
    )
    assert c.sign_count == 5
    assert c.transports == ("internal", "hybrid")
    assert c.last_used_at_us is None
    assert await storage.credentials.get(b"\x01" * 16) == c
    await storage.credentials.add(u.user_id, b"\x02" * 16, b"cose2", 0, [], "", now=20)
    got = await storage.credentials.list_for_user(u.user_id)
    assert [x.credential_id for x in got] == [b"\x01" * 16, b"\x02" * 16]
    assert await storage.credentials.get(b"nope") is None


async def test_duplicate_and_unknown_user(storage: Storage) -> None:
    u = await storage.users.create("bob")
    await storage.credentials.add(u.user_id, b"c", b"k", 0, [], "")
    with pytest.raises(CredentialExists):
        await storage.credentials.add(u.user_id, b"c", b"k", 0, [], "")
    with pytest.raises(NotFound):
        await storage.credentials.add("no-such-user", b"d", b"k", 0, [], "")


async def test_sign_count_cas_refuses_regression(storage: Storage) -> None:
    u = await storage.users.create("carol")
    await storage.credentials.add(u.user_id, b"c", b"k", 10, [], "")
    creds = storage.credentials
    assert await creds.update_sign_count(b"c", 9, used_at=1) is False  # backwards
    assert await creds.update_sign_count(b"c", 10, used_at=1) is False  # equal: clone?
    assert await creds.update_sign_count(b"c", 11, used_at=2) is True
    row = await creds.get(b"c")
    assert row is not None and (row.sign_count, row.last_used_at_us) == (11, 2)
    assert await creds.update_sign_count(b"missing", 99, used_at=3) is False


async def test_sign_count_zero_means_no_counter(storage: Storage) -> None:
    # WebAuthn §6.1.1: authenticators without a counter always report 0.
    u = await storage.users.create("dan")
    await storage.credentials.add(u.user_id, b"c", b"k", 0, [], "")
    assert await storage.credentials.update_sign_count(b"c", 0, used_at=5) is True
    assert await storage.credentials.update_sign_count(b"c", 3, used_at=6) is True
    assert await storage.credentials.update_sign_count(b"c", 0, used_at=7) is False


async def test_racing_assertions_with_same_count_one_wins(storage: Storage) -> None:
    u = await storage.users.create("erin")
    await storage.credentials.add(u.user_id, b"c", b"k", 1, [], "")
    res = await asyncio.gather(
        *(storage.credentials.update_sign_count(b"c", 2, used_at=i) for i in range(20))
    )
    assert res.count(True) == 1


async def test_delete(storage: Storage) -> None:
    u = await storage.users.create("fay")
    other = await storage.users.create("gus")
    for i in range(3):
        await storage.credentials.add(u.user_id, bytes([i]), b"k", 0, [], "")
    await storage.credentials.add(other.user_id, b"o", b"k", 0, [], "")
    s = await storage.sessions.create(u.user_id, b"t" * 32, 10**18, credential_id=b"\x00")
    assert await storage.credentials.delete(b"\x02") is True
    assert await storage.credentials.delete(b"\x02") is False
    assert await storage.credentials.delete_for_user(u.user_id) == 2
    assert await storage.credentials.list_for_user(u.user_id) == []
    assert len(await storage.credentials.list_for_user(other.user_id)) == 1
    # The session outlives its credential (ON DELETE SET NULL).
    after = await storage.sessions.get(s.session_id)
    assert after is not None and after.credential_id is None
