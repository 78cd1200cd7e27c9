"""Thrift message heads, framing and replies, over bytes (sans-IO).

Knows: the binary (strict and old non-strict) and compact message heads, the
four transports (framed, buffered/unframed, THeader, TTHeader) and how to
tell them apart from a connection's first bytes, how to skip a struct to find
where an unframed message ends, and how a TApplicationException is written.
Must not: decode argument structs into values, touch sockets, or decide
policy. Payload bytes are forwarded untouched; only the message head's seqid
is rewritten (and, for compact, the head re-encoded since its seqid is a
varint).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from meshproxy.codec import theader, ttheader
from meshproxy.codec.errors import Incomplete, ThriftError

# Message types (Apache thrift TMessageType).
CALL, REPLY, EXCEPTION, ONEWAY = 1, 2, 3, 4

# Wire protocols, numbered as THeader/TTHeader protocol ids.
BINARY, COMPACT = 0, 2
PROTOCOL_NAMES = {BINARY: "binary", COMPACT: "compact"}

# Transports.
FRAMED, BUFFERED, HEADER, TTHEADER = "framed", "buffered", "header", "ttheader"
TRANSPORTS = (FRAMED, BUFFERED, HEADER, TTHEADER)

# TApplicationException types.
UNKNOWN, UNKNOWN_METHOD, INTERNAL_ERROR, PROTOCOL_ERROR = 0, 1, 6, 7

_STRICT_VERSION = 0x80010000
_VERSION_MASK = 0xFFFF0000
_COMPACT_ID = 0x82
_COMPACT_VERSION = 1
# Method names are short identifiers; a longer one is a corrupt head.
MAX_NAME = 4096
# Structs nest this deep at most before a message is called malformed.
MAX_DEPTH = 64

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")


@dataclass(slots=True)
class Head:
    """A message head: where it is in the payload and what it says."""

    name: str
    mtype: int
    seqid: int
    protocol: int
    strict: bool  # binary only: the versioned head (old heads have none)
    seqid_at: int  # binary: offset of the 4-byte seqid; compact: -1 (a varint)
    body_at: int  # offset of the struct after the head


# -- message heads ----------------------------------------------------------


def read_head(payload: bytes | bytearray | memoryview, at: int = 0, protocol: int | None = None) -> Head:
    """The message head at `at`; `protocol` None means detect it.

    Raises Incomplete if the head is cut short, ThriftError if it is malformed.
    """
    n = len(payload)
    if n - at < 1:
        raise Incomplete(at + 1)
    first = payload[at]
    if protocol == COMPACT or (protocol is None and first == _COMPACT_ID):
        return _compact_head(payload, at)
    if n - at < 4:
        raise Incomplete(at + 4)
    word = _U32.unpack_from(payload, at)[0]
    if word & 0x80000000:
        if word & _VERSION_MASK != _STRICT_VERSION:
            raise ThriftError(f"bad binary protocol version {word >> 16:#06x}")
        mtype = word & 0xFF
        size_at = at + 4
        if n < size_at + 4:
            raise Incomplete(size_at + 4)
        size = _I32.unpack_from(payload, size_at)[0]
        _check_name_size(size)
        name_end = size_at + 4 + size
        if n < name_end + 4:
            raise Incomplete(name_end + 4)
        name = _name(payload, size_at + 4, name_end)
        seqid = _I32.unpack_from(payload, name_end)[0]
        head = Head(name, mtype, seqid, BINARY, True, name_end, name_end + 4)
    else:
        # Old (non-strict) head: name string, type byte, seqid.
        size = word
        _check_name_size(size)
        name_end = at + 4 + size
        if n < name_end + 5:
            raise Incomplete(name_end + 5)
        name = _name(payload, at + 4, name_end)
        mtype = payload[name_end]
        seqid = _I32.unpack_from(payload, name_end + 1)[0]
        head = Head(name, mtype, seqid, BINARY, False, name_end + 1, name_end + 5)
    if not CALL <= head.mtype <= ONEWAY:
        raise ThriftError(f"bad message type {head.mtype}", head.seqid)
    return head


def _check_name_size(size: int) -> None:
    if size < 0 or size > MAX_NAME:
        raise ThriftError(f"bad method name length {size}")


def _name(payload: bytes | bytearray | memoryview, start: int, end: int) -> str:
    try:
        return bytes(payload[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise ThriftError("method name is not UTF-8") from None


def _compact_head(payload: bytes | bytearray | memoryview, at: int) -> Head:
    n = len(payload)
    if n - at < 2:
        raise Incomplete(at + 2)
    if payload[at] != _COMPACT_ID:
        raise ThriftError(f"bad compact protocol id {payload[at]:#04x}")
    vt = payload[at + 1]
    if vt & 0x1F != _COMPACT_VERSION:
        raise ThriftError(f"bad compact protocol version {vt & 0x1F}")
    mtype = vt >> 5
    seqid, pos = _varint(payload, at + 2)
    if seqid > 0xFFFFFFFF:
        raise ThriftError("compact seqid does not fit 32 bits")
    if seqid & 0x80000000:
        seqid -= 1 << 32
    size, pos = _varint(payload, pos)
    _check_name_size(size)
    if n < pos + size:
        raise Incomplete(pos + size)
    name = _name(payload, pos, pos + size)
    if not CALL <= mtype <= ONEWAY:
        raise ThriftError(f"bad message type {mtype}", seqid)
    return Head(name, mtype, seqid, COMPACT, True, -1, pos + size)


def _varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    n = len(buf)
    while True:
        if pos >= n:
            raise Incomplete(pos + 1)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ThriftError("varint longer than 10 bytes")


def write_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_head(name: str, mtype: int, seqid: int, protocol: int, strict: bool = True) -> bytes:
    raw = name.encode("utf-8")
    if protocol == COMPACT:
        return (
            bytes((_COMPACT_ID, _COMPACT_VERSION | (mtype << 5)))
            + write_varint(seqid & 0xFFFFFFFF)
            + write_varint(len(raw))
            + raw
        )
    if strict:
        return _U32.pack(_STRICT_VERSION | mtype) + _I32.pack(len(raw)) + raw + _I32.pack(seqid)
    return _I32.pack(len(raw)) + raw + bytes((mtype,)) + _I32.pack(seqid)


def message_with_seqid(msg: Message, seqid: int) -> bytes:
    """The message alone (no transport bytes) with its seqid replaced."""
    frame, head, at = msg.frame, msg.head, msg.at
    if head.seqid_at >= 0:
        s = head.seqid_at
        return frame[at:s] + _I32.pack(_wrap(seqid)) + frame[s + 4 :]
    return encode_head(head.name, head.mtype, seqid, COMPACT) + frame[head.body_at :]


def reframe_with_seqid(msg: Message, seqid: int) -> bytes:
    """The whole frame, in its own transport, with the seqid replaced (headers too)."""
    frame, head = msg.frame, msg.head
    header = msg.header
    if head.seqid_at >= 0 and (header is None or not header.transformed):
        s = head.seqid_at
        packed = _I32.pack(_wrap(seqid))
        if header is None:
            return frame[:s] + packed + frame[s + 4 :]
        header.seqid = seqid
        return frame[:8] + packed + frame[12:s] + packed + frame[s + 4 :]
    payload = message_with_seqid(msg, seqid)
    if header is not None:
        header.seqid = seqid
    return wrap(msg.transport, payload, header)


def _wrap(seqid: int) -> int:
    seqid &= 0xFFFFFFFF
    return seqid - (1 << 32) if seqid & 0x80000000 else seqid


# -- skipping a message (unframed transport) --------------------------------

# Binary type ids.
_T_STOP, _T_BOOL, _T_BYTE, _T_DOUBLE, _T_I16, _T_I32, _T_I64 = 0, 2, 3, 4, 6, 8, 10
_T_STRING, _T_STRUCT, _T_MAP, _T_SET, _T_LIST, _T_UUID = 11, 12, 13, 14, 15, 16
_BINARY_FIXED = {_T_BOOL: 1, _T_BYTE: 1, _T_DOUBLE: 8, _T_I16: 2, _T_I32: 4, _T_I64: 8, _T_UUID: 16}


def message_end(buf: bytes | bytearray, at: int, head: Head, limit: int) -> int:
    """Where the message starting at `at` ends, by skipping its struct.

    Needed for the unframed transport only, which has no length prefix.
    Raises Incomplete, or ThriftError for a malformed or oversized message.
    """
    if head.protocol == COMPACT:
        end = _skip_compact_struct(buf, head.body_at, 0, at + limit)
    else:
        end = _skip_binary(buf, head.body_at, _T_STRUCT, 0, at + limit)
    return end


def _need(buf: bytes | bytearray, pos: int, size: int, limit: int) -> None:
    if pos + size > limit:
        raise ThriftError("message larger than the frame size limit")
    if pos + size > len(buf):
        raise Incomplete(pos + size)


def _skip_binary(buf: bytes | bytearray, pos: int, ttype: int, depth: int, limit: int) -> int:
    fixed = _BINARY_FIXED.get(ttype)
    if fixed is not None:
        _need(buf, pos, fixed, limit)
        return pos + fixed
    if ttype == _T_STRING:
        _need(buf, pos, 4, limit)
        size = _I32.unpack_from(buf, pos)[0]
        if size < 0:
            raise ThriftError("negative string length")
        _need(buf, pos + 4, size, limit)
        return pos + 4 + size
    if depth >= MAX_DEPTH:
        raise ThriftError("structs nested too deep")
    if ttype == _T_STRUCT:
        while True:
            _need(buf, pos, 1, limit)
            ftype = buf[pos]
            if ftype == _T_STOP:
                return pos + 1
            _need(buf, pos, 3, limit)
            pos = _skip_binary(buf, pos + 3, ftype, depth + 1, limit)
    if ttype == _T_MAP:
        _need(buf, pos, 6, limit)
        ktype, vtype = buf[pos], buf[pos + 1]
        count = _I32.unpack_from(buf, pos + 2)[0]
        pos += 6
        if count < 0:
            raise ThriftError("negative map size")
        for _ in range(count):
            pos = _skip_binary(buf, pos, ktype, depth + 1, limit)
            pos = _skip_binary(buf, pos, vtype, depth + 1, limit)
        return pos
    if ttype in (_T_SET, _T_LIST):
        _need(buf, pos, 5, limit)
        etype = buf[pos]
        count = _I32.unpack_from(buf, pos + 1)[0]
        pos += 5
        if count < 0:
            raise ThriftError("negative list size")
        efixed = _BINARY_FIXED.get(etype)
        if efixed is not None:  # a list of numbers: one bounds check, not one per element
            _need(buf, pos, efixed * count, limit)
            return pos + efixed * count
        for _ in range(count):
            pos = _skip_binary(buf, pos, etype, depth + 1, limit)
        return pos
    raise ThriftError(f"unknown binary field type {ttype}")


# Compact type ids.
_C_TRUE, _C_FALSE, _C_BYTE, _C_I16, _C_I32, _C_I64, _C_DOUBLE = 1, 2, 3, 4, 5, 6, 7
_C_BINARY, _C_LIST, _C_SET, _C_MAP, _C_STRUCT, _C_UUID = 8, 9, 10, 11, 12, 13


def _skip_varint(buf: bytes | bytearray, pos: int, limit: int) -> int:
    for i in range(10):
        _need(buf, pos + i, 1, limit)
        if not buf[pos + i] & 0x80:
            return pos + i + 1
    raise ThriftError("varint longer than 10 bytes")


def _skip_compact(buf: bytes | bytearray, pos: int, ctype: int, depth: int, limit: int) -> int:
    if ctype in (_C_TRUE, _C_FALSE, _C_BYTE):
        _need(buf, pos, 1, limit)
        return pos + 1
    if ctype in (_C_I16, _C_I32, _C_I64):
        return _skip_varint(buf, pos, limit)
    if ctype == _C_DOUBLE:
        _need(buf, pos, 8, limit)
        return pos + 8
    if ctype == _C_UUID:
        _need(buf, pos, 16, limit)
        return pos + 16
    if ctype == _C_BINARY:
        _need(buf, pos, 1, limit)
        size, pos = _varint(buf, pos)
        _need(buf, pos, size, limit)
        return pos + size
    if depth >= MAX_DEPTH:
        raise ThriftError("structs nested too deep")
    if ctype == _C_STRUCT:
        return _skip_compact_struct(buf, pos, depth + 1, limit)
    if ctype in (_C_LIST, _C_SET):
        _need(buf, pos, 1, limit)
        b = buf[pos]
        etype = b & 0x0F
        count = b >> 4
        pos += 1
        if count == 15:
            count, pos = _varint(buf, pos)
        for _ in range(count):
            # Elements of a bool list are one byte each, not folded into a header.
            pos = _skip_compact(buf, pos, _C_BYTE if etype in (_C_TRUE, _C_FALSE) else etype, depth + 1, limit)
        return pos
    if ctype == _C_MAP:
        _need(buf, pos, 1, limit)
        count, pos = _varint(buf, pos)
        if count == 0:
            return pos
        _need(buf, pos, 1, limit)
        kv = buf[pos]
        pos += 1
        ktype, vtype = kv >> 4, kv & 0x0F
        ktype = _C_BYTE if ktype in (_C_TRUE, _C_FALSE) else ktype
        vtype = _C_BYTE if vtype in (_C_TRUE, _C_FALSE) else vtype
        for _ in range(count):
            pos = _skip_compact(buf, pos, ktype, depth + 1, limit)
            pos = _skip_compact(buf, pos, vtype, depth + 1, limit)
        return pos
    raise ThriftError(f"unknown compact field type {ctype}")


def _skip_compact_struct(buf: bytes | bytearray, pos: int, depth: int, limit: int) -> int:
    while True:
        _need(buf, pos, 1, limit)
        b = buf[pos]
        pos += 1
        if b == 0:
            return pos
        ctype = b & 0x0F
        if b >> 4 == 0:  # long form: the field id follows as a zigzag varint
            pos = _skip_varint(buf, pos, limit)
        if ctype in (_C_TRUE, _C_FALSE):
            continue  # a bool field's value is its type nibble
        pos = _skip_compact(buf, pos, ctype, depth, limit)


# -- TApplicationException ---------------------------------------------------


def application_exception(name: str, seqid: int, kind: int, message: str, protocol: int, strict: bool = True) -> bytes:
    """An EXCEPTION message: TApplicationException {1: message, 2: type}."""
    text = message.encode("utf-8")
    head = encode_head(name, EXCEPTION, seqid, protocol, strict)
    if protocol == COMPACT:
        # Field 1 binary (delta 1, type 8), field 2 i32 (delta 1, type 5, zigzag), stop.
        return head + b"\x18" + write_varint(len(text)) + text + b"\x15" + write_varint(kind << 1) + b"\x00"
    return (
        head
        + bytes((_T_STRING,)) + _U16.pack(1) + _I32.pack(len(text)) + text
        + bytes((_T_I32,)) + _U16.pack(2) + _I32.pack(kind)
        + b"\x00"
    )


# -- transports ---------------------------------------------------------------


def detect(first: bytes | bytearray) -> tuple[str, int | None] | None:
    """(transport, protocol or None) from a connection's first bytes; None if too short.

    TTHeader: bytes 4..5 = 0x1000; THeader: 0x0FFF; framed: a strict binary
    (0x8001) or compact (0x82) head at byte 4; unframed: one at byte 0.
    Raises ThriftError for bytes that are none of these.
    """
    if len(first) < 2:
        return None
    if first[0] == 0x80 and first[1] == 0x01:
        return BUFFERED, BINARY
    if first[0] == _COMPACT_ID and first[1] & 0x1F == _COMPACT_VERSION:
        return BUFFERED, COMPACT
    if len(first) < 6:
        return None
    if first[4] == 0x10 and first[5] == 0x00:
        return TTHEADER, None
    if first[4] == 0x0F and first[5] == 0xFF:
        return HEADER, None
    if first[4] == 0x80 and first[5] == 0x01:
        return FRAMED, BINARY
    if first[4] == _COMPACT_ID:
        return FRAMED, COMPACT
    raise ThriftError(f"not a Thrift connection (first bytes {bytes(first[:6]).hex()})")


@dataclass(slots=True)
class Message:
    """One Thrift message as read off a connection.

    `frame` is the whole message as received (length prefix and header block
    included), so an unchanged message is forwarded byte for byte; `at` is
    where the message (head) starts inside it.
    """

    transport: str
    head: Head
    frame: bytes
    at: int
    header: theader.Header | ttheader.Header | None = None

    @property
    def payload(self) -> bytes:
        return self.frame[self.at :]


class Reader:
    """Splits a byte stream into Messages (sans-IO).

    `transport`/`protocol` None means detect from the first bytes (once per
    connection). Nothing is allocated for an announced size before the bytes
    arrive: the buffer grows only with what was received. Messages are taken
    from a read offset (the consumed front is dropped now and then, not per
    message, so a burst of small pipelined frames costs no quadratic copying).
    """

    __slots__ = ("_buf", "_need", "_pos", "max_frame", "max_header", "protocol", "transport")

    def __init__(
        self,
        transport: str | None,
        protocol: int | None,
        max_frame: int = 16 * 1024 * 1024,
        max_header: int = 64 * 1024,
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self.max_frame = max_frame
        self.max_header = max_header
        self._buf = bytearray()
        self._pos = 0
        self._need = 0  # bytes needed past the read offset before parsing again

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if self._pos:
            if self._pos == len(buf):
                buf.clear()
                self._pos = 0
            elif self._pos > 65536 and self._pos * 2 > len(buf):
                del buf[: self._pos]
                self._pos = 0
        buf += data

    def next(self) -> Message | None:
        """The next whole message, or None until more bytes arrive."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < self._need or len(buf) == pos:
            return None
        if self.transport is None:
            found = detect(buf[pos : pos + 6])
            if found is None:
                return None
            self.transport, protocol = found
            if self.protocol is None:
                self.protocol = protocol
        try:
            if self.transport == BUFFERED:
                msg = self._unframed(buf, pos)
            else:
                msg = self._framed(buf, pos)
        except Incomplete as e:
            self._need = e.need - pos
            return None
        self._need = 0
        return msg

    def _framed(self, buf: bytearray, pos: int) -> Message:
        if len(buf) - pos < 4:
            raise Incomplete(pos + 4)
        size = _I32.unpack_from(buf, pos)[0]
        if size < 0 or size > self.max_frame:
            raise ThriftError(f"frame size {size} is over the limit of {self.max_frame}")
        end = pos + 4 + size
        if len(buf) < end:
            raise Incomplete(end)
        frame = bytes(buf[pos:end])
        self._pos = end
        transport = self.transport
        if transport == TTHEADER or transport == HEADER:
            header: theader.Header | ttheader.Header
            if transport == TTHEADER:
                header = ttheader.decode(frame, self.max_header)
            else:
                header = theader.decode(frame, self.max_header)
            protocol = header.protocol_id
            if protocol not in (BINARY, COMPACT):
                raise ThriftError(f"unsupported protocol id {protocol}", header.seqid)
            # A compressed payload is forwarded inflated: it becomes the frame.
            body, at = (header.payload(frame), 0) if header.transformed else (frame, header.payload_at)
            try:
                head = read_head(body, at, protocol)
            except Incomplete:
                raise ThriftError("message head is cut short by its frame", header.seqid) from None
            return Message(transport, head, body, at, header)
        try:
            head = read_head(frame, 4, self.protocol)
        except Incomplete:
            raise ThriftError("message head is cut short by its frame") from None
        return Message(transport, head, frame, 4)

    def _unframed(self, buf: bytearray, pos: int) -> Message:
        head = read_head(buf, pos, self.protocol)
        end = message_end(buf, pos, head, self.max_frame)
        frame = bytes(buf[pos:end])
        self._pos = end
        if pos:  # offsets relative to the message
            if head.seqid_at >= 0:
                head.seqid_at -= pos
            head.body_at -= pos
        return Message(BUFFERED, head, frame, 0)


# -- writing a message in a transport ----------------------------------------


def wrap(transport: str, payload: bytes, header: theader.Header | ttheader.Header | None = None) -> bytes:
    """`payload` (one message) in `transport`; header transports take their block from `header`."""
    if transport == FRAMED:
        return _I32.pack(len(payload)) + payload
    if transport == BUFFERED:
        return payload
    if header is None:
        raise ValueError(f"{transport} needs a header block")
    return header.encode(payload)


