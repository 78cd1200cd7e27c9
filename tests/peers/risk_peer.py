"""Real risk services for the risk_control tests: a grpcio server of
meshproxy.risk.v1.RiskService and a small HTTP/2 JSON server (trio + h2).

Both parse what the proxy sends with the protobuf runtime (risk_pb2, from
proto/meshproxy/risk/v1/risk.proto), so a test passes only if meshproxy's
hand-written codec agrees with protoc's. Regenerate risk_pb2.py with:

    python -m grpc_tools.protoc -I proto --python_out=DIR proto/meshproxy/risk/v1/risk.proto
    cp DIR/meshproxy/risk/v1/risk_pb2.py tests/peers/gen/risk_pb2.py

The policy decides by the `x-risk` header or metadata the check carries:
deny, review, bad (a reply with no verdict), hold (answer only once the
test releases it), fail (gRPC UNAVAILABLE / HTTP 503); anything else is
allowed. `hold_all` holds every check; `gather` (a Barrier) answers a check
(but one marked solo) only once that many are in the service at the same
time, else counts it in `ungathered`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio
from google.protobuf import json_format

from tests.peers.gen import risk_pb2

HOST = "127.0.0.1"
SERVICE = "meshproxy.risk.v1.RiskService"
HOLD_LIMIT = 20.0  # a held check is answered after this anyway, so no thread hangs forever


class Unavailable(Exception):
    pass


class RiskPolicy:
    """What the risk service answers, and what it saw (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[risk_pb2.CheckRequest] = []
        self.answered = 0
        self.hold_all = False
        self.release = threading.Event()
        self.gather: threading.Barrier | None = None
        self.ungathered = 0

    @property
    def seen(self) -> int:
        with self._lock:
            return len(self.requests)

    def decide(self, request: risk_pb2.CheckRequest) -> risk_pb2.CheckResponse:
        with self._lock:
            self.requests.append(request)
        value = next((h.value for h in request.headers if h.name == "x-risk"), b"").decode()
        if self.gather is not None and value != "solo":
            try:
                self.gather.wait(HOLD_LIMIT / 4)
            except threading.BrokenBarrierError:
                with self._lock:
                    self.ungathered += 1
        try:
            if value == "hold" or self.hold_all:
                self.release.wait(HOLD_LIMIT)
                return risk_pb2.CheckResponse(verdict=risk_pb2.VERDICT_ALLOW, reason="held")
            if value == "fail":
                raise Unavailable
            if value == "deny":
                return risk_pb2.CheckResponse(verdict=risk_pb2.VERDICT_DENY, reason="test_deny")
            if value == "review":
                return risk_pb2.CheckResponse(verdict=risk_pb2.VERDICT_REVIEW, reason="test_review")
            if value == "bad":
                return risk_pb2.CheckResponse(reason="no verdict")
            return risk_pb2.CheckResponse(verdict=risk_pb2.VERDICT_ALLOW)
        finally:
            with self._lock:
                self.answered += 1


@contextmanager
def grpc_risk_server(policy: RiskPolicy, port: int = 0) -> Iterator[tuple[int, grpc.Server]]:
    """A grpcio server of RiskService/Check on 127.0.0.1; yields (port, server)."""

    def check(request: risk_pb2.CheckRequest, context: grpc.ServicerContext) -> risk_pb2.CheckResponse:
        try:
            return policy.decide(request)
        except Unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "told to fail")
            raise

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Check": grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=risk_pb2.CheckRequest.FromString,
            response_serializer=risk_pb2.CheckResponse.SerializeToString),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{HOST}:{port}")
    server.start()
    try:
        yield bound, server
    finally:
        policy.release.set()
        server.stop(0)


class JsonRiskServer:
    """An h2c server answering POST `path` with the JSON mapping of a CheckResponse."""

    def __init__(self, policy: RiskPolicy, path: str = "/v1/risk/check") -> None:
        self.policy = policy
        self.path = path
        self.content_types: list[bytes] = []
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        lock = trio.Lock()
        heads: dict[int, dict[bytes, bytes]] = {}
        bodies: dict[int, bytearray] = {}

        async def flush() -> None:
            async with lock:
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)

        async def respond(sid: int) -> None:
            head, body = heads.pop(sid), bytes(bodies.pop(sid))
            self.content_types.append(head.get(b"content-type", b""))
            status, reply = 200, b""
            if head.get(b":path", b"").decode() != self.path or head.get(b":method") != b"POST":
                status = 404
            else:
                request = json_format.Parse(body, risk_pb2.CheckRequest())
                try:
                    answer = await trio.to_thread.run_sync(self.policy.decide, request)
                    reply = json.dumps(json_format.MessageToDict(answer)).encode()
                except Unavailable:
                    status = 503
            try:
                conn.send_headers(sid, [(b":status", str(status).encode()), (b"content-type", b"application/json"),
                                        (b"content-length", str(len(reply)).encode())], end_stream=not reply)
                if reply:
                    conn.send_data(sid, reply, end_stream=True)
            except h2.exceptions.StreamClosedError:
                return  # the proxy gave up on this check (its timeout) and reset the stream
            await flush()

        try:
            async with trio.open_nursery() as nursery:
                await flush()
                while data := await stream.receive_some(65536):
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.RequestReceived):
                            heads[event.stream_id] = dict(event.headers)
                            bodies[event.stream_id] = bytearray()
                        elif isinstance(event, h2.events.DataReceived):
                            bodies[event.stream_id] += event.data
                            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        elif isinstance(event, h2.events.StreamEnded):
                            nursery.start_soon(respond, event.stream_id)
                    await flush()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.H2Error):
            pass
