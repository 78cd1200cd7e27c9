"""HPACK (RFC 7541) tuned for a proxy: a stateless encoder and a lean decoder.

Knows: HPACK's wire format. Must not: do I/O. Both classes plug into h2's
H2Connection (as `conn.encoder` / `conn.decoder`).

Encoder: no dynamic table. Each field is a static-table index, or a literal
"without indexing" (or "never indexed" for credentials, RFC 7541 7.1.3)
with a static name index where one exists. The encoded bytes of a (name,
value) pair never depend on earlier blocks, so they are cached (bounded).
This costs some bytes on the wire (no dynamic-table compression) for a large
cut in CPU: hpack's encoder searches the tables per field.

Decoder: the same decoding as hpack's Decoder (the dynamic table, table-size
updates, the header-list-size limit, truncation and Huffman errors), in one
loop without per-field helper calls, with Huffman results of short strings
cached. A block that refers to no dynamic-table entry (and resizes nothing)
decodes to the same fields whatever the table holds, so such blocks are
memoized whole: a server that sends its response headers as literals (nginx
does, with a new date once a second) costs a lookup and the table inserts.
tests/codec/test_hpack.py checks it against hpack's own Decoder on random
and round-tripped blocks.
"""

from __future__ import annotations

from hpack.exceptions import HPACKDecodingError, InvalidTableSizeError, OversizedHeaderListError
from hpack.hpack import Decoder, decode_huffman, decode_integer, encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

Headers = list[tuple[bytes, bytes]]

_STATIC = HeaderTable.STATIC_TABLE
_STATIC_FULL = {pair: i + 1 for i, pair in reversed(list(enumerate(_STATIC)))}
_STATIC_NAME = {name: i + 1 for i, (name, _) in reversed(list(enumerate(_STATIC)))}
# Values unique to one call: never cached, never Huffman-coded (the CPU
# would buy a few bytes once).
_UNIQUE = frozenset({b"x-request-id", b"traceparent", b"tracestate", b"x-b3-traceid", b"x-b3-spanid",
                     b"x-b3-parentspanid", b"b3", b"grpc-timeout"})
# RFC 7541 7.1.3: values an intermediary must not let anyone index.
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)

# Bounds on the caches: pairs beyond the count, or values beyond the length
# (ids, tokens: rarely repeated), are encoded each time instead.
ENCODE_CACHE_ENTRIES = 8192
ENCODE_CACHE_MAX_VALUE = 96
HUFFMAN_CACHE_ENTRIES = 8192
HUFFMAN_CACHE_MAX_INPUT = 64
BLOCK_CACHE_ENTRIES = 1024
BLOCK_CACHE_MAX_INPUT = 1024
_STATIC_LENGTH = len(_STATIC)


def _int(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with `flags` in the first byte's high bits."""
    if value < (1 << prefix_bits) - 1:
        return bytes((flags | value,))
    out = encode_integer(value, prefix_bits)
    out[0] |= flags
    return bytes(out)


def _string(data: bytes, huffman: bool = True) -> bytes:
    """A string literal, Huffman-coded when that is shorter (RFC 7541 5.2)."""
    if not huffman:
        return _int(len(data), 7) + data
    coded = _huffman.encode(data)
    if len(coded) < len(data):
        return _int(len(coded), 7, 0x80) + coded
    return _int(len(data), 7) + data


def encode_field(name: bytes, value: bytes, huffman: bool = True) -> bytes:
    index = _STATIC_FULL.get((name, value))
    if index is not None:
        return _int(index, 7, 0x80)
    flag = 0x10 if name in _SENSITIVE else 0x00
    name_index = _STATIC_NAME.get(name)
    if name_index is not None:
        head = _int(name_index, 4, flag)
        return head + _string(value, huffman)
    literal = _NAMES.get(name)
    if literal is None:
        literal = _string(name)
        if len(_NAMES) < ENCODE_CACHE_ENTRIES:
            _NAMES[name] = literal
    return bytes((flag,)) + literal + _string(value, huffman)


# Header names as string literals: far fewer than pairs, and ids repeat them.
_NAMES: dict[bytes, bytes] = {}


# (name, value) -> its encoding: the same for every connection (no dynamic
# table), so one bounded cache serves the process; a pure memo, no state.
_ENCODED: dict[tuple[bytes, bytes], bytes] = {}


class StatelessEncoder:
    """Drop-in for hpack.Encoder as h2 uses it: `encode(headers)`, `header_table_size`."""

    def __init__(self) -> None:
        # Our table is empty and stays empty; the first block says so
        # (a size update to 0, RFC 7541 6.3), whatever size the peer allows.
        self._prefix = b"\x20"
        self.header_table_size = 4096

    def encode(self, headers: object) -> bytes:
        cache = _ENCODED
        parts = [self._prefix]
        self._prefix = b""
        for pair in headers:  # type: ignore[attr-defined]
            name, value = pair
            key = (name, value)
            encoded = cache.get(key)
            if encoded is None:
                if name in _UNIQUE or len(value) > ENCODE_CACHE_MAX_VALUE:
                    encoded = encode_field(name, value, huffman=False)
                else:
                    encoded = encode_field(name, value)
                    if len(cache) >= ENCODE_CACHE_ENTRIES:
                        cache.clear()  # crude but bounded; the common pairs return at once
                    cache[key] = encoded
            parts.append(encoded)
        return b"".join(parts)


# Huffman-coded string -> decoded bytes: a pure memo shared by every
# connection (one cache per connection would multiply its bound by 10,000
# idle connections).
_HUFFMAN_DECODED: dict[bytes, bytes] = {}


def _huffman_cached(data: bytes) -> bytes:
    cache = _HUFFMAN_DECODED
    out = cache.get(data)
    if out is None:
        out = decode_huffman(data)
        if len(data) <= HUFFMAN_CACHE_MAX_INPUT:
            if len(cache) >= HUFFMAN_CACHE_ENTRIES:
                cache.clear()
            cache[data] = out
    return out


class _LeanTable(HeaderTable):
    """hpack's dynamic table with an `add` that does not make a logging call per evicted entry."""

    def add(self, name: bytes, value: bytes) -> None:
        size = 32 + len(name) + len(value)  # RFC 7541 4.1
        entries = self.dynamic_entries
        maxsize = self._maxsize
        if size > maxsize:
            entries.clear()
            self._current_size = 0
            return
        entries.appendleft((name, value))
        current = self._current_size + size
        while current > maxsize:
            evicted_name, evicted_value = entries.pop()
            current -= 32 + len(evicted_name) + len(evicted_value)
        self._current_size = current


# Block -> (its fields, the fields it adds to the table, its RFC 7541 4.1
# size), for blocks with no dynamic-table reference: a pure memo, shared.
_BLOCKS: dict[bytes, tuple[tuple[tuple[bytes, bytes], ...], tuple[tuple[bytes, bytes], ...], int]] = {}


class LeanDecoder(Decoder):
    """hpack's Decoder with a single-loop `decode(raw=True)`."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size=max_header_list_size)
        self.header_table = _LeanTable()

    def decode(self, data: bytes, raw: bool = False) -> list[tuple[bytes, bytes]]:  # type: ignore[override]
        if not raw:
            return super().decode(data, raw)  # type: ignore[return-value]
        table = self.header_table
        limit = self.max_header_list_size
        memo = _BLOCKS.get(data) if type(data) is bytes else None
        if memo is not None:
            fields, added, size = memo
            if size > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
            for name, value in added:
                table.add(name, value)
            self._assert_valid_table_size()
            return list(fields)
        get = table.get_by_index
        headers: list[tuple[bytes, bytes]] = []
        added_now: list[tuple[bytes, bytes]] = []
        dynamic = False  # the block refers to the dynamic table (or resizes it): not memoized
        n = len(data)
        i = 0
        size = 0
        view = memoryview(data)
        while i < n:
            b = data[i]
            if b & 0x80:  # 6.1 indexed field
                index = b & 0x7F
                if index == 0x7F:
                    index, used = decode_integer(view[i:], 7)
                    i += used
                else:
                    i += 1
                name, value = get(index)
                dynamic = dynamic or index > _STATIC_LENGTH
            elif b & 0x20 and not b & 0x40:  # 6.3 table size update
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                new_size, used = decode_integer(view[i:], 5)
                if new_size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.header_table_size = new_size
                dynamic = True
                i += used
                continue
            else:  # 6.2 literal: with (0x40), without (0x00) or never (0x10) indexing
                index_it = bool(b & 0x40)
                prefix = 6 if index_it else 4
                mask = 0x3F if index_it else 0x0F
                name_index = b & mask
                if name_index:
                    if name_index == mask:
                        name_index, used = decode_integer(view[i:], prefix)
                        i += used
                    else:
                        i += 1
                    name = get(name_index)[0]
                    dynamic = dynamic or name_index > _STATIC_LENGTH
                else:
                    i += 1
                    name, i = self._string(data, view, i, n)
                value, i = self._string(data, view, i, n)
                if index_it:
                    table.add(name, value)
                    added_now.append((name, value))
            size += 32 + len(name) + len(value)  # RFC 7541 4.1 entry size
            if size > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
            headers.append((name, value))
        self._assert_valid_table_size()
        if not dynamic and n <= BLOCK_CACHE_MAX_INPUT and type(data) is bytes:
            if len(_BLOCKS) >= BLOCK_CACHE_ENTRIES:
                _BLOCKS.clear()  # crude but bounded, as the other caches
            _BLOCKS[data] = (tuple(headers), tuple(added_now), size)
        return headers

    @staticmethod
    def _string(data: bytes, view: memoryview, i: int, n: int) -> tuple[bytes, int]:
        if i >= n:
            raise HPACKDecodingError("Truncated header block")
        b = data[i]
        length = b & 0x7F
        if length == 0x7F:
            length, used = decode_integer(view[i:], 7)
            i += used
        else:
            i += 1
        end = i + length
        if end > n:
            raise HPACKDecodingError("Truncated header block")
        raw = data[i:end]
        if b & 0x80:
            raw = _huffman_cached(raw)
        return raw, end
