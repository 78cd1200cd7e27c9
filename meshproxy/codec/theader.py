"""Apache / fbthrift THeader: the header block in front of a Thrift message (sans-IO).

The layout (apache/thrift doc/specs/HeaderFormat.md, lib/py THeaderTransport):

    LENGTH u32 | MAGIC 0x0FFF u16 | FLAGS u16 | SEQID u32 | HEADER_SIZE u16 (x4 bytes)
    PROTOCOL_ID varint | NUM_TRANSFORMS varint | TRANSFORM_ID varint ...
    info blocks: TYPE varint (1 key/values, 2 persistent key/values), COUNT varint,
      then (varint len, key, varint len, value) each; zero padding
    PAYLOAD (the Thrift message, transformed if transforms are listed)

Unlike TTHeader every integer is a varint. The only transform in use is
zlib (id 1); a compressed payload is inflated (bounded) and forwarded plain.
An info block of unknown type is kept as opaque bytes, like TTHeader's.
"""

from __future__ import annotations

import struct
import zlib

from meshproxy.codec.errors import Incomplete, ThriftError

MAGIC = 0x0FFF
META_SIZE = 14
INFO_KEY_VALUE, INFO_PERSISTENT_KEY_VALUE = 1, 2
ZLIB = 1

_HEAD = struct.Struct("!IHHIH")

Block = tuple[int, object]


class Header:
    """A decoded THeader block; `encode()` of an unchanged one gives the same bytes."""

    __slots__ = ("blocks", "flags", "inflated", "payload_at", "protocol_id", "raw", "seqid", "transformed")

    out_of_order = False  # THeader has no such flag; replies go back in order

    def __init__(self, seqid: int = 0, protocol_id: int = 0, flags: int = 0, blocks: list[Block] | None = None) -> None:
        self.seqid = seqid
        self.protocol_id = protocol_id
        self.flags = flags
        self.blocks: list[Block] = blocks if blocks is not None else []
        self.raw: bytes | None = None
        self.payload_at = 0
        self.transformed = False
        self.inflated = b""

    def payload(self, frame: bytes) -> bytes:
        return self.inflated if self.transformed else frame[self.payload_at :]

    def metadata(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for kind, value in self.blocks:
            if kind in (INFO_KEY_VALUE, INFO_PERSISTENT_KEY_VALUE):
                out += value  # type: ignore[arg-type]
        return out

    def set_metadata(self, pairs: list[tuple[bytes, bytes]]) -> None:
        blocks: list[Block] = [(INFO_KEY_VALUE, list(pairs))] if pairs else []
        blocks += [b for b in self.blocks if b[0] not in (INFO_KEY_VALUE, INFO_PERSISTENT_KEY_VALUE)]
        self.blocks = blocks
        self.raw = None

    def encode(self, payload: bytes) -> bytes:
        info = self.raw if self.raw is not None and not self.transformed else self._info()
        size = META_SIZE - 4 + len(info) + len(payload)
        return _HEAD.pack(size, MAGIC, self.flags, self.seqid & 0xFFFFFFFF, len(info) // 4) + info + payload

    def _info(self) -> bytes:
        parts = [_varint(self.protocol_id), _varint(0)]  # forwarded untransformed
        for kind, value in self.blocks:
            if kind in (INFO_KEY_VALUE, INFO_PERSISTENT_KEY_VALUE):
                pairs: list[tuple[bytes, bytes]] = value  # type: ignore[assignment]
                if not pairs:
                    continue
                parts += (_varint(kind), _varint(len(pairs)))
                for k, v in pairs:
                    parts += (_varint(len(k)), k, _varint(len(v)), v)
            else:
                parts.append(value)  # type: ignore[arg-type]
        info = b"".join(parts)
        return info + b"\x00" * (-len(info) % 4)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise Incomplete(pos + 1)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 35:
            raise ThriftError("THeader varint longer than 5 bytes")


def _read_string(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    size, pos = _read_varint(buf, pos, end)
    if pos + size > end:
        raise Incomplete(pos + size)
    return buf[pos : pos + size], pos + size


def decode(frame: bytes, max_header: int = 65536, max_payload: int = 16 * 1024 * 1024) -> Header:
    """Decode the header block of a whole frame (LENGTH prefix included)."""
    if len(frame) < META_SIZE:
        raise ThriftError("THeader frame shorter than its fixed part")
    _, magic, flags, seqid, words = _HEAD.unpack_from(frame, 0)
    if seqid & 0x80000000:
        seqid -= 1 << 32
    if magic != MAGIC:
        raise ThriftError(f"bad THeader magic {magic:#06x}")
    size = words * 4
    end = META_SIZE + size
    if size > max_header:
        raise ThriftError(f"THeader header size {size} is over the limit", seqid)
    if end > len(frame):
        raise ThriftError("THeader header size is larger than the frame", seqid)
    blocks: list[Block] = []
    transforms: list[int] = []
    try:
        protocol_id, pos = _read_varint(frame, META_SIZE, end)
        count, pos = _read_varint(frame, pos, end)
        for _ in range(count):
            tid, pos = _read_varint(frame, pos, end)
            if tid != ZLIB:
                raise ThriftError(f"unsupported THeader transform {tid}", seqid)
            transforms.append(tid)
        while pos < end:
            kind = frame[pos]
            if kind == 0:
                pos += 1
                continue
            if kind in (INFO_KEY_VALUE, INFO_PERSISTENT_KEY_VALUE):
                n, pos = _read_varint(frame, pos + 1, end)
                pairs: list[tuple[bytes, bytes]] = []
                for _ in range(n):
                    k, pos = _read_string(frame, pos, end)
                    v, pos = _read_string(frame, pos, end)
                    pairs.append((k, v))
                blocks.append((kind, pairs))
            else:
                blocks.append((kind, frame[pos:end].rstrip(b"\x00")))
                break
    except Incomplete:
        raise ThriftError("THeader info block runs past the header", seqid) from None
    header = Header(seqid, protocol_id, flags, blocks)
    header.raw = frame[META_SIZE:end]
    header.payload_at = end
    if transforms:
        header.transformed = True
        header.inflated = _inflate(frame[end:], len(transforms), max_payload, seqid)
    return header


def _inflate(data: bytes, times: int, limit: int, seqid: int) -> bytes:
    for _ in range(times):
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, limit)
        except zlib.error as e:
            raise ThriftError(f"bad zlib payload: {e}", seqid) from None
        if d.unconsumed_tail:
            raise ThriftError("inflated payload is over the frame size limit", seqid)
        data = out
    return data
