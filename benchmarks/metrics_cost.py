"""The cost of counting for /metrics (SPEC §12.25, issue: <= 3 % per server CPU-second).

Runs ``sovereign-bench relay`` against a spawned server with ``metrics = true`` and
``metrics = false``, alternating, ROUNDS times each, and prints the relay throughput per
server CPU-second of each run and the median of each setting. Alternating spreads the
machine's noise (other processes, CPU frequency) over both settings.

    .venv/bin/python benchmarks/metrics_cost.py [--duration 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(metrics: bool, duration: float, out: Path) -> float:
    cmd = [
        str(Path(sys.executable).with_name("sovereign-bench")),
        "relay",
        "--duration",
        str(duration),
        "--rate",
        "max",
        "--quiet",
        "--server-env",
        f"METRICS={'true' if metrics else 'false'}",
        "--json",
        str(out),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())["results"][0]
    return float(result["per_server_cpu_s"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    figures: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for metrics in (True, False) if i % 2 == 0 else (False, True):
                value = run(metrics, args.duration, Path(tmp) / "r.json")
                figures[metrics].append(value)
                flag = str(metrics).lower()
                print(
                    f"round {i + 1} metrics={flag:5} {value:10,.0f} msgs/server-CPU-s", flush=True
                )
    on, off = statistics.median(figures[True]), statistics.median(figures[False])
    print(f"median metrics=true  {on:10,.0f} msgs/server-CPU-s")
    print(f"median metrics=false {off:10,.0f} msgs/server-CPU-s")
    print(f"cost of counting: {(off - on) / off * 100:+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
