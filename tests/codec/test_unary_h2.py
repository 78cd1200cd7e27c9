"""codec/unary_h2's UnaryClient against a real h2.H2Connection server: bytes in, events out.

Covers the exchange (HEADERS, DATA, trailers), SETTINGS and PING acks, sending
a body larger than the server's window as WINDOW_UPDATEs arrive, CONTINUATION,
HPACK state across exchanges, padding, resets, GOAWAY, a batch of exchanges at
once (interleaved replies, one reset among them, the server's stream limit),
and the bounds (reply size, frame size). The driver (sockets) is tested with
a real server below.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio
from h2.errors import ErrorCodes

from meshproxy.codec import unary_h2
from meshproxy.codec.unary_h2 import (
    ExchangeFailed,
    MalformedReply,
    ReplyTooLong,
    StreamRefused,
    StreamReset,
    UnaryClient,
)
from meshproxy.drivers import unary_h2 as driver
from meshproxy.drivers.unary_h2 import NotReconnected, TimedOut, UnaryConnections
from meshproxy.values import Address
from tests.harness import eventually

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"risk"), (b":path", b"/check"),
           (b"content-type", b"application/json")]


def server() -> h2.connection.H2Connection:
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    s.initiate_connection()
    return s


def to_server(s: h2.connection.H2Connection, c: UnaryClient) -> list[Any]:
    return s.receive_data(c.data_to_send())


def start(body: bytes = b"{}") -> tuple[h2.connection.H2Connection, UnaryClient, list[Any]]:
    c = UnaryClient(max_reply=1000)
    s = server()
    c.request(REQUEST, body)
    events = to_server(s, c)
    assert c.receive(s.data_to_send()) is None  # the server's SETTINGS, acked
    events += to_server(s, c)
    return s, c, events


def test_an_exchange_with_trailers() -> None:
    s, c, events = start(b'{"a": 1}')
    (req,) = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert req.headers == REQUEST
    assert b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)) == b'{"a": 1}'
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
    s.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    s.send_data(1, b"\x00\x00\x00\x00\x01x")
    s.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    r = c.receive(s.data_to_send())
    assert r is not None and r.ended
    assert r.head == [(b":status", b"200"), (b"content-type", b"application/grpc")]
    assert bytes(r.data) == b"\x00\x00\x00\x00\x01x" and r.trailers == [(b"grpc-status", b"0")]
    assert c.usable


def test_hpack_state_and_stream_ids_carry_across_exchanges() -> None:
    s, c, _ = start()
    for sid in (1, 3, 5):
        if sid > 1:
            c.request(REQUEST, b"")
            (req,) = [e for e in to_server(s, c) if isinstance(e, h2.events.RequestReceived)]
            assert req.stream_id == sid
        # h2's encoder indexes these: the second and third replies refer to its dynamic table.
        s.send_headers(sid, [(b":status", b"200"), (b"x-verdict", b"allow-" + str(sid).encode())], end_stream=True)
        r = c.receive(s.data_to_send())
        assert r is not None and r.head == [(b":status", b"200"), (b"x-verdict", b"allow-" + str(sid).encode())]


def test_the_client_asks_for_no_dynamic_table_and_keeps_none() -> None:
    s, c, events = start()
    (changed,) = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)]
    assert changed.changed_settings[h2.settings.SettingCodes.HEADER_TABLE_SIZE].new_value == 0
    for sid in (1, 3):  # h2's encoder would index these; told the table is 0, it says so and does not
        if sid > 1:
            c.request(REQUEST, b"")
            to_server(s, c)
        s.send_headers(sid, [(b":status", b"200"), (b"x-verdict", b"allow")], end_stream=True)
        r = c.receive(s.data_to_send())
        assert r is not None and r.head == [(b":status", b"200"), (b"x-verdict", b"allow")]
        assert not c._decoder.header_table.dynamic_entries


def test_pings_are_acknowledged_and_a_reply_in_pieces_completes_once() -> None:
    s, c, _ = start()
    s.ping(b"12345678")
    s.send_headers(1, [(b":status", b"200")])
    s.send_data(1, b"x" * 100, end_stream=True)
    wire = s.data_to_send()
    for i in range(len(wire) - 1):
        assert c.receive(wire[i : i + 1]) is None
    assert c.receive(wire[-1:]) is not None
    events = to_server(s, c)
    assert any(isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"12345678" for e in events)


def test_a_body_past_the_servers_window_waits_for_window_updates() -> None:
    body = bytes(range(256)) * 600  # 153,600 bytes: over the 65,535 initial windows
    s, c, events = start(body)
    got = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert len(got) == 65_535 and not any(isinstance(e, h2.events.StreamEnded) for e in events)
    while not any(isinstance(e, h2.events.StreamEnded) for e in events):
        s.acknowledge_received_data(65_535, 1)
        assert c.receive(s.data_to_send()) is None
        events = to_server(s, c)
        got += b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert got == body


def test_big_response_headers_arrive_in_continuation_frames() -> None:
    s, c, _ = start()
    big = [(b":status", b"200")] + [(f"x-h{i}".encode(), b"v" * 900) for i in range(40)]  # ~36 KiB
    s.send_headers(1, big, end_stream=True)
    wire = s.data_to_send()
    assert wire[3] == unary_h2.HEADERS and unary_h2.CONTINUATION in {wire[i + 3] for i in _frame_offsets(wire)}
    r = c.receive(wire)
    assert r is not None and r.head == big


def _frame_offsets(wire: bytes) -> list[int]:
    at, out = 0, []
    while at < len(wire):
        out.append(at)
        at += 9 + int.from_bytes(wire[at : at + 3], "big")
    return out


def test_padded_headers_and_data() -> None:
    c = UnaryClient(max_reply=1000)
    c.request(REQUEST, b"")
    c.data_to_send()
    block = b"\x88"  # :status 200, static index 8
    c.receive(unary_h2.frame(unary_h2.SETTINGS, 0, 0))
    assert c.receive(unary_h2.frame(unary_h2.HEADERS, unary_h2.END_HEADERS | unary_h2.PADDED, 1,
                                    b"\x03" + block + b"\0\0\0")) is None
    r = c.receive(unary_h2.frame(unary_h2.DATA, unary_h2.END_STREAM | unary_h2.PADDED, 1, b"\x02ok\0\0"))
    assert r is not None and r.head == [(b":status", b"200")] and bytes(r.data) == b"ok"


@pytest.mark.parametrize(("code", "error"), [(ErrorCodes.REFUSED_STREAM, StreamRefused),
                                             (ErrorCodes.INTERNAL_ERROR, StreamReset)])
def test_a_reset_stream_fails_the_exchange(code: int, error: type[Exception]) -> None:
    s, c, _ = start()
    s.reset_stream(1, code)
    r = c.receive(s.data_to_send())
    assert r is not None and r.ended and type(r.error) is error and r.error.code == code
    assert c.usable  # the connection itself is fine


def test_a_reset_after_the_complete_reply_is_ignored() -> None:
    s, c, _ = start()
    s.send_headers(1, [(b":status", b"200")], end_stream=True)
    wire = s.data_to_send() + unary_h2.frame(unary_h2.RST_STREAM, 0, 1, struct.pack("!I", ErrorCodes.NO_ERROR))
    r = c.receive(wire)
    assert r is not None and r.head == [(b":status", b"200")] and c.usable


def test_a_reply_before_the_whole_body_was_sent_ends_our_side_with_a_reset() -> None:
    s, c, _ = start(b"x" * 100_000)  # 65,535 sent; the rest waits for window
    s.send_headers(1, [(b":status", b"200")], end_stream=True)
    assert c.receive(s.data_to_send()) is not None
    wire = c.data_to_send()
    assert wire[3] == unary_h2.RST_STREAM and int.from_bytes(wire[5:9], "big") == 1
    assert int.from_bytes(wire[9:13], "big") == unary_h2.CANCEL and c.usable


def test_goaway_refuses_an_unprocessed_request_and_ends_reuse() -> None:
    s, c, _ = start()
    s.close_connection(last_stream_id=0)
    r = c.receive(s.data_to_send())
    assert r is not None and isinstance(r.error, StreamRefused)
    assert not c.usable
    s2, c2, _ = start()
    s2.close_connection(last_stream_id=1)  # processed: the reply still comes
    assert c2.receive(s2.data_to_send()) is None and not c2.usable


def test_bounds_reply_size_frame_size_and_push() -> None:
    s, c, _ = start()
    s.send_headers(1, [(b":status", b"200")])
    s.send_data(1, b"x" * 1001)
    r = c.receive(s.data_to_send())  # too long: that stream is reset (CANCEL), the connection goes on
    assert r is not None and isinstance(r.error, ReplyTooLong) and c.usable
    wire = c.data_to_send()
    assert wire[3] == unary_h2.RST_STREAM and int.from_bytes(wire[9:13], "big") == unary_h2.CANCEL
    s.send_data(1, b"more", end_stream=True)  # what was on its way is dropped, its window given back
    assert c.receive(s.data_to_send()) is None
    c = UnaryClient(max_reply=1000)
    c.request(REQUEST, b"")
    with pytest.raises(ExchangeFailed) as e:
        c.receive(struct.pack("!I", 20_000)[1:] + bytes([0, 0]) + struct.pack("!I", 1))
    assert e.value.code == unary_h2.FRAME_SIZE_ERROR
    c = UnaryClient(max_reply=1000)
    c.request(REQUEST, b"")
    with pytest.raises(ExchangeFailed, match="PUSH_PROMISE"):
        c.receive(unary_h2.frame(unary_h2.PUSH_PROMISE, unary_h2.END_HEADERS, 1, b"\0\0\0\x02\x88"))
    c = UnaryClient(max_reply=1000)
    c.request(REQUEST, b"")
    with pytest.raises(ExchangeFailed, match=":status"):
        c.receive(unary_h2.frame(unary_h2.HEADERS, unary_h2.END_HEADERS | unary_h2.END_STREAM, 1, b"\x82"))


@pytest.mark.parametrize("wire", [
    unary_h2.frame(unary_h2.HEADERS, unary_h2.END_HEADERS, 3, b"\x88"),  # stream 3 was never opened
    unary_h2.frame(unary_h2.DATA, 0, 5, b"x"),
    unary_h2.frame(unary_h2.RST_STREAM, 0, 2, b"\0\0\0\0"),  # an even id: the server's, and push is off
    # RFC 9113 8.1: an interim response cannot end the stream (:status 103, static-name literal).
    unary_h2.frame(unary_h2.HEADERS, unary_h2.END_HEADERS | unary_h2.END_STREAM, 1, b"\x08\x03103"),
    unary_h2.frame(unary_h2.WINDOW_UPDATE, 0, 3, b"\0\0\0\x01"),
    # 2 bytes of padding leave 2 of the 5 the priority fields take (RFC 9113 6.2); the block follows.
    unary_h2.frame(unary_h2.HEADERS, unary_h2.PADDED | unary_h2.PRIORITY_FLAG, 1, b"\x02\0\0pp")
    + unary_h2.frame(unary_h2.CONTINUATION, unary_h2.END_HEADERS | unary_h2.END_STREAM, 1, b"\x88"),
    unary_h2.frame(unary_h2.SETTINGS, 0, 0, struct.pack("!HI", unary_h2.SETTINGS_ENABLE_PUSH, 1)),
])
def test_frames_on_streams_never_opened_and_a_final_interim_reply_are_protocol_errors(wire: bytes) -> None:
    c = UnaryClient(max_reply=1000)
    c.request(REQUEST, b"")
    with pytest.raises(ExchangeFailed) as e:
        c.receive(wire)
    assert e.value.code == unary_h2.PROTOCOL_ERROR and not isinstance(e.value, StreamReset)


def test_a_settings_ack_with_a_payload_is_a_frame_size_error() -> None:
    c = UnaryClient(max_reply=1000)
    c.request(REQUEST, b"")
    with pytest.raises(ExchangeFailed) as e:
        c.receive(unary_h2.frame(unary_h2.SETTINGS, unary_h2.ACK, 0, b"\0" * 6))
    assert e.value.code == unary_h2.FRAME_SIZE_ERROR


@pytest.mark.parametrize(("length", "body", "malformed"), [
    (b"2", b"ok", False), (b"5", b"ok", True), (b"0", b"ok", True), (b"x", b"", True), (b"002", b"ok", False)])
def test_a_content_length_that_is_not_the_bodys_length_fails_that_exchange(length: bytes, body: bytes,
                                                                            malformed: bool) -> None:
    s, c, _ = start()
    s.send_headers(1, [(b":status", b"200"), (b"content-length", length)])
    s.send_data(1, body, end_stream=True)
    r = c.receive(s.data_to_send())
    assert r is not None and r.ended
    assert isinstance(r.error, MalformedReply) is malformed
    assert c.usable  # the connection goes on


def test_a_batch_of_exchanges_with_interleaved_replies_and_one_reset() -> None:
    c = UnaryClient(max_reply=1000)
    s = server()
    responses = [c.request(REQUEST, f"body-{i}".encode()) for i in range(4)]
    c.receive(s.data_to_send())
    events = to_server(s, c)
    bodies = {e.stream_id: e.data for e in events if isinstance(e, h2.events.DataReceived)}
    assert bodies == {1: b"body-0", 3: b"body-1", 5: b"body-2", 7: b"body-3"}
    # Replies in another order, one in two pieces, and stream 5 reset.
    s.send_headers(7, [(b":status", b"200")])
    s.send_headers(1, [(b":status", b"200")])
    s.send_data(7, b"seven", end_stream=True)
    s.reset_stream(5, ErrorCodes.INTERNAL_ERROR)
    s.send_data(1, b"o", end_stream=False)
    assert c.receive(s.data_to_send()) is not None
    assert [r.ended for r in responses] == [False, False, True, True]
    s.send_data(1, b"ne", end_stream=True)
    s.send_headers(3, [(b":status", b"503")], end_stream=True)
    c.receive(s.data_to_send())
    assert all(r.ended for r in responses) and c.idle and c.usable
    assert [bytes(r.data) for r in responses] == [b"one", b"", b"", b"seven"]
    assert responses[1].head == [(b":status", b"503")] and isinstance(responses[2].error, StreamReset)
    assert [r.error for r in (responses[0], responses[1], responses[3])] == [None, None, None]


def test_goaway_refuses_only_the_streams_above_its_last_id() -> None:
    c = UnaryClient(max_reply=1000)
    s = server()
    responses = [c.request(REQUEST, b"") for _ in range(3)]
    c.receive(s.data_to_send())
    to_server(s, c)
    c.receive(unary_h2.frame(unary_h2.GOAWAY, 0, 0, struct.pack("!II", 3, ErrorCodes.NO_ERROR)))
    assert [type(r.error) for r in responses] == [type(None), type(None), StreamRefused]
    s.send_headers(1, [(b":status", b"200")], end_stream=True)
    s.send_headers(3, [(b":status", b"200")], end_stream=True)
    c.receive(s.data_to_send())
    assert responses[0].ended and responses[1].ended and not c.usable


def test_the_servers_stream_limit_bounds_the_exchanges_in_flight() -> None:
    c = UnaryClient(max_reply=1000)
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    s.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    s.initiate_connection()
    c.receive(s.data_to_send())
    assert c.peer_max_streams == 2 and c.usable
    c.request(REQUEST, b"")
    c.request(REQUEST, b"")
    assert not c.usable
    with pytest.raises(ExchangeFailed, match="busy"):
        c.request(REQUEST, b"")


# -- the driver, with a real server on a socket


async def serve_h2(listener: socket.socket, replies_per_connection: int, seen: list[int], max_streams: int = 100,
                   refuse: frozenset[tuple[int, int]] = frozenset(), hold: frozenset[tuple[int, int]] = frozenset(),
                   first_replies: int | None = None, ping: bool = False, abort: bool = False,
                   fin: bool = False, zero_after: int | None = None) -> None:
    """An h2 server: answers `replies_per_connection` requests per connection (`first_replies` on
    the first), then closes it; connections are served at once.

    Stream limit `max_streams` (h2 fails the connection if a client goes past it), lowered to 0
    once `zero_after` requests were answered; the (connection number, stream id) pairs in
    `refuse` get RST_STREAM REFUSED_STREAM, those in `hold` no reply at all. `ping`: a PING goes
    with each reply. `abort`: the last reply goes with a TCP reset right behind it (no
    checkpoint between, so the client reads both at once); `fin`: with a FIN (the server
    shuts its side, then reads until the client closes)."""

    async def serve(number: int, raw: socket.socket) -> None:
        conn = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
        s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        s.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
        s.initiate_connection()
        answered = 0
        limit = first_replies if number == 1 and first_replies is not None else replies_per_connection
        async with conn:
            await conn.send_all(s.data_to_send())
            while answered < limit:
                data = await conn.receive_some(65536)
                if not data:
                    break
                for e in s.receive_data(data):
                    if isinstance(e, h2.events.StreamEnded):
                        if (number, e.stream_id) in refuse:
                            s.reset_stream(e.stream_id, ErrorCodes.REFUSED_STREAM)
                            continue
                        seen.append(e.stream_id)
                        if (number, e.stream_id) in hold:
                            continue
                        if ping:
                            s.ping(b"12345678")
                        s.send_headers(e.stream_id, [(b":status", b"200")])
                        s.send_data(e.stream_id, b"ok", end_stream=True)
                        answered += 1
                        if answered == zero_after:
                            s.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
                if abort and answered >= limit:
                    raw.send(s.data_to_send())  # small: a non-blocking send takes it whole
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    raw.close()
                    return
                if fin and answered >= limit:
                    await conn.send_all(s.data_to_send())
                    await conn.send_eof()
                    while await conn.receive_some(65536):
                        pass
                    return
                await conn.send_all(s.data_to_send())
            await trio.sleep(0.05)  # the reply is read before the close

    async with trio.open_nursery() as nursery:
        connections = 0
        while True:
            await trio.lowlevel.wait_readable(listener)
            sock, _ = listener.accept()
            connections += 1
            nursery.start_soon(serve, connections, sock)


async def against_h2(body: Callable[[Address, UnaryConnections], Awaitable[None]], replies_per_connection: int,
                    seen: list[int], **server: Any) -> None:
    """Run `body` with lean connections to serve_h2 on a TCP port, then close both."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    lean = UnaryConnections(1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(serve_h2, listener, replies_per_connection, seen, **server))
        await body(Address("tcp", "127.0.0.1", listener.getsockname()[1]), lean)
        assert lean.busy == 0
        lean.close()
        nursery.cancel_scope.cancel()
    listener.close()


def soon() -> float:
    return trio.current_time() + 5


async def test_the_driver_reuses_a_connection_and_retries_once_when_the_server_closed_it() -> None:
    async def body(address: Address, lean: UnaryConnections) -> None:
        for _ in range(5):
            (r,) = await lean.exchange_many(address, [(REQUEST, b"{}")], 1000, soon())
            assert r.head == [(b":status", b"200")] and bytes(r.data) == b"ok" and r.error is None
            await trio.sleep(0.1)  # the server closes after its second reply; the next one finds out

    seen: list[int] = []
    await against_h2(body, 2, seen)
    # Stream 1 and 3 on each connection: a connection was reused, and the closed one retried on a fresh one.
    assert seen == [1, 3, 1, 3, 1]


async def test_the_driver_sends_a_batch_as_streams_of_one_connection() -> None:
    async def body(address: Address, lean: UnaryConnections) -> None:
        for n in (4, 3):
            responses = await lean.exchange_many(address, [(REQUEST, b"{}")] * n, 1000, soon())
            assert [bytes(r.data) for r in responses] == [b"ok"] * n
            assert all(r.ended and r.error is None for r in responses)
        with pytest.raises(ValueError, match="batch"):
            await lean.exchange_many(address, [], 1000, soon())

    seen: list[int] = []
    await against_h2(body, 100, seen)
    assert sorted(seen) == [1, 3, 5, 7, 9, 11, 13]  # one connection, reused for the second batch


async def test_a_batch_keeps_to_the_stream_limit_the_endpoint_named_before() -> None:
    """The server allows 2 streams and closes its first connection after one reply: that connection
    learns the limit; the next batch of 5 opens a fresh connection and starts 2 streams, then one
    more as each ends (h2 would fail the connection had a third been open at once)."""

    async def body(address: Address, lean: UnaryConnections) -> None:
        (first,) = await lean.exchange_many(address, [(REQUEST, b"{}")], 1000, soon())
        assert first.error is None
        await trio.sleep(0.1)
        responses = await lean.exchange_many(address, [(REQUEST, b"{}")] * 5, 1000, soon())
        assert [(bytes(r.data), r.error) for r in responses] == [(b"ok", None)] * 5

    seen: list[int] = []
    await against_h2(body, 100, seen, max_streams=2, first_replies=1)
    assert seen == [1, 1, 3, 5, 7, 9]  # one reply on the first connection, five on the second


async def test_refused_streams_whose_fresh_connection_fails_to_connect_say_so() -> None:
    async def body(address: Address, lean: UnaryConnections) -> None:
        (first,) = await lean.exchange_many(address, [(REQUEST, b"a")], 1000, soon())
        assert first.error is None
        lean.connect_timeout = 0  # the fresh connection for the refused streams cannot be made
        responses = await lean.exchange_many(address, [(REQUEST, b"a")] * 3, 1000, soon())
        assert responses[0].error is None
        assert all(isinstance(r.error, NotReconnected) for r in responses[1:])
        assert "connection to send it again failed" in str(responses[1].error)

    seen: list[int] = []
    await against_h2(body, 100, seen, refuse=frozenset({(1, 5), (1, 7)}))
    assert seen == [1, 3]


async def test_refused_streams_whose_retry_comes_after_the_deadline_time_out() -> None:
    async def body(address: Address, lean: UnaryConnections) -> None:
        # Stream 1 is held until the deadline; only then does stream 3, refused, go again.
        responses = await lean.exchange_many(address, [(REQUEST, b"a")] * 2, 1000, trio.current_time() + 0.2)
        assert [type(r.error) for r in responses] == [TimedOut, TimedOut]

    await against_h2(body, 100, [], hold=frozenset({(1, 1)}), refuse=frozenset({(1, 3)}))


async def test_refused_streams_go_once_more_on_a_fresh_connection() -> None:
    async def body(address: Address, lean: UnaryConnections) -> None:
        responses = await lean.exchange_many(address, [(REQUEST, b"a")] * 3, 1000, soon())
        assert responses[0].error is None and responses[2].error is None
        assert isinstance(responses[1].error, StreamRefused)

    seen: list[int] = []
    # Connection 1 refuses streams 3 and 5; connection 2 refuses stream 1 (the first retry), so
    # that one stays refused; the answered ones are never sent again.
    await against_h2(body, 100, seen, refuse=frozenset({(1, 3), (1, 5), (2, 1)}))
    assert seen == [1, 3]  # connection 1 answered stream 1; connection 2 answered stream 3 (the second retry)


async def test_at_the_deadline_the_answered_streams_stand_and_the_connection_is_dropped() -> None:
    async def body(address: Address, lean: UnaryConnections) -> None:
        responses = await lean.exchange_many(address, [(REQUEST, b"a")] * 2, 1000, trio.current_time() + 0.3)
        assert responses[0].error is None and bytes(responses[0].data) == b"ok"
        assert isinstance(responses[1].error, TimedOut)
        (again,) = await lean.exchange_many(address, [(REQUEST, b"b")], 1000, soon())
        assert again.error is None

    seen: list[int] = []
    await against_h2(body, 100, seen, hold=frozenset({(1, 3)}))
    assert seen == [1, 3, 1]  # the late connection was not reused


async def test_deadlines_stay_bounded_and_their_watch_ends_when_nothing_is_armed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "COMPACT_AFTER", 4)
    monkeypatch.setattr(driver, "WATCH_IDLE", 0.1)

    async def body(address: Address, lean: UnaryConnections) -> None:
        deadlines = lean._deadlines
        for _ in range(30):  # each leaves its (far) deadline behind in the heap
            (r,) = await lean.exchange_many(address, [(REQUEST, b"{}")], 1000, trio.current_time() + 60)
            assert r.error is None
            assert len(deadlines._heap) <= 2 + 4 + 1 and deadlines._armed == 0
        with trio.move_on_after(0.2):  # cancelled from outside: nothing stays armed
            await lean.exchange_many(address, [(REQUEST, b"hold")], 1000, trio.current_time() + 60)
        assert deadlines._armed == 0
        (r,) = await lean.exchange_many(address, [(REQUEST, b"{}")], 1000, trio.current_time() + 0.3)
        assert r.error is None
        # Past the earliest deadline left, the watch finds nothing armed and, WATCH_IDLE later, ends.
        await eventually(lambda: not deadlines._running, timeout=5)

    seen: list[int] = []
    await against_h2(body, 100, seen, hold=frozenset({(1, 61)}))
    assert len(seen) == 32


async def test_a_server_that_stops_reading_times_the_exchange_out_while_it_sends() -> None:
    """The server grants huge windows, then reads nothing: the request's body fills the socket and
    the send waits for room. The deadline still ends the exchange (the wait is woken)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    lean = UnaryConnections(1.0)
    accepted: list[socket.socket] = []

    async def stalled_server() -> None:
        await trio.lowlevel.wait_readable(listener)
        sock, _ = listener.accept()
        accepted.append(sock)
        s = server()
        s.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        s.increment_flow_control_window(2**31 - 1 - 65_535)
        sock.sendall(s.data_to_send())
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stalled_server)
        address = Address("tcp", "127.0.0.1", listener.getsockname()[1])
        await trio.sleep(0.05)
        with trio.fail_after(10):
            (r,) = await lean.exchange_many(address, [(REQUEST, b"x" * (32 << 20))], 1000, trio.current_time() + 0.5)
        assert isinstance(r.error, TimedOut)
        nursery.cancel_scope.cancel()
    lean.close()
    listener.close()
    for sock in accepted:
        sock.close()


async def test_the_driver_speaks_over_a_unix_socket(tmp_path: Any) -> None:
    path = str(tmp_path / "risk.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    seen: list[int] = []
    lean = UnaryConnections(1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2, listener, 10, seen)
        for _ in range(2):
            (r,) = await lean.exchange_many(Address("unix", path=path), [(REQUEST, b"{}")], 1000,
                                            trio.current_time() + 5)
            assert bytes(r.data) == b"ok"
        lean.close()
        nursery.cancel_scope.cancel()
    listener.close()
    assert seen == [1, 3]


def test_a_settings_change_that_pushes_a_stream_window_past_the_maximum_is_a_flow_control_error() -> None:
    c = UnaryClient(max_reply=1000)
    c.request(REQUEST, b"x" * 70_000)  # waits for window: the stream is open
    c.data_to_send()
    c.receive(unary_h2.frame(unary_h2.WINDOW_UPDATE, 0, 1, struct.pack("!I", 2**31 - 1 - 65_535)))
    with pytest.raises(ExchangeFailed) as e:
        c.receive(unary_h2.frame(unary_h2.SETTINGS, 0, 0, struct.pack("!HI", 4, 2**31 - 1)))
    assert e.value.code == unary_h2.FLOW_CONTROL_ERROR


async def test_the_replies_stand_when_the_server_resets_right_after_them() -> None:
    """A PING comes with the reply and a reset right behind: the PING ACK owed cannot be sent,
    but the exchange is over; its reply stands, and the connection is not reused."""

    async def body(address: Address, lean: UnaryConnections) -> None:
        for _ in range(2):
            (r,) = await lean.exchange_many(address, [(REQUEST, b"{}")], 1000, soon())
            assert (r.error, r.head, bytes(r.data)) == (None, [(b":status", b"200")], b"ok")
            assert not lean._idle[address]  # the PING ACK could not go: not kept for reuse

    seen: list[int] = []
    await against_h2(body, 1, seen, ping=True, abort=True)
    assert seen == [1, 1]  # the second exchange on a fresh connection


@pytest.mark.parametrize("end", ["fin", "abort"])
async def test_a_connection_closed_under_a_batch_keeps_the_replies_that_ended(end: str) -> None:
    async def body(address: Address, lean: UnaryConnections) -> None:
        responses = await lean.exchange_many(address, [(REQUEST, b"{}")] * 3, 1000, soon())
        assert [bytes(r.data) for r in responses[:2]] == [b"ok", b"ok"]
        assert [r.error for r in responses[:2]] == [None, None]
        # Sent, unanswered when the connection closed: it may have been processed, so not sent again.
        assert isinstance(responses[2].error, driver.Closed) and responses[2].ended

    seen: list[int] = []
    await against_h2(body, 2, seen, hold=frozenset({(1, 5)}), **{end: True})
    assert seen == [1, 3, 5]


async def test_a_write_that_fails_later_in_a_batch_keeps_the_replies_that_ended() -> None:
    """The server allows one stream at a time: the second request goes out when the first
    reply ends, and that write meets the reset that came with the reply."""

    async def body(address: Address, lean: UnaryConnections) -> None:
        await lean.exchange_many(address, [(REQUEST, b"{}")], 1000, soon())  # learns the limit: 1
        first, second = await lean.exchange_many(address, [(REQUEST, b"{}")] * 2, 1000, soon())
        assert (first.error, bytes(first.data)) == (None, b"ok")
        assert isinstance(second.error, driver.Closed) and second.ended

    seen: list[int] = []
    await against_h2(body, 1, seen, max_streams=1, abort=True)
    assert seen == [1, 1]


async def test_a_reused_connection_that_fails_the_first_send_is_retried_on_a_fresh_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server reset the idle connection after the liveness peek looked (here: the peek is
    made to miss it): nothing of the request was taken, so it goes once on a fresh connection."""
    monkeypatch.setattr(driver.UnaryConnection, "looks_open", lambda self: True)

    async def body(address: Address, lean: UnaryConnections) -> None:
        for _ in range(2):
            (r,) = await lean.exchange_many(address, [(REQUEST, b"{}")], 1000, soon())
            assert (r.error, bytes(r.data)) == (None, b"ok")
            await trio.sleep(0.05)  # the reset arrives while the connection is idle

    seen: list[int] = []
    await against_h2(body, 1, seen, abort=True)
    assert seen == [1, 1]


async def test_streams_a_limit_lowered_to_0_leaves_unsent_are_refused_not_left_to_time_out() -> None:
    async def body(address: Address, lean: UnaryConnections) -> None:
        await lean.exchange_many(address, [(REQUEST, b"{}")], 1000, soon())  # learns the limit: 1
        start = trio.current_time()
        responses = await lean.exchange_many(address, [(REQUEST, b"{}")] * 3, 1000, start + 5)
        # The two the first connection could not start went on a fresh one at once, not at the deadline.
        assert trio.current_time() - start < 2
        assert [(r.error, bytes(r.data)) for r in responses] == [(None, b"ok")] * 3

    seen: list[int] = []
    # Each connection: a limit of 1, lowered to 0 after its second reply.
    await against_h2(body, 10, seen, max_streams=1, zero_after=2)
    assert seen == [1, 3, 1, 3]


async def test_idle_connections_of_an_endpoint_no_longer_used_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "IDLE_TIMEOUT", 0.2)
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    lean = UnaryConnections(1.0)
    seen: list[int] = []
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            listener.setblocking(False)
            nursery.start_soon(serve_h2, listener, 10, seen)
        a, b = (Address("tcp", "127.0.0.1", listener.getsockname()[1]) for listener in listeners)
        await lean.exchange_many(a, [(REQUEST, b"{}")], 1000, soon())
        assert len(lean._idle[a]) == 1
        await trio.sleep(0.3)
        await lean.exchange_many(b, [(REQUEST, b"{}")], 1000, soon())  # a's idle one is past IDLE_TIMEOUT
        assert (len(lean._idle[a]), len(lean._idle[b])) == (0, 1)
        lean.close()
        nursery.cancel_scope.cancel()
    for listener in listeners:
        listener.close()
