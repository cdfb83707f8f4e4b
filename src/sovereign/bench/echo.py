"""A bare picows echo server: what the transport alone does on this machine.

``python -m sovereign.bench.echo [--listen HOST:PORT]`` accepts any WebSocket upgrade
and sends every binary frame back unchanged on the same connection, on uvloop, with the
same picows settings as ``sovereign serve`` (1 KiB initial read buffer, no auto-pong,
no aiofastnet). No storage, no dispatch, no protobuf: ``sovereign-bench baseline`` runs
it under the same load generator as the relay, so a report can say what fraction of the
bare transport the server reaches on this machine. SIGTERM or SIGINT stops it (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

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


class EchoListener(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is _BINARY:
            # The frame's memory is borrowed: send() copies it into the transport.
            transport.send(_BINARY, frame.get_payload_as_memoryview())
        elif frame.msg_type is _CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()


def _factory(_request: WSUpgradeRequest) -> EchoListener:
    return EchoListener()


async def serve(listen: str) -> int:
    host, _, port = listen.rpartition(":")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await picows.ws_create_server(
        _factory,
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
