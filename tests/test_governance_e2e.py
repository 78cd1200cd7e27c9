"""Retries, breakers, caps and outlier ejection end to end, against real peers
that fail, stall and recover on command: the example h2c backend (HTTP/2),
grpcio servers (gRPC) and Apache thrift servers (stalled with SIGSTOP)."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from thrift.Thrift import TApplicationException
from thrift.transport.TTransport import TTransportException

from meshproxy.app import App
from meshproxy.demo import ExampleBackend
from tests.h2client import H2Client
from tests.harness import (
    HOST,
    eventually,
    listen_port,
    metric,
    start_backend,
    start_proxy,
    write_config,
)
from tests.peers.thrift_peer import ThriftServer, client

HTTP_CONFIG = """\
node: {{service: test, unit: u1}}
admin: {{address: "127.0.0.1:0"}}
access_log: {{enabled: true, path: '{log}'}}
listeners:
  - name: test
    direction: egress
    address: "127.0.0.1:0"
    protocol: {protocol}
    filters: []
    routes:
      - name: main
        match: {match}
        cluster: backend
        timeout: {timeout}
        {retry}
clusters:
  - name: backend
    protocol: {protocol}
    endpoints: [{endpoints}]{thrift}
    {cluster}
"""


def config(tmp_path: Path, ports: list[int], *, retry: str = "", cluster: str = "", protocol: str = "http2",
           timeout: str = "10s") -> Path:
    text = HTTP_CONFIG.format(
        log=tmp_path / "access.log", protocol=protocol, match="{}" if protocol == "thrift" else "{prefix: /}",
        timeout=timeout, retry=f"retry: {retry}" if retry else "",
        endpoints=", ".join(f'"{HOST}:{p}"' for p in ports),
        thrift="\n    thrift: {transport: auto}" if protocol == "thrift" else "", cluster=cluster)
    return write_config(tmp_path, text)


def access_lines(app: App, tmp_path: Path) -> list[dict[str, Any]]:
    app.access_log.flush()
    return [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]


async def gets(port: int, n: int, path: str = "/") -> list[int]:
    c = await H2Client.connect(port)
    try:
        return [(await c.get(path))[0] for _ in range(n)]
    finally:
        await c.aclose()


async def two_backends(nursery: trio.Nursery) -> tuple[ExampleBackend, ExampleBackend]:
    return await start_backend(nursery), await start_backend(nursery)


# -- HTTP/2: retries ----------------------------------------------------------------------------


async def test_retries_recover_from_one_failing_endpoint(nursery: trio.Nursery, tmp_path: Path) -> None:
    bad, good = await two_backends(nursery)
    bad.fail_status = 503
    app = await start_proxy(nursery, config(tmp_path, [bad.port, good.port],
                                            retry="{attempts: 3, retry_on: [gateway-error]}"))
    assert await gets(listen_port(app), 20) == [200] * 20
    assert bad.requests and len(good.requests) == 20
    # Each call that met the failing endpoint was sent once more (to the other one).
    assert metric(app, "meshproxy_upstream_retries_total", destination_service="backend",
                  condition="gateway-error") == len(bad.requests)
    retried = [line for line in access_lines(app, tmp_path) if line["response_flags"]]
    assert len(retried) == len(bad.requests)
    assert all(line["response_flags"] == ["retried"] and line["attempts"] == 2 and line["status"] == 200
               for line in retried)


async def stream_post(port: int, chunks: list[bytes]) -> int:
    """A POST whose body arrives in pieces after the headers (so the proxy streams it)."""
    c = await H2Client.connect(port)
    try:
        sid = c.request("/upload", method="POST", end=False)
        await c.flush()
        for i, chunk in enumerate(chunks):
            await trio.sleep(0.01)
            c.conn.send_data(sid, chunk, end_stream=i == len(chunks) - 1)
            await c.flush()
        return (await c.response(sid))[0]
    finally:
        await c.aclose()


async def test_a_streamed_body_is_sent_again_within_its_bound(nursery: trio.Nursery, tmp_path: Path) -> None:
    bad, good = await two_backends(nursery)
    bad.fail_status = 503
    app = await start_proxy(nursery, config(tmp_path, [bad.port, good.port],
                                            retry="{attempts: 2, retry_on: [gateway-error], max_body_bytes: 4KiB}"))
    port = listen_port(app)
    small = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    # Round robin: the retry takes the good endpoint's turn, so after the first
    # call (which starts at a random endpoint) each meets the failing one first.
    for _ in range(2):
        assert await stream_post(port, small) == 200
    assert bad.body_sizes in ([3000], [3000, 3000]) and good.body_sizes == [3000, 3000]
    assert metric(app, "meshproxy_upstream_retries_total", destination_service="backend",
                  condition="gateway-error") == len(bad.body_sizes)
    # Past max_body_bytes the body is no longer kept: the failure is the answer.
    large = [b"x" * 3000, b"y" * 3000]
    assert await stream_post(port, large) == 503
    assert bad.body_sizes[-1] == 6000 and len(good.body_sizes) == 2
    assert metric(app, "meshproxy_upstream_retries_refused_total", destination_service="backend",
                  reason="body_too_large") == 1


async def test_a_full_outage_stops_at_the_retry_budget(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b = await two_backends(nursery)
    a.fail_status = b.fail_status = 503
    budget = "{ratio: 0.1, min_per_second: 0.5, window: 10s}"
    app = await start_proxy(nursery, config(
        tmp_path, [a.port, b.port],
        retry=f"{{attempts: 3, retry_on: [gateway-error], backoff: {{base: 1ms, max: 2ms}}, budget: {budget}}}"))
    calls = 60
    assert await gets(listen_port(app), calls) == [503] * calls
    attempts = len(a.requests) + len(b.requests)
    retries = metric(app, "meshproxy_upstream_retries_total", destination_service="backend",
                     condition="gateway-error")
    # Without a budget: 3 x 60 = 180 attempts. With it: 10% of 60 plus 0.5/s over 10 s.
    assert attempts == calls + retries
    assert 10 <= retries <= 11
    # Every call that was not retried twice ended on a refused retry.
    refused = metric(app, "meshproxy_upstream_retries_refused_total", destination_service="backend", reason="budget")
    assert calls - retries <= refused <= calls
    assert sum("retry_budget_exhausted" in (line["response_flags"] or ()) for line in access_lines(app, tmp_path)) \
        == refused


async def test_per_try_timeout_moves_a_stalled_call_on(nursery: trio.Nursery, tmp_path: Path) -> None:
    stalled, good = await two_backends(nursery)
    stalled.stall = True
    app = await start_proxy(nursery, config(tmp_path, [stalled.port, good.port], retry=(
        "{attempts: 2, per_try_timeout: 100ms, retry_on: [per-try-timeout]}")))
    assert await gets(listen_port(app), 6) == [200] * 6
    # Round robin: a retry takes the good endpoint's turn, so after the first call
    # (which starts at a random endpoint) each call meets the stalled one first.
    assert len(stalled.requests) in (5, 6) and len(good.requests) == 6
    assert metric(app, "meshproxy_upstream_retries_total", destination_service="backend",
                  condition="per-try-timeout") == len(stalled.requests)
    # The stalled attempts were cancelled upstream.
    await eventually(lambda: stalled.resets == len(stalled.requests))
    stalled.stall = False


async def test_per_try_timeout_starts_once_a_streamed_body_is_sent(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery)
    app = await start_proxy(nursery, config(tmp_path, [backend.port], retry=(
        "{attempts: 2, per_try_timeout: 200ms, retry_on: [per-try-timeout]}")))
    # 0.6 s of body, sent slowly: longer than a try, yet nothing is late.
    slow = [b"x" * 100] * 4
    c = await H2Client.connect(listen_port(app))
    sid = c.request("/upload", method="POST", end=False)
    await c.flush()
    for i, chunk in enumerate(slow):
        await trio.sleep(0.15)
        c.conn.send_data(sid, chunk, end_stream=i == len(slow) - 1)
        await c.flush()
    assert (await c.response(sid))[0] == 200
    await c.aclose()
    assert backend.body_sizes == [400]
    assert metric(app, "meshproxy_upstream_retries_total", destination_service="backend",
                  condition="per-try-timeout") == 0


async def test_a_client_cancelling_a_download_is_not_the_upstreams_error(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery)
    app = await start_proxy(nursery, config(tmp_path, [backend.port], cluster=(
        "breaker: {consecutive_errors: 1, open_for: 10s}\n    outlier: {consecutive_errors: 1}")))
    port = listen_port(app)
    for _ in range(2):
        c = await H2Client.connect(port, window=1024)
        sid = c.request("/size/200000")
        await c.flush()
        await c.receive(ack=False)  # the head and a little body, then the client gives up
        c.conn.reset_stream(sid)
        await c.flush()
        await c.aclose()
    await eventually(lambda: len(access_lines(app, tmp_path)) == 2)
    assert await gets(port, 2) == [200, 200]
    assert metric(app, "meshproxy_breaker_transitions_total", destination_service="backend", to="open") == 0
    assert metric(app, "meshproxy_outlier_ejections_total", destination_service="backend",
                  reason="consecutive_errors") == 0


# -- HTTP/2: caps and ejection -------------------------------------------------------------------


async def test_max_requests_caps_the_cluster(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery)
    backend.stall = True
    app = await start_proxy(nursery, config(tmp_path, [backend.port], cluster="breaker: {max_requests: 2}"))
    port = listen_port(app)
    c = await H2Client.connect(port)
    held = [c.request("/"), c.request("/")]
    await c.flush()
    await eventually(lambda: len(backend.requests) == 2)
    status, _, body, _ = await c.get("/")
    assert status == 503 and b"max_requests" in body
    backend.stall = False
    assert [(await c.response(sid))[0] for sid in held] == [200, 200]
    await c.aclose()
    assert metric(app, "meshproxy_breaker_rejected_total", destination_service="backend", reason="max_requests") == 1
    flags = [line["response_flags"] for line in access_lines(app, tmp_path)]
    assert flags.count(["overflow"]) == 1


async def test_calls_past_their_deadline_count_against_the_breaker(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery)
    backend.stall = True
    app = await start_proxy(nursery, config(tmp_path, [backend.port], timeout="150ms",
                                            cluster="breaker: {consecutive_errors: 2, open_for: 10s}"))
    assert await gets(listen_port(app), 3) == [504, 504, 503]
    assert len(backend.requests) == 2
    assert [line["reason"] for line in access_lines(app, tmp_path)] == ["timeout", "timeout", "breaker_open"]
    backend.stall = False


async def test_an_endpoint_with_gateway_errors_is_ejected_and_returns(nursery: trio.Nursery, tmp_path: Path) -> None:
    bad, good = await two_backends(nursery)
    bad.fail_status = 502
    app = await start_proxy(nursery, config(tmp_path, [bad.port, good.port], cluster=(
        "outlier: {consecutive_errors: 3, base_ejection: 300ms, max_ejected_percent: 50}")))
    port = listen_port(app)
    statuses = await gets(port, 20)
    assert statuses.count(502) == 3 and len(bad.requests) == 3  # then out of load balancing
    assert metric(app, "meshproxy_outlier_ejections_total", destination_service="backend",
                  reason="consecutive_errors") == 1
    assert metric(app, "meshproxy_endpoints_ejected", destination_service="backend") == 1
    failed = [line["response_flags"] for line in access_lines(app, tmp_path) if line["status"] == 502]
    assert failed == [None, None, ["ejected"]]
    bad.fail_status = 0
    await trio.sleep(0.35)  # past the ejection
    assert await gets(port, 4) == [200] * 4
    assert len(bad.requests) > 3
    assert metric(app, "meshproxy_endpoints_ejected", destination_service="backend") == 0


# -- gRPC ------------------------------------------------------------------------------------------


class Behaviour:
    """What a gRPC test server does, changed by the test while it runs."""

    def __init__(self) -> None:
        self.fail: dict[str, grpc.StatusCode | None] = {}
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def handler(self, method: str) -> Any:
        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self.lock:
                self.calls[method] = self.calls.get(method, 0) + 1
            code = self.fail.get(method)
            if code is not None:
                context.abort(code, f"{method} fails on command")
            return request
        return grpc.unary_unary_rpc_method_handler(unary)


@pytest.fixture
def grpc_pair() -> Iterator[list[tuple[int, Behaviour]]]:
    out, servers = [], []
    for _ in range(2):
        behaviour = Behaviour()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "echo.Echo", {m: behaviour.handler(m) for m in ("Good", "Bad")}),))
        out.append((server.add_insecure_port(f"{HOST}:0"), behaviour))
        server.start()
        servers.append(server)
    yield out
    for server in servers:
        server.stop(0)


def grpc_calls(port: int, method: str, n: int) -> list[str]:
    out = []
    with grpc.insecure_channel(f"{HOST}:{port}") as ch:
        for _ in range(n):
            try:
                ch.unary_unary(f"/echo.Echo/{method}")(b"x", timeout=5)
                out.append("OK")
            except grpc.RpcError as e:
                out.append(e.code().name + ("(breaker)" if "breaker" in (e.details() or "") else ""))
    return out


async def test_grpc_unavailable_is_retried_on_another_endpoint(
        nursery: trio.Nursery, tmp_path: Path, grpc_pair: list[tuple[int, Behaviour]]) -> None:
    (bad_port, bad), (good_port, _) = grpc_pair
    bad.fail["Good"] = grpc.StatusCode.UNAVAILABLE
    app = await start_proxy(nursery, config(tmp_path, [bad_port, good_port],
                                            retry="{attempts: 2, retry_on: [unavailable]}"))
    assert await trio.to_thread.run_sync(grpc_calls, listen_port(app), "Good", 10) == ["OK"] * 10
    assert metric(app, "meshproxy_upstream_retries_total", destination_service="backend",
                  condition="unavailable") == bad.calls["Good"] > 0
    # INTERNAL is not in retry_on: answered as it came.
    bad.fail["Good"] = grpc.StatusCode.INTERNAL
    got = await trio.to_thread.run_sync(grpc_calls, listen_port(app), "Good", 4)
    assert sorted(got) == ["INTERNAL", "INTERNAL", "OK", "OK"]


async def test_grpc_breaker_opens_and_half_opens_per_method(
        nursery: trio.Nursery, tmp_path: Path, grpc_pair: list[tuple[int, Behaviour]]) -> None:
    port, server = grpc_pair[0]
    server.fail["Bad"] = grpc.StatusCode.INTERNAL
    app = await start_proxy(nursery, config(tmp_path, [port], cluster=(
        "breaker: {key: method, consecutive_errors: 3, open_for: 300ms}")))
    proxy = listen_port(app)
    assert await trio.to_thread.run_sync(grpc_calls, proxy, "Bad", 5) == ["INTERNAL"] * 3 + ["UNAVAILABLE(breaker)"] * 2
    assert server.calls["Bad"] == 3  # the open breaker answered without touching the upstream
    assert await trio.to_thread.run_sync(grpc_calls, proxy, "Good", 3) == ["OK"] * 3  # its own breaker is closed
    transitions = "meshproxy_breaker_transitions_total"
    assert metric(app, transitions, destination_service="backend", to="open") == 1
    assert metric(app, "meshproxy_breakers_open", destination_service="backend") == 1
    # After open_for, one probe passes: it fails, so the breaker opens again...
    await trio.sleep(0.35)
    assert await trio.to_thread.run_sync(grpc_calls, proxy, "Bad", 2) == ["INTERNAL", "UNAVAILABLE(breaker)"]
    assert metric(app, transitions, destination_service="backend", to="open") == 2
    # ...and once the method recovers, the next probe closes it.
    server.fail["Bad"] = None
    await trio.sleep(0.35)
    assert await trio.to_thread.run_sync(grpc_calls, proxy, "Bad", 3) == ["OK"] * 3
    assert metric(app, transitions, destination_service="backend", to="half_open") == 2
    assert metric(app, transitions, destination_service="backend", to="closed") == 1
    assert metric(app, "meshproxy_breakers_open", destination_service="backend") == 0
    flags = [line["response_flags"] for line in access_lines(app, tmp_path)]
    assert flags.count(["breaker_open"]) == 3


async def test_breaker_fallback_is_the_configured_reply(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery)
    backend.fail_status = 500
    app = await start_proxy(nursery, config(tmp_path, [backend.port], cluster=(
        "breaker: {consecutive_errors: 2, open_for: 10s, fallback: {status: 200, message: 'cached answer', "
        "headers: {x-fallback: '1'}}}")))
    c = await H2Client.connect(listen_port(app))
    assert [(await c.get("/"))[0] for _ in range(2)] == [500, 500]
    status, headers, body, _ = await c.get("/")
    await c.aclose()
    assert (status, body) == (200, b"cached answer\n") and (b"x-fallback", b"1") in headers
    assert len(backend.requests) == 2


async def test_grpc_endpoint_ejected_after_unavailable(
        nursery: trio.Nursery, tmp_path: Path, grpc_pair: list[tuple[int, Behaviour]]) -> None:
    (bad_port, bad), (good_port, good) = grpc_pair
    bad.fail["Good"] = grpc.StatusCode.UNAVAILABLE
    app = await start_proxy(nursery, config(tmp_path, [bad_port, good_port], cluster=(
        "outlier: {consecutive_errors: 2, base_ejection: 10s, max_ejected_percent: 50}")))
    got = await trio.to_thread.run_sync(grpc_calls, listen_port(app), "Good", 12)
    assert got.count("UNAVAILABLE") == 2 and bad.calls["Good"] == 2 and good.calls["Good"] == 10


# -- Thrift ----------------------------------------------------------------------------------------


def thrift_calls(port: int, method: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        with client(port, timeout=10) as c:
            try:
                if method == "echo":
                    assert c.echo(b"hi") == b"hi"
                else:
                    assert c.greet("x") == "hello x"
                out.append("ok")
            except TApplicationException as e:
                out.append(str(e.message).split(":")[0])
    return out


async def test_thrift_idempotent_methods_retry_a_stalled_endpoint(nursery: trio.Nursery, tmp_path: Path) -> None:
    with ThriftServer() as stalled, ThriftServer() as good:
        app = await start_proxy(nursery, config(tmp_path, [stalled.port, good.port], protocol="thrift", retry=(
            "{attempts: 2, per_try_timeout: 200ms, retry_on: [per-try-timeout], idempotent_methods: [echo]}")))
        port = listen_port(app)
        assert stalled.proc is not None
        os.kill(stalled.proc.pid, signal.SIGSTOP)
        try:
            assert await trio.to_thread.run_sync(thrift_calls, port, "echo", 6) == ["ok"] * 6
            # After the first call, each met the stalled endpoint first (as over HTTP/2).
            retries = metric(app, "meshproxy_upstream_retries_total", destination_service="backend",
                             condition="per-try-timeout")
            assert retries in (5, 6)
            # greet is not idempotent: a call that timed out on the stalled endpoint is not sent again.
            got = await trio.to_thread.run_sync(thrift_calls, port, "greet", 4)
            assert sorted(got) == ["ok", "ok", "per_try_timeout", "per_try_timeout"]
            assert metric(app, "meshproxy_upstream_retries_refused_total", destination_service="backend",
                          reason="not_idempotent") == 2
        finally:
            os.kill(stalled.proc.pid, signal.SIGCONT)
        flags = [line["response_flags"] for line in access_lines(app, tmp_path)]
        assert flags.count(["retried"]) == retries


async def test_thrift_retry_after_a_per_try_timeout_does_not_queue_behind_the_abandoned_call(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    with ThriftServer() as server:
        app = await start_proxy(nursery, config(tmp_path, [server.port], protocol="thrift", retry=(
            "{attempts: 2, per_try_timeout: 300ms, retry_on: [per-try-timeout], idempotent_methods: [echo, sleep]}")))
        port = listen_port(app)

        def calls() -> list[str]:
            out = []
            with client(port, timeout=10) as c:
                try:
                    c.sleep(1500)
                    out.append("ok")
                except TApplicationException as e:
                    out.append(str(e.message).split(":")[0])
                # The server still sleeps on the abandoned calls: this one must not wait behind them.
                assert c.echo(b"quick") == b"quick"
                out.append("ok")
            return out

        assert await trio.to_thread.run_sync(calls) == ["per_try_timeout", "ok"]
        flags = [line["response_flags"] for line in access_lines(app, tmp_path)]
        assert flags == [["retried"], None]


async def test_thrift_breaker_opens_per_method_and_closes(nursery: trio.Nursery, tmp_path: Path) -> None:
    with ThriftServer() as server:
        app = await start_proxy(nursery, config(tmp_path, [server.port], protocol="thrift", timeout="200ms", cluster=(
            "breaker: {key: method, consecutive_errors: 2, open_for: 300ms}")))
        port = listen_port(app)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            got = await trio.to_thread.run_sync(thrift_calls, port, "echo", 3)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert got == ["timeout", "timeout", "breaker_open"]
        assert await trio.to_thread.run_sync(thrift_calls, port, "greet", 2) == ["ok", "ok"]  # another method
        await trio.sleep(0.35)
        assert await trio.to_thread.run_sync(thrift_calls, port, "echo", 2) == ["ok", "ok"]
        transitions = "meshproxy_breaker_transitions_total"
        assert metric(app, transitions, destination_service="backend", to="open") == 1
        assert metric(app, transitions, destination_service="backend", to="closed") == 1


async def test_thrift_stalled_endpoint_is_ejected(nursery: trio.Nursery, tmp_path: Path) -> None:
    with ThriftServer() as good, ThriftServer() as stalled:
        app = await start_proxy(nursery, config(tmp_path, [good.port, stalled.port], protocol="thrift",
                                                timeout="200ms", cluster=(
            "outlier: {consecutive_errors: 2, base_ejection: 10s, max_ejected_percent: 50}")))
        assert stalled.proc is not None
        os.kill(stalled.proc.pid, signal.SIGSTOP)
        try:
            got = await trio.to_thread.run_sync(thrift_calls, listen_port(app), "echo", 10)
        finally:
            os.kill(stalled.proc.pid, signal.SIGCONT)
        assert got.count("timeout") == 2 and got.count("ok") == 8
        assert metric(app, "meshproxy_endpoints_ejected", destination_service="backend") == 1


async def test_thrift_client_leaving_while_a_filter_holds_its_call_is_counted_once(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    with ThriftServer() as server:
        path = config(tmp_path, [server.port], protocol="thrift")
        text = path.read_text().replace(
            "    filters: []", "    filters: [{name: rate_limit, algorithm: leaky_bucket, rate: 1, burst: 5}]")
        app = await start_proxy(nursery, write_config(tmp_path, text))
        port = listen_port(app)

        def leave_while_waiting() -> None:
            with client(port) as c:
                assert c.echo(b"first") == b"first"
            with client(port, timeout=0.3) as c, pytest.raises(TTransportException):
                c.echo(b"second")  # its turn is up to 1 s away: the client gives up first

        await trio.to_thread.run_sync(leave_while_waiting)
        lines: list[dict[str, Any]] = []

        def both_counted() -> bool:
            lines[:] = access_lines(app, tmp_path)
            return len(lines) == 2

        await eventually(both_counted, timeout=5)
        await trio.sleep(1)  # past its turn: it is not sent upstream, nor counted again
        lines = access_lines(app, tmp_path)
        assert [(line["status"], line["reason"]) for line in lines] == [(200, None), (0, "downstream_closed")]
        assert metric(app, "meshproxy_requests_total", listener="test", direction="egress", route="main",
                      destination_service="backend", response_code="0", grpc_response_status="-") == 1
