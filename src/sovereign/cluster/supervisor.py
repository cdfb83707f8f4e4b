"""``sovereign serve --workers N``: N server processes sharing one port (SPEC §12.27).

Rules (docs/scaling.md):

1. The supervisor (this process) migrates the database once, then starts N workers, each
   a fresh ``python -m sovereign serve ... --worker-index I`` (a new interpreter, not a
   fork: no event loop, thread or connection crosses into a child). Every worker binds
   the same ``listen`` port with SO_REUSEPORT; the kernel spreads new connections.
2. Only worker 0 runs the admin listener (one ``/metrics`` and admin API per machine,
   at a stable address) and prints the first-run setup code.
3. SIGTERM and SIGINT are forwarded to every worker; each drains as a single server does
   (SPEC §4). The supervisor exits when all workers have exited: 0 if each exited 0.
4. A worker that exits while the supervisor is not stopping is restarted, after a delay
   that doubles with each quick failure (``backoff_min`` .. ``backoff_max``) and resets
   once a worker has run ``stable_after`` seconds. A worker that exits with status 2
   (a configuration error: every restart would fail the same way) stops them all.
5. Workers die with the supervisor (``PR_SET_PDEATHSIG``): a SIGKILLed supervisor leaves
   no orphans serving on the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger("sovereign.cluster")

CONFIG_ERROR_EXIT = 2
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec (Linux): SIGTERM when the parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Runs ``command(index)`` for each of ``workers`` indexes (see the module rules)."""

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        workers: int,
        *,
        env: dict[str, str] | None = None,
        backoff_min: float = 0.5,
        backoff_max: float = 10.0,
        stable_after: float = 30.0,
        poll: float = 0.05,
    ) -> None:
        self.command = command
        self.workers = [_Worker(i) for i in range(workers)]
        self.env = env
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.poll = poll
        self.stopping = False
        self.restarts = 0
        self._config_error = False

    # -- signals ------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("supervisor: %s, stopping %d workers", signal.Signals(signum).name,
                     len(self.workers))  # fmt: skip
        self.stopping = True
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signum)

    # -- workers ------------------------------------------------------------------
    def _spawn(self, w: _Worker) -> None:
        w.proc = subprocess.Popen(
            list(self.command(w.index)),
            stdin=subprocess.DEVNULL,
            env=self.env,
            preexec_fn=_die_with_parent,
        )
        w.started_at = time.monotonic()
        w.restart_at = None
        log.info("supervisor: worker %d started (pid %d)", w.index, w.proc.pid)

    def _reaped(self, w: _Worker, code: int) -> None:
        assert w.proc is not None
        pid = w.proc.pid
        w.proc = None
        w.exit_codes.append(code)
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        if self.stopping:
            log.info("supervisor: worker %d (pid %d) stopped, %s", w.index, pid, how)
            return
        if code == CONFIG_ERROR_EXIT:
            log.error(
                "supervisor: worker %d (pid %d) refused its configuration (%s); stopping all",
                w.index,
                pid,
                how,
            )
            self._config_error = True
            self.stopping = True
            self._forward(signal.SIGTERM)
            return
        ran = time.monotonic() - w.started_at
        w.failures = 1 if ran >= self.stable_after else w.failures + 1
        delay = min(self.backoff_max, self.backoff_min * 2 ** (w.failures - 1))
        w.restart_at = time.monotonic() + delay
        self.restarts += 1
        log.warning(
            "supervisor: worker %d (pid %d) died after %.1f s (%s); restarting in %.1f s",
            w.index,
            pid,
            ran,
            how,
            delay,
        )

    def run(self) -> int:
        """Start every worker and supervise until all have exited; the exit status."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for w in self.workers:
                if not self.stopping:
                    self._spawn(w)
            while True:
                now = time.monotonic()
                running = 0
                for w in self.workers:
                    if w.proc is not None:
                        code = w.proc.poll()
                        if code is None:
                            running += 1
                        else:
                            self._reaped(w, code)
                    elif w.restart_at is not None and not self.stopping and now >= w.restart_at:
                        self._spawn(w)
                        running += 1
                if self.stopping and running == 0:
                    break
                time.sleep(self.poll)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            for w in self.workers:  # only if run() itself failed: never leave orphans
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
        if self._config_error:
            return CONFIG_ERROR_EXIT
        last = [w.exit_codes[-1] if w.exit_codes else 0 for w in self.workers]
        log.info("supervisor: all workers stopped")
        return 0 if all(c == 0 for c in last) else 1
