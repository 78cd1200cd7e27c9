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
machinery are paid once for the batch. Plaintext only: a TLS cluster uses
the proxy's h2 path.
"""

from __future__ import annotations

import collections
import errno
import socket

import trio

from meshproxy.codec.unary_h2 import (
    MAX_IN_FLIGHT,
    ExchangeFailed,
    Response,
    StreamRefused,
    StreamReset,
    UnaryClient,
)
from meshproxy.drivers.transport import connect
from meshproxy.values import Address

__all__ = ["Closed", "ExchangeFailed", "Response", "StreamRefused", "StreamReset", "UnaryConnections"]

RECV_SIZE = 64 * 1024
# Idle connections kept per endpoint; more concurrent exchanges than this open
# connections that are closed after use.
MAX_IDLE = 16
# An idle connection older than this is closed rather than reused: servers
# close idle HTTP/2 connections (nginx after 3 min, grpc-go after its max idle).
IDLE_TIMEOUT = 30.0


class Closed(ExchangeFailed):
    """The connection closed or reset under the exchange."""


class _Stale(Closed):
    """A reused connection failed the request's first send: the request was not processed."""


class UnaryConnection:
    __slots__ = ("codec", "idle_since", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.codec = UnaryClient(0)
        self.idle_since = 0.0

    async def exchange(self, requests: list[tuple[list[tuple[bytes, bytes]], bytes]], max_reply: int,
                       reused: bool) -> list[Response]:
        """Send `requests` (headers, body) as streams at once; their Responses once all have ended.

        A stream the server reset ends with its Response's `error`; a failed
        connection raises (Closed, ExchangeFailed)."""
        codec = self.codec
        codec.max_reply = max_reply
        responses = [codec.request(headers, body) for headers, body in requests]
        try:
            await self._send(codec.data_to_send())
        except Closed as e:
            raise (_Stale(e.code, str(e)) if reused else e) from None
        while not codec.idle:  # the connection carries this batch only: idle once every stream ended
            # The reply cannot be here the moment the request left: wait first, then read.
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as e:
                raise Closed(0, _error("recv", e)) from None
            if not data:
                raise Closed(0, "connection closed by the server")
            codec.receive(data)
            out = codec.data_to_send()
            if out:
                await self._send(out)
        return responses

    async def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
            except OSError as e:
                raise Closed(0, _error("send", e)) from None

    def looks_open(self) -> bool:
        """No EOF or error waiting on the socket (bytes waiting, such as a PING, are fine)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
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


def _error(what: str, e: OSError) -> str:
    return f"{what}: {errno.errorcode.get(e.errno or 0, e)}"


class UnaryConnections:
    """Idle lean connections by endpoint, at most MAX_IDLE each (a cluster owns one set, and closes it)."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[Address, collections.deque[UnaryConnection]] = {}
        self.busy = 0  # exchanges (or batches) in progress, each on a connection of its own
        self._closed = False  # the cluster is gone: connections are closed after use, not kept

    async def exchange(self, address: Address, headers: list[tuple[bytes, bytes]], body: bytes,
                       max_reply: int) -> Response:
        """The response from `address`, its body at most `max_reply` bytes.

        Raises OSError / trio.TooSlowError (connect), ExchangeFailed, or the
        StreamReset with which the server ended the stream.
        """
        request = [(headers, body)]
        self.busy += 1
        try:
            (response,) = await self._exchange(address, request, max_reply)
            if isinstance(response.error, StreamRefused):  # not processed: once more, as exchange_many does
                (response,) = await self._exchange(address, request, max_reply, fresh=True)
        finally:
            self.busy -= 1
        if response.error is not None:
            raise response.error
        return response

    async def exchange_many(self, address: Address, requests: list[tuple[list[tuple[bytes, bytes]], bytes]],
                            max_reply: int) -> list[Response]:
        """The responses from `address` to `requests`, sent at once on one connection
        (at most MAX_IN_FLIGHT of them). A stream the server reset ends with its
        Response's `error`; a refused one (not processed) is sent once more on a
        fresh connection first. Raises OSError / trio.TooSlowError (connect) or
        ExchangeFailed for the connection.
        """
        if not 0 < len(requests) <= MAX_IN_FLIGHT:
            raise ValueError(f"a batch is 1 to {MAX_IN_FLIGHT} requests, not {len(requests)}")
        self.busy += 1
        try:
            responses = await self._exchange(address, requests, max_reply)
            refused = [i for i, r in enumerate(responses) if isinstance(r.error, StreamRefused)]
            if refused:  # not processed (a GOAWAY below them, a server at its stream limit): once more
                again = await self._exchange(address, [requests[i] for i in refused], max_reply, fresh=True)
                for i, response in zip(refused, again, strict=True):
                    responses[i] = response
            return responses
        finally:
            self.busy -= 1

    async def _exchange(self, address: Address, requests: list[tuple[list[tuple[bytes, bytes]], bytes]],
                        max_reply: int, fresh: bool = False) -> list[Response]:
        idle = self._idle.setdefault(address, collections.deque())
        now = trio.current_time()
        while idle and now - idle[0].idle_since >= IDLE_TIMEOUT:
            idle.popleft().close()  # the oldest first: after a burst, the extra ones age out
        while idle and not fresh:
            conn = idle.pop()  # the most recently used: the likeliest still open
            if conn.codec.room() >= len(requests) and conn.looks_open():
                try:
                    return await self._run(conn, idle, requests, max_reply, True)
                except _Stale:
                    break  # not processed: once more, on a fresh connection
            conn.close()
        a = address
        sock = await connect(a.kind, a.host, a.port, a.path, self.connect_timeout)
        try:
            conn = UnaryConnection(sock)
        except BaseException:
            sock.close()
            raise
        return await self._run(conn, idle, requests, max_reply, False)

    async def _run(self, conn: UnaryConnection, idle: collections.deque[UnaryConnection],
                   requests: list[tuple[list[tuple[bytes, bytes]], bytes]], max_reply: int,
                   reused: bool) -> list[Response]:
        try:
            responses = await conn.exchange(requests, max_reply, reused)
        except BaseException:  # a failure or a cancelled (timed out) exchange: the state is unknown
            conn.close()
            raise
        if conn.codec.usable and len(idle) < MAX_IDLE and not self._closed:
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
