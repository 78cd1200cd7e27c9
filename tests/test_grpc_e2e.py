"""gRPC through the proxy with real peers: a grpcio server and a grpcio client."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import trio

from tests import harness

MESSAGE_LIMIT = [("grpc.max_send_message_length", 32 << 20), ("grpc.max_receive_message_length", 32 << 20)]
UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI = (f"/echo.Echo/{m}" for m in ("Unary", "ServerStream", "ClientStream", "Bidi"))


class EchoService:
    """Bytes in, bytes out; records what the server saw."""

    def __init__(self) -> None:
        self.metadata: list[tuple[str, str | bytes]] = []
        self.time_remaining: float | None = None
        self.cancelled = threading.Event()

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.metadata = list(context.invocation_metadata())
        self.time_remaining = context.time_remaining()
        context.add_callback(self.cancelled.set)
        if request.startswith(b"abort:"):
            code = getattr(grpc.StatusCode, request[6:].decode())
            context.abort(code, "café ☕ \u2013 not here")
        if request == b"sleep":
            for _ in range(40):
                if not context.is_active():
                    return b""
                time.sleep(0.05)
        context.send_initial_metadata((("x-initial", "1"),))
        context.set_trailing_metadata((("x-trailing", "2"), ("x-trailing-bin", b"\x00\xff")))
        return request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(self.cancelled.set)
        count, _, pause = request.removesuffix(b"/abort").partition(b"/")
        for i in range(int(count)):
            if pause:
                time.sleep(float(pause))
            if i == 3 and request.endswith(b"/abort"):
                context.abort(grpc.StatusCode.UNAVAILABLE, "gone mid-stream")
            yield b"%d" % i

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"%d" % sum(len(r) for r in requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            yield r.upper()


@pytest.fixture
def grpc_server() -> Iterator[tuple[int, EchoService]]:
    service = EchoService()
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(service.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(service.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(service.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(service.bidi),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=MESSAGE_LIMIT)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, service
    finally:
        server.stop(0)


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=MESSAGE_LIMIT)


async def start(nursery: trio.Nursery, tmp_path, grpc_port: int, **kw: str):  # type: ignore[no-untyped-def]
    text = harness.proxy_yaml(f"127.0.0.1:{grpc_port}", **kw)
    app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
    return app, harness.listen_port(app)


LABELS = dict(listener="test", direction="egress", route="main", destination_service="backend")


async def test_unary_with_metadata_both_ways(tmp_path, grpc_server):
    grpc_port, service = grpc_server
    async with trio.open_nursery() as nursery:
        app, port = await start(nursery, tmp_path, grpc_port)

        def call() -> tuple[bytes, grpc.Call]:
            with channel(port) as ch:
                return ch.unary_unary(UNARY).with_call(b"hello", metadata=(("x-md", "v"), ("x-md-bin", b"\x00\x01")))

        response, info = await trio.to_thread.run_sync(call)
        assert response == b"hello"
        assert ("x-md", "v") in service.metadata and ("x-md-bin", b"\x00\x01") in service.metadata
        assert ("x-initial", "1") in [tuple(m) for m in info.initial_metadata()]
        trailing = [tuple(m) for m in info.trailing_metadata()]
        assert ("x-trailing", "2") in trailing and ("x-trailing-bin", b"\x00\xff") in trailing
        await harness.eventually(
            lambda: harness.metric(app, "meshproxy_requests_total", **LABELS, response_code="200", grpc_response_status="0") == 1
        )
        nursery.cancel_scope.cancel()


async def test_streaming_kinds(tmp_path, grpc_server):
    grpc_port, _ = grpc_server
    async with trio.open_nursery() as nursery:
        _, port = await start(nursery, tmp_path, grpc_port, route_timeout="0s")

        def calls() -> tuple[list[bytes], bytes, list[bytes]]:
            with channel(port) as ch:
                server_stream = list(ch.unary_stream(SERVER_STREAM)(b"50"))
                client_stream = ch.stream_unary(CLIENT_STREAM)(iter([b"x" * i for i in range(50)]))
                # Ping-pong: the next request goes only after the previous reply came back.
                replies: list[bytes] = []
                turn = threading.Semaphore(1)

                def requests() -> Iterator[bytes]:
                    for i in range(20):
                        turn.acquire()
                        yield b"m%d" % i

                for reply in ch.stream_stream(BIDI)(requests()):
                    replies.append(reply)
                    turn.release()
                return server_stream, client_stream, replies

        server_stream, client_stream, replies = await trio.to_thread.run_sync(calls)
        assert server_stream == [b"%d" % i for i in range(50)]
        assert client_stream == b"%d" % sum(range(50))
        assert replies == [b"M%d" % i for i in range(20)]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("size", [4 << 20, 8 << 20])
async def test_large_messages_both_ways(tmp_path, grpc_server, size):
    grpc_port, _ = grpc_server
    payload = os.urandom(size)
    async with trio.open_nursery() as nursery:
        _, port = await start(nursery, tmp_path, grpc_port)

        def call() -> bytes:
            with channel(port) as ch:
                return ch.unary_unary(UNARY)(payload, timeout=30)  # type: ignore[no-any-return]

        assert await trio.to_thread.run_sync(call) == payload
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("code", ["NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED"])
async def test_status_codes_and_non_ascii_messages(tmp_path, grpc_server, code):
    grpc_port, _ = grpc_server
    async with trio.open_nursery() as nursery:
        app, port = await start(nursery, tmp_path, grpc_port)

        def call() -> grpc.RpcError:
            with channel(port) as ch:
                try:
                    ch.unary_unary(UNARY)(b"abort:" + code.encode())
                except grpc.RpcError as e:
                    return e
            raise AssertionError("the call should have failed")

        error = await trio.to_thread.run_sync(call)
        assert error.code() == getattr(grpc.StatusCode, code)
        assert error.details() == "café ☕ \u2013 not here"
        number = str(getattr(grpc.StatusCode, code).value[0])
        await harness.eventually(
            lambda: harness.metric(app, "meshproxy_requests_total", **LABELS, response_code="200", grpc_response_status=number) == 1
        )
        nursery.cancel_scope.cancel()


async def test_client_deadline_is_forwarded_less_time_spent(tmp_path, grpc_server):
    grpc_port, service = grpc_server
    async with trio.open_nursery() as nursery:
        _, port = await start(nursery, tmp_path, grpc_port)

        def call() -> None:
            with channel(port) as ch:
                ch.unary_unary(UNARY)(b"x", timeout=5)

        await trio.to_thread.run_sync(call)
        # The client's 5 s (not the route's 15 s), less what was spent on the way. grpc core
        # rounds the timeout it sends up to a coarser value (5 s can leave as "5010m"), and how
        # much was spent depends on the machine's load, so only the bounds are checked.
        assert service.time_remaining is not None and 0.0 < service.time_remaining < 5.5, service.time_remaining
        nursery.cancel_scope.cancel()


async def test_client_deadline_exceeded_cancels_the_server(tmp_path, grpc_server):
    grpc_port, service = grpc_server
    async with trio.open_nursery() as nursery:
        _, port = await start(nursery, tmp_path, grpc_port)

        def call() -> tuple[grpc.StatusCode, float]:
            started = time.monotonic()
            with channel(port) as ch:
                try:
                    ch.unary_unary(UNARY)(b"sleep", timeout=0.3)
                except grpc.RpcError as e:
                    return e.code(), time.monotonic() - started
            raise AssertionError("the call should have failed")

        code, took = await trio.to_thread.run_sync(call)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and took < 1.5
        assert await trio.to_thread.run_sync(service.cancelled.wait, 3)
        nursery.cancel_scope.cancel()


async def test_route_timeout_answers_deadline_exceeded(tmp_path, grpc_server):
    grpc_port, service = grpc_server
    async with trio.open_nursery() as nursery:
        app, port = await start(nursery, tmp_path, grpc_port, route_timeout="300ms")

        def call() -> grpc.RpcError:
            with channel(port) as ch:
                try:
                    ch.unary_unary(UNARY)(b"sleep")
                except grpc.RpcError as e:
                    return e
            raise AssertionError("the call should have failed")

        error = await trio.to_thread.run_sync(call)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await trio.to_thread.run_sync(service.cancelled.wait, 3)  # the upstream stream was reset
        await harness.eventually(lambda: harness.metric(app, "meshproxy_local_replies_total", listener="test", reason="timeout") == 1)
        nursery.cancel_scope.cancel()


async def test_client_cancel_reaches_the_server(tmp_path, grpc_server):
    grpc_port, service = grpc_server
    async with trio.open_nursery() as nursery:
        _, port = await start(nursery, tmp_path, grpc_port, route_timeout="0s")

        def call() -> list[bytes]:
            got: list[bytes] = []
            with channel(port) as ch:
                stream = ch.unary_stream(SERVER_STREAM)(b"200/0.05")
                for message in stream:
                    got.append(message)
                    if len(got) == 3:
                        stream.cancel()
                        break
            return got

        assert await trio.to_thread.run_sync(call) == [b"0", b"1", b"2"]
        assert await trio.to_thread.run_sync(service.cancelled.wait, 3)
        nursery.cancel_scope.cancel()


async def test_server_abort_mid_stream_reaches_the_client(tmp_path, grpc_server):
    grpc_port, _ = grpc_server
    async with trio.open_nursery() as nursery:
        _, port = await start(nursery, tmp_path, grpc_port)

        def call() -> tuple[list[bytes], grpc.StatusCode]:
            got: list[bytes] = []
            with channel(port) as ch:
                try:
                    for message in ch.unary_stream(SERVER_STREAM)(b"10/0.01/abort"):
                        got.append(message)
                except grpc.RpcError as e:
                    return got, e.code()
            raise AssertionError("the stream should have failed")

        got, code = await trio.to_thread.run_sync(call)
        assert got == [b"0", b"1", b"2"] and code == grpc.StatusCode.UNAVAILABLE
        nursery.cancel_scope.cancel()


async def test_no_route_and_unreachable_cluster(tmp_path, grpc_server):
    async with trio.open_nursery() as nursery:
        text = harness.proxy_yaml(f"127.0.0.1:{harness.free_port()}").replace(
            "match: {prefix: /}", "match: {prefix: /other.Service/}"
        )
        text = text.replace("      - name: main", "      - name: other\n        match: {prefix: /down.Svc/}\n        cluster: backend\n      - name: main")
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        port = harness.listen_port(app)

        def call(path: str) -> grpc.RpcError:
            with channel(port) as ch:
                try:
                    ch.unary_unary(path)(b"x", timeout=5)
                except grpc.RpcError as e:
                    return e
            raise AssertionError("the call should have failed")

        no_route = await trio.to_thread.run_sync(call, UNARY)
        assert no_route.code() == grpc.StatusCode.UNIMPLEMENTED and "no route" in no_route.details()
        down = await trio.to_thread.run_sync(call, "/down.Svc/M")
        assert down.code() == grpc.StatusCode.UNAVAILABLE
        nursery.cancel_scope.cancel()


async def test_many_concurrent_calls(tmp_path, grpc_server):
    grpc_port, _ = grpc_server
    async with trio.open_nursery() as nursery:
        app, port = await start(nursery, tmp_path, grpc_port)

        def calls() -> list[bytes]:
            with channel(port) as ch, futures.ThreadPoolExecutor(8) as pool:
                stub = ch.unary_unary(UNARY)
                return list(pool.map(lambda i: stub(b"%d" % i, timeout=10), range(200)))

        assert await trio.to_thread.run_sync(calls) == [b"%d" % i for i in range(200)]
        await harness.eventually(
            lambda: harness.metric(app, "meshproxy_requests_total", **LABELS, response_code="200", grpc_response_status="0") == 200
        )
        nursery.cancel_scope.cancel()
