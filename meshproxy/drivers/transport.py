"""A non-blocking socket with direct writes and a bounded, deadline-bound backlog.

Knows: sockets and trio's readiness waits. Must not: know any protocol.

Why not trio's SocketStream: a proxy writes many small frames from many
tasks. Writing straight from the task that produced the bytes (one
`send()` syscall, no task switch, no lock) is the common case; only when the
kernel buffer is full do the bytes wait in a backlog that the owner's writer
task drains under a write deadline. Reads go straight to `recv()` and yield to
the scheduler every few reads so one busy connection cannot starve the rest.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import trio

# 256 KiB reads take a whole burst of frames per syscall.
RECV_SIZE = 256 * 1024
# Yield to other tasks after this many reads that found data waiting.
READS_PER_YIELD = 8


class TransportClosed(Exception):
    """The connection is gone (peer closed, reset, or write deadline passed)."""


class Transport:
    __slots__ = (
        "_backlog",
        "_backlog_bytes",
        "_closed",
        "_drained",
        "_reads",
        "closed_reason",
        "high_water",
        "identity",
        "on_backlog",
        "peer",
        "security",
        "sock",
        "write_timeout",
    )

    def __init__(self, sock: socket.socket, write_timeout: float, high_water: int = 1 << 20) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.write_timeout = write_timeout
        self.high_water = high_water
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        self.on_backlog: Callable[[], None] = lambda: None
        self._drained = trio.Event()
        self._drained.set()
        self._closed = False
        self._reads = 0
        self.closed_reason = ""
        # Who the peer is and how it is protected (a TLS transport sets these).
        self.identity: str | None = None
        self.security = "plaintext"
        try:
            name = sock.getpeername()
            self.peer = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else f"unix:{name or '-'}"
        except OSError:
            self.peer = "-"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backlogged(self) -> bool:
        return self._backlog_bytes > self.high_water

    async def recv(self) -> bytes:
        """The next bytes from the peer; b"" at EOF. Raises TransportClosed."""
        self._reads += 1
        if self._reads >= READS_PER_YIELD:
            self._reads = 0
            await trio.lowlevel.checkpoint()
        while True:
            if self._closed:
                raise TransportClosed(self.closed_reason)
            try:
                return self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                self._reads = 0
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                except trio.ClosedResourceError:
                    raise TransportClosed(self.closed_reason) from None
            except OSError as e:
                self.close(f"recv: {errno.errorcode.get(e.errno or 0, e)}")
                raise TransportClosed(self.closed_reason) from e

    def write(self, data: bytes) -> None:
        """Send now if the kernel takes it, else queue it for the writer task."""
        if self._closed:
            return
        if self._backlog:
            self._backlog.append(data)
            self._backlog_bytes += len(data)
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self.close(f"send: {errno.errorcode.get(e.errno or 0, e)}")
            return
        if sent < len(data):
            rest = data[sent:]
            self._backlog.append(rest)
            self._backlog_bytes = len(rest)
            self._drained = trio.Event()
            self.on_backlog()

    async def drained(self) -> None:
        """Wait until the backlog is written (or the transport closed)."""
        await self._drained.wait()

    async def drain_backlog(self) -> None:
        """Write the backlog out as the socket allows, within the write timeout.

        The owner calls this from its writer task whenever `has_backlog`;
        `on_backlog` tells it one appeared.
        """
        try:
            with trio.fail_after(self.write_timeout):
                while self._backlog and not self._closed:
                    await trio.lowlevel.wait_writable(self.sock)
                    data = b"".join(self._backlog)
                    self._backlog.clear()
                    try:
                        sent = self.sock.send(data)
                    except BlockingIOError:
                        sent = 0
                    if sent < len(data):
                        self._backlog.append(data[sent:])
                    self._backlog_bytes = len(data) - sent
        except trio.TooSlowError:
            self.close("write timeout")
        except trio.ClosedResourceError:
            pass
        except OSError as e:
            self.close(f"send: {errno.errorcode.get(e.errno or 0, e)}")
        self._drained.set()

    @property
    def has_backlog(self) -> bool:
        return bool(self._backlog)

    def close(self, reason: str = "closed") -> None:
        if self._closed:
            return
        self._closed = True
        self.closed_reason = reason
        self._backlog.clear()
        self._backlog_bytes = 0
        self._drained.set()
        self.on_backlog()
        try:
            trio.lowlevel.notify_closing(self.sock)
        except (ValueError, RuntimeError):
            pass
        self.sock.close()

    async def flush_and_close(self, timeout: float, reason: str) -> None:
        """Write what is queued (bounded by `timeout`), then close."""
        with trio.move_on_after(timeout):
            await self.drained()
        if not self._closed:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.close(reason)


async def connect(kind: str, host: str, port: int, path: str, timeout: float) -> socket.socket:
    """Open a connected non-blocking socket within `timeout` (raises OSError / TooSlowError)."""
    with trio.fail_after(timeout):
        if kind == "unix":
            tsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = path
        else:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            if not infos:
                raise OSError(f"cannot resolve {host}")
            family, stype, proto, _, target = infos[0]
            tsock = trio.socket.socket(family, stype, proto)
        try:
            await tsock.connect(target)
        except BaseException:
            tsock.close()
            raise
    sock = socket.socket(fileno=tsock.detach())
    return sock
