"""The admin API against its own OpenAPI document, with schemathesis: generated
requests (valid and not) to every operation of a real server process must never get
a 5xx, and what comes back must match the document. Kept short for CI (a few examples
per operation)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from sovereign import __version__
from sovereign.admin.openapi import document

schema = schemathesis.openapi.from_dict(document(__version__))


class AdminProcess:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.lines: list[str] = []

    def start(self) -> tuple[str, str]:
        env = {**os.environ, "SOVEREIGN_RATE_LIMIT_PER_SECOND": "1000"}
        made = subprocess.run(
            [
                sys.executable,
                "-m",
                "sovereign",
                "user",
                "create",
                "root",
                "--admin",
                "--print-token",
                "--data-dir",
                str(self.data_dir),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        token = made.stdout.split()[-1]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sovereign",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"admin listener on (http://[\d.]+:\d+)", line)
            if m:
                threading.Thread(target=self._drain, daemon=True).start()
                return m.group(1), token
        raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    proc = AdminProcess(tmp_path_factory.mktemp("openapi") / "data")
    try:
        yield proc.start()
    finally:
        proc.stop()
    assert "Traceback" not in "".join(proc.lines), "".join(proc.lines)


@schema.parametrize()
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_admin_api_conforms_and_never_fails_with_5xx(
    case: schemathesis.Case, admin_server: tuple[str, str]
) -> None:
    base, token = admin_server
    response = case.call(base_url=base, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    # Settings have bounds across fields (per-user cap <= max_connections, message size
    # <= max_envelope_bytes) that JSON Schema cannot state: a schema-valid body may get
    # 422. Every other check applies.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
