from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

import pytest

from sovereign.storage import (
    CredentialExists,
    InviteUnusable,
    SessionRow,
    Storage,
    UsernameTaken,
    UserRow,
)


@dataclass(frozen=True)
class Cred:
    credential_id: bytes
    public_key: bytes = b"cose"
    sign_count: int = 0
    transports: tuple[str, ...] = ("internal",)
    aaguid: str = "00000000-0000-0000-0000-000000000000"


def h(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()


async def register(
    storage: Storage, name: str, *, cred: bytes | None = None, invite: str | None = None
) -> tuple[UserRow, SessionRow, bool]:
    return await storage.register_user(
        user_id=f"id-{name}",
        username=name,
        display_name=name.title(),
        credential=Cred(cred or name.encode()),
        invite_hash=h(invite) if invite else None,
        token_hash=h("token-" + name),
        session_expires_at_us=10**18,
        now_us=100,
        user_agent="test",
    )


async def test_register_writes_everything(storage: Storage) -> None:
    user, session, boot = await storage.register_user(
        user_id="U1",
        username="alice",
        display_name="Alice",
        credential=Cred(b"c1", sign_count=3),
        invite_hash=None,
        token_hash=h("t"),
        session_expires_at_us=999,
        now_us=100,
        user_agent="ua",
    )
    assert (user.user_id, user.username, user.is_admin, boot) == ("U1", "alice", False, False)
    assert (session.user_id, session.credential_id, session.expires_at_us) == ("U1", b"c1", 999)
    cred = await storage.credentials.get(b"c1")
    assert cred is not None and (cred.user_id, cred.sign_count, cred.transports) == (
        "U1",
        3,
        ("internal",),
    )
    assert await storage.sessions.get_by_token_hash(h("t")) == session


async def test_bootstrap_code_makes_the_first_admin(storage: Storage) -> None:
    await storage.invites.replace_bootstrap(h("boot"))
    user, _, boot = await register(storage, "root", invite="boot")
    assert boot is True and user.is_admin is True
    assert await storage.users.any_admin()
    assert not await storage.invites.has_unused_bootstrap()
    with pytest.raises(InviteUnusable):
        await register(storage, "second", invite="boot")
    assert await storage.users.get_by_username("second") is None


async def test_failures_roll_back_everything(storage: Storage) -> None:
    await storage.invites.create(h("inv"), None, None)
    await register(storage, "taken")
    with pytest.raises(UsernameTaken):
        await register(storage, "TAKEN", cred=b"fresh", invite="inv")
    with pytest.raises(CredentialExists):
        await register(storage, "other", cred=b"taken", invite="inv")
    with pytest.raises(LookupError):  # what the auth service catches
        await register(storage, "nobody", invite="no-such-code")
    row = await storage.invites.get(h("inv"))
    assert row is not None and not row.used  # not burnt by any failed attempt
    assert await storage.users.count() == 1
    assert await storage.sessions.count() == 1
    await register(storage, "finally", invite="inv")
    row = await storage.invites.get(h("inv"))
    assert row is not None and row.used_by == "id-finally"


async def test_one_invite_many_registrations_one_wins(storage: Storage) -> None:
    await storage.invites.create(h("inv"), None, None)
    res = await asyncio.gather(
        *(register(storage, f"u{i}", invite="inv") for i in range(10)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in res) == 1
    assert all(isinstance(r, InviteUnusable) for r in res if isinstance(r, BaseException))
    assert await storage.users.count() == 1
