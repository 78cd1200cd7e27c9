"""HTTP/2 over trio: one reader task per connection, direct writes, streams as Bodies.

Knows: h2 events, flow control, stream lifetimes, keepalive, drain. Must
not: route, filter or pick upstreams (the proxy does that through the
`on_stream` callback and the pool).

Flow control is end to end: a stream's received bytes are acknowledged
(WINDOW_UPDATE) only when the reader of its body has forwarded them, so a
stream never buffers more than the receive window this side advertised.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable

import h2.events as ev
import h2.exceptions
import h2.settings
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from meshproxy.call import Peer
from meshproxy.codec.h2 import (
    ProxyH2Connection,
    initial_settings,
    request_problem,
    response_problem,
    trailers_problem,
)
from meshproxy.drivers.transport import Transport, TransportClosed

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

# RFC 9113 4.2: 16384 is the smallest maximum every peer must accept; larger
# frames save per-frame work for big bodies.
MAX_FRAME = 64 * 1024
MAX_STREAM_ID = 2**31 - 1
ASSUMED_MAX_STREAMS = 100


class Parked:
    """One task parked until another wakes it: a lighter trio.Event for one waiter.

    Waiters re-check their condition in a loop, so a wake with nobody parked
    is simply dropped.
    """

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    async def wait(self) -> None:
        assert self._task is None, "one waiter at a time"
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)


class StreamReset(Exception):
    """The peer reset the stream (or the connection went away under it)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"stream reset ({_code_name(code)})")
        self.code = code


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class Stream:
    """One HTTP/2 stream: what was received (as a Body) and how far sending got."""

    __slots__ = (
        "_waiter",
        "_window_waiter",
        "chunks",
        "ended",
        "head",
        "id",
        "link",
        "pending_ack",
        "received",
        "reset_code",
        "scope",
        "sent_end",
        "sent_head",
        "trailers",
    )

    def __init__(self, link: H2Link, stream_id: int) -> None:
        self.link = link
        self.id = stream_id
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.pending_ack = 0
        self.received = 0
        self.ended = False
        self.trailers: Headers | None = None
        self.head: Headers | None = None  # response headers (client side)
        self.reset_code: int | None = None
        self.sent_head = False
        self.sent_end = False
        self.scope: trio.CancelScope | None = None
        self._waiter = Parked()
        self._window_waiter = Parked()

    def __repr__(self) -> str:
        return (
            f"<Stream {self.id} buffered={len(self.chunks)} ended={self.ended} "
            f"sent_end={self.sent_end} reset={self.reset_code}>"
        )

    # -- the Body protocol: what the peer sent on this stream

    async def read(self) -> bytes:
        if self.pending_ack:
            self.release()
        while not self.chunks:
            if self.reset_code is not None:
                raise StreamReset(self.reset_code)
            if self.ended:
                return b""
            await self._waiter.wait()
        data, flow_controlled = self.chunks.popleft()
        self.pending_ack = flow_controlled
        return data

    def release(self) -> None:
        n, self.pending_ack = self.pending_ack, 0
        if n:
            self.link.acknowledge(self, n)

    async def wait_head(self) -> Headers:
        while self.head is None:
            if self.reset_code is not None:
                raise StreamReset(self.reset_code)
            await self._waiter.wait()
        return self.head

    def _wake(self) -> None:
        self._waiter.wake()

    def _wake_window(self) -> None:
        self._window_waiter.wake()

    @property
    def done(self) -> bool:
        """Both directions finished: nothing more will be sent or received."""
        return (self.sent_end and self.ended) or self.reset_code is not None


class H2Link:
    """The parts both roles share: reader loop, writes, windows, keepalive."""

    def __init__(
        self,
        transport: Transport,
        conn: ProxyH2Connection,
        *,
        keepalive_interval: float,
        keepalive_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.transport = transport
        self.conn = conn
        self.streams: dict[int, Stream] = {}
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.idle_timeout = idle_timeout
        self.goaway_received = False
        self.goaway_sent = False
        self.last_activity = trio.current_time()
        self._ping_ack: trio.Event | None = None
        self._idle_changed = trio.Event()
        self._window_waiters: set[Stream] = set()
        self._closing = False
        self._flush_scheduled = False
        self._flush_wake = Parked()
        self.closed = trio.Event()

    # -- writing

    def flush(self) -> None:
        """Write what h2 has queued, soon: once per scheduler batch, not per frame.

        Many calls' tasks add frames to one connection within a batch; the
        flusher task writes them all with one send() when it runs next.
        """
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._flush_wake.wake()

    def flush_end(self) -> None:
        """Flush after a stream's last frame: at once when no other stream shares this
        connection, since no other task will add to the batch and the peer is waiting.

        Otherwise the frame waited for the flusher task, i.e. for everything the
        calling task did next: a proxied call's response waited for the call's
        bookkeeping (metrics, access log, the upstream stream's release), 136 µs
        at concurrency 1 on the bench VM, and its request to the upstream for the
        rest of the call's setup, 80 µs (bench/README.md, "last frame")."""
        if len(self.streams) <= 1:
            self.flush_now()
        else:
            self.flush()

    def flush_now(self) -> None:
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    async def _writer(self) -> None:
        """Flushes h2's output once per batch, and drains the socket backlog."""
        transport = self.transport
        transport.on_backlog = self._flush_wake.wake
        while not transport.closed:
            if self._flush_scheduled:
                self.flush_now()
            if transport.has_backlog:
                await transport.drain_backlog()
            else:
                await self._flush_wake.wait()

    def acknowledge(self, stream: Stream, n: int) -> None:
        try:
            # h2 hands back only the connection window for closed streams.
            self.conn.acknowledge_received_data(n, stream.id)
        except h2.exceptions.ProtocolError:
            return
        self.flush()

    async def send_data(self, stream: Stream, data: bytes, end: bool) -> None:
        """Send `data` as the window allows; waits for WINDOW_UPDATE, never buffers more."""
        conn = self.conn
        sid = stream.id
        pending: bytes | memoryview = data
        while True:
            if stream.reset_code is not None:
                raise StreamReset(stream.reset_code)
            if self.transport.closed:
                raise StreamReset(ErrorCodes.CONNECT_ERROR, "connection closed")
            try:
                window = conn.local_flow_control_window(sid)
                frame_max = conn.max_outbound_frame_size
                size = len(pending)
                if size <= window and size <= frame_max:
                    conn.send_data(sid, pending, end_stream=end)  # type: ignore[arg-type]
                    break
                if window > 0:
                    if type(pending) is bytes:
                        pending = memoryview(pending)  # slices below copy nothing
                    n = min(window, frame_max)
                    conn.send_data(sid, pending[:n])  # type: ignore[arg-type]
                    pending = pending[n:]
                    self.flush()
                    continue
            except h2.exceptions.ProtocolError as e:
                raise StreamReset(ErrorCodes.STREAM_CLOSED, str(e)) from None
            self._window_waiters.add(stream)
            try:
                await stream._window_waiter.wait()
            finally:
                self._window_waiters.discard(stream)
        if end:
            stream.sent_end = True
            self.flush_end()
        else:
            self.flush()
        if self.transport.backlogged:
            await self.transport.drained()

    def send_headers(self, stream: Stream, headers: Headers, end: bool) -> None:
        if stream.reset_code is not None:
            raise StreamReset(stream.reset_code)
        try:
            self.conn.send_headers(stream.id, headers, end_stream=end)
        except h2.exceptions.ProtocolError as e:
            raise StreamReset(ErrorCodes.STREAM_CLOSED, str(e)) from None
        stream.sent_head = True
        if end:
            stream.sent_end = True
            self.flush_end()
        else:
            self.flush()

    def end_stream(self, stream: Stream) -> None:
        if not stream.sent_end and stream.reset_code is None:
            try:
                self.conn.end_stream(stream.id)
            except h2.exceptions.ProtocolError as e:
                raise StreamReset(ErrorCodes.STREAM_CLOSED, str(e)) from None
            stream.sent_end = True
            self.flush_end()

    def reset(self, stream: Stream, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM (if the stream is still open) and forget the stream."""
        if stream.reset_code is None and not (stream.sent_end and stream.ended):
            try:
                self.conn.reset_stream(stream.id, code)
            except h2.exceptions.ProtocolError:
                pass
            stream.reset_code = code
            stream._wake()
            stream._wake_window()
            self.flush()
        self.forget(stream)

    def forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        # Buffered data that will never be read still counts against the
        # connection window: hand it back.
        unread = sum(fc for _, fc in stream.chunks) + stream.pending_ack
        stream.chunks.clear()
        stream.pending_ack = 0
        if unread:
            self.conn.acknowledge_received_data(unread, stream.id)
        self.conn.forget_stream(stream.id)
        self.flush()
        if not self.streams:
            self._idle_changed.set()
            self._idle_changed = trio.Event()

    # -- reading

    async def run(self) -> None:
        """Reader loop + keepalive + writer, until the connection ends."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                try:
                    await self._read_loop()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._connection_lost()

    async def _read_loop(self) -> None:
        transport = self.transport
        conn = self.conn
        while True:
            try:
                data = await transport.recv()
            except TransportClosed:
                return
            if not data:
                return
            self.last_activity = trio.current_time()
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                self.on_protocol_error(e)
                self.flush_now()  # the GOAWAY h2 prepared
                await transport.flush_and_close(1.0, f"protocol error: {e}")
                return
            for event in events:
                self.dispatch(event)
            self.flush_now()
            if self._closing and not self.streams:
                await transport.flush_and_close(1.0, "drained")
                return

    def dispatch(self, event: ev.Event) -> None:
        t = type(event)
        if t is ev.DataReceived:
            stream = self.streams.get(event.stream_id)
            if stream is None:
                # A stream we are done with: give the window back at once.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream.chunks.append((event.data, event.flow_controlled_length))
            stream.received += len(event.data)
            if event.stream_ended is not None:
                stream.ended = True
            stream._wake()
        elif t is ev.StreamEnded:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.ended = True
                stream._wake()
        elif t is ev.RequestReceived:
            self.on_request(event)
        elif t is ev.ResponseReceived:
            self.on_response(event)
        elif t is ev.TrailersReceived:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                problem = trailers_problem(event.headers)
                if problem:
                    self.stream_protocol_error(stream, problem)
                    return
                stream.trailers = event.headers
                stream.ended = True
                stream._wake()
        elif t is ev.StreamReset:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.reset_code = event.error_code
                stream._wake()
                stream._wake_window()
                self.on_reset(stream)
                self.forget(stream)
        elif t is ev.WindowUpdated:
            if event.stream_id == 0:
                for s in list(self._window_waiters):
                    s._wake_window()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._wake_window()
        elif t is ev.RemoteSettingsChanged:
            for s in list(self._window_waiters):
                s._wake_window()
            self.on_settings()
        elif t is ev.PingAckReceived:
            if self._ping_ack is not None:
                self._ping_ack.set()
        elif t is ev.ConnectionTerminated:
            self.on_goaway(event)
        elif t is ev.InformationalResponseReceived:
            pass  # 1xx: meshproxy does not forward interim responses

    def on_request(self, event: ev.RequestReceived) -> None:
        self.conn.reset_stream(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def on_response(self, event: ev.ResponseReceived) -> None:
        self.conn.reset_stream(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def on_reset(self, stream: Stream) -> None:
        pass

    def on_settings(self) -> None:
        pass

    def on_goaway(self, event: ev.ConnectionTerminated) -> None:
        self.goaway_received = True

    def on_protocol_error(self, error: Exception) -> None:
        pass

    def stream_protocol_error(self, stream: Stream, problem: str) -> None:
        log.info("stream %d: protocol error from %s: %s", stream.id, self.transport.peer, problem)
        self.reset(stream, ErrorCodes.PROTOCOL_ERROR)

    def _connection_lost(self) -> None:
        self.transport.close(self.transport.closed_reason or "connection ended")
        for stream in list(self.streams.values()):
            if stream.reset_code is None:
                stream.reset_code = ErrorCodes.CONNECT_ERROR
            stream._wake()
            stream._wake_window()
            self.on_reset(stream)
        self.streams.clear()
        self._idle_changed.set()
        self.closed.set()

    # -- keepalive, idle, drain

    async def _keepalive(self) -> None:
        """PING an idle peer; no ACK within the timeout means it is gone."""
        interval = self.keepalive_interval
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            if not self.streams and now - self.last_activity >= self.idle_timeout:
                await self.close_gracefully("idle timeout")
                return
            if now - self.last_activity < interval:
                continue
            self._ping_ack = trio.Event()
            self.conn.ping(b"meshprox")
            self.flush()
            with trio.move_on_after(self.keepalive_timeout):
                await self._ping_ack.wait()
                continue
            log.info("connection to %s: no PING ACK in %.1fs, closing", self.transport.peer, self.keepalive_timeout)
            self.transport.close("keepalive timeout")
            return

    def send_goaway(self, last_stream_id: int, code: int = ErrorCodes.NO_ERROR) -> None:
        # Built by hand: h2's close_connection() would refuse every later frame
        # of the streams that are still finishing.
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=code)
        self.conn._prepare_for_sending([frame])
        self.goaway_sent = True
        self.flush()

    async def close_gracefully(self, reason: str, timeout: float = math.inf) -> None:
        """GOAWAY, let open streams finish (up to `timeout`), then close."""
        self._closing = True
        if not self.goaway_sent and not self.transport.closed:
            self.send_goaway(self.conn.highest_inbound_stream_id)
        with trio.move_on_after(timeout):
            while self.streams and not self.transport.closed:
                await self._idle_changed.wait()
        self.flush_now()
        await self.transport.flush_and_close(1.0, reason)


def _open_connection(
    client_side: bool, max_streams: int, stream_window: int, connection_window: int, max_header_list_size: int
) -> ProxyH2Connection:
    """A ProxyH2Connection with our SETTINGS queued and the connection window grown."""
    conn = ProxyH2Connection(client_side=client_side, max_header_list_size=max_header_list_size)
    conn.local_settings = h2.settings.Settings(client=client_side, initial_values=initial_settings(
        max_concurrent_streams=max_streams,
        initial_window=stream_window,
        max_header_list_size=max_header_list_size,
        max_frame=MAX_FRAME,
    ))
    conn.initiate_connection()
    # The settings were set as current values (not pending an ACK), so h2's
    # copy of the frame size limit is set here too.
    conn.max_inbound_frame_size = MAX_FRAME
    # RFC 9113 6.9.2: the connection window starts at 65535 whatever SETTINGS say.
    grow = connection_window - conn.inbound_flow_control_window
    if grow > 0:
        conn.increment_flow_control_window(grow)
    return conn


# ---------------------------------------------------------------------------
# Downstream: the server role.

StreamHandler = Callable[["ServerLink", Stream, Headers], Awaitable[None]]


class ServerLink(H2Link):
    """A downstream HTTP/2 connection: each valid request becomes a handler task."""

    def __init__(
        self,
        transport: Transport,
        *,
        handler: StreamHandler,
        max_concurrent_streams: int,
        max_header_list_size: int,
        stream_window: int,
        connection_window: int,
        keepalive_interval: float,
        keepalive_timeout: float,
        idle_timeout: float,
        on_protocol_error: Callable[[str], None] | None = None,
    ) -> None:
        conn = _open_connection(
            False, max_concurrent_streams, stream_window, connection_window, max_header_list_size
        )
        super().__init__(
            transport, conn,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            idle_timeout=idle_timeout,
        )
        self.handler = handler
        self.max_concurrent_streams = max_concurrent_streams
        self._nursery: trio.Nursery | None = None
        self._report = on_protocol_error
        # The same for every call on the connection: made once.
        self.peer = Peer(transport.peer, transport.identity, transport.security)

    async def serve(self) -> None:
        self.flush()  # our preface SETTINGS
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self.run()
            finally:
                nursery.cancel_scope.cancel()

    def on_request(self, event: ev.RequestReceived) -> None:
        sid = event.stream_id
        if self._closing:
            # RFC 9113 6.8: streams above the GOAWAY's last-stream-id are ignored;
            # refuse them so the client may retry elsewhere.
            self.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            self.conn.forget_stream(sid)
            return
        if len(self.streams) >= self.max_concurrent_streams:
            # RFC 9113 5.1.2: over our SETTINGS_MAX_CONCURRENT_STREAMS; refuse
            # this stream only, the client may retry it.
            if self._report:
                self._report("stream")
            self.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            self.conn.forget_stream(sid)
            return
        stream = Stream(self, sid)
        if event.stream_ended is not None:
            stream.ended = True
        self.streams[sid] = stream
        problem = request_problem(event.headers)
        if problem:
            if self._report:
                self._report("stream")
            self.stream_protocol_error(stream, problem)
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._run_handler, stream, event.headers)

    async def _run_handler(self, stream: Stream, headers: Headers) -> None:
        # The handler puts its work under a CancelScope it stores in
        # `stream.scope` (one scope also carries the call's deadline), so a
        # RST_STREAM from the client cancels it.
        try:
            await self.handler(self, stream, headers)
        finally:
            stream.scope = None
            self.finish(stream)

    def finish(self, stream: Stream) -> None:
        """The handler is done: close what it left open, then forget the stream."""
        if stream.id not in self.streams:
            return
        if not stream.sent_end:
            self.reset(stream, ErrorCodes.CANCEL if stream.sent_head else ErrorCodes.INTERNAL_ERROR)
        elif not stream.ended and stream.reset_code is None:
            # RFC 9113 8.1: the response is complete before the request; tell
            # the client to stop sending the rest of it.
            self.reset(stream, ErrorCodes.NO_ERROR)
        else:
            self.forget(stream)

    def on_reset(self, stream: Stream) -> None:
        if stream.scope is not None:
            stream.scope.cancel()

    def on_protocol_error(self, error: Exception) -> None:
        log.info("connection from %s: protocol error: %s", self.transport.peer, error)
        if self._report:
            self._report("connection")

    def on_goaway(self, event: ev.ConnectionTerminated) -> None:
        self.goaway_received = True
        self._closing = True


# ---------------------------------------------------------------------------
# Upstream: the client role.


class ClientLink(H2Link):
    """An upstream HTTP/2 connection that carries many calls' streams."""

    def __init__(
        self,
        transport: Transport,
        *,
        endpoint: str,
        max_header_list_size: int,
        stream_window: int,
        connection_window: int,
        keepalive_interval: float,
        keepalive_timeout: float,
        idle_timeout: float,
        on_protocol_error: Callable[[], None] | None = None,
    ) -> None:
        # max_concurrent_streams: the server cannot push (ENABLE_PUSH is 0), so
        # this only matters to a misbehaving one.
        conn = _open_connection(True, 1000, stream_window, connection_window, max_header_list_size)
        super().__init__(
            transport, conn,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            idle_timeout=idle_timeout,
        )
        self.endpoint = endpoint
        self.settings_received = trio.Event()
        self.capacity_changed: Callable[[], None] = lambda: None
        self._report = on_protocol_error
        self.flush()

    def __repr__(self) -> str:
        return (
            f"<ClientLink {self.endpoint} streams={len(self.streams)}/{self.max_streams} "
            f"goaway={self.goaway_received} closed={self.transport.closed}>"
        )

    @property
    def max_streams(self) -> int:
        limit: int = self.conn.remote_settings.max_concurrent_streams
        if not self.settings_received.is_set():
            # Until the server's SETTINGS arrive its limit is unknown (RFC 9113
            # 6.5.2: "initially, there is no limit"); assume the 100 that
            # section 6.5.2 recommends as a minimum, so a burst of calls on a
            # new connection is not refused.
            return min(limit, ASSUMED_MAX_STREAMS)
        return limit

    @property
    def available(self) -> int:
        """How many more streams this connection takes now."""
        if self.goaway_received or self._closing or self.transport.closed:
            return 0
        if self.conn.highest_outbound_stream_id >= MAX_STREAM_ID - 2:
            return 0  # stream ids exhausted: a new connection is needed
        return self.max_streams - len(self.streams)

    def start_stream(self, headers: Headers, end: bool) -> Stream:
        """Open a stream and send its request headers (the caller checked `available`)."""
        sid = self.conn.get_next_available_stream_id()
        stream = Stream(self, sid)
        self.streams[sid] = stream
        try:
            self.send_headers(stream, headers, end)
        except StreamReset:
            self.forget(stream)  # else it would hold one of the connection's stream slots for good
            raise
        return stream

    def on_response(self, event: ev.ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        problem = response_problem(event.headers)
        if problem:
            if self._report:
                self._report()
            self.stream_protocol_error(stream, problem)
            return
        stream.head = event.headers
        if event.stream_ended is not None:
            stream.ended = True
        stream._wake()

    def on_settings(self) -> None:
        self.settings_received.set()
        self.capacity_changed()

    def forget(self, stream: Stream) -> None:
        super().forget(stream)
        if self._closing and not self.streams:
            self.flush_now()
            self.transport.close("GOAWAY received and every stream done")
        self.capacity_changed()

    def on_goaway(self, event: ev.ConnectionTerminated) -> None:
        self.goaway_received = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream in list(self.streams.values()):
            if stream.id > last:
                # RFC 9113 6.8: not processed by the peer; safe to retry.
                stream.reset_code = ErrorCodes.REFUSED_STREAM
                stream._wake()
                stream._wake_window()
                self.forget(stream)
        self._closing = True
        self.capacity_changed()

    def on_protocol_error(self, error: Exception) -> None:
        log.warning("upstream %s: protocol error: %s", self.endpoint, error)
        if self._report:
            self._report()

