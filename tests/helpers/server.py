"""Start the real server for tests: in-process on 127.0.0.1:0 (same event loop), or
as a subprocess (for signals, crashes and the CLI). Real SQLite files in tmp dirs, or
with ``SOVEREIGN_TEST_STORAGE=postgres`` a throwaway PostgreSQL database per data dir
(tests/helpers/pg.py)."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovereign import logs
from sovereign.collector import GC_THRESHOLDS
from sovereign.config import Config, load_with_sources
from sovereign.server import App, create_app
from tests.helpers import pg

ORIGIN = "http://localhost:8080"


def test_config(data_dir: Path, **overrides: Any) -> Config:
    return test_config_sources(data_dir, **overrides)[0]


def test_config_sources(data_dir: Path, **overrides: Any) -> tuple[Config, dict[str, str]]:
    base: dict[str, Any] = {
        "data_dir": str(data_dir),
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "rp_id": "localhost",
        "rp_origins": [ORIGIN],
        "registration": "open",
        # Tests fire requests back to back; the rate-limit test sets its own values.
        "rate_limit_per_second": 10_000.0,
        "rate_limit_burst": 10_000,
        # Every test client comes from 127.0.0.1: the per-IP auth limits (SPEC §12.32)
        # are raised likewise; tests/integration/test_abuse.py sets its own.
        "auth_rate_per_minute": 1_000_000.0,
        "auth_rate_burst": 1_000_000,
        "register_rate_per_hour": 1_000_000,
        # No MLS_KEY_PACKAGE_LOW after every sync; the KeyPackage tests set their own.
        "min_key_packages": 0,
    }
    if pg.STORAGE == "postgres":
        base["storage"] = "postgres"
        base["postgres_dsn"] = pg.database_for(data_dir)
    base.update(overrides)
    return load_with_sources(None, base, environ={})


@dataclass
class RunningServer:
    app: App
    config: Config

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.app.port}/ws"

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    @property
    def admin(self) -> str:
        """The admin listener's base URL (http://127.0.0.1:PORT)."""
        assert self.app.admin_listener is not None
        return f"http://127.0.0.1:{self.app.admin_listener.port}"


_gc_depth = 0


@contextmanager
def serving_gc() -> Iterator[None]:
    """The collector policy ``sovereign serve`` sets (``collector.tune_gc``), for a server
    that shares this process with pytest.

    ``serve`` freezes what start-up loaded, so a full collection walks only the server's
    own objects. In-process, it would walk pytest's whole heap too: measured over the
    integration suite, gen-2 collections of up to 540,000 objects took up to 302 ms, and
    a latency test that met one failed (p99 194-221 ms in CI). Freezing here (without
    ``serve``'s ``gc.collect()``, which would cost that much per test) gives the server
    the collector it has in production; what the test made is unfrozen afterwards.
    """
    global _gc_depth
    _gc_depth += 1
    if _gc_depth == 1:
        saved = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        _gc_depth -= 1
        if _gc_depth == 0:
            gc.set_threshold(*saved)
            gc.unfreeze()


@asynccontextmanager
async def running_server(data_dir: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    cfg, sources = test_config_sources(data_dir, **overrides)
    # The library log levels `serve` sets: picows' ERROR per malformed frame would
    # otherwise pile up in pytest's log capture (10,000 records in a 1,000-per-kind
    # storm, which the storm's RSS bound then measured as the server's memory).
    logs.quiet_libraries()
    with serving_gc():
        app = await create_app(cfg, sources)
        await app.start()
        try:
            yield RunningServer(app, cfg)
        finally:
            await app.shutdown(timeout=5)


class ServerProcess:
    """``sovereign serve`` in a child process; parses its port from the log."""

    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, **pg.server_env(data_dir), **(env or {})}
        self.args = args or []
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.lines: list[str] = []
        self._drained = threading.Event()

    async def start(self, timeout: float = 20.0) -> ServerProcess:
        try:
            return await self._start(timeout)
        except BaseException:
            self.kill()  # never leave a half-started child (or its pipe) behind
            raise

    async def _start(self, timeout: float) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "sovereign",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            "127.0.0.1:0",
            *([] if "--admin-listen" in self.args else ["--admin-listen", "127.0.0.1:0"]),
            *self.args,
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        assert self.proc.stdout is not None
        while loop.time() < deadline:
            line = await loop.run_in_executor(None, self.proc.stdout.readline)
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"listening on wss?://[\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                loop.run_in_executor(None, self._drain)
                return self
        raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.lines.append(line)
        except ValueError:  # the pipe was closed under us
            pass
        finally:
            self._drained.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        code = await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), timeout)
        await loop.run_in_executor(None, self.close_pipe)
        return code

    def kill(self) -> None:
        """SIGKILL (if still running), reap the child and close its pipe."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.close_pipe()

    def close_pipe(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            if self.port:  # a drain thread was started: let it read to EOF first
                self._drained.wait(5)
            self.proc.stdout.close()

    def output(self) -> str:
        return "".join(self.lines)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    data_dir = args[args.index("--data-dir") + 1] if "--data-dir" in args else None
    data_dir = data_dir or (env or {}).get("SOVEREIGN_DATA_DIR")
    storage_env = pg.server_env(data_dir) if data_dir else {}
    return subprocess.run(
        [sys.executable, "-m", "sovereign", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **storage_env, **(env or {})},
        timeout=60,
    )
