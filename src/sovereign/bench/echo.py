"""A bare picows echo server: what the transport alone does on this machine.

``python -m sovereign.bench.echo [--listen HOST:PORT]`` accepts any WebSocket upgrade
and sends every binary frame back unchanged on the same connection, on uvloop, with the
same picows settings as ``sovereign serve`` (1 KiB initial read buffer, no auto-pong,
no aiofastnet). No storage, no dispatch, no protobuf: ``sovereign-bench baseline`` runs
it under the same load generator as the relay, so a report can say what fraction of the
bare transport the server reaches on this machine. SIGTERM or SIGINT stops it (exit 0).

A frame whose ninth byte is 0x01 (after the load tool's 8-byte timestamp) is echoed
only once it is durable: appended to a file (:class:`DurableLog`) and fdatasync'd, in
batches shaped like the relay's event batches (one in flight; in a stream, a batch waits
``GATHER_S`` for company), on the event loop while syncs are quick and on a writer
thread otherwise, as the relay's SQLite commits are. That is the relay's durable commit
with no SQLite and no logic: the floor of this server's design on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import picows
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
)

_BINARY = WSMsgType.BINARY
_CLOSE = WSMsgType.CLOSE
#: The event log's batching rule (sovereign.services.eventlog's EVENT_GATHER_S and
#: STREAM_S; the load tool may not import the services, tests/unit/test_layers.py, so
#: tests/integration/test_bench_tool.py checks these agree): a batch starting within
#: STREAM_S of the last waits GATHER_S for company.
GATHER_S = 0.001
STREAM_S = 0.002
#: A batch is written and synced on the event loop while the last sync took less than
#: this (seconds), else on the writer thread (sovereign.storage's INLINE_COMMIT_MS).
INLINE_S = 0.002
#: The ninth byte of a frame that is echoed only once durable.
DURABLE_MARK = 0x01
#: The log file is written round and round within this size, which is written once at
#: start-up: like a WAL started over, later writes allocate nothing.
LOG_BYTES = 64 * 1024 * 1024


class DurableLog:
    """Frames appended to a file and fdatasync'd, each echoed once its batch is synced.
    Batches as EventLog cuts them: one in flight, everything queued meanwhile in the
    next; a batch starting within ``STREAM_S`` of the last waits ``GATHER_S`` first. A
    batch is written on the loop while the last sync took under ``inline_s``, else on
    one writer thread (Database's rule for the relay's commits; 0: always the thread)."""

    def __init__(self, path: str, size: int = LOG_BYTES, inline_s: float = INLINE_S) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        # In 4 KiB writes, as walvfs writes the WAL: Linux sizes page-cache folios by the
        # writes that create them, and a small write later dirties (and writes back) its
        # whole folio. Filled in 1 MiB writes, each commit here wrote back 1 MiB.
        chunk = b"\0" * 4096
        for _ in range(size // len(chunk)):
            os.write(self.fd, chunk)
        os.fsync(self.fd)
        self.size = size - size % len(chunk)
        self.pos = 0
        self.pending: list[tuple[WSTransport, bytes]] = []
        self.busy = False
        self.last_start = float("-inf")
        self.inline_s = inline_s
        self.last_sync_s = 0.0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="echo-writer")

    def append(self, transport: WSTransport, payload: bytes) -> None:
        self.pending.append((transport, payload))
        if not self.busy:
            self.busy = True
            loop = asyncio.get_running_loop()
            if loop.time() - self.last_start < STREAM_S:
                loop.call_later(GATHER_S, self._start)
            else:
                loop.call_soon(self._start)

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self.last_start = loop.time()
        loop.call_soon(self._next)

    def _next(self) -> None:
        if not self.pending:
            self.busy = False
            return
        batch, self.pending = self.pending, []
        data = b"".join(p for _, p in batch)
        at = self.pos if self.pos + len(data) <= self.size else 0
        self.pos = at + len(data)
        loop = asyncio.get_running_loop()
        if self.last_sync_s < self.inline_s:
            fut: asyncio.Future[None] = loop.create_future()
            try:
                self._write(data, at)
            except OSError as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(None)
        else:
            fut = loop.run_in_executor(self.pool, self._write, data, at)
        fut.add_done_callback(partial(self._written, batch))

    def _write(self, data: bytes, at: int) -> None:
        t0 = time.perf_counter()
        os.pwrite(self.fd, data, at)
        os.fdatasync(self.fd)
        self.last_sync_s = time.perf_counter() - t0

    def _written(self, batch: list[tuple[WSTransport, bytes]], fut: asyncio.Future[None]) -> None:
        exc = fut.exception()
        if exc is not None:  # a load tool must not pretend: stop loudly
            print(f"echo: durable write failed: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
        try:
            for transport, payload in batch:
                transport.send(_BINARY, payload)
        finally:
            self._next()  # a connection gone meanwhile never stalls the log

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)


class EchoListener(WSListener):
    def __init__(self, log: DurableLog | None = None) -> None:
        super().__init__()
        self.log = log

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is _BINARY:
            # The frame's memory is borrowed: send() copies it into the transport.
            payload = frame.get_payload_as_memoryview()
            if self.log is not None and len(payload) > 8 and payload[8] == DURABLE_MARK:
                self.log.append(transport, bytes(payload))
            else:
                transport.send(_BINARY, payload)
        elif frame.msg_type is _CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()


async def serve(listen: str) -> int:
    host, _, port = listen.rpartition(":")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The log lives beside the relay's data dirs (the default temp dir: the same disk).
    fd, path = tempfile.mkstemp(prefix="sovereign-echo-", suffix=".log")
    os.close(fd)
    log = DurableLog(path)

    def factory(_request: WSUpgradeRequest) -> EchoListener:
        return EchoListener(log)

    try:
        return await _serve(host, port, factory, stop)
    finally:
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _serve(
    host: str, port: str, factory: Callable[[WSUpgradeRequest], EchoListener], stop: asyncio.Event
) -> int:
    server = await picows.ws_create_server(
        factory,
        host.strip("[]"),
        int(port),
        read_buffer_init_size=1024,
        enable_auto_pong=False,
        use_aiofastnet=False,
        reuse_address=True,
        backlog=4096,
    )
    addr = server.sockets[0].getsockname()
    # The same line the load tool waits for from `sovereign serve`.
    print(f"echo listening on ws://{addr[0]}:{addr[1]} (picows, uvloop)", flush=True)
    await stop.wait()
    server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sovereign.bench.echo", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1:0)")
    args = p.parse_args(argv)
    import uvloop

    return uvloop.run(serve(args.listen))


if __name__ == "__main__":
    raise SystemExit(main())
