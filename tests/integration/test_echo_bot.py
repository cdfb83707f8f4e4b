"""``examples/echo_bot.py`` as an operator runs it: a bot account and session token made
with ``sovereign user create echo --print-token``, the bot in its own process against a
real server, a person talking to it through the SDK. It echoes text (and only text),
catches up on what it missed while stopped (once), and stops cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sovereign.client import Backoff, Client, Event, MessageType, SoftwareAuthenticator
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.server import ORIGIN, run_cli, running_server

T = MessageType
ROOT = Path(__file__).resolve().parents[2]
BOT = ROOT / "examples" / "echo_bot.py"
TIMEOUT = 10.0


class Bot:
    """The echo bot in a child process; its log lines are collected as they come."""

    def __init__(self, url: str, token: str, *extra: str) -> None:
        self.args = [str(BOT), "--url", url, "--token", token, *extra]
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> Bot:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first log line matching ``pattern`` (waits for it)."""
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    m = re.search(pattern, line)
                    if m:
                        return m
                assert self._reader is not None
                if self._reader.done():
                    raise AssertionError(f"bot exited without {pattern!r}:\n{self.output}")
                self._changed.clear()
                await self._changed.wait()

    async def stop(self, sig: int) -> int:
        """Send ``sig`` and wait for the exit code (all output read)."""
        assert self.proc is not None and self._reader is not None
        self.proc.send_signal(sig)
        async with asyncio.timeout(TIMEOUT):
            code = await self.proc.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


@asynccontextmanager
async def bot_running(url: str, token: str, *extra: str) -> AsyncIterator[Bot]:
    bot = Bot(url, token, *extra)
    try:
        yield await bot.start()
    finally:
        await bot.kill()  # only if the test did not stop it


async def test_echo_bot_echoes_text_catches_up_and_stops_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    made = await asyncio.to_thread(
        run_cli, "user", "create", "echo", "--print-token", "--data-dir", str(data)
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.split()[-1]  # SPEC §12.21: the token is the last word
    m = re.search(r"created user echo \((\w+)\)", made.stdout)
    assert m, made.stdout
    bot_id = m.group(1)

    async with running_server(data) as srv:
        alice = Client(
            srv.url,
            authenticator=SoftwareAuthenticator(),
            origin=ORIGIN,
            backoff=Backoff((0.05,)),
            request_timeout=TIMEOUT,
        )
        try:
            await alice.register("alice")
            echoes: list[pb.MessageReceive] = []
            echoed = asyncio.Event()

            def on_message(event: Event) -> None:
                if event.sender_id == bot_id:
                    echoes.append(event.message)
                    echoed.set()

            alice.on(T.MESSAGE_RECEIVE, on_message)

            async def next_echo() -> pb.MessageReceive:
                seen = len(echoes)
                async with asyncio.timeout(TIMEOUT):
                    while len(echoes) == seen:
                        echoed.clear()
                        await echoed.wait()
                return echoes[seen]

            async with bot_running(srv.url, token, "--prefix", "echo: ") as bot:
                running = await bot.wait_line(r"echo bot running as echo \(user id (\w+)\)")
                assert running.group(1) == bot_id
                conv = (await alice.create_group("bot chat", [bot_id])).conversation_id
                await bot.wait_line(rf"added to conversation {conv}")

                picture = await alice.send_message(conv, b"\x89PNG...", "image")  # not text
                hello = await alice.send_message(conv, b"hello bot")
                echo = await next_echo()
                assert (echo.conversation_id, echo.encrypted_payload, echo.message_type) == (
                    conv,
                    b"echo: hello bot",
                    "text",
                )
                assert echo.seq == hello.seq + 1 == picture.seq + 2  # the image was skipped
                await bot.wait_line(rf"echoed seq {hello.seq} into {conv} as seq {echo.seq}")
                assert await bot.stop(signal.SIGTERM) == 0, bot.output
                assert "stopped" in bot.lines[-1], bot.output

            # While the bot is down: it gets this when it is back, and echoes it once.
            away = await alice.send_message(conv, b"while you were away")
            async with bot_running(srv.url, token, "--prefix", "echo: ") as bot:
                echo = await next_echo()
                assert (echo.encrypted_payload, echo.seq) == (
                    b"echo: while you were away",
                    away.seq + 1,
                )
                # Everything before was acknowledged at the SIGTERM: one queued event only.
                await bot.wait_line(r"in sync \(1 queued events delivered\)")
                after = await alice.send_message(conv, b"live again")
                echo = await next_echo()
                assert (echo.encrypted_payload, echo.seq) == (b"echo: live again", after.seq + 1)
                assert await bot.stop(signal.SIGINT) == 0, bot.output
                assert "stopped" in bot.lines[-1], bot.output
            await alice.ping()  # a round trip: any late echo would have arrived
            assert [e.encrypted_payload for e in echoes] == [
                b"echo: hello bot",
                b"echo: while you were away",
                b"echo: live again",
            ]
            history = [e async for e in alice.iter_history(conv)]
            assert [e.seq for e in history] == list(range(1, after.seq + 2))  # nothing else
        finally:
            await alice.close()


def _load_bot() -> Any:
    spec = importlib.util.spec_from_file_location("echo_bot", BOT)
    assert spec is not None and spec.loader is not None
    bot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bot)
    return bot


def test_bot_takes_a_token_or_prefix_that_starts_with_a_dash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A base64url token starts with "-" one time in 64; argparse alone reads
    ``--token -x…`` as a missing value (a CI run lost the echo bot test to exactly that)."""
    bot = _load_bot()
    monkeypatch.delenv("SOVEREIGN_BOT_TOKEN", raising=False)

    token = "-" + "A" * 42
    args = bot.parse_args(["--url", "ws://h/ws", "--token", token, "--prefix", "- ", "-v"])
    assert (args.url, args.token, args.prefix, args.verbose) == ("ws://h/ws", token, "- ", True)
    assert bot.parse_args([f"--token={token}"]).token == token
    with pytest.raises(SystemExit):
        bot.parse_args(["--token"])  # no value at all is still an error
    with pytest.raises(SystemExit):
        bot.parse_args([])


def test_a_forgotten_token_is_still_named_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--token --url X``: the next word is one of the bot's options, not a token."""
    bot = _load_bot()
    monkeypatch.delenv("SOVEREIGN_BOT_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        bot.parse_args(["--token", "--url", "ws://h/ws"])
    assert "argument --token: expected one argument" in capsys.readouterr().err
    # The joining rule knows every option the parser has.
    assert set(bot.build_parser()._option_string_actions) == bot._OPTIONS
