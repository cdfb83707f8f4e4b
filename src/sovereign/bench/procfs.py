"""Process accounting from ``/proc`` (Linux): CPU seconds of every thread, RSS, limits."""

from __future__ import annotations

import os
import platform
import resource
import sys
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of ``pid``, all threads; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def io_bytes(pid: int) -> dict[str, int]:
    """/proc/PID/io: bytes written/read at the storage layer (write_bytes, read_bytes)
    and through write/read syscalls of any kind (wchar, rchar: sockets included)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/io") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("write_bytes", "read_bytes", "syscw", "syscr"):
                    out[key] = int(value)
    except OSError:
        pass
    switches = context_switches(pid)
    if switches is not None:
        out["ctx_switches"] = switches
    return out


def context_switches(pid: int) -> int | None:
    """Voluntary + involuntary context switches of every live thread of ``pid``: on one
    core, each hop between the event loop and a SQLite thread costs two."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                for line in fh:
                    if "ctxt_switches:" in line:
                        total += int(line.split()[-1])
        except (OSError, ValueError):
            continue
    return total


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        parent[int(entry)] = int(data[data.rindex(b")") + 2 :].split()[1])
    out: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.extend(kids)
        frontier.extend(kids)
    return out


def group_split(pids: list[int]) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each live pid in ``pids``."""
    out: dict[int, tuple[float, float]] = {}
    for pid in pids:
        split = cpu_split(pid)
        if split is not None:
            out[pid] = split
    return out


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid``, all its threads (not its children); None if gone.

    ``/proc/PID/stat`` counts in clock ticks (usually 10 ms): good to ~0.01 s.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ")".
    fields = data[data.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLK_TCK


@dataclass(frozen=True, slots=True)
class Memory:
    rss_kb: int
    anon_kb: int
    hwm_kb: int
    threads: int


def memory(pid: int) -> Memory | None:
    """VmRSS, RssAnon, VmHWM (peak RSS) and thread count of ``pid``; None if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            text = fh.read()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM", "Threads"):
            values[key] = int(rest.split()[0])
    return Memory(
        values.get("VmRSS", 0),
        values.get("RssAnon", 0),
        values.get("VmHWM", 0),
        values.get("Threads", 0),
    )


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def nofile_limit() -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of this process."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def process_nofile(pid: int) -> int | None:
    """The soft "Max open files" of another process."""
    try:
        with open(f"/proc/{pid}/limits") as fh:
            for line in fh:
                if line.startswith("Max open files"):
                    value = line.split()[3]
                    return None if value == "unlimited" else int(value)
    except OSError:
        return None
    return None


def cpu_busy() -> dict[str, float]:
    """Busy seconds (user+nice+system+irq+softirq+steal; not idle or iowait) of the whole
    machine ("all") and of each CPU ("cpu0", ...), from /proc/stat."""
    out: dict[str, float] = {}
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if not line.startswith("cpu"):
                    break
                f = line.split()
                user, nice, system, _idle, _iowait, irq, softirq = map(int, f[1:8])
                steal = int(f[8]) if len(f) > 8 else 0
                name = "all" if f[0] == "cpu" else f[0]
                out[name] = (user + nice + system + irq + softirq + steal) / _CLK_TCK
    except OSError:
        pass
    return out


def listen_drops() -> dict[str, int]:
    """System-wide TcpExt ListenOverflows / ListenDrops (SYNs or ACKs dropped because an
    accept queue was full): a listen backlog that is too small for a connect storm."""
    try:
        with open("/proc/net/netstat") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            d = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {
                "ListenOverflows": int(d.get("ListenOverflows", 0)),
                "ListenDrops": int(d.get("ListenDrops", 0)),
            }
    return {}


def source_version() -> dict[str, object]:
    """The git commit of the code under test and the files changed since (best effort)."""
    import subprocess

    here = os.path.abspath(__file__)  # <repo>/src/sovereign/bench/procfs.py
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(here))))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "modified": [line[3:] for line in status]}


def machine() -> dict[str, object]:
    """What the results were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
                    break
    except OSError:
        pass
    return {
        "cpus_online": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "nofile_limit": list(nofile_limit()),
    }
