"""Authentication service: passkey registration and login, sessions (SPEC §4, §12.7,
§12.9, §12.19, §12.20).

Policy only: WebAuthn verification is ``sovereign.auth.webauthn`` (py_webauthn),
SQL is ``sovereign.storage``. Every failure raises :class:`SovereignError` with the
registry code the SPEC names; messages are client-safe.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ulid import ULID

from sovereign.auth import webauthn as wa
from sovereign.clock import SYSTEM_CLOCK, Clock
from sovereign.config import Config
from sovereign.errors import ErrorCode, SovereignError
from sovereign.services import tokens
from sovereign.services.limits import PerIpLimiter
from sovereign.storage import ChallengeRow, Purpose, SessionRow, Storage, UserRow
from sovereign.storage.database import Conn
from sovereign.storage.errors import CredentialExists, UsernameTaken
from sovereign.storage.sessions import get_session_by_token_hash_txn
from sovereign.storage.users import get_user_txn

log = logging.getLogger("sovereign.auth")

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}$")
MAX_DISPLAY_NAME = 64
CHALLENGE_BYTES = 32
# A resume moves the stored expiry only when it gains at least this much (1 minute):
# a 30-day sliding window loses nothing, and a reconnect storm writes nothing.
EXTEND_STEP_US = 60 * 1_000_000


@dataclass(frozen=True, slots=True)
class AuthResult:
    user: UserRow
    session: SessionRow
    token: str


def _check_username(username: str) -> None:
    if not USERNAME_RE.match(username):
        raise SovereignError(
            ErrorCode.REGISTRATION_FAILED,
            "username must be 1-32 characters: letters, digits, '_', '.', '-'",
        )


class AuthService:
    def __init__(
        self,
        config: Config,
        storage: Storage,
        clock: Clock = SYSTEM_CLOCK,
        origins: tuple[str, ...] | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        # Called with (device_id, user_id) after a new session (device) is stored.
        self.device_hooks: list[Callable[[str, str], Awaitable[None]]] = []
        # SPEC §12.32: per source IP, attempts (AUTH_REQUEST, AUTH_REGISTER_REQUEST) and
        # registrations.
        self.attempts = PerIpLimiter(config.auth_rate_per_minute / 60.0, config.auth_rate_burst)
        self.registrations = PerIpLimiter(
            config.register_rate_per_hour / 3600.0, config.register_rate_per_hour
        )
        self.rp = wa.RelyingParty(
            rp_id=config.rp_id,
            rp_name=config.rp_name,
            origins=origins if origins is not None else tuple(config.rp_origins),
        )

    def rate_limit(self, ip: str, register: bool) -> int:
        """Milliseconds the caller must wait before this attempt from ``ip`` (0: go on).
        A refused attempt spends nothing of the other bucket."""
        now = self.clock.monotonic()
        wait = self.attempts.take(ip, now)
        if not wait and register:
            wait = self.registrations.take(ip, now)
        return int(wait * 1000) + 1 if wait else 0

    # -- settings ------------------------------------------------------------
    async def load_settings(self) -> None:
        """Apply settings an admin stored at runtime over the start-up config."""
        stored = await self.storage.settings.get_all()
        policy = stored.get("registration")
        if policy in ("open", "invite", "closed"):
            self.config.registration = policy

    @property
    def session_lifetime_us(self) -> int:
        return self.config.session_timeout_hours * 3600 * 1_000_000

    @property
    def challenge_lifetime_us(self) -> int:
        return int(self.config.challenge_timeout * 1_000_000)

    async def _consume_challenge(
        self, client_data_json: bytes, purpose: Purpose
    ) -> tuple[bytes, ChallengeRow, int]:
        """The stored challenge the client data names, consumed before any verification
        so that a replay can never pass (single use, SPEC §4)."""
        challenge = wa.extract_challenge(client_data_json)
        if challenge is None:
            raise SovereignError(ErrorCode.CHALLENGE_FAILED, "client data has no challenge")
        now = self.clock.now_us()
        pending = await self.storage.challenges.consume(challenge, purpose, now)
        if pending is None:
            raise SovereignError(ErrorCode.CHALLENGE_FAILED, "unknown, used or expired challenge")
        return challenge, pending, now

    # -- login (SPEC §4) -------------------------------------------------------
    async def login_begin(self, username: str) -> tuple[bytes, bytes]:
        user = await self.storage.users.get_by_username(username) if username else None
        if user is None:
            raise SovereignError(ErrorCode.INVALID_CREDENTIAL, "unknown user")
        if not user.enabled:
            raise SovereignError(ErrorCode.ACCOUNT_DISABLED, "account disabled")
        creds = await self.storage.credentials.list_for_user(user.user_id)
        if not creds:
            raise SovereignError(ErrorCode.INVALID_CREDENTIAL, "user has no passkey")
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        now = self.clock.now_us()
        await self.storage.challenges.put(
            challenge, "login", now + self.challenge_lifetime_us, user_id=user.user_id
        )
        options = wa.authentication_options(
            self.rp,
            challenge=challenge,
            allow_credential_ids=[c.credential_id for c in creds],
            timeout_ms=int(self.config.challenge_timeout * 1000),
        )
        return challenge, options

    async def verify_assertion(
        self,
        purpose: Purpose,
        *,
        credential_id: bytes,
        authenticator_data: bytes,
        client_data_json: bytes,
        signature: bytes,
        user_handle: bytes,
    ) -> UserRow:
        """A passkey assertion, checked once for every sign-in path (the WebSocket login
        and the admin panel's): the challenge is consumed first (single use), then the
        credential, WebAuthn §7.2 (origin, rpId, challenge, flags, signature, user
        handle: ``sovereign.auth.webauthn``) and the sign count, stored atomically. A
        challenge issued for one user (a login by username) only accepts that user's
        passkeys; a discoverable one (the panel) accepts any. Returns the user, who may
        still be disabled: the caller decides what a disabled user gets."""
        challenge, pending, now = await self._consume_challenge(client_data_json, purpose)
        cred = await self.storage.credentials.get(credential_id)
        if cred is None or (pending.user_id is not None and cred.user_id != pending.user_id):
            raise SovereignError(ErrorCode.INVALID_CREDENTIAL, "unknown credential")
        user = await self.storage.users.get_by_id(cred.user_id)
        if user is None:
            raise SovereignError(ErrorCode.INVALID_CREDENTIAL, "unknown credential")
        try:
            new_count = wa.verify_authentication(
                self.rp,
                challenge=challenge,
                credential_id=credential_id,
                authenticator_data=authenticator_data,
                client_data_json=client_data_json,
                signature=signature,
                user_handle=user_handle or None,
                credential_public_key=cred.public_key,
                stored_sign_count=cred.sign_count,
                expected_user_handle=user.user_id.encode(),
            )
        except wa.WebAuthnError as exc:
            log.info("%s assertion rejected for user %s: %s", purpose, user.user_id, exc.reason)
            raise SovereignError(
                ErrorCode.CHALLENGE_FAILED, f"assertion rejected: {exc.reason}"
            ) from None
        if not await self.storage.credentials.update_sign_count(credential_id, new_count, now):
            # A concurrent login moved the counter past ours: treat as a clone (§7.2 step 21).
            raise SovereignError(
                ErrorCode.CHALLENGE_FAILED, "assertion rejected: sign count regression"
            )
        return user

    async def login_finish(
        self,
        *,
        credential_id: bytes,
        authenticator_data: bytes,
        client_data_json: bytes,
        signature: bytes,
        user_handle: bytes,
        user_agent: str = "",
    ) -> AuthResult:
        user = await self.verify_assertion(
            "login",
            credential_id=credential_id,
            authenticator_data=authenticator_data,
            client_data_json=client_data_json,
            signature=signature,
            user_handle=user_handle,
        )
        if not user.enabled:
            raise SovereignError(ErrorCode.ACCOUNT_DISABLED, "account disabled")
        session, token = await self.create_session(user.user_id, credential_id, user_agent)
        log.info("login user=%s device=%s", user.user_id, session.device_id)
        return AuthResult(user, session, token)

    # -- resume (SPEC §4, §12.9) -------------------------------------------------
    @staticmethod
    def is_token_shaped(value: str) -> bool:
        return tokens.looks_like_token(value)

    async def resume(
        self, token: str, also: Callable[[Conn, SessionRow], None] | None = None
    ) -> AuthResult:
        """``also`` runs in the same read once the token has found a device session of
        an enabled user that is not revoked (the READY's device read: one reader hop
        for both); every check below still decides, and on any failure what ``also``
        read is never used."""
        if not tokens.looks_like_token(token):
            raise SovereignError(ErrorCode.INVALID_CREDENTIAL, "unknown session token")
        digest = tokens.digest(token)

        def lookup(conn: Conn) -> tuple[SessionRow | None, UserRow | None]:
            session = get_session_by_token_hash_txn(conn, digest)
            if session is None:
                return None, None
            user = get_user_txn(conn, session.user_id)
            if (
                also is not None
                and user is not None
                and user.enabled
                and session.kind == "device"
                and session.revoked_at_us is None
            ):
                also(conn, session)
            return session, user

        session, user = await self.storage.db.read(lookup)  # one hop for all of it
        if session is None or not tokens.same_digest(session.token_hash, digest):
            raise SovereignError(ErrorCode.INVALID_CREDENTIAL, "unknown session token")
        now = self.clock.now_us()
        if session.kind != "device":  # an admin panel sign-in is no device (§12.28)
            raise SovereignError(ErrorCode.INVALID_CREDENTIAL, "unknown session token")
        if session.revoked_at_us is not None:
            raise SovereignError(ErrorCode.SESSION_REVOKED, "session revoked")
        if session.expires_at_us <= now:
            raise SovereignError(ErrorCode.EXPIRED_SESSION, "session expired")
        if user is None:
            raise SovereignError(ErrorCode.SESSION_REVOKED, "session revoked")
        if not user.enabled:
            raise SovereignError(ErrorCode.ACCOUNT_DISABLED, "account disabled")
        # Sliding expiry: the same token, its expiry extended (SPEC §12.9). The write
        # (an fsync) is skipped when the expiry would move by less than EXTEND_STEP_US.
        target = now + self.session_lifetime_us
        if target - session.expires_at_us < EXTEND_STEP_US:
            return AuthResult(user, session, token)
        extended = await self.storage.sessions.extend(session.session_id, target, now)
        if extended is None:  # revoked or expired between the read and the write
            raise SovereignError(ErrorCode.SESSION_REVOKED, "session revoked")
        return AuthResult(user, extended, token)

    async def create_session(
        self, user_id: str, credential_id: bytes | None = None, user_agent: str = ""
    ) -> tuple[SessionRow, str]:
        token = tokens.new_token()
        now = self.clock.now_us()
        session = await self.storage.sessions.create(
            user_id,
            tokens.digest(token),
            now + self.session_lifetime_us,
            credential_id=credential_id,
            user_agent=user_agent,
            now=now,
        )
        for hook in self.device_hooks:
            await hook(session.device_id, user_id)
        return session, token

    # -- registration (SPEC §4, §12.19) ------------------------------------------
    async def register_begin(
        self, username: str, display_name: str, invite_code: str
    ) -> tuple[bytes, bytes]:
        _check_username(username)
        if len(display_name) > MAX_DISPLAY_NAME:
            raise SovereignError(ErrorCode.REGISTRATION_FAILED, "display_name is too long")
        invite_hash = await self._check_invite(invite_code)
        if await self.storage.users.get_by_username(username) is not None:
            raise SovereignError(ErrorCode.REGISTRATION_FAILED, "username is taken")
        user_id = str(ULID())
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        now = self.clock.now_us()
        await self.storage.challenges.put(
            challenge,
            "register",
            now + self.challenge_lifetime_us,
            user_id=user_id,
            username=username,
            display_name=display_name or username,
            invite_code=invite_hash.hex() if invite_hash else None,
        )
        options = wa.registration_options(
            self.rp,
            user_id=user_id.encode(),
            username=username,
            display_name=display_name or username,
            challenge=challenge,
            timeout_ms=int(self.config.challenge_timeout * 1000),
        )
        return challenge, options

    async def _check_invite(self, invite_code: str) -> bytes | None:
        """Which invite (hash) this registration will consume, or None if none is needed.

        SPEC §12.19: the bootstrap code works under any policy; under ``open`` an
        ordinary code is ignored; ``invite`` needs one; ``closed`` admits only bootstrap.
        """
        policy = self.config.registration
        if invite_code:
            code_hash = tokens.digest(invite_code)
            invite = await self.storage.invites.get(code_hash)
            usable = (
                invite is not None
                and invite.used_by is None
                and (invite.expires_at_us is None or invite.expires_at_us > self.clock.now_us())
            )
            if usable and invite is not None and invite.is_bootstrap:
                return code_hash
            if policy == "open":
                return None
            if policy == "invite" and usable:
                return code_hash
            raise SovereignError(ErrorCode.REGISTRATION_FAILED, "invalid or used invite code")
        if policy == "open":
            return None
        if policy == "invite":
            raise SovereignError(ErrorCode.REGISTRATION_FAILED, "an invite code is required")
        raise SovereignError(ErrorCode.REGISTRATION_FAILED, "registration is closed")

    async def register_finish(
        self,
        *,
        credential_id: bytes,
        authenticator_data: bytes,
        client_data_json: bytes,
        attestation_object: bytes,
        user_agent: str = "",
    ) -> AuthResult:
        challenge, pending, now = await self._consume_challenge(client_data_json, "register")
        if pending.user_id is None or pending.username is None:
            raise SovereignError(ErrorCode.CHALLENGE_FAILED, "unknown, used or expired challenge")
        try:
            cred = wa.verify_registration(
                self.rp,
                challenge=challenge,
                credential_id=credential_id,
                client_data_json=client_data_json,
                attestation_object=attestation_object,
            )
        except wa.WebAuthnError as exc:
            log.info("registration rejected: %s", exc.reason)
            raise SovereignError(
                ErrorCode.REGISTRATION_FAILED, f"bad attestation: {exc.reason}"
            ) from None
        invite_hash = bytes.fromhex(pending.invite_code) if pending.invite_code else None
        token = tokens.new_token()
        try:
            user, session, is_bootstrap = await self.storage.register_user(
                user_id=pending.user_id,
                username=pending.username,
                display_name=pending.display_name or pending.username,
                credential=cred,
                invite_hash=invite_hash,
                token_hash=tokens.digest(token),
                session_expires_at_us=now + self.session_lifetime_us,
                now_us=now,
                user_agent=user_agent,
            )
        except UsernameTaken:
            raise SovereignError(ErrorCode.REGISTRATION_FAILED, "username is taken") from None
        except CredentialExists:
            raise SovereignError(
                ErrorCode.REGISTRATION_FAILED, "credential already registered"
            ) from None
        except LookupError:
            raise SovereignError(
                ErrorCode.REGISTRATION_FAILED, "invalid or used invite code"
            ) from None
        log.info(
            "registered user=%s device=%s%s",
            user.user_id,
            session.device_id,
            " (first admin)" if is_bootstrap else "",
        )
        return AuthResult(user, session, token)

    # -- operators ------------------------------------------------------------------
    async def ensure_bootstrap(self) -> str | None:
        """With no admin, issue a fresh one-time bootstrap code (only its hash is kept)."""
        if await self.storage.users.any_admin():
            return None
        code = tokens.new_invite_code()
        await self.storage.invites.replace_bootstrap(tokens.digest(code), self.clock.now_us())
        return code

    async def create_invite(self, created_by: str | None, ttl_hours: int = 0) -> str:
        code = tokens.new_invite_code()
        now = self.clock.now_us()
        expires = now + ttl_hours * 3600 * 1_000_000 if ttl_hours else None
        await self.storage.invites.create(tokens.digest(code), created_by, expires)
        return code

    async def create_user(
        self, username: str, display_name: str = "", *, is_admin: bool = False
    ) -> UserRow:
        _check_username(username)
        try:
            return await self.storage.users.create(
                username, display_name or username, is_admin=is_admin, now=self.clock.now_us()
            )
        except UsernameTaken:
            raise SovereignError(ErrorCode.REGISTRATION_FAILED, "username is taken") from None

    async def purge_expired(self) -> None:
        await self.storage.challenges.purge_expired(self.clock.now_us())
