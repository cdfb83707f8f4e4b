"""``sovereign-bench compare``: SQLite vs PostgreSQL on one node, and 1 vs 2 workers on
PostgreSQL, in one run (issue 10, SPEC §12.27).

Each configuration is a separate ``sovereign-bench relay`` and ``fanout`` run (a fresh
server, database and, for 2 workers, redis-server), so they share nothing but the
machine. Reported per configuration: throughput, server CPU (every serving process:
for PostgreSQL its backends for the run's database, for 2 workers also redis-server),
throughput per server CPU-second; then the two ratios the issue asks for —
PostgreSQL / SQLite relay per CPU-second (target >= 0.6) and the 2-worker scaling ratio.
Wall-clock figures on a small shared machine are noisy: per CPU-second is the figure to
compare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS: list[tuple[str, list[str]]] = [
    ("sqlite, 1 process", ["--storage", "sqlite"]),
    ("postgres, 1 process", ["--storage", "postgres"]),
    ("postgres, 2 workers", ["--storage", "postgres", "--workers", "2"]),
]
TARGET_PG_VS_SQLITE = 0.6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sovereign-bench compare",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase (10)")
    p.add_argument("--pairs", type=int, default=100, help="relay pairs (100)")
    p.add_argument("--window", type=int, default=8, help="relay messages in flight per pair")
    p.add_argument("--group", type=int, default=100, help="fanout group size (100)")
    p.add_argument("--pg-dsn", default="", help="PostgreSQL maintenance DSN (see --help of relay)")
    p.add_argument(
        "--profile",
        default="",
        metavar="FILE",
        help="py-spy profile of the PostgreSQL single-node relay (.svg, .json or raw)",
    )
    p.add_argument(
        "--only", default="", help="comma-separated config numbers to run (1-3; default all)"
    )
    p.add_argument("--json", default="", metavar="FILE", help="write every figure as JSON")
    p.add_argument(
        "--tail",
        type=float,
        default=None,
        metavar="S",
        help="each run's --tail (default: the scenarios' own, a checkpoint interval and more)",
    )
    return p


def _run(scenario: str, extra: list[str], args: argparse.Namespace, log: Any) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [
        sys.executable, "-m", "sovereign.bench", scenario,
        "--duration", str(args.duration), "--server-cpu", "none", "--load-cpus", "none",
        "--json", out, *extra,
    ]  # fmt: skip
    if args.pg_dsn:
        cmd += ["--pg-dsn", args.pg_dsn]
    if args.tail is not None:
        cmd += ["--tail", str(args.tail)]
    if scenario == "relay":
        cmd += ["--pairs", str(args.pairs), "--window", str(args.window), "--rate", "max"]
    else:
        cmd += ["--groups", str(args.group)]
    log(" ".join(cmd[2:]))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{scenario} {extra} failed ({proc.returncode}):\n{tail}")
    doc: dict[str, Any] = json.loads(Path(out).read_text())
    Path(out).unlink(missing_ok=True)
    result = doc["results"][0]
    return {
        "scenario": scenario,
        "phase": result.get("phase"),
        "unit": result.get("unit"),
        "count": result.get("count"),
        "per_s": result.get("per_s"),
        "server_cpu_s": result.get("server_cpu_s"),
        "server_cpu_parts": result.get("server_cpu_parts"),
        "per_server_cpu_s": result.get("per_server_cpu_s"),
        "load_saturated": result.get("load_saturated"),
        "checks": result.get("checks"),
        "problems": doc.get("problems"),
        "profile": doc.get("profile"),
        "seconds": round(time.monotonic() - t0, 1),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"compare {time.monotonic() - t0:6.1f}s  {msg}", file=sys.stderr, flush=True)

    chosen = {int(x) for x in args.only.split(",") if x.strip()} or {1, 2, 3}
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for n, (name, extra) in enumerate(CONFIGS, start=1):
        if n not in chosen:
            continue
        figures[name] = {}
        for scenario in ("relay", "fanout"):
            more = list(extra)
            if args.profile and scenario == "relay" and name == "postgres, 1 process":
                more += ["--profile", args.profile]
            try:
                figures[name][scenario] = _run(scenario, more, args, log)
            except RuntimeError as exc:
                log(str(exc))
                figures[name][scenario] = {"error": str(exc).splitlines()[0]}
    print()
    print(
        f"{'configuration':<22} {'scenario':<8} {'per s':>10} {'server CPU s':>13} "
        f"{'per server CPU-s':>17}  CPU by part"
    )
    for name, by in figures.items():
        for scenario, r in by.items():
            if "error" in r:
                print(f"{name:<22} {scenario:<8} failed: {r['error']}")
                continue
            parts = ", ".join(f"{k} {v}" for k, v in (r.get("server_cpu_parts") or {}).items())
            print(
                f"{name:<22} {scenario:<8} {r['per_s'] or 0:>10,.0f} "
                f"{r['server_cpu_s'] or 0:>13.2f} {r['per_server_cpu_s'] or 0:>17,.0f}  {parts}"
            )

    def fig(name: str, scenario: str, key: str) -> float | None:
        value = figures.get(name, {}).get(scenario, {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    ratios = {
        "postgres_vs_sqlite_relay_per_cpu": _ratio(
            fig("postgres, 1 process", "relay", "per_server_cpu_s"),
            fig("sqlite, 1 process", "relay", "per_server_cpu_s"),
        ),
        "postgres_vs_sqlite_fanout_per_cpu": _ratio(
            fig("postgres, 1 process", "fanout", "per_server_cpu_s"),
            fig("sqlite, 1 process", "fanout", "per_server_cpu_s"),
        ),
        "workers_2_vs_1_relay_throughput": _ratio(
            fig("postgres, 2 workers", "relay", "per_s"),
            fig("postgres, 1 process", "relay", "per_s"),
        ),
        "workers_2_vs_1_relay_per_cpu": _ratio(
            fig("postgres, 2 workers", "relay", "per_server_cpu_s"),
            fig("postgres, 1 process", "relay", "per_server_cpu_s"),
        ),
        "workers_2_vs_1_fanout_throughput": _ratio(
            fig("postgres, 2 workers", "fanout", "per_s"),
            fig("postgres, 1 process", "fanout", "per_s"),
        ),
    }
    print()
    for key, value in ratios.items():
        print(f"{key:<36} {value if value is not None else 'n/a'}")
    pg = ratios["postgres_vs_sqlite_relay_per_cpu"]
    if pg is not None:
        verdict = "met" if pg >= TARGET_PG_VS_SQLITE else "MISSED"
        print(
            f"target: PostgreSQL >= {TARGET_PG_VS_SQLITE:.0%} of SQLite relay per CPU-s: {verdict}"
        )
    print("note: wall-clock throughput on a small shared machine is noisy; compare per CPU-s")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "ratios": ratios}, indent=2))
    return 0
