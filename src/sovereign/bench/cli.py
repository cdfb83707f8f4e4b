"""``sovereign-bench``: command line, orchestration, cleanup.

One run = one scenario: provision accounts, start the server (or target a running one),
start the load processes, run the scenario's phases, print a table (stdout; progress on
stderr) and optionally write JSON. Exit status: 0 done, 1 aborted, 2 bad usage, 3 a
correctness check failed (targets missed are reported, not an error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sovereign import __version__
from sovereign.bench import procfs, report
from sovereign.bench.client import BenchError
from sovereign.bench.cluster import BenchCluster, default_admin_dsn
from sovereign.bench.coordinator import BenchAbort, Coordinator
from sovereign.bench.profile import Profiler, ProfilerError
from sovereign.bench.scenarios import SPECS, Outcome
from sovereign.bench.scenarios.mixed import DEFAULT_MIX, parse_mix
from sovereign.bench.server import (
    LOAD_ENV,
    Account,
    SpawnedServer,
    provision_tokens,
    provision_tokens_with,
)

FD_MARGIN = 1000  # fds a process keeps for itself (listener, SQLite, pipes, ...)
#: --tail's default: one checkpoint interval of the server's (storage.CHECKPOINT_S, 2 s:
#: the load tool does not import the server's layers; a test keeps the two in step) and
#: a second for the round itself, so a phase's last checkpoint is counted in the phase.
TAIL_S = 3.0

EPILOG = """\
examples:
  sovereign-bench relay --pairs 200 --duration 20 --json relay.json
  sovereign-bench fanout --groups 100,1000 --duration 10
  sovereign-bench resume --concurrency 64 --duration 10
  sovereign-bench idle                      # as many connections as the fd limit allows
  sovereign-bench mixed --users 2000 --rate 3000 --duration 20
  sovereign-bench relay --profile profile.svg   # py-spy flame graph of the server
  sovereign-bench relay --url ws://127.0.0.1:8080/ws --data-dir ./data --server-pid 1234
  sovereign-bench relay --storage postgres --workers 2   # a throwaway DB + redis-server
  sovereign-bench compare --duration 10   # SQLite vs PostgreSQL, 1 vs 2 workers, one run
  sovereign-bench ab --a-python ../before/.venv/bin/python relay --rate max --fixed 1000
                                          # two builds back to back, ratios per round

By default the tool spawns `python -m sovereign serve` on a temporary data dir (SQLite,
synchronous=FULL), pinned with taskset to --server-cpu, with the rate limit, per-user
connection cap, max_connections and idle timeout raised for load; the load processes
run on --load-cpus. Every result reports wall time, the server's CPU seconds (all its
threads, from /proc/PID/stat) and the load processes' CPU seconds, so throughput is also
given per server CPU-second; SAT marks a saturated load generator.
"""


def _cpus(text: str) -> list[int] | None:
    if text.lower() in ("none", "", "any"):
        return None
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return sorted(set(out))


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def _rate(text: str) -> str:
    if text in ("half", "max"):
        return text
    try:
        if all(float(r) > 0 for r in text.split(",")):
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        "'half', 'max' or positive numbers of messages/s, comma-separated"
    )


def _rates(text: str) -> str:
    if text.strip() in ("", "none"):
        return ""
    try:
        if all(float(r) > 0 for r in text.split(",")):
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError("positive numbers of messages/s, comma-separated")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of group sizes") from None
    if not sizes or any(s < 2 for s in sizes):
        raise argparse.ArgumentTypeError("every group needs at least 2 members")
    return sizes


def _mix(text: str) -> str:
    try:
        parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("load generator")
    g.add_argument(
        "--procs",
        type=_positive_int,
        default=2,
        help="load processes (default 2; raised automatically so that no process "
        "holds more connections than its open-files limit allows)",
    )
    g.add_argument(
        "--source-addrs",
        type=_positive_int,
        default=8,
        metavar="N",
        help="spread connections over source addresses 127.0.0.1..127.0.0.N, each "
        "with its own ephemeral port range (default 8; loopback targets only)",
    )
    g.add_argument(
        "--load-cpus",
        type=_cpus,
        default=[1],
        metavar="CPUS",
        help="CPUs the load processes are pinned to, e.g. 1 or 1-3 (default 1; "
        "'none' = no pinning)",
    )
    g.add_argument(
        "--connect-concurrency",
        type=_positive_int,
        default=64,
        metavar="N",
        help="connections each process opens at once during setup (default 64)",
    )
    g.add_argument(
        "--size",
        type=int,
        default=200,
        metavar="BYTES",
        help="encrypted_payload size of each message (default 200, min 8)",
    )
    g.add_argument(
        "--request-ids",
        choices=("counter", "uuid4"),
        default="counter",
        help="MESSAGE_SEND request_ids (relay): 'counter' (default; a per-pair prefix"
        " and a count, so a sender's ids sort in sending order) or 'uuid4' (random, as"
        " the SDK and the SPEC's recommendation make them)",
    )
    s = common.add_argument_group("server")
    s.add_argument(
        "--url",
        default="",
        help="target a running server (ws://HOST:PORT/ws) instead of spawning one",
    )
    s.add_argument(
        "--data-dir",
        default="",
        help="data dir: with --url, where accounts are provisioned (the token path, "
        "like `sovereign user create --print-token`); when spawning, use this "
        "dir instead of a temporary one (kept afterwards)",
    )
    s.add_argument(
        "--server-pid",
        type=int,
        default=0,
        help="with --url: the server's pid, for CPU and RSS accounting "
        "(without it those figures are missing)",
    )
    s.add_argument(
        "--server-cpu",
        type=_cpus,
        default=[0],
        metavar="CPUS",
        help="CPUs the spawned server is pinned to with taskset (default 0; 'none')",
    )
    s.add_argument(
        "--postgres-dsn",
        default="",
        metavar="DSN",
        help="run the spawned server (and provision its accounts) on this PostgreSQL "
        "database instead of SQLite (storage = postgres)",
    )
    s.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra server setting for the spawned server, e.g. "
        "SEND_BUFFER_LIMIT=8388608 (SOVEREIGN_ prefix optional; repeatable); "
        "raised for load by default: "
        + ", ".join(
            f"{k.removeprefix('SOVEREIGN_')}={v}" for k, v in LOAD_ENV.items() if "LOG" not in k
        ),
    )
    s.add_argument(
        "--server-python",
        default="",
        metavar="PYTHON",
        help="spawn the server with this interpreter (another venv, e.g. older code "
        "installed in /tmp/perf-before/.venv/bin/python) and provision its accounts "
        "with it; the load generator stays this one, so two builds compare back to back",
    )
    s.add_argument(
        "--storage",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="storage of the spawned server; postgres creates a throwaway database on "
        "--pg-dsn's server and drops it at the end (default sqlite)",
    )
    s.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="spawn `serve --workers N` (needs --storage postgres; a redis-server is "
        "started on a free port); server CPU is then the sum over the workers, the "
        "PostgreSQL backends of the run's database and redis-server",
    )
    s.add_argument(
        "--pg-dsn",
        default="",
        metavar="DSN",
        help="PostgreSQL server for --storage postgres, as a DSN to its maintenance "
        "database (default postgresql://postgres@127.0.0.1:5432/postgres)",
    )
    s.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the spawned server's temporary data dir (its path is printed)",
    )
    s.add_argument(
        "--webauthn",
        action="store_true",
        help="provision accounts by registering over the wire with real WebAuthn "
        "ceremonies (software authenticator) instead of the token path",
    )
    s.add_argument(
        "--origin",
        default="http://localhost:8080",
        help="WebAuthn origin for --webauthn (must be one of the server's "
        "rp_origins; default http://localhost:8080)",
    )
    r = common.add_argument_group("run and output")
    r.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="seconds each measured phase issues load (scenario default)",
    )
    r.add_argument(
        "--drain-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="after a phase stops issuing, how long to wait for every answer (default 15)",
    )
    r.add_argument(
        "--tail",
        type=float,
        default=TAIL_S,
        metavar="S",
        help="after a phase drained, keep counting the server's CPU and disk this long, so "
        "the work it deferred (the WAL checkpoint, every 2 s) is charged to the phase that "
        f"caused it and not to the next one (default {TAIL_S:g}; rates and latencies are "
        "not affected)",
    )
    r.add_argument(
        "--setup-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="bound on each setup step (connecting, creating groups; default 600)",
    )
    r.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="hard bound on the whole run (default 3600)",
    )
    r.add_argument("--json", default="", metavar="FILE", help="write every result as JSON")
    r.add_argument(
        "--profile",
        default="",
        metavar="FILE",
        help="record the server with `py-spy record --threads` during the measured "
        "phases: .svg flame graph, .json speedscope, else raw collapsed stacks "
        "(raw and speedscope are summarised as top functions)",
    )
    r.add_argument(
        "--profile-rate",
        type=_positive_int,
        default=100,
        metavar="HZ",
        help="py-spy sampling rate (default 100)",
    )
    r.add_argument(
        "--profile-native", action="store_true", help="py-spy --native: include C/Cython frames"
    )
    r.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    parser = argparse.ArgumentParser(
        prog="sovereign-bench",
        description="Load tool for the Sovereign server: picows clients under uvloop in "
        "several processes; results per server CPU-second.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sovereign-bench {__version__}")
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO", required=True)

    relay_help = (
        "N pairs; each: send -> echo after commit -> delivery to the peer -> peer acks -> "
        "MESSAGE_DELIVERED back. Phase 'full' is a closed loop (--window messages in flight "
        "per pair); with --rate half, open-loop 'probe@N' phases then search the open-loop "
        "capacity (the highest fixed rate with p99 send -> delivery < 50 ms) and 'half' runs "
        "at half of it; --fixed adds open loops at given rates. Latency p50/p99/p99.9: send "
        "-> delivery (timestamp in the payload), also commit (echo) and full cycle. Every "
        "phase reports server CPU (user + sys), disk written and write syscalls per message."
    )
    for name, help_, desc, fixed in (
        ("relay", "1:1 durable message cycle over many pairs", relay_help, ""),
        (
            "baseline",
            "a bare picows echo server, then the relay, under the same load generator",
            "Phase 'echo': the same connections and frame sizes against a bare picows echo "
            "server (python -m sovereign.bench.echo, spawned on the server's CPUs) gives what "
            "the transport alone does; then the relay phases (see relay --help), reported as "
            "a fraction of it. Default --fixed 1000,3000.",
            "1000,3000",
        ),
    ):
        p = sub.add_parser(
            name,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            help=help_,
            description=desc,
        )
        p.add_argument("--pairs", type=_positive_int, default=100, help="pairs (default 100)")
        p.add_argument(
            "--window",
            type=_positive_int,
            default=8,
            help="closed loop: messages in flight per pair (default 8)",
        )
        p.add_argument(
            "--rate",
            type=_rate,
            default="half",
            help="'half' (default): full speed, the open-loop capacity search, then an "
            "open loop at half the capacity; 'max': full speed only; numbers (e.g. "
            "1000,3000): only open loops at those many messages/s in total",
        )
        p.add_argument(
            "--fixed",
            type=_rates,
            default=fixed,
            metavar="RATES",
            help="open loops at these total rates after the others, e.g. 1000,3000 "
            f"(default {fixed or 'none'})",
        )
        p.add_argument(
            "--probes",
            type=_positive_int,
            default=7,
            help="most open-loop phases the capacity search runs (default 7)",
        )
        p.add_argument(
            "--probe-duration",
            type=float,
            default=5.0,
            metavar="S",
            help="seconds each capacity probe issues load (default 5)",
        )
        p.add_argument(
            "--messages",
            type=_positive_int,
            default=None,
            help="stop a phase after this many messages in total (also bounded by --duration)",
        )
        p.set_defaults(duration_default=10.0)

    p = sub.add_parser(
        "fanout",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="one sender into groups whose members are all connected",
        description="One phase per group size: user 0 sends into the group as fast as the "
        "server commits (--window uncommitted, and at most --window ahead of the members in "
        "its own process); every member counts MESSAGE_RECEIVE frames. Reports deliveries/s "
        "and deliveries per server CPU-second.",
    )
    p.add_argument(
        "--groups",
        type=_sizes,
        default=[100, 1000],
        help="group sizes, members including the sender (default 100,1000)",
    )
    p.add_argument(
        "--window", type=_positive_int, default=32, help="messages in flight (default 32)"
    )
    p.add_argument(
        "--messages",
        type=_positive_int,
        default=None,
        help="stop a phase after this many messages (also bounded by --duration)",
    )
    p.add_argument(
        "--ack",
        action="store_true",
        help="members ack what they receive (cursor writes + MESSAGE_DELIVERED)",
    )
    p.add_argument(
        "--probe-every",
        type=_positive_int,
        default=25,
        metavar="N",
        help="one member in N decodes payload timestamps for latency (default 25)",
    )
    p.set_defaults(duration_default=10.0)

    p = sub.add_parser(
        "resume",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="storms of connect + AUTH_REQUEST{session_token} until SYNC_COMPLETE",
        description="--concurrency tasks each loop: connect, resume with a session token, "
        "wait for SYNC_COMPLETE, close. Reports resumes/s and per server CPU-second, and "
        "connect -> SYNC_COMPLETE latency.",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=64,
        help="resumes in flight at once, over all processes (default 64)",
    )
    p.add_argument(
        "--users",
        type=_positive_int,
        default=None,
        help="devices (accounts) to cycle through (default: --concurrency)",
    )
    p.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        help="stop after this many resumes (also bounded by --duration)",
    )
    p.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="messages each device finds waiting (never acked, so every resume "
        "streams them again; default 0)",
    )
    p.set_defaults(duration_default=10.0)

    p = sub.add_parser(
        "idle",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="many authenticated idle connections with heartbeats; server RSS per connection",
        description="Opens --connections authenticated connections (phase 'connect'), "
        "then holds them with a PING every --heartbeat s each (phase 'hold'). Server RSS "
        "before, after connecting (+ --settle s) and after holding gives KB per connection.",
    )
    p.add_argument(
        "--connections",
        type=_positive_int,
        default=None,
        help="connections (default: as many as the server's open-files limit "
        f"allows, minus {FD_MARGIN})",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=30.0,
        metavar="S",
        help="PING interval per connection (default 30)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=2.0,
        metavar="S",
        help="wait after connecting before reading RSS (default 2)",
    )
    p.set_defaults(duration_default=35.0)

    p = sub.add_parser(
        "mixed",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="realistic traffic: messages, acks, typing, presence, history, reconnects",
        description="Users in a 1:1 conversation and a group each; an open loop issues "
        "--rate actions/s drawn by --mix weights; clients ack, dedupe and track seqs like a "
        "real client. Reports ops/s, per-kind latency and delivery correctness.",
    )
    p.add_argument("--users", type=_positive_int, default=1000, help="users (default 1000)")
    p.add_argument(
        "--rate", type=float, default=2000.0, help="actions per second in total (default 2000)"
    )
    p.add_argument(
        "--group-size",
        type=_positive_int,
        default=8,
        help="members of each user's group (default 8)",
    )
    p.add_argument(
        "--mix", type=_mix, default=DEFAULT_MIX, help=f"action weights (default {DEFAULT_MIX})"
    )
    p.set_defaults(duration_default=10.0)
    return parser


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.server: SpawnedServer | None = None
        self.echo: SpawnedServer | None = None
        self.tmpdir = ""
        self.coordinator: Coordinator | None = None
        self.profiler: Profiler | None = None
        self.source: dict[str, object] = {}
        self.cluster: BenchCluster | None = None

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"bench {time.monotonic() - self.t0:6.1f}s  {msg}", file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        print(f"bench: warning: {msg}", file=sys.stderr, flush=True)

    # -- the run ---------------------------------------------------------------------------------
    def execute(self) -> int:
        args = self.args
        spec = SPECS[args.scenario](args)
        usable = os.sched_getaffinity(0)
        for name in ("server_cpu", "load_cpus"):
            cpus = getattr(args, name)
            if cpus is not None and not set(cpus) <= usable:
                self.warn(
                    f"--{name.replace('_', '-')} {cpus} not all usable here "
                    f"({sorted(usable)}): not pinning"
                )
                setattr(args, name, None)
        if args.url:
            if args.scenario == "baseline":
                raise BenchAbort("baseline spawns its servers itself: --url is not supported")
            args.server_cpu = None
        if args.server_cpu and args.load_cpus and set(args.server_cpu) & set(args.load_cpus):
            self.warn(
                "server and load share CPUs: figures per server CPU-second still hold, "
                "but latency suffers"
            )
        nofile = procfs.raise_nofile()
        if args.scenario == "idle" and args.connections is None:
            limit = nofile
            if args.url and args.server_pid:
                limit = procfs.process_nofile(args.server_pid) or nofile
            args.connections = max(1000, (limit - FD_MARGIN) // 1000 * 1000)
        conns = spec.connections()
        need = math.ceil(conns / max(1, nofile - FD_MARGIN))
        if args.procs < need:
            self.log(
                f"{conns:,} connections need {need} load processes under an open-files "
                f"limit of {nofile:,}: using --procs {need}"
            )
            args.procs = need
        per_addr = 28_000
        if conns > args.source_addrs * per_addr:
            args.source_addrs = min(254, math.ceil(conns / per_addr) + 1)
            self.log(f"using {args.source_addrs} source addresses for {conns:,} connections")

        self.source = procfs.source_version()
        accounts = self.prepare(spec.accounts())
        pid = self.server.pid if self.server is not None else (args.server_pid or None)
        if pid is None:
            self.warn("no server pid (--server-pid): server CPU and RSS will be missing")
        if args.load_cpus:
            os.sched_setaffinity(0, set(args.load_cpus))
        coord = self.coordinator = Coordinator(
            spec,
            url=args.url_effective,
            procs=args.procs,
            source_addrs=args.source_addrs,
            load_cpus=args.load_cpus,
            server_pid=pid,
            server_alive=lambda: self.server is None or self.server.alive(),
            server_group=self._server_group() if self.cluster is not None else None,
            log=self.log,
            setup_timeout=args.setup_timeout,
            drain_timeout=args.drain_timeout,
            deadline=self.t0 + args.timeout,
            tail=args.tail,
        )
        self.log(f"starting {args.procs} load processes on CPUs {args.load_cpus or 'any'}")
        coord.start()
        coord.setup(accounts)
        if args.profile and pid:
            self.profiler = Profiler(
                args.profile, pid, rate=args.profile_rate, native=args.profile_native
            )
            self.profiler.start()
            self.log(f"py-spy recording pid {pid} into {args.profile}")
        outcomes: list[Outcome] = []
        results: list[dict[str, Any]] = []
        while (phase := spec.next_phase(outcomes)) is not None:
            self.log(f"phase {phase.name}: {phase.duration:g} s")
            out = coord.run_phase(phase)
            out.summary = spec.summarise(out)
            outcomes.append(out)
            results.append(self.result(spec.name, out, coord))
        profile_summary = None
        if self.profiler is not None:
            self.profiler.stop()
            profile_summary = self.profiler.summary()
            self.log(f"profile written to {args.profile}")
        coord.stop()
        self.coordinator = None
        exit_code, shutdown_s = (None, 0.0)
        if self.echo is not None:
            self.echo.stop()
        if self.server is not None:
            exit_code, shutdown_s = self.server.stop()
        return self.finish(results, profile_summary, exit_code, shutdown_s)

    def _server_group(self) -> Callable[[], dict[str, list[int]]]:
        cluster, server = self.cluster, self.server
        assert cluster is not None and server is not None
        return lambda: cluster.server_group(server.pid)

    def prepare(self, n_accounts: int) -> list[Account]:
        args = self.args
        nonce = args.nonce
        if args.workers > 1 and args.storage != "postgres":
            raise BenchAbort("--workers above 1 needs --storage postgres (SPEC §12.27)")
        storage_env: dict[str, str] = {}
        if args.storage == "postgres" and not args.url:
            self.cluster = BenchCluster(
                admin_dsn=args.pg_dsn or default_admin_dsn(),
                redis=args.workers > 1,
                log=self.log,
            )
            self.cluster.start()
            storage_env = self.cluster.server_env()
        if args.url:
            args.url_effective = args.url
            if args.webauthn:
                return self.register_webauthn(n_accounts, nonce)
            if not args.data_dir:
                raise BenchAbort("--url needs --data-dir (token provisioning) or --webauthn")
            self.log(f"provisioning {n_accounts:,} accounts in {args.data_dir}")
            return asyncio.run(
                provision_tokens(
                    args.data_dir,
                    n_accounts,
                    f"b{nonce}_",
                    self.log,
                    postgres_dsn=args.postgres_dsn,
                )
            )
        if args.data_dir:
            data_dir = args.data_dir
        else:
            data_dir = self.tmpdir = tempfile.mkdtemp(prefix="sovereign-bench-")
        accounts: list[Account] = []
        if not args.webauthn:
            self.log(f"provisioning {n_accounts:,} accounts (token path) in {data_dir}")
            db_env = {
                f"SOVEREIGN_{k}": v
                for k, v in storage_env.items()
                if k in ("STORAGE", "POSTGRES_DSN")
            }
            if args.postgres_dsn:
                db_env = {
                    "SOVEREIGN_STORAGE": "postgres",
                    "SOVEREIGN_POSTGRES_DSN": args.postgres_dsn,
                }
            if args.server_python:
                accounts = provision_tokens_with(
                    args.server_python, data_dir, n_accounts, f"b{nonce}_", db_env
                )
            else:
                accounts = asyncio.run(
                    provision_tokens(
                        data_dir,
                        n_accounts,
                        f"b{nonce}_",
                        self.log,
                        environ=db_env,
                        postgres_dsn=args.postgres_dsn,
                    )
                )
        env = dict(SPECS[args.scenario].server_env)
        env.update(storage_env)
        for kv in args.server_env:
            key, sep, value = kv.partition("=")
            if not sep:
                raise BenchAbort(f"--server-env {kv!r}: expected KEY=VALUE")
            env[key] = value
        if args.postgres_dsn:
            env["STORAGE"] = "postgres"
            env["POSTGRES_DSN"] = args.postgres_dsn
        from sovereign.bench.server import server_environment

        self.server = SpawnedServer(
            data_dir,
            env=server_environment(env, os.environ),
            cpus=args.server_cpu,
            log=self.log,
            python=args.server_python,
            argv=None
            if args.workers == 1
            else [
                "-m",
                "sovereign",
                "serve",
                "--data-dir",
                data_dir,
                "--listen",
                "127.0.0.1:0",
                "--workers",
                str(args.workers),
            ],
        )
        args.url_effective = self.server.start()
        self.log(
            f"server pid {self.server.pid} on CPUs {args.server_cpu or 'any'}: {args.url_effective}"
        )
        if args.scenario == "baseline":
            self.echo = SpawnedServer(
                data_dir,
                env=os.environ,
                cpus=args.server_cpu,
                log=self.log,
                argv=["-m", "sovereign.bench.echo", "--listen", "127.0.0.1:0"],
            )
            args.echo_url = self.echo.start()
            args.echo_pid = self.echo.pid
            self.log(f"echo server pid {self.echo.pid}: {args.echo_url}")
        if args.webauthn:
            accounts = self.register_webauthn(n_accounts, nonce)
        return accounts

    def register_webauthn(self, n: int, nonce: str) -> list[Account]:
        from sovereign.bench.client import AddressPool, register_webauthn

        url = self.args.url_effective
        self.log(f"registering {n:,} accounts with WebAuthn ceremonies at {url}")
        pool = AddressPool(self.args.source_addrs, urlsplit(url).hostname or "127.0.0.1")

        async def all_() -> list[Account]:
            sem = asyncio.Semaphore(32)

            async def one(i: int) -> Account:
                async with sem:
                    name = f"b{nonce}_{i:06d}"
                    uid, token = await register_webauthn(
                        url, name, self.args.origin, local_addr=pool.next()
                    )
                    return Account(uid, name, token)

            return list(await asyncio.gather(*(one(i) for i in range(n))))

        return asyncio.run(all_())

    def result(self, scenario: str, out: Outcome, coord: Coordinator) -> dict[str, Any]:
        load_cores = len(self.args.load_cpus) if self.args.load_cpus else None
        r: dict[str, Any] = {"scenario": scenario, "phase": out.phase.name}
        r.update(out.summary)
        r.update(coord.accounting(out, load_cores))
        count = r.get("count") or 0
        r["per_s"] = round(count / out.wall_s, 1) if out.wall_s > 0 else None
        cpu = out.server_cpu_s
        r["per_server_cpu_s"] = round(count / cpu, 1) if cpu else None
        if count and out.server_io:
            r["server_disk_write_kb_per_unit"] = round(
                out.server_io.get("write_bytes", 0) / 1024 / count, 2
            )
            r["server_syscalls_write_per_unit"] = round(out.server_io.get("syscw", 0) / count, 2)
            if "ctx_switches" in out.server_io:
                r["server_ctx_switches_per_unit"] = round(out.server_io["ctx_switches"] / count, 2)
        if count and out.server_split is not None:
            user, sys_ = out.server_split
            r["server_user_us_per_unit"] = round(user * 1e6 / count, 1)
            r["server_sys_us_per_unit"] = round(sys_ * 1e6 / count, 1)
            r["server_cpu_us_per_unit"] = round((user + sys_) * 1e6 / count, 1)
        r["server_cpus"] = self.args.server_cpu
        r["load_cpus"] = self.args.load_cpus
        r["duration_s"] = out.phase.duration
        clean: dict[str, Any] = _jsonable(r)
        return clean

    def finish(
        self,
        results: list[dict[str, Any]],
        profile_summary: dict[str, Any] | None,
        exit_code: int | None,
        shutdown_s: float,
    ) -> int:
        args = self.args
        problems = report.problems(results)
        srv = self.server
        if srv is not None and srv.problem_count:
            problems.append(
                f"server log: {srv.problem_count} warning/error lines, e.g. "
                + " | ".join(list(srv.problems)[:3])
            )
        if srv is not None and exit_code not in (0, None):
            problems.append(f"server exited with status {exit_code} after SIGTERM")
        headline = report.headline(results)
        print()
        print(self.header())
        print(report.table(results))
        if any(r.get("unit") == "msgs" for r in results):
            print()
            print(report.per_unit_table(results))
        if headline:
            print()
            for line in report.headline_lines(headline):
                print(line)
        notes = report.caveats(results)
        if problems:
            print("\nproblems:")
            for p in problems:
                print(f"  - {p}")
        if notes:
            print("\nnotes:")
            for p in notes:
                print(f"  - {p}")
        if profile_summary is not None:
            print()
            print(report.profile_text(profile_summary))
        if args.json:
            doc = {
                "tool": "sovereign-bench",
                "version": __version__,
                "command": ["sovereign-bench", *sys.argv[1:]],
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": procfs.machine(),
                "source": self.source,
                "server": {
                    "mode": "spawned" if srv is not None else "external",
                    "url": args.url_effective,
                    "pid": srv.pid if srv is not None else args.server_pid or None,
                    "cpus": args.server_cpu,
                    "command": srv.command if srv is not None else None,
                    "settings": {
                        k: v
                        for k, v in (srv.env.items() if srv else ())
                        if k.startswith("SOVEREIGN_")
                    },
                    "log_problem_count": srv.problem_count if srv is not None else None,
                    "log_problems": list(srv.problems)[:50] if srv is not None else [],
                    "exit_code": exit_code,
                    "shutdown_s": round(shutdown_s, 2),
                    "python": args.server_python or sys.executable,
                },
                "load": {
                    "procs": args.procs,
                    "cpus": args.load_cpus,
                    "source_addrs": args.source_addrs,
                },
                "args": {k: v for k, v in vars(args).items() if k != "url_effective"},
                "headline": headline,
                "results": results,
                "problems": problems,
                "notes": notes,
                "profile": {"file": args.profile, "summary": profile_summary}
                if args.profile
                else None,
            }
            Path(args.json).write_text(json.dumps(_jsonable(doc), indent=2) + "\n")
            self.log(f"wrote {args.json}")
        failed = any(not ok for r in results for ok in (r.get("checks") or {}).values())
        return 3 if failed else 0

    def header(self) -> str:
        args = self.args
        m = procfs.machine()
        return (
            f"sovereign-bench {args.scenario}: {m['cpus_online']} CPUs ({m['cpu_model']}), "
            f"server on CPUs {args.server_cpu or 'any'}, {args.procs} load processes on CPUs "
            f"{args.load_cpus or 'any'}, {args.source_addrs} source addresses, "
            f"{args.tail:g} s tail"
        )

    def cleanup(self) -> None:
        """Stop whatever still runs and remove the temporary data dir; every step is
        attempted even if an earlier one fails."""
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.profiler is not None and self.profiler.proc is not None:
            steps.append(("py-spy", lambda: self.profiler.stop(10.0) if self.profiler else None))
        if self.coordinator is not None:
            steps.append(("load processes", self.coordinator.stop))
        if self.server is not None and self.server.alive():
            steps.append(("server", self.server.stop))
        if self.echo is not None and self.echo.alive():
            steps.append(("echo server", self.echo.stop))
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                self.warn(f"stopping the {what} failed: {exc}")
        if self.cluster is not None:
            try:
                self.cluster.close()
            except Exception as exc:
                self.warn(f"removing the cluster's database or redis-server failed: {exc}")
        if self.tmpdir:
            if self.args.keep_data:
                self.log(f"kept data dir {self.tmpdir}")
            else:
                shutil.rmtree(self.tmpdir, ignore_errors=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items() if not isinstance(x, array)}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # several runs, each a child sovereign-bench (compare.py)
        from sovereign.bench.compare import main as compare

        return compare(argv[1:])
    if argv[:1] == ["ab"]:  # two sides, alternating, each run a child (ab.py)
        from sovereign.bench.ab import main as ab

        return ab(argv[1:])
    args = build_parser().parse_args(argv)
    if args.duration is None:
        args.duration = args.duration_default
    if args.size < 8:
        print("sovereign-bench: --size must be at least 8 (the timestamp)", file=sys.stderr)
        return 2
    args.nonce = secrets.token_hex(3)
    run = Run(args)
    try:
        return run.execute()
    except (BenchAbort, BenchError, ProfilerError, RuntimeError, OSError) as exc:
        print(f"sovereign-bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sovereign-bench: interrupted", file=sys.stderr)
        return 130
    finally:
        run.cleanup()
