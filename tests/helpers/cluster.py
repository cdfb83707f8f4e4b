"""Real cluster parts for tests (SPEC §12.27): a throwaway PostgreSQL database on the
local server, a ``redis-server`` on a free port, K ``sovereign serve`` processes on free
ports, and — for the PostgreSQL-restart test — a PostgreSQL instance of the test's own.

Every part is a real process or database the test can kill (SIGKILL) and restart.
Nothing stands in for Redis or PostgreSQL. When a part is missing the test is skipped
with the reason — except under ``CI=true``, where a missing part fails the run instead
(CI must exercise the cluster, not skip it quietly).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sovereign.bench.cluster import scratch_redis_argv

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_HOST = os.environ.get("SOVEREIGN_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SOVEREIGN_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("SOVEREIGN_TEST_PG_USER", "postgres")

#: Limits raised for tests (every client comes from 127.0.0.1 and sends back to back).
TEST_ENV: dict[str, str] = {
    "SOVEREIGN_RATE_LIMIT_PER_SECOND": "100000",
    "SOVEREIGN_RATE_LIMIT_BURST": "100000",
    "SOVEREIGN_AUTH_RATE_PER_MINUTE": "1000000",
    "SOVEREIGN_AUTH_RATE_BURST": "1000000",
    "SOVEREIGN_REGISTER_RATE_PER_HOUR": "1000000",
    "SOVEREIGN_MAX_CONNECTIONS_PER_USER": "1000",
    "SOVEREIGN_MIN_KEY_PACKAGES": "0",
    "SOVEREIGN_REGISTRATION": "open",
    "SOVEREIGN_RP_ID": "localhost",
    "SOVEREIGN_RP_ORIGINS": "http://localhost:8080",
    "SOVEREIGN_LOG_FORMAT": "text",
}


def missing(what: str) -> None:
    """Skip (or, under CI, fail) because a real part of the cluster is not available."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"cluster test needs {what} (CI must provide it)")
    pytest.skip(f"cluster test needs {what}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {timeout} s")


# -- Redis ---------------------------------------------------------------------------------
class RedisServer:
    """``redis-server`` on a free port, no persistence; kill -9 and restart on the same
    port (a restarted Redis is empty, as a real crash leaves it with no persistence)."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            missing("redis-server (apt-get install redis-server)")
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="sov-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.binary is not None
        self.proc = subprocess.Popen(
            scratch_redis_argv(self.binary, self.port, self.dir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 10, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- PostgreSQL ------------------------------------------------------------------------------
def _psql(dsn_db: str, sql: str, host: str, port: int) -> subprocess.CompletedProcess[str]:
    psql = shutil.which("psql")
    assert psql is not None
    return subprocess.run(
        [
            psql,
            "-h",
            host,
            "-p",
            str(port),
            "-U",
            PG_USER,
            "-d",
            dsn_db,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def postgres_available(host: str = PG_HOST, port: int = PG_PORT) -> str | None:
    """None if a PostgreSQL server answers (trust auth, user postgres); else why not."""
    if shutil.which("psql") is None:
        return "psql (apt-get install postgresql-client)"
    try:
        out = _psql("postgres", "SELECT 1", host, port)
    except subprocess.TimeoutExpired:
        return f"PostgreSQL at {host}:{port} (timed out)"
    if out.returncode != 0:
        return f"PostgreSQL at {host}:{port} (trust auth, user {PG_USER}): {out.stderr.strip()}"
    return None


class PostgresDatabase:
    """A uniquely named database on a PostgreSQL server, dropped at the end."""

    def __init__(self, host: str = PG_HOST, port: int = PG_PORT) -> None:
        why = postgres_available(host, port)
        if why is not None:
            missing(why)
        self.host, self.port = host, port
        self.name = f"sov_test_{os.getpid()}_{secrets.token_hex(4)}"

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_USER}@{self.host}:{self.port}/{self.name}"

    def create(self) -> PostgresDatabase:
        out = _psql("postgres", f'CREATE DATABASE "{self.name}"', self.host, self.port)
        if out.returncode != 0:
            raise RuntimeError(f"CREATE DATABASE failed: {out.stderr.strip()}")
        return self

    def drop(self) -> None:
        # WITH (FORCE): a SIGKILLed node's backends may still be closing; retried, as a
        # busy server can take a while to end many backends.
        sql = f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'
        for _ in range(3):
            try:
                if _psql("postgres", sql, self.host, self.port).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)

    def __enter__(self) -> PostgresDatabase:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.drop()


class PostgresInstance:
    """A PostgreSQL server of the test's own (``initdb`` + ``pg_ctl`` in a temp dir, on a
    free port), so a test can stop and start it without touching anyone else's.

    initdb refuses to run as root: as root the instance runs as the ``postgres`` user
    (``runuser``), which must exist (the Debian package creates it)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
            missing(f"initdb and pg_ctl in {PG_BIN} (apt-get install postgresql)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sov-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                missing("runuser (util-linux) to run initdb as a non-root user")
            self._as = [str(runuser), "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self.started = False

    def _run(self, *args: str, timeout: float = 60) -> None:
        out = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=timeout, cwd=self.dir
        )
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {out.stdout}\n{out.stderr}")

    def init(self) -> PostgresInstance:
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        return self

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
            "start",
        )  # fmt: skip
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        if self.started:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
            self.started = False

    def close(self) -> None:
        with suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresInstance:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- sovereign serve --------------------------------------------------------------------------
_LISTENING = re.compile(r"listening on wss?://[\d.]+:(\d+)")


class Node:
    """One ``sovereign serve`` process of the cluster on its own free port (or sharing
    one, with ``--workers``). Its output is kept (tail) for failure messages."""

    def __init__(
        self,
        name: str,
        data_dir: Path,
        env: dict[str, str],
        port: int | None = None,
        workers: int = 1,
    ) -> None:
        self.name = name
        self.data_dir = data_dir
        self.env = env
        self.port = port or free_port()
        self.workers = workers
        self.proc: subprocess.Popen[str] | None = None
        self.lines: deque[str] = deque(maxlen=400)
        self.starts = 0
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 30.0) -> Node:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.lines.clear()  # a restart: "listening" must come from this process
        self.starts += 1
        cmd = [
            sys.executable,
            "-m",
            "sovereign",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin-listen",
            "127.0.0.1:0",
        ]
        if self.workers != 1:
            cmd += ["--workers", str(self.workers)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,  # SIGKILL of the group takes --workers children too
        )
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"log-{self.name}")
        self._reader.start()
        want = self.workers
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for line in list(self.lines) if _LISTENING.search(line)) >= want:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "".join(self.lines)
        self.kill()
        raise RuntimeError(f"node {self.name} did not start:\n{tail}")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (a supervisor and its workers)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill()
        return self.proc.returncode

    def output(self) -> str:
        return "".join(self.lines)


class Cluster:
    """PostgreSQL database + Redis + K nodes. Use as a context manager or through
    :func:`cluster`; everything is torn down (database dropped) at the end."""

    def __init__(
        self,
        tmp: Path,
        nodes: int = 2,
        *,
        pg: PostgresInstance | None = None,
        env: dict[str, str] | None = None,
        cluster_name: str | None = None,
    ) -> None:
        self.tmp = tmp
        self.db = PostgresDatabase("127.0.0.1", pg.port) if pg else PostgresDatabase()
        self.redis = RedisServer()
        self.cluster_name = cluster_name or f"t{secrets.token_hex(4)}"
        self.node_count = nodes
        self.extra_env = env or {}
        self.nodes: list[Node] = []

    def node_env(self) -> dict[str, str]:
        return {
            **os.environ,
            **TEST_ENV,
            "SOVEREIGN_STORAGE": "postgres",
            "SOVEREIGN_POSTGRES_DSN": self.db.dsn,
            "SOVEREIGN_REDIS_URL": self.redis.url,
            "SOVEREIGN_CLUSTER_NAME": self.cluster_name,
            **self.extra_env,
        }

    def add_node(self, workers: int = 1, port: int | None = None) -> Node:
        i = len(self.nodes)
        node = Node(f"n{i}", self.tmp / f"node{i}", self.node_env(), port=port, workers=workers)
        self.nodes.append(node)
        node.start()
        return node

    def start(self) -> Cluster:
        self.db.create()
        self.redis.start()
        for _ in range(self.node_count):
            self.add_node()
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        self.redis.close()
        self.db.drop()

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def outputs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.output()[-4000:]}" for n in self.nodes)


@contextmanager
def cluster(tmp: Path, nodes: int = 2, **kw: Any) -> Iterator[Cluster]:
    with Cluster(tmp, nodes, **kw) as c:
        yield c


async def to_thread_kill(node: Node) -> None:
    """SIGKILL a node without blocking the event loop the test clients run on."""
    await asyncio.get_running_loop().run_in_executor(None, node.kill)


@dataclass(frozen=True)
class Account:
    user_id: str
    username: str
    token: str


async def provision(c: Cluster, count: int, prefix: str) -> list[Account]:
    """``count`` users with one session (device) each, written straight into the
    cluster's database (as ``sovereign user create --print-token`` does), in chunks."""
    from sovereign.config import load
    from sovereign.server import create_app
    from sovereign.services.ports import NullBus

    env = {k: v for k, v in c.node_env().items() if k.startswith("SOVEREIGN_")}
    cfg = load(None, {"data_dir": str(c.tmp / "provision")}, environ=env)
    (c.tmp / "provision").mkdir(parents=True, exist_ok=True)
    app = await create_app(cfg, bus=NullBus())

    async def one(i: int) -> Account:
        user = await app.auth.create_user(f"{prefix}{i:05d}")
        _session, token = await app.auth.create_session(user.user_id, None, "test")
        return Account(user.user_id, user.username, token)

    out: list[Account] = []
    try:
        for start in range(0, count, 200):
            out.extend(
                await asyncio.gather(*(one(i) for i in range(start, min(count, start + 200))))
            )
    finally:
        await app.storage.close()
    return out
