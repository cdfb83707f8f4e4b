"""``sovereign-bench ab``: two server builds (or settings) under one scenario, run
alternately in one session, with each round's ratio.

On a shared machine, two runs of the same tree can differ by 10-15%, so a figure taken
on another day says little about a change. What holds up is a ratio taken back to back,
several times over. Each round runs the scenario once for each side, in an alternating
order (A B, then B A, ...), so that drift in the machine's load does not always favour
the same side. Each run is a separate ``sovereign-bench SCENARIO`` child with its own
server and data dir. A side is a server interpreter (``--a-python``: the ``python`` of
another build's venv) and/or extra server settings (``--a-env KEY=VALUE``, as
``--server-env``). The load generator is this build's for both sides.

Reported per phase and per metric: each round's A → B and B/A, and the median ratio.
A run whose server logged warnings has them listed: a ``--server-env`` key that is no
setting shows there, and such a run compares nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: (label, how to read it from a result, higher is better?)
METRICS: list[tuple[str, str, bool]] = [
    ("per server CPU-s", "per_server_cpu_s", True),
    ("CPU us per unit", "server_cpu_us_per_unit", False),
    ("disk KB per unit", "server_disk_write_kb_per_unit", False),
    ("ctx switches per unit", "server_ctx_switches_per_unit", False),
    ("p99 ms", "p99", False),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sovereign-bench ab",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="example: sovereign-bench ab --a-python /tmp/before/.venv/bin/python "
        "--rounds 3 relay --pairs 200 --rate max --fixed 1000,3000 --duration 15",
    )
    for side, label in (("a", "before"), ("b", "after")):
        p.add_argument(
            f"--{side}-python",
            default="",
            metavar="PYTHON",
            help=f"side {side.upper()}'s server interpreter (default: this one)",
        )
        p.add_argument(
            f"--{side}-env",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"extra server setting for side {side.upper()} (repeatable)",
        )
        p.add_argument(f"--{side}-label", default=label, help=f"side {side.upper()}'s name")
    p.add_argument("--rounds", type=int, default=3, help="rounds of one run per side (3)")
    p.add_argument("--json", default="", metavar="FILE", help="every run's JSON and the ratios")
    p.add_argument("scenario", help="a sovereign-bench scenario (relay, fanout, baseline, ...)")
    p.add_argument(
        "args", nargs=argparse.REMAINDER, help="the scenario's own options, as for that scenario"
    )
    return p


def _side(args: argparse.Namespace, side: str) -> dict[str, Any]:
    return {
        "label": getattr(args, f"{side}_label"),
        "python": getattr(args, f"{side}_python"),
        "env": list(getattr(args, f"{side}_env")),
    }


def _command(scenario: str, extra: list[str], side: dict[str, Any], out: str) -> list[str]:
    cmd = [sys.executable, "-m", "sovereign.bench", scenario, *extra]
    if side["python"]:
        cmd += ["--server-python", side["python"]]
    for kv in side["env"]:
        cmd += ["--server-env", kv]
    return [*cmd, "--json", out]


def _run(cmd: list[str]) -> dict[str, Any]:
    """One child run: its JSON document, or ``{"error": ...}``."""
    out = cmd[-1]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        doc: dict[str, Any] = json.loads(Path(out).read_text())
    except (OSError, ValueError):
        doc = {}
    finally:
        Path(out).unlink(missing_ok=True)
    if proc.returncode not in (0, 3) or not doc.get("results"):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return doc


def _value(result: dict[str, Any], key: str) -> float | None:
    if key == "p99":
        latency = result.get("latency_ms") or {}
        headline = latency.get(result.get("headline_latency") or "") or {}
        value = headline.get("p99_ms")
    else:
        value = result.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _phases(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{r.get('scenario')}/{r.get('phase')}": r for r in doc.get("results", [])}


def ratios(rounds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """phase -> metric -> {"a": [...], "b": [...], "ratio": [B/A per round], "median"}.
    A round where either side lacks the figure (or A's is 0) has no ratio."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for rnd in rounds:
        a, b = _phases(rnd["a"]), _phases(rnd["b"])
        for phase in [p for p in a if p in b]:
            for label, key, _higher in METRICS:
                va, vb = _value(a[phase], key), _value(b[phase], key)
                if va is None or vb is None:
                    continue
                cell = table.setdefault(phase, {}).setdefault(
                    label, {"a": [], "b": [], "ratio": []}
                )
                cell["a"].append(va)
                cell["b"].append(vb)
                cell["ratio"].append(round(vb / va, 3) if va else None)
    for by_metric in table.values():
        for cell in by_metric.values():
            known = [r for r in cell["ratio"] if r is not None]
            cell["median"] = round(statistics.median(known), 3) if known else None
    return table


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def report(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> str:
    a, b = _side(args, "a"), _side(args, "b")
    lines = [
        f"A = {a['label']}: {a['python'] or 'this python'} {' '.join(a['env'])}".rstrip(),
        f"B = {b['label']}: {b['python'] or 'this python'} {' '.join(b['env'])}".rstrip(),
        f"{len(rounds)} round(s), order alternating; each cell is A → B (B/A)",
        "",
    ]
    table = ratios(rounds)
    for phase, by_metric in table.items():
        for label, _key, higher in METRICS:
            cell = by_metric.get(label)
            if cell is None:
                continue
            cells = [
                f"{_fmt(va)} → {_fmt(vb)} ({r if r is not None else 'n/a'})"
                for va, vb, r in zip(cell["a"], cell["b"], cell["ratio"], strict=True)
            ]
            better = "higher is better" if higher else "lower is better"
            median = cell["median"] if cell["median"] is not None else "n/a"
            lines.append(
                f"{phase:<22} {label:<22} {'   '.join(cells)}   median {median} ({better})"
            )
    for i, rnd in enumerate(rounds, start=1):
        for side in ("a", "b"):
            doc = rnd[side]
            problems = [doc["error"]] if "error" in doc else doc.get("problems") or []
            for problem in problems:
                lines.append(f"round {i}, {side.upper()}: {problem}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        print("sovereign-bench ab: --rounds must be at least 1", file=sys.stderr)
        return 2
    extra = args.args[1:] if args.args[:1] == ["--"] else list(args.args)
    if "--json" in extra or "--server-python" in extra:
        print(
            "sovereign-bench ab: --json and --server-python belong to ab "
            "(--json, --a-python/--b-python), not to the scenario",
            file=sys.stderr,
        )
        return 2
    t0 = time.monotonic()
    sides = {"a": _side(args, "a"), "b": _side(args, "b")}
    rounds: list[dict[str, Any]] = []
    failed = False
    for i in range(args.rounds):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        rnd: dict[str, Any] = {"order": list(order)}
        for side in order:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
                out = fh.name
            cmd = _command(args.scenario, extra, sides[side], out)
            print(
                f"ab {time.monotonic() - t0:7.1f}s  round {i + 1}/{args.rounds}: "
                f"{sides[side]['label']}",
                file=sys.stderr,
                flush=True,
            )
            rnd[side] = _run(cmd)
            failed = failed or "error" in rnd[side]
        rounds.append(rnd)
    print(report(args, rounds))
    if args.json:
        doc = {"a": sides["a"], "b": sides["b"], "rounds": rounds, "ratios": ratios(rounds)}
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 1 if failed else 0
