"""The results table (stdout) and the issue's targets."""

from __future__ import annotations

import math
from typing import Any

#: Targets from issue 12 (2 cores: server pinned to one, load on the other).
TARGETS = {
    "relay_per_cpu": 25_000,
    "relay_disk_kb_full": 3.0,
    "fixed1000_cpu_us": 150.0,
    "fixed1000_disk_kb": 12.0,
    "fixed_p99_ms": 5.0,
    "fanout1000_per_cpu": 500_000,
    "resume_per_cpu": 5_000,
    "idle_kb": 8.0,
}

_RELAY = ("relay", "baseline")


def _p99(result: dict[str, Any]) -> float | None:
    lat = (result.get("latency_ms") or {}).get(result.get("headline_latency") or "") or {}
    p99 = lat.get("p99_ms")
    return None if p99 is None else float(p99)


def target(result: dict[str, Any]) -> tuple[str, bool | None]:
    """(description, met) of the issue's target for this result; ("", None) if none."""
    sc, phase = result["scenario"], result["phase"]
    per_cpu = result.get("per_server_cpu_s")
    if sc in _RELAY and phase == "full":
        t, kb = TARGETS["relay_per_cpu"], TARGETS["relay_disk_kb_full"]
        disk = result.get("server_disk_write_kb_per_unit")
        per_cpu = result.get("per_server_cpu_s")
        met = None if per_cpu is None else per_cpu >= t and (disk is None or disk <= kb)
        return f">= {t:,} msgs/server-CPU-s, <= {kb:g} KB/msg", met
    if sc in _RELAY and phase == "fixed@1000":
        cpu, kb, ms = (
            TARGETS["fixed1000_cpu_us"],
            TARGETS["fixed1000_disk_kb"],
            TARGETS["fixed_p99_ms"],
        )
        got_cpu = result.get("server_cpu_us_per_unit")
        got_kb = result.get("server_disk_write_kb_per_unit")
        p99 = _p99(result)
        if got_cpu is None or p99 is None:
            return f"<= {cpu:g} us, <= {kb:g} KB/msg, p99 < {ms:g} ms", None
        return (
            f"<= {cpu:g} us, <= {kb:g} KB/msg, p99 < {ms:g} ms",
            got_cpu <= cpu and (got_kb is None or got_kb <= kb) and p99 < ms,
        )
    if sc in _RELAY and phase.startswith("fixed@"):
        ms = TARGETS["fixed_p99_ms"]
        p99 = _p99(result)
        return f"p99 < {ms:g} ms", None if p99 is None else p99 < ms
    if sc == "fanout" and result.get("group_members") == 1000:
        t = TARGETS["fanout1000_per_cpu"]
        return f">= {t:,} deliveries/server-CPU-s", None if per_cpu is None else per_cpu >= t
    if sc == "resume":
        t = TARGETS["resume_per_cpu"]
        return f">= {t:,} resumes/server-CPU-s", None if per_cpu is None else per_cpu >= t
    if sc == "idle":
        rss = result.get("rss_kb_per_connection")
        t = TARGETS["idle_kb"]
        return f"<= {t:g} KB RSS/conn", None if rss is None else rss <= t
    return "", None


def headline(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's headline figures: the open-loop capacity, and (baseline) the relay as a
    fraction of the bare transport measured in the same run."""
    out: dict[str, Any] = {}
    echo = next((r for r in results if r["phase"] == "echo"), None)
    full = next((r for r in results if r["scenario"] in _RELAY and r["phase"] == "full"), None)
    half = next((r for r in results if r["scenario"] in _RELAY and r["phase"] == "half"), None)
    probes = [r for r in results if r["phase"].startswith("probe@")]
    if probes or half is not None:
        cap = half.get("open_loop_capacity") if half is not None else 0.0
        out["open_loop_capacity_msgs_per_s"] = cap
    if echo is not None:
        out["echo_msgs_per_server_cpu_s"] = echo.get("per_server_cpu_s")
    if echo is not None and full is not None:
        e, f = echo.get("per_server_cpu_s"), full.get("per_server_cpu_s")
        if e and f:
            out["relay_full_msgs_per_server_cpu_s"] = f
            out["relay_fraction_of_transport"] = round(f / e, 3)

    # At each fixed rate, CPU per message: the bare transport's (the relay's frames, no
    # storage, no logic), the durable echo's (the same after an fdatasync per batch:
    # the design's floor) and the relay's, so a report says what is left to cut.
    def cpu_us(phase: str) -> float | None:
        r = next((x for x in results if x["scenario"] in _RELAY and x["phase"] == phase), None)
        return None if r is None else r.get("server_cpu_us_per_unit")

    floors = []
    for r in results:
        if not r["phase"].startswith("echo@"):
            continue
        rate = r["phase"][5:]
        floors.append(
            {
                "rate": r.get("target_rate"),
                "echo_cpu_us": r.get("server_cpu_us_per_unit"),
                "durable_echo_cpu_us": cpu_us("durable@" + rate),
                "relay_cpu_us": cpu_us("fixed@" + rate),
            }
        )
    if floors:
        out["cpu_per_msg_at_fixed_rates"] = floors
    return out


def headline_lines(h: dict[str, Any]) -> list[str]:
    lines = []
    if "open_loop_capacity_msgs_per_s" in h:
        cap = h["open_loop_capacity_msgs_per_s"]
        lines.append(
            f"open-loop capacity (highest fixed rate with p99 send->delivery < 50 ms): "
            f"{_num(cap)} msgs/s"
        )
    if "relay_fraction_of_transport" in h:
        lines.append(
            f"relay at full speed: {_num(h['relay_full_msgs_per_server_cpu_s'])} msgs per "
            f"server CPU-s = {100 * h['relay_fraction_of_transport']:.1f}% of the bare picows "
            f"echo ({_num(h['echo_msgs_per_server_cpu_s'])} frames echoed per server CPU-s, "
            "same load generator, same run)"
        )
    for f in h.get("cpu_per_msg_at_fixed_rates", []):
        if None in (f["echo_cpu_us"], f["durable_echo_cpu_us"], f["relay_cpu_us"]):
            continue
        lines.append(
            f"at {_num(f['rate'])} msgs/s, server CPU per message: bare echo "
            f"{f['echo_cpu_us']:,.0f} us (2 frames in, 2 out), echo after an fdatasync "
            f"{f['durable_echo_cpu_us']:,.0f} us (the same, batched like the relay's "
            f"commits), relay {f['relay_cpu_us']:,.0f} us (2 in, 4 out: echo, delivery, Ack, "
            "MESSAGE_DELIVERED; durable)"
        )
    return lines


def per_unit_table(results: list[dict[str, Any]]) -> str:
    """Cost per message, the issue-12 table: CPU (user + sys), disk, write syscalls, p99."""
    head = [
        "phase",
        "mode",
        "msgs/s",
        "CPU us/msg (user + sys)",
        "disk KB/msg",
        "write syscalls/msg",
        "ctx switches/msg",
        "p99 ms",
    ]
    rows = [head]
    for r in results:
        if r.get("unit") != "msgs":
            continue
        target_rate = r.get("target_rate")
        mode = r.get("mode") or ""
        if target_rate:
            mode = f"open loop at {target_rate:,.0f}/s"
        user, sys_ = r.get("server_user_us_per_unit"), r.get("server_sys_us_per_unit")
        cpu = (
            "-"
            if user is None or sys_ is None
            else f"{user + sys_:,.0f} ({user:,.0f} + {sys_:,.0f})"
        )
        p99 = _p99(r)
        rows.append(
            [
                f"{r['scenario']}/{r['phase']}",
                mode,
                _num(r.get("per_s")),
                cpu,
                _num(r.get("server_disk_write_kb_per_unit"), 1),
                _num(r.get("server_syscalls_write_per_unit"), 1),
                _num(r.get("server_ctx_switches_per_unit"), 1),
                _num(p99, 2),
            ]
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            str(c).ljust(widths[i]) if i < 2 else str(c).rjust(widths[i]) for i, c in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
