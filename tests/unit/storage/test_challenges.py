from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sovereign.storage import AlreadyExists, SqliteDatabase, Storage
from sovereign.storage.challenges import ChallengeStore


async def test_put_and_consume_once(storage: Storage) -> None:
    ch = storage.challenges
    await ch.put(
        b"c1",
        "register",
        expires_at_us=1000,
        user_id="01U",
        username="alice",
        display_name="Alice",
        invite_code="inv",
        now=10,
    )
    row = await ch.consume(b"c1", "register", now=500)
    assert row is not None
    assert (row.purpose, row.user_id, row.username, row.display_name, row.invite_code) == (
        "register",
        "01U",
        "alice",
        "Alice",
        "inv",
    )
    assert (row.created_at_us, row.expires_at_us) == (10, 1000)
    assert await ch.consume(b"c1", "register", now=500) is None  # single use


async def test_consume_refuses_unknown_expired_and_wrong_purpose(storage: Storage) -> None:
    ch = storage.challenges
    await ch.put(b"c", "login", expires_at_us=1000)
    assert await ch.consume(b"unknown", "login", now=0) is None
    assert await ch.consume(b"c", "register", now=0) is None
    assert await ch.consume(b"c", "admin_login", now=0) is None
    assert await ch.consume(b"c", "login", now=1000) is None  # expires_at is exclusive
    await ch.put(b"d", "login", expires_at_us=1000)
    # A wrong-purpose attempt does not use it up.
    assert await ch.consume(b"d", "register", now=0) is None
    assert await ch.consume(b"d", "login", now=999) is not None


async def test_put_validates(storage: Storage) -> None:
    await storage.challenges.put(b"c", "login", 10)
    with pytest.raises(AlreadyExists):
        await storage.challenges.put(b"c", "login", 10)
    with pytest.raises(ValueError):
        await storage.challenges.put(b"x", "bogus", 10)  # type: ignore[arg-type]


async def test_concurrent_consumers_exactly_one_wins(storage: Storage) -> None:
    await storage.challenges.put(b"race", "login", expires_at_us=10**18)
    res = await asyncio.gather(
        *(storage.challenges.consume(b"race", "login", now=1) for _ in range(50))
    )
    assert sum(r is not None for r in res) == 1


async def test_consumers_in_two_processes_exactly_one_wins(db_path: Path) -> None:
    # Two Database objects on one file stand in for two server processes.
    a = await SqliteDatabase.open(db_path)
    b = await SqliteDatabase.open(db_path)
    try:
        ca, cb = ChallengeStore(a), ChallengeStore(b)
        for i in range(10):
            await ca.put(bytes([i]), "login", expires_at_us=10**18)
        res = await asyncio.gather(
            *(s.consume(bytes([i]), "login", now=1) for i in range(10) for s in (ca, cb, ca, cb))
        )
        assert sum(r is not None for r in res) == 10  # one winner per challenge
    finally:
        await a.close()
        await b.close()


async def test_purge_expired(storage: Storage) -> None:
    ch = storage.challenges
    await ch.put(b"old", "login", expires_at_us=100)
    await ch.put(b"used", "login", expires_at_us=10_000)
    await ch.put(b"live", "login", expires_at_us=10_000)
    assert await ch.consume(b"used", "login", now=1) is not None
    assert await ch.purge_expired(now=100) == 2
    assert await ch.consume(b"live", "login", now=101) is not None
