"""Real Thrift peers for the tests: Apache thrift servers and clients (tests/peers/echo.thrift).

    python -m tests.peers.thrift_peer serve --port 9100 --transport framed --protocol binary [--multiplex]

runs an Apache `TThreadedServer` (one thread per connection, as thrift's
Python servers do) of the Echo service (and Calc, when multiplexed). Tests
start it as a subprocess with `ThriftServer`, so a backend restart is a real
process restart, and talk to it with `make_client` (blocking Apache clients,
called from trio through `trio.to_thread`).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from thrift.protocol import TBinaryProtocol, TCompactProtocol, THeaderProtocol, TMultiplexedProtocol
from thrift.server import TServer
from thrift.Thrift import TMessageType, TProcessor
from thrift.TMultiplexedProcessor import TMultiplexedProcessor
from thrift.transport import THeaderTransport, TSocket, TTransport

from tests.peers.gen.echo import Calc, Echo, ttypes

HOST = "127.0.0.1"
TRANSPORTS = ("framed", "buffered", "header")
PROTOCOLS = ("binary", "compact")


# -- the server ---------------------------------------------------------------

_current = threading.local()  # the protocol of the call this thread is serving


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

    def headers(self) -> dict[str, str]:
        iprot = getattr(_current, "iprot", None)
        if not isinstance(iprot, THeaderProtocol.THeaderProtocol):
            return {}
        return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in iprot.get_headers().items()}


class CalcHandler:
    def add(self, a: int, b: int) -> int:
        return a + b


class _Remembering(TProcessor):
    """Lets a handler see its call's protocol (for THeader key/values)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def process(self, iprot: Any, oprot: Any) -> Any:
        _current.iprot = iprot
        return self.inner.process(iprot, oprot)


def _protocol_factory(protocol: str) -> Any:
    if protocol == "compact":
        return TCompactProtocol.TCompactProtocolFactory()
    return TBinaryProtocol.TBinaryProtocolFactory()


def build_server(port: int, transport: str, protocol: str, multiplex: bool) -> TServer.TServer:
    if multiplex:
        processor: Any = TMultiplexedProcessor()
        processor.registerProcessor("Echo", Echo.Processor(EchoHandler()))
        processor.registerProcessor("Calc", Calc.Processor(CalcHandler()))
    else:
        processor = Echo.Processor(EchoHandler())
    processor = _Remembering(processor)
    server_socket = TSocket.TServerSocket(host=HOST, port=port)
    if transport == "header":
        sub = THeaderTransport.THeaderSubprotocolID.COMPACT if protocol == "compact" else THeaderTransport.THeaderSubprotocolID.BINARY
        factory = THeaderProtocol.THeaderProtocolFactory((THeaderTransport.THeaderClientType.HEADERS,), sub)
        return TServer.TThreadedServer(processor, server_socket, TTransport.TTransportFactoryBase(), factory, daemon=True)
    tfactory = TTransport.TFramedTransportFactory() if transport == "framed" else TTransport.TBufferedTransportFactory()
    return TServer.TThreadedServer(processor, server_socket, tfactory, _protocol_factory(protocol), daemon=True)


class ThriftServer:
    """An Apache thrift server in a subprocess on a fixed port; always killed on exit."""

    def __init__(self, transport: str = "framed", protocol: str = "binary", multiplex: bool = False, port: int = 0) -> None:
        self.transport = transport
        self.protocol = protocol
        self.multiplex = multiplex
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        cmd = [sys.executable, "-m", "tests.peers.thrift_peer", "serve", "--port", str(self.port),
               "--transport", self.transport, "--protocol", self.protocol]
        if self.multiplex:
            cmd.append("--multiplex")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"thrift server exited with {self.proc.returncode}: {err}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=0.2):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"thrift server did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> ThriftServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- clients -------------------------------------------------------------------


def make_client(
    port: int,
    transport: str = "framed",
    protocol: str = "binary",
    service: str = "Echo",
    multiplexed: bool = False,
    timeout: float = 5.0,
    headers: dict[bytes, bytes] | None = None,
) -> tuple[Any, TTransport.TTransportBase]:
    """(client, transport to close): an Apache client of `service` over `transport` and `protocol`."""
    sock = TSocket.TSocket(HOST, port)
    sock.setTimeout(int(timeout * 1000))
    proto: Any
    if transport == "header":
        sub = THeaderTransport.THeaderSubprotocolID.COMPACT if protocol == "compact" else THeaderTransport.THeaderSubprotocolID.BINARY
        trans: Any = sock
        proto = THeaderProtocol.THeaderProtocol(sock, (THeaderTransport.THeaderClientType.HEADERS,), sub)
        for k, v in (headers or {}).items():
            proto.set_header(k, v)
        if headers:
            _sticky_headers(proto, headers)
    else:
        trans = TTransport.TFramedTransport(sock) if transport == "framed" else TTransport.TBufferedTransport(sock)
        proto = _protocol_factory(protocol).getProtocol(trans)
    if multiplexed:
        proto = TMultiplexedProtocol.TMultiplexedProtocol(proto, service)
    module = Calc if service == "Calc" else Echo
    trans.open()
    closer = proto.trans if transport == "header" else trans
    return module.Client(proto), closer


def _sticky_headers(proto: Any, headers: dict[bytes, bytes]) -> None:
    # THeaderTransport forgets its write headers after each frame: set them again per call.
    original = proto.writeMessageBegin

    def write_message_begin(name: str, ttype: int, seqid: int) -> None:
        for k, v in headers.items():
            proto.set_header(k, v)
        original(name, ttype, seqid)

    proto.writeMessageBegin = write_message_begin


@contextlib.contextmanager
def client(port: int, transport: str = "framed", protocol: str = "binary", **kwargs: Any) -> Iterator[Any]:
    c, trans = make_client(port, transport, protocol, **kwargs)
    try:
        yield c
    finally:
        trans.close()


# -- raw messages, for pipelining tests -----------------------------------------


def encode_call(method: str, args: object, seqid: int, protocol: str = "binary", oneway: bool = False) -> bytes:
    """An unframed call message of `method` with `args` (e.g. Echo.echo_args(data=b"x"))."""
    buf = TTransport.TMemoryBuffer()
    proto = _protocol_factory(protocol).getProtocol(buf)
    proto.writeMessageBegin(method, TMessageType.ONEWAY if oneway else TMessageType.CALL, seqid)
    args.write(proto)  # type: ignore[attr-defined]
    proto.writeMessageEnd()
    return buf.getvalue()


def decode_reply(payload: bytes, method: str, protocol: str = "binary") -> tuple[str, int, int, Any]:
    """(name, message type, seqid, the result struct or a TApplicationException)."""
    from thrift.Thrift import TApplicationException

    proto = _protocol_factory(protocol).getProtocol(TTransport.TMemoryBuffer(payload))
    name, mtype, seqid = proto.readMessageBegin()
    if mtype == TMessageType.EXCEPTION:
        result: Any = TApplicationException()
    else:
        result = getattr(Echo, f"{method}_result")()
    result.read(proto)
    proto.readMessageEnd()
    return name, mtype, seqid, result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.thrift_peer")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--transport", choices=TRANSPORTS, default="framed")
    serve.add_argument("--protocol", choices=PROTOCOLS, default="binary")
    serve.add_argument("--multiplex", action="store_true")
    a = parser.parse_args()
    server = build_server(a.port, a.transport, a.protocol, a.multiplex)
    print("ready", flush=True)
    server.serve()


if __name__ == "__main__":
    main()
