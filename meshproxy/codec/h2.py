"""HTTP/2 codec: h2's sans-IO H2Connection, tuned for a proxy.

Knows: HTTP/2 framing and state (through h2), RFC 9113 header rules. Must
not: read clocks, touch sockets, or decide policy. h2's own event classes are
used as the codec's events: they are already sans-IO, keyed by stream id, and
converting every one of them again would cost on each frame.

What this module changes in h2, and why (h2 and hpack are pinned in
pyproject.toml; tests/codec/test_h2_codec.py exercises each change):

* Open-stream counting. h2 counts open streams by scanning every stream each
  time one opens (h2 issue #1184): O(streams) per request. Here the driver
  tells the codec when it is done with a stream (`forget_stream`), so
  `self.streams` holds only live streams and its size is the count.
* Header validation. h2's inbound validation runs several passes per header
  block and still leaves a proxy to check what it forwards. It is off; one
  single-pass RFC 9113 section 8.2/8.3 check (`request_problem`,
  `response_problem`, `trailers_problem`) runs on every block received, and a
  failure resets that stream with PROTOCOL_ERROR.
* HPACK. A stateless, caching encoder and a single-loop decoder
  (meshproxy/codec/hpack.py) replace hpack's, which cost a third of the CPU.
* Sending HEADERS and DATA. h2 builds hyperframe objects, re-wraps every
  header and computes validation flags per call; the overrides run the same
  state machines and window accounting and write the frame bytes directly.
* Logging. h2's per-frame `repr(frame)` for its trace log and hpack's
  `log.debug` calls cost even when nothing is logged; `quiet_libraries()`
  makes them no-ops (called once by the app, not at import).
"""

from __future__ import annotations

import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack.hpack
from h2.connection import AllowedStreamIDs, ConnectionInputs, _decode_headers
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamInputs
from h2.utilities import SizeLimitDict

from meshproxy.codec.hpack import LeanDecoder, StatelessEncoder
from meshproxy.fields import CONNECTION_SPECIFIC, METHOD_OK, VALUE_BAD, field_problem

__all__ = ["CONNECTION_SPECIFIC", "ProxyH2Connection", "request_problem", "response_problem", "trailers_problem"]

Headers = list[tuple[bytes, bytes]]

_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
# Fields already found well-formed. Most repeat on every call (user-agent,
# content-type, ...), so each is checked once; bounded, cleared when full.
_GOOD_FIELDS: set[tuple[bytes, bytes]] = set()
GOOD_FIELDS_MAX = 4096


def _field_problem(name: bytes, value: bytes) -> str | None:
    if (name, value) in _GOOD_FIELDS:
        return None
    problem = field_problem(name, value)
    if problem is None and len(value) <= 128:
        if len(_GOOD_FIELDS) >= GOOD_FIELDS_MAX:
            _GOOD_FIELDS.clear()
        _GOOD_FIELDS.add((name, value))
    return problem


def _pseudo_value_problem(name: bytes, value: bytes) -> str | None:
    if VALUE_BAD.search(value):
        return f"invalid character or surrounding whitespace in {name.decode()}"
    if name == b":method" and not METHOD_OK.match(value):
        return "invalid :method"
    if name == b":path" and (b" " in value or b"\t" in value or not (value[:1] == b"/" or value == b"*")):
        return "invalid :path"
    return None


def request_problem(headers: Headers) -> str | None:
    """One pass over a request header block; None if well-formed (RFC 9113 8.3.1)."""
    seen: set[bytes] = set()
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return "pseudo-header after a regular header"
            if name not in _REQUEST_PSEUDO:
                return f"unknown pseudo-header {name[:32]!r}"
            if name in seen:
                return f"duplicate {name.decode()}"
            if not value and name != b":authority":
                return f"empty {name.decode()}"
            problem = _pseudo_value_problem(name, value)
            if problem:
                return problem
            seen.add(name)
            continue
        regular = True
        problem = _field_problem(name, value)
        if problem:
            return problem
    if b":method" not in seen:
        return "missing :method"
    if b":protocol" in seen:
        return "extended CONNECT is not supported"
    if b":scheme" not in seen or b":path" not in seen:
        # Plain CONNECT has neither; meshproxy does not tunnel.
        return "missing :scheme or :path"
    return None


def response_problem(headers: Headers) -> str | None:
    """One pass over a response header block (RFC 9113 8.3.2)."""
    status = False
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular or name != b":status" or status:
                return f"unexpected pseudo-header {name[:32]!r}"
            if len(value) != 3 or not value.isdigit() or not value.isascii():
                return "malformed :status"
            status = True
            continue
        regular = True
        problem = _field_problem(name, value)
        if problem:
            return problem
    return None if status else "missing :status"


def trailers_problem(headers: Headers) -> str | None:
    """Trailers carry no pseudo-headers (RFC 9113 8.1)."""
    for name, value in headers:
        if name[:1] == b":":
            return "pseudo-header in trailers"
        problem = _field_problem(name, value)
        if problem:
            return problem
    return None


class _Silent:
    """A logger that does nothing, cheaply."""

    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass

    trace = info = warning = debug

    def isEnabledFor(self, level: int) -> bool:
        return False


def quiet_libraries() -> None:
    """Stop hpack's per-header debug logging (it checks the logging level every call)."""
    hpack.hpack.log = _Silent()  # type: ignore[assignment]


def make_config(client_side: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        split_outbound_cookies=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
        logger=_Silent(),  # type: ignore[arg-type]
    )


# How many closed streams a connection remembers, to answer late frames on
# them as RFC 9113 5.1 says. h2 keeps 65536 per connection: megabytes on a
# busy long-lived connection, for frames that come within a round trip.
CLOSED_STREAMS_REMEMBERED = 1024


class _FrameBuffer(FrameBuffer):
    """h2's frame buffer, refusing an oversized frame as soon as its header arrives
    (h2 waits for the whole announced frame first: up to 16 MiB buffered)."""

    def __next__(self) -> Any:
        data = self._data
        if len(data) >= 9:
            length = (data[0] << 16) | (data[1] << 8) | data[2]
            if length > self.max_frame_size:
                raise h2.exceptions.FrameTooLargeError(
                    f"Received overlong frame: length {length}, max {self.max_frame_size}"
                )
        return super().__next__()


class ProxyH2Connection(h2.connection.H2Connection):
    """H2Connection with O(1) stream counting and no per-frame trace work."""

    def __init__(self, client_side: bool, max_header_list_size: int) -> None:
        super().__init__(config=make_config(client_side))
        self.max_header_list_size = max_header_list_size
        self.encoder = StatelessEncoder()  # type: ignore[assignment]
        self.decoder = LeanDecoder(max_header_list_size)
        self.state_machine._transitions = _GRACEFUL  # type: ignore[misc]
        self._closed_streams = SizeLimitDict(size_limit=CLOSED_STREAMS_REMEMBERED)
        self.incoming_buffer = _FrameBuffer(server=not client_side)

    def _open_streams(self, remainder: int) -> int:
        # meshproxy never pushes (ENABLE_PUSH is 0 both ways), so every stream
        # has the same parity, and the driver removes each one it is done
        # with: the live map's size is the count h2 would scan for.
        return len(self.streams)

    def forget_stream(self, stream_id: int) -> None:
        """The driver is done with this stream: drop it as h2's scan would have."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            # h2 answers a late frame on a closed stream by how it closed
            # (RST_STREAM: a stream error; END_STREAM: STREAM_CLOSED).
            self._closed_streams[stream_id] = stream.closed_by

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        # h2's version formats repr(frame) for a trace log on every frame.
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                self._reset_closed(e.stream_id, e.error_code)
                return e._events
            raise
        except h2.exceptions.StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                self._reset_closed(e.stream_id, ErrorCodes.STREAM_CLOSED)
                return []
            if self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            raise
        self._prepare_for_sending(frames)
        return events

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        """h2's version, less the header validation flags and copies nobody reads.

        The inbound stream limit is not checked here: h2 makes a breach a
        connection error, RFC 9113 5.1.2 allows a stream error, and the server
        driver refuses the one stream (REFUSED_STREAM) instead.
        """
        headers = _decode_headers(self.decoder, frame.data)
        events = self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        stream = self._get_or_create_stream(frame.stream_id, AllowedStreamIDs(not self.config.client_side))
        if headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
            frames, stream_events = stream.receive_headers(headers, "END_STREAM" in frame.flags, None)
            return frames, events + stream_events
        end = "END_STREAM" in frame.flags
        machine = stream.state_machine
        stream_events = machine.process_input(StreamInputs.RECV_HEADERS)
        event = stream_events[0]
        if end:
            ended = machine.process_input(StreamInputs.RECV_END_STREAM)
            event.stream_ended = ended[0]
            stream_events += ended
        elif type(event) is h2.events.TrailersReceived:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set")
        stream._initialize_content_length(headers)
        event.headers = headers
        if "PRIORITY" in frame.flags:
            _, priority_events = self._receive_priority_frame(frame)
            event.priority_updated = priority_events[0]
            stream_events += priority_events
        return [], events + stream_events

    def send_headers(  # type: ignore[override]
        self,
        stream_id: int,
        headers: Headers,
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
    ) -> None:
        """h2's send_headers without its frame objects and per-header re-wrapping.

        The same connection and stream state transitions run (h2's own state
        machines), then the frames are written as bytes: HEADERS, and
        CONTINUATION if the block exceeds the peer's frame size (RFC 9113 6.2).
        Interim (1xx) responses and priority take h2's own path.
        """
        first = headers[0] if headers else (b"", b"")
        if priority_weight is not None or priority_depends_on is not None or priority_exclusive is not None or (
            first[0] == b":status" and first[1][:1] == b"1"
        ):
            super().send_headers(stream_id, headers, end_stream, priority_weight, priority_depends_on, priority_exclusive)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            limit = self.remote_settings.max_concurrent_streams
            if len(self.streams) + 1 > limit:
                raise h2.exceptions.TooManyStreamsError(f"Max outbound streams is {limit}")
            self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
            stream = self._get_or_create_stream(stream_id, AllowedStreamIDs(self.config.client_side))
        else:
            self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        machine = stream.state_machine
        machine.process_input(StreamInputs.SEND_HEADERS)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        elif machine.trailers_sent:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        if machine.client and stream.request_method is None:
            # h2 needs the method to judge a HEAD response's content-length.
            for name, value in headers:
                if name == b":method":
                    stream.request_method = value
                    break
        block = self.encoder.encode(headers)
        self._data_to_send += _header_frames(stream_id, block, end_stream, self.max_outbound_frame_size)

    def send_data(  # type: ignore[override]
        self, stream_id: int, data: bytes, end_stream: bool = False, pad_length: Any = None
    ) -> None:
        """h2's send_data without a DataFrame object per call (same checks and windows)."""
        size = len(data)
        if pad_length is not None or size > self.max_outbound_frame_size:
            super().send_data(stream_id, data, end_stream, pad_length)
            return
        stream = self.streams[stream_id]
        if size > 0 and (size > self.outbound_flow_control_window or size > stream.outbound_flow_control_window):
            raise h2.exceptions.FlowControlError(f"Cannot send {size} bytes, flow control window is too small")
        self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        machine = stream.state_machine
        machine.process_input(StreamInputs.SEND_DATA)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        self._data_to_send += _FRAME_HEAD.pack(size >> 8, size & 0xFF, 0x0, 0x1 if end_stream else 0, stream_id)
        self._data_to_send += data

    def _reset_closed(self, stream_id: int, code: int) -> None:
        from hyperframe.frame import RstStreamFrame

        f = RstStreamFrame(stream_id)
        f.error_code = code
        self._prepare_for_sending([f])


# RFC 9113 4.1: 24-bit length (as 16 + 8 bits here), type, flags, stream id.
_FRAME_HEAD = struct.Struct(">HBBBL")
_HEADERS, _CONTINUATION = 0x1, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4


def _header_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """HEADERS (+ CONTINUATION) frames carrying one header block."""
    size = len(block)
    flags = _END_STREAM if end_stream else 0
    if size <= max_frame:
        return _FRAME_HEAD.pack(size >> 8, size & 0xFF, _HEADERS, flags | _END_HEADERS, stream_id) + block
    out = bytearray()
    kind = _HEADERS
    for start in range(0, size, max_frame):
        piece = block[start : start + max_frame]
        last = start + max_frame >= size
        n = len(piece)
        out += _FRAME_HEAD.pack(n >> 8, n & 0xFF, kind, flags | (_END_HEADERS if last else 0), stream_id)
        out += piece
        kind, flags = _CONTINUATION, 0  # END_STREAM goes on the HEADERS frame only
    return bytes(out)


def initial_settings(
    *, max_concurrent_streams: int, initial_window: int, max_header_list_size: int, max_frame: int
) -> dict[int, int]:
    S = h2.settings.SettingCodes
    return {
        S.ENABLE_PUSH: 0,
        S.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
        S.INITIAL_WINDOW_SIZE: initial_window,
        S.MAX_HEADER_LIST_SIZE: max_header_list_size,
        S.MAX_FRAME_SIZE: max_frame,
    }


def _graceful_transitions() -> dict[Any, Any]:
    """h2's connection state table, except that GOAWAY keeps an open connection open.

    h2 moves to CLOSED on sending or receiving GOAWAY and then rejects every
    frame, so streams below the GOAWAY's last-stream-id could never finish.
    RFC 9113 section 6.8 says they should: the driver stops opening streams
    after a GOAWAY and closes the connection once the last stream is done.
    """
    from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine

    table = dict(H2ConnectionStateMachine._transitions)
    for state in (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN):
        for event in (ConnectionInputs.SEND_GOAWAY, ConnectionInputs.RECV_GOAWAY):
            table[(state, event)] = (None, state)
    return table


_GRACEFUL = _graceful_transitions()
