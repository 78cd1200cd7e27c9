"""When the h2 driver writes a stream's last frame: at once on a connection with no other
stream (no other task will add to the batch, and the peer waits for it), else with the batch."""

from __future__ import annotations

import socket

from meshproxy.drivers.h2 import ClientLink
from meshproxy.drivers.transport import Transport

HEADERS = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"peer"), (b":path", b"/")]


def _link() -> tuple[ClientLink, socket.socket]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    link = ClientLink(Transport(ours, write_timeout=5.0), endpoint="peer", max_header_list_size=65536,
                      stream_window=65535, connection_window=65535, keepalive_interval=0.0,
                      keepalive_timeout=5.0, idle_timeout=60.0)
    return link, peer


def _pending(peer: socket.socket) -> bytes:
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


def _frames(data: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, stream id) of each frame after the client preface."""
    data = data.removeprefix(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    out = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        out.append((data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF))
        data = data[9 + length:]
    return out


async def test_a_lone_streams_last_frame_is_written_at_once():
    link, peer = _link()
    stream = link.start_stream(HEADERS, end=False)
    assert _pending(peer) == b""  # not the last frame: it waits for the batch (the writer task)
    await link.send_data(stream, b"body", end=True)
    # No checkpoint ran, so no writer: the bytes are on the wire because send_data wrote them.
    frames = _frames(_pending(peer))
    assert (1, 0x4, stream.id) in frames  # HEADERS, END_HEADERS
    assert (0, 0x1, stream.id) in frames  # DATA, END_STREAM
    peer.close()


async def test_a_lone_requests_headers_with_end_stream_go_at_once():
    link, peer = _link()
    stream = link.start_stream(HEADERS, end=True)
    assert (1, 0x5, stream.id) in _frames(_pending(peer))  # HEADERS, END_HEADERS | END_STREAM
    peer.close()


async def test_with_other_streams_open_the_last_frame_waits_for_the_batch():
    link, peer = _link()
    link.start_stream(HEADERS, end=False)
    second = link.start_stream(HEADERS, end=False)
    await link.send_data(second, b"body", end=True)
    link.end_stream(second)  # a no-op once ended; neither writes with another stream open
    assert _pending(peer) == b""
    link.flush_now()  # what the writer task does at the end of the scheduler batch
    frames = _frames(_pending(peer))
    assert [f for f in frames if f[0] == 1] == [(1, 0x4, 1), (1, 0x4, 3)]
    assert (0, 0x1, 3) in frames
    peer.close()
