"""Operator commands that mirror the admin API (``user disable|enable|delete``,
``session list|revoke``), the data dir lock, and backup/restore progress — real
subprocesses against a real data directory, with and without a running server."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import pg
from tests.helpers.flows import register, resume
from tests.helpers.wsclient import WsClient
from tests.integration.test_cli import cli, serving
from tests.integration.test_process import Server

# Every server here is a child process (conftest: one loop under SOVEREIGN_TEST_LOOP=both).
pytestmark = pytest.mark.server_in_subprocess


async def _token(d: Path, name: str) -> str:
    r = await cli("user", "create", name, "--print-token", data_dir=d)
    assert r.rc == 0, r
    return r.last_word


async def test_user_and_session_commands_without_a_server(tmp_path: Path) -> None:
    d = tmp_path / "data"
    await _token(d, "bob")
    r = await cli("user", "disable", "bob", data_dir=d)
    assert r.rc == 0 and r.out.startswith("disabled bob ("), r
    r = await cli("user", "list", data_dir=d)
    assert " no " in r.out.splitlines()[1], r  # ENABLED column
    r = await cli("user", "enable", "bob", data_dir=d)
    assert r.rc == 0 and r.out.startswith("enabled bob"), r
    r = await cli("session", "list", "--user", "bob", data_dir=d)
    assert r.rc == 0 and r.out.strip().endswith("1 active session(s)"), r
    session_id = r.out.splitlines()[1].split()[0]
    r = await cli("session", "revoke", session_id, data_dir=d)
    assert r.rc == 0 and session_id in r.out, r
    r = await cli("session", "list", data_dir=d)
    assert r.out.strip().endswith("0 active session(s)"), r
    r = await cli("session", "revoke", "nope", data_dir=d)
    assert r.rc == 1 and "no such session" in r.err and r.err.count("\n") == 1, r
    r = await cli("user", "delete", "bob", data_dir=d)
    assert r.rc == 0 and r.out.startswith("deleted bob"), r
    r = await cli("user", "disable", "bob", data_dir=d)
    assert r.rc == 1 and "no user 'bob'" in r.err, r
    # The last admin is kept, as by the API.
    await cli("user", "create", "root", "--admin", data_dir=d)
    r = await cli("user", "delete", "root", data_dir=d)
    assert r.rc == 1 and "last admin" in r.err, r


async def test_commands_reach_the_running_server_for_live_effects(tmp_path: Path) -> None:
    d = tmp_path / "data"
    await cli("user", "create", "root", "--admin", data_dir=d)
    bob_token = await _token(d, "bob")
    async with serving(d) as url:
        c = await WsClient.connect(url)
        await resume(c, bob_token)
        r = await cli("user", "disable", "bob", data_dir=d)
        assert r.rc == 0 and "on the running server" in r.out, r
        assert await c.closed(1.0) == 4005
        r = await cli("user", "enable", "bob", data_dir=d)
        assert r.rc == 0, r
        c = await WsClient.connect(url)
        await resume(c, bob_token)
        r = await cli("session", "list", "--user", "bob", data_dir=d)
        assert r.rc == 0 and " yes " in r.out, r  # online
        session_id = r.out.splitlines()[1].split()[0]
        r = await cli("session", "revoke", session_id, data_dir=d)
        assert r.rc == 0, r
        assert await c.closed(1.0) == 4004
        # Delete: connected members hear GROUP_MEMBER_REMOVED from the server itself.
        ca, cc = await WsClient.connect(url), await WsClient.connect(url)
        await register(ca, "alice")
        carol = await register(cc, "carol")
        await ca.request(
            T.GROUP_CREATE, pb.GroupCreate(title="g", member_ids=[carol.user_id]), T.GROUP_CREATED
        )
        r = await cli("user", "delete", "carol", data_dir=d)
        assert r.rc == 0, r
        removed = await ca.wait_for(T.GROUP_MEMBER_REMOVED)
        assert removed.user_id == carol.user_id
        assert await cc.closed(1.0) == 4004
        # The CLI's minted admin session is revoked after each call: only the listing's
        # own is active while it lists.
        r = await cli("session", "list", data_dir=d)
        assert r.out.count(" admin ") == 1, r


@pg.sqlite_only("sovereign backup/restore copy SQLite files")
async def test_one_server_per_data_dir_and_no_restore_under_it(tmp_path: Path) -> None:
    d = tmp_path / "data"
    backup = tmp_path / "b.db"
    await cli("user", "create", "root", data_dir=d)
    async with serving(d):
        r = await cli("backup", str(backup), data_dir=d)  # online backup is fine
        assert r.rc == 0, r
        r = await cli("restore", str(backup), data_dir=d)
        assert r.rc == 1 and r.err.count("\n") == 1, r
        assert "a server is running" in r.err and "sovereign.lock" in r.err, r
        second = Server(d)
        try:
            await second.start(timeout=5)
            raise AssertionError("a second server started on the same data dir")
        except RuntimeError as exc:
            assert "another server is running" in str(exc)
        finally:
            second.kill()
    r = await cli("restore", str(backup), data_dir=d)  # stopped: the lock is free again
    assert r.rc == 0, r


def test_backup_and_restore_show_progress_on_a_terminal(tmp_path: Path) -> None:
    d = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "sovereign", "user", "create", "x", "--data-dir", str(d)],
        check=True,
        capture_output=True,
    )

    def on_tty(*args: str) -> str:
        """Run with stderr on a pseudo-terminal; returns what the terminal showed."""
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sovereign", *args, "--data-dir", str(d)],
            stdout=subprocess.DEVNULL,
            stderr=slave,
            env=os.environ.copy(),
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(30)
        os.close(master)
        assert proc.returncode == 0
        return b"".join(chunks).decode()

    shown = on_tty("backup", str(tmp_path / "b.db"))
    assert "backup: 100%" in shown, shown
    shown = on_tty("restore", str(tmp_path / "b.db"))
    assert "restore: 100%" in shown, shown


async def test_a_taken_admin_port_stops_start_up_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = await cli_serve_fails(tmp_path / "data", "--admin-listen", f"127.0.0.1:{port}")
    assert r.returncode != 0
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("sovereign:")]
    assert len(lines) == 1 and f"admin 127.0.0.1:{port}" in lines[0], r


async def cli_serve_fails(d: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    import asyncio

    cmd = [sys.executable, "-m", "sovereign", "serve", "--data-dir", str(d)]
    cmd += ["--listen", "127.0.0.1:0", *extra]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=30)
