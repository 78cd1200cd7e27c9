"""A lean HTTP/2 client codec for unary exchanges (the risk callout).

Knows: the part of RFC 9113 a client needs to send requests (HEADERS, then
DATA within the peer's windows) and read their responses (HEADERS, DATA,
trailers): SETTINGS and their ACK, PING ACKs, WINDOW_UPDATE both ways,
GOAWAY, RST_STREAM, CONTINUATION, padding, SETTINGS_MAX_CONCURRENT_STREAMS,
and HPACK (meshproxy/codec/hpack.py). Must not: do I/O, read clocks, or
decide what a failure means to the caller.

Why not h2: a risk check is a small request and a small reply, and h2's
state machine plus the proxy's connection machinery (a reader task, a
batched writer) cost about what a whole proxy leg does. Here the caller
sends one request (enforce mode) or a batch of them at once (report mode,
several streams in one write), reads until their Responses are ended, and
reuses the connection. A reset or refused stream, a reply too long or a
malformed one ends its Response with an `error`; anything wrong with the connection is an `ExchangeFailed` raised
from `receive`, and the connection is dropped (a fresh one is cheap; this
path never has to recover one).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hpack.exceptions import HPACKError

from meshproxy.codec.hpack import LeanDecoder, StatelessEncoder

__all__ = ["PREFACE", "ExchangeFailed", "MalformedReply", "ReplyTooLong", "Response", "StreamRefused", "StreamReset",
           "UnaryClient"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE = 1, 2, 3, 4
SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 5, 6
DEFAULT_WINDOW = 65_535
FRAME_MAX = 16_384  # what we accept: we never raise SETTINGS_MAX_FRAME_SIZE
MAX_STREAM_ID = 2**31 - 1
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0, 1, 3, 6, 7, 8, 9
# A header block (with its CONTINUATIONs) past this is an attack, not a reply.
MAX_HEADER_BLOCK = 64 * 1024
# Exchanges in flight on one connection at most, whatever the server allows.
MAX_IN_FLIGHT = 100

_FRAME = struct.Struct("!HBBBI")  # length as 16 + 8 bits, type, flags, stream id


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + payload


class ExchangeFailed(Exception):
    """The connection failed and cannot be trusted (a protocol error): drop it. The subclasses
    StreamReset, ReplyTooLong and MalformedReply are one exchange's failure, on a Response's `error`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamReset(ExchangeFailed):
    """The server reset the stream (RST_STREAM, or GOAWAY below it): that exchange failed, the connection is fine."""


class ReplyTooLong(ExchangeFailed):
    """The reply's body went past max_reply: the stream was reset (CANCEL), the connection is fine."""


class MalformedReply(ExchangeFailed):
    """The reply broke HTTP's rules for one (RFC 9113 8.1.1: a content-length that is not its body's
    length): that exchange failed (ended), the connection is fine."""


class StreamRefused(StreamReset):
    """The server did not process the request (RST_STREAM REFUSED_STREAM, or GOAWAY below it): safe to send again."""


@dataclass(slots=True)
class Response:
    head: list[tuple[bytes, bytes]] | None = None
    data: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    ended: bool = False
    error: ExchangeFailed | None = None  # the exchange failed alone: StreamReset, ReplyTooLong, MalformedReply


class _Stream:
    __slots__ = ("pending", "response", "send_window")

    def __init__(self, send_window: int, body: bytes) -> None:
        self.response = Response()
        self.pending = memoryview(body)  # request body not yet sent (waiting for window)
        self.send_window = send_window


class UnaryClient:
    """One connection's state. `request` (once, or several times for a batch), send
    `data_to_send()`, then feed `receive` until each returned Response is ended,
    sending `data_to_send()` after each call."""

    def __init__(self, max_reply: int, window: int = 1 << 20, max_header_list_size: int = 64 * 1024,
                 max_streams: int = MAX_IN_FLIGHT) -> None:
        """`max_streams`: the server's SETTINGS_MAX_CONCURRENT_STREAMS as far as known before its
        SETTINGS arrive (RFC 9113 says unlimited; a client that learned a lower one says so)."""
        self.max_reply = max_reply
        self.window = window
        self._encoder = StatelessEncoder()
        self._decoder = LeanDecoder(max_header_list_size)
        self._out = bytearray(PREFACE)
        # HEADER_TABLE_SIZE 0: the server's replies use no dynamic table, so each reply's header
        # block decodes alone (and from the shared memo, with no table to replay it into): about
        # 4 µs less per reply from nginx, and no table kept per connection.
        self._out += frame(SETTINGS, 0, 0, struct.pack(
            "!HIHIHIHI", SETTINGS_HEADER_TABLE_SIZE, 0, SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, window,
            SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list_size))
        self._out += frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", window - DEFAULT_WINDOW))
        self._in = bytearray()
        self._next_id = 1
        self._streams: dict[int, _Stream] = {}  # exchanges in progress
        self._completed: Response | None = None  # the last Response ended by the bytes being read
        self._conn_send_window = DEFAULT_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_frame_max = FRAME_MAX
        self.peer_max_streams = min(max_streams, MAX_IN_FLIGHT)
        self._unacked = 0  # connection-level bytes received and not yet given back
        self._block: bytearray | None = None  # a header block waiting for CONTINUATION
        self._block_stream = 0
        self._block_ends = False
        self.goaway = False
        self.settings_seen = False  # the server's SETTINGS came: peer_max_streams is its limit, not a guess

    @property
    def usable(self) -> bool:
        """Another exchange may start on this connection now."""
        return not self.goaway and len(self._streams) < self.peer_max_streams and self._next_id <= MAX_STREAM_ID

    @property
    def idle(self) -> bool:
        """No exchange in progress."""
        return not self._streams

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- sending

    def request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        """Start an exchange; its Response fills in as `receive` reads the reply."""
        if not self.usable:
            raise ExchangeFailed(NO_ERROR, "connection is busy or done")
        sid = self._next_id
        self._next_id += 2
        stream = self._streams[sid] = _Stream(self._peer_initial_window, body)
        block = self._encoder.encode(headers)
        first, rest = block[: self._peer_frame_max], block[self._peer_frame_max :]
        flags = (0 if rest else END_HEADERS) | (0 if body else END_STREAM)
        self._out += frame(HEADERS, flags, sid, first)
        while rest:
            part, rest = rest[: self._peer_frame_max], rest[self._peer_frame_max :]
            self._out += frame(CONTINUATION, 0 if rest else END_HEADERS, sid, part)
        if body:
            self._send_body(sid, stream)
        return stream.response

    def _send_bodies(self) -> None:
        for sid, stream in self._streams.items():
            if stream.pending:
                self._send_body(sid, stream)
                if self._conn_send_window <= 0:
                    return

    def _send_body(self, sid: int, stream: _Stream) -> None:
        pending = stream.pending
        while pending:
            n = min(len(pending), self._conn_send_window, stream.send_window, self._peer_frame_max)
            if n <= 0:
                break
            last = n == len(pending)
            self._out += frame(DATA, END_STREAM if last else 0, sid, bytes(pending[:n]))
            self._conn_send_window -= n
            stream.send_window -= n
            pending = pending[n:]
        stream.pending = pending

    # -- receiving

    def receive(self, data: bytes) -> Response | None:
        """Take bytes from the server; the Response they ended (the last one, if several), else None."""
        buf = self._in
        buf += data
        at = 0
        self._completed = None
        while len(buf) - at >= 9:
            hi, lo, kind, flags, sid = _FRAME.unpack_from(buf, at)
            length = hi << 8 | lo
            sid &= MAX_STREAM_ID
            if length > FRAME_MAX:
                raise ExchangeFailed(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if len(buf) - at - 9 < length:
                break
            payload = bytes(buf[at + 9 : at + 9 + length])
            at += 9 + length
            if self._block is not None and kind != CONTINUATION:
                raise ExchangeFailed(PROTOCOL_ERROR, "header block interrupted")
            self._frame(kind, flags, sid, payload)
        del buf[:at]
        return self._completed

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == DATA:
            self._data(flags, sid, payload)
        elif kind == HEADERS or kind == CONTINUATION:
            self._headers(kind, flags, sid, payload)
        elif kind == SETTINGS:
            self._settings(flags, sid, payload)
        elif kind == PING:
            if len(payload) != 8 or sid:
                raise ExchangeFailed(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self._out += frame(PING, ACK, 0, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif kind == RST_STREAM:
            if len(payload) != 4 or not sid:
                raise ExchangeFailed(PROTOCOL_ERROR, "bad RST_STREAM")
            self._opened(sid)
            if sid in self._streams:  # else one already ended (RFC 9113 8.1: nginx resets after its reply)
                code = int.from_bytes(payload, "big")
                cls = StreamRefused if code == REFUSED_STREAM else StreamReset
                self._fail(sid, cls(code, f"stream reset by the server (code {code})"))
        elif kind == GOAWAY:
            if len(payload) < 8 or sid:
                raise ExchangeFailed(PROTOCOL_ERROR, "bad GOAWAY")
            self.goaway = True
            last = int.from_bytes(payload[:4], "big") & MAX_STREAM_ID
            for unprocessed in [i for i in self._streams if i > last]:
                self._fail(unprocessed, StreamRefused(REFUSED_STREAM, "GOAWAY: the request was not processed"))
        elif kind == PUSH_PROMISE:
            raise ExchangeFailed(PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        # PRIORITY and unknown types are ignored (RFC 9113 4.1, 5.5)

    def _fail(self, sid: int, error: ExchangeFailed) -> None:
        stream = self._streams.pop(sid)
        stream.response.error = error
        stream.response.ended = True
        self._completed = stream.response

    def _opened(self, sid: int) -> None:
        """RFC 9113 5.1: a frame on a stream we never opened (push is off) is a connection error."""
        if sid >= self._next_id or not sid & 1:
            raise ExchangeFailed(PROTOCOL_ERROR, f"frame on idle stream {sid}")

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ExchangeFailed(PROTOCOL_ERROR, "bad padding")
        return payload[1 : len(payload) - payload[0]]

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise ExchangeFailed(PROTOCOL_ERROR, "DATA on stream 0")
        self._unacked += len(payload)  # flow control counts padding too
        if self._unacked >= self.window // 2:
            self._out += frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", self._unacked))
            self._unacked = 0
        stream = self._streams.get(sid)
        if stream is None:
            self._opened(sid)
            return  # a stream that ended or that we gave up on: its window is given back above
        r = stream.response
        if r.head is None or r.trailers is not None:
            raise ExchangeFailed(PROTOCOL_ERROR, "DATA outside a response body")
        r.data += self._unpad(flags, payload)
        if len(r.data) > self.max_reply:
            self._out += frame(RST_STREAM, 0, sid, struct.pack("!I", CANCEL))
            self._fail(sid, ReplyTooLong(CANCEL, f"reply longer than {self.max_reply} bytes"))
            return
        # The stream window (1 MiB) outlasts any reply within max_reply: no stream WINDOW_UPDATE needed.
        if flags & END_STREAM:
            self._end(sid, stream)

    def _headers(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == HEADERS:
            if self._block is not None or not sid:
                raise ExchangeFailed(PROTOCOL_ERROR, "unexpected HEADERS")
            payload = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                if len(payload) < 5:  # the padding ate into the priority fields (RFC 9113 6.2)
                    raise ExchangeFailed(PROTOCOL_ERROR, "HEADERS too short for its priority")
                payload = payload[5:]
            self._block, self._block_stream, self._block_ends = bytearray(payload), sid, bool(flags & END_STREAM)
        else:
            if self._block is None or sid != self._block_stream:
                raise ExchangeFailed(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self._block += payload
        if len(self._block) > MAX_HEADER_BLOCK:
            raise ExchangeFailed(PROTOCOL_ERROR, "header block too large")
        if not flags & END_HEADERS:
            return
        block, self._block = bytes(self._block), None
        try:
            fields = self._decoder.decode(block, raw=True)  # always: HPACK state spans streams
        except HPACKError as e:
            raise ExchangeFailed(COMPRESSION_ERROR, f"HPACK: {e}") from None
        stream = self._streams.get(sid)
        if stream is None:
            self._opened(sid)
            return
        r = stream.response
        if r.head is None:
            status = fields[0][1] if fields and fields[0][0] == b":status" else b""
            if not status.isdigit() or len(status) != 3:
                raise ExchangeFailed(PROTOCOL_ERROR, "response without a valid :status")
            if status[:1] == b"1":
                if self._block_ends:  # RFC 9113 8.1: an interim response cannot end the stream
                    raise ExchangeFailed(PROTOCOL_ERROR, "interim response with END_STREAM")
                return
            r.head = fields
        else:
            if not self._block_ends:
                raise ExchangeFailed(PROTOCOL_ERROR, "trailers without END_STREAM")
            r.trailers = fields
        if self._block_ends:
            self._end(sid, stream)

    def _end(self, sid: int, stream: _Stream) -> None:
        # Frames after this one for the stream are ignored: a server that
        # answered without reading the whole request follows with
        # RST_STREAM NO_ERROR (RFC 9113 8.1).
        del self._streams[sid]
        r = stream.response
        r.ended = True
        self._completed = r
        if r.head is not None and r.head[0][1] not in (b"204", b"304"):
            for name, value in r.head:  # RFC 9113 8.1.1: each of them, if several
                if name == b"content-length" and not (value.isdigit() and int(value) == len(r.data)):
                    r.error = MalformedReply(PROTOCOL_ERROR, f"content-length {value!r}, {len(r.data)} bytes came")
                    break
        if stream.pending:  # answered before the whole request was sent: end our side too
            self._out += frame(RST_STREAM, 0, sid, struct.pack("!I", CANCEL))

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise ExchangeFailed(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ExchangeFailed(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ExchangeFailed(FRAME_SIZE_ERROR, "bad SETTINGS")
        if not self.settings_seen:
            self.peer_max_streams = MAX_IN_FLIGHT  # the guess gives way: absent, the limit is none (ours)
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from("!HI", payload, i)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_STREAM_ID:
                    raise ExchangeFailed(FLOW_CONTROL_ERROR, "initial window too large")
                for stream in self._streams.values():
                    stream.send_window += value - self._peer_initial_window
                    if stream.send_window > MAX_STREAM_ID:  # RFC 9113 6.9.2
                        raise ExchangeFailed(FLOW_CONTROL_ERROR, "window over 2^31-1")
                self._peer_initial_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not FRAME_MAX <= value <= 2**24 - 1:
                    raise ExchangeFailed(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self._peer_frame_max = value
            elif key == SETTINGS_ENABLE_PUSH:
                if value != 0:  # RFC 9113 6.5.2: a server must not set it, to 1 or anything else
                    raise ExchangeFailed(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value} from a server")
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                # Streams already open past a lowered limit go on (the server refuses what it must).
                self.peer_max_streams = min(value, MAX_IN_FLIGHT)
        self.settings_seen = True
        self._out += frame(SETTINGS, ACK, 0)
        self._send_bodies()

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ExchangeFailed(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & MAX_STREAM_ID
        if not increment:
            raise ExchangeFailed(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if not sid:
            self._conn_send_window += increment
            window = self._conn_send_window
        else:
            stream = self._streams.get(sid)
            if stream is None:
                self._opened(sid)  # one that ended may still get them; one never opened may not
                return
            stream.send_window += increment
            window = stream.send_window
        if window > MAX_STREAM_ID:
            raise ExchangeFailed(FLOW_CONTROL_ERROR, "window over 2^31-1")
        self._send_bodies()
