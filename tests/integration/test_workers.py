"""``sovereign serve --workers N`` (SPEC §12.27): the refusal with SQLite, and the
supervisor's rules (sovereign/cluster/supervisor.py) on real child processes: signals
forwarded, a crashed worker restarted with backoff, a configuration error stopping all.

The workers here are small Python programs, so the supervisor's behaviour is tested on
its own; the cluster tests (test_cluster.py) run it with real servers on PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers.server import run_cli


def test_workers_with_sqlite_are_refused_in_one_line(tmp_path: Path) -> None:
    out = run_cli("serve", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0", "--workers", "2")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert 'workers: --workers 2 needs storage = "postgres"' in lines[0]
    assert not (tmp_path / "sovereign.db").exists()  # refused before anything opened


def test_workers_must_be_positive(tmp_path: Path) -> None:
    out = run_cli("serve", "--data-dir", str(tmp_path), "--workers", "0")
    assert out.returncode == 2 and "must be 1 or more" in out.stderr


WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    index, state = sys.argv[1], sys.argv[2]
    mode = open(os.path.join(state, "mode")).read().strip() if os.path.exists(
        os.path.join(state, "mode")) else "run"
    if mode == "config-error" and index == "1":
        sys.exit(2)
    with open(os.path.join(state, f"pid-{index}-{os.getpid()}"), "w"):
        pass
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.02)
    open(os.path.join(state, f"stopped-{index}-{os.getpid()}"), "w").close()
    sys.exit(0)
    """
)

SUPERVISOR = textwrap.dedent(
    """
    import logging, sys
    from sovereign.cluster.supervisor import Supervisor
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    worker, state = sys.argv[1], sys.argv[2]
    sup = Supervisor(lambda i: [sys.executable, worker, str(i), state], 2,
                     backoff_min=0.2, backoff_max=1.0)
    sys.exit(sup.run())
    """
)


def _pids(state: Path, index: int) -> list[int]:
    return sorted(int(p.name.split("-")[2]) for p in state.glob(f"pid-{index}-*"))


def _wait(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def supervised(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    state = tmp_path / "state"
    state.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    sup = tmp_path / "sup.py"
    sup.write_text(SUPERVISOR)
    return (
        subprocess.Popen(
            [sys.executable, str(sup), str(worker), str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ),
        state,
    )


def test_supervisor_restarts_a_killed_worker_and_forwards_sigterm(
    supervised: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, state = supervised
    try:
        _wait(lambda: _pids(state, 0) and _pids(state, 1))
        first = _pids(state, 1)[0]
        os.kill(first, signal.SIGKILL)
        _wait(lambda: len(_pids(state, 1)) == 2)  # restarted, with a new pid
        assert len(_pids(state, 0)) == 1  # the other worker was left alone
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    # Every live worker got the SIGTERM and stopped cleanly.
    for index in (0, 1):
        assert (state / f"stopped-{index}-{_pids(state, index)[-1]}").exists()
    assert "worker 1" in out and "died" in out and "SIGKILL" in out and "restarting" in out
    assert "all workers stopped" in out


def test_a_worker_refusing_its_configuration_stops_all(
    supervised: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, state = supervised
    (state / "mode").write_text("config-error")
    try:
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out
    assert "refused its configuration" in out
    assert _pids(state, 1) == []  # never restarted into the same failure
    if _pids(state, 0):
        assert (state / f"stopped-0-{_pids(state, 0)[0]}").exists()


def test_workers_die_with_a_killed_supervisor(
    supervised: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, state = supervised
    _wait(lambda: _pids(state, 0) and _pids(state, 1))
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    pids = [_pids(state, 0)[0], _pids(state, 1)[0]]

    def gone() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            # A zombie is gone for our purpose (its parent, init, reaps it later).
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] != "Z":
                return False
        return True

    _wait(gone)
