"""Payload parsing and the handler shapes shared by every API module (SPEC §2, §12.7)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, Self, TypeVar

from google.protobuf.message import DecodeError

from sovereign.errors import ErrorCode, SovereignError
from sovereign.services.ports import Outbox, Tasks
from sovereign.services.session import Session


class Payload(Protocol):
    """What :func:`parse` needs of a payload class: protobuf's generated classes have
    it, and so do the codec's hot payloads (:mod:`sovereign.codec.payloads`)."""

    @classmethod
    def FromString(cls, s: bytes, /) -> Self: ...  # protobuf's name


M = TypeVar("M", bound=Payload)
Handler = Callable[[Session, int, str, memoryview], None]


def parse(outbox: Outbox, s: Session, cls: type[M], payload: memoryview, rid: str) -> M | None:
    """Parse ``payload`` as ``cls``; on failure answer the error and return None.

    After READY an unparseable payload is a non-fatal 3001. Before READY only
    parseable AUTH_* / PING are accepted, so it is the fatal 1006 (SPEC §12.7).
    """
    try:
        return cls.FromString(payload)  # type: ignore[arg-type]  # upb takes any buffer
    except (DecodeError, ValueError):
        code = ErrorCode.MALFORMED_MESSAGE if s.ready else ErrorCode.AUTH_REQUIRED
        outbox.send_error(s, code, rid, f"payload is not a valid {cls.__name__}")
        return None


def now(outbox: Outbox, cls: type[M], fn: Callable[[Session, str, M], None]) -> Handler:
    """A handler whose work is synchronous (validated and queued before returning)."""

    def handler(s: Session, _t: int, rid: str, payload: memoryview) -> None:
        msg = parse(outbox, s, cls, payload, rid)
        if msg is None:
            return
        try:
            fn(s, rid, msg)
        except SovereignError as exc:
            outbox.send_error(s, exc.code, rid, exc.message, exc.retry_after_ms)

    return handler


def later(
    outbox: Outbox,
    tasks: Tasks,
    cls: type[M],
    fn: Callable[[Session, str, M], Coroutine[Any, Any, None]],
) -> Handler:
    """A handler that needs to await (storage reads, commits)."""

    def handler(s: Session, _t: int, rid: str, payload: memoryview) -> None:
        msg = parse(outbox, s, cls, payload, rid)
        if msg is not None:
            tasks.spawn(s, rid, fn(s, rid, msg))

    return handler


C = TypeVar("C", bound=Payload)
#: (conversation id, user id) -> this node has caught up with the database on it
CatchUp = Callable[[str, str], Awaitable[None]]
#: Answers a node's memory may give too early in cluster mode (SPEC §12.27)
_LAGGING = frozenset({ErrorCode.GROUP_NOT_FOUND, ErrorCode.NOT_GROUP_MEMBER})


def catching_up(
    tasks: Tasks, catch_up: CatchUp | None, fn: Callable[[Session, str, C], None]
) -> Callable[[Session, str, C], None]:
    """Cluster mode: a request that this node's memory refuses as "unknown conversation"
    or "not a member" is decided once more after the node has caught up with the
    database on that conversation (another node may have just created it, or added the
    sender, and the bus not yet brought it here). On a single node: ``fn`` itself."""
    if catch_up is None:
        return fn
    wait = catch_up

    def handler(s: Session, rid: str, msg: C) -> None:
        try:
            fn(s, rid, msg)
        except SovereignError as exc:
            if exc.code not in _LAGGING:
                raise

            async def again() -> None:
                await wait(msg.conversation_id, s.user_id)  # type: ignore[attr-defined]
                fn(s, rid, msg)

            tasks.spawn(s, rid, again())

    return handler


def catching_up_later(
    catch_up: CatchUp | None, fn: Callable[[Session, str, C], Coroutine[Any, Any, None]]
) -> Callable[[Session, str, C], Coroutine[Any, Any, None]]:
    """:func:`catching_up` for a handler that awaits."""
    if catch_up is None:
        return fn
    wait = catch_up

    async def handler(s: Session, rid: str, msg: C) -> None:
        try:
            await fn(s, rid, msg)
        except SovereignError as exc:
            if exc.code not in _LAGGING:
                raise
            await wait(msg.conversation_id, s.user_id)  # type: ignore[attr-defined]
            await fn(s, rid, msg)

    return handler
