"""SQL for per-device KeyPackage pools (SPEC §7, §12.6, §12.17, §12.22).

A fetch consumes "the oldest ordinary package of each device" with one conditional
``DELETE … RETURNING`` whose sub-select skips rows another transaction has locked
(PostgreSQL ``FOR UPDATE SKIP LOCKED``, an engine fragment): several server processes
writing one PostgreSQL database never hand the same package to two fetches. On SQLite
the single writer thread makes it atomic anyway.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sovereign.storage.database import Conn
from sovereign.storage.engines import per_engine

# The oldest ordinary package of a device, consumed in one statement (see above).
_CONSUME_OLDEST = per_engine(
    lambda e: (
        "DELETE FROM key_packages WHERE kp_id = (SELECT kp_id FROM key_packages"
        " WHERE device_id = ? AND last_resort = 0 ORDER BY kp_id LIMIT 1"
        + e.skip_locked()
        + ") RETURNING data"
    )
)


class PoolFull(Exception):
    pass


class DuplicatePackage(Exception):
    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__(index)


@dataclass(frozen=True, slots=True)
class FetchedPackage:
    device_id: str
    data: bytes
    remaining: int  # ordinary packages left in that device's pool
    last_resort: bool


def ordinary_count_txn(conn: Conn, device_id: str) -> int:
    return int(
        conn.execute(
            "SELECT COUNT(*) FROM key_packages WHERE device_id = ? AND last_resort = 0",
            (device_id,),
        ).fetchone()[0]
    )


@dataclass(frozen=True, slots=True)
class Uploaded:
    stored: int
    first: bool  # the device's first upload ever (it announces the device, SPEC §12.29)


def upload_txn(
    conn: Conn,
    *,
    device_id: str,
    user_id: str,
    ordinary: Sequence[tuple[int, bytes]],
    last_resort: tuple[int, bytes] | None,
    max_per_device: int,
    now_us: int,
) -> Uploaded:
    """All or nothing. ``(index, data)`` pairs keep the caller's indexes for errors."""
    if ordinary_count_txn(conn, device_id) + len(ordinary) > max_per_device:
        raise PoolFull()
    seen: set[bytes] = set()
    rows = []
    for index, data in [*ordinary, *([last_resort] if last_resort else [])]:
        digest = hashlib.sha256(data).digest()
        if digest in seen:
            raise DuplicatePackage(index)
        seen.add(digest)
        rows.append((index, data, digest))
    if last_resort is not None:
        conn.execute(
            "DELETE FROM key_packages WHERE device_id = ? AND last_resort = 1", (device_id,)
        )
    for index, data, digest in rows:
        if conn.execute("SELECT 1 FROM key_packages WHERE hash = ?", (digest,)).fetchone():
            raise DuplicatePackage(index)
        is_lr = 1 if last_resort is not None and index == last_resort[0] else 0
        conn.execute(
            "INSERT INTO key_packages (device_id, user_id, data, hash, last_resort,"
            " created_at_us) VALUES (?, ?, ?, ?, ?, ?)",
            (device_id, user_id, data, digest, is_lr, now_us),
        )
    first = conn.execute(
        "UPDATE sessions SET key_packages_since_us = ?"
        " WHERE device_id = ? AND key_packages_since_us IS NULL",
        (now_us, device_id),
    ).rowcount
    return Uploaded(len(rows), first == 1)


def fetch_txn(conn: Conn, user_id: str) -> list[FetchedPackage]:
    """One package per active device of ``user_id``: the oldest ordinary one (consumed),
    else its last-resort one (kept) (SPEC §7, §12.6)."""
    out: list[FetchedPackage] = []
    devices = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT k.device_id FROM key_packages k JOIN sessions s"
            " ON s.device_id = k.device_id WHERE k.user_id = ? AND s.revoked_at_us IS NULL"
            " ORDER BY k.device_id",
            (user_id,),
        )
    ]
    for device_id in devices:
        row = conn.execute(_CONSUME_OLDEST, (device_id,)).fetchone()
        if row is not None:
            out.append(
                FetchedPackage(device_id, bytes(row[0]), ordinary_count_txn(conn, device_id), False)
            )
            continue
        row = conn.execute(
            "SELECT data FROM key_packages WHERE device_id = ? AND last_resort = 1",
            (device_id,),
        ).fetchone()
        if row is not None:
            out.append(FetchedPackage(device_id, bytes(row[0]), 0, True))
    return out


def delete_device_txn(conn: Conn, device_id: str) -> int:
    return conn.execute("DELETE FROM key_packages WHERE device_id = ?", (device_id,)).rowcount


def delete_user_packages_txn(conn: Conn, user_id: str) -> int:
    return conn.execute("DELETE FROM key_packages WHERE user_id = ?", (user_id,)).rowcount


def count_for_user_txn(conn: Conn, user_id: str) -> int:
    return int(
        conn.execute("SELECT COUNT(*) FROM key_packages WHERE user_id = ?", (user_id,)).fetchone()[
            0
        ]
    )
