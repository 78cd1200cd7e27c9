"""Shared memory between processes, and calls from an app over shm through the proxy.

Two-process tests use a socketpair: this process makes the segment
(`shm.accept`, the sidecar's side) and `tests/shm/peer.py` in a child maps it
(`shm._receive`, the app's side).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from thrift.protocol import TBinaryProtocol
from thrift.transport import TSocket, TTransport

from meshproxy import shm
from tests.h2client import H2Client
from tests.harness import HOST, start_backend, start_proxy, write_config
from tests.peers.gen.echo import Echo, ttypes
from tests.peers.thrift_peer import ThriftServer
from tests.shm.peer import HEAD

ROOT = Path(__file__).resolve().parents[2]


def spawn(mode: str, *args: object, ring_size: int = 1 << 16) -> tuple[subprocess.Popen[bytes], shm.ShmSocket]:
    mine, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.shm.peer", mode, str(theirs.fileno()), *map(str, args)],
        pass_fds=[theirs.fileno()], cwd=ROOT,
    )
    theirs.close()
    return proc, shm.ShmSocket(shm.accept(mine, ring_size), timeout=60)


def test_a_million_messages_across_processes() -> None:
    """Random sizes, each checksummed: nothing lost, duplicated, reordered or damaged."""
    count = 1_000_000
    proc, sock = spawn("write", count, 42, 600)
    buf = bytearray()
    pos = seq = 0
    try:
        while True:
            data = sock.recv(1 << 18)
            if not data:
                break
            buf += data
            while len(buf) - pos >= HEAD.size:
                size, got_seq, crc = HEAD.unpack_from(buf, pos)
                end = pos + HEAD.size + size
                if end > len(buf):
                    break
                assert got_seq == seq, f"message {seq} came as {got_seq}"
                assert zlib.crc32(memoryview(buf)[pos + HEAD.size : end]) == crc, f"message {seq} damaged"
                seq += 1
                pos = end
            if pos > 1 << 20:
                del buf[:pos]
                pos = 0
    finally:
        sock.close()
        assert proc.wait(60) == 0
    assert seq == count and pos == len(buf)


def test_a_peer_killed_mid_stream_is_eof() -> None:
    proc, sock = spawn("spam")
    try:
        assert sock.recv(65536)  # it is writing
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        start = time.monotonic()
        while sock.recv(65536):  # what it wrote before dying, then EOF
            assert time.monotonic() - start < 5
        # The other direction knows too.
        with pytest.raises(BrokenPipeError):
            for _ in range(100):
                sock.sendall(b"x" * 60000)
    finally:
        sock.close()


# -- through the proxy ------------------------------------------------------------------


def shm_config(directory: Path, protocol: str, port: int, cluster_protocol: str | None = None) -> str:
    thrift = "\n    thrift: {transport: framed, protocol: binary}" if protocol == "thrift" else ""
    route_match = "{}" if protocol == "thrift" else "{prefix: /}"
    return f"""\
admin: {{address: "{HOST}:0"}}
shm: {{directory: {directory}, ring_size: 64KiB}}
listeners:
  - name: app
    direction: egress
    address: "shm:app"
    protocol: {protocol}{thrift}
    routes:
      - match: {route_match}
        cluster: backend
clusters:
  - name: backend
    protocol: {cluster_protocol or protocol}
    endpoints: ["{HOST}:{port}"]
"""


@pytest.fixture
def thrift_backend() -> Iterator[ThriftServer]:
    with ThriftServer("framed", "binary") as s:
        yield s


async def test_thrift_from_an_app_over_shm(nursery: trio.Nursery, tmp_path: Path, thrift_backend: ThriftServer) -> None:
    await start_proxy(nursery, write_config(tmp_path, shm_config(tmp_path, "thrift", thrift_backend.port)))
    big = os.urandom(1 << 20)  # 16 times the 64 KiB ring: split into records, with back-pressure

    def app() -> tuple[bytes, bytes, str, int]:
        handle = TSocket.TSocket()
        handle.setHandle(shm.connect("app", directory=str(tmp_path)))
        transport = TTransport.TFramedTransport(handle)
        c = Echo.Client(TBinaryProtocol.TBinaryProtocol(transport))
        try:
            small, large = c.echo(b"over shm"), c.echo(big)
            try:
                c.greet("boom")
                oops = ""
            except ttypes.Oops as e:
                oops = e.why
            c.note("oneway")
            return small, large, oops, c.notes()
        finally:
            transport.close()

    small, large, oops, notes = await trio.to_thread.run_sync(app)
    assert (small, oops, notes) == (b"over shm", "boom", 1)
    assert large == big


async def test_grpc_from_an_app_over_shm(nursery: trio.Nursery, tmp_path: Path, grpc_server: tuple[int, object]) -> None:
    port, _ = grpc_server
    await start_proxy(nursery, write_config(tmp_path, shm_config(tmp_path, "http2", port)))
    stream = await shm.connect_trio("app", directory=str(tmp_path))
    client = H2Client(stream)  # type: ignore[arg-type]
    await client.flush()
    message = os.urandom(60_000)  # within the initial flow-control window
    sid = client.request(
        "/echo.Echo/Unary", method="POST", end=False,
        extra=[(b"content-type", b"application/grpc"), (b"te", b"trailers")],
    )
    framed = b"\x00" + struct.pack("!I", len(message)) + message
    for i in range(0, len(framed), 16384):  # the peer's maximum frame size
        client.conn.send_data(sid, framed[i : i + 16384], end_stream=i + 16384 >= len(framed))
    await client.flush()
    status, _, body, trailers = await client.response(sid)
    await client.aclose()
    assert status == 200 and dict(trailers or [])[b"grpc-status"] == b"0"
    assert body == b"\x00" + struct.pack("!I", len(message)) + message


async def test_http2_from_an_app_over_shm(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery)
    await start_proxy(nursery, write_config(tmp_path, shm_config(tmp_path, "http2", backend.port)))
    stream = await shm.connect_trio("app", directory=str(tmp_path))
    client = H2Client(stream)  # type: ignore[arg-type]
    await client.flush()
    status, _, body, _ = await client.get("/size/300000")
    await client.aclose()
    assert status == 200 and len(body) == 300000


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _segments() -> int:
    with open("/proc/self/maps") as f:
        return sum("meshproxy-shm" in line for line in f)


async def test_ten_thousand_connects_leave_nothing_behind(nursery: trio.Nursery, tmp_path: Path, thrift_backend: ThriftServer) -> None:
    app = await start_proxy(nursery, write_config(tmp_path, shm_config(tmp_path, "thrift", thrift_backend.port)))
    runtime = app.listeners["app"]

    def cycles(n: int) -> None:
        for _ in range(n):
            shm.connect("app", directory=str(tmp_path)).close()

    await trio.to_thread.run_sync(cycles, 200)  # warm-up: thread pools, caches
    await _settle(runtime)
    fds, segments = _fds(), _segments()
    await trio.to_thread.run_sync(cycles, 10_000)
    await _settle(runtime)
    assert _segments() == segments == 0  # both sides unmapped every segment
    assert _fds() <= fds + 2  # nothing per connection stays open (a little slack for trio's own)


async def _settle(runtime: object) -> None:
    with trio.fail_after(20):
        while runtime.links:  # type: ignore[attr-defined]
            await trio.sleep(0.01)


from tests.test_grpc_e2e import grpc_server  # noqa: E402  (the fixture, shared)

__all__ = ["grpc_server"]
