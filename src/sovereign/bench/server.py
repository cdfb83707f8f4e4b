"""The server under test: provisioning accounts, spawning ``sovereign serve``, its log.

Provisioning uses the CLI's token path (``sovereign user create NAME --print-token``) in
bulk and in-process: :func:`provision_tokens` opens the data dir's storage with
:func:`sovereign.server.create_app` *before* the server process starts. With
``--webauthn`` accounts are registered through real ceremonies over the wire instead
(:func:`sovereign.bench.client.register_webauthn`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: Limits raised for load when the tool spawns the server (``--server-env`` overrides).
LOAD_ENV: dict[str, str] = {
    "SOVEREIGN_RATE_LIMIT_PER_SECOND": "1000000",
    "SOVEREIGN_RATE_LIMIT_BURST": "1000000",
    "SOVEREIGN_MAX_CONNECTIONS": "1000000",
    "SOVEREIGN_MAX_CONNECTIONS_PER_USER": "1000",
    "SOVEREIGN_IDLE_TIMEOUT": "3600",
    # Its own free port: the default 127.0.0.1:8081 may be taken (another server, a
    # parallel run). METRICS=false via --server-env measures the cost of counting.
    "SOVEREIGN_ADMIN_LISTEN": "127.0.0.1:0",
    # every load client comes from loopback: the per-IP auth limits would throttle it
    "SOVEREIGN_AUTH_RATE_PER_MINUTE": "1000000000",
    "SOVEREIGN_AUTH_RATE_BURST": "1000000000",
    "SOVEREIGN_REGISTER_RATE_PER_HOUR": "1000000000",
    "SOVEREIGN_LOG_FORMAT": "text",
    "SOVEREIGN_LOG_LEVEL": "info",
}

_LISTENING = re.compile(r"listening on (wss?)://([^\s,()]+):(\d+)")
_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception|slow reader|refused")


@dataclass(frozen=True, slots=True)
class Account:
    user_id: str
    username: str
    token: str


async def provision_tokens(
    data_dir: str,
    count: int,
    prefix: str,
    progress: Callable[[str], None] | None = None,
    chunk: int = 500,
    environ: Mapping[str, str] | None = None,
    postgres_dsn: str = "",
) -> list[Account]:
    """Create ``count`` users, each with one session (device) and its token (in the
    PostgreSQL database at ``postgres_dsn`` if given, else in the data dir's SQLite).
    ``environ``: ``SOVEREIGN_*`` settings naming the storage (the bench's own cluster);
    without ``redis_url`` among them, so no bus is started for this."""
    from sovereign.config import load
    from sovereign.server import create_app

    Path(data_dir).mkdir(parents=True, exist_ok=True)
    storage = {"storage": "postgres", "postgres_dsn": postgres_dsn} if postgres_dsn else {}
    cfg = load(None, {"data_dir": data_dir, **storage}, environ=dict(environ or {}))
    app = await create_app(cfg)
    out: list[Account] = []
    t0 = time.monotonic()
    last = t0

    async def one(i: int) -> Account:
        user = await app.auth.create_user(f"{prefix}{i:06d}")
        _session, token = await app.auth.create_session(user.user_id, None, "bench")
        return Account(user.user_id, user.username, token)

    try:
        for start in range(0, count, chunk):
            batch = range(start, min(count, start + chunk))
            out.extend(await asyncio.gather(*(one(i) for i in batch)))
            now = time.monotonic()
            if progress is not None and (now - last >= 2.0 or len(out) == count):
                last = now
                progress(f"provisioned {len(out)}/{count} accounts ({now - t0:.1f} s)")
    finally:
        await app.storage.close()
    return out


_PROVISION = """\
import asyncio, json, sys
from sovereign.bench.server import provision_tokens
environ = json.loads(sys.argv[4])
kw = {"environ": environ} if environ else {}  # builds before cluster mode lack it
accounts = asyncio.run(provision_tokens(sys.argv[1], int(sys.argv[2]), sys.argv[3], **kw))
print(json.dumps([[a.user_id, a.username, a.token] for a in accounts]))
"""


def provision_tokens_with(
    python: str,
    data_dir: str,
    count: int,
    prefix: str,
    environ: Mapping[str, str] | None = None,
) -> list[Account]:
    """:func:`provision_tokens` run by another interpreter (``--server-python``): the
    data dir's schema must be the one that server's code migrates to. ``environ``: the
    ``SOVEREIGN_*`` storage settings, as for :func:`provision_tokens` (without them the
    accounts would go to SQLite while the server runs on PostgreSQL)."""
    out = subprocess.run(
        [python, "-c", _PROVISION, data_dir, str(count), prefix, json.dumps(dict(environ or {}))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [Account(*row) for row in json.loads(out.strip().splitlines()[-1])]


def server_environment(overrides: Mapping[str, str], base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    env.update(LOAD_ENV)
    for key, value in overrides.items():
        name = key.upper()
        if not name.startswith("SOVEREIGN_"):
            name = "SOVEREIGN_" + name
        env[name] = value
    return env


class SpawnedServer:
    """``python -m sovereign serve`` in its own session, pinned with ``taskset``."""

    def __init__(
        self,
        data_dir: str,
        *,
        env: Mapping[str, str],
        cpus: list[int] | None,
        log: Callable[[str], None],
        python: str = "",
        argv: list[str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        #: The interpreter (another venv's, to measure older code: ``--server-python``).
        self.python = python or sys.executable
        #: What to run instead of ``-m sovereign serve`` (the baseline's echo server).
        self.argv = argv
        self.env = dict(env)
        self.cpus = cpus
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.lines: deque[str] = deque(maxlen=2000)
        self.problems: deque[str] = deque(maxlen=200)
        self.problem_count = 0
        self.line_count = 0
        self.command: list[str] = []
        self._reader: threading.Thread | None = None
        self._listening = threading.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> str:
        if self.argv is not None:
            serve = [self.python, *self.argv]
        else:
            serve = [
                self.python,
                "-m",
                "sovereign",
                "serve",
                "--data-dir",
                self.data_dir,
                "--listen",
                "127.0.0.1:0",
            ]
        preexec: Callable[[], None] | None = None
        if self.cpus is not None:
            taskset = shutil.which("taskset")
            if taskset:
                serve = [taskset, "-c", ",".join(map(str, self.cpus)), *serve]
            else:
                cpus = set(self.cpus)

                def preexec() -> None:
                    os.sched_setaffinity(0, cpus)

        self.command = serve
        self.proc = subprocess.Popen(
            serve,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,  # our Ctrl-C is not its SIGINT: we stop it ourselves
            preexec_fn=preexec,
        )
        self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout) or not self.url:
            tail = "".join(list(self.lines)[-30:])
            self.stop()
            raise RuntimeError(f"the server did not start within {timeout:.0f} s:\n{tail}")
        return self.url

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self.line_count += 1
            if not self.url:
                m = _LISTENING.search(line)
                if m:
                    self.url = f"{m.group(1)}://{m.group(2)}:{m.group(3)}/ws"
                    self._listening.set()
                    continue
            if _PROBLEM.search(line):
                self.problem_count += 1
                self.problems.append(line.rstrip())
        self._listening.set()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> tuple[int | None, float]:
        """SIGTERM (graceful shutdown, SPEC §4), SIGKILL after ``timeout``.

        Returns (exit code, seconds the shutdown took)."""
        if self.proc is None:
            return None, 0.0
        t0 = time.monotonic()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.log(f"server did not stop within {timeout:.0f} s after SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(2.0)
        return self.proc.returncode, time.monotonic() - t0
