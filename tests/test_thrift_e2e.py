"""Thrift through the proxy, with real peers: Apache thrift clients and servers.

The servers are `tests/peers/thrift_peer.py` subprocesses (Apache
TThreadedServer); the clients are Apache's blocking clients run in threads.
TTHeader has no Python peer: its frames are written out here from the byte
layout of cloudwego/gopkg protocol/ttheader/encode.go (see `ttheader_call`),
and checked by an Apache THeader server behind the proxy.
"""

from __future__ import annotations

import socket
import struct
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from thrift.Thrift import TApplicationException, TMessageType

from meshproxy.app import App
from tests.harness import (
    HOST,
    eventually,
    free_port,
    listen_port,
    metric,
    start_proxy,
    write_config,
)
from tests.peers.gen.echo import Echo, ttypes
from tests.peers.thrift_peer import (
    PROTOCOLS,
    TRANSPORTS,
    ThriftServer,
    client,
    decode_reply,
    encode_call,
)

MIB = 1024 * 1024


def thrift_yaml(
    clusters: dict[str, tuple[str, int]],
    routes: str = "      - match: {}\n        cluster: echo\n",
    listener: str = "{transport: auto, protocol: auto, service: Echo}",
    extra_listeners: str = "",
    access_log: str = "{enabled: false}",
) -> str:
    """One Thrift listener named test; clusters: name -> (transport, port)."""
    cluster_text = "".join(
        f"""\
  - name: {name}
    protocol: thrift
    thrift: {{transport: {transport}}}
    endpoints: ["{HOST}:{port}"]
"""
        for name, (transport, port) in clusters.items()
    )
    return f"""\
node: {{service: test-caller}}
admin: {{address: "{HOST}:0"}}
access_log: {access_log}
drain_timeout: 2s
listeners:
  - name: test
    direction: egress
    address: "{HOST}:0"
    protocol: thrift
    thrift: {listener}
    routes:
{routes}{extra_listeners}
clusters:
{cluster_text}"""


async def proxy(nursery: trio.Nursery, tmp_path: Path, text: str) -> tuple[App, int]:
    app = await start_proxy(nursery, write_config(tmp_path, text))
    return app, listen_port(app)


def run(fn: object, *args: object) -> object:
    return trio.to_thread.run_sync(fn, *args)  # type: ignore[arg-type]


@pytest.fixture
def servers() -> Iterator[list[ThriftServer]]:
    started: list[ThriftServer] = []
    yield started
    for s in started:
        s.stop()


def server(servers: list[ThriftServer], transport: str = "framed", protocol: str = "binary", multiplex: bool = False) -> ThriftServer:
    s = ThriftServer(transport, protocol, multiplex)
    s.start()
    servers.append(s)
    return s


# -- every transport x protocol ----------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_transport_and_protocol(
    nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer], transport: str, protocol: str
) -> None:
    backend = server(servers, transport, protocol)
    app, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": (transport, backend.port)}))
    big = bytes(range(256)) * (4 * 1024)  # 1 MiB

    def calls() -> dict[str, object]:
        headers = {b"x-user": b"42"} if transport == "header" else None
        with client(port, transport, protocol, headers=headers) as c:
            out: dict[str, object] = {"small": c.echo(b"hi"), "big": c.echo(big), "greet": c.greet("ann")}
            try:
                c.greet("boom")
            except ttypes.Oops as e:
                out["oops"] = e.why
            c.note("a oneway call, then a call on the same connection")
            out["notes"] = c.notes()
            out["headers"] = c.headers()
            return out

    out = await run(calls)
    assert out["small"] == b"hi" and out["big"] == big and out["greet"] == "hello ann"  # type: ignore[index]
    assert out["oops"] == "boom" and out["notes"] == 1  # type: ignore[index]
    if transport == "header":
        assert out["headers"] == {"x-user": "42"}  # type: ignore[index]
    labels = {"listener": "test", "direction": "egress", "service": "Echo"}
    await eventually(lambda: metric(app, "meshproxy_thrift_calls_total", **labels, method="note", result="oneway") == 1)
    assert metric(app, "meshproxy_thrift_calls_total", **labels, method="echo", result="reply") == 2
    # A declared exception is a normal reply; the method label is the bare method name.
    assert metric(app, "meshproxy_thrift_calls_total", **labels, method="greet", result="reply") == 2
    assert metric(app, "meshproxy_requests_total", listener="test", direction="egress", route="test.0",
                  destination_service="echo", response_code="200", grpc_response_status="-") == 7


# -- translation between framings -------------------------------------------------


@pytest.mark.parametrize(("down", "up"), [("framed", "header"), ("header", "framed"), ("buffered", "framed"), ("framed", "buffered")])
async def test_translation_between_framings(
    nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer], down: str, up: str
) -> None:
    backend = server(servers, up, "compact")
    _, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": (up, backend.port)}))

    def calls() -> tuple[bytes, str]:
        with client(port, down, "compact") as c:
            return c.echo(b"x" * 70000), c.greet("bo")

    assert await run(calls) == (b"x" * 70000, "hello bo")


def ttheader_call(payload: bytes, seqid: int, strings: dict[bytes, bytes], ints: dict[int, bytes], flags: int = 0) -> bytes:
    """A TTHeader frame as Kitex writes it (gopkg protocol/ttheader/encode.go):
    LENGTH u32 | 0x1000 | FLAGS u16 | SEQID u32 | HEADER_SIZE u16 (words) | protocol id u8 |
    0 transforms | 0x01 string kv block | 0x10 int kv block | zero padding | payload."""
    info = b"\x00\x00"
    if strings:
        info += b"\x01" + struct.pack("!H", len(strings))
        for k, v in strings.items():
            info += struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v
    if ints:
        info += b"\x10" + struct.pack("!H", len(ints))
        for ik, v in ints.items():
            info += struct.pack("!HH", ik, len(v)) + v
    info += b"\x00" * (-len(info) % 4)
    rest = struct.pack("!HHIH", 0x1000, flags, seqid, len(info) // 4) + info + payload
    return struct.pack("!I", len(rest)) + rest


def read_frame(sock: socket.socket) -> bytes:
    head = _read_exactly(sock, 4)
    return head + _read_exactly(sock, struct.unpack("!I", head)[0])


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def ttheader_reply(frame: bytes) -> tuple[int, int, dict[bytes, bytes], bytes]:
    """(flags, seqid, string key/values, payload) of a TTHeader reply, per the same layout."""
    _, magic, flags, seqid, words = struct.unpack_from("!IHHIH", frame)
    assert magic == 0x1000
    end = 14 + words * 4
    pos, strings = 16, {}
    while pos < end and frame[pos] != 0:
        assert frame[pos] == 0x01, "only string key/values expected in replies"
        (count,) = struct.unpack_from("!H", frame, pos + 1)
        pos += 3
        for _ in range(count):
            (n,) = struct.unpack_from("!H", frame, pos)
            k = frame[pos + 2 : pos + 2 + n]
            pos += 2 + n
            (n,) = struct.unpack_from("!H", frame, pos)
            strings[k] = frame[pos + 2 : pos + 2 + n]
            pos += 2 + n
    return flags, seqid, strings, frame[end:]


async def test_ttheader_client_through_to_a_theader_server(
    nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]
) -> None:
    """TTHeader in, THeader out: string keys pass as they are, integer keys as tt.NAME."""
    backend = server(servers, "header", "binary")
    _, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("header", backend.port)}))
    payload = encode_call("headers", Echo.headers_args(), 77)
    frame = ttheader_call(payload, 77, {b"x-user": b"7"}, {6: b"Echo", 9: b"headers", 12: b"3000", 200: b"?"})

    def exchange() -> bytes:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(frame)
            return read_frame(s)

    reply = await run(exchange)
    _, seqid, _, body = ttheader_reply(reply)  # type: ignore[arg-type]
    name, mtype, body_seqid, result = decode_reply(body, "headers")
    assert (name, mtype, seqid, body_seqid) == ("headers", TMessageType.REPLY, 77, 77)
    assert result.success == {
        "x-user": "7", "tt.to_service": "Echo", "tt.to_method": "headers", "tt.rpc_timeout": "3000", "tt.200": "?",
    }


async def test_framed_client_gains_a_ttheader_with_its_identity(
    nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]
) -> None:
    """framed -> (hop 1) -> TTHeader -> (hop 2) -> THeader -> Apache server: what Kitex would have seen."""
    backend = server(servers, "header", "binary")
    hop2_port = free_port()
    hop2 = f"""\
  - name: hop2
    direction: ingress
    address: "{HOST}:{hop2_port}"
    protocol: thrift
    thrift: {{transport: ttheader}}
    routes:
      - match: {{}}
        cluster: theader
"""
    text = thrift_yaml(
        {"hop": ("ttheader", hop2_port), "theader": ("header", backend.port)},
        routes="      - match: {}\n        cluster: hop\n        timeout: 4s\n",
        extra_listeners=hop2,
    )
    app = await start_proxy(nursery, write_config(tmp_path, text))

    def call() -> dict[str, str]:
        with client(listen_port(app), "framed", "binary") as c:
            return c.headers()  # type: ignore[no-any-return]

    seen = await run(call)
    assert seen["tt.from_service"] == "test-caller"
    assert seen["tt.to_service"] == "Echo" and seen["tt.to_method"] == "headers"
    assert 3000 <= int(seen["tt.rpc_timeout"]) <= 4000


# -- routing, local replies ----------------------------------------------------------


async def test_routes_by_service_and_method(nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]) -> None:
    backend = server(servers, "framed", "binary", multiplex=True)
    routes = textwrap.indent(
        "- match: {service: Calc}\n  cluster: echo\n- match: {service: Echo, method: echo}\n  cluster: echo\n", "      "
    )
    app, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}, routes=routes))

    def calls() -> tuple[int, bytes, str]:
        with client(port, service="Calc", multiplexed=True) as calc:
            total = calc.add(2, 40)
        with client(port, service="Echo", multiplexed=True) as echo:
            data = echo.echo(b"ok")
            try:
                echo.greet("x")
            except TApplicationException as e:
                return total, data, f"{e.type}:{e.message}"
        return total, data, "no exception"

    total, data, failure = await run(calls)  # type: ignore[misc]
    assert (total, data) == (42, b"ok")
    assert failure == f"{TApplicationException.UNKNOWN_METHOD}:no_route: no route for /Echo/greet"
    labels = {"listener": "test", "direction": "egress"}
    assert metric(app, "meshproxy_thrift_calls_total", **labels, service="Calc", method="add", result="reply") == 1
    assert metric(app, "meshproxy_thrift_calls_total", **labels, service="Echo", method="greet", result="no_route") == 1


async def test_upstream_down_then_restarted(nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]) -> None:
    backend = server(servers)
    _, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}))

    def call() -> object:
        try:
            with client(port) as c:
                return c.echo(b"1")
        except TApplicationException as e:
            return (e.type, e.message)

    assert await run(call) == b"1"
    backend.stop()
    down = await run(call)
    assert down[0] == TApplicationException.INTERNAL_ERROR and down[1].startswith("upstream_unavailable: ")  # type: ignore[index]
    backend.start()
    with trio.fail_after(10):
        while (result := await run(call)) != b"1":  # the endpoint's connect backoff may last a moment
            await trio.sleep(0.2)
    assert result == b"1"


async def test_slow_call_times_out_and_the_connection_goes_on(
    nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]
) -> None:
    backend = server(servers)
    routes = "      - match: {method: sleep}\n        cluster: echo\n        timeout: 300ms\n      - match: {}\n        cluster: echo\n"
    app, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}, routes=routes))

    def calls() -> tuple[object, float, bytes]:
        with client(port) as c:
            start = time.monotonic()
            try:
                c.sleep(3000)
                failure: object = "no timeout"
            except TApplicationException as e:
                failure = (e.type, e.message)
            took = time.monotonic() - start
            return failure, took, c.echo(b"after")

    failure, took, after = await run(calls)  # type: ignore[misc]
    assert failure == (TApplicationException.INTERNAL_ERROR, "timeout: deadline exceeded")
    assert took < 2.5 and after == b"after"
    assert metric(app, "meshproxy_local_replies_total", listener="test", reason="timeout") == 1


# -- connections ----------------------------------------------------------------------


async def test_pipelined_calls_come_back_in_order(nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]) -> None:
    """A slow call first, quick ones after it on the same connection: the quick replies wait their turn."""
    backend = server(servers)
    _, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}))
    frames = [encode_call("sleep", Echo.sleep_args(ms=300), 1)]
    frames += [encode_call("echo", Echo.echo_args(data=str(i).encode()), i) for i in range(2, 12)]

    def exchange() -> list[tuple[str, int, int, object]]:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(b"".join(struct.pack("!I", len(f)) + f for f in frames))
            return [decode_reply(read_frame(s)[4:], "sleep" if i == 0 else "echo") for i in range(len(frames))]

    replies = await run(exchange)
    assert [(r[0], r[2]) for r in replies] == [("sleep", 1)] + [("echo", i) for i in range(2, 12)]  # type: ignore[union-attr]
    assert [r[3].success for r in replies[1:]] == [str(i).encode() for i in range(2, 12)]  # type: ignore[index,union-attr]


async def test_out_of_order_replies_for_clients_that_ask(nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]) -> None:
    """TTHeader flag 0x01 (HeaderFlagSupportOutOfOrder): a quick reply overtakes a slow one."""
    backend = server(servers)
    _, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}))
    slow = ttheader_call(encode_call("sleep", Echo.sleep_args(ms=500), 1), 1, {}, {}, flags=0x01)
    quick = ttheader_call(encode_call("echo", Echo.echo_args(data=b"q"), 2), 2, {}, {}, flags=0x01)

    def exchange() -> list[int]:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(slow + quick)
            return [ttheader_reply(read_frame(s))[1] for _ in range(2)]

    assert await run(exchange) == [2, 1]


async def test_a_call_a_filter_holds_does_not_hold_up_its_connection(
        nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]) -> None:
    """A call waiting in a filter (here a fault delay) runs as a task of its own:
    the connection goes on with the calls behind it."""
    backend = server(servers)
    routes = ("      - match: {method: echo, headers: [{name: x-hold, present: true}]}\n        cluster: echo\n"
              "        filters: [{name: fault, delay: {duration: 500ms}}]\n"
              "      - match: {}\n        cluster: echo\n")
    _, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}, routes))
    held = ttheader_call(encode_call("echo", Echo.echo_args(data=b"h"), 1), 1, {b"x-hold": b"1"}, {}, flags=0x01)
    quick = ttheader_call(encode_call("echo", Echo.echo_args(data=b"q"), 2), 2, {}, {}, flags=0x01)

    def exchange() -> list[int]:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(held + quick)
            return [ttheader_reply(read_frame(s))[1] for _ in range(2)]

    assert await run(exchange) == [2, 1]


async def test_fifty_concurrent_connections(nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]) -> None:
    backend = server(servers)
    app, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}))
    results: list[bool] = []

    def one(i: int) -> None:
        with client(port) as c:
            results.append(all(c.echo(f"{i}-{k}".encode()) == f"{i}-{k}".encode() for k in range(20)))

    limiter = trio.CapacityLimiter(50)
    async with trio.open_nursery() as n:
        for i in range(50):
            n.start_soon(lambda i=i: trio.to_thread.run_sync(one, i, limiter=limiter))
    assert results == [True] * 50
    labels = {"listener": "test", "direction": "egress", "service": "Echo", "method": "echo", "result": "reply"}
    assert metric(app, "meshproxy_thrift_calls_total", **labels) == 1000
    # Calls from 50 downstream connections share at most max_connections_per_endpoint upstream.
    assert metric(app, "meshproxy_upstream_connections_total", destination_service="echo") <= 8


async def test_client_that_leaves_has_its_call_forgotten(nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]) -> None:
    backend = server(servers)
    app, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}))
    call = encode_call("sleep", Echo.sleep_args(ms=400), 5)

    def leave() -> None:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(struct.pack("!I", len(call)) + call)
            time.sleep(0.1)

    await run(leave)
    labels = {"listener": "test", "direction": "egress", "service": "Echo", "method": "sleep", "result": "downstream_closed"}
    await eventually(lambda: metric(app, "meshproxy_thrift_calls_total", **labels) == 1)
    cluster = app._clusters.clusters["echo"]  # type: ignore[union-attr]
    assert all(not link.waiting for pool in cluster.pools for _, link in pool.links)
    # The late reply, when it comes, is dropped, and the upstream connection serves on.
    await trio.sleep(0.5)

    def again() -> bytes:
        with client(port) as c:
            return c.echo(b"still here")  # type: ignore[no-any-return]

    assert await run(again) == b"still here"


# -- bad input -------------------------------------------------------------------------


async def test_bad_frames_close_only_their_connection(nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]) -> None:
    backend = server(servers)
    app, port = await proxy(
        nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}, listener="{transport: framed, max_frame_size: 64KiB}")
    )

    def scenario() -> dict[str, object]:
        out: dict[str, object] = {}
        with client(port) as good:
            assert good.echo(b"before") == b"before"
            # 1. A frame announcing 1 GiB: refused from its first 4 bytes, nothing buffered.
            with socket.create_connection((HOST, port), timeout=5) as s:
                s.sendall(struct.pack("!I", 1 << 30) + b"\x80\x01")
                out["huge"] = s.recv(100)
            # 2. A well-formed frame whose message type is 9: PROTOCOL_ERROR with its seqid, then close.
            bad = bytearray(encode_call("echo", Echo.echo_args(data=b"x"), 33))
            bad[3] = 9
            with socket.create_connection((HOST, port), timeout=5) as s:
                s.sendall(struct.pack("!I", len(bad)) + bytes(bad))
                reply = read_frame(s)
                out["bad_type"] = decode_reply(reply[4:], "echo")
                out["bad_type_then"] = s.recv(100)
            # 3. Not Thrift at all.
            with socket.create_connection((HOST, port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                out["http"] = s.recv(100)
            out["after"] = good.echo(b"after")
        return out

    out = await run(scenario)
    assert out["huge"] == b"" and out["http"] == b"" and out["bad_type_then"] == b""  # type: ignore[index]
    _, mtype, seqid, exc = out["bad_type"]  # type: ignore[index,misc]
    assert (mtype, seqid, exc.type) == (TMessageType.EXCEPTION, 33, TApplicationException.PROTOCOL_ERROR)
    assert out["after"] == b"after"  # type: ignore[index]
    assert metric(app, "meshproxy_downstream_protocol_errors_total", listener="test", scope="connection") == 3


async def test_access_log_line_for_a_thrift_call(nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]) -> None:
    import json

    backend = server(servers, "framed", "compact")
    log_path = tmp_path / "access.log"
    app, port = await proxy(
        nursery, tmp_path,
        thrift_yaml({"echo": ("framed", backend.port)}, access_log=f"{{enabled: true, path: {log_path}}}"),
    )

    def call() -> bytes:
        with client(port, "buffered", "compact") as c:
            return c.echo(b"logged")  # type: ignore[no-any-return]

    assert await run(call) == b"logged"
    app.access_log.flush()
    line = json.loads(log_path.read_text().splitlines()[0])
    assert line["protocol"] == "thrift" and line["path"] == "/Echo/echo" and line["method"] == "call"
    assert line["thrift_transport"] == "buffered" and line["result"] == "reply" and line["cluster"] == "echo"
    assert line["upstream"] == f"{HOST}:{backend.port}" and line["status"] == 200



async def test_a_method_the_server_does_not_know_is_its_own_reply(
    nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]
) -> None:
    backend = server(servers)
    app, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}))
    call = encode_call("nosuch", Echo.notes_args(), 9)

    def exchange() -> tuple[str, int, int, object]:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(struct.pack("!I", len(call)) + call)
            return decode_reply(read_frame(s)[4:], "notes")

    name, mtype, seqid, exc = await run(exchange)  # type: ignore[misc]
    assert (name, mtype, seqid, exc.type) == ("nosuch", TMessageType.EXCEPTION, 9, TApplicationException.UNKNOWN_METHOD)
    labels = {"listener": "test", "direction": "egress", "service": "Echo", "method": "nosuch", "result": "exception"}
    assert metric(app, "meshproxy_thrift_calls_total", **labels) == 1


async def test_ttheader_local_reply_carries_biz_status(nursery: trio.Nursery, tmp_path: Path) -> None:
    routes = "      - match: {method: echo}\n        cluster: echo\n"
    _, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", 1)}, routes=routes))
    frame = ttheader_call(encode_call("greet", Echo.greet_args(name="x"), 12), 12, {}, {})

    def exchange() -> bytes:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(frame)
            return read_frame(s)

    _, seqid, strings, body = ttheader_reply(await run(exchange))  # type: ignore[arg-type]
    _, mtype, body_seqid, exc = decode_reply(body, "greet")
    assert (seqid, mtype, body_seqid, exc.type) == (12, TMessageType.EXCEPTION, 12, TApplicationException.UNKNOWN_METHOD)
    assert strings == {b"biz-status": b"404", b"biz-message": b"no_route: no route for /Echo/greet"}


async def test_more_pipelined_calls_than_the_connection_limit(
    nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]
) -> None:
    """Past max_pending_per_connection the connection is not read until replies free room; nothing stalls."""
    backend = server(servers)
    _, port = await proxy(
        nursery, tmp_path,
        thrift_yaml({"echo": ("framed", backend.port)}, listener="{transport: framed, max_pending_per_connection: 4}"),
    )
    frames = [encode_call("echo", Echo.echo_args(data=str(i).encode()), i) for i in range(1, 41)]

    def exchange() -> list[int]:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(b"".join(struct.pack("!I", len(f)) + f for f in frames))
            return [decode_reply(read_frame(s)[4:], "echo")[2] for _ in frames]

    assert await run(exchange) == list(range(1, 41))


async def test_drain_lets_calls_in_flight_finish(nursery: trio.Nursery, tmp_path: Path, servers: list[ThriftServer]) -> None:
    backend = server(servers)
    app, port = await proxy(nursery, tmp_path, thrift_yaml({"echo": ("framed", backend.port)}))
    finished: list[object] = []

    def slow_call() -> None:
        with client(port) as c:
            c.sleep(400)
            finished.append("replied")

    async with trio.open_nursery() as n:
        n.start_soon(run, slow_call)
        await eventually(lambda: metric(app, "meshproxy_upstream_streams_active", destination_service="echo") == 1)
        await app.listeners["test"].drain(3.0)
    assert finished == ["replied"]
    with pytest.raises(OSError):
        socket.create_connection((HOST, port), timeout=1).close()
