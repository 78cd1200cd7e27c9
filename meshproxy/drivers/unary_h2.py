"""The trio driver of codec/unary_h2: lean HTTP/2 connections for small unary
exchanges (the risk callout), one exchange or one batch of them per connection
at a time, kept idle per endpoint for reuse.

Knows: sockets, trio's readiness waits, and which failures mean "the request
was not processed" (a refused stream, a GOAWAY below it, a reused connection
that failed the first send), so one fresh attempt is safe; a connection that
closes after the request left is a failure, never resent (the server may have
processed it). Must not: pick endpoints or decide
what a failure means to a call.

The calling task does its own socket I/O: the request goes out with one
send() and the task waits for the reply on its own socket, so an exchange
costs one wake-up, with no reader task and no batched writer in between. A
batch (`exchange_many`) sends all its requests as streams in that one send
and waits for all the replies, so the send, the wake-ups and the trio
machinery are paid once for the batch. Deadlines are kept by one watch task
per set of connections (`_Deadlines`), not by a cancel scope per exchange.
Plaintext only: a TLS cluster uses the proxy's h2 path.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import math
import socket

import trio

from meshproxy.codec.unary_h2 import (
    CANCEL,
    MAX_IN_FLIGHT,
    REFUSED_STREAM,
    ExchangeFailed,
    MalformedReply,
    ReplyTooLong,
    Response,
    StreamRefused,
    StreamReset,
    UnaryClient,
)
from meshproxy.drivers.transport import connect
from meshproxy.values import Address

__all__ = ["Closed", "ExchangeFailed", "MalformedReply", "NotReconnected", "ReplyTooLong", "Response", "StreamRefused",
           "StreamReset", "TimedOut", "UnaryConnections"]

log = logging.getLogger(__name__)

RECV_SIZE = 64 * 1024
# Idle connections kept per endpoint; more concurrent exchanges than this open
# connections that are closed after use.
MAX_IDLE = 16
# An idle connection older than this is closed rather than reused: servers
# close idle HTTP/2 connections (nginx after 3 min, grpc-go after its max idle).
IDLE_TIMEOUT = 30.0
# Endpoints whose stream limit is remembered; past this the memory starts over (it is only a hint).
MAX_LIMITS_KEPT = 1024
# Ended exchanges' deadlines kept in the heap past the armed ones plus this many: it is rebuilt.
COMPACT_AFTER = 1024
# The deadline watch ends after this long with nothing armed (the next exchange starts it again).
WATCH_IDLE = 5.0
# A plain int: `|` of the socket module's IntFlag members costs about 3 µs, on every reuse.
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


class Closed(ExchangeFailed):
    """The connection closed or reset under the exchange."""


class _Stale(Closed):
    """A reused connection failed the request's first send: the request was not processed."""


class NotReconnected(StreamRefused):
    """Refused (not processed), and the fresh connection to send it on again failed to connect."""


class TimedOut(ExchangeFailed):
    """The deadline passed: no connection by then (raised), or no reply (a Response's error)."""


class UnaryConnection:
    __slots__ = ("broken", "codec", "deadline", "idle_since", "sock", "timed_out")

    def __init__(self, sock: socket.socket, max_streams: int = MAX_IN_FLIGHT) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.codec = UnaryClient(0, max_streams=max_streams)
        self.idle_since = 0.0
        self.deadline = math.inf  # of the exchange in progress (armed in a _Deadlines)
        self.timed_out = False  # a reply is still owed: the connection is not reused
        self.broken = False  # it failed after the replies that stand: not reused either

    async def exchange(self, requests: list[tuple[list[tuple[bytes, bytes]], bytes]], max_reply: int,
                       reused: bool, deadline: float, deadlines: _Deadlines) -> list[Response]:
        """Send `requests` (headers, body) as streams, as many at once as the server allows,
        the rest as streams end; their Responses once all have ended or `deadline` passed.

        A stream that failed alone ends with its Response's `error` (a reset, a
        reply too long, TimedOut at the deadline, StreamRefused if a GOAWAY or a
        stream limit of 0 left it unsent, Closed if the connection closed under
        it: the replies that ended before stand); a failed connection raises
        (Closed, ExchangeFailed)."""
        codec = self.codec
        codec.max_reply = max_reply
        responses: list[Response] = []
        n = len(requests)
        stale = reused  # a reused connection that takes none of the first bytes: nothing was processed
        deadlines.arm(self, deadline)
        try:
            while not self.timed_out:  # set while this task was not waiting: nothing more starts
                while len(responses) < n and codec.usable:
                    headers, body = requests[len(responses)]
                    responses.append(codec.request(headers, body))
                out = codec.data_to_send()
                if codec.idle and len(responses) == n:
                    if out:  # only control frames are owed (a PING ACK, a WINDOW_UPDATE): the replies stand
                        self._send_leftover(out)
                    return responses
                if out:
                    try:
                        await self._send(out, stale)
                    except _Stale:
                        raise  # nothing was processed: the caller sends it all again
                    except Closed as e:  # a later write: what ended stands, as when a read fails
                        return self._lost(responses, n, e)
                    stale = False
                if codec.idle and not codec.usable:
                    # The rest can never start here (a GOAWAY, a stream limit of 0, which RFC 9113
                    # allows, or stream ids run out), and were never sent.
                    refused = StreamRefused(REFUSED_STREAM, "the server takes no more streams: not sent")
                    return responses + [Response(ended=True, error=refused) for _ in range(n - len(responses))]
                if self.timed_out:
                    break
                # The reply cannot be here the moment the request left: wait first, then read.
                await trio.lowlevel.wait_readable(self.sock)
                try:
                    data = self.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as e:
                    return self._lost(responses, n, Closed(0, _error("recv", e)))
                if not data:
                    return self._lost(responses, n, Closed(0, "connection closed by the server"))
                codec.receive(data)
        except trio.ClosedResourceError:  # _Deadlines woke the wait (notify_closing)
            if not self.timed_out:
                raise
        finally:
            deadlines.disarm(self)
        # The deadline passed: what ended stands, the rest times out, and the connection is not reused.
        late = TimedOut(CANCEL, "no reply by the deadline")
        for response in responses:
            if not response.ended:
                response.error, response.ended = late, True
        return responses + [Response(ended=True, error=late) for _ in range(n - len(responses))]

    def _lost(self, responses: list[Response], n: int, error: Closed) -> list[Response]:
        """The connection closed under the exchange: the replies that ended stand, the streams
        still open fail with `error` (they may have been processed), and the unsent are refused."""
        self.broken = True
        for response in responses:
            if not response.ended:
                response.error, response.ended = error, True
        unsent = StreamRefused(REFUSED_STREAM, "the connection closed: not sent")
        return responses + [Response(ended=True, error=unsent) for _ in range(n - len(responses))]

    def _send_leftover(self, data: bytes) -> None:
        """Control frames owed once every reply ended: sent if the socket takes them whole at once,
        else the connection's state is unknown and it is not reused; the replies stand either way."""
        try:
            if self.sock.send(data) == len(data):
                return
        except OSError:  # BlockingIOError too
            pass
        self.broken = True

    async def _send(self, data: bytes, stale: bool) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                if self.timed_out:  # the deadline passed while this task was not waiting
                    raise trio.ClosedResourceError from None
                await trio.lowlevel.wait_writable(self.sock)
            except OSError as e:
                cls = _Stale if stale and len(view) == len(data) else Closed
                raise cls(0, _error("send", e)) from None

    def looks_open(self) -> bool:
        """No EOF or error waiting on the socket (bytes waiting, such as a PING, are fine)."""
        try:
            return self.sock.recv(1, _PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        try:
            trio.lowlevel.notify_closing(self.sock)
        except (ValueError, RuntimeError):
            pass
        self.sock.close()


def _age(idle: collections.deque[UnaryConnection], now: float) -> None:
    """Close the connections idle for IDLE_TIMEOUT, the oldest first: after a burst, the extra ones age out."""
    while idle and now - idle[0].idle_since >= IDLE_TIMEOUT:
        idle.popleft().close()


def _error(what: str, e: OSError) -> str:
    return f"{what}: {errno.errorcode.get(e.errno or 0, e)}"


class _Deadlines:
    """Times out lean exchanges without a trio cancel scope each.

    Entering and leaving a CancelScope cost about 25 µs of CPU per check on
    the bench VM, a tenth of the whole check. Instead an exchange arms its
    deadline here, and one system task sleeps until the earliest armed one
    and wakes the exchanges past theirs with notify_closing() on their socket
    (their wait raises ClosedResourceError; the exchange ends as timed out
    and the connection is dropped). Entries of exchanges that ended stay in
    the heap until they reach its top; it is rebuilt when they outnumber the
    armed ones by COMPACT_AFTER. The task ends WATCH_IDLE after the last
    exchange ended, and starts again with the next one.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, UnaryConnection]] = []
        self._order = itertools.count()  # ties: connections do not compare
        self._armed = 0
        self._scope: trio.CancelScope | None = None
        self._running = False

    def arm(self, conn: UnaryConnection, deadline: float) -> None:
        conn.timed_out = False
        if not deadline < math.inf:  # none (or NaN): nothing to watch; inf also means disarmed
            return
        if not self._running:
            trio.lowlevel.spawn_system_task(self._watch, name="lean connection deadlines")
            self._running = True
        elif self._scope is not None and deadline < self._scope.deadline:
            self._scope.deadline = deadline
        conn.deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), conn))
        self._armed += 1
        if len(self._heap) > 2 * self._armed + COMPACT_AFTER:
            self._heap = [e for e in self._heap if e[2].deadline == e[0]]
            heapq.heapify(self._heap)

    def disarm(self, conn: UnaryConnection) -> None:
        if conn.deadline != math.inf:
            conn.deadline = math.inf
            self._armed -= 1

    async def _watch(self) -> None:
        idle_since: float | None = None
        try:
            while True:
                heap = self._heap
                while heap and heap[0][2].deadline != heap[0][0]:
                    heapq.heappop(heap)  # the exchange ended (or its connection was armed again)
                now = trio.current_time()
                if heap:
                    idle_since, wake_at = None, heap[0][0]
                else:  # a while without work before ending: a task per check would cost what a scope does
                    if idle_since is None:
                        idle_since = now
                    if now - idle_since >= WATCH_IDLE:
                        return
                    wake_at = idle_since + WATCH_IDLE
                with trio.CancelScope(deadline=wake_at) as self._scope:
                    await trio.sleep_forever()
                self._scope = None
                now = trio.current_time()
                heap = self._heap
                while heap and heap[0][0] <= now:
                    deadline, _, conn = heapq.heappop(heap)
                    if conn.deadline == deadline:
                        self._fire(conn)
        except Exception:  # a system task's exception would end the process
            log.exception("lean connection deadlines: the watch failed; timing out what it watched")
            for _, _, conn in self._heap:
                if conn.deadline != math.inf:
                    self._fire(conn)
            self._heap.clear()
        finally:
            self._scope = None
            self._running = False

    def _fire(self, conn: UnaryConnection) -> None:
        self.disarm(conn)
        conn.timed_out = True
        try:
            trio.lowlevel.notify_closing(conn.sock)  # its wait, if any, raises ClosedResourceError
        except (ValueError, OSError):  # closed meanwhile: nothing waits on it
            pass


class UnaryConnections:
    """Idle lean connections by endpoint, at most MAX_IDLE each (a cluster owns one set, and closes it)."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[Address, collections.deque[UnaryConnection]] = {}
        # Each endpoint's SETTINGS_MAX_CONCURRENT_STREAMS, as its last connection said: a new
        # connection starts no more streams than that before the server's SETTINGS arrive.
        self._limits: dict[Address, int] = {}
        self.busy = 0  # exchanges (a batch each) in progress, each on a connection of its own
        self._deadlines = _Deadlines()
        self._closed = False  # the cluster is gone: connections are closed after use, not kept
        self._swept = -math.inf

    async def exchange_many(self, address: Address, requests: list[tuple[list[tuple[bytes, bytes]], bytes]],
                            max_reply: int, deadline: float) -> list[Response]:
        """The responses from `address` to `requests` (at most MAX_IN_FLIGHT), sent on one
        connection, by the trio time `deadline`.

        A stream that failed alone ends with its Response's `error`; a refused
        one (not processed) is sent once more on a fresh connection first, and
        stays refused if that fails (NotReconnected if it could not connect,
        TimedOut if the deadline passed first).
        Raises, for the whole batch: OSError / trio.TooSlowError (connect),
        TimedOut (no connection by the deadline), or ExchangeFailed (the
        connection failed).
        """
        if not 0 < len(requests) <= MAX_IN_FLIGHT:
            raise ValueError(f"a batch is 1 to {MAX_IN_FLIGHT} requests, not {len(requests)}")
        self.busy += 1
        try:
            responses = await self._exchange(address, requests, max_reply, deadline)
            refused = [i for i, r in enumerate(responses) if isinstance(r.error, StreamRefused)]
            if refused:
                try:
                    again = await self._exchange(address, [requests[i] for i in refused], max_reply, deadline,
                                                 fresh=True)
                except (OSError, trio.TooSlowError) as e:  # the first round's answers stand
                    unsent = NotReconnected(
                        REFUSED_STREAM, f"refused, and the connection to send it again failed: {e or type(e).__name__}")
                    for i in refused:
                        responses[i] = Response(ended=True, error=unsent)
                except TimedOut as e:  # no connection by the deadline: timed out, as if it had been sent
                    for i in refused:
                        responses[i] = Response(ended=True, error=e)
                except ExchangeFailed:
                    pass  # the fresh connection failed (a protocol error): the refused stay refused
                else:
                    for i, response in zip(refused, again, strict=True):
                        responses[i] = response
            return responses
        finally:
            self.busy -= 1

    async def _exchange(self, address: Address, requests: list[tuple[list[tuple[bytes, bytes]], bytes]],
                        max_reply: int, deadline: float, fresh: bool = False) -> list[Response]:
        idle = self._idle.get(address)
        if idle is None:  # not setdefault: that would build a deque on every exchange
            idle = self._idle[address] = collections.deque()
        now = trio.current_time()
        if now - self._swept >= IDLE_TIMEOUT:
            # Every endpoint's, now and then: one the balancer stopped picking (ejected,
            # unhealthy) would keep its idle sockets, closed by the server, for good.
            self._swept = now
            for other in self._idle.values():
                _age(other, now)
        else:
            _age(idle, now)
        while idle and not fresh:
            conn = idle.pop()  # the most recently used: the likeliest still open
            if conn.codec.usable and conn.looks_open():
                try:
                    return await self._run(address, conn, idle, requests, max_reply, deadline, True)
                except _Stale:
                    break  # not processed: once more, on a fresh connection
            conn.close()
        a = address
        sock = None
        with trio.move_on_at(deadline):
            sock = await connect(a.kind, a.host, a.port, a.path, self.connect_timeout)
        if sock is None:
            raise TimedOut(CANCEL, "no connection by the deadline")
        try:
            conn = UnaryConnection(sock, self._limits.get(address, MAX_IN_FLIGHT))
        except BaseException:
            sock.close()
            raise
        return await self._run(address, conn, idle, requests, max_reply, deadline, False)

    async def _run(self, address: Address, conn: UnaryConnection, idle: collections.deque[UnaryConnection],
                   requests: list[tuple[list[tuple[bytes, bytes]], bytes]], max_reply: int, deadline: float,
                   reused: bool) -> list[Response]:
        try:
            responses = await conn.exchange(requests, max_reply, reused, deadline, self._deadlines)
        except BaseException:  # a failed or cancelled exchange: the state is unknown
            conn.close()
            raise
        finally:
            # A connection's SETTINGS come first; a limit of 0 (draining) is not one to start with.
            if not reused and conn.codec.settings_seen and conn.codec.peer_max_streams:
                if len(self._limits) >= MAX_LIMITS_KEPT:
                    self._limits.clear()
                self._limits[address] = conn.codec.peer_max_streams
        if (conn.codec.usable and not conn.timed_out and not conn.broken and len(idle) < MAX_IDLE
                and not self._closed):
            conn.idle_since = trio.current_time()
            idle.append(conn)
        else:
            conn.close()
        return responses

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
            idle.clear()
