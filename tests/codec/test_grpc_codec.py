"""gRPC helpers: grpc-timeout, grpc-message encoding, length-prefixed messages.

Pure functions, so pure tests: round trips under Hypothesis, tables of
malformed input, and the message reader fed whole, byte by byte and with
trailing bytes (h11's ``tr()``).
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshproxy.codec.grpc import (
    MessageReader,
    decode_message,
    encode_message,
    format_timeout,
    frame_message,
    parse_timeout,
    status_trailers,
)
from meshproxy.codec.h2 import trailers_problem

# PROTOCOL-HTTP2.md, "Timeout": TimeoutUnit -> its exact length in seconds.
UNIT = {
    b"H": Fraction(3600),
    b"M": Fraction(60),
    b"S": Fraction(1),
    b"m": Fraction(1, 10**3),
    b"u": Fraction(1, 10**6),
    b"n": Fraction(1, 10**9),
}
# Float products such as seconds * 1e9 can round to an integer a hair below
# the true one; a deficit this small (femtoseconds) is noise, not a short deadline.
FLOAT_SLACK = Fraction(1, 10**15)


def exact(value: bytes) -> tuple[Fraction, Fraction]:
    """A grpc-timeout's exact length and its unit, per the spec."""
    return int(value[:-1]) * UNIT[value[-1:]], UNIT[value[-1:]]


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-9, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_format_then_parse_rounds_up_within_one_unit(seconds: float) -> None:
    value = format_timeout(seconds)
    digits, unit_char = value[:-1], value[-1:]
    assert digits.isdigit() and 1 <= len(digits) <= 8  # the spec's TimeoutValue
    assert unit_char in UNIT

    length, unit = exact(value)
    wanted = Fraction(seconds)
    assert length >= wanted * (1 - FLOAT_SLACK)  # rounded up, never a shorter deadline
    assert length - wanted < unit  # ... by less than one unit

    parsed = parse_timeout(value)
    assert parsed is not None
    assert parsed >= seconds * (1 - 1e-12)
    assert abs(Fraction(parsed) - length) <= length * FLOAT_SLACK


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (1e-9, b"1n"),
        (1.5e-9, b"2n"),
        (0.25, b"250000u"),
        (1.0, b"1000000u"),
        (99.0, b"99000000u"),
        (1e5, b"100000S"),
        (1e8, b"1666667M"),
        (1e10, b"2777778H"),
        (1e20, b"99999999H"),  # capped at the largest 8-digit value
        (0.0, b"1n"),
        (-3.0, b"1n"),  # already past the deadline: the least the spec can say
    ],
)
def test_format_timeout_examples(seconds: float, expected: bytes) -> None:
    assert format_timeout(seconds) == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"30S", 30.0),
        (b"250m", 0.25),
        (b"99999999u", 99.999999),
        (b"1n", 1e-9),
        (b"00000001S", 1.0),
    ],
)
def test_parse_timeout_examples(value: bytes, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"1",
        b"S",
        b"10",
        b"1s",  # units are case-sensitive: 's' is not one
        b"1h",
        b"1x",
        b"123456789S",  # nine digits
        b"-1S",
        b"+1S",
        b"1.5S",
        b" 1S",
        b"1 S",
        b"1S ",
        b"1_0S",
        b"\xd9\xa1S",  # a non-ASCII digit
        b"1SS",
    ],
)
def test_malformed_timeout_is_ignored(value: bytes) -> None:
    assert parse_timeout(value) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=12))
def test_parse_timeout_never_raises(value: bytes) -> None:
    result = parse_timeout(value)
    assert result is None or result >= 0


# grpc-message: percent-encoded UTF-8 (PROTOCOL-HTTP2.md, "Responses").


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_grpc_message_round_trip(text: str) -> None:
    encoded = encode_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded)  # printable ASCII only
    assert decode_message(encoded) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 16), st.text())
@example(14, "retry later ")
@example(13, " upstream said: boom")
def test_status_trailers_are_well_formed_for_any_message(status: int, text: str) -> None:
    """The trailers meshproxy builds pass meshproxy's own trailer check.

    RFC 9113 8.2.1: a field value must not start or end with whitespace, so a
    message such as "retry later " must have its edge spaces percent-encoded
    (the gRPC spec lets any byte be encoded; every decoder reads %20)."""
    trailers = status_trailers(status, text)
    assert trailers_problem(trailers) is None
    assert decode_message(dict(trailers).get(b"grpc-message", b"")) == text


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("no route", b"no route"),
        ("100%", b"100%25"),
        ("caf\u00e9", b"caf%C3%A9"),
        ("line\nbreak", b"line%0Abreak"),
        ("\u2713", b"%E2%9C%93"),
        ("", b""),
    ],
)
def test_grpc_message_examples(text: str, encoded: bytes) -> None:
    assert encode_message(text) == encoded
    assert decode_message(encoded) == text


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_decode_message_accepts_any_bytes(value: bytes) -> None:
    assert isinstance(decode_message(value), str)


def test_decode_message_leaves_bad_escapes_alone() -> None:
    assert decode_message(b"%zz 50%") == "%zz 50%"
    assert decode_message(b"%E2%9C") == "\ufffd"  # truncated UTF-8


def test_status_trailers() -> None:
    assert status_trailers(0) == [(b"grpc-status", b"0")]
    assert status_trailers(14, "upstream 50% down") == [
        (b"grpc-status", b"14"),
        (b"grpc-message", b"upstream 50%25 down"),
    ]


# Length-prefixed messages: 1-byte flag, 4-byte big-endian length, payload.

MESSAGES = [(False, b"hello"), (True, b"\x1f\x8b compressed"), (False, b""), (False, b"x" * 300)]


def test_frame_message_layout() -> None:
    assert frame_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert frame_message(b"abc", compressed=True) == b"\x01\x00\x00\x00\x03abc"
    assert frame_message(b"") == b"\x00\x00\x00\x00\x00"


def stream_of(messages: list[tuple[bool, bytes]]) -> bytes:
    return b"".join(frame_message(payload, compressed) for compressed, payload in messages)


def read_in_pieces(data: bytes, size: int, max_message: int = 1024) -> list[tuple[bool, bytes]]:
    reader = MessageReader(max_message)
    out: list[tuple[bool, bytes]] = []
    for i in range(0, len(data), size):
        out += reader.feed(data[i : i + size])
    return out


def test_reader_fed_whole() -> None:
    assert MessageReader(1024).feed(stream_of(MESSAGES)) == MESSAGES


@pytest.mark.parametrize("size", [1, 2, 4, 5, 6, 7, 300])
def test_reader_fed_in_pieces(size: int) -> None:
    assert read_in_pieces(stream_of(MESSAGES), size) == MESSAGES


@pytest.mark.parametrize("extra", [1, 4, 5, 6])
def test_reader_with_trailing_bytes_of_the_next(extra: int) -> None:
    following = frame_message(b"next one")
    reader = MessageReader(1024)
    assert reader.feed(stream_of(MESSAGES) + following[:extra]) == MESSAGES
    assert reader.feed(following[extra:]) == [(False, b"next one")]
    assert reader.feed(b"") == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.binary(max_size=100)), max_size=8),
    st.lists(st.integers(1, 2000), max_size=10),
)
def test_reader_any_chunking(messages: list[tuple[bool, bytes]], cuts: list[int]) -> None:
    data = stream_of(messages)
    bounds = [0, *sorted({c for c in cuts if c < len(data)}), len(data)]
    reader = MessageReader(100)
    out: list[tuple[bool, bytes]] = []
    for a, b in itertools.pairwise(bounds):
        out += reader.feed(data[a:b])
    assert out == messages


def test_message_of_exactly_the_limit_is_read() -> None:
    assert MessageReader(5).feed(frame_message(b"12345")) == [(False, b"12345")]


def test_oversize_message_raises() -> None:
    with pytest.raises(ValueError, match="6 bytes exceeds 5"):
        MessageReader(5).feed(frame_message(b"123456"))


def test_oversize_message_raises_on_its_prefix_alone() -> None:
    """The 5-byte prefix is enough to refuse: nothing of the payload is buffered."""
    reader = MessageReader(1024)
    with pytest.raises(ValueError):
        reader.feed(b"\x00" + (2**32 - 1).to_bytes(4, "big"))


def test_oversize_message_raises_when_fed_byte_by_byte() -> None:
    reader = MessageReader(5)
    data = frame_message(b"ok") + frame_message(b"too long")
    got: list[tuple[bool, bytes]] = []
    with pytest.raises(ValueError):
        for i in range(len(data)):
            got += reader.feed(data[i : i + 1])
    assert got == [(False, b"ok")]
