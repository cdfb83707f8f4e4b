from __future__ import annotations

import asyncio

import pytest

from sovereign.storage import NotFound, Storage, UsernameTaken
from sovereign.storage.users import create_user_txn, username_key


async def test_create_and_get(storage: Storage) -> None:
    u = await storage.users.create("Alice", "Alice A.", is_admin=True, now=123)
    assert len(u.user_id) == 26  # ULID
    assert (u.username, u.display_name, u.is_admin, u.enabled, u.created_at_us) == (
        "Alice",
        "Alice A.",
        True,
        True,
        123,
    )
    assert await storage.users.get_by_id(u.user_id) == u
    assert await storage.users.get_by_username("alice") == u
    assert await storage.users.get_by_username("ALICE") == u
    assert await storage.users.get_by_id("nope") is None
    assert await storage.users.get_by_username("bob") is None


async def test_get_many_returns_the_users_that_exist(storage: Storage) -> None:
    # More ids than one statement's chunk (500): every chunk is read.
    users = [await storage.users.create(f"u{i:03d}", now=i) for i in range(3)]
    ids = [users[0].user_id, *(f"nope{i}" for i in range(600)), users[2].user_id]
    found = await storage.users.get_many(ids)
    assert found == {users[0].user_id: users[0], users[2].user_id: users[2]}
    assert await storage.users.get_many([]) == {}


@pytest.mark.parametrize("other", ["alice", "ALICE", "aLiCe", "ａｌｉｃｅ"])  # noqa: RUF001
async def test_username_unique_case_insensitively(storage: Storage, other: str) -> None:
    await storage.users.create("Alice")
    with pytest.raises(UsernameTaken):
        await storage.users.create(other)
    assert await storage.users.count() == 1


async def test_concurrent_same_username_exactly_one_wins(storage: Storage) -> None:
    res = await asyncio.gather(
        *(storage.users.create(n) for n in ["bob", "Bob", "BOB", "bOb"] * 5),
        return_exceptions=True,
    )
    assert sum(1 for r in res if not isinstance(r, BaseException)) == 1
    assert all(isinstance(r, UsernameTaken) for r in res if isinstance(r, BaseException))


def test_username_key() -> None:
    assert username_key("Straße") == username_key("STRASSE")
    assert username_key("Ｂｏｂ") == "bob"  # noqa: RUF001


async def test_list_search_count(storage: Storage) -> None:
    for name, disp in [("carol", "Carol C"), ("alice", "Wonder"), ("bob", "Builder"), ("a_b", "")]:
        await storage.users.create(name, disp)
    assert [u.username for u in await storage.users.list()] == ["a_b", "alice", "bob", "carol"]
    assert [u.username for u in await storage.users.list(offset=1, limit=2)] == ["alice", "bob"]
    assert [u.username for u in await storage.users.list("AL")] == ["alice"]
    assert [u.username for u in await storage.users.list("build")] == ["bob"]
    # LIKE wildcards in the search term are literal.
    assert [u.username for u in await storage.users.list("_")] == ["a_b"]
    assert [u.username for u in await storage.users.list("%")] == []
    assert await storage.users.count() == 4
    assert await storage.users.count("o") == 3  # bob, carol, and alice via "Wonder"
    assert await storage.users.list(limit=0) == []


async def test_updates(storage: Storage) -> None:
    u = await storage.users.create("dave", "Dave")
    assert (await storage.users.set_enabled(u.user_id, False)).enabled is False
    assert (await storage.users.set_admin(u.user_id, True)).is_admin is True
    assert (await storage.users.set_display_name(u.user_id, "D")).display_name == "D"
    both = await storage.users.update(u.user_id, enabled=True, display_name="Dave 2")
    assert (both.enabled, both.display_name, both.is_admin) == (True, "Dave 2", True)
    assert await storage.users.update(u.user_id) == both
    with pytest.raises(NotFound):
        await storage.users.set_enabled("missing", True)
    with pytest.raises(NotFound):
        await storage.users.update("missing")


async def test_any_admin(storage: Storage) -> None:
    assert await storage.users.any_admin() is False
    u = await storage.users.create("eve")
    assert await storage.users.any_admin() is False
    await storage.users.set_admin(u.user_id, True)
    assert await storage.users.any_admin() is True
    assert await storage.users.count_admins() == 1
    await storage.users.set_enabled(u.user_id, False)  # a disabled admin cannot sign in
    assert await storage.users.any_admin() is False


async def test_delete_cascades(storage: Storage) -> None:
    u = await storage.users.create("frank")
    await storage.credentials.add(u.user_id, b"cred", b"pk", 0, ["usb"], "")
    s = await storage.sessions.create(u.user_id, b"h" * 32, 10**18)
    assert await storage.users.delete(u.user_id) is True
    assert await storage.users.delete(u.user_id) is False
    assert await storage.users.get_by_id(u.user_id) is None
    assert await storage.credentials.get(b"cred") is None
    assert await storage.sessions.get(s.session_id) is None
    # The name is free again.
    await storage.users.create("Frank")


async def test_create_txn_composes(storage: Storage) -> None:
    def two(conn):  # type: ignore[no-untyped-def]
        a = create_user_txn(conn, "g1", "", False, now_us=1)
        b = create_user_txn(conn, "g2", "", False, now_us=1)
        return a, b

    a, b = await storage.db.write(two)
    assert (a.username, b.username) == ("g1", "g2")
    assert {u.username for u in await storage.users.list()} == {"g1", "g2"}

    def dup(conn):  # type: ignore[no-untyped-def]
        create_user_txn(conn, "g3", "", False, now_us=1)
        create_user_txn(conn, "G1", "", False, now_us=1)

    with pytest.raises(UsernameTaken):
        await storage.db.write(dup)
    assert await storage.users.get_by_username("g3") is None  # rolled back together
