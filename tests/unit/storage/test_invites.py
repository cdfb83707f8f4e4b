from __future__ import annotations

import asyncio
import hashlib

import pytest

from sovereign.storage import AlreadyExists, NotFound, Storage, UsernameTaken
from sovereign.storage.invites import consume_invite_txn
from sovereign.storage.users import create_user_txn


def h(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()


async def test_create_get_consume_once(storage: Storage) -> None:
    admin = await storage.users.create("admin", is_admin=True)
    u = await storage.users.create("alice")
    inv = await storage.invites.create(h("code"), admin.user_id, expires_at_us=1000, now=5)
    assert (inv.created_by, inv.created_at_us, inv.expires_at_us, inv.is_bootstrap) == (
        admin.user_id,
        5,
        1000,
        False,
    )
    assert inv.usable(999) and not inv.usable(1000) and not inv.used
    assert await storage.invites.get(h("code")) == inv
    assert await storage.invites.consume(h("code"), u.user_id, now=10) is True
    assert await storage.invites.consume(h("code"), u.user_id, now=11) is False
    used = await storage.invites.get(h("code"))
    assert used is not None and (used.used_by, used.used_at_us) == (u.user_id, 10) and used.used
    with pytest.raises(AlreadyExists):
        await storage.invites.create(h("code"), None, None)


async def test_consume_refuses_expired_and_unknown(storage: Storage) -> None:
    u = await storage.users.create("bob")
    await storage.invites.create(h("old"), None, expires_at_us=100)
    assert await storage.invites.consume(h("old"), u.user_id, now=100) is False
    assert await storage.invites.consume(h("nope"), u.user_id, now=1) is False
    await storage.invites.create(h("forever"), None, expires_at_us=None)
    assert await storage.invites.consume(h("forever"), u.user_id, now=10**18) is True
    await storage.invites.create(h("x"), None, None)
    with pytest.raises(NotFound):
        await storage.invites.consume(h("x"), "no-such-user", now=1)
    assert await storage.invites.consume(h("x"), u.user_id, now=1) is True


async def test_concurrent_consumers_exactly_one_wins(storage: Storage) -> None:
    users = [await storage.users.create(f"u{i}") for i in range(20)]
    await storage.invites.create(h("race"), None, None)
    res = await asyncio.gather(
        *(storage.invites.consume(h("race"), u.user_id, now=1) for u in users)
    )
    assert res.count(True) == 1


async def test_bootstrap(storage: Storage) -> None:
    inv = storage.invites
    assert await inv.has_unused_bootstrap() is False
    await inv.create(h("ordinary"), None, None)
    assert await inv.has_unused_bootstrap() is False
    await inv.create(h("boot"), None, expires_at_us=None, is_bootstrap=True)
    assert await inv.has_unused_bootstrap() is True
    u = await storage.users.create("root")
    assert await inv.consume(h("ordinary"), u.user_id, now=1, bootstrap_only=True) is False
    assert await inv.consume(h("boot"), u.user_id, now=1, bootstrap_only=True) is True
    assert await inv.has_unused_bootstrap() is False
    # Rotating: an unused bootstrap code is replaced, a used one kept as history.
    await inv.create(h("boot2"), None, None, is_bootstrap=True)
    assert await inv.delete_unused_bootstrap() == 1
    assert await inv.get(h("boot2")) is None
    assert await inv.get(h("boot")) is not None
    fresh = await inv.replace_bootstrap(h("boot4"), now=7)
    assert fresh.is_bootstrap and fresh.created_at_us == 7 and fresh.expires_at_us is None
    assert await inv.replace_bootstrap(h("boot5")) is not None
    assert await inv.get(h("boot4")) is None  # replaced: only one live bootstrap code
    assert await inv.delete_unused_bootstrap() == 1
    await inv.create(h("boot3"), None, expires_at_us=50, is_bootstrap=True)
    assert await inv.has_unused_bootstrap(now=49) is True
    assert await inv.has_unused_bootstrap(now=50) is False


async def test_list_count_delete(storage: Storage) -> None:
    u = await storage.users.create("carol")
    for i in range(5):
        await storage.invites.create(h(f"c{i}"), None, None, now=i)
    await storage.invites.consume(h("c0"), u.user_id, now=9)
    got = await storage.invites.list()
    assert [i.code_hash for i in got] == [h(f"c{i}") for i in (4, 3, 2, 1, 0)]
    assert [i.code_hash for i in await storage.invites.list(offset=1, limit=2)] == [
        h("c3"),
        h("c2"),
    ]
    assert len(await storage.invites.list(include_used=False)) == 4
    assert await storage.invites.count() == 5
    assert await storage.invites.count(include_used=False) == 4
    assert await storage.invites.delete(h("c1")) is True
    assert await storage.invites.delete(h("c1")) is False
    assert await storage.invites.count() == 4


async def test_deleting_users_keeps_invite_used(storage: Storage) -> None:
    admin = await storage.users.create("admin")
    u = await storage.users.create("dave")
    await storage.invites.create(h("c"), admin.user_id, None)
    await storage.invites.consume(h("c"), u.user_id, now=3)
    await storage.users.delete(u.user_id)
    await storage.users.delete(admin.user_id)
    row = await storage.invites.get(h("c"))
    assert row is not None
    assert (row.created_by, row.used_by, row.used_at_us) == (None, None, 3)
    assert await storage.invites.consume(h("c"), (await storage.users.create("x")).user_id, 4) is (
        False
    )


async def test_register_with_invite_is_one_transaction(storage: Storage) -> None:
    """The composition the auth service uses: the code is burnt only with the user."""
    await storage.users.create("taken")
    await storage.invites.create(h("code"), None, None)

    class BadInvite(Exception):
        pass

    def register(name: str):  # type: ignore[no-untyped-def]
        def txn(conn):  # type: ignore[no-untyped-def]
            user = create_user_txn(conn, name, "", False, now_us=1)
            if not consume_invite_txn(conn, h("code"), user.user_id, 1):
                raise BadInvite()
            return user

        return txn

    with pytest.raises(UsernameTaken):
        await storage.db.write(register("TAKEN"))
    row = await storage.invites.get(h("code"))
    assert row is not None and not row.used  # not burnt by the failed registration
    results = await asyncio.gather(
        *(storage.db.write(register(f"new{i}")) for i in range(5)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert sum(isinstance(r, BadInvite) for r in results) == 4
    assert await storage.users.count() == 2  # the losers' users were rolled back
