"""TLS presentation language reader and writer, as RFC 9420 §2.1 uses it.

* ``uint8/16/32/64``: big-endian, fixed width.
* ``opaque x<V>`` and ``T x<V>``: a variable-length integer byte count (§2.1.2), then the
  bytes. The length prefix takes 1, 2 or 4 bytes, chosen by the top two bits of its first
  byte (``00``: 6-bit value, ``01``: 14-bit, ``10``: 30-bit); ``11`` is reserved and
  rejected. A length must use the shortest form that holds it ("minimum-size encoding",
  §2.1.2), so every value has exactly one encoding and decode → encode is the identity.
* ``optional<T>``: one presence byte, ``0`` (absent) or ``1`` (present, then ``T``);
  any other value is rejected.
* fixed arrays: a known number of bytes.

Every decoding failure raises :class:`MLSDecodeError` (a :class:`ValueError`) naming
the structure/field and the reason. Nothing here performs I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = [
    "BAD_ENUM",
    "BAD_LENGTH",
    "BAD_OPTIONAL",
    "NON_MINIMAL",
    "RESERVED_PREFIX",
    "TRAILING",
    "TRUNCATED",
    "UNKNOWN_WIRE_FORMAT",
    "UNSUPPORTED_VERSION",
    "VARINT_MAX",
    "WRONG_WIRE_FORMAT",
    "MLSDecodeError",
    "Reader",
    "Writer",
    "encode_varint",
]

T = TypeVar("T")

# Reasons (the ``reason`` attribute of MLSDecodeError).
TRUNCATED = "truncated"
TRAILING = "trailing bytes"
NON_MINIMAL = "non-minimal length encoding"
RESERVED_PREFIX = "reserved length prefix 0b11"
BAD_ENUM = "bad enum value"
BAD_OPTIONAL = "bad optional presence byte"
BAD_LENGTH = "length not a multiple of the element size"
UNKNOWN_WIRE_FORMAT = "unknown wire_format"
UNSUPPORTED_VERSION = "unsupported protocol version"
WRONG_WIRE_FORMAT = "unexpected wire_format"

VARINT_MAX = (1 << 30) - 1
_U8, _U16, _U32, _U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF


class MLSDecodeError(ValueError):
    """Bytes that are not the expected RFC 9420 structure.

    ``field`` names the structure/field being read (``"KeyPackage.init_key"``), ``reason``
    is one of the module's reason constants; ``str(err)`` is ``"<field>: <reason>"``
    plus a short detail.
    """

    def __init__(self, field: str, reason: str, detail: str = "") -> None:
        self.field = field
        self.reason = reason
        self.detail = detail
        super().__init__(f"{field}: {reason}" + (f" ({detail})" if detail else ""))


class Reader:
    """Reads TLS-encoded values from ``data[start:end]`` with exact bounds checks."""

    __slots__ = ("_buf", "_end", "_pos")

    def __init__(
        self, data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None
    ) -> None:
        buf = data if isinstance(data, memoryview) else memoryview(data)
        if buf.format != "B" or buf.ndim != 1:
            buf = memoryview(buf.tobytes())
        self._buf = buf
        self._pos = start
        self._end = len(buf) if end is None else end

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def _take(self, n: int, field: str) -> int:
        pos = self._pos
        if n > self._end - pos:
            raise MLSDecodeError(field, TRUNCATED, f"need {n} bytes, {self._end - pos} left")
        self._pos = pos + n
        return pos

    def uint8(self, field: str) -> int:
        pos = self._take(1, field)
        return self._buf[pos]

    def uint16(self, field: str) -> int:
        pos = self._take(2, field)
        return int.from_bytes(self._buf[pos : pos + 2], "big")

    def uint32(self, field: str) -> int:
        pos = self._take(4, field)
        return int.from_bytes(self._buf[pos : pos + 4], "big")

    def uint64(self, field: str) -> int:
        pos = self._take(8, field)
        return int.from_bytes(self._buf[pos : pos + 8], "big")

    def fixed(self, n: int, field: str) -> bytes:
        pos = self._take(n, field)
        return bytes(self._buf[pos : pos + n])

    def varint(self, field: str) -> int:
        """An RFC 9420 §2.1.2 variable-length integer (a vector length)."""
        pos = self._take(1, field)
        first = self._buf[pos]
        prefix = first >> 6
        if prefix == 0:
            return first
        if prefix == 3:
            raise MLSDecodeError(field, RESERVED_PREFIX, f"first byte 0x{first:02x}")
        if prefix == 1:
            pos = self._take(1, field)
            value = ((first & 0x3F) << 8) | self._buf[pos]
            if value < 0x40:
                raise MLSDecodeError(field, NON_MINIMAL, f"{value} in 2 bytes")
            return value
        pos = self._take(3, field)
        value = ((first & 0x3F) << 24) | int.from_bytes(self._buf[pos : pos + 3], "big")
        if value < 0x4000:
            raise MLSDecodeError(field, NON_MINIMAL, f"{value} in 4 bytes")
        return value

    def opaque(self, field: str) -> bytes:
        """``opaque x<V>``."""
        n = self.varint(field)
        pos = self._take(n, field)
        return bytes(self._buf[pos : pos + n])

    def sub(self, field: str) -> Reader:
        """The body of a ``T x<V>`` vector, as a reader bounded to it; skips past it here."""
        n = self.varint(field)
        pos = self._take(n, field)
        return Reader(self._buf, pos, pos + n)

    def vector(self, field: str, item: Callable[[Reader], T]) -> tuple[T, ...]:
        """``T x<V>``: items read by ``item`` until the vector's bytes are used up exactly."""
        sub = self.sub(field)
        out: list[T] = []
        while sub._pos < sub._end:
            out.append(item(sub))
        return tuple(out)

    def uint16_vector(self, field: str) -> tuple[int, ...]:
        n = self.varint(field)
        pos = self._take(n, field)
        if n % 2:
            raise MLSDecodeError(field, BAD_LENGTH, f"{n} bytes of uint16")
        b = self._buf
        return tuple((b[i] << 8) | b[i + 1] for i in range(pos, pos + n, 2))

    def uint32_vector(self, field: str) -> tuple[int, ...]:
        n = self.varint(field)
        pos = self._take(n, field)
        if n % 4:
            raise MLSDecodeError(field, BAD_LENGTH, f"{n} bytes of uint32")
        b = self._buf
        return tuple(int.from_bytes(b[i : i + 4], "big") for i in range(pos, pos + n, 4))

    def present(self, field: str) -> bool:
        """The presence byte of an ``optional<T>``."""
        flag = self.uint8(field)
        if flag > 1:
            raise MLSDecodeError(field, BAD_OPTIONAL, f"0x{flag:02x}")
        return flag == 1

    def finish(self, field: str) -> None:
        """Require that every byte was consumed."""
        if self._pos != self._end:
            raise MLSDecodeError(field, TRAILING, f"{self._end - self._pos} bytes left")


def encode_varint(n: int) -> bytes:
    """The minimal RFC 9420 §2.1.2 encoding of ``n`` (0 <= n < 2**30)."""
    if n < 0x40:
        if n < 0:
            raise ValueError(f"varint out of range: {n}")
        return bytes((n,))
    if n < 0x4000:
        return (0x4000 | n).to_bytes(2, "big")
    if n <= VARINT_MAX:
        return (0x8000_0000 | n).to_bytes(4, "big")
    raise ValueError(f"varint out of range: {n}")


class Writer:
    """Builds TLS-encoded bytes; the inverse of :class:`Reader`.

    Out-of-range values raise :class:`ValueError`: they are programming errors, never
    the result of re-encoding something :class:`Reader` accepted.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def _uint(self, value: int, size: int, limit: int) -> None:
        if not 0 <= value <= limit:
            raise ValueError(f"uint{size * 8} out of range: {value}")
        self._buf += value.to_bytes(size, "big")

    def uint8(self, value: int) -> None:
        self._uint(value, 1, _U8)

    def uint16(self, value: int) -> None:
        self._uint(value, 2, _U16)

    def uint32(self, value: int) -> None:
        self._uint(value, 4, _U32)

    def uint64(self, value: int) -> None:
        self._uint(value, 8, _U64)

    def fixed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def varint(self, n: int) -> None:
        self._buf += encode_varint(n)

    def opaque(self, data: bytes | bytearray) -> None:
        self._buf += encode_varint(len(data))
        self._buf += data

    def vector(self, items: Iterable[T], item: Callable[[Writer, T], None]) -> None:
        """``T x<V>``: each item written by ``item``, prefixed by the total byte count."""
        sub = Writer()
        for x in items:
            item(sub, x)
        self.opaque(sub._buf)

    def uint16_vector(self, values: Iterable[int]) -> None:
        sub = Writer()
        for v in values:
            sub.uint16(v)
        self.opaque(sub._buf)

    def uint32_vector(self, values: Iterable[int]) -> None:
        sub = Writer()
        for v in values:
            sub.uint32(v)
        self.opaque(sub._buf)

    def present(self, flag: bool) -> None:
        self._buf.append(1 if flag else 0)
