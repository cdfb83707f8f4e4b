from __future__ import annotations

from pathlib import Path

import pytest

from sovereign.storage import Storage, open_storage


async def test_put_get_all(storage: Storage) -> None:
    s = storage.settings
    assert await s.get_all() == {}
    await s.put("server_name", "Home")
    await s.put("max_connections", 100)
    await s.put("registration", "invite")
    await s.put("server_name", "Home 2")  # upsert
    assert await s.get_all() == {
        "max_connections": 100,
        "registration": "invite",
        "server_name": "Home 2",
    }
    assert await s.get("max_connections") == 100
    assert await s.get("missing", "dflt") == "dflt"
    await s.put_many({"a": [1, 2], "b": {"x": True}, "c": 1.5})
    assert (await s.get_all())["b"] == {"x": True}
    assert await s.delete("a") is True
    assert await s.delete("a") is False


async def test_put_many_is_all_or_nothing(storage: Storage) -> None:
    with pytest.raises(TypeError):
        await storage.settings.put_many({"ok": 1, "bad": object()})
    assert await storage.settings.get_all() == {}


async def test_settings_persist(db_path: Path) -> None:
    s = await open_storage(db_path)
    await s.settings.put("k", {"v": 1})
    await s.close()
    async with await open_storage(db_path) as s2:
        assert await s2.settings.get_all() == {"k": {"v": 1}}
