"""Browser tests: the real server as a child process on 127.0.0.1, Debian's Chromium
driven by Playwright, WebAuthn through Chrome DevTools virtual authenticators (a real
platform-authenticator ceremony: the page calls navigator.credentials itself).

Playwright's browsers are never downloaded: ``executable_path=/usr/bin/chromium``.
Screenshots go to ``.artifacts/browser/`` (gitignored)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".artifacts" / "browser"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WebServer:
    proc: subprocess.Popen[str]
    port: int
    data_dir: Path
    bootstrap_code: str
    lines: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://localhost:{self.port}/"

    @property
    def db_files(self) -> list[Path]:
        return sorted(self.data_dir.glob("sovereign.db*"))


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    data_dir = tmp_path_factory.mktemp("web") / "data"
    port = _free_port()
    env = {
        **os.environ,
        # The page's origin is http://localhost:PORT (a secure context for WebAuthn).
        "SOVEREIGN_RP_ORIGINS": f"http://localhost:{port}",
        "SOVEREIGN_RP_ID": "localhost",
        "SOVEREIGN_REGISTRATION": "open",
        "SOVEREIGN_LOG_LEVEL": "warning",
        # A pool of 10 falls below 9 after two fetches: the top-up on
        # MLS_KEY_PACKAGE_LOW is exercised by the story itself.
        "SOVEREIGN_MIN_KEY_PACKAGES": "9",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sovereign",
            "serve",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    code = ""
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"bootstrap code: (\S+)", line)
        if m:
            code = m.group(1)
            break
    if not code:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))
    out = proc.stdout
    drain = threading.Thread(target=lambda: lines.extend(out), daemon=True)
    drain.start()
    server = WebServer(proc, port, data_dir, code, lines)
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        drain.join(5)
        out.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()
