"""The cluster parts a bench run spawns for ``--storage postgres`` / ``--workers N``
(SPEC §12.27): a throwaway PostgreSQL database (created on ``--pg-dsn``'s server, dropped
at the end) and, for more than one worker, a ``redis-server`` on a free port.

Server CPU in cluster mode is the sum over every process that serves: the ``serve``
process and its workers, the PostgreSQL backends connected to the run's database, and
redis-server (:meth:`BenchCluster.server_group`). The PostgreSQL instance's shared
background processes (WAL writer, checkpointer) are not counted: they also serve other
databases on the same instance.
"""

from __future__ import annotations

import asyncio
import importlib
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scratch_redis_argv(binary: str, port: int, directory: str) -> list[str]:
    """A throwaway redis-server on 127.0.0.1:``port``: no snapshots, no AOF (the bench's
    and the tests' clusters; Redis carries notifications only, SPEC §12.27)."""
    opts = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning")
    return [binary, "--port", str(port), *opts, "--dir", directory]


class BenchCluster:
    def __init__(
        self,
        *,
        admin_dsn: str,
        redis: bool,
        log: Callable[[str], None],
        redis_binary: str = "",
    ) -> None:
        self.admin_dsn = admin_dsn
        self.want_redis = redis
        self.log = log
        self.redis_binary = redis_binary or shutil.which("redis-server") or ""
        self.db_name = f"sovereign_bench_{secrets.token_hex(4)}"
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.redis_port = 0
        self.redis_dir = ""
        self._db_created = False

    @property
    def dsn(self) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path=f"/{self.db_name}"))

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0" if self.redis_proc else ""

    def server_env(self) -> dict[str, str]:
        env = {"STORAGE": "postgres", "POSTGRES_DSN": self.dsn}
        if self.redis_proc is not None:
            env["REDIS_URL"] = self.redis_url
            env["CLUSTER_NAME"] = self.db_name
        return env

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        asyncio.run(self._sql(f'CREATE DATABASE "{self.db_name}"'))
        self._db_created = True
        self.log(f"created database {self.db_name}")
        if self.want_redis:
            if not self.redis_binary:
                raise RuntimeError(
                    "--workers > 1 needs redis-server (apt-get install redis-server)"
                )
            self.redis_port = _free_port()
            self.redis_dir = tempfile.mkdtemp(prefix="sovereign-bench-redis-")
            self.redis_proc = subprocess.Popen(
                scratch_redis_argv(self.redis_binary, self.redis_port, self.redis_dir),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.redis_port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or self.redis_proc.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)
            self.log(f"redis-server pid {self.redis_proc.pid} on port {self.redis_port}")

    def close(self) -> None:
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.send_signal(signal.SIGTERM)
            try:
                self.redis_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.redis_proc.kill()
                self.redis_proc.wait()
        if self.redis_dir:
            shutil.rmtree(self.redis_dir, ignore_errors=True)
        if self._db_created:
            asyncio.run(self._sql(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            self._db_created = False
            self.log(f"dropped database {self.db_name}")

    async def _sql(self, sql: str) -> list[int]:
        # Imported by name: whether asyncpg ships type information is not ours to pin.
        asyncpg = importlib.import_module("asyncpg")
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            if sql.startswith("SELECT"):
                return [int(r[0]) for r in await conn.fetch(sql, self.db_name)]
            await conn.execute(sql)
            return []
        finally:
            await conn.close()

    # -- accounting ---------------------------------------------------------------------
    def postgres_backends(self) -> list[int]:
        try:
            return asyncio.run(self._sql("SELECT pid FROM pg_stat_activity WHERE datname = $1"))
        except Exception:
            return []

    def server_group(self, server_pid: int) -> dict[str, list[int]]:
        from sovereign.bench.procfs import descendants

        group = {
            "sovereign": [server_pid, *descendants(server_pid)],
            "postgres": self.postgres_backends(),
        }
        if self.redis_proc is not None:
            group["redis"] = [self.redis_proc.pid]
        return group


def default_admin_dsn() -> str:
    return "postgresql://postgres@127.0.0.1:5432/postgres"
