"""Active health checks (meshproxy/upstream/health.py).

The pure half (thresholds, requests, verdicts) is tested with bytes from real
encoders: grpcio-health-checking's protobuf classes and Apache thrift's
TApplicationException. The trio half runs against real peers on 127.0.0.1,
behind the real proxy: grpcio servers with grpcio-health-checking's
HealthServicer (flipped NOT_SERVING and back), an h2 server with a health
path that answers 200, 503 or never, and Apache thrift servers that are
killed and started again. Timings are short (50-100ms intervals) and every
condition is polled for with a generous timeout instead of being asserted
after a fixed sleep.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
import trio
import trio.testing
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TApplicationException, TMessageType
from thrift.transport import TTransport

from meshproxy.app import App
from meshproxy.codec import grpc as grpc_codec
from meshproxy.codec import thrift
from meshproxy.config import Cluster, HealthCheck
from meshproxy.metrics import Metrics
from meshproxy.upstream import health
from meshproxy.upstream.endpoint import EndpointState
from meshproxy.upstream.health import Thresholds
from meshproxy.values import Address
from tests import harness
from tests.h2client import H2Client
from tests.peers.thrift_peer import ThriftServer, client

HOST = harness.HOST
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Generous: a condition that takes a few 100ms intervals on an idle machine
# may take much longer on a loaded CI machine (thrift servers are subprocesses).
WAIT = 15.0


# -- Thresholds ---------------------------------------------------------------


def test_first_result_decides_at_once() -> None:
    up = Thresholds(healthy_threshold=3, unhealthy_threshold=3)
    assert up.healthy is None
    assert up.record(True) is True and up.healthy is True
    down = Thresholds(healthy_threshold=3, unhealthy_threshold=3)
    assert down.record(False) is True and down.healthy is False


def test_unhealthy_threshold_failures_in_a_row_to_leave() -> None:
    t = Thresholds(healthy_threshold=2, unhealthy_threshold=3)
    t.record(True)
    assert [t.record(False), t.record(False)] == [False, False] and t.healthy is True
    assert t.record(True) is False and t.streak == 0  # one pass in between starts the count again
    assert [t.record(False), t.record(False), t.record(False)] == [False, False, True]
    assert t.healthy is False and t.streak == 0


def test_healthy_threshold_passes_in_a_row_to_return() -> None:
    t = Thresholds(healthy_threshold=2, unhealthy_threshold=1)
    t.record(False)
    assert t.record(True) is False and t.healthy is False
    assert t.record(False) is False and t.streak == 0  # a flaky pass moves nothing
    assert [t.record(True), t.record(True)] == [False, True] and t.healthy is True
    assert (
        t.record(False) is True and t.healthy is False
    )  # unhealthy_threshold 1: one failure is enough
    assert "healthy=False" in repr(t)


def test_thresholds_of_one_follow_every_result() -> None:
    t = Thresholds(1, 1)
    assert [t.record(r) for r in (True, True, False, False, True)] == [
        True,
        False,
        True,
        False,
        True,
    ]


# -- gRPC requests and verdicts -------------------------------------------------


def _grpc_body(status: int) -> bytes:
    return grpc_codec.frame_message(
        health_pb2.HealthCheckResponse(status=status).SerializeToString()
    )


OK_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]
OK_TRAILERS = [(b"grpc-status", b"0")]


def test_grpc_request_is_a_health_check_request() -> None:
    headers, body = health.grpc_request(b"127.0.0.1:9000", b"http", "echo.Echo", 0.25)
    h = dict(headers)
    assert h[b":method"] == b"POST" and h[b":path"] == b"/grpc.health.v1.Health/Check"
    assert h[b":authority"] == b"127.0.0.1:9000" and h[b"te"] == b"trailers"
    assert h[b"content-type"] == b"application/grpc"
    assert grpc_codec.parse_timeout(h[b"grpc-timeout"]) == pytest.approx(0.25)
    flag, size = struct.unpack(">BI", body[:5])
    assert flag == 0 and size == len(body) - 5
    assert health_pb2.HealthCheckRequest.FromString(body[5:]).service == "echo.Echo"


def test_grpc_request_for_the_whole_server_is_empty() -> None:
    _, body = health.grpc_request(b"localhost", b"https", "", 1.0)
    assert body == b"\x00\x00\x00\x00\x00"  # proto3 leaves the default "" out


def test_grpc_verdicts() -> None:
    assert health.grpc_verdict(OK_HEAD, _grpc_body(SERVING), OK_TRAILERS) is None
    assert (
        health.grpc_verdict(OK_HEAD, _grpc_body(NOT_SERVING), OK_TRAILERS) == "status NOT_SERVING"
    )
    # An empty message is proto3's default: UNKNOWN, which is not SERVING.
    assert health.grpc_verdict(OK_HEAD, _grpc_body(0), OK_TRAILERS) == "status UNKNOWN"
    unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    assert (
        health.grpc_verdict(OK_HEAD, _grpc_body(unknown), OK_TRAILERS) == "status SERVICE_UNKNOWN"
    )
    assert (
        health.grpc_verdict(OK_HEAD, _grpc_body(SERVING), [(b"grpc-status", b"14")])
        == "grpc-status 14"
    )
    assert health.grpc_verdict(OK_HEAD, _grpc_body(SERVING), None) == "no grpc-status"
    assert health.grpc_verdict([(b":status", b"404")], b"", None) == "HTTP status 404"


def test_grpc_trailers_only_answer() -> None:
    # grpcio answers an unknown service with NOT_FOUND, in the head.
    head = [*OK_HEAD, (b"grpc-status", b"5"), (b"grpc-message", b"unknown%20service")]
    assert health.grpc_verdict(head, b"", None) == "grpc-status 5 (unknown service)"


def test_grpc_broken_answers_fail() -> None:
    two = _grpc_body(SERVING) * 2
    assert (
        health.grpc_verdict(OK_HEAD, two, OK_TRAILERS) == "not one uncompressed HealthCheckResponse"
    )
    compressed = grpc_codec.frame_message(b"\x08\x01", compressed=True)
    assert (
        health.grpc_verdict(OK_HEAD, compressed, OK_TRAILERS)
        == "not one uncompressed HealthCheckResponse"
    )
    truncated = _grpc_body(SERVING)[:-1]
    assert (
        health.grpc_verdict(OK_HEAD, truncated, OK_TRAILERS)
        == "not one uncompressed HealthCheckResponse"
    )
    huge = struct.pack(">BI", 0, health.MAX_RESPONSE + 1)
    assert "exceeds" in (health.grpc_verdict(OK_HEAD, huge, OK_TRAILERS) or "")
    bad = grpc_codec.frame_message(b"\x08")  # a varint cut short
    assert (health.grpc_verdict(OK_HEAD, bad, OK_TRAILERS) or "").startswith(
        "bad HealthCheckResponse"
    )


# -- HTTP requests and verdicts -------------------------------------------------


def test_http_request_and_verdicts() -> None:
    h = dict(health.http_request(b"10.0.0.1:80", b"http", "/healthz?full=1"))
    assert (h[b":method"], h[b":path"], h[b":authority"]) == (
        b"GET",
        b"/healthz?full=1",
        b"10.0.0.1:80",
    )
    assert health.http_verdict([(b":status", b"200")]) is None
    assert health.http_verdict([(b":status", b"204")]) is None
    assert health.http_verdict([(b":status", b"503")]) == "HTTP status 503"
    assert (
        health.http_verdict([(b":status", b"301")]) == "HTTP status 301"
    )  # a redirect points elsewhere
    assert health.http_verdict([]) == "HTTP status -"


def test_authority_of_a_unix_socket() -> None:
    assert health.authority(Address("unix", path="/run/app.sock")) == b"localhost"
    assert health.authority(Address("tcp", "127.0.0.1", 8080)) == b"127.0.0.1:8080"


# -- Thrift calls and verdicts ----------------------------------------------------


def test_thrift_method_name() -> None:
    assert health.thrift_method(HealthCheck("thrift", method="ping")) == "ping"
    assert health.thrift_method(HealthCheck("thrift", method="ping", service="Echo")) == "Echo:ping"
    assert (
        health.thrift_method(HealthCheck("thrift", method="ping", service="Echo:")) == "Echo:ping"
    )


@pytest.mark.parametrize(
    "transport", [thrift.FRAMED, thrift.BUFFERED, thrift.HEADER, thrift.TTHEADER]
)
@pytest.mark.parametrize("protocol", [thrift.BINARY, thrift.COMPACT])
def test_thrift_call_reads_back(transport: str, protocol: int) -> None:
    data = health.thrift_call("Echo:notes", 7, transport, protocol, "echo")
    reader = thrift.Reader(transport, protocol)
    reader.feed(data)
    msg = reader.next()
    assert msg is not None and reader.next() is None
    assert (msg.head.name, msg.head.mtype, msg.head.seqid) == ("Echo:notes", thrift.CALL, 7)


def test_thrift_call_is_what_apache_writes() -> None:
    """Framed binary: byte for byte what an Apache client sends for a method without arguments."""
    buf = TTransport.TMemoryBuffer()
    framed = TTransport.TFramedTransport(buf)
    proto = TBinaryProtocol.TBinaryProtocol(framed)
    proto.writeMessageBegin("notes", TMessageType.CALL, 3)
    proto.writeStructBegin("notes_args")
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    framed.flush()
    assert health.thrift_call("notes", 3, thrift.FRAMED, thrift.BINARY, "echo") == buf.getvalue()


def _message(mtype: int, seqid: int, body: bytes = b"\x00") -> thrift.Message:
    reader = thrift.Reader(thrift.FRAMED, thrift.BINARY)
    payload = thrift.encode_head("notes", mtype, seqid, thrift.BINARY) + body
    reader.feed(thrift.wrap(thrift.FRAMED, payload))
    msg = reader.next()
    assert msg is not None
    return msg


def _apache_exception(seqid: int, text: str) -> thrift.Message:
    buf = TTransport.TMemoryBuffer()
    framed = TTransport.TFramedTransport(buf)
    proto = TBinaryProtocol.TBinaryProtocol(framed)
    proto.writeMessageBegin("nope", TMessageType.EXCEPTION, seqid)
    TApplicationException(TApplicationException.UNKNOWN_METHOD, text).write(proto)
    proto.writeMessageEnd()
    framed.flush()
    reader = thrift.Reader(thrift.FRAMED, thrift.BINARY)
    reader.feed(buf.getvalue())
    msg = reader.next()
    assert msg is not None
    return msg


def test_thrift_verdicts() -> None:
    assert (
        health.thrift_verdict(_message(thrift.REPLY, 5, b"\x08\x00\x00\x00\x00\x00\x01\x00"), 5)
        is None
    )
    assert health.thrift_verdict(_message(thrift.REPLY, 4), 5) == "a reply with seqid 4 to call 5"
    assert health.thrift_verdict(_message(thrift.CALL, 5), 5) == "message type 1 instead of a reply"
    why = health.thrift_verdict(_apache_exception(9, "Unknown function nope"), 9)
    assert why == "TApplicationException: Unknown function nope"


# -- when checks run (trio's fake clock; endpoints that refuse at once) -----------------


async def test_first_check_at_a_random_offset_then_every_interval(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    check = HealthCheck("http", interval=10.0, timeout=1.0, unhealthy_threshold=3)
    # Unix sockets that do not exist: each connect fails at once, so the fake
    # clock moves only when the checkers sleep.
    addresses = tuple(Address("unix", path=str(tmp_path / f"none-{i}.sock")) for i in range(2))
    config = Cluster("backend", "http2", addresses, health_check=check)
    states = [EndpointState("backend", str(a)) for a in addresses]
    registry = CollectorRegistry()
    metrics = Metrics.create(registry)
    expected = random.Random(7)
    offsets = [expected.uniform(0, 10.0) for _ in states]
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        scope = health.start(config, states, nursery, metrics, None, rng=random.Random(7))
        assert scope is not None
        seen: dict[int, float] = {}
        while len(seen) < len(states):
            for i, state in enumerate(states):
                if state.checked_healthy is not None and i not in seen:
                    seen[i] = trio.current_time() - start
            await trio.sleep(0.01)
        # The first failure decides at once, whatever unhealthy_threshold says.
        assert all(s.checked_healthy is False for s in states)
        # Each endpoint got its own offset in [0, interval): the two do not check in step.
        assert sorted(seen.values()) == pytest.approx(sorted(offsets), abs=0.02)
        assert abs(seen[0] - seen[1]) > 0.05

        def count() -> float:
            labels = {"destination_service": "backend", "result": "connect_failed"}
            return registry.get_sample_value("meshproxy_health_checks_total", labels) or 0.0

        before = count()
        await trio.sleep(100.0)
        # Every interval, stretched by at most JITTER (10%): 9 to 10 checks each in 100s.
        assert 18 <= count() - before <= 20
        scope.cancel()
    # The series go with the checks.
    assert (
        registry.get_sample_value(
            "meshproxy_endpoint_healthy",
            {"destination_service": "backend", "endpoint": str(addresses[0])},
        )
        is None
    )


def test_no_health_check_starts_nothing() -> None:
    config = Cluster("backend", "http2", (Address("tcp", HOST, 1),))
    assert health.start(config, [EndpointState("backend", "x")], None, None, None) is None  # type: ignore[arg-type]


# -- peers ------------------------------------------------------------------------


async def until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    """Poll `check` (sync or async) until it is true."""
    with trio.move_on_after(timeout):
        while True:
            result = check()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await trio.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


async def endpoints(app: App) -> dict[str, dict[str, Any]]:
    """/clusters from the admin port, as {endpoint address: its state}."""
    status, body = await trio.to_thread.run_sync(
        harness.http_get, f"http://{app.admin_address}/clusters"
    )
    assert status == 200
    return {e["address"]: e for c in json.loads(body) for e in c["endpoints"]}


def check_state(app: App, address: str, state: str) -> Callable[[], Any]:
    async def check() -> bool:
        return (await endpoints(app))[address]["health_check"] == state

    return check


def healthy_gauge(app: App, cluster: str, address: str) -> float | None:
    return app.registry.get_sample_value(
        "meshproxy_endpoint_healthy", {"destination_service": cluster, "endpoint": address}
    )


def checks(app: App, cluster: str, result: str) -> float:
    return harness.metric(
        app, "meshproxy_health_checks_total", destination_service=cluster, result=result
    )


class H2Peer:
    """An h2c server: GET /healthz answers `status` (or nothing at all while
    `stall`); anything else answers 200 with the server's name. Counts the
    connections that carried health checks, and the other requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.stall = False
        self.port = 0
        self.checks = 0
        self.check_connections = 0
        self.calls = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        checked = False
        try:
            await stream.send_all(conn.data_to_send())
            while data := await stream.receive_some(65536):
                for event in conn.receive_data(data):
                    if not isinstance(event, h2.events.RequestReceived):
                        continue
                    if dict(event.headers)[b":path"] == b"/healthz":
                        self.checks += 1
                        if not checked:
                            checked = True
                            self.check_connections += 1
                        if not self.stall:
                            self._respond(conn, event.stream_id, self.status, b"")
                    else:
                        self.calls += 1
                        self._respond(conn, event.stream_id, 200, self.name.encode())
                if out := conn.data_to_send():
                    await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
            pass
        finally:
            await stream.aclose()

    @staticmethod
    def _respond(conn: h2.connection.H2Connection, sid: int, status: int, body: bytes) -> None:
        head = [(b":status", str(status).encode()), (b"content-length", str(len(body)).encode())]
        conn.send_headers(sid, head, end_stream=not body)
        if body:
            conn.send_data(sid, body, end_stream=True)


async def h2_names(port: int, n: int) -> list[str]:
    """Who answered each of `n` GETs through the proxy."""
    c = await H2Client.connect(port)
    try:
        names = []
        for _ in range(n):
            status, _, body, _ = await c.get("/who")
            assert status == 200
            names.append(body.decode())
        return names
    finally:
        await c.aclose()


# -- HTTP/2 checks, end to end ------------------------------------------------------

HTTP_CHECK = (
    "    health_check: {type: http, path: /healthz, interval: 50ms, timeout: 50ms, "
    "healthy_threshold: 2, unhealthy_threshold: 2}"
)


async def test_http_check_moves_an_endpoint_out_and_back(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        a, b = H2Peer("a"), H2Peer("b")
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        text = harness.proxy_yaml([a.address, b.address], cluster_extra=HTTP_CHECK)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        port = harness.listen_port(app)

        await until(check_state(app, a.address, "healthy"), "a healthy")
        await until(check_state(app, b.address, "healthy"), "b healthy")
        assert healthy_gauge(app, "backend", a.address) == 1
        # Checks that pass reuse their connection.
        await until(lambda: a.checks >= 4, "4 checks of a")
        assert a.check_connections == 1

        a.status = 503
        await until(check_state(app, a.address, "unhealthy"), "a unhealthy")
        state = (await endpoints(app))[a.address]
        assert state["healthy"] is False
        assert healthy_gauge(app, "backend", a.address) == 0
        assert checks(app, "backend", "failed") >= 2
        # Every check that fails closes its connection: the next one opens another.
        await until(lambda: a.check_connections >= 3, "a new connection per failed check")

        before = a.calls
        assert await h2_names(port, 20) == ["b"] * 20
        assert a.calls == before

        a.status = 200
        await until(check_state(app, a.address, "healthy"), "a healthy again")
        assert (await endpoints(app))[a.address]["healthy"] is True
        assert healthy_gauge(app, "backend", a.address) == 1
        names = await h2_names(port, 20)
        assert names.count("a") == 10 and names.count("b") == 10  # round robin over both again
        assert checks(app, "backend", "ok") >= 4
        nursery.cancel_scope.cancel()


async def test_http_check_timeout_and_connect_failure(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        a = H2Peer("a")
        await nursery.start(a.serve)
        dead = f"{HOST}:{harness.free_port()}"  # nothing listens there
        text = harness.proxy_yaml([a.address, dead], cluster_extra=HTTP_CHECK)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))

        await until(check_state(app, dead, "unhealthy"), "the dead endpoint unhealthy")
        assert checks(app, "backend", "connect_failed") >= 1
        await until(check_state(app, a.address, "healthy"), "a healthy")

        a.stall = True  # answers no check at all
        await until(check_state(app, a.address, "unhealthy"), "a unhealthy")
        assert checks(app, "backend", "timeout") >= 2
        # Each timed-out check closed its connection.
        await until(lambda: a.check_connections >= 3, "a new connection per timed-out check")
        a.stall = False
        await until(check_state(app, a.address, "healthy"), "a healthy again")
        nursery.cancel_scope.cancel()


async def test_every_endpoint_unhealthy_still_routes_panic(tmp_path: Path) -> None:
    """With no endpoint passing its checks, calls go to them all the same
    (Envoy's panic routing) rather than fail: checks that all fail at once say
    more often that the checks are wrong than that every endpoint is."""
    async with trio.open_nursery() as nursery:
        a = H2Peer("a")
        a.status = 500
        await nursery.start(a.serve)
        text = harness.proxy_yaml([a.address], cluster_extra=HTTP_CHECK)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        await until(check_state(app, a.address, "unhealthy"), "a unhealthy")
        assert await h2_names(harness.listen_port(app), 3) == ["a"] * 3
        nursery.cancel_scope.cancel()


async def test_checks_stop_with_the_cluster(tmp_path: Path) -> None:
    """A reload that drops the cluster's checks closes their connections and
    takes the endpoint's health series out of /metrics."""
    async with trio.open_nursery() as nursery:
        a = H2Peer("a")
        await nursery.start(a.serve)
        path = harness.write_config(
            tmp_path, harness.proxy_yaml([a.address], cluster_extra=HTTP_CHECK)
        )
        app = await harness.start_proxy(nursery, path)
        await until(check_state(app, a.address, "healthy"), "a healthy")
        # A changed check rebuilds the cluster: the old checks stop and remove
        # the endpoint's series while the new ones set it; it must stay exported.
        faster = HTTP_CHECK.replace("interval: 50ms", "interval: 60ms")
        harness.write_config(tmp_path, harness.proxy_yaml([a.address], cluster_extra=faster))
        assert await app.reload()
        await trio.sleep(0.3)
        await until(
            lambda: healthy_gauge(app, "backend", a.address) == 1,
            "the series set by the new checks",
        )
        assert (await endpoints(app))[a.address]["health_check"] == "healthy"
        harness.write_config(tmp_path, harness.proxy_yaml([a.address]))
        assert await app.reload()
        await until(lambda: healthy_gauge(app, "backend", a.address) is None, "the series removed")
        checked = a.checks
        await trio.sleep(0.3)
        assert a.checks == checked
        assert (await endpoints(app))[a.address]["health_check"] == "unchecked"
        nursery.cancel_scope.cancel()


# -- gRPC checks, end to end ------------------------------------------------------


class GrpcPeer:
    """A grpcio server: echo.Echo/Who answers its name; grpc.health.v1 says
    what `health` was last set to."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health = grpc_health.HealthServicer()
        self.health.set("echo.Echo", SERVING)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        who = grpc.unary_unary_rpc_method_handler(lambda request, context: name.encode())
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("echo.Echo", {"Who": who}),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


@pytest.fixture
def grpc_peers() -> Iterator[tuple[GrpcPeer, GrpcPeer]]:
    a, b = GrpcPeer("a"), GrpcPeer("b")
    try:
        yield a, b
    finally:
        a.server.stop(0)
        b.server.stop(0)


def grpc_names(port: int, n: int) -> list[str]:
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        who = channel.unary_unary("/echo.Echo/Who")
        return [who(b"", timeout=5).decode() for _ in range(n)]


async def test_grpc_check_moves_an_endpoint_out_and_back(
    tmp_path: Path, grpc_peers: tuple[GrpcPeer, GrpcPeer]
) -> None:
    a, b = grpc_peers
    check = (
        "    health_check: {type: grpc, service: echo.Echo, interval: 100ms, timeout: 100ms, "
        "healthy_threshold: 2, unhealthy_threshold: 2}"
    )
    async with trio.open_nursery() as nursery:
        text = harness.proxy_yaml([a.address, b.address], cluster_extra=check)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        port = harness.listen_port(app)
        await until(check_state(app, a.address, "healthy"), "a healthy")
        await until(check_state(app, b.address, "healthy"), "b healthy")

        a.health.set("echo.Echo", NOT_SERVING)
        await until(check_state(app, a.address, "unhealthy"), "a unhealthy")
        assert healthy_gauge(app, "backend", a.address) == 0
        assert checks(app, "backend", "failed") >= 2
        assert await trio.to_thread.run_sync(grpc_names, port, 20) == ["b"] * 20

        a.health.set("echo.Echo", SERVING)
        await until(check_state(app, a.address, "healthy"), "a healthy again")
        assert healthy_gauge(app, "backend", a.address) == 1
        names = await trio.to_thread.run_sync(grpc_names, port, 20)
        assert names.count("a") == 10 and names.count("b") == 10
        assert checks(app, "backend", "ok") >= 4
        nursery.cancel_scope.cancel()


async def test_grpc_check_of_a_service_the_server_does_not_know(
    tmp_path: Path, grpc_peers: tuple[GrpcPeer, GrpcPeer]
) -> None:
    a, _ = grpc_peers
    check = "    health_check: {type: grpc, service: no.Such, interval: 50ms, timeout: 50ms}"
    async with trio.open_nursery() as nursery:
        text = harness.proxy_yaml([a.address], cluster_extra=check)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        await until(check_state(app, a.address, "unhealthy"), "a unhealthy")
        assert checks(app, "backend", "failed") >= 1 and checks(app, "backend", "ok") == 0
        nursery.cancel_scope.cancel()


# -- Thrift checks, end to end ------------------------------------------------------


def thrift_yaml(
    ports: list[int], check: str, transport: str = "framed", protocol: str = "binary"
) -> str:
    endpoints = ", ".join(f'"{HOST}:{p}"' for p in ports)
    return f"""\
node: {{service: test-caller}}
admin: {{address: "{HOST}:0"}}
access_log: {{enabled: false}}
drain_timeout: 2s
listeners:
  - name: test
    direction: egress
    address: "{HOST}:0"
    protocol: thrift
    thrift: {{transport: auto, protocol: auto, service: Echo}}
    routes:
      - match: {{}}
        cluster: echo
clusters:
  - name: echo
    protocol: thrift
    thrift: {{transport: {transport}, protocol: {protocol}}}
    endpoints: [{endpoints}]
    health_check: {check}
"""


@pytest.fixture
def thrift_servers() -> Iterator[list[ThriftServer]]:
    started: list[ThriftServer] = []
    yield started
    for s in started:
        s.stop()


def thrift_server(servers: list[ThriftServer], *args: Any) -> ThriftServer:
    s = ThriftServer(*args)
    s.start()
    servers.append(s)
    return s


def notes(port: int) -> int:
    with client(port) as c:
        return int(c.notes())


async def test_thrift_check_follows_a_server_that_stops_and_starts(
    tmp_path: Path, thrift_servers: list[ThriftServer]
) -> None:
    a, b = thrift_server(thrift_servers), thrift_server(thrift_servers)
    check = "{type: thrift, method: notes, interval: 100ms, timeout: 100ms, healthy_threshold: 2, unhealthy_threshold: 2}"
    async with trio.open_nursery() as nursery:
        app = await harness.start_proxy(
            nursery, harness.write_config(tmp_path, thrift_yaml([a.port, b.port], check))
        )
        port = harness.listen_port(app)
        a_address, b_address = f"{HOST}:{a.port}", f"{HOST}:{b.port}"
        await until(check_state(app, a_address, "healthy"), "a healthy")
        await until(check_state(app, b_address, "healthy"), "b healthy")

        b.stop()
        await until(check_state(app, b_address, "unhealthy"), "b unhealthy")
        assert checks(app, "echo", "connect_failed") >= 1
        assert healthy_gauge(app, "echo", b_address) == 0

        # Calls go to a only: none of them even tries to connect to b.
        failures = harness.metric(
            app, "meshproxy_upstream_connect_failures_total", destination_service="echo"
        )

        def echo_calls() -> list[bytes]:
            with client(port) as c:
                return [c.echo(b"x%d" % i) for i in range(10)]

        assert await trio.to_thread.run_sync(echo_calls) == [b"x%d" % i for i in range(10)]
        assert (
            harness.metric(
                app, "meshproxy_upstream_connect_failures_total", destination_service="echo"
            )
            == failures
        )

        await trio.to_thread.run_sync(b.start)
        await until(check_state(app, b_address, "healthy"), "b healthy again")
        assert healthy_gauge(app, "echo", b_address) == 1

        def note_calls() -> None:
            with client(port) as c:
                for i in range(10):
                    c.note(f"note {i}")

        await trio.to_thread.run_sync(note_calls)
        # Oneway calls through the proxy, counted by each server: b takes calls again.
        await until(lambda: trio.to_thread.run_sync(notes, b.port), "a call reaching b")
        assert checks(app, "echo", "ok") >= 4
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("transport", "protocol", "multiplex"),
    [("buffered", "compact", False), ("header", "binary", False), ("framed", "binary", True)],
)
async def test_thrift_check_speaks_the_cluster_transport(
    tmp_path: Path,
    thrift_servers: list[ThriftServer],
    transport: str,
    protocol: str,
    multiplex: bool,
) -> None:
    s = thrift_server(thrift_servers, transport, protocol, multiplex)
    service = "service: Echo, " if multiplex else ""
    check = f"{{type: thrift, {service}method: notes, interval: 50ms, timeout: 50ms}}"
    yaml = thrift_yaml([s.port], check, transport, protocol)
    async with trio.open_nursery() as nursery:
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, yaml))
        await until(check_state(app, f"{HOST}:{s.port}", "healthy"), "the server healthy")
        assert checks(app, "echo", "failed") == 0
        nursery.cancel_scope.cancel()


async def test_thrift_check_of_an_unknown_method_fails(
    tmp_path: Path, thrift_servers: list[ThriftServer]
) -> None:
    s = thrift_server(thrift_servers)
    check = "{type: thrift, method: nope, interval: 50ms, timeout: 50ms}"
    async with trio.open_nursery() as nursery:
        app = await harness.start_proxy(
            nursery, harness.write_config(tmp_path, thrift_yaml([s.port], check))
        )
        await until(check_state(app, f"{HOST}:{s.port}", "unhealthy"), "the server unhealthy")
        assert checks(app, "echo", "failed") >= 1 and checks(app, "echo", "ok") == 0
        state = (await endpoints(app))[f"{HOST}:{s.port}"]
        assert state["healthy"] is False
        nursery.cancel_scope.cancel()
