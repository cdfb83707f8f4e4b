"""Runs a scenario: starts the load processes, walks them through setup and phases, and
does the accounting (wall time, server CPU, load CPU, memory) around every phase."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait
from typing import Any

from sovereign.bench import procfs
from sovereign.bench.scenarios import Outcome, Phase, Spec
from sovereign.bench.server import Account
from sovereign.bench.worker import worker_main

SATURATED = 0.9  # a load process using >= 90% of the wall time on CPU is saturated


class BenchAbort(RuntimeError):
    """The run cannot continue (a worker failed, the server died, a timeout)."""


class Coordinator:
    def __init__(
        self,
        spec: Spec,
        *,
        url: str,
        procs: int,
        source_addrs: int,
        load_cpus: list[int] | None,
        server_pid: int | None,
        server_alive: Callable[[], bool],
        log: Callable[[str], None],
        setup_timeout: float,
        drain_timeout: float,
        deadline: float,
        server_group: Callable[[], dict[str, list[int]]] | None = None,
        tail: float = 0.0,
    ) -> None:
        self.spec = spec
        #: Cluster mode: every process that serves, by part (sovereign, postgres, redis).
        #: Server CPU is then their sum (bench/cluster.py), not the one pid's.
        self.server_group = server_group
        self.url = url
        self.procs = procs
        self.source_addrs = source_addrs
        self.load_cpus = load_cpus
        self.server_pid = server_pid
        self.server_alive = server_alive
        self.log = log
        self.setup_timeout = setup_timeout
        self.drain_timeout = drain_timeout
        #: Seconds the server's CPU and disk are still counted after a phase drained:
        #: the work it deferred (SQLite's WAL checkpoint, every CHECKPOINT_S) belongs to
        #: the phase that caused it, not to the next one. Rates and latencies are not
        #: affected (see run_phase).
        self.tail = max(0.0, tail)
        self.deadline = deadline
        self.pipes: list[Pipe] = []
        self.workers: list[Any] = []

    # -- workers ----------------------------------------------------------------------------
    def start(self) -> None:
        ctx = mp.get_context("spawn")
        common = {
            "scenario": self.spec.name,
            "url": self.url,
            "source_addrs": self.source_addrs,
            "load_cpus": self.load_cpus,
        }
        for i in range(self.procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker_main, args=(child, i, common), name=f"bench-load-{i}", daemon=True
            )
            p.start()
            child.close()
            self.pipes.append(parent)
            self.workers.append(p)

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, BrokenPipeError):
                pipe.send({"op": "shutdown"})
        end = time.monotonic() + 20.0
        for p in self.workers:
            p.join(max(0.1, end - time.monotonic()))
        for p in self.workers:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
        for pipe in self.pipes:
            pipe.close()

    def _check(self) -> None:
        if not self.server_alive():
            raise BenchAbort("the server process exited during the run")
        if time.monotonic() > self.deadline:
            raise BenchAbort("--timeout reached")
        for i, p in enumerate(self.workers):
            if not p.is_alive() and p.exitcode not in (0, None):
                raise BenchAbort(f"load process {i} died (exit code {p.exitcode})")

    def _messages(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        out: list[tuple[int, dict[str, Any]]] = []
        ready = wait(self.pipes, timeout)
        for i, pipe in enumerate(self.pipes):
            if pipe not in ready:
                continue
            try:
                while pipe.poll():
                    msg: dict[str, Any] = pipe.recv()
                    if msg.get("op") == "error":
                        raise BenchAbort(
                            f"load process {i} failed: {msg['message']}\n{msg.get('traceback', '')}"
                        )
                    out.append((i, msg))
            except EOFError:
                raise BenchAbort(f"load process {i} exited unexpectedly") from None
        return out

    def _gather(self, op: str, what: str, timeout: float) -> list[dict[str, Any]]:
        got: dict[int, dict[str, Any]] = {}
        end = time.monotonic() + timeout
        next_note = time.monotonic() + 5.0
        while len(got) < self.procs:
            self._check()
            if time.monotonic() > end:
                raise BenchAbort(
                    f"{what}: only {len(got)}/{self.procs} processes answered "
                    f"within {timeout:.0f} s"
                )
            for i, msg in self._messages(0.2):
                if msg.get("op") == op:
                    got[i] = msg
            if time.monotonic() > next_note:
                next_note += 5.0
                self.log(f"{what}: {len(got)}/{self.procs} processes done")
        return [got[i] for i in range(self.procs)]

    # -- setup ------------------------------------------------------------------------------
    def setup(self, accounts: list[Account]) -> list[dict[str, Any]]:
        infos: list[dict[str, Any]] = []
        for step in range(self.spec.steps()):
            if step == 0:
                data = self.spec.plans(accounts, self.procs)
            else:
                data = self.spec.step_data(step, infos)
            t0 = time.monotonic()
            for pipe, d in zip(self.pipes, data, strict=True):
                pipe.send({"op": "setup", "step": step, "data": d})
            infos = [
                m["info"] for m in self._gather("ready", f"setup step {step}", self.setup_timeout)
            ]
            self.log(f"setup step {step} done in {time.monotonic() - t0:.1f} s")
        return infos

    # -- phases -----------------------------------------------------------------------------
    def run_phase(self, phase: Phase) -> Outcome:
        pid = phase.pid or self.server_pid
        label = f"{self.spec.name}/{phase.name}"
        start_at = time.monotonic() + 0.3
        for pipe in self.pipes:
            pipe.send(
                {
                    "op": "phase",
                    "name": phase.name,
                    "params": phase.params,
                    "start_at": start_at,
                    "duration": phase.duration,
                }
            )
        mem_before = procfs.memory(pid) if pid else None
        while time.monotonic() < start_at:
            time.sleep(max(0.0, min(0.05, start_at - time.monotonic())))
        group0 = self._group_cpu() if self.server_group is not None else None
        cpu0 = procfs.cpu_seconds(pid) if pid else None
        split0 = procfs.cpu_split(pid) if pid else None
        io0 = procfs.io_bytes(pid) if pid else {}
        drops0 = procfs.listen_drops()
        busy0 = procfs.cpu_busy()
        own0 = time.process_time()
        progress: dict[int, dict[str, Any]] = {}
        issuing_end = start_at + phase.duration
        next_line = start_at + 1.0
        last_cpu, last_t = cpu0, start_at
        prev_sums: dict[str, float] = {}
        complete = False
        while True:
            self._check()
            for i, msg in self._messages(0.05):
                if msg.get("op") == "progress":
                    progress[i] = msg["data"]
            now = time.monotonic()
            if len(progress) == self.procs and not any(p["issuing"] for p in progress.values()):
                vals = list(progress.values())
                if self.spec.complete(phase, vals):
                    complete = True
                    break
                if now > max(issuing_end, start_at) + self.drain_timeout:
                    self.log(
                        f"[{label}] not drained {self.drain_timeout:.0f} s after the end: "
                        "stopping (counts will show what is missing)"
                    )
                    break
            if now >= next_line and progress:
                next_line = now + 1.0
                sums: dict[str, float] = {}
                for p in progress.values():
                    for k, v in p.items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            sums[k] = sums.get(k, 0.0) + v
                dt = max(1e-6, now - last_t)
                rates = {k: (v - prev_sums.get(k, 0.0)) / dt for k, v in sums.items()}
                prev_sums = sums
                line = self.spec.progress_line(phase, sums, rates)
                cpu = procfs.cpu_seconds(pid) if pid else None
                extra = ""
                if cpu is not None and last_cpu is not None:
                    extra += f"  server CPU {100 * (cpu - last_cpu) / dt:.0f}%"
                    last_cpu = cpu
                last_t = now
                extra += f"  load CPU {100 * rates.get('cpu_s', 0.0):.0f}%"
                self.log(f"[{label} {now - start_at:5.1f}s] {line}{extra}")
        t_end = time.monotonic()
        drops1 = procfs.listen_drops()
        busy1 = procfs.cpu_busy()  # the machine while the load ran (saturation)
        own = time.process_time() - own0
        if pid and self.tail > 0:
            # The load has stopped; the server's deferred work has not (a checkpoint
            # of the WAL this phase wrote lands up to CHECKPOINT_S later): it is this
            # phase's cost, so the server's counters are read after it.
            tail_end = t_end + self.tail
            while (left := tail_end - time.monotonic()) > 0:
                self._check()
                self._messages(min(0.1, left))
        group1 = self._group_cpu() if self.server_group is not None else None
        cpu1 = procfs.cpu_seconds(pid) if pid else None
        split1 = procfs.cpu_split(pid) if pid else None
        io1 = procfs.io_bytes(pid) if pid else {}
        for pipe in self.pipes:
            pipe.send({"op": "end"})
        results = [m["data"] for m in self._gather("result", f"{label} results", 60.0)]
        if phase.settle > 0:
            time.sleep(phase.settle)
        mem_after = procfs.memory(pid) if pid else None
        fds_after = procfs.open_fds(pid) if pid else None
        last = [float(r.get("last_t") or 0.0) for r in results]
        end = max(last) if complete and max(last, default=0.0) > start_at else t_end
        wall = max(1e-6, end - start_at)
        server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        server_split = (
            None
            if split0 is None or split1 is None
            else (split1[0] - split0[0], split1[1] - split0[1])
        )
        parts: dict[str, float] = {}
        if group0 is not None and group1 is not None:
            user = system = 0.0
            for part, now_ in group1.items():
                before = group0.get(part, {})
                pu = ps = 0.0
                for proc_id, (u, sy) in now_.items():
                    u0, s0 = before.get(proc_id, (0.0, 0.0))  # a process born mid-phase: all of it
                    pu += u - u0
                    ps += sy - s0
                parts[part] = round(pu + ps, 2)
                user += pu
                system += ps
            server_cpu = user + system
            server_split = (user, system)
        return Outcome(
            phase=phase,
            wall_s=wall,
            server_cpu_s=server_cpu,
            load_cpu_s=[float(r["cpu_s"]) for r in results],
            results=results,
            complete=complete,
            mem_before=mem_before,
            mem_after=mem_after,
            fds_after=fds_after,
            listen_drops={k: drops1[k] - drops0.get(k, 0) for k in drops1},
            cpu_busy={k: busy1[k] - busy0.get(k, 0.0) for k in busy1},
            coordinator_cpu_s=own,
            server_io={k: io1[k] - io0.get(k, 0) for k in io1},
            server_split=server_split,
            server_cpu_parts=parts,
        )

    def _group_cpu(self) -> dict[str, dict[int, tuple[float, float]]]:
        assert self.server_group is not None
        return {part: procfs.group_split(pids) for part, pids in self.server_group().items()}

    def accounting(self, out: Outcome, n_load_cores: int | None) -> dict[str, Any]:
        """The fields every result has, next to the scenario's own."""
        wall = out.wall_s
        load = sum(out.load_cpu_s)
        cores = n_load_cores or self.procs
        per_proc_wall = [float(r.get("wall_s") or wall) for r in out.results]
        saturated = [
            i
            for i, (c, w) in enumerate(zip(out.load_cpu_s, per_proc_wall, strict=True))
            if w > 0 and c >= SATURATED * w
        ]
        merged_codes: dict[str, int] = {}
        merged_errors: dict[str, int] = {}
        merged_fail: dict[str, int] = {}
        for r in out.results:
            for src, dst in (
                (r.get("close_codes", {}), merged_codes),
                (r.get("errors", {}), merged_errors),
                (r.get("connect_failures", {}), merged_fail),
            ):
                for k, v in src.items():
                    dst[str(k)] = dst.get(str(k), 0) + int(v)
        acc: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "tail_s": self.tail if out.server_cpu_s is not None else 0.0,  # (no server pid)
            "server_cpu_s": None if out.server_cpu_s is None else round(out.server_cpu_s, 2),
            "server_cpu_parts": out.server_cpu_parts or None,
            "server_user_s": None if out.server_split is None else round(out.server_split[0], 2),
            "server_sys_s": None if out.server_split is None else round(out.server_split[1], 2),
            "server_cpu_util": None
            if out.server_cpu_s is None
            else round(out.server_cpu_s / wall, 3),
            "load_procs": self.procs,
            "load_cpu_s": round(load, 2),
            "load_cpu_per_proc": [round(c, 2) for c in out.load_cpu_s],
            "load_cpu_util": round(load / (wall * cores), 3),
            "coordinator_cpu_s": round(out.coordinator_cpu_s, 2),
            "load_saturated": bool(saturated) or load >= SATURATED * wall * cores,
            "load_saturated_procs": saturated,
            "complete": out.complete,
            "connections_lost": out.total("lost"),
            "close_codes": merged_codes,
            "server_errors": merged_errors,
            "connect_failures": merged_fail,
            "listen_overflows": out.listen_drops.get("ListenOverflows"),
        }
        if out.mem_before is not None and out.mem_after is not None:
            acc["server_rss_mb_start"] = round(out.mem_before.rss_kb / 1024, 1)
            acc["server_rss_mb_end"] = round(out.mem_after.rss_kb / 1024, 1)
            acc["server_threads"] = out.mem_after.threads
        if out.server_io:
            acc["server_disk_write_mb"] = round(out.server_io.get("write_bytes", 0) / 1e6, 1)
            acc["server_syscalls_write"] = out.server_io.get("syscw")
            acc["server_syscalls_read"] = out.server_io.get("syscr")
        if out.cpu_busy:
            # Everything else that ran on the machine meanwhile (other processes, kernel
            # work not charged to ours): large values mean the figures are contaminated.
            ours = load + (out.server_cpu_s or 0.0) + out.coordinator_cpu_s
            acc["machine_busy_s"] = round(out.cpu_busy.get("all", 0.0), 2)
            acc["other_cpu_s"] = round(max(0.0, out.cpu_busy.get("all", 0.0) - ours), 2)
            acc["cpu_busy_s"] = {
                k: round(v, 2) for k, v in sorted(out.cpu_busy.items()) if k != "all"
            }
        return acc
