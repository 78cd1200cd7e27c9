"""The overload filter with real peers: a grpcio backend of limited capacity, and a Thrift server.

Assertions count calls and read the proxy's own metrics; none of them times anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from thrift.Thrift import TApplicationException

from meshproxy.app import App
from meshproxy.filters.overload import OverloadFilter
from tests import harness
from tests.peers.thrift_peer import ThriftServer, make_client

UNARY = "/echo.Echo/Unary"
WORKERS = 4  # the backend serves this many calls at a time and queues the rest
SERVICE_TIME = 0.02  # seconds per call: capacity 4 / 20 ms = 200 calls a second


@pytest.fixture
def slow_backend() -> Iterator[int]:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(SERVICE_TIME)
        return request

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def overload_filter(app: App, listener: str = "test") -> OverloadFilter:
    f = app.listeners[listener].proxy.state.chain.filters[0]
    assert isinstance(f, OverloadFilter)
    return f


def shed(app: App, priority: int, reason: str | None = None) -> float:
    reasons = (
        [reason]
        if reason
        else ["limit", "queue_full", "queue_timeout", "cpu", "qps", "deadline", "client_gone"]
    )
    return sum(
        harness.metric(
            app, "meshproxy_overload_shed_total", listener="test", priority=str(priority), reason=r
        )
        for r in reasons
    )


async def test_grpc_overload_sheds_low_priority_and_serves_high(
    tmp_path: Path, slow_backend: int
) -> None:
    filters = (
        "- {name: overload, priority: {header: x-priority, default: 5},"
        " queue: {max_length: 8, max_wait: 300ms}}\n"
    )
    text = harness.proxy_yaml(f"127.0.0.1:{slow_backend}", filters=filters)
    async with trio.open_nursery() as nursery:
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        port = harness.listen_port(app)
        high_calls = 150

        def load() -> dict[int, list[bool]]:
            """2 high-priority callers make `high_calls` calls each; 12 low and 4 default-priority
            callers keep calling meanwhile: 18 callers on a backend that serves 4 at a time."""
            results: dict[int, list[bool]] = {0: [], 5: [], 9: []}
            lock = threading.Lock()
            done = threading.Event()
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary(UNARY)

                def caller(priority: int | None, count: int | None) -> None:
                    metadata = (("x-priority", str(priority)),) if priority is not None else ()
                    n = 0
                    while (count is None and not done.is_set()) or (
                        count is not None and n < count
                    ):
                        n += 1
                        try:
                            call(b"x", metadata=metadata, timeout=10)
                            ok = True
                        except grpc.RpcError as e:
                            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                            ok = False
                            time.sleep(
                                0.005
                            )  # a shed caller backs off a little, like a real client
                        with lock:
                            results[5 if priority is None else priority].append(ok)

                with futures.ThreadPoolExecutor(max_workers=18) as pool:
                    background = [pool.submit(caller, 9, None) for _ in range(12)]
                    background += [pool.submit(caller, None, None) for _ in range(4)]
                    time.sleep(
                        0.5
                    )  # the background load first: the queue is full when the high calls come
                    high = [pool.submit(caller, 0, high_calls) for _ in range(2)]
                    for f in high:
                        f.result()
                    done.set()
                    for f in background:
                        f.result()
            return results

        results = await trio.to_thread.run_sync(load)
        high, default, low = results[0], results[5], results[9]
        assert len(high) == 2 * high_calls
        assert sum(high) >= 0.99 * len(high), f"high priority: {sum(high)}/{len(high)} served"
        # The load exceeded capacity, and the least important paid for it.
        assert shed(app, 9) > 0 and sum(low) < len(low)
        assert sum(low) / len(low) < sum(high) / len(high)
        assert shed(app, 9) >= shed(app, 5) >= shed(app, 0)
        assert (
            shed(app, 0, "queue_full") == 0
        )  # a high call is never evicted or refused for the queue
        # The backend was kept busy: most of what it could serve, it served.
        assert sum(high) + sum(default) + sum(low) > 0
        f = overload_filter(app)
        assert f.admission.in_flight == 0 and len(f.admission.queue) == 0  # every slot came back
        assert harness.metric(app, "meshproxy_overload_in_flight", listener="test") == 0
        nursery.cancel_scope.cancel()


def thrift_yaml(port: int) -> str:
    return f"""\
node: {{service: test-caller}}
admin: {{address: "127.0.0.1:0"}}
access_log: {{enabled: false}}
listeners:
  - name: test
    direction: ingress
    address: "127.0.0.1:0"
    protocol: thrift
    thrift: {{transport: auto, protocol: auto, service: Echo}}
    filters:
      - {{name: overload, priority: {{metadata: x-priority, default: 5}},
          limit: {{initial: 1, min: 1, max: 1}}, queue: {{max_length: 1, max_wait: 10s}}}}
    routes:
      - match: {{}}
        cluster: echo
clusters:
  - name: echo
    protocol: thrift
    thrift: {{transport: framed}}
    endpoints: ["127.0.0.1:{port}"]
"""


async def test_thrift_shed_call_gets_an_application_exception(tmp_path: Path) -> None:
    with ThriftServer("framed", "binary") as backend:
        async with trio.open_nursery() as nursery:
            app = await harness.start_proxy(
                nursery, harness.write_config(tmp_path, thrift_yaml(backend.port))
            )
            port = harness.listen_port(app)
            f = overload_filter(app)
            outcome: dict[str, Any] = {}

            def call(name: str, method: str, arg: Any, priority: bytes | None) -> None:
                headers = {b"x-priority": priority} if priority is not None else None
                c, trans = make_client(
                    port, "header" if headers else "framed", "binary", headers=headers, timeout=10
                )
                try:
                    outcome[name] = getattr(c, method)(arg)
                except TApplicationException as e:
                    outcome[name] = e
                finally:
                    trans.close()

            async with trio.open_nursery() as calls:
                # One slot: a slow call takes it; a low-priority call (TTHeader/THeader key) waits in
                # the one-place queue; a high-priority call evicts it.
                calls.start_soon(trio.to_thread.run_sync, call, "slow", "sleep", 300, None)
                await harness.eventually(lambda: f.admission.in_flight == 1, 5)
                calls.start_soon(trio.to_thread.run_sync, call, "low", "echo", b"low", b"9")
                await harness.eventually(lambda: len(f.admission.queue) == 1, 5)
                calls.start_soon(trio.to_thread.run_sync, call, "high", "echo", b"high", b"0")
            low = outcome["low"]
            assert isinstance(low, TApplicationException)
            assert low.type == TApplicationException.INTERNAL_ERROR and "overloaded" in str(
                low.message
            )
            assert outcome["high"] == b"high" and outcome["slow"] is None
            assert shed(app, 9, "queue_full") == 1 and shed(app, 0) == 0
            assert f.admission.in_flight == 0
            nursery.cancel_scope.cancel()


async def test_a_long_stream_gives_its_slot_back_once_answered(tmp_path: Path) -> None:
    """With one slot, a server stream that is still sending must not keep a unary call waiting."""
    from tests.test_grpc_e2e import SERVER_STREAM, EchoService

    service = EchoService()
    handler = grpc.method_handlers_generic_handler("echo.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(service.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(service.server_stream),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    backend = server.add_insecure_port("127.0.0.1:0")
    server.start()
    filters = "- {name: overload, limit: {initial: 1, min: 1, max: 1}, queue: {max_wait: 300ms}}\n"
    text = harness.proxy_yaml(f"127.0.0.1:{backend}", filters=filters)
    try:
        async with trio.open_nursery() as nursery:
            app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
            port = harness.listen_port(app)

            def calls() -> tuple[bytes, bytes, list[bytes]]:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stream = ch.unary_stream(SERVER_STREAM)(b"20/0.1", timeout=10)  # 20 messages over 2 s
                    first = next(stream)
                    unary = ch.unary_unary(UNARY)(b"meanwhile", timeout=5)  # within max_wait, or shed
                    return first, unary, list(stream)

            first, unary, rest = await trio.to_thread.run_sync(calls)
            nursery.cancel_scope.cancel()
    finally:
        server.stop(0)
    assert (first, unary, len(rest)) == (b"0", b"meanwhile", 19)
    assert shed(app, 5) == 0
