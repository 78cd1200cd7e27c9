"""rate_limit end to end: the real proxy between real peers on 127.0.0.1.

HTTP/2 with the harness's h2 client and the example origin; gRPC with a
grpcio client and server; Thrift with an Apache THeader client and an Apache
thrift server (a subprocess). Each over-limit call must get its protocol's
refusal, never reach the upstream, be counted on /metrics and be flagged
`rate_limited` in the access log.

Limits refill once an hour, so nothing refills while a test runs: which calls
pass is decided by the burst alone, whatever the machine's speed.
The arithmetic under a mock clock is tests/filters/test_rate_limit.py.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from thrift.Thrift import TApplicationException

from meshproxy.app import App
from tests import harness
from tests.h2client import H2Client
from tests.peers.thrift_peer import ThriftServer, client

UNARY = "/echo.Echo/Unary"
HOUR = "1h"


def limit(**options: object) -> str:
    """A rate_limit filter entry (YAML flow mapping) that refills once an hour."""
    fields = {"name": "rate_limit", "rate": 1, "period": HOUR, **options}
    return "- " + json.dumps(fields) + "\n"


def access_log(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "access.log"
    return path, f"{{enabled: true, path: '{path}'}}"


def logged(app: App, path: Path) -> list[dict[str, Any]]:
    app.access_log.flush()
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def rate_limited_on_metrics_page(app: App, limit_name: str) -> float:
    """meshproxy_rate_limited_total{listener="test", limit=...} as /metrics serves it."""
    status, body = await trio.to_thread.run_sync(
        harness.http_get, f"http://{app.admin_address}/metrics"
    )
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "meshproxy_rate_limited_total" and sample.labels == {
                "listener": "test",
                "limit": limit_name,
            }:
                return sample.value
    return 0.0


# -- HTTP/2 --------------------------------------------------------------------------------------


async def test_http2_over_the_limit_is_429_with_retry_after(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await harness.start_backend(nursery)
    log_path, log_config = access_log(tmp_path)
    text = harness.proxy_yaml(
        f"{harness.HOST}:{backend.port}",
        filters=limit(burst=3, key={"header": "x-caller"}, limit="per-caller"),
        access_log=log_config,
    )
    app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
    h2 = await H2Client.connect(harness.listen_port(app))
    got: list[tuple[str, int, bytes | None]] = []
    for who in ["a"] * 5 + ["b"] * 2:
        status, headers, body, _ = await h2.get("/hello", extra=[(b"x-caller", who.encode())])
        got.append((who, status, dict(headers).get(b"retry-after")))
        if status == 429:
            assert body == b"rate limited\n"
    await h2.aclose()
    # a's burst of 3, then refusals; b has a bucket of its own.
    assert [(who, status) for who, status, _ in got] == [
        ("a", 200), ("a", 200), ("a", 200), ("a", 429), ("a", 429), ("b", 200), ("b", 200),
    ]  # fmt: skip
    # The next token is an hour away (less the moments the test took), in whole seconds.
    for _, status, retry_after in got:
        assert (retry_after is not None) == (status == 429)
        if retry_after is not None:
            assert 3500 <= int(retry_after) <= 3600
    assert len(backend.requests) == 5  # the refused calls never left the proxy
    assert await rate_limited_on_metrics_page(app, "per-caller") == 2

    await harness.eventually(lambda: len(logged(app, log_path)) == 7)
    lines = logged(app, log_path)
    refused = [line for line in lines if line["status"] == 429]
    assert len(refused) == 2
    for line in refused:
        assert line["response_flags"] == ["rate_limited"]
        assert line["rate_limit"] == "over_limit" and line["reason"] == "rate_limited"
        assert line["upstream"] is None
    assert all(line["response_flags"] is None for line in lines if line["status"] == 200)


# -- gRPC ----------------------------------------------------------------------------------------


@pytest.fixture
def grpc_port() -> Iterator[int]:
    """A grpcio server of echo.Echo/Unary: the request bytes come back."""
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {"Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{harness.HOST}:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def grpc_calls(
    port: int, count: int, timeout: float | None = None
) -> list[tuple[str, str, dict[str, str]]]:
    """(status code name, details, trailing metadata) of `count` unary calls on one channel."""
    out = []
    with grpc.insecure_channel(f"{harness.HOST}:{port}") as channel:
        unary = channel.unary_unary(UNARY)
        for i in range(count):
            try:
                reply = unary(b"call %d" % i, timeout=timeout)
                assert reply == b"call %d" % i
                out.append(("OK", "", {}))
            except grpc.RpcError as e:
                trailing = {k: v for k, v in (e.trailing_metadata() or ()) if isinstance(v, str)}  # type: ignore[attr-defined]
                out.append((e.code().name, e.details(), trailing))  # type: ignore[attr-defined]
    return out


async def test_grpc_over_the_limit_is_resource_exhausted(
    nursery: trio.Nursery, tmp_path: Path, grpc_port: int
) -> None:
    log_path, log_config = access_log(tmp_path)
    text = harness.proxy_yaml(
        f"{harness.HOST}:{grpc_port}",
        filters=limit(algorithm="token_bucket", burst=2, key="route", limit="per-route"),
        access_log=log_config,
    )
    app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
    got = await trio.to_thread.run_sync(grpc_calls, harness.listen_port(app), 4)
    assert [(code, details) for code, details, _ in got] == [
        ("OK", ""), ("OK", ""), ("RESOURCE_EXHAUSTED", "rate limited"), ("RESOURCE_EXHAUSTED", "rate limited"),
    ]  # fmt: skip
    # gRFC A6 pushback, in milliseconds: the next token is an hour away.
    for _, _, trailing in got[2:]:
        assert 3_500_000 <= int(trailing["grpc-retry-pushback-ms"]) <= 3_600_000
    assert await rate_limited_on_metrics_page(app, "per-route") == 2
    await harness.eventually(lambda: len(logged(app, log_path)) == 4)
    refused = [line for line in logged(app, log_path) if line["grpc_status"] == 8]
    assert len(refused) == 2 and all(line["status"] == 200 for line in refused)  # trailers-only
    assert all(
        line["response_flags"] == ["rate_limited"] and line["route"] == "main" for line in refused
    )


async def test_grpc_leaky_bucket_refuses_a_turn_past_the_deadline_at_once(
    nursery: trio.Nursery, tmp_path: Path, grpc_port: int
) -> None:
    log_path, log_config = access_log(tmp_path)
    text = harness.proxy_yaml(
        f"{harness.HOST}:{grpc_port}",
        filters=limit(algorithm="leaky_bucket", burst=5, limit="shaped"),
        access_log=log_config,
    )
    app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
    # The first call leaves at once; the next turn is an hour on, past every
    # call's 30 s deadline: refused at once rather than held until it times out.
    got = await trio.to_thread.run_sync(grpc_calls, harness.listen_port(app), 3, 30.0)
    assert [code for code, _, _ in got] == ["OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    assert await rate_limited_on_metrics_page(app, "shaped") == 2
    await harness.eventually(lambda: len(logged(app, log_path)) == 3)
    refused = [line for line in logged(app, log_path) if line["grpc_status"] == 8]
    assert [line["rate_limit"] for line in refused] == ["past_deadline", "past_deadline"]
    assert all(line["response_flags"] == ["rate_limited"] for line in refused)


# -- Thrift --------------------------------------------------------------------------------------


def thrift_yaml(backend_port: int, filters: str, log_config: str) -> str:
    return f"""\
node: {{service: test-caller}}
admin: {{address: "{harness.HOST}:0"}}
access_log: {log_config}
drain_timeout: 2s
listeners:
  - name: test
    direction: egress
    address: "{harness.HOST}:0"
    protocol: thrift
    thrift: {{transport: auto, protocol: auto, service: Echo}}
    filters:
{textwrap.indent(filters, "      ")}
    routes:
      - match: {{}}
        cluster: echo
clusters:
  - name: echo
    protocol: thrift
    thrift: {{transport: header}}
    endpoints: ["{harness.HOST}:{backend_port}"]
"""


@pytest.fixture
def thrift_backend() -> Iterator[ThriftServer]:
    server = ThriftServer("header", "binary")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def thrift_calls(port: int, caller: bytes, count: int) -> list[str]:
    """Echo calls with THeader metadata `X-Caller: caller`; "ok" or the exception's type and message."""
    out = []
    with client(port, "header", "binary", headers={b"X-Caller": caller}) as c:
        for i in range(count):
            try:
                assert c.echo(b"%d" % i) == b"%d" % i
                out.append("ok")
            except TApplicationException as e:
                out.append(f"{e.type}:{e.message}")
    return out


async def test_thrift_over_the_limit_is_an_application_exception(
    nursery: trio.Nursery, tmp_path: Path, thrift_backend: ThriftServer
) -> None:
    log_path, log_config = access_log(tmp_path)
    text = thrift_yaml(
        thrift_backend.port,
        limit(burst=3, key={"metadata": "x-caller"}, limit="per-caller"),
        log_config,
    )
    app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
    port = harness.listen_port(app)
    refused = f"{TApplicationException.INTERNAL_ERROR}:rate limited"
    # The connection stays usable after a refusal: the exception is a reply like any other.
    assert await trio.to_thread.run_sync(thrift_calls, port, b"a", 5) == ["ok"] * 3 + [refused] * 2
    assert await trio.to_thread.run_sync(thrift_calls, port, b"b", 1) == ["ok"]
    assert await rate_limited_on_metrics_page(app, "per-caller") == 2
    await harness.eventually(lambda: len(logged(app, log_path)) == 6)
    lines = logged(app, log_path)
    limited = [line for line in lines if line["response_flags"] == ["rate_limited"]]
    assert len(limited) == 2
    assert all(line["status"] == 429 and line["rate_limit"] == "over_limit" for line in limited)
    assert all(line["protocol"] == "thrift" and line["path"] == "/Echo/echo" for line in limited)
    assert sum(line["response_flags"] is None for line in lines) == 4


async def test_a_reload_keeps_the_buckets_unless_the_limit_changed(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await harness.start_backend(nursery)

    def config(burst: int, other: str = "") -> Path:
        filters = other + limit(burst=burst, key={"header": "x-caller"})
        return harness.write_config(tmp_path, harness.proxy_yaml(f"{harness.HOST}:{backend.port}", filters=filters))

    app = await harness.start_proxy(nursery, config(2))
    h2 = await H2Client.connect(harness.listen_port(app))

    async def status() -> int:
        return (await h2.get("/hello", extra=[(b"x-caller", b"a")]))[0]

    assert [await status(), await status(), await status()] == [200, 200, 429]
    # The same limit, now behind another filter of its kind: a SIGHUP does not refill the bucket.
    config(2, other=limit(burst=100, limit="other"))
    assert await app.reload()
    assert await status() == 429
    # Another burst is another limit: its buckets start full.
    config(3, other=limit(burst=100, limit="other"))
    assert await app.reload()
    assert [await status(), await status(), await status(), await status()] == [200, 200, 200, 429]
    await h2.aclose()


async def test_a_reload_keeps_a_route_limits_buckets(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await harness.start_backend(nursery)
    route_limit = json.dumps({"name": "rate_limit", "rate": 1, "period": HOUR, "burst": 1})

    def config(timeout: str) -> Path:
        text = harness.proxy_yaml(f"{harness.HOST}:{backend.port}", route_timeout=timeout)
        text = text.replace("      - name: main\n", f"      - name: main\n        filters: [{route_limit}]\n", 1)
        return harness.write_config(tmp_path, text)

    app = await harness.start_proxy(nursery, config("15s"))
    h2 = await H2Client.connect(harness.listen_port(app))
    assert [(await h2.get("/hello"))[0] for _ in range(2)] == [200, 429]
    config("20s")  # the route changes, its limit does not
    assert await app.reload()
    assert (await h2.get("/hello"))[0] == 429
    await h2.aclose()
