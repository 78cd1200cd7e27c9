"""A lean HTTP/2 client codec for one unary exchange at a time (the risk callout).

Knows: the part of RFC 9113 a client needs to send one request (HEADERS,
then DATA within the peer's windows) and read one response (HEADERS, DATA,
trailers) per connection at a time: SETTINGS and their ACK, PING ACKs,
WINDOW_UPDATE both ways, GOAWAY, RST_STREAM, CONTINUATION, padding, and
HPACK (meshproxy/codec/hpack.py). Must not: do I/O, read clocks, or decide
what a failure means to the caller.

Why not h2: a risk check is a small request and a small reply, and h2's
state machine plus the proxy's connection machinery (a reader task, a
batched writer) cost about what a whole proxy leg does. One exchange at a
time per connection needs no stream table and no scheduling: the caller
sends, reads until `receive` says the response is complete, and reuses the
connection. Anything unexpected is an `ExchangeFailed` and the connection
is dropped (a fresh one is cheap; this path never has to recover one).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hpack.exceptions import HPACKError

from meshproxy.codec.hpack import LeanDecoder, StatelessEncoder

__all__ = ["PREFACE", "ExchangeFailed", "Response", "StreamRefused", "StreamReset", "UnaryClient"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 2, 4, 5, 6
DEFAULT_WINDOW = 65_535
FRAME_MAX = 16_384  # what we accept: we never raise SETTINGS_MAX_FRAME_SIZE
MAX_STREAM_ID = 2**31 - 1
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0, 1, 3, 6, 7, 8, 9
# A header block (with its CONTINUATIONs) past this is an attack, not a reply.
MAX_HEADER_BLOCK = 64 * 1024

_FRAME = struct.Struct("!HBBBI")  # length as 16 + 8 bits, type, flags, stream id


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + payload


class ExchangeFailed(Exception):
    """The exchange failed and the connection cannot be trusted (a protocol error, a reset, an oversized reply): drop it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamReset(ExchangeFailed):
    """The server reset the stream (RST_STREAM, or GOAWAY below it)."""


class StreamRefused(StreamReset):
    """The server did not process the request (RST_STREAM REFUSED_STREAM, or GOAWAY below it): safe to send again."""


@dataclass(slots=True)
class Response:
    head: list[tuple[bytes, bytes]] | None = None
    data: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    ended: bool = False


class UnaryClient:
    """One connection's state. `request`, then feed `receive` until it returns the Response;
    send `data_to_send()` after each call."""

    def __init__(self, max_reply: int, window: int = 1 << 20, max_header_list_size: int = 64 * 1024) -> None:
        self.max_reply = max_reply
        self.window = window
        self._encoder = StatelessEncoder()
        self._decoder = LeanDecoder(max_header_list_size)
        self._out = bytearray(PREFACE)
        self._out += frame(SETTINGS, 0, 0, struct.pack(
            "!HIHIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, window,
            SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list_size))
        self._out += frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", window - DEFAULT_WINDOW))
        self._in = bytearray()
        self._next_id = 1
        self._stream = 0  # the exchange in progress, 0 when idle
        self._response = Response()
        self._pending = memoryview(b"")  # request body not yet sent (waiting for window)
        self._conn_send_window = DEFAULT_WINDOW
        self._stream_send_window = 0
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_frame_max = FRAME_MAX
        self._unacked = 0  # connection-level bytes received and not yet given back
        self._block: bytearray | None = None  # a header block waiting for CONTINUATION
        self._block_stream = 0
        self._block_ends = False
        self.goaway = False

    @property
    def usable(self) -> bool:
        """Another exchange may start on this connection."""
        return not self.goaway and not self._stream and self._next_id <= MAX_STREAM_ID

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- sending

    def request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if not self.usable:
            raise ExchangeFailed(NO_ERROR, "connection is busy or done")
        sid = self._stream = self._next_id
        self._next_id += 2
        self._response = Response()
        self._stream_send_window = self._peer_initial_window
        block = self._encoder.encode(headers)
        first, rest = block[: self._peer_frame_max], block[self._peer_frame_max :]
        flags = (0 if rest else END_HEADERS) | (0 if body else END_STREAM)
        self._out += frame(HEADERS, flags, sid, first)
        while rest:
            part, rest = rest[: self._peer_frame_max], rest[self._peer_frame_max :]
            self._out += frame(CONTINUATION, 0 if rest else END_HEADERS, sid, part)
        self._pending = memoryview(body)
        if body:
            self._send_body()

    def _send_body(self) -> None:
        pending = self._pending
        while pending:
            n = min(len(pending), self._conn_send_window, self._stream_send_window, self._peer_frame_max)
            if n <= 0:
                break
            last = n == len(pending)
            self._out += frame(DATA, END_STREAM if last else 0, self._stream, bytes(pending[:n]))
            self._conn_send_window -= n
            self._stream_send_window -= n
            pending = pending[n:]
        self._pending = pending

    # -- receiving

    def receive(self, data: bytes) -> Response | None:
        """Take bytes from the server; the Response once it is complete, else None."""
        buf = self._in
        buf += data
        at = 0
        done = False
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
            done = self._frame(kind, flags, sid, payload) or done
        del buf[:at]
        return self._response if done else None

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> bool:
        if kind == DATA:
            return self._data(flags, sid, payload)
        if kind == HEADERS or kind == CONTINUATION:
            return self._headers(kind, flags, sid, payload)
        if kind == SETTINGS:
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
            if sid == self._stream:
                code = int.from_bytes(payload, "big")
                cls = StreamRefused if code == REFUSED_STREAM else StreamReset
                raise cls(code, f"stream reset by the server (code {code})")
        elif kind == GOAWAY:
            if len(payload) < 8 or sid:
                raise ExchangeFailed(PROTOCOL_ERROR, "bad GOAWAY")
            self.goaway = True
            last = int.from_bytes(payload[:4], "big") & MAX_STREAM_ID
            if self._stream > last:
                raise StreamRefused(REFUSED_STREAM, "GOAWAY: the request was not processed")
        elif kind == PUSH_PROMISE:
            raise ExchangeFailed(PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        return False  # PRIORITY and unknown types are ignored (RFC 9113 4.1, 5.5)

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ExchangeFailed(PROTOCOL_ERROR, "bad padding")
        return payload[1 : len(payload) - payload[0]]

    def _data(self, flags: int, sid: int, payload: bytes) -> bool:
        if not sid:
            raise ExchangeFailed(PROTOCOL_ERROR, "DATA on stream 0")
        self._unacked += len(payload)  # flow control counts padding too
        if self._unacked >= self.window // 2:
            self._out += frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", self._unacked))
            self._unacked = 0
        if sid != self._stream:
            return False  # a stream we gave up on: its window is given back above
        r = self._response
        if r.head is None or r.trailers is not None:
            raise ExchangeFailed(PROTOCOL_ERROR, "DATA outside a response body")
        r.data += self._unpad(flags, payload)
        if len(r.data) > self.max_reply:
            raise ExchangeFailed(NO_ERROR, f"reply longer than {self.max_reply} bytes")
        # The stream window (1 MiB) outlasts any reply within max_reply: no stream WINDOW_UPDATE needed.
        return self._end(flags)

    def _headers(self, kind: int, flags: int, sid: int, payload: bytes) -> bool:
        if kind == HEADERS:
            if self._block is not None or not sid:
                raise ExchangeFailed(PROTOCOL_ERROR, "unexpected HEADERS")
            payload = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._block, self._block_stream, self._block_ends = bytearray(payload), sid, bool(flags & END_STREAM)
        else:
            if self._block is None or sid != self._block_stream:
                raise ExchangeFailed(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self._block += payload
        if len(self._block) > MAX_HEADER_BLOCK:
            raise ExchangeFailed(PROTOCOL_ERROR, "header block too large")
        if not flags & END_HEADERS:
            return False
        block, self._block = bytes(self._block), None
        try:
            fields = self._decoder.decode(block, raw=True)  # always: HPACK state spans streams
        except HPACKError as e:
            raise ExchangeFailed(COMPRESSION_ERROR, f"HPACK: {e}") from None
        if sid != self._stream:
            return False
        r = self._response
        if r.head is None:
            status = fields[0][1] if fields and fields[0][0] == b":status" else b""
            if not status.isdigit() or len(status) != 3:
                raise ExchangeFailed(PROTOCOL_ERROR, "response without a valid :status")
            if status[:1] == b"1":
                return False  # interim response
            r.head = fields
        else:
            if not self._block_ends:
                raise ExchangeFailed(PROTOCOL_ERROR, "trailers without END_STREAM")
            r.trailers = fields
        return self._end(END_STREAM if self._block_ends else 0)

    def _end(self, flags: int) -> bool:
        if flags & END_STREAM:
            # Frames after this one for the stream are ignored: a server that
            # answered without reading the whole request follows with
            # RST_STREAM NO_ERROR (RFC 9113 8.1).
            self._response.ended = True
            if self._pending:  # answered before the whole request was sent: end our side too
                self._out += frame(RST_STREAM, 0, self._stream, struct.pack("!I", CANCEL))
                self._pending = memoryview(b"")
            self._stream = 0
            return True
        return False

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise ExchangeFailed(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise ExchangeFailed(FRAME_SIZE_ERROR, "bad SETTINGS")
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from("!HI", payload, i)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_STREAM_ID:
                    raise ExchangeFailed(FLOW_CONTROL_ERROR, "initial window too large")
                self._stream_send_window += value - self._peer_initial_window
                self._peer_initial_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not FRAME_MAX <= value <= 2**24 - 1:
                    raise ExchangeFailed(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self._peer_frame_max = value
        self._out += frame(SETTINGS, ACK, 0)
        if self._pending:
            self._send_body()

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ExchangeFailed(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & MAX_STREAM_ID
        if not increment:
            raise ExchangeFailed(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if not sid:
            self._conn_send_window += increment
        elif sid == self._stream:
            self._stream_send_window += increment
        else:
            return
        if self._conn_send_window > MAX_STREAM_ID or self._stream_send_window > MAX_STREAM_ID:
            raise ExchangeFailed(FLOW_CONTROL_ERROR, "window over 2^31-1")
        if self._pending:
            self._send_body()
