"""Registration as one transaction (SPEC §4 register, §12.19 bootstrap).

User, passkey, invite use and first session (device) are written together: a taken
username or a used invite leaves nothing behind, and an invite is burnt only by a
registration that actually happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sovereign.storage.credentials import add_credential_txn
from sovereign.storage.database import Conn
from sovereign.storage.errors import InviteUnusable
from sovereign.storage.invites import consume_invite_txn, get_invite_txn
from sovereign.storage.sessions import SessionRow, create_session_txn
from sovereign.storage.users import UserRow, create_user_txn


class NewCredential(Protocol):
    """What registration stores of a verified passkey (structural: no auth import)."""

    @property
    def credential_id(self) -> bytes: ...
    @property
    def public_key(self) -> bytes: ...
    @property
    def sign_count(self) -> int: ...
    @property
    def transports(self) -> Sequence[str]: ...
    @property
    def aaguid(self) -> str: ...


def register_user_txn(
    conn: Conn,
    *,
    user_id: str,
    username: str,
    display_name: str,
    credential: NewCredential,
    invite_hash: bytes | None,
    token_hash: bytes,
    session_expires_at_us: int,
    now_us: int,
    user_agent: str = "",
) -> tuple[UserRow, SessionRow, bool]:
    """Returns (user, session, used_bootstrap). A bootstrap code makes the user an admin.

    Raises UsernameTaken, InviteUnusable (a LookupError) or CredentialExists; any of
    them rolls back the whole registration.
    """
    is_bootstrap = False
    if invite_hash is not None:
        invite = get_invite_txn(conn, invite_hash)
        if invite is None or not invite.usable(now_us):
            raise InviteUnusable("invalid or used invite code")
        is_bootstrap = invite.is_bootstrap
    user = create_user_txn(
        conn, username, display_name, is_bootstrap, now_us=now_us, user_id=user_id
    )
    # Re-checked by the conditional UPDATE: the writer is serial, but a concurrent
    # process sharing the database is not.
    if invite_hash is not None and not consume_invite_txn(conn, invite_hash, user_id, now_us):
        raise InviteUnusable("invalid or used invite code")
    add_credential_txn(
        conn,
        user_id,
        credential.credential_id,
        credential.public_key,
        credential.sign_count,
        credential.transports,
        credential.aaguid,
        now_us=now_us,
    )
    session = create_session_txn(
        conn,
        user_id,
        token_hash,
        session_expires_at_us,
        now_us=now_us,
        credential_id=credential.credential_id,
        user_agent=user_agent,
    )
    return user, session, is_bootstrap
