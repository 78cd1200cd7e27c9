"""Real Thrift peers built on Apache thrift (tests/thrift/echo.thrift).

Server, as a subprocess (prints "ready" once listening on 127.0.0.1:PORT):

    python -m tests.thrift.peers serve --port 9100 --transport framed|buffered|header \
        --protocol binary|compact [--multiplex] [--service Echo|Calc]

It is an Apache `TThreadedServer` with daemon threads, one per connection, so
many concurrent connections work; a connection's calls are served in order.
`--multiplex` serves "Echo" and "Calc" through a `TMultiplexedProcessor`;
without it the server serves `--service` alone (Echo by default).

In tests: `ThriftServer` starts and kills that subprocess, `make_client` builds
blocking Apache clients, and `encode_call` / `decode_reply` / `frame` /
`read_frame` build and parse raw messages for pipelining over a plain socket.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from thrift.protocol import (
    TBinaryProtocol,
    TCompactProtocol,
    THeaderProtocol,
    TMultiplexedProtocol,
)
from thrift.protocol.TProtocol import TProtocolBase, TProtocolFactory
from thrift.server import TServer
from thrift.Thrift import TApplicationException, TMessageType
from thrift.TMultiplexedProcessor import TMultiplexedProcessor
from thrift.transport import THeaderTransport, TSocket, TTransport

from tests.thrift.gen.echo import Calc, Echo, ttypes

HOST = "127.0.0.1"
TRANSPORTS = ("framed", "buffered", "header")
PROTOCOLS = ("binary", "compact")
SERVICES = {"Echo": Echo, "Calc": Calc}

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _check(transport: str, protocol: str, service: str = "Echo") -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    if service not in SERVICES:
        raise ValueError(f"service must be one of {tuple(SERVICES)}, not {service!r}")


def protocol_factory(protocol: str) -> TProtocolFactory:
    """The plain (unheadered) protocol factory for "binary" or "compact"."""
    if protocol == "compact":
        return TCompactProtocol.TCompactProtocolFactory()
    return TBinaryProtocol.TBinaryProtocolFactory()


def header_subprotocol(protocol: str) -> int:
    """The THeader sub-protocol id for "binary" or "compact"."""
    if protocol == "compact":
        return THeaderTransport.THeaderSubprotocolID.COMPACT
    return THeaderTransport.THeaderSubprotocolID.BINARY


# -- the server ---------------------------------------------------------------


class EchoHandler:
    def __init__(self) -> None:
        self._notes = 0
        self._lock = threading.Lock()

    def echo(self, data: bytes) -> bytes:
        return data

    def greet(self, name: str) -> str:
        if name == "boom":
            raise ttypes.Oops(why="boom")
        return f"hello {name}"

    def sleep(self, ms: int) -> None:
        time.sleep(ms / 1000)

    def note(self, text: str) -> None:
        with self._lock:
            self._notes += 1

    def notes(self) -> int:
        with self._lock:
            return self._notes


class CalcHandler:
    def add(self, a: int, b: int) -> int:
        return a + b


class _AnnouncingServerSocket(TSocket.TServerSocket):
    """Prints "ready" once the listening socket is bound (TThreadedServer.serve listens)."""

    def listen(self) -> None:
        super().listen()
        print("ready", flush=True)


def build_server(
    port: int, transport: str, protocol: str, multiplex: bool = False, service: str = "Echo"
) -> TServer.TThreadedServer:
    _check(transport, protocol, service)
    processor: Any
    if multiplex:
        processor = TMultiplexedProcessor()
        processor.registerProcessor("Echo", Echo.Processor(EchoHandler()))
        processor.registerProcessor("Calc", Calc.Processor(CalcHandler()))
    elif service == "Calc":
        processor = Calc.Processor(CalcHandler())
    else:
        processor = Echo.Processor(EchoHandler())
    server_socket = _AnnouncingServerSocket(host=HOST, port=port)
    server_socket.setBacklog(1024)
    tfactory: Any
    pfactory: TProtocolFactory
    if transport == "header":
        # Apache thrift has no THeaderTransportFactory: THeaderProtocol wraps the
        # raw socket in a THeaderTransport itself, so the transport factory is the
        # pass-through base, and the servers reuse one THeaderProtocol for input
        # and output so a reply goes out in the dialect its call came in. Only
        # THeader clients are allowed (the library's default); a framed or
        # unframed client is disconnected without a reply. The reply's
        # sub-protocol follows the call's; `protocol` is only the default.
        tfactory = TTransport.TTransportFactoryBase()
        pfactory = THeaderProtocol.THeaderProtocolFactory(
            (THeaderTransport.THeaderClientType.HEADERS,), header_subprotocol(protocol)
        )
    else:
        if transport == "framed":
            tfactory = TTransport.TFramedTransportFactory()
        else:
            tfactory = TTransport.TBufferedTransportFactory()
        pfactory = protocol_factory(protocol)
    return TServer.TThreadedServer(processor, server_socket, tfactory, pfactory, daemon=True)


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class ThriftServer:
    """`python -m tests.thrift.peers serve` in a subprocess; always killed on exit.

        with ThriftServer("header", "compact") as server:
            client, trans = make_client(server.port, "header", "compact")

    The port is chosen once (free_port() unless given) and kept by restart().
    If the parent dies without stopping it, the server exits on its own (it
    watches its stdin pipe).
    """

    def __init__(
        self,
        transport: str = "framed",
        protocol: str = "binary",
        multiplex: bool = False,
        service: str = "Echo",
        port: int | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        _check(transport, protocol, service)
        self.transport = transport
        self.protocol = protocol
        self.multiplex = multiplex
        self.service = service
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        """The last MiB the server has written to stderr (while it is started)."""
        return _contents(self._err)

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("ThriftServer already started")
        cmd = [
            sys.executable, "-m", "tests.thrift.peers", "serve",
            "--port", str(self.port),
            "--transport", self.transport,
            "--protocol", self.protocol,
            "--service", self.service,
            "--exit-on-stdin-eof",
        ]  # fmt: skip
        if self.multiplex:
            cmd.append("--multiplex")
        # Output goes to files, not pipes: a server logging a lot (bad frames in
        # a test) must never block on a full pipe nobody reads.
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, cwd=_REPO_ROOT, stdin=subprocess.PIPE, stdout=self._out, stderr=self._err
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while "ready" not in _contents(self._out):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"thrift server ({self.transport}/{self.protocol}, port {self.port}) "
                    f"exited with status {self.proc.returncode} before listening; "
                    f"stderr:\n{self.stderr()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"thrift server ({self.transport}/{self.protocol}) did not listen on "
                    f"port {self.port} within {self.startup_timeout}s; stderr:\n{self.stderr()}"
                )
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill the server (SIGKILL) and wait for it; a no-op when not started."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdin is not None:
                proc.stdin.close()
        for f in (self._out, self._err):
            if f is not None:
                f.close()
        self._out = self._err = None

    def restart(self) -> None:
        """Stop, then start a fresh process on the same port (its note count starts at 0)."""
        self.stop()
        self.start()

    def __enter__(self) -> ThriftServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _contents(f: IO[bytes] | None, limit: int = 1 << 20) -> str:
    """The last `limit` bytes of a child's output file, as text."""
    # pread: the child shares the file offset, so reading must not move it.
    if f is None:
        return ""
    size = os.fstat(f.fileno()).st_size
    start = max(0, size - limit)
    return os.pread(f.fileno(), size - start, start).decode("utf-8", "replace")


# -- clients -------------------------------------------------------------------


def make_client(
    port: int,
    transport: str = "framed",
    protocol: str = "binary",
    service: str = "Echo",
    multiplexed: bool = False,
    timeout: float = 5.0,
) -> tuple[Any, TTransport.TTransportBase]:
    """(client, transport to close): an open Apache `Echo.Client` or `Calc.Client`.

    transport: "framed", "buffered" or "header" (THeaderTransport, client type
    HEADERS, with `protocol` as the sub-protocol). `multiplexed` prefixes
    method names with "<service>:" (TMultiplexedProtocol). `timeout` (seconds)
    applies to the connect and to every socket read and write.
    """
    _check(transport, protocol, service)
    sock = TSocket.TSocket(HOST, port)
    sock.setTimeout(timeout * 1000)
    trans: TTransport.TTransportBase
    proto: TProtocolBase
    if transport == "header":
        proto = THeaderProtocol.THeaderProtocol(
            sock, (THeaderTransport.THeaderClientType.HEADERS,), header_subprotocol(protocol)
        )
        trans = proto.trans  # the THeaderTransport the protocol wrapped around sock
    else:
        if transport == "framed":
            trans = TTransport.TFramedTransport(sock)
        else:
            trans = TTransport.TBufferedTransport(sock)
        proto = protocol_factory(protocol).getProtocol(trans)
    if multiplexed:
        proto = TMultiplexedProtocol.TMultiplexedProtocol(proto, service)
    trans.open()
    return SERVICES[service].Client(proto), trans


@contextlib.contextmanager
def open_client(
    port: int, transport: str = "framed", protocol: str = "binary", **kwargs: Any
) -> Iterator[Any]:
    """make_client as a context manager that closes the transport."""
    client, trans = make_client(port, transport, protocol, **kwargs)
    try:
        yield client
    finally:
        trans.close()


# -- raw messages, for pipelining tests -----------------------------------------


def _service_module(method: str) -> tuple[Any, str]:
    """(generated service module, bare method name) for "echo" or "Calc:add"."""
    service, _, bare = method.rpartition(":")
    if service:
        return SERVICES[service], bare
    for module in (Echo, Calc):
        if hasattr(module, f"{bare}_args"):
            return module, bare
    raise ValueError(f"no method {method!r} in Echo or Calc")


def encode_call(
    method: str, args: object, seqid: int, protocol: str = "binary", oneway: bool = False
) -> bytes:
    """An unframed CALL (or ONEWAY) message, as the Apache client would write it.

    `method` is written as given, so "Calc:add" makes a multiplexed call.
    `args` is a generated args struct (`Echo.echo_args(data=b"x")`) or a dict of
    its fields (`{"data": b"x"}`). Wrap the result with `frame()` for framed peers.
    """
    if isinstance(args, dict):
        module, bare = _service_module(method)
        args = getattr(module, f"{bare}_args")(**args)
    buf = TTransport.TMemoryBuffer()
    proto = protocol_factory(protocol).getProtocol(buf)
    proto.writeMessageBegin(method, TMessageType.ONEWAY if oneway else TMessageType.CALL, seqid)
    args.write(proto)  # type: ignore[attr-defined]
    proto.writeMessageEnd()
    return buf.getvalue()


def decode_reply(
    payload: bytes, method: str, protocol: str = "binary"
) -> tuple[str, int, int, Any]:
    """(name, message type, seqid, outcome) of an unframed reply message.

    outcome is the method's return value (None for void), the declared exception
    it raised (e.g. `ttypes.Oops`), or a `TApplicationException` for an
    EXCEPTION message. Nothing is raised for either kind of exception.
    """
    proto = protocol_factory(protocol).getProtocol(TTransport.TMemoryBuffer(payload))
    name, mtype, seqid = proto.readMessageBegin()
    if mtype == TMessageType.EXCEPTION:
        exc = TApplicationException()
        exc.read(proto)
        proto.readMessageEnd()
        return name, mtype, seqid, exc
    module, bare = _service_module(method)
    result = getattr(module, f"{bare}_result")()
    result.read(proto)
    proto.readMessageEnd()
    for spec in result.thrift_spec[1:]:  # field 0 is `success`
        if spec is not None and getattr(result, spec[2]) is not None:
            return name, mtype, seqid, getattr(result, spec[2])
    return name, mtype, seqid, getattr(result, "success", None)


def frame(payload: bytes) -> bytes:
    """payload with its 4-byte big-endian length in front (TFramedTransport)."""
    return len(payload).to_bytes(4, "big") + payload


def read_frame(sock: socket.socket) -> bytes:
    """The payload of the next length-prefixed frame on a blocking socket."""
    size = int.from_bytes(_read_exactly(sock, 4), "big")
    return _read_exactly(sock, size)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


# -- command line ---------------------------------------------------------------


def _exit_on_stdin_eof() -> None:
    # The raw fd, not sys.stdin: a daemon thread blocked in a buffered read makes
    # interpreter shutdown abort ("could not acquire lock for <stdin>").
    while os.read(0, 4096):
        pass
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.thrift.peers")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run an Apache thrift TThreadedServer on 127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--transport", choices=TRANSPORTS, default="framed")
    serve.add_argument("--protocol", choices=PROTOCOLS, default="binary")
    serve.add_argument(
        "--multiplex", action="store_true", help='serve "Echo" and "Calc" multiplexed'
    )
    serve.add_argument(
        "--service", choices=tuple(SERVICES), default="Echo", help="without --multiplex"
    )
    serve.add_argument("--exit-on-stdin-eof", action="store_true", help="exit when stdin closes")
    a = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if a.exit_on_stdin_eof:
        threading.Thread(target=_exit_on_stdin_eof, daemon=True).start()
    build_server(a.port, a.transport, a.protocol, a.multiplex, a.service).serve()


if __name__ == "__main__":
    main()
