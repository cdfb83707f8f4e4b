"""Pure-Python twin of ``sovereign._fast.fanout``: encode once, write many (SPEC §5).

A fanned-out event is encoded into one Envelope, framed once as a complete
server->client WebSocket frame (RFC 6455 §5.2: unmasked, FIN + binary opcode,
7-bit / 16-bit / 64-bit length) and that *same* ``bytes`` object is written to the
underlying asyncio transport of every recipient connection. This bypasses
``picows.WSTransport.send``, which would re-frame the payload for every connection.
A backlog for one connection (offline sync) is batched with :func:`append_ws_frame`
into one buffer and one write.

Connection contract (``sovereign.transport.ws.Connection``):

- ``conn.live``: True exactly while the connection is READY and not closed;
- ``conn.out``: the underlying transport (``write``, ``get_write_buffer_size``), or
  None once closed;
- ``conn.overflow()``: called instead of a write that would push the transport's
  write buffer past ``buffer_limit``; it drops the connection (its events stay in
  storage and arrive on reconnect).

Mutation during a fan-out: each user's connection sequence is walked as a snapshot
taken when the walk reaches that user, so an ``overflow()`` that removes connections
from ``by_user`` neither skips nor repeats anyone. Only ``overflow()`` may change
``by_user``; ``write``/``get_write_buffer_size`` and the ``live``/``out`` attributes
must not (asyncio transports don't), and nothing may change ``user_ids`` during the
call. Exceptions raised by a connection or transport propagate and end the fan-out.

The compiled module has the same API and results; ``tests/unit/test_fanout.py``
holds both to that. :func:`implementation` returns the one in use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, Protocol

from sovereign import implementations as _implementations

__all__ = [
    "FanoutConn",
    "FrameSink",
    "append_ws_frame",
    "collect",
    "fanout",
    "fanout_conns",
    "implementation",
    "write_frame",
    "ws_frame",
]


class FrameSink(Protocol):
    """The part of an asyncio write transport that fan-out uses."""

    def write(self, data: bytes, /) -> None: ...
    def get_write_buffer_size(self) -> int: ...


class FanoutConn(Protocol):
    """What fan-out needs from a connection (see the module docstring)."""

    @property
    def live(self) -> bool: ...
    @property
    def out(self) -> FrameSink | None: ...
    def overflow(self) -> None: ...


_OPCODE_BINARY_FIN = 0x82  # FIN=1, RSV=0, opcode=0x2 (binary)
_EMPTY: tuple[FanoutConn, ...] = ()


def _header(n: int) -> bytes:
    if n < 126:
        return bytes((_OPCODE_BINARY_FIN, n))
    if n <= 0xFFFF:
        return bytes((_OPCODE_BINARY_FIN, 126)) + n.to_bytes(2, "big")
    return bytes((_OPCODE_BINARY_FIN, 127)) + n.to_bytes(8, "big")


def _view(envelope: bytes | bytearray | memoryview) -> memoryview:
    mv = memoryview(envelope)
    if not mv.c_contiguous:
        raise BufferError("envelope is not C-contiguous")
    return mv


def ws_frame(envelope: bytes | bytearray | memoryview) -> bytes:
    """One complete server->client binary WebSocket frame carrying ``envelope``."""
    if type(envelope) is bytes:
        return _header(len(envelope)) + envelope
    mv = _view(envelope)
    with mv:
        return _header(mv.nbytes) + mv.tobytes()


def append_ws_frame(out: bytearray, envelope: bytes | bytearray | memoryview) -> None:
    """Append one frame to ``out`` (batch a backlog, then write ``out`` once)."""
    if not isinstance(out, bytearray):
        raise TypeError(f"out must be a bytearray, not {type(out).__name__}")
    mv = _view(envelope)
    with mv:
        out += _header(mv.nbytes)
        out += mv


def _check_frame(frame: object) -> None:
    # Immutable bytes only: transports keep a reference to it, shared by every
    # connection, until it is sent.
    if type(frame) is not bytes:
        raise TypeError(f"frame must be bytes, not {type(frame).__name__}")


def write_frame(conn: FanoutConn, frame: bytes, buffer_limit: int) -> bool:
    """Write ``frame`` to a live connection unless that would pass ``buffer_limit``.

    Past the limit, ``conn.overflow()`` is called instead. Returns True if written.
    """
    _check_frame(frame)
    if not conn.live:
        return False
    out = conn.out
    if out is None:
        return False
    if out.get_write_buffer_size() + len(frame) > buffer_limit:
        conn.overflow()
        return False
    out.write(frame)
    return True


def _fan(
    frame: bytes, n: int, conns: Iterable[FanoutConn], exclude: object, buffer_limit: int
) -> int:
    written = 0
    for conn in conns if type(conns) is tuple else tuple(conns):  # the snapshot
        if conn is exclude or not conn.live:
            continue
        out = conn.out
        if out is None:
            continue
        if out.get_write_buffer_size() + n > buffer_limit:
            conn.overflow()
            continue
        out.write(frame)
        written += 1
    return written


def fanout(
    frame: bytes,
    by_user: Mapping[str, Sequence[FanoutConn]],
    user_ids: Iterable[str],
    exclude: object | None,
    buffer_limit: int,
) -> int:
    """Write ``frame`` to every live connection of every user in ``user_ids``.

    ``exclude`` (compared by identity) is skipped: the sending connection gets its echo
    instead, while the sender's other connections receive the frame. Unknown user ids
    are ignored; pass each id once. Returns the number of connections written to.
    """
    _check_frame(frame)
    n = len(frame)
    written = 0
    get = by_user.get
    for uid in user_ids:
        conns = get(uid, _EMPTY)
        # _fan, inlined: one Python call per user costs more than the loop below
        for conn in conns if type(conns) is tuple else tuple(conns):  # the snapshot
            if conn is exclude or not conn.live:
                continue
            out = conn.out
            if out is None:
                continue
            if out.get_write_buffer_size() + n > buffer_limit:
                conn.overflow()
                continue
            out.write(frame)
            written += 1
    return written


def fanout_conns(
    frame: bytes, conns: Iterable[FanoutConn], exclude: object | None, buffer_limit: int
) -> int:
    """:func:`fanout` over a flat iterable of connections (walked as a snapshot)."""
    _check_frame(frame)
    return _fan(frame, len(frame), conns, exclude, buffer_limit)


def collect(
    frame: bytes,
    by_user: Mapping[str, Sequence[FanoutConn]],
    user_ids: Iterable[str],
    exclude: object | None,
    pending: dict[Any, bytearray],
) -> int:
    """Like :func:`fanout` but append ``frame`` to ``pending[conn]`` instead of writing,
    so the caller can write each connection's frames in one call (App.uncork)."""
    _check_frame(frame)
    collected = 0
    for uid in user_ids:
        for conn in by_user.get(uid, _EMPTY):
            if conn is exclude or not conn.live:
                continue
            buf = pending.get(conn)
            if buf is None:
                pending[conn] = bytearray(frame)
            else:
                buf += frame
            collected += 1
    return collected


def implementation() -> ModuleType:
    """``sovereign._fast.fanout`` if it is built, else this module.

    Chosen by :mod:`sovereign.implementations` (``SOVEREIGN_PURE=1`` forces this twin;
    ``SOVEREIGN_REQUIRE_FAST=1`` turns a missing compiled module into an ImportError).
    """
    return _implementations.load("fanout")
