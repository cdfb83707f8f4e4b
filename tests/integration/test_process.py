"""The real server process: signals and graceful shutdown, the start-up log naming the
active implementations, SOVEREIGN_REQUIRE_FAST / SOVEREIGN_PURE, and the first-admin bootstrap code
(SPEC §4 shutdown, §11, §12.19; issue 2 "Build and layout")."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import pg
from tests.helpers.flows import login, register
from tests.helpers.server import ORIGIN, ServerProcess
from tests.helpers.wsclient import WsClient

# What the test client's passkeys are made for, whatever the caller's shell has.
WS_ENV = {"SOVEREIGN_RP_ID": "localhost", "SOVEREIGN_RP_ORIGINS": ORIGIN}


class Server(ServerProcess):
    """ServerProcess that can also run ``python -c SCRIPT`` and that closes its pipe."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        script: str | None = None,
        pin_rp: bool = True,
    ) -> None:
        super().__init__(data_dir, {**(WS_ENV if pin_rp else {}), **(env or {})}, args)
        self.script = script
        self.drained = threading.Event()

    async def start(self, timeout: float = 20.0) -> Server:
        try:
            if self.script is None:
                await super().start(timeout)
            else:
                await self._start_script(timeout)
        except BaseException:
            self.close()  # never leave a half-started child behind
            raise
        return self

    async def _start_script(self, timeout: float) -> None:
        assert self.script is not None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        loop = asyncio.get_running_loop()
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(
                loop.run_in_executor(None, self.proc.stdout.readline), timeout
            )
            if not line:
                raise RuntimeError("server did not start:\n" + self.output())
            self.lines.append(line)
            m = re.search(r"listening on wss?://[\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                loop.run_in_executor(None, self._drain)
                return

    def _drain(self) -> None:
        try:
            super()._drain()
        finally:
            self.drained.set()

    async def line_starting(self, prefix: str, timeout: float = 5.0) -> str:
        """The first output line starting with ``prefix`` (waiting for it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line.strip()
            await asyncio.sleep(0.01)
        raise AssertionError(f"no line starting {prefix!r} in:\n{self.output()}")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal, wait for the exit status, close the pipe."""
        assert self.proc is not None
        try:
            if self.proc.poll() is None:
                self.signal(sig)
            return await self.wait(10)
        finally:
            self.close()

    def close(self) -> None:
        self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            if self.port:  # a drain thread owns the pipe until EOF
                self.drained.wait(5)
            self.proc.stdout.close()


async def wait_handlers_installed(srv: Server) -> None:
    # serve() installs its signal handlers right after printing the setup URL
    # (or deciding there is none); the URL line is the last thing before them.
    await srv.line_starting("setup URL:")


# -- graceful shutdown (SPEC §4) ------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_closes_every_connection_4006_and_exits_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    srv = Server(tmp_path / "data")
    await srv.start()
    try:
        await wait_handlers_installed(srv)
        ready = await WsClient.connect(srv.url)
        await register(ready, "alice")
        pending = await WsClient.connect(srv.url)  # upgraded, not authenticated
        pong = await pending.request(T.PING, pb.Ping(timestamp=42), T.PONG)
        assert pong.timestamp == 42

        srv.signal(sig)
        codes = await asyncio.gather(ready.closed(5), pending.closed(5))
        assert list(codes) == [4006, 4006]
        assert await srv.wait(10) == 0
    finally:
        srv.close()
    out = srv.output()
    assert "closing 2 connections" in out and "stopped" in out
    assert "Traceback" not in out
    # Stopped accepting: nothing listens on the port any more.
    with pytest.raises(OSError):
        await WsClient.connect(srv.url)


async def test_sigterm_right_after_listening_is_still_graceful(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data")
    await srv.start()  # returns as soon as the "listening on" line is out
    assert await srv.stop(signal.SIGTERM) == 0


async def test_shutdown_with_no_connections_exits_0(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data")
    await srv.start()
    await wait_handlers_installed(srv)
    assert await srv.stop(signal.SIGTERM) == 0


async def test_a_misspelt_environment_setting_is_named_at_start(tmp_path: Path) -> None:
    """A typo in a config file is refused; in the environment the server starts, on the
    default, and says which variable it ignored and which one was likely meant."""
    env = {"SOVEREIGN_MAX_CONECTIONS": "5", "SOVEREIGN_RATE_LIMIT_BURST": "50"}
    srv = Server(tmp_path / "data", env=env)
    await srv.start()
    try:
        out = srv.output()
        assert (
            "SOVEREIGN_MAX_CONECTIONS is not a setting; it is ignored"
            " (did you mean SOVEREIGN_MAX_CONNECTIONS?)" in out
        ), out
        assert "SOVEREIGN_RATE_LIMIT_BURST" not in out  # a real setting: no word
        assert "WARNING" in next(line for line in srv.lines if "MAX_CONECTIONS" in line)
        await wait_handlers_installed(srv)
    finally:
        assert await srv.stop() == 0


# -- implementations, SOVEREIGN_REQUIRE_FAST and SOVEREIGN_PURE -------------------------

# Whatever the caller's shell has: each test below sets the flags it is about.
FAST = {"SOVEREIGN_REQUIRE_FAST": "1", "SOVEREIGN_PURE": "0"}
ANY = {"SOVEREIGN_REQUIRE_FAST": "0", "SOVEREIGN_PURE": "0"}


async def test_startup_log_names_the_compiled_implementations(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", env=FAST)
    await srv.start()
    try:
        listening = next(line for line in srv.lines if "listening on" in line)
        assert "envelope codec: compiled" in listening
        assert "dispatcher: compiled" in listening
        assert "WAL coalescing: compiled" in listening  # storage/walvfs.py
        assert "event ids: compiled" in listening
        assert "idempotency filter: compiled" in listening
        assert "WAL writes are not coalesced" not in srv.output()  # SQLite: it runs
        await wait_handlers_installed(srv)
    finally:
        assert await srv.stop() == 0


def blocked_script(data_dir: Path, blocked: str) -> str:
    """Run ``sovereign serve`` with every module under ``blocked`` unimportable."""
    return f"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == {blocked!r} or name.startswith({blocked + "."!r}):
            raise ImportError(f"blocked for the test: {{name}}")
        return None

sys.meta_path.insert(0, Block())
from sovereign.cli import main
sys.exit(main(["serve", "--data-dir", {str(data_dir)!r}, "--listen", "127.0.0.1:0",
                "--admin-listen", "127.0.0.1:0"]))
"""


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=15,
    )


@pytest.mark.parametrize(
    ("blocked", "named"),
    [
        ("sovereign._fast", "sovereign._fast.envelope"),  # nothing compiled
        ("sovereign._fast.dispatch", "sovereign._fast.dispatch"),  # only the dispatcher
        ("sovereign._fast.fanout", "sovereign._fast.fanout"),  # only the fan-out
        ("sovereign._fast.walvfs", "sovereign._fast.walvfs"),  # only the WAL shim
    ],
)
async def test_require_fast_refuses_to_start_without_compiled_modules(
    tmp_path: Path, blocked: str, named: str
) -> None:
    script = blocked_script(tmp_path / "data", blocked)
    proc = await asyncio.to_thread(run_script, script, FAST)
    assert proc.returncode != 0, proc
    assert named in proc.stderr, proc
    assert "SOVEREIGN_REQUIRE_FAST" in proc.stderr
    # one clear line: what is missing and how to build it
    assert "SOVEREIGN_REQUIRE_FAST=1 but the compiled " in proc.stderr
    assert f" {named} is missing; build it with" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "listening" not in proc.stdout + proc.stderr


async def test_without_require_fast_the_python_twins_run(tmp_path: Path) -> None:
    d = tmp_path / "data"
    srv = Server(d, env=ANY, script=blocked_script(d, "sovereign._fast"))
    await srv.start()
    try:
        listening = next(line for line in srv.lines if "listening on" in line)
        assert "envelope codec: python" in listening and "dispatcher: python" in listening
        assert "WAL coalescing: python" in listening and "event ids: python" in listening
        assert "idempotency filter: python" in listening
        if pg.STORAGE == "sqlite":  # the SQLite writer says why it writes as SQLite does
            assert "WAL writes are not coalesced: the pure-Python twin runs" in srv.output()
        await wait_handlers_installed(srv)
        # The twins serve real traffic.
        c = await WsClient.connect(srv.url)
        acct = await register(c, "pat")
        # READY: the server may push (e.g. SYNC_COMPLETE) before the PONG.
        rid = c.send(T.PING, pb.Ping(timestamp=9))
        pong = await c.wait_for(T.PONG, rid)
        assert pong.timestamp == 9
        srv.signal(signal.SIGTERM)
        assert await c.closed(5) == 4006
        assert await srv.wait(10) == 0
        assert acct.user_id
    finally:
        srv.close()


async def test_pure_runs_the_python_twins_although_compiled_ones_are_built(
    tmp_path: Path,
) -> None:
    srv = Server(tmp_path / "data", env={"SOVEREIGN_PURE": "1", "SOVEREIGN_REQUIRE_FAST": "0"})
    await srv.start()
    try:
        listening = next(line for line in srv.lines if "listening on" in line)
        assert "envelope codec: python" in listening and "dispatcher: python" in listening
        await wait_handlers_installed(srv)
    finally:
        assert await srv.stop() == 0


async def test_pure_and_require_fast_together_refuse_to_start(tmp_path: Path) -> None:
    script = blocked_script(tmp_path / "data", "sovereign._no_such_module")  # blocks nothing
    env = {"SOVEREIGN_PURE": "1", "SOVEREIGN_REQUIRE_FAST": "1"}
    proc = await asyncio.to_thread(run_script, script, env)
    assert proc.returncode != 0, proc
    assert "SOVEREIGN_PURE=1 and SOVEREIGN_REQUIRE_FAST=1 contradict" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "listening" not in proc.stdout + proc.stderr


# -- first-admin bootstrap (SPEC §12.19) -----------------------------------------------


async def test_bootstrap_code_registers_the_first_admin(tmp_path: Path) -> None:
    d = tmp_path / "data"
    srv = Server(d, env={"SOVEREIGN_REGISTRATION": "closed"})
    await srv.start()
    try:
        line = await srv.line_starting("setup URL:")
        # SPEC §12.28: the first-start URL opens the admin panel's setup page; its token
        # is the bootstrap code, which also works as invite_code over the WebSocket.
        assert re.search(r"setup URL: http://localhost:\d+/admin/setup\?token=\S+$", line)
        code = line.rsplit("token=", 1)[-1].strip()
        # The code is shown to the operator, never written to the log stream.
        assert not any(code in ln and "INFO" in ln for ln in srv.lines)

        c = await WsClient.connect(srv.url)
        # closed: only the bootstrap code opens the door
        err, _ = await c.error(T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="eve"))
        assert err == 1003
        root = await register(c, "root", invite_code=code)
        await c.close()

        c = await WsClient.connect(srv.url)
        ok = await login(c, root)
        assert ok.is_admin and ok.username == "root" and ok.user_id == root.user_id
        await c.close()

        c = await WsClient.connect(srv.url)  # single use
        err, _ = await c.error(
            T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="eve", invite_code=code)
        )
        assert err == 1003
        await c.close()
        assert await srv.stop() == 0
    finally:
        srv.close()

    # With an admin in the database the next start prints no code.
    again = Server(d)
    await again.start()
    try:
        await asyncio.sleep(0.3)
        assert "setup URL" not in again.output() and "bootstrap code" not in again.output()
        assert await again.stop() == 0
    finally:
        again.close()
