"""The tasks port: request tasks answered exactly once, and background work.

Every task is kept referenced until it ends (asyncio only holds weak references) and
:meth:`TaskRunner.drain` awaits them at shutdown, before storage closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from sovereign.errors import ErrorCode, SovereignError
from sovereign.services.ports import Outbox
from sovereign.services.session import Session

log = logging.getLogger("sovereign.tasks")


class TaskRunner:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, s: Session, request_id: str, coro: Coroutine[Any, Any, None]) -> None:
        self.background(self._guard(s, request_id, coro))

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, s: Session, request_id: str, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except SovereignError as exc:
            self.outbox.send_error(s, exc.code, request_id, exc.message, exc.retry_after_ms)
        except Exception:
            # SPEC §8: an unexpected failure answers 9001 with no detail.
            log.exception("request failed")
            self.outbox.send_error(s, ErrorCode.INTERNAL_ERROR, request_id, "internal error")

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for every task, including ones they start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks:
            left = deadline - loop.time()
            if left <= 0:
                log.warning("shutdown: %d tasks still running", len(self._tasks))
                return
            await asyncio.wait(list(self._tasks), timeout=left)

    async def cancel_all(self) -> None:
        """Cancel what is still running and wait for it to unwind: called last at
        shutdown, so that nothing touches storage after it closes (SPEC §4). A
        cancelled request was never answered: its client retries, nothing is lost."""
        tasks = list(self._tasks)
        if not tasks:
            return
        log.warning("shutdown: cancelling %d unfinished tasks", len(tasks))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
