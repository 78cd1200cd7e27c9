"""Shared-memory byte streams between an app and its sidecar.

An app connects to the sidecar's unix socket `DIRECTORY/NAME` once. The
sidecar creates a memfd holding two rings (app -> sidecar and sidecar -> app,
`meshproxy/shm_ring.c`) and four eventfd doorbells (data and space, per
direction), and passes them over that socket with SCM_RIGHTS, so only that
peer can map them. From then on bytes travel through the rings; a side rings
a doorbell only when the other sleeps, so a busy pair makes no syscalls per
message. The unix socket stays open as the liveness signal: either side
closing it, or dying, is EOF to the other, and the segment is freed with the
last mapping.

Three fronts over one `Channel`:

* `ShmTransport`: what meshproxy's HTTP/2 and Thrift drivers read and write
  (the interface of `drivers.transport.Transport`), used by `shm:` listeners;
* `ShmStream`: a `trio.abc.Stream`, for trio apps (`await connect_trio(...)`);
* `ShmSocket`: blocking and socket-like (`sendall`, `recv`, `close`,
  `settimeout`), for plain Python apps: `connect(name, directory=...)`.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import socket
import struct
import time
from pathlib import Path
from typing import Any

import trio

from meshproxy.drivers.transport import TransportClosed

try:
    from meshproxy._shm_ring import ffi, lib
except ImportError as e:  # pragma: no cover - the build failed or was skipped
    raise ImportError(
        "meshproxy._shm_ring is not built: reinstall with `pip install -e .` (it compiles meshproxy/shm_ring.c)"
    ) from e

HELLO = b"MESHSHM1"
_HELLO = struct.Struct("!8sQ")  # magic, ring capacity
DEFAULT_RING_SIZE = 1 << 20
# Bytes a reader takes per call; a whole ring's worth at most.
RECV_SIZE = 256 * 1024
# A blocking reader polls this long before it sleeps on its doorbell.
SPIN_SECONDS = 50e-6

_ERRORS = {
    lib.SHM_RING_ECORRUPT: "the peer corrupted the shared ring",
    lib.SHM_RING_EINVAL: "not a meshproxy ring",
    lib.SHM_RING_ESTATE: "ring calls out of order",
}


class ShmError(OSError):
    """The handshake failed, or the shared state is corrupt: the channel is closed."""


def default_directory() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "meshproxy")
    return f"/tmp/meshproxy-{os.getuid()}"


def socket_path(name: str, directory: str | None = None) -> str:
    return os.path.join(directory or default_directory(), name)


def _page_align(n: int) -> int:
    return (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


class Channel:
    """Two mapped rings, their doorbells and the unix socket: non-blocking operations only."""

    def __init__(self, sock: socket.socket, memfd: int, fds: list[int], capacity: int, creator: bool) -> None:
        # fds: up data, up space, down data, down space ("up" = app -> sidecar).
        self.sock = sock
        self.capacity = capacity
        self.closed = False
        self._fds = fds
        region = int(lib.shm_ring_region_size(capacity))
        self._down_at = _page_align(region)
        size = self._down_at + region
        try:
            if creator:
                os.ftruncate(memfd, size)
            if os.fstat(memfd).st_size < size:
                raise ShmError(errno.EPROTO, "shared segment is smaller than its rings")
            self._mm = mmap.mmap(memfd, size)
        finally:
            os.close(memfd)  # the mapping keeps the segment; the fd is not needed
        self._base = ffi.from_buffer(self._mm)
        up, down = self._base, self._base + self._down_at
        if creator:
            for region_ptr in (up, down):
                _check(lib.shm_ring_init(region_ptr, region, capacity))
        self._up = ffi.new("shm_ring *")
        self._down = ffi.new("shm_ring *")
        _check(lib.shm_ring_attach(self._up, up, region))
        _check(lib.shm_ring_attach(self._down, down, region))
        up_data, up_space, down_data, down_space = fds
        if creator:  # the sidecar reads up, writes down
            self.rx, self.tx = self._up, self._down
            self.rx_data, self.rx_space, self.tx_data, self.tx_space = up_data, up_space, down_data, down_space
        else:
            self.rx, self.tx = self._down, self._up
            self.rx_data, self.rx_space, self.tx_data, self.tx_space = down_data, down_space, up_data, up_space
        self.max_record = int(lib.shm_ring_max_record(capacity))
        self._buf = ffi.new("char[]", RECV_SIZE)
        self._offset = ffi.new("uint32_t *")
        # One fd to wait on per direction: the doorbell or the socket (EOF = the peer is gone).
        self.rx_wait = select.epoll()
        self.rx_wait.register(self.rx_data, select.EPOLLIN)
        self.rx_wait.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        self.tx_wait = select.epoll()
        self.tx_wait.register(self.tx_space, select.EPOLLIN)
        self.tx_wait.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    # -- data

    def send_some(self, data: bytes | bytearray | memoryview) -> int:
        """Write what fits now (split into records); rings the reader if it sleeps."""
        if self.closed:  # the rings are unmapped: never touch them again
            raise ShmError(errno.EPIPE, "shm channel closed")
        if not data:
            return 0
        n = lib.shm_ring_write_some(self.tx, ffi.from_buffer(data), len(data))
        if n < 0:
            raise self._fail(n)
        if n and lib.shm_ring_reader_needs_wake(self.tx):
            lib.shm_ring_doorbell_ring(self.tx_data)
        return int(n)

    def recv_some(self, max_bytes: int = RECV_SIZE) -> bytes:
        """What is there now (b"" if nothing); rings the writer if it waits for space."""
        if self.closed:
            return b""
        n = lib.shm_ring_read_some(self.rx, self._buf, min(max_bytes, RECV_SIZE), self._offset)
        if n < 0:
            raise self._fail(n)
        if n == 0:
            return b""
        if lib.shm_ring_writer_needs_wake(self.rx):
            lib.shm_ring_doorbell_ring(self.rx_space)
        return ffi.buffer(self._buf, n)[:]

    def readable(self) -> bool:
        return not self.closed and bool(lib.shm_ring_readable(self.rx))

    # -- sleeping

    def rx_sleep(self) -> bool:
        """About to wait for data: False if data came meanwhile (do not wait)."""
        return not self.closed and not lib.shm_ring_reader_sleep(self.rx)

    def rx_awake(self) -> None:
        if not self.closed:
            lib.shm_ring_reader_awake(self.rx)
            lib.shm_ring_doorbell_drain(self.rx_data)

    def tx_sleep(self) -> bool:
        return not self.closed and not lib.shm_ring_writer_sleep(self.tx, 1)

    def tx_awake(self) -> None:
        if not self.closed:
            lib.shm_ring_writer_awake(self.tx)
            lib.shm_ring_doorbell_drain(self.tx_space)

    def peer_gone(self) -> bool:
        """The unix socket says the peer closed or died."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _fail(self, code: int) -> ShmError:
        self.close()
        return ShmError(errno.EPROTO, _ERRORS.get(code, f"ring error {code}"))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for ep in (self.rx_wait, self.tx_wait):
            with contextlib.suppress(ValueError, RuntimeError):
                trio.lowlevel.notify_closing(ep.fileno())
            ep.close()
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        ffi.release(self._base)
        self._mm.close()


def _check(rc: int) -> None:
    if rc != lib.SHM_RING_OK:
        raise ShmError(errno.EPROTO, _ERRORS.get(rc, f"ring error {rc}"))


# -- handshake ------------------------------------------------------------------


def accept(sock: socket.socket, ring_size: int = DEFAULT_RING_SIZE) -> Channel:
    """Sidecar side, on an accepted unix socket: create the segment and hand it over."""
    memfd = os.memfd_create("meshproxy-shm", os.MFD_CLOEXEC)
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
    try:
        channel = Channel(sock, os.dup(memfd), fds, ring_size, creator=True)
    except BaseException:
        os.close(memfd)
        for fd in fds:
            os.close(fd)
        raise
    try:
        # A fresh socket's buffer takes 16 bytes at once: no wait, so no blocking.
        sock.setblocking(False)
        socket.send_fds(sock, [_HELLO.pack(HELLO, ring_size)], [memfd, *fds])
    except OSError:
        channel.close()
        raise
    finally:
        os.close(memfd)
    return channel


def _receive(sock: socket.socket) -> Channel:
    msg, fds, _, _ = socket.recv_fds(sock, _HELLO.size, 5)
    if len(msg) != _HELLO.size or len(fds) != 5:
        for fd in fds:
            os.close(fd)
        raise ShmError(errno.EPROTO, "not a meshproxy shm socket (bad handshake)")
    magic, capacity = _HELLO.unpack(msg)
    if magic != HELLO:
        for fd in fds:
            os.close(fd)
        raise ShmError(errno.EPROTO, f"unknown shm handshake {magic!r}")
    for fd in fds[1:]:
        os.set_blocking(fd, False)
    return Channel(sock, fds[0], list(fds[1:]), capacity, creator=False)


def connect(name: str, directory: str | None = None, timeout: float | None = 5.0) -> ShmSocket:
    """App side, blocking: connect to the sidecar's `shm:NAME` listener."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path(name, directory))
        channel = _receive(sock)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return ShmSocket(channel, timeout)


async def connect_trio(name: str, directory: str | None = None) -> ShmStream:
    """App side, trio: connect to the sidecar's `shm:NAME` listener."""
    def blocking() -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5.0)
        try:
            sock.connect(socket_path(name, directory))
            channel = _receive(sock)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return channel

    return ShmStream(await trio.to_thread.run_sync(blocking))


# -- blocking, socket-like ---------------------------------------------------------


class ShmSocket:
    """What an app's blocking client sits on (e.g. thrift's TSocket via setHandle)."""

    def __init__(self, channel: Channel, timeout: float | None) -> None:
        self.channel = channel
        self._timeout = timeout

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setsockopt(self, *_: Any) -> None:
        pass  # TCP options mean nothing here

    def _wait(self, ep: select.epoll, deadline: float | None) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("timed out")
        if not ep.poll(-1 if left is None else left, 1):
            raise TimeoutError("timed out")

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        ch = self.channel
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while view:
            if ch.closed:
                raise BrokenPipeError(errno.EPIPE, "shm channel closed")
            n = ch.send_some(view)
            view = view[n:]
            if not view:
                return
            if ch.peer_gone():
                raise BrokenPipeError(errno.EPIPE, "the sidecar went away")
            if ch.tx_sleep():
                try:
                    self._wait(ch.tx_wait, deadline)
                finally:
                    ch.tx_awake()

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Everything or an error, like sendall (thrift's TSocket counts what send returns)."""
        self.sendall(data)
        return len(data)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        ch = self.channel
        if flags & socket.MSG_PEEK:
            return b"x" if ch.readable() else (b"" if ch.peer_gone() else b"x")
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        spin_until = time.monotonic() + SPIN_SECONDS
        while True:
            if ch.closed:
                return b""
            data = ch.recv_some(bufsize)
            if data:
                return data
            if time.monotonic() < spin_until:
                continue
            if ch.peer_gone():
                return b""
            if ch.rx_sleep():
                try:
                    self._wait(ch.rx_wait, deadline)
                finally:
                    ch.rx_awake()

    def close(self) -> None:
        self.channel.close()

    def shutdown(self, _: int) -> None:
        self.close()

    def fileno(self) -> int:
        return -1 if self.channel.closed else self.channel.sock.fileno()

    def __enter__(self) -> ShmSocket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# -- trio ----------------------------------------------------------------------------


class ShmTransport:
    """The sidecar side of a channel, with the interface of drivers.transport.Transport."""

    __slots__ = ("_backlog", "_backlog_bytes", "_drained", "channel", "closed_reason", "high_water",
                 "on_backlog", "peer", "write_timeout")
    # A local app on the same host: no certificate, and nothing on a wire to protect.
    identity = None
    security = "shm"

    def __init__(self, channel: Channel, write_timeout: float, peer: str, high_water: int = 1 << 20) -> None:
        self.channel = channel
        self.write_timeout = write_timeout
        self.high_water = high_water
        self.peer = peer
        self.closed_reason = ""
        self.on_backlog: Any = lambda: None
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        self._drained = trio.Event()
        self._drained.set()

    @property
    def closed(self) -> bool:
        return self.channel.closed

    @property
    def backlogged(self) -> bool:
        return self._backlog_bytes > self.high_water

    @property
    def has_backlog(self) -> bool:
        return bool(self._backlog)

    async def recv(self, max_bytes: int = RECV_SIZE) -> bytes:
        ch = self.channel
        await trio.lowlevel.checkpoint()
        woken = False
        while True:
            if ch.closed:
                raise TransportClosed(self.closed_reason)
            try:
                data = ch.recv_some(max_bytes)
            except ShmError as e:
                self.close(str(e))
                raise TransportClosed(self.closed_reason) from e
            if data:
                return data
            # Woken with no data: the socket fired, so the peer may be gone.
            if woken and ch.peer_gone():
                return b""
            woken = True
            if ch.rx_sleep():
                try:
                    await trio.lowlevel.wait_readable(ch.rx_wait.fileno())
                except trio.ClosedResourceError:
                    raise TransportClosed(self.closed_reason) from None
                finally:
                    if not ch.closed:
                        ch.rx_awake()

    def write(self, data: bytes) -> None:
        if self.channel.closed:
            return
        if self._backlog:
            self._backlog.append(data)
            self._backlog_bytes += len(data)
            return
        try:
            n = self.channel.send_some(data)
        except ShmError as e:
            self.close(str(e))
            return
        if n < len(data):
            rest = data[n:]
            self._backlog.append(rest)
            self._backlog_bytes = len(rest)
            self._drained = trio.Event()
            self.on_backlog()

    async def drained(self) -> None:
        await self._drained.wait()

    async def drain_backlog(self) -> None:
        ch = self.channel
        try:
            with trio.fail_after(self.write_timeout):
                while self._backlog and not ch.closed:
                    data = b"".join(self._backlog)
                    self._backlog.clear()
                    n = ch.send_some(data)
                    if n < len(data):
                        self._backlog.append(data[n:])
                    self._backlog_bytes = len(data) - n
                    if not self._backlog:
                        break
                    if ch.peer_gone():
                        self.close("peer closed")
                        break
                    if ch.tx_sleep():
                        try:
                            await trio.lowlevel.wait_readable(ch.tx_wait.fileno())
                        finally:
                            if not ch.closed:
                                ch.tx_awake()
        except trio.TooSlowError:
            self.close("write timeout")
        except (trio.ClosedResourceError, ShmError) as e:
            self.close(str(e) or "closed")
        self._drained.set()

    def close(self, reason: str = "closed") -> None:
        if self.channel.closed:
            return
        self.closed_reason = reason
        self._backlog.clear()
        self._backlog_bytes = 0
        self._drained.set()
        self.on_backlog()
        self.channel.close()

    async def flush_and_close(self, timeout: float, reason: str) -> None:
        with trio.move_on_after(timeout):
            await self.drained()
        self.close(reason)


class ShmStream(trio.abc.Stream):
    """A trio Stream over a channel (the app side of a trio program, or tests)."""

    def __init__(self, channel: Channel) -> None:
        self._t = ShmTransport(channel, write_timeout=3600.0, peer="shm")
        self._send_lock = trio.StrictFIFOLock()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            if self._t.closed:
                raise trio.ClosedResourceError("shm stream closed")
            self._t.write(bytes(data))
            if self._t.has_backlog:
                await self._t.drain_backlog()
            if self._t.closed:
                raise trio.BrokenResourceError(self._t.closed_reason or "shm stream closed")

    async def wait_send_all_might_not_block(self) -> None:
        await self._t.drained()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self._t.recv(max_bytes or RECV_SIZE)
        except TransportClosed as e:
            if self._t.closed_reason in ("", "closed"):
                raise trio.ClosedResourceError("shm stream closed") from e
            raise trio.BrokenResourceError(self._t.closed_reason) from e
        return data

    async def aclose(self) -> None:
        self._t.close()
        await trio.lowlevel.checkpoint()


def listen(name: str, directory: str | None = None) -> socket.socket:
    """Bind the unix socket of `shm:NAME` (the directory is created private to this user)."""
    path = Path(socket_path(name, directory))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


def peer_of(sock: socket.socket, name: str) -> str:
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return f"shm:{name}(pid {pid})"
    except OSError:
        return f"shm:{name}"
