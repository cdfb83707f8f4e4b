"""The ``sovereign`` command line, each subcommand in a real subprocess against a real
data directory, and what it leaves behind checked through a real server process over
real WebSocket connections (SPEC §11, §12.21)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest

from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import pg
from tests.helpers.flows import login, register, resume
from tests.helpers.server import run_cli
from tests.helpers.wsclient import WsClient
from tests.integration.test_process import Server

# Every server here is a child process (conftest: one loop under SOVEREIGN_TEST_LOOP=both).
pytestmark = pytest.mark.server_in_subprocess


async def cli(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> Result:
    """``sovereign ARGS --data-dir DIR`` in a subprocess (off the event loop)."""
    proc = await asyncio.to_thread(run_cli, *args, "--data-dir", str(data_dir), env=env)
    return Result(proc)


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    @property
    def last_word(self) -> str:
        return self.out.split()[-1]

    def __repr__(self) -> str:
        return f"<rc={self.rc} stdout={self.out!r} stderr={self.err!r}>"


@asynccontextmanager
async def serving(data_dir: Path, env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """A real ``sovereign serve`` on ``data_dir``; yields its ws:// URL."""
    srv = Server(data_dir, env)
    try:
        await srv.start()
        yield srv.url
    finally:
        srv.close()


def user_rows(listing: str) -> dict[str, list[str]]:
    """``user list`` output -> {username: [user_id, admin, enabled, display name]}."""
    rows: dict[str, list[str]] = {}
    for line in listing.splitlines()[1:-1]:
        user_id, username, admin, enabled, display = line.split(maxsplit=4)
        rows[username] = [user_id, admin, enabled, display]
    return rows


# -- user create / user list ---------------------------------------------------------


async def test_user_create_and_list(tmp_path: Path) -> None:
    d = tmp_path / "data"
    r = await cli("user", "create", "alice", data_dir=d)
    assert r.rc == 0, r
    assert r.out.startswith("created user alice ("), r
    if pg.STORAGE == "sqlite":
        assert "initialised a new database" in r.err  # the first command creates the database
        assert (d / "sovereign.db").is_file()

    r = await cli("user", "create", "bob", "--admin", "--display-name", "Bob Builder", data_dir=d)
    assert r.rc == 0 and r.out.startswith("created admin bob ("), r
    assert r.err == ""  # nothing to say about an existing database

    r = await cli("user", "list", data_dir=d)
    assert r.rc == 0, r
    rows = user_rows(r.out)
    assert rows["alice"][1:] == ["no", "yes", "alice"]
    assert rows["bob"][1:] == ["yes", "yes", "Bob Builder"]
    assert len(rows["alice"][0]) == 26
    assert r.out.splitlines()[-1] == "2 user(s)"

    r = await cli("user", "list", "--search", "build", data_dir=d)
    assert list(user_rows(r.out)) == ["bob"], r


async def test_duplicate_username_fails_clearly(tmp_path: Path) -> None:
    d = tmp_path / "data"
    assert (await cli("user", "create", "alice", data_dir=d)).rc == 0
    for name in ("alice", "ALICE"):  # usernames are unique case-insensitively
        r = await cli("user", "create", name, data_dir=d)
        assert r.rc != 0, r
        assert r.out == "", r
        assert r.err.count("\n") == 1 and name in r.err and "taken" in r.err, r
        assert "Traceback" not in r.err
    r = await cli("user", "create", "not a name", data_dir=d)
    assert r.rc != 0 and "username must be" in r.err, r
    assert user_rows((await cli("user", "list", data_dir=d)).out).keys() == {"alice"}


async def test_printed_token_resumes_against_a_later_server(tmp_path: Path) -> None:
    d = tmp_path / "data"
    r = await cli("user", "create", "botty", "--print-token", data_dir=d)
    assert r.rc == 0, r
    token = r.last_word
    assert r.out.splitlines()[-1] == f"session token: {token}"
    assert len(token) == 43  # 32 bytes, base64url without padding
    user_id = user_rows((await cli("user", "list", data_dir=d)).out)["botty"][0]

    async with serving(d) as url:
        c = await WsClient.connect(url)
        ok = await resume(c, token)
        assert (ok.user_id, ok.username, ok.is_admin) == (user_id, "botty", False)
        assert ok.session_token == token  # the same device: no new token
        await c.close()
        # A second connection with the same token is the same device, also READY.
        c2 = await WsClient.connect(url)
        assert (await resume(c2, token)).user_id == user_id
        await c2.close()


async def test_print_token_for_an_admin(tmp_path: Path) -> None:
    d = tmp_path / "data"
    r = await cli("user", "create", "root", "--admin", "--print-token", data_dir=d)
    assert r.rc == 0 and r.out.startswith("created admin root"), r
    async with serving(d) as url:
        c = await WsClient.connect(url)
        ok = await resume(c, r.last_word)
        assert ok.username == "root" and ok.is_admin
        await c.close()


# -- invite create --------------------------------------------------------------------


async def test_invite_code_registers_once(tmp_path: Path) -> None:
    d = tmp_path / "data"
    r = await cli("invite", "create", data_dir=d)
    assert r.rc == 0, r
    code = r.last_word
    assert len(code) >= 16 and code not in r.err
    r2 = await cli("invite", "create", "--ttl-hours", "24", data_dir=d)
    assert r2.rc == 0 and "24 h" in r2.out and r2.last_word != code, r2

    async with serving(d, {"SOVEREIGN_REGISTRATION": "invite"}) as url:
        c = await WsClient.connect(url)
        # invite policy: no code, no account
        err_code, err = await c.error(T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="x"))
        assert err_code == 1003 and "invite" in err.message
        acct = await register(c, "carol", invite_code=code)
        assert len(acct.user_id) == 26
        await c.close()

        c2 = await WsClient.connect(url)
        err_code, _ = await c2.error(
            T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="dave", invite_code=code)
        )
        assert err_code == 1003  # single use
        await register(c2, "dave", invite_code=r2.last_word)  # the other code still works
        await c2.close()

    assert user_rows((await cli("user", "list", data_dir=d)).out).keys() == {"carol", "dave"}


async def test_invite_ttl_must_not_be_negative(tmp_path: Path) -> None:
    r = await cli("invite", "create", "--ttl-hours", "-1", data_dir=tmp_path / "data")
    assert r.rc == 2 and "--ttl-hours" in r.err and r.out == "", r


# -- backup / restore ------------------------------------------------------------------


@pg.sqlite_only("sovereign backup/restore copy SQLite files")
async def test_online_backup_then_restore_into_a_fresh_data_dir(tmp_path: Path) -> None:
    src, dst = tmp_path / "live", tmp_path / "restored"
    backup = tmp_path / "backups" / "sovereign-backup.db"
    r = await cli("user", "create", "bot", "--print-token", data_dir=src)
    bot_token = r.last_word

    async with serving(src) as url:
        # Written by the running server (sits in its WAL), then backed up while it runs.
        c = await WsClient.connect(url)
        alice = await register(c, "alice")
        r = await cli("backup", str(backup), data_dir=src)
        assert r.rc == 0, r
        assert str(backup) in r.out and "bytes" in r.out
        # The server is unaffected by the backup.
        # READY: the server may push (e.g. SYNC_COMPLETE) before the PONG.
        rid = c.send(T.PING, pb.Ping(timestamp=7))
        pong = await c.wait_for(T.PONG, rid)
        assert pong.timestamp == 7
        await c.close()
        # An existing file is never overwritten.
        again = await cli("backup", str(backup), data_dir=src)
        assert again.rc != 0 and "exists" in again.err, again

    # One self-contained file: no WAL needed to read it.
    assert not Path(str(backup) + "-wal").exists()
    with sqlite3.connect(f"file:{backup}?mode=ro", uri=True) as conn:
        names = {row[0] for row in conn.execute("SELECT username FROM users")}
    conn.close()
    assert names == {"alice", "bot"}

    r = await cli("restore", str(backup), data_dir=dst)
    assert r.rc == 0, r
    assert "2 user(s)" in r.out
    assert user_rows((await cli("user", "list", data_dir=dst)).out).keys() == {"alice", "bot"}

    async with serving(dst) as url:
        # The passkey registered on the old server logs in on the restored one...
        c = await WsClient.connect(url)
        ok = await login(c, alice)
        assert (ok.user_id, ok.username) == (alice.user_id, "alice")
        await c.close()
        # ...and both sessions survive.
        for token, name in ((alice.token, "alice"), (bot_token, "bot")):
            c = await WsClient.connect(url)
            assert (await resume(c, token)).username == name
            await c.close()


@pg.sqlite_only("sovereign backup/restore copy SQLite files")
async def test_restore_over_an_existing_database_keeps_the_old_one_aside(
    tmp_path: Path,
) -> None:
    d = tmp_path / "data"
    backup = tmp_path / "b.db"
    await cli("user", "create", "old", data_dir=d)
    assert (await cli("backup", str(backup), data_dir=d)).rc == 0
    await cli("user", "create", "newer", data_dir=d)

    r = await cli("restore", str(backup), data_dir=d)
    assert r.rc == 0 and "aside" in r.out, r
    assert user_rows((await cli("user", "list", data_dir=d)).out).keys() == {"old"}
    asides = list(d.glob("sovereign.db.before-restore-*"))
    assert len(asides) == 1 and not asides[0].name.endswith(("-wal", "-shm"))
    with sqlite3.connect(f"file:{asides[0]}?mode=ro", uri=True) as conn:
        names = {row[0] for row in conn.execute("SELECT username FROM users")}
    conn.close()
    assert names == {"old", "newer"}


@pg.sqlite_only("sovereign backup/restore copy SQLite files")
async def test_restore_refuses_what_is_not_a_backup(tmp_path: Path) -> None:
    d = tmp_path / "data"
    await cli("user", "create", "keeper", data_dir=d)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all\n" * 100)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (a)")
    conn.commit()
    conn.close()

    for bad, why in (
        (junk, "not a Sovereign backup"),
        (other, "not a Sovereign backup"),
        (tmp_path / "missing.db", "does not exist"),
        (d / "sovereign.db", "live database"),
    ):
        r = await cli("restore", str(bad), data_dir=d)
        assert r.rc != 0, (bad, r)
        assert why in r.err and r.err.count("\n") == 1, (bad, r)
        assert "Traceback" not in r.err
    # Nothing was touched.
    assert user_rows((await cli("user", "list", data_dir=d)).out).keys() == {"keeper"}
    assert sorted(p.name for p in d.iterdir() if "restor" in p.name) == []


# -- setup ----------------------------------------------------------------------------


async def test_setup_writes_a_config_that_serve_uses(tmp_path: Path) -> None:
    d = tmp_path / "data"
    r = await cli(
        "setup", "--yes", "--rp-id", "chat.example", "--registration", "invite", data_dir=d
    )
    assert r.rc == 0, r
    toml = d / "sovereign.toml"
    assert str(toml) in r.out and (d / "sovereign.db").is_file()
    text = toml.read_text()
    assert 'rp_id = "chat.example"' in text and 'registration = "invite"' in text
    assert 'rp_origins = ["https://chat.example"]' in text
    assert "data_dir" not in text  # the file lives in the data dir it would name

    # serve reads DATA_DIR/sovereign.toml: invite-only, relying party chat.example.
    srv = Server(d, pin_rp=False)  # the file decides rp_id and origins
    try:
        await srv.start()
        c = await WsClient.connect(srv.url, origin="https://chat.example")
        code, err = await c.error(T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="x"))
        assert code == 1003 and "invite code is required" in err.message
        invite = (await cli("invite", "create", data_dir=d)).last_word
        challenge = await c.request(
            T.AUTH_REGISTER_REQUEST,
            pb.AuthRegisterRequest(username="x", invite_code=invite),
            T.AUTH_REGISTER_CHALLENGE,
        )
        assert orjson.loads(challenge.credential_creation_options)["rp"]["id"] == "chat.example"
        await c.close()
    finally:
        srv.close()

    # Never silently overwritten...
    before = toml.read_text()
    r = await cli("setup", "--yes", "--registration", "open", data_dir=d)
    assert r.rc != 0 and "--force" in r.err and r.err.count("\n") == 1, r
    assert toml.read_text() == before
    # ...unless asked to.
    r = await cli("setup", "--yes", "--registration", "open", "--force", data_dir=d)
    assert r.rc == 0, r
    assert 'registration = "open"' in toml.read_text()


async def test_setup_rejects_a_bad_answer(tmp_path: Path) -> None:
    d = tmp_path / "data"
    r = await cli("setup", "--yes", "--listen", "nowhere", data_dir=d)
    assert r.rc != 0 and "listen" in r.err and r.err.count("\n") == 1, r
    assert not (d / "sovereign.toml").exists()


# -- configuration errors ------------------------------------------------------------


SERVE = [sys.executable, "-m", "sovereign", "serve"]


def serve_fails(data_dir: Path, env: dict[str, str], *extra: str) -> Result:
    proc = subprocess.run(
        [
            *SERVE,
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=15,
    )
    return Result(proc)


@pytest.mark.parametrize(
    ("env", "key", "allowed"),
    [
        ({"SOVEREIGN_AUTH_TIMEOUT": "soon"}, "auth_timeout", "number"),
        ({"SOVEREIGN_REGISTRATION": "maybe"}, "registration", "open, invite, closed"),
        ({"SOVEREIGN_MAX_FRAME_BYTES": "-5"}, "max_frame_bytes", "greater than 0"),
    ],
)
async def test_bad_config_value_stops_serve_with_one_line(
    tmp_path: Path, env: dict[str, str], key: str, allowed: str
) -> None:
    r = await asyncio.to_thread(serve_fails, tmp_path / "data", env)
    assert r.rc != 0, r
    lines = [line for line in (r.out + r.err).splitlines() if line.strip()]
    assert len(lines) == 1, r
    assert key in lines[0] and allowed in lines[0], r
    assert "listening" not in r.out + r.err


async def test_bad_value_in_config_file_and_flag(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    (d / "sovereign.toml").write_text('idle_timeout = "later"\n')
    r = await asyncio.to_thread(serve_fails, d, {})
    assert r.rc != 0 and len((r.out + r.err).strip().splitlines()) == 1, r
    assert "idle_timeout" in r.err
    (d / "sovereign.toml").write_text("no_such_key = 1\n")
    r = await asyncio.to_thread(serve_fails, d, {})
    assert r.rc != 0 and "no_such_key" in r.err and r.err.count("\n") == 1, r
    (d / "sovereign.toml").unlink()
    r = await asyncio.to_thread(serve_fails, d, {}, "--admin-listen", "localhost")
    assert r.rc != 0 and "admin_listen" in r.err and r.err.count("\n") == 1, r


# -- data dir from the environment, --help ----------------------------------------------


async def test_data_dir_from_environment(tmp_path: Path) -> None:
    d = tmp_path / "envdata"
    proc = await asyncio.to_thread(
        run_cli, "user", "create", "envy", env={"SOVEREIGN_DATA_DIR": str(d)}
    )
    assert proc.returncode == 0, proc
    assert user_rows((await cli("user", "list", data_dir=d)).out).keys() == {"envy"}


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["setup"],
        ["user"],
        ["user", "create"],
        ["user", "list"],
        ["invite"],
        ["invite", "create"],
        ["backup"],
        ["restore"],
    ],
    ids=lambda c: " ".join(c) or "sovereign",
)
def test_help(command: list[str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sovereign", *command, "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
    )
    assert proc.returncode == 0, proc
    assert proc.stdout.startswith(f"usage: {' '.join(['sovereign', *command])}"), proc.stdout
    assert proc.stderr == ""
    if command in (["user"], ["invite"]):
        assert "create" in proc.stdout
    elif command:
        assert "--data-dir" in proc.stdout  # every subcommand takes it (SPEC §12.21)
    assert list(tmp_path.iterdir()) == []  # --help creates no ./data
