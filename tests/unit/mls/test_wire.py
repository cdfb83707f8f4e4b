"""TLS presentation-language reader/writer (RFC 9420 §2.1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign.mls import wire
from sovereign.mls.wire import MLSDecodeError, Reader, Writer, encode_varint

from .vectors import deserialization


@pytest.mark.parametrize("case", deserialization(), ids=lambda c: c["vlbytes_header"])
def test_deserialization_vectors(case: dict[str, Any]) -> None:
    header = bytes.fromhex(case["vlbytes_header"])
    r = Reader(header)
    assert r.varint("len") == case["length"]
    r.finish("len")
    assert encode_varint(case["length"]) == header


@pytest.mark.parametrize("case", deserialization(), ids=lambda c: c["vlbytes_header"])
def test_deserialization_vectors_as_opaque_headers(case: dict[str, Any]) -> None:
    """The header of an ``opaque<V>`` of that length; one byte short is truncated."""
    header = bytes.fromhex(case["vlbytes_header"])
    n = case["length"]
    if n > 70_000:  # keep the 1 GiB case cheap: only the truncation path
        with pytest.raises(MLSDecodeError) as exc:
            Reader(header + b"\x00" * 16).opaque("x")
        assert exc.value.reason == wire.TRUNCATED
        return
    body = bytes(i & 0xFF for i in range(n))
    assert Reader(header + body).opaque("x") == body
    with pytest.raises(MLSDecodeError) as exc:
        Reader(header + body[:-1]).opaque("x") if n else Reader(header[:-1]).opaque("x")
    assert exc.value.reason == wire.TRUNCATED


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x40\x00", wire.NON_MINIMAL),  # 0 in two bytes
        (b"\x40\x3f", wire.NON_MINIMAL),  # 63 in two bytes
        (b"\x80\x00\x00\x00", wire.NON_MINIMAL),  # 0 in four bytes
        (b"\x80\x00\x3f\xff", wire.NON_MINIMAL),  # 16383 in four bytes
        (b"\xc0", wire.RESERVED_PREFIX),
        (b"\xc0\x00\x00\x00\x00\x00\x00\x01", wire.RESERVED_PREFIX),
        (b"\xff\xff\xff\xff", wire.RESERVED_PREFIX),
        (b"", wire.TRUNCATED),
        (b"\x40", wire.TRUNCATED),
        (b"\x80\x00\x40", wire.TRUNCATED),
    ],
)
def test_varint_rejections(data: bytes, reason: str) -> None:
    with pytest.raises(MLSDecodeError) as exc:
        Reader(data).varint("KeyPackage.init_key")
    assert exc.value.reason == reason
    assert exc.value.field == "KeyPackage.init_key"
    assert str(exc.value).startswith(f"KeyPackage.init_key: {reason}")


def test_varint_boundaries() -> None:
    for n, size in [(0, 1), (63, 1), (64, 2), (16383, 2), (16384, 4), (2**30 - 1, 4)]:
        enc = encode_varint(n)
        assert len(enc) == size
        assert Reader(enc).varint("v") == n
    for bad in (-1, 2**30):
        with pytest.raises(ValueError):
            encode_varint(bad)


@given(st.integers(min_value=0, max_value=2**30 - 1))
def test_varint_roundtrip(n: int) -> None:
    enc = encode_varint(n)
    r = Reader(enc)
    assert r.varint("v") == n
    r.finish("v")


@given(st.binary(max_size=8))
def test_varint_any_bytes(data: bytes) -> None:
    """Any input either decodes to the value whose minimal encoding it starts with, or
    raises MLSDecodeError."""
    r = Reader(data)
    try:
        n = r.varint("v")
    except MLSDecodeError:
        return
    assert data[: r.position] == encode_varint(n)


def test_uints_and_fixed() -> None:
    w = Writer()
    w.uint8(0xAB)
    w.uint16(0xBEEF)
    w.uint32(0xDEADBEEF)
    w.uint64(2**64 - 1)
    w.fixed(b"xyz")
    data = w.getvalue()
    assert data == bytes.fromhex("abbeefdeadbeef") + b"\xff" * 8 + b"xyz"
    r = Reader(data)
    assert r.uint8("a") == 0xAB
    assert r.uint16("b") == 0xBEEF
    assert r.uint32("c") == 0xDEADBEEF
    assert r.uint64("d") == 2**64 - 1
    assert r.fixed(3, "e") == b"xyz"
    assert r.remaining == 0
    r.finish("all")
    for method, size in [("uint16", 2), ("uint32", 4), ("uint64", 8)]:
        with pytest.raises(MLSDecodeError) as exc:
            getattr(Reader(b"\x00" * (size - 1)), method)("f")
        assert exc.value.reason == wire.TRUNCATED
    with pytest.raises(MLSDecodeError):
        Reader(b"ab").fixed(3, "f")


@pytest.mark.parametrize(
    ("method", "value"),
    [("uint8", 256), ("uint16", 65536), ("uint32", 2**32), ("uint64", 2**64), ("uint8", -1)],
)
def test_writer_range(method: str, value: int) -> None:
    with pytest.raises(ValueError):
        getattr(Writer(), method)(value)


def test_optional() -> None:
    assert Reader(b"\x00").present("o") is False
    assert Reader(b"\x01").present("o") is True
    with pytest.raises(MLSDecodeError) as exc:
        Reader(b"\x02").present("o")
    assert exc.value.reason == wire.BAD_OPTIONAL
    w = Writer()
    w.present(True)
    w.present(False)
    assert w.getvalue() == b"\x01\x00"


def test_vectors_of_ints() -> None:
    w = Writer()
    w.uint16_vector([1, 2, 0xFFFF])
    w.uint32_vector([7, 2**32 - 1])
    data = w.getvalue()
    r = Reader(data)
    assert r.uint16_vector("a") == (1, 2, 0xFFFF)
    assert r.uint32_vector("b") == (7, 2**32 - 1)
    r.finish("x")
    with pytest.raises(MLSDecodeError) as exc:
        Reader(b"\x03\x00\x01\x00").uint16_vector("caps")
    assert exc.value.reason == wire.BAD_LENGTH
    with pytest.raises(MLSDecodeError) as exc:
        Reader(b"\x06" + b"\x00" * 6).uint32_vector("leaves")
    assert exc.value.reason == wire.BAD_LENGTH


def test_struct_vector_must_be_consumed_exactly() -> None:
    # A vector of uint16 items read one by one: 3 bytes leave a dangling byte.
    with pytest.raises(MLSDecodeError) as exc:
        Reader(b"\x03\x00\x01\x02").vector("v", lambda r: r.uint16("item"))
    assert exc.value.reason == wire.TRUNCATED and exc.value.field == "item"
    # The vector body bounds the items: an item cannot read past it.
    with pytest.raises(MLSDecodeError):
        Reader(b"\x01\x05abcde").vector("v", lambda r: r.opaque("item"))


def test_trailing_bytes() -> None:
    r = Reader(b"\x00\x01")
    r.uint8("a")
    with pytest.raises(MLSDecodeError) as exc:
        r.finish("Thing")
    assert exc.value.reason == wire.TRAILING and exc.value.field == "Thing"


def test_reader_accepts_bytearray_and_memoryview() -> None:
    data = b"\x03abc"
    for buf in (data, bytearray(data), memoryview(data), memoryview(b"zz" + data)[2:]):
        assert Reader(buf).opaque("x") == b"abc"


@settings(max_examples=200)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("u8"), st.integers(0, 2**8 - 1)),
            st.tuples(st.just("u16"), st.integers(0, 2**16 - 1)),
            st.tuples(st.just("u32"), st.integers(0, 2**32 - 1)),
            st.tuples(st.just("u64"), st.integers(0, 2**64 - 1)),
            st.tuples(st.just("opaque"), st.binary(max_size=300)),
            st.tuples(st.just("opt"), st.booleans()),
        ),
        max_size=20,
    )
)
def test_writer_reader_roundtrip(items: list[tuple[str, Any]]) -> None:
    w = Writer()
    for kind, v in items:
        write: dict[str, Callable[[Any], None]] = {
            "u8": w.uint8,
            "u16": w.uint16,
            "u32": w.uint32,
            "u64": w.uint64,
            "opaque": w.opaque,
            "opt": w.present,
        }
        write[kind](v)
    r = Reader(w.getvalue())
    for kind, v in items:
        got = {
            "u8": r.uint8,
            "u16": r.uint16,
            "u32": r.uint32,
            "u64": r.uint64,
            "opaque": r.opaque,
            "opt": r.present,
        }[kind]("f")
        assert got == v
    r.finish("all")
