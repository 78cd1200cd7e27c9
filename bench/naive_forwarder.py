"""A naive trio + h2 HTTP/2 (h2c, prior knowledge) reverse proxy: the bench baseline.

This is the "naive trio + h2 forwarder" of PERF-NOTES: straightforward use of h2 with
its default configuration (header validation and normalisation on, default loggers),
one shared upstream h2c connection to the origin (re-opened if it dies), one task per
downstream stream, headers / data / trailers / resets forwarded both ways, and flow
control honoured on both legs (received DATA is acknowledged only after it has been
passed on, so every buffer is bounded by the HTTP/2 windows).

    python3 bench/naive_forwarder.py --listen 127.0.0.1:8001 --upstream 127.0.0.1:8000

It is deliberately unoptimised: it is what a careful first version looks like.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

READ_SIZE = 65536
SEND_TIMEOUT = 30.0  # seconds a write may wait for the peer to read


class StreamGone(Exception):
    """The stream (or its whole connection) is closed or reset."""


class Peer:
    """One HTTP/2 connection (either side): the h2 state machine plus its socket."""

    def __init__(self, sock: trio.SocketStream, client_side: bool) -> None:
        self.sock = sock
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        )
        self.send_lock = trio.Lock()
        self.streams: dict[int, trio.MemorySendChannel] = {}
        self.changed = trio.Event()  # window update, stream closed, settings, conn closed
        self.closed = False

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def flush(self) -> None:
        # Shielded: the bytes in h2's buffer may belong to other streams (the upstream
        # connection is shared), so a task cancelled here must not half-write them. Taking
        # them under the lock lets one write carry what several tasks produced.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_TIMEOUT) as scope:
            async with self.send_lock:
                data = self.conn.data_to_send()
                if data and not self.closed:
                    try:
                        await self.sock.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self.lost()
        if scope.cancelled_caught:  # the peer stopped reading: give the connection up
            self.lost()
            self.sock.socket.close()

    def lost(self) -> None:
        """The connection is gone: end every stream's event channel."""
        self.closed = True
        for ch in self.streams.values():
            ch.close()
        self.streams.clear()
        self.wake()

    def dispatch(self, ev: h2.events.Event) -> None:
        """Route one h2 event to its stream's channel (common to both sides)."""
        sid = getattr(ev, "stream_id", None)
        if isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.wake()
        elif isinstance(ev, (h2.events.DataReceived, h2.events.TrailersReceived,
                             h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
            ch = self.streams.get(sid)
            if ch is not None:
                ch.send_nowait(ev)
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
            ch = self.streams.pop(sid, None)
            if ch is not None:
                ch.send_nowait(ev)
                ch.close()
            self.wake()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.wake()

    async def send_headers(self, sid: int, headers, end: bool) -> None:
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise StreamGone from e
        await self.flush()

    async def send_data(self, sid: int, data: bytes, end: bool) -> None:
        """Send DATA, waiting for flow-control window as needed."""
        if not data:
            if end:
                await self.end_stream(sid)
            return
        view = memoryview(data)
        while view:
            while True:
                if self.closed:
                    raise StreamGone
                try:
                    window = self.conn.local_flow_control_window(sid)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
                    raise StreamGone from e
                n = min(window, self.conn.max_outbound_frame_size, len(view))
                if n > 0:
                    break
                await self.changed.wait()
            chunk, view = view[:n], view[n:]
            try:
                self.conn.send_data(sid, bytes(chunk), end_stream=end and not view)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
                raise StreamGone from e
            await self.flush()

    async def end_stream(self, sid: int) -> None:
        try:
            self.conn.end_stream(sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise StreamGone from e
        await self.flush()

    async def reset(self, sid: int, code: int = 8) -> None:  # 8 = CANCEL
        self.streams.pop(sid, None)
        try:
            self.conn.reset_stream(sid, error_code=code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.wake()
        await self.flush()

    async def ack(self, sid: int, n: int) -> None:
        if n and not self.closed:
            self.conn.acknowledge_received_data(n, sid)
            await self.flush()


class Upstream(Peer):
    """The client side of one h2c connection to the origin."""

    def __init__(self, sock: trio.SocketStream) -> None:
        super().__init__(sock, client_side=True)
        self.goaway = False

    async def start(self, nursery: trio.Nursery) -> None:
        self.conn.initiate_connection()
        await self.flush()
        nursery.start_soon(self.reader)

    async def reader(self) -> None:
        try:
            while True:
                data = await self.sock.receive_some(READ_SIZE)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    await self.flush()
                    break
                for ev in events:
                    if isinstance(ev, h2.events.ConnectionTerminated):
                        self.goaway = True
                    self.dispatch(ev)
                await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.goaway = True
            self.lost()
            await self.sock.aclose()

    @property
    def usable(self) -> bool:
        return not (self.closed or self.goaway)

    async def open_stream(self, headers, end: bool):
        """Open a stream (waiting for a free stream slot) and return (id, event channel)."""
        while True:
            if not self.usable:
                raise StreamGone
            limit = self.conn.remote_settings.max_concurrent_streams
            if self.conn.open_outbound_streams < limit:
                break
            await self.changed.wait()
        sid = self.conn.get_next_available_stream_id()
        send, recv = trio.open_memory_channel(math.inf)
        self.streams[sid] = send
        await self.send_headers(sid, headers, end)
        return sid, recv


class Forwarder:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.host = upstream_host
        self.port = upstream_port
        self.upstream: Upstream | None = None
        self.connect_lock = trio.Lock()
        self.nursery: trio.Nursery | None = None

    async def get_upstream(self) -> Upstream:
        async with self.connect_lock:
            if self.upstream is None or not self.upstream.usable:
                sock = await trio.open_tcp_stream(self.host, self.port)
                up = Upstream(sock)
                await up.start(self.nursery)
                self.upstream = up
            return self.upstream

    async def serve(self, host: str, port: int) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(functools.partial(trio.serve_tcp, self.handle, port, host=host))
            print(f"naive forwarder listening on {host}:{port}", file=sys.stderr, flush=True)

    async def handle(self, sock: trio.SocketStream) -> None:
        down = Peer(sock, client_side=False)
        down.conn.initiate_connection()
        await down.flush()
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    data = await sock.receive_some(READ_SIZE)
                    if not data:
                        break
                    try:
                        events = down.conn.receive_data(data)
                    except h2.exceptions.ProtocolError:
                        await down.flush()
                        break
                    for ev in events:
                        if isinstance(ev, h2.events.RequestReceived):
                            send, recv = trio.open_memory_channel(math.inf)
                            down.streams[ev.stream_id] = send
                            nursery.start_soon(self.proxy_stream, down, ev, recv)
                        elif isinstance(ev, h2.events.ConnectionTerminated):
                            down.dispatch(ev)
                            break
                        else:
                            down.dispatch(ev)
                    await down.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                down.lost()
                nursery.cancel_scope.cancel()
        await sock.aclose()

    async def proxy_stream(self, down: Peer, req: h2.events.RequestReceived, rx) -> None:
        sid = req.stream_id
        st = StreamState(req.stream_ended is not None)
        try:
            up = await self.get_upstream()
            up_sid, up_rx = await up.open_stream(req.headers, end=st.request_done)
        except (OSError, StreamGone):
            try:
                await down.send_headers(sid, [(b":status", b"502")], end=True)
            except StreamGone:
                pass
            return
        try:
            if st.request_done:  # e.g. a GET: nothing more to send upstream
                await self.pump_response(down, sid, up, up_sid, up_rx, st)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.pump_request, down, sid, up, up_sid, rx, st,
                                   nursery.cancel_scope)
                await self.pump_response(down, sid, up, up_sid, up_rx, st)
                nursery.cancel_scope.cancel()
        finally:
            if not (st.request_done and st.response_done):
                # Cancelled, reset, or answered before the request ended. Give back the
                # flow-control window of DATA received but never passed on (else each
                # aborted stream shrinks the connection's window for good), and free the slot.
                down_left = st.down_unacked + unconsumed(rx)
                up_left = st.up_unacked + unconsumed(up_rx)
                if down_left and not down.closed:
                    down.conn.acknowledge_received_data(down_left, sid)
                if up_left and not up.closed:
                    up.conn.acknowledge_received_data(up_left, up_sid)
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await up.reset(up_sid)
                    await down.flush()

    async def pump_request(self, down, sid, up, up_sid, rx, st, scope) -> None:
        """Client -> origin: DATA, trailers, end of stream, reset."""
        try:
            async for ev in rx:
                if isinstance(ev, h2.events.DataReceived):
                    st.down_unacked += ev.flow_controlled_length
                    await up.send_data(up_sid, ev.data, end=False)
                    st.down_unacked -= ev.flow_controlled_length
                    await down.ack(sid, ev.flow_controlled_length)
                elif isinstance(ev, h2.events.TrailersReceived):
                    await up.send_headers(up_sid, ev.headers, end=True)
                    st.request_done = True
                elif isinstance(ev, h2.events.StreamEnded):
                    if not st.request_done:
                        await up.end_stream(up_sid)
                        st.request_done = True
                    return
                elif isinstance(ev, h2.events.StreamReset):
                    break
        except StreamGone:
            await down.reset(sid)
        # reset by the client, or its connection is gone: cancel the call
        scope.cancel()

    async def pump_response(self, down, sid, up, up_sid, rx, st) -> None:
        """Origin -> client: headers, DATA, trailers, end of stream, reset."""
        ended = False
        try:
            async for ev in rx:
                if isinstance(ev, h2.events.ResponseReceived):
                    ended = ev.stream_ended is not None
                    await down.send_headers(sid, ev.headers, end=ended)
                elif isinstance(ev, h2.events.InformationalResponseReceived):
                    await down.send_headers(sid, ev.headers, end=False)
                elif isinstance(ev, h2.events.DataReceived):
                    ended = ev.stream_ended is not None
                    st.up_unacked += ev.flow_controlled_length
                    await down.send_data(sid, ev.data, end=ended)
                    st.up_unacked -= ev.flow_controlled_length
                    await up.ack(up_sid, ev.flow_controlled_length)
                elif isinstance(ev, h2.events.TrailersReceived):
                    await down.send_headers(sid, ev.headers, end=True)
                    ended = True
                elif isinstance(ev, h2.events.StreamEnded):
                    if not ended:
                        await down.end_stream(sid)
                    st.response_done = True
                    return
                elif isinstance(ev, h2.events.StreamReset):
                    st.response_done = True  # the origin's stream is gone already
                    st.request_done = True
                    await down.reset(sid, ev.error_code)
                    return
            # channel closed without an end: the upstream connection is gone
            await down.reset(sid, 2)  # INTERNAL_ERROR
        except StreamGone:
            await down.reset(sid)


class StreamState:
    __slots__ = ("down_unacked", "request_done", "response_done", "up_unacked")

    def __init__(self, request_done: bool) -> None:
        self.request_done = request_done
        self.response_done = False
        self.down_unacked = 0  # DATA taken from a channel, not yet acknowledged
        self.up_unacked = 0


def unconsumed(rx: trio.MemoryReceiveChannel) -> int:
    """Flow-controlled bytes of the DATA events still queued in a stream's channel."""
    n = 0
    while True:
        try:
            ev = rx.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return n
        if isinstance(ev, h2.events.DataReceived):
            n += ev.flow_controlled_length


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to listen on (h2c)")
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the h2c origin")
    args = ap.parse_args(argv)
    lhost, lport = hostport(args.listen)
    uhost, uport = hostport(args.upstream)
    try:
        trio.run(Forwarder(uhost, uport).serve, lhost, lport)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
