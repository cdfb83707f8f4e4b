"""Runtime settings edited through the admin API (SPEC §10); values are JSON.

Validation of keys and values is the admin service's job; storage keeps what it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from sovereign.storage.database import Conn, Database

_UPSERT = (
    "INSERT INTO settings (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


def _encode(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def get_settings_txn(conn: Conn) -> dict[str, Any]:
    return {
        k: msgspec.json.decode(v)
        for k, v in conn.execute("SELECT key, value FROM settings ORDER BY key")
    }


def get_setting_txn(conn: Conn, key: str) -> Any:
    r = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return msgspec.json.decode(r[0]) if r is not None else None


def put_settings_txn(conn: Conn, values: Mapping[str, Any]) -> None:
    # Encode everything first: a value that cannot be encoded writes nothing.
    rows = [(k, _encode(v)) for k, v in values.items()]
    conn.executemany(_UPSERT, rows)


def delete_setting_txn(conn: Conn, key: str) -> bool:
    return conn.execute("DELETE FROM settings WHERE key = ?", (key,)).rowcount > 0


class SettingsStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get_all(self) -> dict[str, Any]:
        return await self._db.read(get_settings_txn)

    async def get(self, key: str, default: Any = None) -> Any:
        value = await self._db.read(lambda c: get_setting_txn(c, key))
        return default if value is None else value

    async def put(self, key: str, value: Any) -> None:
        await self._db.write(lambda c: put_settings_txn(c, {key: value}))

    async def put_many(self, values: Mapping[str, Any]) -> None:
        """All or nothing, in one transaction."""
        snapshot = dict(values)
        await self._db.write(lambda c: put_settings_txn(c, snapshot))

    async def delete(self, key: str) -> bool:
        return await self._db.write(lambda c: delete_setting_txn(c, key))
