"""Kitex TTHeader: the header block in front of a Thrift message (sans-IO).

The layout, as cloudwego/gopkg protocol/ttheader/encode.go writes it:

    LENGTH u32 | MAGIC 0x1000 u16 | FLAGS u16 | SEQID u32 | HEADER_SIZE u16 (x4 bytes)
    PROTOCOL_ID u8 | NUM_TRANSFORMS u8 | TRANSFORM_ID u8 ...
    info blocks, each an id byte:
      0x01 string key/values: u16 count, then (u16 len, key, u16 len, value) each
      0x10 integer key/values: u16 count, then (u16 key, u16 len, value) each
      0x11 ACL token: u16 len, token
      0x00 padding (zeros up to HEADER_SIZE)
    PAYLOAD (the Thrift message)

LENGTH counts every byte after itself. Integer keys are numbered in
protocol/ttheader/metakey.go (FromService=3, ToService=6, ToMethod=9,
RPCTimeout=12 in milliseconds, ...). An info block with an unknown id cannot
be skipped (its size is not self-described), so it and everything after it
up to the payload is kept as opaque bytes and written back unchanged.
"""

from __future__ import annotations

import struct

from meshproxy.codec.errors import ThriftError

MAGIC = 0x1000
META_SIZE = 14
FLAG_OUT_OF_ORDER = 0x01
INFO_PADDING, INFO_STRINGS, INFO_INTS, INFO_ACL = 0x00, 0x01, 0x10, 0x11

# protocol/ttheader/metakey.go, in order from 0.
INT_KEYS = (
    "mesh_version", "transport_type", "log_id", "from_service", "from_cluster", "from_idc",
    "to_service", "to_cluster", "to_idc", "to_method", "env", "dest_address", "rpc_timeout",
    "read_timeout", "ring_hash_key", "ddp_tag", "with_mesh_header", "connect_timeout",
    "span_context", "short_connection", "from_method", "stress_tag", "msg_type",
    "http_content_type", "raw_ring_hash_key", "lb_type", "cluster_shard_id", "frame_type",
    "stream_timeout",
)
FROM_SERVICE, TO_SERVICE, TO_METHOD, RPC_TIMEOUT = 3, 6, 9, 12

# Integer keys and the ACL token surface in a Call's metadata under these
# names, so filters see one list of (name, value) pairs for every transport.
INT_PREFIX = b"tt."
_INT_NAMES = {i: INT_PREFIX + n.encode() for i, n in enumerate(INT_KEYS)}
_INT_BY_NAME = {v: k for k, v in _INT_NAMES.items()}
ACL_NAME = b"tt.acl_token"
TO_SERVICE_NAME = _INT_NAMES[TO_SERVICE]
TO_METHOD_NAME = _INT_NAMES[TO_METHOD]
FROM_SERVICE_NAME = _INT_NAMES[FROM_SERVICE]
RPC_TIMEOUT_NAME = _INT_NAMES[RPC_TIMEOUT]

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_HEAD = struct.Struct("!IHHIH")

Block = tuple[int, object]  # (info id, list of pairs | token bytes | opaque tail bytes)


def int_key_name(key: int) -> bytes:
    return _INT_NAMES.get(key) or INT_PREFIX + str(key).encode()


def int_key(name: bytes) -> int | None:
    """The integer key a metadata name stands for, or None for a string key."""
    key = _INT_BY_NAME.get(name)
    if key is not None:
        return key
    if name.startswith(INT_PREFIX) and name[3:].isdigit() and int(name[3:]) <= 0xFFFF:
        return int(name[3:])
    return None


class Header:
    """A decoded TTHeader block; `encode()` of an unchanged one gives the same bytes."""

    __slots__ = ("blocks", "flags", "payload_at", "protocol_id", "raw", "seqid", "transforms")

    transformed = False  # Kitex writes no transforms; ones we cannot apply are refused

    def __init__(
        self,
        seqid: int = 0,
        protocol_id: int = 0,
        flags: int = 0,
        blocks: list[Block] | None = None,
        transforms: bytes = b"",
    ) -> None:
        self.seqid = seqid
        self.protocol_id = protocol_id
        self.flags = flags
        self.blocks: list[Block] = blocks if blocks is not None else []
        self.transforms = transforms
        self.raw: bytes | None = None  # the header region as received, while unchanged
        self.payload_at = 0

    def payload(self, frame: bytes) -> bytes:
        return frame[self.payload_at :]

    @property
    def out_of_order(self) -> bool:
        return bool(self.flags & FLAG_OUT_OF_ORDER)

    # -- metadata view

    def metadata(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for kind, value in self.blocks:
            if kind == INFO_STRINGS:
                out += value  # type: ignore[arg-type]
            elif kind == INFO_INTS:
                out += [(int_key_name(k), v) for k, v in value]  # type: ignore[attr-defined]
            elif kind == INFO_ACL:
                out.append((ACL_NAME, value))  # type: ignore[arg-type]
        return out

    def set_metadata(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Replace the key/values (opaque unknown blocks are kept at the end)."""
        strings: list[tuple[bytes, bytes]] = []
        ints: list[tuple[int, bytes]] = []
        acl: bytes | None = None
        for name, value in pairs:
            if name == ACL_NAME:
                acl = value
                continue
            key = int_key(name)
            if key is None:
                strings.append((name, value))
            else:
                ints.append((key, value))
        blocks: list[Block] = []
        if acl is not None:
            blocks.append((INFO_ACL, acl))
        if strings:
            blocks.append((INFO_STRINGS, strings))
        if ints:
            blocks.append((INFO_INTS, ints))
        blocks += [b for b in self.blocks if b[0] not in (INFO_STRINGS, INFO_INTS, INFO_ACL)]
        self.blocks = blocks
        self.raw = None

    # -- bytes

    def encode(self, payload: bytes) -> bytes:
        info = self.raw if self.raw is not None else self._info()
        size = META_SIZE - 4 + len(info) + len(payload)
        return _HEAD.pack(size, MAGIC, self.flags, self.seqid & 0xFFFFFFFF, len(info) // 4) + info + payload

    def _info(self) -> bytes:
        parts = [bytes((self.protocol_id, len(self.transforms))), self.transforms]
        for kind, value in self.blocks:
            if kind == INFO_STRINGS:
                pairs: list[tuple[bytes, bytes]] = value  # type: ignore[assignment]
                parts.append(bytes((INFO_STRINGS,)) + _U16.pack(len(pairs)))
                for k, v in pairs:
                    parts += (_U16.pack(len(k)), k, _U16.pack(len(v)), v)
            elif kind == INFO_INTS:
                ints: list[tuple[int, bytes]] = value  # type: ignore[assignment]
                parts.append(bytes((INFO_INTS,)) + _U16.pack(len(ints)))
                for k, v in ints:
                    parts += (_U16.pack(k), _U16.pack(len(v)), v)
            elif kind == INFO_ACL:
                token: bytes = value  # type: ignore[assignment]
                parts += (bytes((INFO_ACL,)), _U16.pack(len(token)), token)
            else:
                parts.append(value)  # type: ignore[arg-type]
        info = b"".join(parts)
        return info + b"\x00" * (-len(info) % 4)


def decode(frame: bytes, max_header: int = 65536) -> Header:
    """Decode the header block of a whole frame (LENGTH prefix included)."""
    if len(frame) < META_SIZE:
        raise ThriftError("TTHeader frame shorter than its fixed part")
    _, magic, flags, seqid, words = _HEAD.unpack_from(frame, 0)
    if seqid & 0x80000000:
        seqid -= 1 << 32
    if magic != MAGIC:
        raise ThriftError(f"bad TTHeader magic {magic:#06x}")
    size = words * 4
    end = META_SIZE + size
    if size < 2 or size > max_header:
        raise ThriftError(f"bad TTHeader header size {size}", seqid)
    if end > len(frame):
        raise ThriftError("TTHeader header size is larger than the frame", seqid)
    protocol_id = frame[META_SIZE]
    ntransforms = frame[META_SIZE + 1]
    pos = META_SIZE + 2
    if pos + ntransforms > end:
        raise ThriftError("TTHeader transform ids run past the header", seqid)
    transforms = frame[pos : pos + ntransforms]
    if transforms:
        raise ThriftError(f"unsupported TTHeader transforms {transforms.hex()}", seqid)
    pos += ntransforms
    blocks: list[Block] = []
    try:
        while pos < end:
            kind = frame[pos]
            if kind == INFO_PADDING:
                pos += 1
                continue
            if kind == INFO_STRINGS:
                count, pos = _u16(frame, pos + 1, end)
                pairs: list[tuple[bytes, bytes]] = []
                for _ in range(count):
                    k, pos = _string(frame, pos, end)
                    v, pos = _string(frame, pos, end)
                    pairs.append((k, v))
                blocks.append((INFO_STRINGS, pairs))
            elif kind == INFO_INTS:
                count, pos = _u16(frame, pos + 1, end)
                ints: list[tuple[int, bytes]] = []
                for _ in range(count):
                    key, pos = _u16(frame, pos, end)
                    v, pos = _string(frame, pos, end)
                    ints.append((key, v))
                blocks.append((INFO_INTS, ints))
            elif kind == INFO_ACL:
                token, pos = _string(frame, pos + 1, end)
                blocks.append((INFO_ACL, token))
            else:
                blocks.append((kind, frame[pos:end].rstrip(b"\x00")))
                break
    except _Short:
        raise ThriftError("TTHeader info block runs past the header", seqid) from None
    header = Header(seqid, protocol_id, flags, blocks, transforms)
    header.raw = frame[META_SIZE:end]
    header.payload_at = end
    return header


class _Short(Exception):
    pass


def _u16(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise _Short
    return _U16.unpack_from(buf, pos)[0], pos + 2


def _string(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    size, pos = _u16(buf, pos, end)
    if pos + size > end:
        raise _Short
    return buf[pos : pos + size], pos + size
