"""Smoke test of the load tool (``sovereign-bench``, issue 5): every scenario at tiny
scale against a server the tool spawns itself, checking the JSON for sane numbers and
for correctness (everything sent was delivered), not for speed.

The five runs start together (each with its own server and temp dir) so the module
stays well under 20 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sovereign import storage
from sovereign.bench import cli as bench_cli
from sovereign.bench import echo
from sovereign.bench.profile import summarise_raw
from sovereign.bench.scenarios.relay import message_send_parts
from sovereign.services import eventlog
from sovereign.v1 import sovereign_pb2 as pb

RUNS: dict[str, list[str]] = {
    "relay": [
        "relay",
        *("--pairs", "2", "--duration", "1", "--procs", "2"),
        *("--probes", "2", "--probe-duration", "0.5"),
    ],
    "baseline": [
        "baseline",
        *("--pairs", "2", "--duration", "0.5", "--probes", "1", "--probe-duration", "0.5"),
        *("--fixed", "100"),
    ],
    "fanout": ["fanout", "--groups", "10", "--duration", "1", "--probe-every", "3"],
    "resume": ["resume", "--count", "20", "--concurrency", "4", "--duration", "5"],
    # --server-python (the interpreter of another build) with --storage postgres: the
    # accounts must be provisioned in the run's PostgreSQL database, not in SQLite.
    "resume_pg": [
        "resume",
        *("--count", "10", "--concurrency", "2", "--duration", "3"),
        *("--storage", "postgres", "--server-python", sys.executable),
    ],
    "idle": ["idle", "--connections", "50", "--duration", "1", "--heartbeat", "0.5"],
    "mixed": ["mixed", "--users", "20", "--rate", "200", "--duration", "1", "--group-size", "4"],
    # Two sides, one round: A as spawned by default, B with a setting of its own. ab's
    # options come before the scenario; the common ones after it go to the scenario.
    "ab": [
        *("ab", "--rounds", "1", "--b-env", "METRICS=false", "--b-label", "no metrics"),
        *("relay", "--pairs", "2", "--rate", "50", "--duration", "0.5"),
    ],
    # Its own options only (it passes its runs theirs): every configuration, tiny.
    "compare": [
        *("compare", "--duration", "0.5", "--pairs", "2", "--group", "4", "--tail", "0.3"),
    ],
}
# No CPU pinning: CI machines may have one core. The JSON still carries every figure.
# A short tail (the default is a checkpoint interval and a second) keeps the runs quick.
COMMON = ["--server-cpu", "none", "--load-cpus", "none", "--quiet", "--settle", "0.2"]
COMMON += ["--tail", "0.3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("bench")
    procs: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, argv in RUNS.items():
        out = tmp / f"{name}.json"
        common = [a for a in COMMON if name == "idle" or a not in ("--settle", "0.2")]
        procs_flag = [] if "--procs" in argv else ["--procs", "1"]
        cmd = [sys.executable, "-m", "sovereign.bench", *argv, *procs_flag, *common]
        if name == "compare":
            cmd = [sys.executable, "-m", "sovereign.bench", *argv]
        if name == "ab":  # its own --json comes before the scenario
            cmd[4:4] = ["--json", str(out)]
        else:
            cmd += ["--json", str(out)]
        procs[name] = (
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            ),
            out,
        )
    results: dict[str, tuple[int, str, dict[str, Any]]] = {}
    for name, (p, out) in procs.items():
        try:
            text, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        doc = json.loads(out.read_text()) if out.exists() else {}
        results[name] = (p.returncode, text, doc)
    return results


def _common(name: str, runs: dict[str, tuple[int, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    code, text, doc = runs[name]
    assert code == 0, f"{name} exited {code}:\n{text}"
    assert doc["server"]["mode"] == "spawned"
    assert doc["server"]["exit_code"] == 0, text
    assert doc["problems"] == [], doc["problems"]
    assert doc["machine"]["cpus_online"] >= 1
    results: list[dict[str, Any]] = doc["results"]
    assert results
    for r in results:
        assert r["complete"] is True, r
        assert all(r["checks"].values()), r["checks"]
        assert r["wall_s"] > 0
        assert r["tail_s"] == 0.3
        assert r["server_cpu_s"] is not None and r["server_cpu_s"] >= 0
        assert r["load_cpu_s"] > 0
        assert r["load_procs"] >= 1
        assert r["count"] > 0 and r["per_s"] > 0
        assert r["connections_lost"] == 0
        assert r["server_errors"] == {}
    return results


def test_relay(runs: dict[str, tuple[int, str, dict[str, Any]]]) -> None:
    results = _common("relay", runs)
    phases = [r["phase"] for r in results]
    # full, then the open-loop capacity search (2 probes), then half of the capacity
    assert phases[0] == "full"
    assert [p for p in phases[1:3]] and all(p.startswith("probe@") for p in phases[1:3])
    for r in results:
        assert r["sent"] == r["echoed"] == r["received"] == r["completed"] > 0
        assert r["acks_sent"] > 0 and r["load_procs"] == 2
        lat = r["latency_ms"]["delivery"]
        assert lat["n"] == r["received"]
        assert 0 <= lat["p50_ms"] <= lat["p99_ms"] <= lat["p999_ms"] <= lat["max_ms"]
        assert r["server_cpu_us_per_unit"] == pytest.approx(
            r["server_user_us_per_unit"] + r["server_sys_us_per_unit"], abs=0.2
        )
        assert r["server_syscalls_write_per_unit"] >= 0
    assert results[0]["per_server_cpu_s"] is None or results[0]["per_server_cpu_s"] > 0
    doc = runs["relay"][2]
    capacity = doc["headline"]["open_loop_capacity_msgs_per_s"]
    if capacity:  # a probe sustained its rate (p99 < 50 ms): half runs at half of it
        assert phases[-1] == "half"
        assert results[-1]["target_rate"] == pytest.approx(capacity / 2, rel=0.01)


def test_baseline(runs: dict[str, tuple[int, str, dict[str, Any]]]) -> None:
    results = _common("baseline", runs)
    phases = [r["phase"] for r in results]
    assert phases[:5] == [
        "echo",
        "echo@100",
        "durable@100",
        "full",
        "probe@" + phases[4].removeprefix("probe@"),
    ]
    assert phases[-1] == "fixed@100"
    echo, floor, durable = results[:3]
    assert echo["sent"] == echo["received"] > 0 and echo["connections"] == 4
    assert echo["server_disk_write_kb_per_unit"] == 0
    # The relay's frames at the fixed rate: a frame on the sender's connection, then one
    # on its peer's once the first is back; a message is the two.
    for r in (floor, durable):
        assert r["mode"] == "open loop, 2 frames per message"
        assert r["target_rate"] == 100 and r["skipped"] == 0
        assert r["sent"] == r["received"] == 2 * r["count"] > 0
        assert r["latency_ms"]["echo"]["n"] == r["received"]
    # Only the durable phase's frames went to disk (each batch fdatasync'd).
    assert floor["server"] == "bare picows echo"
    assert durable["server"] == "bare picows echo, each frame after an fdatasync"
    assert floor["server_disk_write_kb_per_unit"] == 0
    assert durable["server_disk_write_kb_per_unit"] > 0
    head = runs["baseline"][2]["headline"]
    if head.get("echo_msgs_per_server_cpu_s"):
        assert head["relay_fraction_of_transport"] > 0
    (at100,) = head["cpu_per_msg_at_fixed_rates"]
    assert at100 == {
        "rate": 100,
        "echo_cpu_us": floor["server_cpu_us_per_unit"],
        "durable_echo_cpu_us": durable["server_cpu_us_per_unit"],
        "relay_cpu_us": results[-1]["server_cpu_us_per_unit"],
    }


def test_the_durable_echo_batches_by_the_event_logs_rule() -> None:
    """The floor must batch as the relay does, or it is not its floor."""
    assert echo.GATHER_S == eventlog.EVENT_GATHER_S
    assert echo.STREAM_S == eventlog.STREAM_S
    assert echo.INLINE_S * 1000 == storage.INLINE_COMMIT_MS


def test_the_default_tail_covers_a_checkpoint_interval() -> None:
    """A phase's last WAL checkpoint comes up to CHECKPOINT_S after its load stopped;
    the default tail waits for it, so the next phase is not charged with it."""
    assert bench_cli.TAIL_S >= storage.CHECKPOINT_S + 0.5


def test_fanout(runs: dict[str, tuple[int, str, dict[str, Any]]]) -> None:
    (r,) = _common("fanout", runs)
    assert r["group_members"] == 10
    assert r["messages_sent"] == r["messages_committed"] > 0
    assert r["deliveries"] == r["deliveries_expected"] == 9 * r["messages_sent"]
    assert r["latency_ms"]["delivery"]["n"] > 0


def test_resume(runs: dict[str, tuple[int, str, dict[str, Any]]]) -> None:
    (r,) = _common("resume", runs)
    assert r["resumes"] == 20 and r["failures"] == 0
    assert r["latency_ms"]["resume"]["n"] == 20


def test_resume_on_postgres_with_another_servers_python(
    runs: dict[str, tuple[int, str, dict[str, Any]]],
) -> None:
    (r,) = _common("resume_pg", runs)
    assert r["resumes"] == 10 and r["failures"] == 0


def test_idle(runs: dict[str, tuple[int, str, dict[str, Any]]]) -> None:
    connect, hold = _common("idle", runs)
    assert connect["phase"] == "connect" and connect["connections"] == 50
    assert connect["server_rss_kb_before"] > 0 and connect["server_rss_kb_after"] > 0
    assert connect["rss_kb_per_connection"] is not None
    assert hold["phase"] == "hold" and hold["connections"] == 50
    assert hold["pings"] == hold["pongs"] > 0


def test_mixed(runs: dict[str, tuple[int, str, dict[str, Any]]]) -> None:
    (r,) = _common("mixed", runs)
    assert r["deliveries_unique"] == r["deliveries_expected"]
    assert r["by_kind"]["message"]["done"] > 0
    assert all(k["failed"] == 0 for k in r["by_kind"].values())


def test_ab_runs_each_side_with_its_own_settings_and_reports_the_ratio(
    runs: dict[str, tuple[int, str, dict[str, Any]]],
) -> None:
    code, text, doc = runs["ab"]
    assert code == 0, text
    assert (doc["a"]["label"], doc["b"]["label"]) == ("before", "no metrics")
    (rnd,) = doc["rounds"]
    assert rnd["order"] == ["a", "b"]
    for side in ("a", "b"):
        (r,) = rnd[side]["results"]
        assert r["phase"] == "fixed@50" and r["complete"] and all(r["checks"].values())
        assert rnd[side]["problems"] == [], rnd[side]["problems"]
    # B's server got its setting, A's did not.
    assert rnd["b"]["server"]["settings"]["SOVEREIGN_METRICS"] == "false"
    assert "SOVEREIGN_METRICS" not in rnd["a"]["server"]["settings"]
    # The ratio is B over A, from the two runs' own figures.
    cell = doc["ratios"]["relay/fixed@50"]["CPU us per unit"]
    a_us = rnd["a"]["results"][0]["server_cpu_us_per_unit"]
    b_us = rnd["b"]["results"][0]["server_cpu_us_per_unit"]
    assert cell["a"] == [a_us] and cell["b"] == [b_us]
    assert cell["ratio"] == [round(b_us / a_us, 3)] == [cell["median"]]
    assert "relay/fixed@50" in text and "CPU us per unit" in text and "median" in text


def test_compare_runs_every_configuration_and_reports_their_ratios(
    runs: dict[str, tuple[int, str, dict[str, Any]]],
) -> None:
    code, text, doc = runs["compare"]
    assert code == 0, text
    figures = doc["figures"]
    assert list(figures) == ["sqlite, 1 process", "postgres, 1 process", "postgres, 2 workers"]
    for name, by in figures.items():
        for scenario in ("relay", "fanout"):
            r = by[scenario]
            assert "error" not in r, (name, scenario, r)
            assert r["problems"] == [] and all(r["checks"].values()), (name, scenario, r)
            assert r["count"] > 0 and r["per_server_cpu_s"] > 0, (name, scenario, r)
        parts = by["relay"]["server_cpu_parts"] or {}
        if name != "sqlite, 1 process":  # PostgreSQL's backends count as server CPU
            assert parts.get("postgres", 0) > 0, (name, parts)
        if name == "postgres, 2 workers":  # and so does the redis-server linking them
            assert "redis" in parts, parts
    # Each ratio from the two configurations' own figures.
    pg, lite = figures["postgres, 1 process"]["relay"], figures["sqlite, 1 process"]["relay"]
    ratios = doc["ratios"]
    assert ratios["postgres_vs_sqlite_relay_per_cpu"] == round(
        pg["per_server_cpu_s"] / lite["per_server_cpu_s"], 3
    )
    two = figures["postgres, 2 workers"]["relay"]
    assert ratios["workers_2_vs_1_relay_throughput"] == round(two["per_s"] / pg["per_s"], 3)
    assert all(v is not None for v in ratios.values()), ratios
    assert "target: PostgreSQL >= 60% of SQLite relay per CPU-s" in text


def test_message_send_parts_is_a_valid_message_send() -> None:
    head, tail = message_send_parts("01CONVERSATION", 300)
    body = b"\x01" * 300
    msg = pb.MessageSend.FromString(head + body + tail)
    assert (msg.conversation_id, msg.encrypted_payload, msg.message_type) == (
        "01CONVERSATION",
        body,
        "text",
    )


def test_profile_summary_drops_idle_waits() -> None:
    raw = "\n".join(
        [
            "thread (0x1): MainThread;main (sovereign/cli.py:10);send (sovereign/x.py:5) 30",
            "thread (0x1): MainThread;main (sovereign/cli.py:10);ack (sovereign/x.py:9) 10",
            "thread (0x2): pool;_worker (concurrent/futures/thread.py:81) 50",
        ]
    )
    s = summarise_raw(raw)
    assert s["samples"] == 40 and s["idle_samples_dropped"] == 50
    assert s["self"][0] == {"function": "send (x.py)", "samples": 30, "pct": 75.0}
    assert s["inclusive"][0]["function"] == "main (cli.py)"
