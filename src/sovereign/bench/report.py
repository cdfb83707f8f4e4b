"""The results table (stdout) and the issue's targets."""

from __future__ import annotations

import math
from typing import Any

#: Targets from issue 5 (2 cores: server pinned to one, load on the other).
TARGETS = {
    "relay_per_cpu": 20_000,
    "relay_p99_ms": 5.0,
    "fanout1000_per_cpu": 500_000,
    "resume_per_cpu": 5_000,
    "idle_kb": 10.0,
}


def target(result: dict[str, Any]) -> tuple[str, bool | None]:
    """(description, met) of the issue's target for this result; ("", None) if none."""
    sc, phase = result["scenario"], result["phase"]
    per_cpu = result.get("per_server_cpu_s")
    if sc == "relay" and phase == "full":
        t = TARGETS["relay_per_cpu"]
        return f">= {t:,} msgs/server-CPU-s", None if per_cpu is None else per_cpu >= t
    if sc == "relay":
        p99 = (result.get("latency_ms", {}).get("delivery") or {}).get("p99_ms")
        t = TARGETS["relay_p99_ms"]
        return f"p99 < {t:g} ms at half max", None if p99 is None else p99 < t
    if sc == "fanout" and result.get("group_members") == 1000:
        t = TARGETS["fanout1000_per_cpu"]
        return f">= {t:,} deliveries/server-CPU-s", None if per_cpu is None else per_cpu >= t
    if sc == "resume":
        t = TARGETS["resume_per_cpu"]
        return f">= {t:,} resumes/server-CPU-s", None if per_cpu is None else per_cpu >= t
    if sc == "idle":
        kb = result.get("rss_kb_per_connection")
        t = TARGETS["idle_kb"]
        return f"<= {t:g} KB RSS/conn", None if kb is None else kb <= t
    return "", None


def _num(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def table(results: list[dict[str, Any]]) -> str:
    head = [
        "scenario/phase",
        "conns",
        "wall s",
        "srv CPU s",
        "srv CPU",
        "load CPU s (procs)",
        "rate /s",
        "per srv CPU-s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "target",
        "",
    ]
    rows = [head]
    for r in results:
        lat_key = r.get("headline_latency")
        lat = (r.get("latency_ms") or {}).get(lat_key) if lat_key else None
        unit = r.get("unit", "")
        desc, met = target(r)
        util = r.get("server_cpu_util")
        load = f"{_num(r.get('load_cpu_s'), 1)} ({r.get('load_procs')})"
        if r.get("load_saturated"):
            load += " SAT"
        rate = r.get("per_s")
        if r["scenario"] == "idle" and r.get("rss_kb_per_connection") is not None:
            extra = f"{r['rss_kb_per_connection']:.1f} KB/conn"
        else:
            extra = ""
        rows.append(
            [
                f"{r['scenario']}/{r['phase']}",
                _num(r.get("connections")),
                _num(r.get("wall_s"), 1),
                _num(r.get("server_cpu_s"), 2),
                "-" if util is None else f"{100 * util:.0f}%",
                load,
                f"{_num(rate)} {unit}",
                f"{_num(r.get('per_server_cpu_s'))} {unit}".strip()
                + (f"; {extra}" if extra else ""),
                _num(lat.get("p50_ms"), 2) if lat else "-",
                _num(lat.get("p99_ms"), 2) if lat else "-",
                _num(lat.get("p999_ms"), 2) if lat else "-",
                desc,
                "" if met is None else ("met" if met else "MISSED"),
            ]
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            str(c).ljust(widths[i]) if i in (0, 5, 6, 7, 11, 12) else str(c).rjust(widths[i])
            for i, c in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def problems(results: list[dict[str, Any]]) -> list[str]:
    """Correctness: failed checks, undrained phases, lost connections, error responses."""
    out: list[str] = []
    for r in results:
        name = f"{r['scenario']}/{r['phase']}"
        for check, ok in (r.get("checks") or {}).items():
            if not ok:
                out.append(f"{name}: check failed: {check}")
        if not r.get("complete", True):
            out.append(f"{name}: did not drain (not every request was answered in time)")
        if r.get("connections_lost"):
            out.append(
                f"{name}: {r['connections_lost']} connections lost "
                f"(close codes {r.get('close_codes')})"
            )
        if r.get("server_errors"):
            out.append(f"{name}: server answered with errors {r['server_errors']}")
        if r.get("connect_failures"):
            out.append(f"{name}: connect/resume failures {r['connect_failures']}")
    return out


def caveats(results: list[dict[str, Any]]) -> list[str]:
    """What qualifies the figures: a saturated load generator, other processes on the
    machine, SYNs dropped on a full accept queue."""
    out: list[str] = []
    for r in results:
        name = f"{r['scenario']}/{r['phase']}"
        if r.get("listen_overflows"):
            out.append(
                f"{name}: {r['listen_overflows']} SYNs dropped on full accept queues "
                "(TcpExtListenOverflows, system-wide): the listen backlog is too small "
                "for this connect rate; dropped SYNs are retried after 1 s"
            )
        other = r.get("other_cpu_s")
        if other is not None and other > 0.2 * r.get("wall_s", 0) and other > 0.2:
            out.append(
                f"{name}: {other} CPU-s were used by other processes on this machine during "
                f"the phase ({r.get('wall_s')} s wall): the figures may be disturbed"
            )
        if r.get("load_saturated"):
            out.append(
                f"{name}: the load generator was saturated (load CPU {r.get('load_cpu_s')} s "
                f"over {r.get('wall_s')} s wall): the server may not be the bottleneck"
            )
    return out


def profile_text(summary: dict[str, Any], top: int = 12) -> str:
    lines = [
        f"py-spy: {summary['samples']:,} busy samples "
        f"({summary.get('idle_samples_dropped', 0):,} idle-wait samples dropped)"
    ]
    if summary.get("threads"):
        lines.append(
            "  by thread: "
            + ", ".join(f"{t['function']} {t['pct']}%" for t in summary["threads"][:6])
        )
    lines.append("  self time:")
    for e in summary["self"][:top]:
        lines.append(f"    {e['pct']:5.1f}%  {e['function']}")
    lines.append("  inclusive (sovereign code):")
    for e in summary["inclusive"][:top]:
        lines.append(f"    {e['pct']:5.1f}%  {e['function']}")
    return "\n".join(lines)
