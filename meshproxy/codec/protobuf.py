"""The protobuf wire format, the little of it meshproxy speaks: varints and
length-delimited fields.

Sans-IO and tiny on purpose: the risk-control callout (codec/risk.py) needs
two small messages, not the protobuf runtime and generated code. Reference:
https://protobuf.dev/programming-guides/encoding/. Encoders omit proto3
default values (0, "", empty), as the protobuf runtime does; the decoder
walks fields in order and skips the ones a caller does not know (every wire
type but the deprecated groups), so messages can grow on either side.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT = 0
I64 = 1
LEN = 2
I32 = 5

# A varint of a 64-bit value takes at most 10 bytes; more is a malformed message.
_MAX_VARINT_BYTES = 10
_U64 = (1 << 64) - 1


class DecodeError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def varint(n: int) -> bytes:
    """An unsigned varint; negative int32/int64 values are sent as their 64-bit two's complement."""
    if n < 0:
        n &= _U64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def uint_field(number: int, value: int) -> bytes:
    """A varint field (int32, int64, uint*, bool, enum); empty for 0 (the proto3 default)."""
    return tag(number, VARINT) + varint(value) if value else b""


def bytes_field(number: int, value: bytes) -> bytes:
    """A length-delimited field (bytes, string, embedded message); empty for b""."""
    return tag(number, LEN) + varint(len(value)) + value if value else b""


def string_field(number: int, value: str) -> bytes:
    return bytes_field(number, value.encode("utf-8")) if value else b""


def message_field(number: int, encoded: bytes) -> bytes:
    """An embedded message, even an empty one (presence matters for repeated messages)."""
    return tag(number, LEN) + varint(len(encoded)) + encoded


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it)."""
    result = shift = 0
    end = min(len(data), pos + _MAX_VARINT_BYTES)
    while pos < end:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & _U64, pos
        shift += 7
    raise DecodeError("truncated or overlong varint")


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field: an int for VARINT / I64 / I32, bytes for LEN."""
    view = memoryview(data)
    pos, size = 0, len(data)
    while pos < size:
        key, pos = read_varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire_type == VARINT:
            value, pos = read_varint(view, pos)
            yield number, wire_type, value
        elif wire_type == LEN:
            length, pos = read_varint(view, pos)
            if length > size - pos:
                raise DecodeError(f"field {number}: {length} bytes announced, {size - pos} left")
            yield number, wire_type, bytes(view[pos : pos + length])
            pos += length
        elif wire_type in (I64, I32):
            width = 8 if wire_type == I64 else 4
            if width > size - pos:
                raise DecodeError(f"field {number}: truncated fixed-width value")
            yield number, wire_type, int.from_bytes(view[pos : pos + width], "little")
            pos += width
        else:
            raise DecodeError(f"field {number}: unsupported wire type {wire_type}")


def as_string(value: int | bytes, number: int) -> str:
    if not isinstance(value, bytes):
        raise DecodeError(f"field {number}: expected a string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"field {number}: not UTF-8") from None


def as_int(value: int | bytes, number: int) -> int:
    if not isinstance(value, int):
        raise DecodeError(f"field {number}: expected a varint")
    return value
