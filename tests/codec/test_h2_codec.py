"""ProxyH2Connection against a real h2.H2Connection peer: bytes in, events out.

Every change meshproxy/codec/h2.py makes to h2 is exercised here: the
single-pass header checks (fed real header blocks a permissive h2 peer
encoded), whole / byte-by-byte / trailing-bytes feeding (h11's ``tr()``),
``forget_stream`` as the open-stream count, GOAWAY that leaves streams below
the last-stream-id usable, and fuzzing (Hypothesis chunks and mutations, as in
mitmproxy's test_http_fuzz): only h2's ProtocolError escapes, buffers stay
bounded. No sockets, no trio.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.codec import h2 as codec
from meshproxy.codec.h2 import (
    ProxyH2Connection,
    initial_settings,
    request_problem,
    response_problem,
    trailers_problem,
)

Headers = list[tuple[bytes, bytes]]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_HEADER_LIST = 64 * 1024
# RFC 9113 4.1: a frame header is 9 bytes; the length field is 24 bits.
FRAME_HEADER = 9
# The most the frame buffer could ever hold: one frame of the largest length
# the 24-bit field can announce, plus its header.
ABSOLUTE_BUFFER_BOUND = 2**24 + FRAME_HEADER

GET: Headers = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"svc.local"),
    (b":path", b"/"),
]
GRPC_REQUEST: Headers = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"echo.svc"),
    (b":path", b"/echo.Echo/Say"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"1S"),
    (b"user-agent", b"grpc-python/1.60"),
]
OK_RESPONSE: Headers = [(b":status", b"200"), (b"content-type", b"text/plain")]


# ---------------------------------------------------------------------------
# Peers and plumbing.


def real_peer(client_side: bool, *, validate: bool = True) -> h2.connection.H2Connection:
    """A plain h2 connection; `validate=False` lets it send malformed blocks."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
    )
    conn.initiate_connection()
    return conn


def proxy_conn(
    client_side: bool, *, max_concurrent_streams: int = 100, max_frame: int = 16384
) -> ProxyH2Connection:
    """A ProxyH2Connection set up the way meshproxy/drivers/h2.py sets it up."""
    conn = ProxyH2Connection(client_side=client_side, max_header_list_size=MAX_HEADER_LIST)
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values=initial_settings(
            max_concurrent_streams=max_concurrent_streams,
            initial_window=65535,
            max_header_list_size=MAX_HEADER_LIST,
            max_frame=max_frame,
        ),
    )
    conn.initiate_connection()
    conn.max_inbound_frame_size = max_frame
    return conn


def exchange(a: Any, b: Any) -> tuple[list[h2.events.Event], list[h2.events.Event]]:
    """Deliver queued bytes both ways until both are quiet; (events at a, events at b)."""
    at_a: list[h2.events.Event] = []
    at_b: list[h2.events.Event] = []
    while True:
        from_a, from_b = a.data_to_send(), b.data_to_send()
        if not from_a and not from_b:
            return at_a, at_b
        if from_a:
            at_b += b.receive_data(from_a)
        if from_b:
            at_a += a.receive_data(from_b)


def plain(headers: Any) -> Headers:
    return [(bytes(n), bytes(v)) for n, v in headers]


def only(events: list[h2.events.Event], kind: type[Any]) -> Any:
    found = [e for e in events if isinstance(e, kind)]
    assert len(found) == 1, events
    return found[0]


def summary(events: list[h2.events.Event]) -> list[tuple[Any, ...]]:
    """What a test compares: event type, stream id, headers, data."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, h2.events.RemoteSettingsChanged):
            changed = sorted((int(k), v.new_value) for k, v in e.changed_settings.items())
            out.append(("RemoteSettingsChanged", changed))
            continue
        headers = getattr(e, "headers", None)
        out.append(
            (
                type(e).__name__,
                getattr(e, "stream_id", None),
                plain(headers) if headers is not None else None,
                getattr(e, "data", None),
            )
        )
    return out


# ---------------------------------------------------------------------------
# Header blocks: what the single-pass checks say about what a peer really sent.


def deliver_request(headers: Headers) -> Headers:
    """A permissive real client sends `headers`; the server codec's RequestReceived headers."""
    client, server = real_peer(True, validate=False), proxy_conn(False)
    exchange(client, server)
    client.send_headers(1, headers, end_stream=True)
    event = only(server.receive_data(client.data_to_send()), h2.events.RequestReceived)
    assert event.stream_id == 1
    return plain(event.headers)


def deliver_response(headers: Headers) -> Headers:
    """A permissive real server answers with `headers`; the client codec's ResponseReceived."""
    client, server = proxy_conn(True), real_peer(False, validate=False)
    exchange(client, server)
    client.send_headers(1, GET, end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, headers, end_stream=True)
    event = only(client.receive_data(server.data_to_send()), h2.events.ResponseReceived)
    return plain(event.headers)


def deliver_trailers(trailers: Headers, direction: str) -> Headers:
    """Trailers from a permissive real peer, received by the codec in either role."""
    if direction == "request":
        client, server = real_peer(True, validate=False), proxy_conn(False)
        exchange(client, server)
        client.send_headers(1, GRPC_REQUEST)
        client.send_headers(1, trailers, end_stream=True)
        events = server.receive_data(client.data_to_send())
    else:
        proxy_client, real_server = proxy_conn(True), real_peer(False, validate=False)
        exchange(proxy_client, real_server)
        proxy_client.send_headers(1, GRPC_REQUEST, end_stream=True)
        real_server.receive_data(proxy_client.data_to_send())
        real_server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        real_server.send_headers(1, trailers, end_stream=True)
        events = proxy_client.receive_data(real_server.data_to_send())
    event = only(events, h2.events.TrailersReceived)
    assert event.stream_ended is not None
    return plain(event.headers)


def _req(*extra: tuple[bytes, bytes]) -> Headers:
    return [*GET, *extra]


def _without(name: bytes) -> Headers:
    return [(n, v) for n, v in GET if n != name]


def _with_pseudo(name: bytes, value: bytes) -> Headers:
    return [(n, value if n == name else v) for n, v in GET]


MALFORMED_REQUESTS: dict[str, Headers] = {
    "uppercase name": _req((b"X-Upper", b"1")),
    "empty name": _req((b"", b"1")),
    "space in name": _req((b"x y", b"1")),
    "connection": _req((b"connection", b"close")),
    "keep-alive": _req((b"keep-alive", b"timeout=5")),
    "proxy-connection": _req((b"proxy-connection", b"keep-alive")),
    "transfer-encoding": _req((b"transfer-encoding", b"chunked")),
    "upgrade": _req((b"upgrade", b"h2c")),
    "te gzip": _req((b"te", b"gzip")),
    "te trailers, gzip": _req((b"te", b"trailers, gzip")),
    "missing :method": _without(b":method"),
    "missing :path": _without(b":path"),
    "missing :scheme": _without(b":scheme"),
    "duplicate :path": [*GET, (b":path", b"/again")],
    "duplicate :method": [(b":method", b"GET"), *GET],
    "pseudo-header after regular": [*GET[:2], (b"x-a", b"1"), *GET[2:]],
    "unknown pseudo-header": [*GET, (b":foo", b"bar")],
    "response pseudo-header in request": [*GET, (b":status", b"200")],
    "NUL in value": _req((b"x-a", b"a\x00b")),
    "CR in value": _req((b"x-a", b"a\rb")),
    "LF in value": _req((b"x-a", b"a\nb")),
    "leading space in value": _req((b"x-a", b" a")),
    "trailing space in value": _req((b"x-a", b"a ")),
    "leading tab in value": _req((b"x-a", b"\ta")),
    "trailing tab in value": _req((b"x-a", b"a\t")),
    "empty :path": _with_pseudo(b":path", b""),
    "empty :method": _with_pseudo(b":method", b""),
    # RFC 9113 8.2.1 holds for every field, pseudo-header fields included:
    # "A field value MUST NOT contain ... NUL, LF, CR at any position" and
    # "MUST NOT start or end with an ASCII whitespace character".
    "CR LF in :path": _with_pseudo(b":path", b"/a\r\nx-injected: 1"),
    "NUL in :authority": _with_pseudo(b":authority", b"svc\x00.evil"),
    "LF in :method": _with_pseudo(b":method", b"GET\nX"),
    "trailing space in :method": _with_pseudo(b":method", b"GET "),
    "leading space in :path": _with_pseudo(b":path", b" /"),
}

# Not malformed, but refused by request_problem: meshproxy does not tunnel.
REFUSED_REQUESTS: dict[str, Headers] = {
    "plain CONNECT": [(b":method", b"CONNECT"), (b":authority", b"db:5432")],
    "extended CONNECT": [*_with_pseudo(b":method", b"CONNECT"), (b":protocol", b"websocket")],
}

WELL_FORMED_REQUESTS: dict[str, Headers] = {
    "GET": GET,
    "gRPC with te: trailers": GRPC_REQUEST,
    "empty :authority": _with_pseudo(b":authority", b""),
    "no :authority": _without(b":authority"),
    "inner spaces and tabs in value": _req((b"x-a", b"a b\tc")),
    "obs-text in value": _req((b"x-a", b"caf\xc3\xa9 \xff")),
    "empty value": _req((b"x-empty", b"")),
    "long value": _req((b"x-long", b"v" * 1000)),
    "repeated header": _req((b"x-a", b"1"), (b"x-a", b"2")),
    "cookie crumbs": _req((b"cookie", b"a=1"), (b"cookie", b"b=2")),
    "grpc binary header": _req((b"x-trace-bin", b"AAECAw==")),
}


@pytest.mark.parametrize("headers", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
def test_malformed_request_block_is_a_problem(headers: Headers) -> None:
    received = deliver_request(headers)
    assert received == headers  # the codec hands the block on unchanged
    assert request_problem(received) is not None


@pytest.mark.parametrize("headers", REFUSED_REQUESTS.values(), ids=REFUSED_REQUESTS.keys())
def test_tunnel_requests_are_refused(headers: Headers) -> None:
    assert request_problem(deliver_request(headers)) is not None


@pytest.mark.parametrize(
    "headers", WELL_FORMED_REQUESTS.values(), ids=WELL_FORMED_REQUESTS.keys()
)
def test_well_formed_request_block_has_no_problem(headers: Headers) -> None:
    received = deliver_request(headers)
    assert received == headers
    assert request_problem(received) is None
    assert request_problem(received) is None  # and again, from the good-field cache


def test_good_field_cache_does_not_vouch_for_other_values() -> None:
    assert request_problem(_req((b"x-cached", b"ok"))) is None
    assert request_problem(_req((b"x-cached", b"ok\r\n"))) is not None
    assert request_problem(_req((b"X-Cached", b"ok"))) is not None


def test_good_field_cache_is_bounded() -> None:
    for i in range(codec.GOOD_FIELDS_MAX + 100):
        assert request_problem(_req((b"x-n", str(i).encode()))) is None
        assert len(codec._GOOD_FIELDS) <= codec.GOOD_FIELDS_MAX


def _resp(*extra: tuple[bytes, bytes]) -> Headers:
    return [(b":status", b"200"), *extra]


MALFORMED_RESPONSES: dict[str, Headers] = {
    "missing :status": [(b"content-type", b"text/plain")],
    "two-digit :status": [(b":status", b"20")],
    "four-digit :status": [(b":status", b"2000")],
    "non-numeric :status": [(b":status", b"abc")],
    "duplicate :status": [(b":status", b"200"), (b":status", b"204")],
    "pseudo-header after regular": [(b"x-a", b"1"), (b":status", b"200")],
    "request pseudo-header": _resp((b":path", b"/")),
    "uppercase name": _resp((b"Content-Type", b"text/plain")),
    "connection": _resp((b"connection", b"close")),
    "keep-alive": _resp((b"keep-alive", b"timeout=5")),
    "proxy-connection": _resp((b"proxy-connection", b"close")),
    "transfer-encoding": _resp((b"transfer-encoding", b"chunked")),
    "upgrade": _resp((b"upgrade", b"h2c")),
    "te gzip": _resp((b"te", b"gzip")),
    "NUL in value": _resp((b"x-a", b"a\x00")),
    "CR in value": _resp((b"x-a", b"a\rb")),
    "LF in value": _resp((b"x-a", b"a\nb")),
    "leading space in value": _resp((b"x-a", b" a")),
    "trailing tab in value": _resp((b"x-a", b"a\t")),
}

WELL_FORMED_RESPONSES: dict[str, Headers] = {
    "200": [(b":status", b"200")],
    "404 with body headers": [(b":status", b"404"), (b"content-length", b"0")],
    "gRPC response": _resp((b"content-type", b"application/grpc"), (b"grpc-encoding", b"identity")),
    "gRPC trailers-only": _resp(
        (b"content-type", b"application/grpc"), (b"grpc-status", b"14"), (b"grpc-message", b"no%20route")
    ),
    "empty value": _resp((b"x-empty", b"")),
}


@pytest.mark.parametrize("headers", MALFORMED_RESPONSES.values(), ids=MALFORMED_RESPONSES.keys())
def test_malformed_response_block_is_a_problem(headers: Headers) -> None:
    received = deliver_response(headers)
    assert received == headers
    assert response_problem(received) is not None


@pytest.mark.parametrize(
    "headers", WELL_FORMED_RESPONSES.values(), ids=WELL_FORMED_RESPONSES.keys()
)
def test_well_formed_response_block_has_no_problem(headers: Headers) -> None:
    received = deliver_response(headers)
    assert received == headers
    assert response_problem(received) is None


MALFORMED_TRAILERS: dict[str, Headers] = {
    ":status in trailers": [(b":status", b"200"), (b"grpc-status", b"0")],
    ":path in trailers": [(b"grpc-status", b"0"), (b":path", b"/")],
    "uppercase name": [(b"Grpc-Status", b"0")],
    "connection": [(b"grpc-status", b"0"), (b"connection", b"close")],
    "transfer-encoding": [(b"transfer-encoding", b"chunked")],
    "te gzip": [(b"te", b"gzip")],
    "NUL in value": [(b"grpc-message", b"bad\x00")],
    "CR LF in value": [(b"grpc-message", b"bad\r\nx: y")],
    "trailing space in value": [(b"grpc-status", b"0 ")],
}

WELL_FORMED_TRAILERS: dict[str, Headers] = {
    "grpc-status": [(b"grpc-status", b"0")],
    "grpc-status and message": [(b"grpc-status", b"13"), (b"grpc-message", b"boom%20%E2%9C%93")],
    "checksum": [(b"x-checksum", b"abc123")],
}

DIRECTIONS = ("request", "response")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("trailers", MALFORMED_TRAILERS.values(), ids=MALFORMED_TRAILERS.keys())
def test_malformed_trailers_are_a_problem(trailers: Headers, direction: str) -> None:
    received = deliver_trailers(trailers, direction)
    assert received == trailers
    assert trailers_problem(received) is not None


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("trailers", WELL_FORMED_TRAILERS.values(), ids=WELL_FORMED_TRAILERS.keys())
def test_well_formed_trailers_have_no_problem(trailers: Headers, direction: str) -> None:
    received = deliver_trailers(trailers, direction)
    assert received == trailers
    assert trailers_problem(received) is None


def test_empty_trailer_block() -> None:
    """h2 cannot send an empty block; the codec's own writer can, and it is well-formed."""
    assert trailers_problem([]) is None
    client, server = real_peer(True), proxy_conn(False)
    exchange(client, server)
    client.send_headers(1, GRPC_REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_headers(1, [], end_stream=True)
    event = only(client.receive_data(server.data_to_send()), h2.events.TrailersReceived)
    assert plain(event.headers) == []


def test_outbound_blocks_reach_a_validating_h2_peer_intact() -> None:
    """The codec's own HEADERS writer (with CONTINUATION) against h2's strict reader."""
    client, server = proxy_conn(True), real_peer(False)
    server.update_settings({h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 2**20})
    exchange(client, server)
    big = [*GRPC_REQUEST, (b"x-big", b"b" * 40_000), (b"authorization", b"Bearer t")]
    client.send_headers(1, big, end_stream=True)
    received = only(server.receive_data(client.data_to_send()), h2.events.RequestReceived)
    assert plain(received.headers) == big
    assert received.stream_ended is not None


def test_interim_response_then_final() -> None:
    client, server = real_peer(True), proxy_conn(False)
    exchange(client, server)
    client.send_headers(1, [*GET, (b"expect", b"100-continue")])
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(b":status", b"100")])
    server.send_headers(1, OK_RESPONSE, end_stream=True)
    assert [type(e).__name__ for e in client.receive_data(server.data_to_send())] == [
        "InformationalResponseReceived",
        "ResponseReceived",
        "StreamEnded",
    ]


def test_send_data_keeps_h2s_window_accounting() -> None:
    client, server = real_peer(True), proxy_conn(False)
    exchange(client, server)
    client.send_headers(1, GET)
    server.receive_data(client.data_to_send())
    server.send_headers(1, OK_RESPONSE)
    window = server.local_flow_control_window(1)
    assert window == 65535
    server.send_data(1, b"x" * 1000)
    assert server.local_flow_control_window(1) == window - 1000
    with pytest.raises(h2.exceptions.FlowControlError):
        server.send_data(1, b"x" * (window - 1000 + 1))
    events = client.receive_data(server.data_to_send())
    assert only(events, h2.events.DataReceived).data == b"x" * 1000
    # The peer's WINDOW_UPDATEs give the windows back.
    client.increment_flow_control_window(1000, stream_id=1)
    client.increment_flow_control_window(1000)  # and the connection's
    server.receive_data(client.data_to_send())
    assert server.local_flow_control_window(1) == window
    with pytest.raises(h2.exceptions.FrameTooLargeError):  # h2's own check (the driver splits)
        server.send_data(1, b"y" * (server.max_outbound_frame_size + 1))
    server.send_data(1, b"y" * server.max_outbound_frame_size, end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert only(events, h2.events.DataReceived).data == b"y" * 16384


# ---------------------------------------------------------------------------
# Whole, byte by byte, and with trailing bytes (h11's tr()).

TRAILERS: Headers = [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
MESSAGE = b"\x00\x00\x00\x00\x05hello"


def two_requests() -> tuple[bytes, bytes]:
    """A real client's bytes: preface+SETTINGS+HEADERS+DATA+trailers, then a second request."""
    client = real_peer(True)
    client.send_headers(1, GRPC_REQUEST)
    client.send_data(1, MESSAGE)
    client.send_headers(1, TRAILERS, end_stream=True)
    first = client.data_to_send()
    client.send_headers(3, [*GET, (b"x-second", b"yes")])
    client.send_data(3, b"second body", end_stream=True)
    return first, client.data_to_send()


FIRST_EVENTS = [
    ("RemoteSettingsChanged", None),  # settings compared separately
    ("RequestReceived", 1, GRPC_REQUEST, None),
    ("DataReceived", 1, None, MESSAGE),
    ("TrailersReceived", 1, TRAILERS, None),
    ("StreamEnded", 1, None, None),
]
SECOND_EVENTS = [
    ("RequestReceived", 3, [*GET, (b"x-second", b"yes")], None),
    ("DataReceived", 3, None, b"second body"),
    ("StreamEnded", 3, None, None),
]


def _matches(got: list[tuple[Any, ...]], expected: list[tuple[Any, ...]]) -> None:
    assert len(got) == len(expected), got
    for g, e in zip(got, expected, strict=True):
        if e[0] == "RemoteSettingsChanged":
            assert g[0] == e[0]
        else:
            assert g == e


def feed(conn: ProxyH2Connection, data: bytes, size: int) -> list[h2.events.Event]:
    events: list[h2.events.Event] = []
    for i in range(0, len(data), size):
        events += conn.receive_data(data[i : i + size])
    return events


def test_request_fed_whole() -> None:
    first, _ = two_requests()
    server = proxy_conn(False)
    _matches(summary(server.receive_data(first)), FIRST_EVENTS)


@pytest.mark.parametrize("size", [1, 2, 7, 9, 10, 100])
def test_request_fed_in_pieces_gives_the_same_events_and_replies(size: int) -> None:
    first, _ = two_requests()
    whole = proxy_conn(False)
    expected = summary(whole.receive_data(first))
    pieces = proxy_conn(False)
    assert summary(feed(pieces, first, size)) == expected
    assert pieces.data_to_send() == whole.data_to_send()


@pytest.mark.parametrize("cut", [1, 8, 9, 10, -1])
def test_request_with_trailing_bytes_of_the_next(cut: int) -> None:
    first, second = two_requests()
    server = proxy_conn(False)
    headers_frame = FRAME_HEADER + int.from_bytes(second[:3], "big")
    cut %= headers_frame  # -1: all but the last byte of the next HEADERS frame
    head, rest = second[:cut], second[cut:]
    _matches(summary(server.receive_data(first + head)), FIRST_EVENTS)
    assert summary(server.receive_data(rest)) == SECOND_EVENTS


def test_both_requests_in_one_read() -> None:
    first, second = two_requests()
    server = proxy_conn(False)
    _matches(summary(server.receive_data(first + second)), FIRST_EVENTS + SECOND_EVENTS)


def test_response_fed_whole_and_byte_by_byte() -> None:
    def run(size: int) -> list[tuple[Any, ...]]:
        client, server = proxy_conn(True), real_peer(False)
        exchange(client, server)
        client.send_headers(1, GRPC_REQUEST, end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        server.send_data(1, MESSAGE)
        server.send_headers(1, TRAILERS, end_stream=True)
        return summary(feed(client, server.data_to_send(), size))

    expected = [
        ("ResponseReceived", 1, [(b":status", b"200"), (b"content-type", b"application/grpc")], None),
        ("DataReceived", 1, None, MESSAGE),
        ("TrailersReceived", 1, TRAILERS, None),
        ("StreamEnded", 1, None, None),
    ]
    assert run(10**6) == expected
    assert run(1) == expected


# ---------------------------------------------------------------------------
# forget_stream: the live map is the open-stream count.


def _finish(client: Any, server: Any, sid: int, *, priority: bool = False) -> None:
    """Client request (END_STREAM), server response (END_STREAM), both delivered."""
    if priority:
        client.send_headers(sid, GET, end_stream=True, priority_weight=32)
    else:
        client.send_headers(sid, GET, end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(e, h2.events.RequestReceived) for e in events), events
    server.send_headers(sid, OK_RESPONSE, end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert any(isinstance(e, h2.events.StreamEnded) for e in events), events


def test_forgotten_streams_leave_the_count() -> None:
    client, server = real_peer(True), proxy_conn(False)
    exchange(client, server)
    for sid in (1, 3, 5):
        client.send_headers(sid, GET, end_stream=True)
    server.receive_data(client.data_to_send())
    assert len(server.streams) == 3
    assert server.open_inbound_streams == 3

    for sid in (1, 3):
        server.send_headers(sid, OK_RESPONSE, end_stream=True)
    client.receive_data(server.data_to_send())
    server.forget_stream(1)
    server.forget_stream(3)
    assert list(server.streams) == [5]
    assert server.open_inbound_streams == 1
    assert server.open_outbound_streams == 1  # no push: one count serves both

    server.forget_stream(3)  # again: harmless
    server.forget_stream(99)  # never existed: harmless
    assert len(server.streams) == 1


@pytest.mark.parametrize("priority", [False, True], ids=["plain", "priority-flag"])
def test_server_count_does_not_drift_over_many_streams(priority: bool) -> None:
    limit = 4
    client, server = real_peer(True), proxy_conn(False, max_concurrent_streams=limit)
    exchange(client, server)
    for n in range(1000):
        sid = 2 * n + 1
        _finish(client, server, sid, priority=priority)  # PRIORITY takes h2's checked path
        assert server.open_inbound_streams == 1
        server.forget_stream(sid)
        assert len(server.streams) == 0


def test_client_codec_honours_peer_limit_and_reuses_forgotten_slots() -> None:
    limit = 2
    client, server = proxy_conn(True), real_peer(False)
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit})
    exchange(client, server)
    assert client.remote_settings.max_concurrent_streams == limit

    client.send_headers(1, GET)
    client.send_headers(3, GET)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        client.send_headers(5, GET)
    server.receive_data(client.data_to_send())

    client.end_stream(1)
    server.receive_data(client.data_to_send())
    server.send_headers(1, OK_RESPONSE, end_stream=True)
    client.receive_data(server.data_to_send())
    # Closed but not yet forgotten: still counted (the driver decides when it is done).
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        client.send_headers(5, GET)
    client.forget_stream(1)
    client.send_headers(5, GET, end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert only(events, h2.events.RequestReceived).stream_id == 5


def test_client_count_does_not_drift_over_many_streams() -> None:
    client, server = proxy_conn(True), real_peer(False)
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    exchange(client, server)
    for n in range(1000):
        sid = 2 * n + 1
        _finish(client, server, sid)
        client.forget_stream(sid)
    assert len(client.streams) == 0


@pytest.mark.parametrize("priority", [False, True], ids=["plain", "priority-flag"])
def test_stream_over_the_limit_is_a_stream_matter(priority: bool) -> None:
    """RFC 9113 5.1.2 / the codec's own docstring: a stream beyond
    MAX_CONCURRENT_STREAMS reaches the driver (which refuses that one stream
    with REFUSED_STREAM); it must not become a connection error because the
    HEADERS frame carried the PRIORITY flag. The client opens both streams
    before our SETTINGS reach it (a legal race)."""
    server = proxy_conn(False, max_concurrent_streams=1)
    client = real_peer(True)
    for sid in (1, 3):
        if priority:
            client.send_headers(sid, GET, end_stream=True, priority_weight=16)
        else:
            client.send_headers(sid, GET, end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert [e.stream_id for e in events if isinstance(e, h2.events.RequestReceived)] == [1, 3]


# Late frames on a forgotten stream get the same answer h2 gives a stream its
# own scan pruned: the closed-by record must be the same.


def _late_frames() -> dict[str, bytes]:
    data = DataFrame(1, data=b"late")
    rst = RstStreamFrame(1)
    rst.error_code = ErrorCodes.CANCEL
    window = WindowUpdateFrame(1, window_increment=100)
    block = hpack.Encoder().encode([(b"x-late", b"1")])
    headers = HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"])
    return {
        "DATA": data.serialize(),
        "RST_STREAM": rst.serialize(),
        "WINDOW_UPDATE": window.serialize(),
        "HEADERS": headers.serialize(),
    }


LATE_FRAMES = _late_frames()


def _outcome_of_late_frame(conn: Any, how: str, frame: bytes) -> tuple[Any, ...]:
    client = real_peer(True)
    exchange(client, conn)
    client.send_headers(1, GET)  # no END_STREAM: the stream is open both ways
    conn.receive_data(client.data_to_send())
    if how == "ended":
        client.end_stream(1)
        conn.receive_data(client.data_to_send())
        conn.send_headers(1, OK_RESPONSE, end_stream=True)
    else:
        conn.reset_stream(1, ErrorCodes.CANCEL)
    conn.data_to_send()
    if isinstance(conn, ProxyH2Connection):
        conn.forget_stream(1)
    else:
        assert conn.open_inbound_streams == 0  # h2 prunes the closed stream here
    assert 1 not in conn.streams
    try:
        events = conn.receive_data(frame)
    except h2.exceptions.ProtocolError as e:
        # A connection error: what the peer sees is the GOAWAY and its code.
        return ("connection error", ErrorCodes(e.error_code).name, conn.data_to_send())
    return ("events", [type(e).__name__ for e in events], conn.data_to_send())


@pytest.mark.parametrize("frame", LATE_FRAMES.values(), ids=LATE_FRAMES.keys())
@pytest.mark.parametrize("how", ["ended", "reset"])
def test_late_frame_on_forgotten_stream_is_answered_as_h2_would(how: str, frame: bytes) -> None:
    """RFC 9113 5.1 "closed": after RST_STREAM a late frame is a stream error;
    after END_STREAM both ways it is a connection error of type STREAM_CLOSED.
    h2 gets both right for streams its scan pruned; forgetting must too."""
    reference = h2.connection.H2Connection(codec.make_config(client_side=False))
    reference.initiate_connection()
    assert _outcome_of_late_frame(proxy_conn(False), how, frame) == _outcome_of_late_frame(
        reference, how, frame
    )


# ---------------------------------------------------------------------------
# GOAWAY keeps streams below the last-stream-id usable (RFC 9113 6.8).


def _goaway(last_stream_id: int, code: int = ErrorCodes.NO_ERROR) -> bytes:
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = code
    return frame.serialize()


def test_server_answers_open_stream_after_receiving_goaway() -> None:
    client, server = real_peer(True), proxy_conn(False)
    exchange(client, server)
    client.send_headers(1, GET, end_stream=True)
    server.receive_data(client.data_to_send())

    # The client's GOAWAY (built by hand: h2 would then refuse the response).
    events = server.receive_data(_goaway(0))
    assert [type(e) for e in events] == [h2.events.ConnectionTerminated]

    server.send_headers(1, OK_RESPONSE)
    server.send_data(1, b"still here", end_stream=True)
    assert summary(client.receive_data(server.data_to_send())) == [
        ("ResponseReceived", 1, OK_RESPONSE, None),
        ("DataReceived", 1, None, b"still here"),
        ("StreamEnded", 1, None, None),
    ]


def test_plain_h2_would_refuse_that_response() -> None:
    """Why the codec changes h2's state table: h2 closes on any GOAWAY."""
    client = real_peer(True)
    server = h2.connection.H2Connection(codec.make_config(client_side=False))
    server.initiate_connection()
    exchange(client, server)
    client.send_headers(1, GET, end_stream=True)
    server.receive_data(client.data_to_send())
    server.receive_data(_goaway(0))
    with pytest.raises(h2.exceptions.ProtocolError):
        server.send_headers(1, OK_RESPONSE, end_stream=True)


def test_server_finishes_open_stream_after_sending_goaway() -> None:
    client, server = real_peer(True), proxy_conn(False)
    exchange(client, server)
    client.send_headers(1, GRPC_REQUEST)
    server.receive_data(client.data_to_send())
    server.close_connection(last_stream_id=1)  # drain: GOAWAY, streams <= 1 go on
    goaway = server.data_to_send()
    assert goaway[3] == 0x7  # a GOAWAY frame

    # The rest of the request still arrives (the client has not seen the GOAWAY yet).
    client.send_data(1, MESSAGE, end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert [type(e).__name__ for e in events] == ["DataReceived", "StreamEnded"]
    server.send_headers(1, OK_RESPONSE, end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert only(events, h2.events.ResponseReceived).stream_id == 1


def test_client_finishes_open_stream_after_receiving_goaway() -> None:
    client, server = proxy_conn(True), real_peer(False)
    exchange(client, server)
    client.send_headers(1, GRPC_REQUEST)
    server.receive_data(client.data_to_send())
    events = client.receive_data(_goaway(1))
    assert only(events, h2.events.ConnectionTerminated).last_stream_id == 1

    client.send_data(1, MESSAGE, end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert only(events, h2.events.DataReceived).data == MESSAGE
    server.send_headers(1, OK_RESPONSE, end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert only(events, h2.events.ResponseReceived).stream_id == 1


# ---------------------------------------------------------------------------
# Abuse: what a hostile peer can make the codec hold or raise.


def _check_bounded(conn: ProxyH2Connection) -> None:
    buf = conn.incoming_buffer
    assert len(buf._data) <= ABSOLUTE_BUFFER_BOUND
    # h2/frame_buffer.py CONTINUATION_BACKLOG: at most 64 frames of one block.
    assert len(buf._headers_buffer) <= 64


def _check_blocks(events: list[h2.events.Event]) -> None:
    """The header checks accept any decoded block without raising."""
    for e in events:
        headers = getattr(e, "headers", None)
        if headers is not None:
            block = plain(headers)
            for check in (request_problem, response_problem, trailers_problem):
                assert isinstance(check(block), str | None)


def test_oversized_frame_is_refused_when_its_header_arrives() -> None:
    """RFC 9113 4.2: a frame above SETTINGS_MAX_FRAME_SIZE is a FRAME_SIZE_ERROR.

    The header says so in its first 9 bytes; the codec should not buffer the
    announced 16 MiB before deciding (one peer per connection could pin that
    much memory by trickling bytes)."""
    server = proxy_conn(False)
    server.receive_data(real_peer(True).data_to_send())  # preface + SETTINGS
    size = 2**24 - 1
    header = struct.pack(">HBBBL", size >> 8, size & 0xFF, 0x0, 0x0, 1)  # DATA, stream 1
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        server.receive_data(header + b"\0" * (server.max_inbound_frame_size + 1))


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _receive_all(conn: ProxyH2Connection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except h2.exceptions.ProtocolError:
            return  # the driver sends the GOAWAY h2 prepared and closes
        _check_blocks(events)
        _check_bounded(conn)


@FUZZ
@given(junk=st.binary(max_size=4096))
def test_arbitrary_bytes_after_preface(junk: bytes) -> None:
    server = proxy_conn(False)
    _receive_all(server, [PREFACE, junk])


frames = st.builds(
    lambda kind, flags, sid, payload: struct.pack(
        ">HBBBL", len(payload) >> 8, len(payload) & 0xFF, kind, flags, sid
    )
    + payload,
    kind=st.integers(0, 10),
    flags=st.integers(0, 255),
    sid=st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1]),
    payload=st.binary(max_size=64),
)


@FUZZ
@given(st.lists(frames, max_size=20), st.booleans())
def test_arbitrary_frames_after_handshake(sequence: list[bytes], client_side: bool) -> None:
    if client_side:
        conn, peer = proxy_conn(True), real_peer(False)
        exchange(conn, peer)
        conn.send_headers(1, GET, end_stream=True)
        conn.send_headers(3, GRPC_REQUEST)
    else:
        conn, peer = proxy_conn(False), real_peer(True)
        exchange(conn, peer)
    _receive_all(conn, sequence)


def _client_stream() -> bytes:
    client = real_peer(True)
    client.send_headers(1, GRPC_REQUEST)
    client.send_data(1, MESSAGE)
    client.send_headers(1, TRAILERS, end_stream=True)
    client.ping(b"12345678")
    client.increment_flow_control_window(1000)
    client.send_headers(3, [*GET, (b"x-big", b"b" * 20_000)], priority_weight=8)  # + CONTINUATION
    client.send_data(3, b"x" * 300)
    client.reset_stream(3, ErrorCodes.CANCEL)
    client.send_headers(5, GET, end_stream=True)
    return client.data_to_send()


def _setup_client_under_test() -> ProxyH2Connection:
    conn = proxy_conn(True)
    conn.send_headers(1, GRPC_REQUEST, end_stream=True)
    conn.send_headers(3, GET, end_stream=True)
    return conn


def _server_stream() -> bytes:
    peer = real_peer(False)
    peer.receive_data(_setup_client_under_test().data_to_send())
    peer.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    peer.send_data(1, MESSAGE)
    peer.send_headers(1, TRAILERS, end_stream=True)
    peer.send_headers(3, [(b":status", b"100")])
    peer.send_headers(3, [*OK_RESPONSE, (b"content-length", b"5")])
    peer.send_data(3, b"hello", end_stream=True)
    peer.ping(b"abcdefgh")
    return peer.data_to_send()


CLIENT_STREAM = _client_stream()
SERVER_STREAM = _server_stream()


@st.composite
def chunked_mutations(draw: st.DrawFn, data: bytes) -> list[bytes]:
    mutated = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        mutated[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=12))))
    bounds = [0, *cuts, len(data)]
    return [bytes(mutated[a:b]) for a, b in itertools.pairwise(bounds)]


def test_unmutated_streams_are_clean() -> None:
    """The fuzz inputs below start from byte streams the codec accepts whole."""
    server = proxy_conn(False)
    events = server.receive_data(CLIENT_STREAM)
    assert [e.stream_id for e in events if isinstance(e, h2.events.RequestReceived)] == [1, 3, 5]
    client = _setup_client_under_test()
    events = client.receive_data(SERVER_STREAM)
    assert [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)] == [1, 3]


@FUZZ
@given(chunked_mutations(CLIENT_STREAM))
def test_mutated_client_bytes(chunks: list[bytes]) -> None:
    _receive_all(proxy_conn(False), chunks)


@FUZZ
@given(chunked_mutations(SERVER_STREAM))
def test_mutated_server_bytes(chunks: list[bytes]) -> None:
    _receive_all(_setup_client_under_test(), chunks)
