"""The instruction-count guard's workloads (``benchmarks/instructions.py``), run natively
at a small scale: they do their work, and every commit runs where the count expects it.

The guard counts instructions under valgrind, ~50x slower than here. The server decides
where a commit runs by the last commit's wall time (``sqlite_inline_commit_ms``), so a
workload that left that decision to the clock counted the writer thread's hand-offs on
one machine and not on another (+4-8% on ``cycle``, no code changed). The workloads pin
it: every commit on the loop, whatever it takes.
"""

from __future__ import annotations

import itertools
import time
import types

import pytest
from benchmarks import instructions

from sovereign.storage import database

SCALE = 0.02


@pytest.fixture
def slow_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every commit looks as slow as under valgrind: the storage's clock for commit
    timing (``perf_counter``) advances 10 ms per reading."""
    ticks = itertools.count()
    clock = types.SimpleNamespace(
        monotonic=time.monotonic,
        time_ns=time.time_ns,
        perf_counter=lambda: next(ticks) * 0.010,
    )
    monkeypatch.setattr(database, "time", clock)


@pytest.mark.parametrize("workload", instructions.WORKLOADS)
async def test_a_workload_commits_on_the_loop_however_slow(
    workload: str, slow_commits: None
) -> None:
    got = await instructions.run(workload, SCALE)
    units = max(1, int(instructions.UNITS[workload] * SCALE))
    assert got["batches_on_thread"] == 0, got
    assert got["bytes_written"] > 0
    if workload == "send":  # one commit per message
        assert got["batches"] == units
    elif workload == "send_batched":  # 50 per commit
        assert got["batches"] == -(-units // instructions.BATCH)
    elif workload == "cycle":  # the message's commit, then the ack's cursor
        assert got["batches"] == 2 * units
    else:
        assert got["batches"] == units // (instructions.GROUP - 1)


async def test_the_empty_run_commits_nothing() -> None:
    got = await instructions.run("none", SCALE)
    assert got["batches"] == 0 and got["bytes_written"] == 0


def test_a_rise_past_the_tolerance_is_a_regression() -> None:
    def counts(per_unit: int) -> dict[str, object]:
        return {"counts": {"cycle": {"per_unit": per_unit}}}

    (same,) = instructions.compare(counts(1000), counts(1049), 0.05)
    (rose,) = instructions.compare(counts(1000), counts(1051), 0.05)
    (fell,) = instructions.compare(counts(1000), counts(700), 0.05)
    assert same.startswith("ok") and "+4.9%" in same
    assert rose.startswith("REGRESSION") and "+5.1%" in rose
    assert fell.startswith("ok")
