#!/usr/bin/env python3
"""Echo bot: sends every text message it receives back into its conversation.

Create the bot's account and a session token once, on the server machine::

    sovereign user create echo --print-token --data-dir ./data

then run (the token is the last word that command printed)::

    python examples/echo_bot.py --url ws://127.0.0.1:8080/ws --token TOKEN

Invite the bot (its user id is logged at start) into a conversation and write to it.

This is a transport demo: a real client encrypts with MLS and the server only ever
sees ciphertext. The bot treats ``encrypted_payload`` as opaque bytes and sends the
same bytes back, which is what an MLS-less test deployment (``mls_validation =
opaque``) and load tests want.

What the SDK does for the bot: resumes the session (same device, same delivery
cursors), reconnects with backoff when the server restarts, acknowledges every event
after the handler returned, drops duplicates, repairs seq gaps through history. The
echo uses ``request_id = "echo-" + message_id``: if the bot dies after echoing but
before its ack reached the server, the message is delivered again on restart and the
server recognises the repeated request_id (SPEC §5, idempotent send) — one echo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys

from sovereign.client import Client, Event, MessageType, SessionEnded, SovereignClientError

log = logging.getLogger("echo_bot")


# Options whose value may start with "-". argparse reads ``--token -x…`` as a missing
# value followed by an unknown option, and a base64url token starts with "-" one time
# in 64, so such a value is joined to its option (``--token=-x…``) before parsing;
# unless it is one of the bot's own options (``--token --url …``: the token is missing,
# and argparse says so).
_VALUE_OPTIONS = ("--token", "--prefix")
#: Every option string of :func:`build_parser` (a test keeps the two in step).
_OPTIONS = frozenset(
    {"-h", "--help", "--url", "--token", "--cafile", "--types", "--prefix", "-v", "--verbose"}
)


def _join_values(argv: list[str]) -> list[str]:
    joined: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUE_OPTIONS and i + 1 < len(argv):
            value = argv[i + 1]
            if value.startswith("-") and value not in _OPTIONS:
                joined.append(f"{arg}={value}")
                i += 2
                continue
        joined.append(arg)
        i += 1
    return joined


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sovereign echo bot")
    p.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="server WebSocket URL")
    p.add_argument(
        "--token",
        default=os.environ.get("SOVEREIGN_BOT_TOKEN"),
        help="session token (or SOVEREIGN_BOT_TOKEN); from `sovereign user create "
        "NAME --print-token`",
    )
    p.add_argument("--cafile", help="CA bundle to trust for wss:// (self-signed servers)")
    p.add_argument("--types", default="text", help="comma-separated message_types to echo")
    p.add_argument("--prefix", default="", help="bytes to put before every echo")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(_join_values(sys.argv[1:] if argv is None else argv))
    if not args.token:
        p.error("--token (or SOVEREIGN_BOT_TOKEN) is required")
    return args


async def run(args: argparse.Namespace) -> int:
    ssl_context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    echo_types = {t.strip() for t in args.types.split(",") if t.strip()}
    prefix = args.prefix.encode()

    client = Client(args.url, token=args.token, ssl_context=ssl_context)

    @client.on(MessageType.MESSAGE_RECEIVE)
    async def echo(event: Event) -> None:
        message = event.message
        if message.sender_id == client.user_id:  # our own echoes (other devices, sync)
            return
        if message.message_type not in echo_types:
            return
        try:
            sent = await client.send_message(
                message.conversation_id,
                prefix + message.encrypted_payload,
                message.message_type,
                request_id=f"echo-{message.message_id}",
            )
        except SovereignClientError as exc:  # e.g. 2002: removed from the conversation
            log.warning("could not echo into %s: %s", message.conversation_id, exc)
            return
        log.info("echoed seq %d into %s as seq %d", message.seq, message.conversation_id, sent.seq)

    @client.on(MessageType.GROUP_MEMBER_ADDED)
    def joined(event: Event) -> None:
        if event.message.user_id == client.user_id:
            log.info("added to conversation %s", event.conversation_id)

    @client.on(MessageType.SYNC_COMPLETE)
    def synced(event: Event) -> None:
        log.info("in sync (%d queued events delivered)", event.message.delivered)
        for conversation_id in event.message.truncated_conversation_ids:
            log.warning("history of %s was lost to retention", conversation_id)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)

    device = await client.connect(retry=True)  # waits for the server if it is not up yet
    assert device is not None
    log.info("echo bot running as %s (user id %s)", device.username, device.user_id)
    runner = asyncio.create_task(client.run_forever())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        await client.close()  # flushes pending acks
    try:
        await runner
    except SessionEnded as exc:
        log.error("%s", exc)
        return 1
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("picows").setLevel(logging.WARNING)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(args))
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
