"""One load-generator process: a uvloop event loop full of picows clients.

The coordinator talks to it over a ``multiprocessing`` pipe with small dicts:

- ``{"op": "setup", "step": k, "data": {...}}`` → ``{"op": "ready", "step": k, "info": {...}}``
- ``{"op": "phase", "name", "params", "start_at", "duration"}``: at ``start_at`` (a
  ``time.monotonic()`` instant; CLOCK_MONOTONIC is system-wide) the scenario issues load
  until ``start_at + duration``; meanwhile ``{"op": "progress", ...}`` every
  ``PROGRESS_EVERY`` s (faster once issuing stopped, while the phase drains).
- ``{"op": "end"}`` → ``{"op": "result", "data": {...}}`` with this process's CPU seconds.
- ``{"op": "shutdown"}``: close every connection and exit.

Any exception is reported as ``{"op": "error", "message", "traceback"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import traceback
from multiprocessing.connection import Connection as Pipe
from typing import Any

from sovereign.bench import procfs

PROGRESS_EVERY = 0.5
DRAIN_PROGRESS_EVERY = 0.05


def worker_main(pipe: Pipe, index: int, common: dict[str, Any]) -> None:
    """Process entry point (``multiprocessing`` spawn target)."""
    cpus = common.get("load_cpus")
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    procfs.raise_nofile()
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_main(pipe, index, common))


async def _main(pipe: Pipe, index: int, common: dict[str, Any]) -> None:
    from sovereign.bench.scenarios import worker_for

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    # A thread reads the pipe: the loop's add_reader would make the socket non-blocking,
    # and a large result then fails half-written. Writes stay on the loop's thread.
    def pump() -> None:
        while True:
            try:
                msg = pipe.recv()
            except (EOFError, OSError):
                msg = {"op": "shutdown"}
            loop.call_soon_threadsafe(inbox.put_nowait, msg)
            if msg["op"] == "shutdown":
                return

    threading.Thread(target=pump, name="bench-pipe", daemon=True).start()
    scenario = worker_for(common["scenario"], index, common)
    try:
        while True:
            msg = await inbox.get()
            op = msg["op"]
            if op == "setup":
                info = await scenario.setup(msg["step"], msg["data"])
                pipe.send({"op": "ready", "step": msg["step"], "info": info})
            elif op == "phase":
                await _phase(pipe, inbox, scenario, msg)
            elif op == "shutdown":
                break
    except Exception as exc:
        with contextlib.suppress(OSError):
            pipe.send(
                {
                    "op": "error",
                    "message": str(exc) or type(exc).__name__,
                    "traceback": traceback.format_exc(),
                }
            )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(scenario.teardown(), 15)


async def _phase(
    pipe: Pipe, inbox: asyncio.Queue[dict[str, Any]], scenario: Any, msg: dict[str, Any]
) -> None:
    start_at: float = msg["start_at"]
    deadline = start_at + msg["duration"]
    scenario.begin(msg["name"], msg["params"])
    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    issue = asyncio.get_running_loop().create_task(
        scenario.issue(msg["params"], start_at, deadline)
    )
    try:
        while True:
            every = PROGRESS_EVERY if not issue.done() else DRAIN_PROGRESS_EVERY
            try:
                cmd = await asyncio.wait_for(inbox.get(), every)
            except TimeoutError:
                cmd = None
            if issue.done() and issue.exception() is not None:
                raise issue.exception()  # type: ignore[misc]
            if cmd is not None:
                if cmd["op"] == "end":
                    break
                if cmd["op"] == "shutdown":
                    inbox.put_nowait(cmd)
                    break
            report = scenario.progress()
            report["issuing"] = not issue.done()
            report["cpu_s"] = time.process_time() - cpu0
            pipe.send({"op": "progress", "data": report})
    finally:
        if not issue.done():
            issue.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await issue
    data = scenario.finish()
    data["cpu_s"] = time.process_time() - cpu0
    data["wall_s"] = time.monotonic() - t0
    data["pid"] = os.getpid()
    pipe.send({"op": "result", "data": data})
