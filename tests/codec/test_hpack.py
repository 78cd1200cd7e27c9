"""The lean HPACK decoder against hpack's own, and the stateless encoder through it."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.codec.hpack import LeanDecoder, StatelessEncoder, encode_field

names = st.sampled_from(
    [b":path", b":method", b":status", b"content-type", b"x-request-id", b"authorization", b"cookie", b"x-a", b"date"]
) | st.binary(min_size=1, max_size=20).map(lambda b: bytes(c % 26 + 97 for c in b))
values = st.binary(max_size=300)
header_lists = st.lists(st.tuples(names, values), max_size=20)


def _plain(headers: object) -> list[tuple[bytes, bytes]]:
    return [(bytes(n), bytes(v)) for n, v in headers]  # type: ignore[attr-defined]


def _outcome(decoder: object, block: bytes) -> object:
    try:
        return _plain(decoder.decode(block, raw=True))  # type: ignore[attr-defined]
    except (hpack.HPACKError, IndexError, TypeError) as e:
        return type(e).__mro__[1] if isinstance(e, hpack.HPACKError) else "error"


@settings(max_examples=300, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=4))
def test_round_trip_with_dynamic_table_matches_hpack(blocks):
    """Blocks from hpack's stateful encoder (indexing, table evictions) decode alike."""
    encoder = hpack.Encoder()
    encoder.header_table_size = 256  # small: forces evictions
    ours, theirs = LeanDecoder(1 << 20), hpack.Decoder(max_header_list_size=1 << 20)
    ours.header_table_size = theirs.header_table_size = 4096
    for headers in blocks:
        block = encoder.encode(headers)
        assert ours.decode(block, raw=True) == _plain(theirs.decode(block, raw=True)) == headers


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_fail_alike(block):
    ours, theirs = LeanDecoder(4096), hpack.Decoder(max_header_list_size=4096)
    assert _outcome(ours, block) == _outcome(theirs, block)


@settings(max_examples=300, deadline=None)
@given(header_lists, st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_mutated_blocks_decode_or_fail_alike(headers, position, byte):
    block = bytearray(hpack.Encoder().encode(headers))
    if block:
        block[position % len(block)] = byte
    ours, theirs = LeanDecoder(4096), hpack.Decoder(max_header_list_size=4096)
    assert _outcome(ours, bytes(block)) == _outcome(theirs, bytes(block))


@settings(max_examples=300, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=4))
def test_stateless_encoder_decodes_with_hpack(blocks):
    encoder = StatelessEncoder()
    decoder = hpack.Decoder(max_header_list_size=1 << 20)
    for headers in blocks:
        assert _plain(decoder.decode(encoder.encode(headers), raw=True)) == headers
    assert len(decoder.header_table.dynamic_entries) == 0  # nothing was ever indexed


def test_first_block_sets_table_size_zero_then_never_again():
    encoder = StatelessEncoder()
    assert encoder.encode([(b":status", b"200")]) == b"\x20\x88"
    assert encoder.encode([(b":status", b"200")]) == b"\x88"


def test_credentials_are_never_indexed():
    # RFC 7541 7.1.3: literal never indexed (0001xxxx) with the static name index.
    assert encode_field(b"authorization", b"secret")[0] & 0xF0 == 0x10
    decoded = hpack.Decoder().decode(b"\x20" + encode_field(b"cookie", b"a=b"), raw=True)
    assert decoded == [(b"cookie", b"a=b")] and not decoded[0].indexable


def test_header_list_size_limit_enforced():
    block = hpack.Encoder().encode([(b"x-big", b"v" * 5000)])
    with pytest.raises(hpack.OversizedHeaderListError):
        LeanDecoder(4096).decode(block, raw=True)


def test_table_size_update_after_a_field_is_an_error():
    block = hpack.Encoder().encode([(b":method", b"GET")]) + b"\x20"
    with pytest.raises(hpack.HPACKDecodingError):
        LeanDecoder(4096).decode(block, raw=True)


def _literal_indexed(name: bytes, value: bytes) -> bytes:
    """A literal with incremental indexing and a new name (RFC 7541 6.2.1), not Huffman-coded."""
    return b"\x40" + bytes(hpack.hpack.encode_integer(len(name), 7)) + name + \
        bytes(hpack.hpack.encode_integer(len(value), 7)) + value


@settings(max_examples=200, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=3), st.lists(st.integers(min_value=0, max_value=5), max_size=15),
       st.integers(min_value=62, max_value=70))
def test_repeated_literal_blocks_fill_the_table_as_hpack_does(blocks, order, ref):
    """nginx sends the same literal blocks again and again; decoded from the memo, they must still
    add their fields to the table, so a later reference to it resolves (or fails) as with hpack."""
    literal_blocks = [b"".join(_literal_indexed(n, v) for n, v in headers) for headers in blocks]
    ours, theirs = LeanDecoder(1 << 20), hpack.Decoder(max_header_list_size=1 << 20)
    reference = bytes(hpack.hpack.encode_integer(ref, 7))
    reference = bytes([reference[0] | 0x80]) + reference[1:]
    for i in order:
        block = literal_blocks[i % len(literal_blocks)]
        assert _outcome(ours, block) == _outcome(theirs, block)
        assert _outcome(ours, reference) == _outcome(theirs, reference)


def test_a_memoized_block_still_meets_each_decoders_size_limit():
    block = _literal_indexed(b"x-big", b"v" * 900)  # small enough to be memoized
    assert LeanDecoder(1 << 20).decode(block, raw=True) == [(b"x-big", b"v" * 900)]
    assert LeanDecoder(1 << 20).decode(block, raw=True) == [(b"x-big", b"v" * 900)]
    with pytest.raises(hpack.OversizedHeaderListError):
        LeanDecoder(900).decode(block, raw=True)
