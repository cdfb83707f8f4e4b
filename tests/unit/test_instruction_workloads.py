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


@pytest.mark.parametrize("group", instructions.GROUPS)
async def test_workloads_commit_on_the_loop_however_slow(
    group: tuple[str, ...], slow_commits: None
) -> None:
    """Each group as the guard runs it: one set-up, its workloads in order."""
    got = await instructions.run(group, SCALE)
    assert list(got) == list(group)
    for workload, counters in got.items():
        units = max(1, int(instructions.UNITS[workload] * SCALE))
        assert counters["batches_on_thread"] == 0, (workload, counters)
        assert counters["bytes_written"] > 0
        if workload == "send":  # one commit per message
            assert counters["batches"] == counters["events_written"] == units
        elif workload == "send_batched":  # 50 per commit
            assert counters["batches"] == -(-units // instructions.BATCH)
            assert counters["events_written"] == units
        elif workload == "cycle":  # the message's commit, then the ack's cursor
            assert counters["batches"] == 2 * units
            assert counters["events_written"] == units
        elif workload == "relay":  # each ack's cursor rides with the next message
            assert counters["batches"] == units + 1  # the last ack's: alone
            assert counters["events_written"] == units
        else:
            assert counters["batches"] == units // (instructions.GROUP - 1)


def test_the_groups_run_every_workload_once() -> None:
    names = [w for group in instructions.GROUPS for w in group]
    assert sorted(names) == sorted(instructions.WORKLOADS)


async def test_an_unknown_workload_is_refused() -> None:
    with pytest.raises(ValueError, match="nonsense"):
        await instructions.run(["send", "nonsense"], SCALE)


def test_a_rise_past_the_tolerance_is_a_regression() -> None:
    def counts(per_unit: int) -> dict[str, object]:
        return {"counts": {"cycle": {"per_unit": per_unit}}}

    (same,) = instructions.compare(counts(1000), counts(1049), 0.05)
    (rose,) = instructions.compare(counts(1000), counts(1051), 0.05)
    (fell,) = instructions.compare(counts(1000), counts(700), 0.05)
    assert same.startswith("ok") and "+4.9%" in same
    assert rose.startswith("REGRESSION") and "+5.1%" in rose
    assert fell.startswith("ok")


def test_a_baseline_from_another_cpu_is_named() -> None:
    def run(cpu: str) -> dict[str, object]:
        return {"counts": {"cycle": {"per_unit": 1000}}, "cpu": cpu}

    rose = {"counts": {"cycle": {"per_unit": 1100}}, "cpu": "AMD EPYC"}
    lines = instructions.compare(run("Intel Xeon"), rose, 0.05)
    assert lines[0].startswith("REGRESSION")
    assert lines[1] == "note: the baseline was counted on 'Intel Xeon', this run on 'AMD EPYC'"
    assert len(instructions.compare(run("AMD EPYC"), rose, 0.05)) == 1  # same CPU: no note
    assert isinstance(instructions.cpu_model(), str)


def test_glibc_takes_every_pinned_tunable() -> None:
    """The guard's GLIBC_TUNABLES: glibc ignores a name it does not know, so check that
    the dynamic loader reports each pinned value (x86-64 glibc only)."""
    import os
    import platform
    import subprocess

    loader = "/lib64/ld-linux-x86-64.so.2"
    if platform.machine() != "x86_64" or not os.path.exists(loader):
        pytest.skip("the tunables are x86-64 glibc's")
    env = {**os.environ, "GLIBC_TUNABLES": instructions.PINNED_LIBC}
    shown = subprocess.run(
        [loader, "--list-tunables"], env=env, capture_output=True, text=True, check=True
    ).stdout
    for item in instructions.PINNED_LIBC.split(":"):
        name, value = item.split("=", 1)
        line = next(ln for ln in shown.splitlines() if ln.startswith(name + ":"))
        assert line.split(": ", 1)[1].split(" (")[0] == value, line
    features = subprocess.run(
        [loader, "--list-diagnostics"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "x86.cpu_features.preferred.Fast_Unaligned_Load=0x0" in features
