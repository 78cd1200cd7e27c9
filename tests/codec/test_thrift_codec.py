"""The Thrift codecs over bytes: heads, transports, TTHeader and THeader blocks.

TTHeader vectors are written out by hand from the byte layout in
cloudwego/gopkg protocol/ttheader/encode.go (writeKVInfo: ACL token block,
then string key/values, then integer key/values, then zero padding to a
multiple of 4; HEADER_SIZE counts 4-byte words; LENGTH counts every byte after
itself) and decode.go (readKVInfo: padding bytes are skipped, a u16 count
per block, u16-length strings). Integer key numbers are from metakey.go.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from thrift.protocol import TBinaryProtocol, TCompactProtocol
from thrift.transport import THeaderTransport, TTransport

from meshproxy.codec import theader, thrift, ttheader
from meshproxy.codec.errors import ThriftError

# An echo call (args {1: binary "abc"}) in strict binary, seqid 7.
BINARY_CALL = bytes.fromhex("80010001" "00000004") + b"echo" + bytes.fromhex("00000007" "0b0001" "00000003") + b"abc" + b"\x00"


def test_strict_binary_head() -> None:
    head = thrift.read_head(BINARY_CALL)
    assert (head.name, head.mtype, head.seqid, head.protocol, head.strict) == ("echo", thrift.CALL, 7, thrift.BINARY, True)
    assert BINARY_CALL[head.seqid_at : head.seqid_at + 4] == b"\x00\x00\x00\x07"


def test_old_binary_head_is_accepted() -> None:
    old = struct.pack("!i", 4) + b"echo" + b"\x01" + struct.pack("!i", 9) + b"\x00"
    head = thrift.read_head(old)
    assert (head.name, head.mtype, head.seqid, head.strict) == ("echo", thrift.CALL, 9, False)
    r = thrift.Reader("framed", thrift.BINARY)
    r.feed(thrift.wrap("framed", old))
    msg = r.next()
    assert msg is not None
    assert thrift.message_with_seqid(msg, 5) == struct.pack("!i", 4) + b"echo\x01" + struct.pack("!i", 5) + b"\x00"


def _apache(protocol_factory: object, seqid: int, name: str = "echo", mtype: int = 1) -> bytes:
    buf = TTransport.TMemoryBuffer()
    proto = protocol_factory.getProtocol(buf)  # type: ignore[attr-defined]
    proto.writeMessageBegin(name, mtype, seqid)
    proto.writeStructBegin("args")
    proto.writeFieldBegin("data", 11, 1)
    proto.writeBinary(b"\x00\x01payload")
    proto.writeFieldEnd()
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    return buf.getvalue()


@pytest.mark.parametrize("seqid", [0, 1, 300, 2**31 - 1])
def test_compact_head_and_seqid_rewrite(seqid: int) -> None:
    payload = _apache(TCompactProtocol.TCompactProtocolFactory(), seqid)
    head = thrift.read_head(payload)
    assert (head.name, head.seqid, head.protocol) == ("echo", seqid, thrift.COMPACT)
    msg = thrift.Message("buffered", head, payload, 0)
    assert thrift.message_with_seqid(msg, 123456) == _apache(TCompactProtocol.TCompactProtocolFactory(), 123456)
    framed = thrift.wrap("framed", payload)
    fmsg = thrift.Message("framed", thrift.read_head(framed, 4), framed, 4)
    assert thrift.reframe_with_seqid(fmsg, 5) == thrift.wrap("framed", _apache(TCompactProtocol.TCompactProtocolFactory(), 5))


@pytest.mark.parametrize(
    ("factory", "first"),
    [(TBinaryProtocol.TBinaryProtocolFactory(), "binary"), (TCompactProtocol.TCompactProtocolFactory(), "compact")],
)
@pytest.mark.parametrize("transport", ["framed", "buffered"])
def test_detect_and_split_pipelined(factory: object, first: str, transport: str) -> None:
    messages = [_apache(factory, i) for i in range(3)]
    stream = b"".join(thrift.wrap(transport, m) for m in messages)
    r = thrift.Reader(None, None)
    got = []
    for i in range(len(stream)):  # a byte at a time: every cut point
        r.feed(stream[i : i + 1])
        while (msg := r.next()) is not None:
            got.append(msg)
    assert [m.head.seqid for m in got] == [0, 1, 2]
    assert r.transport == transport and thrift.PROTOCOL_NAMES[r.protocol or 0] == first
    assert [m.payload for m in got] == messages


# -- TTHeader, byte for byte --------------------------------------------------

# seqid 1, flags 0, binary, an ACL token "tok", string {"k": "v"}, ints {FromService(3): "a", ToMethod(9): "echo"}.
TTHEADER_INFO = bytes.fromhex(
    "00"  # PROTOCOL ID: binary (ProtocolIDThriftBinary = 0x00)
    "00"  # NUM TRANSFORMS: 0
    "11" "0003" "746f6b"  # InfoIDACLToken 0x11: u16 len, "tok"
    "01" "0001" "0001" "6b" "0001" "76"  # InfoIDKeyValue 0x01: count 1, "k" -> "v"
    "10" "0002" "0003" "0001" "61" "0009" "0004" "6563686f"  # InfoIDIntKeyValue 0x10: 3->"a", 9->"echo"
)
# 2 + 6 + 9 + 16 = 33 bytes, then 3 bytes of zero padding: HEADER_SIZE = 36 / 4 = 9 words.


def ttheader_frame(payload: bytes, info: bytes = TTHEADER_INFO, seqid: int = 1, flags: int = 0) -> bytes:
    padded = info + b"\x00" * (-len(info) % 4)
    rest = struct.pack("!HHIH", 0x1000, flags, seqid, len(padded) // 4) + padded + payload
    return struct.pack("!I", len(rest)) + rest


def test_ttheader_decode_matches_layout() -> None:
    payload = thrift.encode_head("echo", thrift.CALL, 1, thrift.BINARY) + b"\x00"
    frame = ttheader_frame(payload)
    assert len(TTHEADER_INFO) == 33
    assert frame[4:6] == b"\x10\x00" and frame[12:14] == b"\x00\x09"
    assert frame[14 + 33 : 14 + 36] == b"\x00\x00\x00"
    h = ttheader.decode(frame)
    assert (h.seqid, h.flags, h.protocol_id, h.payload_at) == (1, 0, 0, 14 + 36)
    assert h.metadata() == [
        (b"tt.acl_token", b"tok"), (b"k", b"v"), (b"tt.from_service", b"a"), (b"tt.to_method", b"echo"),
    ]
    assert h.encode(h.payload(frame)) == frame  # unchanged: byte-exact


def test_ttheader_encode_from_metadata_writes_kitex_order() -> None:
    payload = b"\x80\x01\x00\x01"
    h = ttheader.Header(seqid=1, protocol_id=0)
    # Given in another order, written as Kitex writes it: ACL, strings, ints.
    h.set_metadata([(b"tt.from_service", b"a"), (b"k", b"v"), (b"tt.acl_token", b"tok"), (b"tt.to_method", b"echo")])
    assert h.encode(payload) == ttheader_frame(payload)


def test_ttheader_padding_and_out_of_order_flag() -> None:
    info = bytes.fromhex("00" "00" "01" "0001" "0001" "6b" "0002" "7676")  # 11 bytes -> 1 byte of padding
    frame = ttheader_frame(b"\x80\x01\x00\x01", info, seqid=9, flags=ttheader.FLAG_OUT_OF_ORDER)
    assert frame[12:14] == b"\x00\x03"
    h = ttheader.decode(frame)
    assert h.out_of_order and h.metadata() == [(b"k", b"vv")]
    h.set_metadata(h.metadata())  # re-encoded from the metadata, not the raw bytes
    assert h.encode(h.payload(frame)) == frame


def test_ttheader_unknown_block_is_kept() -> None:
    info = bytes.fromhex("00" "00" "01" "0001" "0001" "6b" "0001" "76" "7f" "abcdef")  # 0x7f: unknown info id
    frame = ttheader_frame(b"\x80\x01\x00\x01", info)
    h = ttheader.decode(frame)
    assert h.metadata() == [(b"k", b"v")]
    h.set_metadata([(b"k", b"w")])
    out = h.encode(b"\x80\x01\x00\x01")
    assert b"\x7f\xab\xcd\xef" in out
    assert ttheader.decode(out).metadata() == [(b"k", b"w")]


def test_ttheader_int_keys_by_number() -> None:
    assert ttheader.int_key(b"tt.rpc_timeout") == 12 and ttheader.int_key(b"tt.to_service") == 6
    assert ttheader.int_key(b"tt.300") == 300 and ttheader.int_key(b"rpc_timeout") is None
    assert ttheader.int_key_name(300) == b"tt.300"


@pytest.mark.parametrize(
    ("info", "problem"),
    [
        (bytes.fromhex("00" "00" "01" "0005" "0001"), "runs past"),  # count 5, one short string
        (bytes.fromhex("00" "00" "11" "0040" "61"), "runs past"),  # ACL token longer than the header
        (bytes.fromhex("00" "01" "01"), "transforms"),  # a transform Kitex never writes
    ],
)
def test_ttheader_malformed_blocks(info: bytes, problem: str) -> None:
    with pytest.raises(ThriftError, match=problem) as e:
        ttheader.decode(ttheader_frame(b"\x80\x01\x00\x01", info, seqid=4))
    assert e.value.seqid == 4


def test_ttheader_header_size_past_frame() -> None:
    frame = struct.pack("!IHHIH", 12, 0x1000, 0, 1, 100) + b"\x00\x00"
    with pytest.raises(ThriftError, match="larger than the frame"):
        ttheader.decode(frame)


# -- THeader against Apache thrift's own writer --------------------------------


@pytest.mark.parametrize("protocol_id", [0, 2])
def test_theader_round_trip_with_apache(protocol_id: int) -> None:
    out = TTransport.TMemoryBuffer()
    t = THeaderTransport.THeaderTransport(out, [THeaderTransport.THeaderClientType.HEADERS], protocol_id)
    t.set_header(b"caller", b"svc-a")
    t.set_header(b"x-request-id", b"r1")
    t.sequence_id = 77
    factory = TCompactProtocol.TCompactProtocolFactory() if protocol_id else TBinaryProtocol.TBinaryProtocolFactory()
    payload = _apache(factory, 77)
    t.write(payload)
    t.flush()
    frame = out.getvalue()
    r = thrift.Reader(None, None)
    r.feed(frame)
    msg = r.next()
    assert msg is not None and msg.transport == "header" and msg.head.seqid == 77
    assert isinstance(msg.header, theader.Header)
    assert dict(msg.header.metadata()) == {b"caller": b"svc-a", b"x-request-id": b"r1"}
    assert msg.payload == payload
    assert msg.header.encode(msg.payload) == frame
    # A rewritten seqid lands in both the header and the message, and Apache reads it back.
    again = thrift.reframe_with_seqid(msg, 5)
    back = THeaderTransport.THeaderTransport(TTransport.TMemoryBuffer(again), [THeaderTransport.THeaderClientType.HEADERS])
    back.readFrame(0)
    assert back.sequence_id == 5 and back.get_headers()[b"caller"] == b"svc-a"


def test_theader_zlib_payload_is_inflated() -> None:
    out = TTransport.TMemoryBuffer()
    t = THeaderTransport.THeaderTransport(out, [THeaderTransport.THeaderClientType.HEADERS])
    t.add_transform(THeaderTransport.THeaderTransformID.ZLIB)
    payload = _apache(TBinaryProtocol.TBinaryProtocolFactory(), 3)
    t.write(payload)
    t.flush()
    r = thrift.Reader("header", None)
    r.feed(out.getvalue())
    msg = r.next()
    assert msg is not None and msg.payload == payload and msg.head.name == "echo"
    reframed = thrift.reframe_with_seqid(msg, 4)
    assert theader.decode(reframed).transformed is False


# -- TApplicationException, read back by Apache thrift ------------------------


@pytest.mark.parametrize("protocol", [thrift.BINARY, thrift.COMPACT])
def test_application_exception_reads_back(protocol: int) -> None:
    from thrift.Thrift import TApplicationException

    data = thrift.application_exception("echo", 42, thrift.UNKNOWN_METHOD, "no route for /S/echo", protocol)
    factory = TCompactProtocol.TCompactProtocolFactory() if protocol else TBinaryProtocol.TBinaryProtocolFactory()
    proto = factory.getProtocol(TTransport.TMemoryBuffer(data))
    name, mtype, seqid = proto.readMessageBegin()
    assert (name, mtype, seqid) == ("echo", thrift.EXCEPTION, 42)
    x = TApplicationException()
    x.read(proto)
    assert x.type == TApplicationException.UNKNOWN_METHOD and x.message == "no route for /S/echo"


# -- limits and malformed input -----------------------------------------------


def test_frame_over_limit_is_refused_before_its_bytes_arrive() -> None:
    r = thrift.Reader("framed", None, max_frame=1024)
    r.feed(struct.pack("!i", 2000) + b"\x80")
    with pytest.raises(ThriftError, match="over the limit"):
        r.next()


def test_unframed_message_over_limit() -> None:
    r = thrift.Reader("buffered", None, max_frame=1024)
    r.feed(thrift.encode_head("echo", 1, 1, thrift.BINARY) + b"\x0b\x00\x01" + struct.pack("!i", 5000))
    with pytest.raises(ThriftError, match="larger than"):
        r.next()


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02\x00\x01\x00\x00\x00\x01a\x00\x00\x00\x01\x00",  # bad version
        b"\x80\x01\x00\x09\x00\x00\x00\x01a\x00\x00\x00\x01\x00",  # message type 9
        b"\x80\x01\x00\x01\xff\xff\xff\xff",  # negative name length
        b"\x80\x01\x00\x01\x00\x00\x00\x01a\x00\x00\x00\x01\x63\x00\x01",  # unknown field type 0x63
    ],
)
def test_malformed_unframed(data: bytes) -> None:
    r = thrift.Reader("buffered", thrift.BINARY)
    r.feed(data + b"\x00" * 16)
    with pytest.raises(ThriftError):
        r.next()


def test_not_thrift_at_all() -> None:
    r = thrift.Reader(None, None)
    r.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ThriftError, match="not a Thrift connection"):
        r.next()


def test_deep_nesting_is_refused() -> None:
    body = b"\x0c\x00\x01" * 100 + b"\x00" * 101
    r = thrift.Reader("buffered", thrift.BINARY)
    r.feed(thrift.encode_head("echo", 1, 1, thrift.BINARY) + body)
    with pytest.raises(ThriftError, match="nested"):
        r.next()


_SEEDS = [
    thrift.wrap("framed", BINARY_CALL),
    BINARY_CALL,
    ttheader_frame(BINARY_CALL),
    thrift.wrap("framed", _apache(TCompactProtocol.TCompactProtocolFactory(), 3)),
]


@settings(max_examples=400, deadline=None)
@given(
    seed=st.sampled_from(_SEEDS),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 200),
)
def test_mutated_bytes_give_messages_or_thrift_errors(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    r = thrift.Reader(None, None, max_frame=4096, max_header=1024)
    r.feed(bytes(data[:cut]) if cut else bytes(data))
    try:
        while r.next() is not None:
            pass
    except ThriftError:
        pass


@pytest.mark.parametrize("transport", ["framed", "buffered"])
def test_a_burst_of_pipelined_messages_in_one_read(transport: str) -> None:
    messages = [_apache(TBinaryProtocol.TBinaryProtocolFactory(), i) for i in range(5000)]
    r = thrift.Reader(transport, thrift.BINARY)
    stream = b"".join(thrift.wrap(transport, m) for m in messages)
    half = len(stream) // 2 + 3  # cut inside a message
    r.feed(stream[:half])
    got = []
    while (msg := r.next()) is not None:
        got.append(msg)
    r.feed(stream[half:])
    while (msg := r.next()) is not None:
        got.append(msg)
    assert [m.head.seqid for m in got] == list(range(5000)) and r.buffered == 0
    assert all(m.payload == messages[i] for i, m in enumerate(got))
    assert thrift.message_with_seqid(got[-1], 1) == _apache(TBinaryProtocol.TBinaryProtocolFactory(), 1)
