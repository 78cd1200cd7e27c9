"""gRPC on HTTP/2: status codes, grpc-timeout, message framing, trailers.

Pure helpers (no I/O, no clock reads). Reference: the gRPC over HTTP/2
protocol spec (PROTOCOL-HTTP2.md); the status codes are in meshproxy/status.py.
"""

from __future__ import annotations

import struct
import urllib.parse

# PROTOCOL-HTTP2.md, "Timeout": TimeoutValue is at most 8 ASCII digits.
_TIMEOUT_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
_MAX_TIMEOUT_DIGITS = 8


def is_grpc_content_type(value: bytes | None) -> bool:
    return value is not None and value.startswith(b"application/grpc")


def parse_timeout(value: bytes) -> float | None:
    """grpc-timeout -> seconds, or None if malformed (the spec says ignore it)."""
    if len(value) < 2 or len(value) > _MAX_TIMEOUT_DIGITS + 1:
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    digits = value[:-1]
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def format_timeout(seconds: float) -> bytes:
    """seconds -> the shortest-unit grpc-timeout that fits in 8 digits (rounded up)."""
    if seconds <= 0:
        return b"1n"
    for unit, scale in ((b"n", 1e9), (b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60)):
        value = -int(-seconds * scale // 1)  # ceil without importing math for one call
        if value < 10**_MAX_TIMEOUT_DIGITS:
            return str(value).encode() + unit
    return str(min(-int(-seconds // 3600), 10**_MAX_TIMEOUT_DIGITS - 1)).encode() + b"H"


# grpc-message is percent-encoded (PROTOCOL-HTTP2.md, "Responses"): every byte
# outside 0x20-0x7E, and '%' itself.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != ord("%"))


def encode_message(message: str) -> bytes:
    encoded = urllib.parse.quote(message, safe=_SAFE)
    # A header value must not start or end with whitespace (RFC 9113 8.2.1).
    if encoded.startswith(" "):
        encoded = "%20" + encoded[1:]
    if encoded.endswith(" "):
        encoded = encoded[:-1] + "%20"
    return encoded.encode("ascii")


def decode_message(value: bytes) -> str:
    return urllib.parse.unquote(value.decode("ascii", "replace"), errors="replace")


def status_trailers(status: int, message: str = "") -> list[tuple[bytes, bytes]]:
    trailers = [(b"grpc-status", str(status).encode())]
    if message:
        trailers.append((b"grpc-message", encode_message(message)))
    return trailers


_PREFIX = struct.Struct(">BI")


def frame_message(payload: bytes, compressed: bool = False) -> bytes:
    """One length-prefixed message: 1 byte flag, 4 bytes big-endian length."""
    return _PREFIX.pack(1 if compressed else 0, len(payload)) + payload


class MessageReader:
    """Splits a gRPC DATA byte stream into messages (for filters that inspect them)."""

    def __init__(self, max_message: int) -> None:
        self._buf = bytearray()
        self._max = max_message

    def feed(self, data: bytes) -> list[tuple[bool, bytes]]:
        self._buf += data
        out: list[tuple[bool, bytes]] = []
        while len(self._buf) >= _PREFIX.size:
            flag, length = _PREFIX.unpack_from(self._buf)
            if length > self._max:
                raise ValueError(f"gRPC message of {length} bytes exceeds {self._max}")
            if len(self._buf) < _PREFIX.size + length:
                break
            out.append((bool(flag & 1), bytes(self._buf[5 : 5 + length])))
            del self._buf[: 5 + length]
        return out
