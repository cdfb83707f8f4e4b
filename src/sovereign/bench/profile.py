"""py-spy around the measured phases, and a "top functions" summary of its output.

``--profile FILE`` attaches ``py-spy record --pid <server> --threads`` after setup and
stops it (SIGINT, which makes py-spy write FILE) after the last phase. The format
follows the extension: ``.svg`` flame graph, ``.json`` speedscope, anything else
py-spy's raw collapsed stacks; raw and speedscope output are summarised here (self and
inclusive time per function) and the summary goes into the report and the JSON.

Attaching needs ptrace permission over the server: root (as in CI), or the same user
with ``kernel.yama.ptrace_scope = 0``; in a container also ``CAP_SYS_PTRACE``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")
#: Leaf frames that are waits, which py-spy's idle detection does not always drop.
_IDLE = [
    re.compile(r"^_worker \(.*concurrent/futures/thread\.py"),  # executor queue.get
    re.compile(r"^Database\._serve \("),  # the DB writer's queue.get
    re.compile(r"^(Condition|Event|Thread|Queue|SimpleQueue)\.(wait|get|join) \("),
    # --native: the C-level waits under those
    re.compile(
        r"^(epoll_wait|epoll_pwait|poll|ppoll|select|pselect6?|sem_wait|sem_timedwait|"
        r"sem_clockwait|pthread_cond_wait|pthread_cond_timedwait|do_futex_wait|"
        r"__futex_abstimed_wait_common\w*|futex_wait|PyThread_acquire_lock_timed|"
        r"take_gil) \("
    ),
]


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def profile_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return {".svg": "flamegraph", ".json": "speedscope"}.get(suffix, "raw")


class ProfilerError(RuntimeError):
    pass


class Profiler:
    def __init__(self, out: str, pid: int, *, rate: int = 100, native: bool = False) -> None:
        self.out = out
        self.pid = pid
        self.rate = rate
        self.native = native
        self.format = profile_format(out)
        self.proc: subprocess.Popen[bytes] | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="sovereign-bench-py-spy-", suffix=".log")
        os.close(fd)
        self.command: list[str] = []

    def start(self) -> None:
        exe = find_py_spy()
        if exe is None:
            raise ProfilerError(
                "py-spy is not installed (it is in the dev extras: pip install -e '.[dev]')"
            )
        self.command = [
            exe,
            "record",
            "--pid",
            str(self.pid),
            "--threads",
            "--rate",
            str(self.rate),
            "--format",
            self.format,
            "-o",
            self.out,
        ]
        if self.native:
            self.command.append("--native")
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        time.sleep(1.0)
        if self.proc.poll() is not None:
            text = Path(self.log_path).read_text(errors="replace").strip()
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)
            self.proc = None
            hint = ""
            if "ermission" in text or "ptrace" in text.lower() or "EPERM" in text:
                hint = (
                    "\nptrace is not permitted here: run as root, or set "
                    "kernel.yama.ptrace_scope=0, or give the container CAP_SYS_PTRACE "
                    "(docker run --cap-add SYS_PTRACE)."
                )
            raise ProfilerError(f"py-spy could not attach to pid {self.pid}: {text}{hint}")

    def stop(self, timeout: float = 60.0) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.proc = None
        try:
            text = Path(self.log_path).read_text(errors="replace").strip()
            os.unlink(self.log_path)
        except OSError:
            text = ""
        if not os.path.exists(self.out):
            raise ProfilerError(f"py-spy wrote no profile: {text}")

    def summary(self, top: int = 20) -> dict[str, Any] | None:
        if self.format == "raw":
            return summarise_raw(Path(self.out).read_text(errors="replace"), top)
        if self.format == "speedscope":
            return summarise_speedscope(json.loads(Path(self.out).read_text()), top)
        return None


def _func(frame: str) -> tuple[str, str]:
    """``name (path/to/file.py:123)`` → (``name (file.py)``, ``path/to/file.py``)."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip(), ""
    return f"{m.group(1)} ({os.path.basename(m.group(2))})", m.group(2)


def _idle(leaf: str) -> bool:
    return any(p.search(leaf) for p in _IDLE)


def _summarise(stacks: list[tuple[list[str], int]], top: int) -> dict[str, Any]:
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = idle = 0
    for frames, n in stacks:
        thread = "all"
        if frames and (frames[0].startswith(("thread ", "process ")) or "(0x" in frames[0]):
            thread = frames[0].split(": ", 1)[-1] if ": " in frames[0] else frames[0]
            frames = frames[1:]
        if not frames:
            continue
        if _idle(frames[-1]):
            idle += n
            continue
        total += n
        threads[thread] = threads.get(thread, 0) + n
        funcs = [_func(f) for f in frames]
        leaf = funcs[-1][0]
        self_t[leaf] = self_t.get(leaf, 0) + n
        for name in {name for name, path in funcs if "sovereign/" in path}:
            incl[name] = incl.get(name, 0) + n

    def rank(d: dict[str, int]) -> list[dict[str, Any]]:
        items = sorted(d.items(), key=lambda kv: kv[1], reverse=True)[:top]
        return [
            {"function": k, "samples": v, "pct": round(100 * v / max(1, total), 1)}
            for k, v in items
        ]

    return {
        "samples": total,
        "idle_samples_dropped": idle,
        "threads": rank(threads),
        "self": rank(self_t),
        "inclusive": rank(incl),
    }


def summarise_raw(text: str, top: int = 20) -> dict[str, Any]:
    """py-spy ``--format raw``: one ``frame;frame;...;leaf COUNT`` line per stack."""
    stacks: list[tuple[list[str], int]] = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return _summarise(stacks, top)


def summarise_speedscope(doc: dict[str, Any], top: int = 20) -> dict[str, Any]:
    frames = doc.get("shared", {}).get("frames", [])
    names = [f"{f.get('name', '?')} ({f.get('file', '?')}:{f.get('line', 0)})" for f in frames]
    stacks: list[tuple[list[str], int]] = []
    for prof in doc.get("profiles", []):
        thread = f"thread {prof.get('name', '?')}"
        for sample, weight in zip(prof.get("samples", []), prof.get("weights", []), strict=False):
            stacks.append(([thread, *(names[i] for i in sample)], int(weight)))
    return _summarise(stacks, top)
