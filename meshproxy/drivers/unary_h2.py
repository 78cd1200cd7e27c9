"""The trio driver of codec/unary_h2: lean HTTP/2 connections for small unary
exchanges (the risk callout), one exchange per connection at a time, kept idle
per endpoint for reuse.

Knows: sockets, trio's readiness waits, and which failures mean "the request
was not processed" (a refused stream, a GOAWAY below it, a reused connection
that failed the first send), so one fresh attempt is safe; a connection that
closes after the request left is a failure, never resent (the server may have
processed it). Must not: pick endpoints or decide
what a failure means to a call.

The calling task does its own socket I/O: the request goes out with one
send() and the task waits for the reply on its own socket, so an exchange
costs one wake-up, with no reader task, no stream table and no batched
writer in between. Plaintext only: a TLS cluster uses the proxy's h2 path.
"""

from __future__ import annotations

import collections
import errno
import socket

import trio

from meshproxy.codec.unary_h2 import (
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

    async def exchange(self, headers: list[tuple[bytes, bytes]], body: bytes, max_reply: int,
                       reused: bool) -> Response:
        codec = self.codec
        codec.max_reply = max_reply
        codec.request(headers, body)
        try:
            await self._send(codec.data_to_send())
        except Closed as e:
            raise (_Stale(e.code, str(e)) if reused else e) from None
        while True:
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
            response = codec.receive(data)
            out = codec.data_to_send()
            if out:
                await self._send(out)
            if response is not None:
                return response

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
        self.busy = 0  # exchanges in progress, each on a connection of its own
        self._closed = False  # the cluster is gone: connections are closed after use, not kept

    async def exchange(self, address: Address, headers: list[tuple[bytes, bytes]], body: bytes,
                       max_reply: int) -> Response:
        """The response from `address`, its body at most `max_reply` bytes.

        Raises OSError / trio.TooSlowError (connect) or ExchangeFailed.
        """
        self.busy += 1
        try:
            return await self._exchange(address, headers, body, max_reply)
        finally:
            self.busy -= 1

    async def _exchange(self, address: Address, headers: list[tuple[bytes, bytes]], body: bytes,
                        max_reply: int) -> Response:
        idle = self._idle.setdefault(address, collections.deque())
        now = trio.current_time()
        while idle and now - idle[0].idle_since >= IDLE_TIMEOUT:
            idle.popleft().close()  # the oldest first: after a burst, the extra ones age out
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest still open
            if conn.codec.usable and conn.looks_open():
                try:
                    return await self._run(conn, idle, headers, body, max_reply, True)
                except (_Stale, StreamRefused):
                    break  # not processed: once more, on a fresh connection
            conn.close()
        a = address
        sock = await connect(a.kind, a.host, a.port, a.path, self.connect_timeout)
        try:
            conn = UnaryConnection(sock)
        except BaseException:
            sock.close()
            raise
        return await self._run(conn, idle, headers, body, max_reply, False)

    async def _run(self, conn: UnaryConnection, idle: collections.deque[UnaryConnection],
                   headers: list[tuple[bytes, bytes]], body: bytes, max_reply: int, reused: bool) -> Response:
        try:
            response = await conn.exchange(headers, body, max_reply, reused)
        except BaseException:  # a failure or a cancelled (timed out) exchange: the state is unknown
            conn.close()
            raise
        if conn.codec.usable and len(idle) < MAX_IDLE and not self._closed:
            conn.idle_since = trio.current_time()
            idle.append(conn)
        else:
            conn.close()
        return response

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
            idle.clear()
