"""``sovereign`` command line (SPEC §11, §12.21).

Every subcommand takes ``--data-dir`` and ``--config`` after the subcommand and
initialises or migrates the data directory as needed. Secrets that a command prints
(tokens, invite codes) are the last whitespace-separated word of its output; errors
are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from sovereign import __version__
from sovereign.config import (
    Config,
    ConfigError,
    dump_toml,
    load,
    load_with_sources,
    stray_environment,
)

log = logging.getLogger("sovereign.cli")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--data-dir", metavar="DIR", help="data directory (default ./data)")
    p.add_argument("--log-format", choices=["text", "json"], help="log line format")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovereign", description="Sovereign: self-hosted end-to-end-encrypted messaging."
    )
    parser.add_argument("--version", action="version", version=f"sovereign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server")
    _common(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="WebSocket listener (0.0.0.0:8080)")
    serve.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help='admin API, panel and /metrics (127.0.0.1:8081; "" turns it off)',
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="N processes sharing the port (SO_REUSEPORT); needs storage = postgres and "
        "redis_url (docs/scaling.md)",
    )
    # Set by the supervisor of --workers on each worker it starts; not for operators.
    serve.add_argument("--worker-index", type=_non_negative_int, help=argparse.SUPPRESS)

    setup = sub.add_parser(
        "setup",
        help="first-run wizard: writes DATA_DIR/sovereign.toml",
        description="Write DATA_DIR/sovereign.toml (or --config FILE) and create the "
        "database. Asks for each answer not given as a flag, unless --yes.",
    )
    _common(setup)
    setup.add_argument("--server-name")
    setup.add_argument("--rp-id", help="WebAuthn relying party id (your domain)")
    setup.add_argument("--rp-origin", action="append", help="allowed WebAuthn origin (repeat)")
    setup.add_argument("--listen", metavar="HOST:PORT")
    setup.add_argument("--registration", choices=["open", "invite", "closed"])
    setup.add_argument("--yes", action="store_true", help="accept defaults, ask nothing")
    setup.add_argument("--force", action="store_true", help="overwrite an existing file")

    user = sub.add_parser("user", help="manage users")
    usub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    create = usub.add_parser("create", help="create a user (no passkey yet)")
    _common(create)
    create.add_argument("username")
    create.add_argument("--display-name", default="")
    create.add_argument("--admin", action="store_true", help="make the user a server admin")
    create.add_argument(
        "--print-token",
        action="store_true",
        help="also create a session (device) and print its token as the last word",
    )
    ulist = usub.add_parser("list", help="list users")
    _common(ulist)
    ulist.add_argument("--search", default="", help="match username or display name")
    for action, text in (
        ("disable", "disable an account (its connections close at once, 4005)"),
        ("enable", "enable a disabled account"),
        ("delete", "delete an account: leaves every group, passkeys and devices go"),
    ):
        p = usub.add_parser(action, help=text)
        _common(p)
        p.add_argument("user", help="username or user id")

    session = sub.add_parser("session", help="manage sessions (devices)")
    ssub = session.add_subparsers(dest="session_command", required=True, metavar="ACTION")
    slist = ssub.add_parser("list", help="list active sessions")
    _common(slist)
    slist.add_argument("--user", default="", help="only this username or user id")
    srevoke = ssub.add_parser("revoke", help="revoke a session (its connections close, 4004)")
    _common(srevoke)
    srevoke.add_argument("session_id")

    invite = sub.add_parser("invite", help="manage invite codes")
    isub = invite.add_subparsers(dest="invite_command", required=True, metavar="ACTION")
    icreate = isub.add_parser(
        "create", help="create a single-use invite code (printed as the last word)"
    )
    _common(icreate)
    icreate.add_argument(
        "--ttl-hours", type=_non_negative_int, default=0, help="expiry in hours (0 = never)"
    )

    backup = sub.add_parser(
        "backup", help="online, consistent copy of the database (the server may run)"
    )
    _common(backup)
    backup.add_argument("path", help="new file to write")
    restore = sub.add_parser("restore", help="replace the database with a backup (server stopped)")
    _common(restore)
    restore.add_argument("path", help="a file written by `sovereign backup`")
    mig = sub.add_parser(
        "migrate-to-postgres",
        help="copy a SQLite data directory into an empty PostgreSQL database (server stopped)",
    )
    _common(mig)
    mig.add_argument(
        "--postgres-dsn",
        metavar="DSN",
        required=True,
        help="the target, e.g. postgresql://sovereign@127.0.0.1:5432/sovereign",
    )
    return parser


def _config(args: argparse.Namespace, **extra: Any) -> Config:
    overrides = {
        "data_dir": args.data_dir,
        "log_format": getattr(args, "log_format", None),
        "log_level": getattr(args, "log_level", None),
        **extra,
    }
    return load(args.config, overrides)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    return uvloop.run(coro)


def _err(message: str) -> int:
    print(f"sovereign: error: {message}", file=sys.stderr)
    return 1


def _check_tls(cfg: Config) -> str | None:
    """Load the certificate before anything else starts; the problem, or None."""
    if not cfg.tls_cert:
        return None
    for key in ("tls_cert", "tls_key"):
        path = getattr(cfg, key)
        if not Path(path).is_file():
            return f"{key}: {path!r} does not exist or is not a file"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        return (
            f"tls_cert: cannot load certificate {cfg.tls_cert!r} with key {cfg.tls_key!r} "
            f"({reason}); both must be PEM and the key must match the certificate"
        )
    return None


LOCK_NAME = "sovereign.lock"


def _lock_path(cfg: Config) -> Path:
    return Path(cfg.data_dir) / LOCK_NAME


def _take_lock(cfg: Config) -> int | None:
    """The data dir's lock (an flock held for the server's lifetime), or None if another
    process holds it. The kernel drops it when the process dies, even by SIGKILL."""
    fd = os.open(_lock_path(cfg), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def server_running(cfg: Config) -> bool:
    """True while a ``serve`` process holds DATA_DIR/sovereign.lock."""
    if not _lock_path(cfg).exists():
        return False
    fd = _take_lock(cfg)
    if fd is None:
        return True
    os.close(fd)
    return False


def _write_lock_info(fd: int, info: dict[str, Any]) -> None:
    """Where the running server's admin listener is (the CLI's way to reach it)."""
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_lock_info(cfg: Config) -> dict[str, Any]:
    try:
        info = json.loads(_lock_path(cfg).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def cmd_serve(args: argparse.Namespace) -> int:
    from sovereign import logs

    overrides = {
        "data_dir": args.data_dir,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "listen": args.listen,
        "admin_listen": args.admin_listen,
    }
    cfg, sources = load_with_sources(args.config, overrides)
    logs.setup(cfg.log_format, cfg.log_level)
    problem = _check_tls(cfg)
    if problem is not None:
        return _err(problem)
    if args.workers > 1:
        _check_workers(cfg, args.workers)
    if args.worker_index is not None:
        return _serve_worker(args, cfg, sources)
    for stray in stray_environment():  # once, not again in each worker
        log.warning("%s", stray)
    if args.workers > 1:
        return _supervise(args, cfg)
    try:
        # Importing the server picks the envelope codec; creating the app picks the
        # dispatcher. Either raises ImportError under SOVEREIGN_REQUIRE_FAST=1 when the
        # compiled module is missing: say so in one line, not a traceback.
        from sovereign.server import App, serve

        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        lock = _take_lock(cfg)
        if lock is None:
            return _err(
                f"another server is running on {cfg.data_dir} (it holds {_lock_path(cfg)}); "
                "stop it first"
            )

        def ready(app: App) -> None:
            _write_lock_info(lock, {"pid": os.getpid(), "admin_url": app.admin_url("") or ""})

        try:
            return _run(serve(cfg, ready=ready, sources=sources))
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(lock, 0)
            os.close(lock)
    except ImportError as exc:
        log.debug("start-up failed", exc_info=True)
        return _err(f"cannot start: {exc}")
    except OSError as exc:  # e.g. the port is taken, the data dir is not writable
        log.debug("start-up failed", exc_info=True)
        where = cfg.listen + (f" and admin {cfg.admin_listen}" if cfg.admin_listen else "")
        return _err(f"cannot start on {where}: {exc}")


def _check_workers(cfg: Config, workers: int) -> None:
    """SPEC §12.27: with SQLite, ``--workers`` above 1 is refused at start-up."""
    if cfg.storage != "postgres":
        raise ConfigError(
            f'workers: --workers {workers} needs storage = "postgres" with redis_url; '
            f'storage "{cfg.storage}" is served by one process (docs/scaling.md)'
        )
    if not cfg.redis_url:
        raise ConfigError(
            f"workers: --workers {workers} needs redis_url: the workers exchange live "
            "delivery over Redis (docs/scaling.md)"
        )


def _shared_listen(listen: str) -> str:
    """``--workers`` share one port: port 0 is resolved once, here, to a free port."""
    import socket

    host, _, port = listen.rpartition(":")
    if int(port) != 0:
        return listen
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((bare, 0))
        return f"{host}:{sock.getsockname()[1]}"


def _supervise(args: argparse.Namespace, cfg: Config) -> int:
    """``serve --workers N``: migrate once, then run and watch N workers
    (``sovereign.cluster.supervisor`` states the rules)."""
    from sovereign.cluster.supervisor import Supervisor
    from sovereign.server import migrate

    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    lock = _take_lock(cfg)
    if lock is None:
        return _err(
            f"another server is running on {cfg.data_dir} (it holds {_lock_path(cfg)}); "
            "stop it first"
        )
    try:
        _run(_migrate_once(cfg, migrate))
        try:
            listen = _shared_listen(cfg.listen)
        except OSError as exc:
            return _err(f"cannot start on {cfg.listen}: {exc}")
        _write_lock_info(lock, {"pid": os.getpid(), "admin_url": ""})
        passed: list[str] = []
        for flag, value in (
            ("--config", args.config),
            ("--data-dir", args.data_dir),
            ("--log-format", args.log_format),
            ("--log-level", args.log_level),
        ):
            if value is not None:
                passed += [flag, value]

        def command(index: int) -> list[str]:
            # Rule 2: the admin listener in worker 0 only.
            admin = cfg.admin_listen if index == 0 else ""
            return [
                sys.executable, "-m", "sovereign", "serve", *passed,
                "--listen", listen, "--admin-listen", admin,
                "--workers", str(args.workers), "--worker-index", str(index),
            ]  # fmt: skip

        log.info("supervisor: %d workers sharing %s", args.workers, listen)
        return Supervisor(command, args.workers).run()
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(lock, 0)
        os.close(lock)


async def _migrate_once(cfg: Config, migrate: Callable[[Config], Coroutine[Any, Any, None]]) -> int:
    await migrate(cfg)
    return 0


def _serve_worker(args: argparse.Namespace, cfg: Config, sources: dict[str, str]) -> int:
    """One worker of ``serve --workers``: the supervisor holds the data dir's lock;
    worker 0 records where its admin listener is, for the CLI."""
    from sovereign.server import App, serve

    index = args.worker_index

    def ready(app: App) -> None:
        if index == 0:
            with contextlib.suppress(OSError):
                fd = os.open(_lock_path(cfg), os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    info = {"pid": os.getppid(), "admin_url": app.admin_url("") or ""}
                    _write_lock_info(fd, info)
                finally:
                    os.close(fd)

    try:
        return _run(serve(cfg, ready=ready, sources=sources, reuse_port=True, bootstrap=index == 0))
    except ImportError as exc:
        return _err(f"cannot start: {exc}")
    except OSError as exc:
        return _err(f"worker {index}: cannot start on {cfg.listen}: {exc}")


async def _with_app(cfg: Config, fn: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    from sovereign.server import create_app

    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    fresh = cfg.storage == "sqlite" and not cfg.sqlite_path.exists()
    app = await create_app(cfg)
    if fresh:
        # Said on stderr so a mistyped --data-dir is noticed and stdout stays parseable.
        print(f"initialised a new database at {cfg.sqlite_path}", file=sys.stderr)
    try:
        return await fn(app)
    finally:
        await app.storage.close()


def cmd_user_create(args: argparse.Namespace) -> int:
    from sovereign.errors import SovereignError

    cfg = _config(args)

    async def work(app: Any) -> int:
        try:
            user = await app.auth.create_user(args.username, args.display_name, is_admin=args.admin)
        except SovereignError as exc:
            return _err(f"cannot create user {args.username!r}: {exc.message}")
        role = "admin" if user.is_admin else "user"
        if args.print_token:
            session, token = await app.auth.create_session(user.user_id, None, "cli")
            print(
                f"created {role} {user.username} ({user.user_id}) "
                f"with a session for device {session.device_id}"
            )
            print(f"session token: {token}")
        else:
            print(f"created {role} {user.username} ({user.user_id})")
        return 0

    return _run(_with_app(cfg, work))


def cmd_user_list(args: argparse.Namespace) -> int:
    cfg = _config(args)

    async def work(app: Any) -> int:
        users: list[Any] = []
        page = 500
        while True:
            batch = await app.storage.users.list(search=args.search, offset=len(users), limit=page)
            users.extend(batch)
            if len(batch) < page:
                break
        print(f"{'USER ID':<27} {'USERNAME':<33} {'ADMIN':<6} {'ENABLED':<7} DISPLAY NAME")
        for u in users:
            print(
                f"{u.user_id:<27} {u.username:<33} {'yes' if u.is_admin else 'no':<6} "
                f"{'yes' if u.enabled else 'no':<7} {u.display_name}"
            )
        print(f"{len(users)} user(s)")
        return 0

    return _run(_with_app(cfg, work))


# -- commands that mirror the admin API --------------------------------------------------
#
# With no server on the data dir they run the AdminService in this process, on the
# database. With a server running, the live effects (closing sockets with 4005/4004,
# GROUP_MEMBER_REMOVED to connected members) need that server: the command then calls
# its admin API (the address is in DATA_DIR/sovereign.lock) with an admin session minted
# here for the first enabled admin, valid 5 minutes and revoked right after the call.


class _ApiFailed(Exception):
    pass


def _admin_api(cfg: Config, method: str, path: str, body: Any = None) -> Any:
    import ssl as ssl_mod
    import urllib.error
    import urllib.request

    from sovereign.services import tokens
    from sovereign.storage import open_storage

    base = str(_read_lock_info(cfg).get("admin_url") or "")
    if not base:
        raise _ApiFailed(
            "the running server has no admin listener (admin_listen is off); stop it, or "
            "use the admin panel"
        )

    async def mint() -> tuple[str, str]:
        storage = await open_storage(cfg.sqlite_path, postgres_dsn=cfg.storage_dsn)
        try:
            admins = [u for u in await storage.users.list(limit=100) if u.is_admin and u.enabled]
            if not admins:
                raise _ApiFailed("no admin exists yet: create the first one with the setup URL")
            token = tokens.new_token()
            now = int(time.time() * 1_000_000)
            session = await storage.sessions.create(
                admins[0].user_id,
                tokens.digest(token),
                now + 300_000_000,
                None,
                "cli",
                kind="admin",
            )
            return token, session.session_id
        finally:
            await storage.close()

    async def revoke(session_id: str) -> None:
        storage = await open_storage(cfg.sqlite_path, postgres_dsn=cfg.storage_dsn)
        try:
            await storage.sessions.revoke(session_id, int(time.time() * 1_000_000))
        finally:
            await storage.close()

    token, session_id = _run_any(mint())
    try:
        req = urllib.request.Request(
            base + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        # The lock file names a loopback address this server bound: its own certificate.
        ctx = ssl_mod._create_unverified_context() if base.startswith("https") else None
        try:
            with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}"
            raise _ApiFailed(message) from None
        except OSError as exc:
            raise _ApiFailed(f"cannot reach the running server at {base}: {exc}") from None
        return json.loads(raw) if raw else None
    finally:
        _run_any(revoke(session_id))


def _run_any(coro: Coroutine[Any, Any, Any]) -> Any:
    import uvloop

    return uvloop.run(coro)


async def _find_user(app: Any, who: str) -> Any:
    user = await app.storage.users.get_by_id(who) or await app.storage.users.get_by_username(who)
    if user is None:
        raise _ApiFailed(f"no user {who!r}")
    return user


def _find_user_remote(cfg: Config, who: str) -> dict[str, Any]:
    from urllib.parse import quote

    for u in _admin_api(cfg, "GET", f"/admin/api/users?search={quote(who)}&limit=100")["data"]:
        if who in (u["id"], u["username"]):
            return dict(u)
    try:
        return dict(_admin_api(cfg, "GET", f"/admin/api/users/{quote(who)}"))
    except _ApiFailed:
        raise _ApiFailed(f"no user {who!r}") from None


def _user_action(args: argparse.Namespace, action: str) -> int:
    from urllib.parse import quote

    from sovereign.errors import SovereignError
    from sovereign.services.admin import AdminError

    cfg = _config(args)
    done = {"disable": "disabled", "enable": "enabled", "delete": "deleted"}[action]
    try:
        if server_running(cfg):
            user = _find_user_remote(cfg, args.user)
            path = f"/admin/api/users/{quote(user['id'])}"
            if action == "delete":
                _admin_api(cfg, "DELETE", path)
            else:
                _admin_api(cfg, "PUT", path, {"enabled": action == "enable"})
            print(f"{done} {user['username']} ({user['id']}) on the running server")
            return 0

        async def work(app: Any) -> int:
            user = await _find_user(app, args.user)
            if action == "delete":
                await app.admin.delete_user(user.user_id)
            else:
                await app.admin.update_user(user.user_id, {"enabled": action == "enable"})
            print(f"{done} {user.username} ({user.user_id})")
            return 0

        return _run(_with_app(cfg, work))
    except (_ApiFailed, SovereignError, AdminError) as exc:
        return _err(f"cannot {action} {args.user!r}: {getattr(exc, 'message', exc)}")


def cmd_user_disable(args: argparse.Namespace) -> int:
    return _user_action(args, "disable")


def cmd_user_enable(args: argparse.Namespace) -> int:
    return _user_action(args, "enable")


def cmd_user_delete(args: argparse.Namespace) -> int:
    return _user_action(args, "delete")


def _print_sessions(rows: list[dict[str, Any]]) -> None:
    print(f"{'SESSION ID':<24} {'USER':<33} {'KIND':<7} {'ONLINE':<7} LAST SEEN (UTC)")
    for s in rows:
        seen = time.strftime("%Y-%m-%d %H:%M", time.gmtime(s["last_seen_at"] / 1000))
        online = "yes" if s["online"] else "no"
        print(f"{s['id']:<24} {s['username']:<33} {s['kind']:<7} {online:<7} {seen}")
    print(f"{len(rows)} active session(s)")


def cmd_session_list(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    cfg = _config(args)
    try:
        if server_running(cfg):
            user_q = ""
            if args.user:
                user_q = "&user_id=" + quote(_find_user_remote(cfg, args.user)["id"])
            rows: list[dict[str, Any]] = []
            while True:
                page = _admin_api(
                    cfg, "GET", f"/admin/api/sessions?offset={len(rows)}&limit=100{user_q}"
                )
                rows.extend(page["data"])
                if len(rows) >= page["pagination"]["total"] or not page["data"]:
                    break
            _print_sessions(rows)
            return 0

        async def work(app: Any) -> int:
            user_id = (await _find_user(app, args.user)).user_id if args.user else None
            rows: list[dict[str, Any]] = []
            while True:
                page = await app.admin.list_sessions(user_id, len(rows), 100)
                rows.extend(page.data)
                if len(rows) >= page.total or not page.data:
                    break
            _print_sessions(rows)
            return 0

        return _run(_with_app(cfg, work))
    except _ApiFailed as exc:
        return _err(f"cannot list sessions: {exc}")


def cmd_session_revoke(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from sovereign.services.admin import AdminError

    cfg = _config(args)
    try:
        if server_running(cfg):
            _admin_api(cfg, "DELETE", f"/admin/api/sessions/{quote(args.session_id)}")
            print(f"revoked session {args.session_id} on the running server")
            return 0

        async def work(app: Any) -> int:
            await app.admin.revoke_session(args.session_id)
            print(f"revoked session {args.session_id}")
            return 0

        return _run(_with_app(cfg, work))
    except (_ApiFailed, AdminError) as exc:
        return _err(f"cannot revoke session {args.session_id!r}: {getattr(exc, 'message', exc)}")


def cmd_invite_create(args: argparse.Namespace) -> int:
    cfg = _config(args)

    async def work(app: Any) -> int:
        code = await app.auth.create_invite(None, args.ttl_hours)
        expiry = f"expires in {args.ttl_hours} h" if args.ttl_hours else "no expiry"
        print(f"single-use invite code ({expiry}): {code}")
        return 0

    return _run(_with_app(cfg, work))


def cmd_backup(args: argparse.Namespace) -> int:
    from sovereign.storage import StorageError

    cfg = _config(args)
    if cfg.storage == "postgres":
        return _err(_pg_howto("backup"))
    dest = Path(args.path).resolve()
    if dest.exists():
        return _err(f"{dest} already exists; choose a new path")

    report = _progress("backup")

    async def work(app: Any) -> int:
        try:
            await app.storage.db.backup(dest, report if sys.stderr.isatty() else None)
            report(1, 1, end=True)
        except (StorageError, OSError, ValueError) as exc:
            return _err(f"backup to {dest} failed: {exc}")
        print(f"backup of {cfg.sqlite_path} written to {dest} ({dest.stat().st_size} bytes)")
        return 0

    return _run(_with_app(cfg, work))


class _Progress:
    """``done/total`` as a percentage on one terminal line (stderr); silent when stderr
    is not a terminal, so scripts and logs stay clean."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.tty = sys.stderr.isatty()
        self.last = -1

    def __call__(self, done: int, total: int, *, end: bool = False) -> None:
        if not self.tty:
            return
        pct = 100 if total <= 0 else min(100, done * 100 // total)
        if pct != self.last or end:
            self.last = pct
            sys.stderr.write(f"\r{self.what}: {pct:3d}%")
            if end:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _progress(what: str) -> _Progress:
    return _Progress(what)


def _pg_howto(command: str) -> str:
    from sovereign.storage.postgres import BACKUP_HOWTO

    return f"sovereign {command} works on SQLite data directories only. " + BACKUP_HOWTO


def _sidecars(db: Path) -> list[Path]:
    return [Path(str(db) + suffix) for suffix in ("-wal", "-shm", "-journal")]


def _looks_like_backup(src: Path) -> str | None:
    """Why ``src`` is not a Sovereign backup, or None if it looks like one."""
    if not src.is_file():
        return f"{src} does not exist or is not a file"
    try:
        conn = sqlite3.connect(f"{src.resolve().as_uri()}?mode=ro", uri=True)
        try:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                return f"{src} fails the integrity check ({check})"
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if not {"schema_version", "users"} <= tables:
                return f"{src} is not a Sovereign backup (no Sovereign schema in it)"
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"{src} is not a Sovereign backup ({exc})"
    return None


def cmd_restore(args: argparse.Namespace) -> int:
    from sovereign.storage import StorageError, open_storage

    cfg = _config(args)
    if cfg.storage == "postgres":
        return _err(_pg_howto("restore"))
    src = Path(args.path)
    db = cfg.sqlite_path
    if server_running(cfg):
        return _err(
            f"a server is running on {cfg.data_dir} (it holds {_lock_path(cfg)}); stop it "
            "before restoring: a restore replaces the database under it"
        )
    problem = _looks_like_backup(src)
    if problem is not None:
        return _err(problem)
    if src.resolve() == db.resolve():
        return _err(f"{src} is the live database; restore a backup file")
    db.parent.mkdir(parents=True, exist_ok=True)
    # Work on a copy beside the database: open it once (which migrates it to this
    # version, or refuses a newer schema), then swap it in with one rename.
    staging = db.with_name(db.name + ".restoring")
    for p in (staging, *_sidecars(staging)):
        p.unlink(missing_ok=True)
    total = src.stat().st_size
    report = _progress("restore")
    with open(src, "rb") as fin, open(staging, "wb") as fout:
        done = 0
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
            done += len(chunk)
            report(done, total)
        fout.flush()
        os.fsync(fout.fileno())
    report(total, total, end=True)

    async def check() -> int:
        storage = await open_storage(staging)
        try:
            return int(await storage.users.count())
        finally:
            await storage.close()

    try:
        n_users = _run(check())
    except StorageError as exc:
        for p in (staging, *_sidecars(staging)):
            p.unlink(missing_ok=True)
        return _err(f"cannot restore {src}: {exc}")
    if db.exists():
        # Keep the old database (with any WAL it still has) under one new name.
        aside = db.with_name(f"{db.name}.before-restore-{int(time.time())}")
        for old, new in zip((db, *_sidecars(db)), (aside, *_sidecars(aside)), strict=True):
            if old.exists():
                old.rename(new)
        print(f"moved the current database aside to {aside}")
    for p in _sidecars(db):
        p.unlink(missing_ok=True)
    staging.replace(db)
    for p in _sidecars(staging):
        p.unlink(missing_ok=True)
    print(f"restored {src} into {db} ({n_users} user(s)); start the server to use it")
    return 0


def cmd_migrate_to_postgres(args: argparse.Namespace) -> int:
    from sovereign.storage.migrate import MigrateError, copy_to_postgres

    cfg = _config(args)
    if server_running(cfg):
        return _err(
            f"a server is running on {cfg.data_dir} (it holds {_lock_path(cfg)}); stop it "
            "first: writes made during the copy would be lost"
        )

    def say(line: str) -> None:
        print(line, flush=True)

    async def work() -> int:
        try:
            copied = await copy_to_postgres(cfg.sqlite_path, args.postgres_dsn, say)
        except MigrateError as exc:
            return _err(f"migrate-to-postgres: {exc}")
        total = sum(copied.values())
        print(f"done: {total} rows in {len(copied)} tables copied and verified.")
        print(
            "Now set, in sovereign.toml (or SOVEREIGN_STORAGE / SOVEREIGN_POSTGRES_DSN):\n"
            '  storage = "postgres"\n'
            '  postgres_dsn = "<the DSN you passed>"\n'
            f"and start the server. {cfg.sqlite_path} is left as it was: keep it as a backup."
        )
        return 0

    return _run(work())


def _ask(prompt: str, default: str, assume_yes: bool) -> str:
    if assume_yes or not sys.stdin.isatty():
        return default
    answer = input(f"{prompt} [{default}]: ").strip()
    return answer or default


def cmd_setup(args: argparse.Namespace) -> int:
    from sovereign.storage import open_storage

    data_dir = Path(args.data_dir or os.environ.get("SOVEREIGN_DATA_DIR") or "./data")
    target = Path(args.config) if args.config else data_dir / "sovereign.toml"
    if target.exists() and not args.force:
        return _err(f"{target} exists; pass --force to overwrite it")
    y = args.yes
    server_name = args.server_name or _ask("Server name", "Sovereign", y)
    rp_id = args.rp_id or _ask(
        "Domain people use to reach the server (WebAuthn rp_id)", "localhost", y
    )
    listen = args.listen or _ask("Listen on", "0.0.0.0:8080", y)
    default_origin = (
        f"http://localhost:{listen.rpartition(':')[2]}"
        if rp_id == "localhost"
        else f"https://{rp_id}"
    )
    origins = args.rp_origin or [
        o.strip() for o in _ask("Allowed origins (comma-separated)", default_origin, y).split(",")
    ]
    registration = args.registration or _ask("Registration (open/invite/closed)", "invite", y)
    try:
        cfg = load(
            None,
            {
                "data_dir": str(data_dir),
                "server_name": server_name,
                "rp_id": rp_id,
                "rp_name": server_name,
                "rp_origins": origins,
                "listen": listen,
                "registration": registration,
            },
            environ={},
        )
    except ConfigError as exc:
        print(f"sovereign: configuration error: {exc}", file=sys.stderr)
        return 2
    data_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = dump_toml(cfg).replace(f'data_dir = "{data_dir}"\n', "")
    target.write_text(
        "# Written by `sovereign setup`. Every key can be overridden by\n"
        "# SOVEREIGN_<KEY> in the environment or a flag.\n" + text
    )
    print(f"wrote {target} (rp_id {cfg.rp_id}, registration {cfg.registration})")

    async def init_db() -> int:
        storage = await open_storage(
            cfg.sqlite_path,
            postgres_dsn=cfg.storage_dsn,
            max_batch=cfg.group_commit_max_batch,
        )
        await storage.close()
        return 0

    _run(init_db())
    print(f"database ready at {cfg.sqlite_path}")
    config_flag = f" --config {target}" if args.config else ""
    print(f"next: sovereign serve --data-dir {data_dir}{config_flag}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from sovereign.storage import StorageError

    parser = build_parser()
    args = parser.parse_args(argv)
    handlers: dict[tuple[str, str | None], Callable[[argparse.Namespace], int]] = {
        ("serve", None): cmd_serve,
        ("setup", None): cmd_setup,
        ("user", "create"): cmd_user_create,
        ("user", "list"): cmd_user_list,
        ("user", "disable"): cmd_user_disable,
        ("user", "enable"): cmd_user_enable,
        ("user", "delete"): cmd_user_delete,
        ("session", "list"): cmd_session_list,
        ("session", "revoke"): cmd_session_revoke,
        ("invite", "create"): cmd_invite_create,
        ("backup", None): cmd_backup,
        ("restore", None): cmd_restore,
        ("migrate-to-postgres", None): cmd_migrate_to_postgres,
    }
    action = (
        getattr(args, "user_command", None)
        or getattr(args, "invite_command", None)
        or getattr(args, "session_command", None)
    )
    try:
        return handlers[(args.command, action)](args)
    except ConfigError as exc:
        print(f"sovereign: configuration error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:  # e.g. a database newer than this version
        return _err(f"database: {exc}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
