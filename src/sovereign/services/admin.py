"""Operator policy behind the admin HTTP API (SPEC §10, §12.23, §12.24, §12.28).

The HTTP shell (``sovereign.admin``) parses requests and renders JSON; everything that
decides or changes something is here, so the CLI and the API share one behaviour:

- who may use the API: a session token (Bearer, or the panel's cookie) of an enabled
  server admin; 401 without one, 403 (2003 NotAdmin) for anyone else;
- the live effects of account changes: disabling closes the user's sockets with 4005,
  revoking a session closes its sockets with 4004, deleting a user removes them from
  every group first (members get GROUP_MEMBER_REMOVED) and never removes the last admin;
- runtime settings: validated as a whole before anything is applied, applied to the
  running server, stored so that they win over file, environment and flags;
- the panel's passkey ceremonies: discoverable-credential sign-in of an admin, and the
  first admin's registration with the bootstrap code.

Errors that the SPEC §8 registry names are :class:`SovereignError`; the others (not
found, conflict, validation) are :class:`AdminError` with an HTTP status.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from sovereign.auth import webauthn as wa
from sovereign.clock import Clock
from sovereign.config import Config
from sovereign.errors import CloseCode, ErrorCode, SovereignError
from sovereign.services import tokens
from sovereign.services.auth import AuthService
from sovereign.services.connections import ConnectionService
from sovereign.services.groups import GroupService
from sovereign.services.ports import NullPeers, Outbox, Peers
from sovereign.services.state import ConversationState
from sovereign.stats import MlsStats
from sovereign.storage import InviteRow, SessionRow, Storage, UserRow
from sovereign.storage import admin as adminsql
from sovereign.storage import keypackages as kpsql
from sovereign.storage.database import Conn
from sovereign.storage.sessions import get_session_by_token_hash_txn, revoke_user_sessions_txn
from sovereign.storage.users import count_admins_txn, get_user_txn

log = logging.getLogger("sovereign.admin")

ADMIN_SESSION_HOURS = 12  # SPEC §12.28: the panel's cookie lives 12 h, never sliding
MAX_PAGE = 100


class AdminError(Exception):
    """A refusal with an HTTP status and no SPEC §8 code (404, 409, 422).

    ``code`` in the JSON body is then the HTTP status; ``field`` names the offending
    input for 422.
    """

    def __init__(self, status: int, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def invalid(field: str, message: str) -> AdminError:
    return AdminError(422, f"{field}: {message}", field=field)


# -- settings (SPEC §10, §12.23) --------------------------------------------------------

Check = Callable[[Any, Config], Any]


def _int(lo: int, hi: Callable[[Config], int] | None = None, what: str = "") -> Check:
    def check(v: Any, cfg: Config) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be an integer")
        top = hi(cfg) if hi is not None else None
        if v < lo or (top is not None and v > top):
            bound = f"between {lo} and {top}" if top is not None else f"at least {lo}"
            raise ValueError(f"must be {bound}{what}")
        return v

    return check


def _positive_number(v: Any, cfg: Config) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v > 1e6:
        raise ValueError("must be a number greater than 0 (at most 1000000)")
    return float(v)


def _name(v: Any, cfg: Config) -> str:
    if not isinstance(v, str) or not 1 <= len(v.strip()) <= 64:
        raise ValueError("must be a string of 1 to 64 characters")
    return v.strip()


def _registration(v: Any, cfg: Config) -> str:
    if v not in ("open", "invite", "closed"):
        raise ValueError("must be one of open, invite, closed")
    return str(v)


#: The settings an admin may change at runtime, in the order the panel shows them.
SETTINGS: dict[str, Check] = {
    "server_name": _name,
    "registration": _registration,
    "max_connections": _int(1, lambda c: 1_000_000),
    "max_connections_per_user": _int(1, lambda c: 1_000),
    "rate_limit_per_second": _positive_number,
    "rate_limit_burst": _int(1, lambda c: 1_000_000),
    "max_message_size_bytes": _int(
        1, lambda c: c.max_envelope_bytes, " (max_envelope_bytes bounds it)"
    ),
    "session_timeout_hours": _int(1, lambda c: 24 * 365 * 10),
    "min_key_packages": _int(0, lambda c: c.max_key_packages, " (max_key_packages bounds it)"),
}


def validate_settings(body: Any, cfg: Config) -> dict[str, Any]:
    """The whole body checked first (SPEC §12.23): the first bad field is named."""
    if not isinstance(body, dict) or not body:
        raise AdminError(422, "body: expected a JSON object of settings", field="body")
    out: dict[str, Any] = {}
    for key, value in body.items():
        check = SETTINGS.get(key)
        if check is None:
            raise invalid(key, "not a setting that can be changed at runtime")
        try:
            out[key] = check(value, cfg)
        except ValueError as exc:
            raise invalid(key, str(exc)) from None
    per_user = out.get("max_connections_per_user", cfg.max_connections_per_user)
    if per_user > out.get("max_connections", cfg.max_connections):
        raise invalid("max_connections_per_user", "must not exceed max_connections")
    return out


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    data: list[Any]
    offset: int
    limit: int
    total: int

    def body(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "pagination": {"offset": self.offset, "limit": self.limit, "total": self.total},
        }


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated admin API caller."""

    user: UserRow
    session: SessionRow


def _us_to_ms(us: int | None) -> int | None:
    return None if us is None else us // 1000


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def user_json(u: UserRow) -> dict[str, Any]:
    return {
        "id": u.user_id,
        "username": u.username,
        "display_name": u.display_name,
        "is_admin": u.is_admin,
        "enabled": u.enabled,
        "created_at": _us_to_ms(u.created_at_us),
    }


def session_json(s: SessionRow, now_us: int, online: bool = False) -> dict[str, Any]:
    return {
        "id": s.session_id,
        "user_id": s.user_id,
        "device_id": s.device_id,
        "kind": s.kind,
        "user_agent": s.user_agent,
        "created_at": _us_to_ms(s.created_at_us),
        "last_seen_at": _us_to_ms(s.last_seen_at_us),
        "expires_at": _us_to_ms(s.expires_at_us),
        "revoked_at": _us_to_ms(s.revoked_at_us),
        "active": s.active(now_us),
        "online": online,
    }


def invite_json(i: InviteRow, now_us: int) -> dict[str, Any]:
    status = (
        "used"
        if i.used
        else "expired"
        if i.expires_at_us is not None and i.expires_at_us <= now_us
        else "open"
    )
    return {
        "id": i.code_hash.hex(),  # the code itself is never stored (SPEC §4)
        "created_by": i.created_by,
        "created_at": _us_to_ms(i.created_at_us),
        "expires_at": _us_to_ms(i.expires_at_us),
        "used_by": i.used_by,
        "used_at": _us_to_ms(i.used_at_us),
        "bootstrap": i.is_bootstrap,
        "status": status,
    }


class AdminService:
    def __init__(
        self,
        config: Config,
        storage: Storage,
        clock: Clock,
        *,
        auth: AuthService,
        connections: ConnectionService,
        groups: GroupService,
        state: ConversationState,
        outbox: Outbox,
        mls_stats: MlsStats,
        base: Mapping[str, Any],
        sources: Mapping[str, str],
        peers: Peers | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        #: Admin ceremonies: rp_origins plus the admin listener's own origins (§12.28).
        self.auth = auth
        self.connections = connections
        self.groups = groups
        self.state = state
        self.outbox = outbox
        self.mls_stats = mls_stats
        self._base = dict(base)  # start-up values of the runtime settings
        self._sources = dict(sources)  # key -> default | file | env | flag
        self._stored: dict[str, Any] = {}
        self._changes = 0  # settings changes made here (a re-read must not undo one)
        #: the other nodes of a cluster (SPEC §12.27): told what they cache changed
        self.peers: Peers = peers if peers is not None else NullPeers()

    # -- who is asking (SPEC §10) ----------------------------------------------------
    async def authenticate(self, token: str, *, cookie: bool) -> Caller:
        """The admin behind ``token``; 1006 (401) or 2003 (403) otherwise. A cookie must
        carry an admin-kind session; a Bearer token may be any live session."""
        if not tokens.looks_like_token(token):
            raise SovereignError(ErrorCode.AUTH_REQUIRED, "sign in first")
        digest = tokens.digest(token)

        def lookup(conn: Conn) -> tuple[SessionRow | None, UserRow | None]:
            s = get_session_by_token_hash_txn(conn, digest)
            return s, (get_user_txn(conn, s.user_id) if s else None)

        session, user = await self.storage.db.read(lookup)
        now = self.clock.now_us()
        if (
            session is None
            or user is None
            or not tokens.same_digest(session.token_hash, digest)
            or not session.active(now)
            or (cookie and session.kind != "admin")
        ):
            raise SovereignError(ErrorCode.AUTH_REQUIRED, "sign in first")
        if not user.enabled or not user.is_admin:
            raise SovereignError(ErrorCode.NOT_ADMIN, "server admins only")
        return Caller(user, session)

    # -- passkey ceremonies of the panel (SPEC §12.28) ----------------------------------
    async def login_options(self) -> bytes:
        """Discoverable-credential request options: the browser offers its passkeys."""
        challenge = secrets.token_bytes(32)
        now = self.clock.now_us()
        await self.storage.challenges.put(
            challenge, "admin_login", now + int(self.config.challenge_timeout * 1e6)
        )
        return wa.authentication_options(
            self.auth.rp, challenge=challenge, timeout_ms=int(self.config.challenge_timeout * 1000)
        )

    async def login_verify(
        self,
        *,
        credential_id: bytes,
        authenticator_data: bytes,
        client_data_json: bytes,
        signature: bytes,
        user_handle: bytes,
        user_agent: str,
    ) -> tuple[UserRow, str]:
        """Verify an assertion (``AuthService.verify_assertion``: the same checks as a
        WebSocket login) and open an admin session."""
        user = await self.auth.verify_assertion(
            "admin_login",
            credential_id=credential_id,
            authenticator_data=authenticator_data,
            client_data_json=client_data_json,
            signature=signature,
            user_handle=user_handle,
        )
        if not user.enabled or not user.is_admin:
            raise SovereignError(ErrorCode.NOT_ADMIN, "server admins only")
        token = await self._admin_session(user.user_id, credential_id, user_agent)
        log.info("admin sign-in user=%s", user.user_id)
        return user, token

    async def _admin_session(self, user_id: str, credential_id: bytes | None, ua: str) -> str:
        token = tokens.new_token()
        now = self.clock.now_us()
        await self.storage.sessions.create(
            user_id,
            tokens.digest(token),
            now + ADMIN_SESSION_HOURS * 3600 * 1_000_000,
            credential_id,
            ua,
            now=now,
            kind="admin",
        )
        return token

    async def logout(self, caller: Caller) -> None:
        await self.storage.sessions.revoke(caller.session.session_id, self.clock.now_us())

    async def setup_options(self, code: str, username: str, display_name: str) -> bytes:
        """The first admin's registration options; the bootstrap code is checked now and
        consumed when the passkey is stored (SPEC §12.19, §12.28)."""
        if not code or not await self._is_bootstrap(code):
            raise SovereignError(
                ErrorCode.REGISTRATION_FAILED, "this setup link is not valid (used or replaced)"
            )
        _challenge, options = await self.auth.register_begin(username, display_name, code)
        return options

    async def _is_bootstrap(self, code: str) -> bool:
        invite = await self.storage.invites.get(tokens.digest(code))
        return invite is not None and invite.is_bootstrap and invite.usable(self.clock.now_us())

    async def setup_verify(
        self,
        *,
        credential_id: bytes,
        authenticator_data: bytes,
        client_data_json: bytes,
        attestation_object: bytes,
        user_agent: str,
    ) -> tuple[UserRow, str]:
        result = await self.auth.register_finish(
            credential_id=credential_id,
            authenticator_data=authenticator_data,
            client_data_json=client_data_json,
            attestation_object=attestation_object,
            user_agent=user_agent,
        )
        # Registration made a device session nobody holds the token of: revoke it, the
        # panel gets an admin session instead.
        await self.storage.sessions.revoke(result.session.session_id, self.clock.now_us())
        if not result.user.is_admin:  # registered under an open policy, not the bootstrap
            raise SovereignError(ErrorCode.REGISTRATION_FAILED, "this setup link is not valid")
        token = await self._admin_session(result.user.user_id, credential_id, user_agent)
        log.info("first admin registered user=%s", result.user.user_id)
        return result.user, token

    # -- info (SPEC §10) ----------------------------------------------------------------
    async def info(self, started_at_s: int, version: str) -> dict[str, Any]:
        now_s = self.clock.now_s()
        users = await self.storage.users.count()
        messages = await self.storage.db.read(adminsql.count_events_txn)
        return {
            "server_name": self.config.server_name,
            "version": version,
            "started_at": started_at_s * 1000,
            "uptime_seconds": max(0, now_s - started_at_s),
            "active_connections": self.outbox.count(),
            "total_users": users,
            "total_messages": messages,
            "total_conversations": len(self.state.convs),
            "database_size_bytes": self.storage.db.size_bytes(),
        }

    # -- users ----------------------------------------------------------------------------
    async def list_users(self, search: str, offset: int, limit: int) -> Page:
        rows = await self.storage.users.list(search=search, offset=offset, limit=limit)
        total = await self.storage.users.count(search)
        return Page([user_json(u) for u in rows], offset, limit, total)

    async def _user(self, user_id: str) -> UserRow:
        user = await self.storage.users.get_by_id(user_id)
        if user is None:
            raise SovereignError(ErrorCode.USER_NOT_FOUND, "no such user")
        return user

    async def user_detail(self, user_id: str) -> dict[str, Any]:
        user = await self._user(user_id)
        now = self.clock.now_us()
        creds = await self.storage.credentials.list_for_user(user_id)
        sessions = await self.storage.sessions.list(user_id, 0, MAX_PAGE, active_at_us=now)
        kps = await self.storage.db.read(lambda c: kpsql.count_for_user_txn(c, user_id))
        online = {s.session_id for s in self.outbox.sessions(user_id)}
        online |= self.peers.remote_sessions(user_id)  # a READY connection on any node
        convs = []
        for conv_id in sorted(self.state.user_convs.get(user_id, ())):
            conv = self.state.convs[conv_id]
            m = conv.members.get(user_id)
            convs.append(
                {
                    "id": conv_id,
                    "title": conv.title,
                    "role": m.role if m is not None else "member",
                    "members": len(conv.members),
                }
            )
        return {
            **user_json(user),
            "credentials": [
                {
                    "id": b64url(c.credential_id),
                    "created_at": _us_to_ms(c.created_at_us),
                    "last_used_at": _us_to_ms(c.last_used_at_us),
                    "sign_count": c.sign_count,
                }
                for c in creds
            ],
            "conversations": convs,
            "sessions": [session_json(s, now, s.session_id in online) for s in sessions],
            "key_packages": kps,
            # a READY connection on any node (SPEC §12.27)
            "online": bool(online) or bool(self.peers.remote_connections(user_id)),
        }

    async def _guard_last_admin(self, user: UserRow, what: str) -> None:
        if not (user.is_admin and user.enabled):
            return
        if await self.storage.db.read(count_admins_txn) <= 1:
            raise AdminError(409, f"cannot {what} the last admin")

    async def update_user(self, user_id: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not body:
            raise AdminError(422, "body: expected a JSON object", field="body")
        fields: dict[str, Any] = {}
        for key, value in body.items():
            if key == "display_name":
                if not isinstance(value, str) or not 1 <= len(value.strip()) <= 64:
                    raise invalid(key, "must be a string of 1 to 64 characters")
                fields[key] = value.strip()
            elif key in ("enabled", "is_admin"):
                if not isinstance(value, bool):
                    raise invalid(key, "must be true or false")
                fields[key] = value
            else:
                raise invalid(key, "not a field that can be changed")
        user = await self._user(user_id)
        if fields.get("enabled") is False:
            await self._guard_last_admin(user, "disable")
        if fields.get("is_admin") is False:
            await self._guard_last_admin(user, "demote")
        updated = await self.storage.users.update(user_id, **fields)
        if fields.get("enabled") is False:
            # SPEC §4: a disabled account's sockets close with 4005 at once.
            self.connections.close_user(user_id, CloseCode.ACCOUNT_DISABLED, "account disabled")
        if "display_name" in fields:
            self.state.forget_profile(user_id)  # re-read on next use
            self.peers.forget_profile(user_id)  # and on the other nodes
        log.info("admin updated user=%s fields=%s", user_id, ",".join(sorted(fields)))
        return user_json(updated)

    async def delete_user(self, user_id: str) -> None:
        """SPEC §10: revoke sessions, close connections, leave every group (members get
        GROUP_MEMBER_REMOVED), drop KeyPackages, credentials and the account."""
        user = await self._user(user_id)
        await self._guard_last_admin(user, "delete")
        now = self.clock.now_us()
        await self.storage.db.write(lambda c: revoke_user_sessions_txn(c, user_id, now))
        self.connections.close_user(user_id, CloseCode.SESSION_INVALID, "account deleted")
        await self.groups.remove_user_everywhere(user_id)

        await self.storage.db.write(lambda c: adminsql.delete_user_txn(c, user_id))
        self.state.forget_profile(user_id)
        self.peers.forget_profile(user_id)
        log.info("admin deleted user=%s", user_id)

    async def revoke_user_sessions(self, user_id: str) -> int:
        await self._user(user_id)
        now = self.clock.now_us()
        ids = await self.storage.db.write(lambda c: revoke_user_sessions_txn(c, user_id, now))
        for sid in ids:
            self.connections.close_session(sid, CloseCode.SESSION_INVALID, "session revoked")
        return len(ids)

    # -- sessions ----------------------------------------------------------------------
    async def list_sessions(self, user_id: str | None, offset: int, limit: int) -> Page:
        now = self.clock.now_us()
        rows = await self.storage.sessions.list(user_id, offset, limit, active_at_us=now)
        total = await self.storage.sessions.count(user_id, active_at_us=now)
        online = {
            s.session_id for s in self.outbox.all_sessions() if s.session_id and s.state.ready
        }
        for uid in {s.user_id for s in rows}:  # ... or on another node (SPEC §12.27)
            online |= self.peers.remote_sessions(uid)
        users: dict[str, str] = {}
        data = []
        for s in rows:
            if s.user_id not in users:
                u = await self.storage.users.get_by_id(s.user_id)
                users[s.user_id] = u.username if u is not None else ""
            data.append(
                {**session_json(s, now, s.session_id in online), "username": users[s.user_id]}
            )
        return Page(data, offset, limit, total)

    async def revoke_session(self, session_id: str) -> None:
        session = await self.storage.sessions.get(session_id)
        if session is None:
            raise AdminError(404, "no such session")
        # SPEC §4: the session's sockets close with 4004 (ConnectionService does both).
        await self.connections.revoke_session(session_id)

    # -- invites -------------------------------------------------------------------------
    async def create_invite(self, created_by: str | None, ttl_hours: int) -> dict[str, Any]:
        code = await self.auth.create_invite(created_by, ttl_hours)
        invite = await self.storage.invites.get(tokens.digest(code))
        assert invite is not None
        return {**invite_json(invite, self.clock.now_us()), "code": code}

    async def list_invites(self, offset: int, limit: int) -> Page:
        rows = await self.storage.invites.list(offset, limit)
        total = await self.storage.invites.count()
        now = self.clock.now_us()
        return Page([invite_json(i, now) for i in rows], offset, limit, total)

    async def delete_invite(self, code_or_id: str) -> None:
        """By the code itself, or by the id the list shows (the hex of its hash)."""
        try:
            key = bytes.fromhex(code_or_id) if len(code_or_id) == 64 else b""
        except ValueError:
            key = b""
        if not key:
            key = tokens.digest(code_or_id)
        if not await self.storage.invites.delete(key):
            raise AdminError(404, "no such invite")

    # -- settings (SPEC §12.23) ------------------------------------------------------------
    async def load_settings(self) -> None:
        """Apply stored settings over the start-up configuration (they win until reset).
        A stored value this version no longer accepts is skipped with a warning.

        Also how another node's change arrives (SPEC §12.27, ``ClusterService``): the
        whole set is re-read, and a key no longer stored (reset there) returns to its
        start-up value here."""
        while True:
            changes = self._changes
            stored = await self.storage.settings.get_all()
            if changes == self._changes:
                break  # else a change here committed during the read: read again
        applied: dict[str, Any] = {}
        for key, value in stored.items():
            check = SETTINGS.get(key)
            if check is None:
                continue
            try:
                applied[key] = check(value, self.config)
            except ValueError as exc:
                log.warning("stored setting %s ignored: %s", key, exc)
        for key in SETTINGS:
            if key in applied:
                setattr(self.config, key, applied[key])
            elif key in self._stored:
                setattr(self.config, key, self._base[key])
        self._stored = applied

    def settings(self) -> list[dict[str, Any]]:
        return [
            {
                "key": key,
                "value": getattr(self.config, key),
                "source": "admin" if key in self._stored else self._sources.get(key, "default"),
            }
            for key in SETTINGS
        ]

    async def put_settings(self, body: Any) -> list[dict[str, Any]]:
        values = validate_settings(body, self.config)
        await self.storage.settings.put_many(values)  # stored first: nothing half-applied
        self._changes += 1
        for key, value in values.items():
            setattr(self.config, key, value)  # live: read at each use (SPEC §12.23)
            self._stored[key] = value
        self.peers.settings_changed()
        log.info("admin changed settings: %s", ",".join(sorted(values)))
        return self.settings()

    async def reset_setting(self, key: str) -> list[dict[str, Any]]:
        if key not in SETTINGS:
            raise AdminError(404, f"no such setting: {key}")
        await self.storage.settings.delete(key)
        self._changes += 1
        self._stored.pop(key, None)
        setattr(self.config, key, self._base[key])
        self.peers.settings_changed()
        return self.settings()

    # -- MLS health (SPEC §12.24) -------------------------------------------------------------
    async def mls_conversations(self, offset: int, limit: int) -> Page:
        ids = sorted(self.state.convs)
        page_ids = ids[offset : offset + limit]

        def read(conn: Conn) -> tuple[dict[str, int], dict[str, int]]:
            return (
                adminsql.last_commits_txn(conn, page_ids),
                adminsql.pending_welcomes_txn(conn, page_ids),
            )

        last, pending = await self.storage.db.read(read)
        now_s = self.clock.now_s()
        data = []
        for cid in page_ids:
            conv = self.state.convs[cid]
            data.append(
                {
                    "id": cid,
                    "title": conv.title,
                    "member_count": len(conv.members),
                    "mls_group_id": conv.group_id.hex() if conv.group_id else "",
                    "epoch": conv.epoch,
                    "last_commit_at": _us_to_ms(last.get(cid)),
                    "commits_rejected_24h": self.mls_stats.refused_within_window(cid, now_s),
                    "group_info_stored": conv.group_info is not None,
                    "pending_welcomes": pending.get(cid, 0),
                }
            )
        return Page(data, offset, limit, len(ids))

    async def mls_devices(self, offset: int, limit: int) -> Page:
        now = self.clock.now_us()
        minimum = self.config.min_key_packages

        def read(conn: Conn) -> tuple[list[adminsql.DevicePool], int]:
            return (
                adminsql.device_pools_txn(conn, now, offset, limit),
                adminsql.count_devices_txn(conn, now),
            )

        rows, total = await self.storage.db.read(read)
        data = [{**msgspec.structs.asdict(r), "below_min": r.key_packages < minimum} for r in rows]
        return Page(data, offset, limit, total)

    async def pools_below_minimum(self) -> int:
        now, minimum = self.clock.now_us(), self.config.min_key_packages
        return await self.storage.db.read(lambda c: adminsql.count_pools_below_txn(c, now, minimum))
