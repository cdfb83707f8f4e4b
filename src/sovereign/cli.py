"""``sovereign`` command line (SPEC §11, §12.21).

Every subcommand takes ``--data-dir`` and ``--config`` after the subcommand and
initialises or migrates the data directory as needed. Secrets that a command prints
(tokens, invite codes) are the last whitespace-separated word of its output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from sovereign import __version__
from sovereign.config import Config, ConfigError, dump_toml, load


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--data-dir", metavar="DIR", help="data directory (default ./data)")
    p.add_argument("--log-format", choices=["text", "json"], help="log line format")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovereign", description="Sovereign: self-hosted end-to-end-encrypted messaging."
    )
    parser.add_argument("--version", action="version", version=f"sovereign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server")
    _common(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="WebSocket listener (0.0.0.0:8080)")
    serve.add_argument("--admin-listen", metavar="HOST:PORT", help="admin listener")

    setup = sub.add_parser("setup", help="first-run wizard: writes DATA_DIR/sovereign.toml")
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
        "--print-token", action="store_true", help="create a session (device) and print its token"
    )
    ulist = usub.add_parser("list", help="list users")
    _common(ulist)
    ulist.add_argument("--search", default="")

    invite = sub.add_parser("invite", help="manage invite codes")
    isub = invite.add_subparsers(dest="invite_command", required=True, metavar="ACTION")
    icreate = isub.add_parser("create", help="create a single-use invite code")
    _common(icreate)
    icreate.add_argument("--ttl-hours", type=int, default=0, help="expiry (0 = never)")

    backup = sub.add_parser("backup", help="online, consistent copy of the database")
    _common(backup)
    backup.add_argument("path")
    restore = sub.add_parser("restore", help="replace the database with a backup (server stopped)")
    _common(restore)
    restore.add_argument("path")
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


def cmd_serve(args: argparse.Namespace) -> int:
    from sovereign import logs
    from sovereign.server import serve

    cfg = _config(args, listen=args.listen, admin_listen=args.admin_listen)
    logs.setup(cfg.log_format, cfg.log_level)
    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    return _run(serve(cfg))


async def _with_app(cfg: Config, fn: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    from sovereign.server import create_app

    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    app = await create_app(cfg)
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
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        role = "admin" if user.is_admin else "user"
        if args.print_token:
            session, token = await app.auth.create_session(user.user_id, None, "cli")
            print(f"created {role} {user.username} ({user.user_id}) device {session.device_id}")
            print(f"session token: {token}")
        else:
            print(f"created {role} {user.username} ({user.user_id})")
        return 0

    return _run(_with_app(cfg, work))


def cmd_user_list(args: argparse.Namespace) -> int:
    cfg = _config(args)

    async def work(app: Any) -> int:
        users = await app.storage.users.list(search=args.search, offset=0, limit=1000)
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
    cfg = _config(args)
    dest = Path(args.path).resolve()
    if dest.exists():
        print(f"error: {dest} already exists; choose a new path", file=sys.stderr)
        return 1

    async def work(app: Any) -> int:
        await app.storage.db.backup(dest)
        print(f"backup written to {dest} ({dest.stat().st_size} bytes)")
        return 0

    return _run(_with_app(cfg, work))


def cmd_restore(args: argparse.Namespace) -> int:
    cfg = _config(args)
    src = Path(args.path)
    try:
        with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as conn:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            conn.execute("SELECT version FROM schema_version").fetchall()
        conn.close()
    except sqlite3.Error as exc:
        print(f"error: {src} is not a Sovereign backup ({exc})", file=sys.stderr)
        return 1
    if not ok:
        print(f"error: {src} fails the integrity check", file=sys.stderr)
        return 1
    db = cfg.sqlite_path
    db.parent.mkdir(parents=True, exist_ok=True)
    if db.exists():
        aside = db.with_name(f"sovereign.db.before-restore-{int(time.time())}")
        db.rename(aside)
        print(f"moved the current database aside to {aside}")
    for suffix in ("-wal", "-shm"):
        side = Path(str(db) + suffix)
        if side.exists():
            side.unlink()
    shutil.copyfile(src, db)
    print(f"restored {src} into {db}; start the server to use it")
    return 0


def _ask(prompt: str, default: str, assume_yes: bool) -> str:
    if assume_yes or not sys.stdin.isatty():
        return default
    answer = input(f"{prompt} [{default}]: ").strip()
    return answer or default


def cmd_setup(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir or os.environ.get("SOVEREIGN_DATA_DIR") or "./data")
    target = data_dir / "sovereign.toml"
    if target.exists() and not args.force:
        print(f"error: {target} exists; pass --force to overwrite", file=sys.stderr)
        return 1
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data_dir.mkdir(parents=True, exist_ok=True)
    text = dump_toml(cfg).replace(f'data_dir = "{data_dir}"\n', "")
    target.write_text(
        "# Written by `sovereign setup`. Every key can be overridden by\n"
        "# SOVEREIGN_<KEY> in the environment or a flag.\n" + text
    )
    print(f"wrote {target}")
    print(f"next: sovereign serve --data-dir {data_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
