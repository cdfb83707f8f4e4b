"""The committed web client equals a fresh build of its sources (`make web`): nobody
ships a bundle that does not match web/src, and the build is reproducible."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parents[2] / "web"


def test_committed_bundle_matches_a_fresh_build() -> None:
    node = shutil.which("node")
    if node is None or not (WEB / "node_modules" / "esbuild").is_dir():
        pytest.fail("the web build tools are missing: run `make web` (npm ci in web/)")
    done = subprocess.run(
        [node, "build.mjs", "--check"], cwd=WEB, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "web client up to date" in done.stdout
