"""``sovereign`` command line (SPEC §11, §12.21).

Every subcommand takes ``--data-dir`` and ``--config`` after the subcommand and
initialises or migrates the data directory as needed. Secrets that a command prints
(tokens, invite codes) are the last whitespace-separated word of its output; errors
are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
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
from sovereign.config import Config, ConfigError, dump_toml, load

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
        "--admin-listen", metavar="HOST:PORT", help="admin listener (not available yet)"
    )

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


def cmd_serve(args: argparse.Namespace) -> int:
    from sovereign import logs

    cfg = _config(args, listen=args.listen, admin_listen=args.admin_listen)
    logs.setup(cfg.log_format, cfg.log_level)
    problem = _check_tls(cfg)
    if problem is not None:
        return _err(problem)
    try:
        # Importing the server picks the envelope codec; creating the app picks the
        # dispatcher. Either raises ImportError under SOVEREIGN_REQUIRE_FAST=1 when the
        # compiled module is missing: say so in one line, not a traceback.
        from sovereign.server import serve

        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        return _run(serve(cfg))
    except ImportError as exc:
        log.debug("start-up failed", exc_info=True)
        return _err(f"cannot start: {exc}")
    except OSError as exc:  # e.g. the port is taken, the data dir is not writable
        log.debug("start-up failed", exc_info=True)
        return _err(f"cannot start on {cfg.listen}: {exc}")


async def _with_app(cfg: Config, fn: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    from sovereign.server import create_app

    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    fresh = not cfg.sqlite_path.exists()
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
    dest = Path(args.path).resolve()
    if dest.exists():
        return _err(f"{dest} already exists; choose a new path")

    async def work(app: Any) -> int:
        try:
            await app.storage.db.backup(dest)
        except (StorageError, OSError, ValueError) as exc:
            return _err(f"backup to {dest} failed: {exc}")
        print(f"backup of {cfg.sqlite_path} written to {dest} ({dest.stat().st_size} bytes)")
        return 0

    return _run(_with_app(cfg, work))


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
    src = Path(args.path)
    db = cfg.sqlite_path
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
    with open(src, "rb") as fin, open(staging, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())

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
        storage = await open_storage(cfg.sqlite_path, max_batch=cfg.group_commit_max_batch)
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
        ("invite", "create"): cmd_invite_create,
        ("backup", None): cmd_backup,
        ("restore", None): cmd_restore,
    }
    action = getattr(args, "user_command", None) or getattr(args, "invite_command", None)
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
