"""End to end over HTTP/2: real clients (curl, h2load, an h2 client), the real
proxy, a real h2 backend."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import h2.events
import pytest
import trio
from h2.errors import ErrorCodes

from meshproxy.call import header_value
from meshproxy.filters.base import CONTINUE, Filter, Options, Respond
from tests import harness
from tests.h2client import H2Client


async def test_get_through_the_proxy_with_metrics(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        path = harness.write_config(tmp_path, harness.proxy_yaml(f"127.0.0.1:{backend.port}"))
        app = await harness.start_proxy(nursery, path)
        client = await H2Client.connect(harness.listen_port(app))
        status, _, body, _ = await client.get("/size/16384")
        assert status == 200 and body == b"x" * 16384
        seen = dict(backend.requests[-1])
        assert seen[b":authority"] == b"test.local"  # :authority preserved
        assert len(seen[b"x-request-id"]) == 32  # generated when absent
        status, _, _, _ = await client.get("/size/1", extra=[(b"x-request-id", b"abc")])
        assert dict(backend.requests[-1])[b"x-request-id"] == b"abc"  # kept when present
        labels = dict(listener="test", direction="egress", route="main", destination_service="backend")
        await harness.eventually(
            lambda: harness.metric(app, "meshproxy_requests_total", **labels, response_code="200", grpc_response_status="-") == 2
        )
        assert harness.metric(app, "meshproxy_request_duration_seconds_count", **labels) == 2
        assert harness.metric(app, "meshproxy_response_bytes_total", listener="test") == 16385
        assert harness.metric(app, "meshproxy_upstream_connections_active", destination_service="backend") == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_post_body_and_trailers_echoed(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        path = harness.write_config(tmp_path, harness.proxy_yaml(f"127.0.0.1:{backend.port}"))
        app = await harness.start_proxy(nursery, path)
        client = await H2Client.connect(harness.listen_port(app))
        sid = client.request("/echo", method="POST", end=False)
        payload = bytes(range(256)) * 4096  # 1 MiB: many windows' worth
        await client.flush()

        async def send() -> None:
            data = payload
            while data:
                window = client.conn.local_flow_control_window(sid)
                if window == 0:
                    await trio.sleep(0.005)
                    continue
                n = min(window, 16384, len(data))
                client.conn.send_data(sid, data[:n])
                data = data[n:]
                await client.flush()
            client.conn.end_stream(sid)
            await client.flush()

        nursery.start_soon(send)
        status, _, body, trailers = await client.response(sid)
        assert status == 200
        assert body == payload
        assert trailers == [(b"x-echo-done", b"1")]
        nursery.cancel_scope.cancel()


async def test_local_replies_no_route_and_upstream_down(tmp_path):
    async with trio.open_nursery() as nursery:
        text = harness.proxy_yaml(f"127.0.0.1:{harness.free_port()}").replace("match: {prefix: /}", "match: {prefix: /api}")
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        client = await H2Client.connect(harness.listen_port(app))
        status, _, body, _ = await client.get("/elsewhere")
        assert status == 404 and b"no route" in body
        # HEAD: the same headers, no content (h2 rejects a body here as a length error).
        status, headers, body, _ = await client.get("/elsewhere", method="HEAD")
        assert status == 404 and body == b"" and dict(headers)[b"content-length"] == b"%d" % len(b"no route for /elsewhere\n")
        status, _, body, _ = await client.get("/api/x")
        assert status == 503 and b"no reachable endpoint" in body
        # gRPC clients get trailers-only replies with grpc-status.
        status, headers, _, _ = await client.get("/pkg.Svc/M", method="POST", extra=[(b"content-type", b"application/grpc")])
        assert status == 200 and dict(headers)[b"grpc-status"] == b"12"
        assert b"no route" in dict(headers)[b"grpc-message"]
        await harness.eventually(lambda: harness.metric(app, "meshproxy_local_replies_total", listener="test", reason="no_route") == 3)
        assert harness.metric(app, "meshproxy_upstream_connect_failures_total", destination_service="backend") >= 1
        nursery.cancel_scope.cancel()


async def test_bad_request_headers_reset_that_stream_only(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, harness.proxy_yaml(f"127.0.0.1:{backend.port}")))
        client = await H2Client.connect(harness.listen_port(app), validate=False)
        for bad in ([(b"connection", b"keep-alive")], [(b"X-Upper", b"1")], [(b"te", b"gzip")], [(b"x-crlf", b"a\r\nb")]):
            status, _, _, _ = await client.get("/size/1", extra=bad)
            assert status == -1
            reset = [e for e in client.events if isinstance(e, h2.events.StreamReset)][-1]
            assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
        status, _, body, _ = await client.get("/size/3")  # same connection still serves
        assert status == 200 and body == b"xxx"
        assert harness.metric(app, "meshproxy_downstream_protocol_errors_total", listener="test", scope="stream") == 4
        nursery.cancel_scope.cancel()


async def test_garbage_gets_goaway_and_others_are_served(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, harness.proxy_yaml(f"127.0.0.1:{backend.port}")))
        port = harness.listen_port(app)
        good = await H2Client.connect(port)
        bad = await trio.open_tcp_stream("127.0.0.1", port)
        await bad.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x07\x00\x00\x00\x00\x00garbage!" * 4)
        received = b""
        with trio.fail_after(5):
            while chunk := await bad.receive_some(65536):
                received += chunk
        # A GOAWAY frame (type 7) then the close.
        assert b"\x07\x00\x00\x00\x00\x00" in received
        status, _, body, _ = await good.get("/size/5")
        assert status == 200 and body == b"xxxxx"
        assert harness.metric(app, "meshproxy_downstream_protocol_errors_total", listener="test", scope="connection") == 1
        nursery.cancel_scope.cancel()


async def test_client_reset_cancels_upstream_stream(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, harness.proxy_yaml(f"127.0.0.1:{backend.port}")))
        client = await H2Client.connect(harness.listen_port(app))
        sid = client.request("/slow/5000")
        await client.flush()
        with trio.fail_after(2):
            while len(backend.requests) < 1:
                await trio.sleep(0.01)
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        await client.flush()
        with trio.fail_after(2):
            while backend.resets < 1:
                await trio.sleep(0.01)
        await harness.eventually(lambda: harness.metric(app, "meshproxy_downstream_streams_active", listener="test") == 0)
        nursery.cancel_scope.cancel()


async def test_route_timeout_answers_504_and_resets_upstream(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        text = harness.proxy_yaml(f"127.0.0.1:{backend.port}", route_timeout="200ms")
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        client = await H2Client.connect(harness.listen_port(app))
        start = trio.current_time()
        status, _, body, _ = await client.get("/slow/3000")
        assert status == 504 and b"deadline" in body
        assert trio.current_time() - start < 2
        with trio.fail_after(2):
            while backend.resets < 1:
                await trio.sleep(0.01)
        assert harness.metric(app, "meshproxy_local_replies_total", listener="test", reason="timeout") == 1
        nursery.cancel_scope.cancel()


async def test_slow_reader_bounds_proxy_buffering(tmp_path):
    """A client that stops reading: the proxy holds at most one window per stream."""
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        text = harness.proxy_yaml(f"127.0.0.1:{backend.port}")
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        client = await H2Client.connect(harness.listen_port(app))
        sid = client.request("/size/50000000")  # 50 MB the client never reads
        await client.flush()
        await trio.sleep(1.0)
        pools = app._clusters.clusters["backend"].pools  # type: ignore[union-attr]
        streams = [s for p in pools for link in p.links for s in link.streams.values()]
        assert len(streams) == 1
        buffered = sum(len(c) for c, _ in streams[0].chunks) + streams[0].pending_ack
        stream_window = app.config.clusters[0].http2.stream_window
        assert buffered <= stream_window
        assert streams[0].received <= stream_window + 65535 + 65536
        # Now read it all: the stream completes with every byte.
        total = 0
        while True:
            events = await client.receive()
            total += sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
            if any(isinstance(e, h2.events.StreamEnded) for e in events):
                break
        assert total == 50_000_000
        nursery.cancel_scope.cancel()


async def test_reload_swaps_config_and_keeps_calls_in_flight(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        text = harness.proxy_yaml(f"127.0.0.1:{backend.port}")
        path = harness.write_config(tmp_path, text)
        app = await harness.start_proxy(nursery, path)
        client = await H2Client.connect(harness.listen_port(app))
        slow = client.request("/slow/800")
        await client.flush()
        await trio.sleep(0.1)
        path.write_text(harness.proxy_yaml(
            f"127.0.0.1:{backend.port}", filters="- {name: headers, response: {set: {x-version: '2'}}}"
        ))
        assert await app.reload()
        status, headers, _, _ = await client.get("/size/1")
        assert status == 200 and dict(headers)[b"x-version"] == b"2"
        status, headers, body, _ = await client.response(slow)
        assert status == 200 and body == b"slow\n" and b"x-version" not in dict(headers)
        assert harness.metric(app, "meshproxy_config_version") == 2
        # An invalid config is rejected; the old one keeps serving.
        path.write_text(text.replace("cluster: backend", "cluster: nowhere"))
        assert not await app.reload()
        assert harness.metric(app, "meshproxy_config_last_reload_success") == 0
        assert harness.metric(app, "meshproxy_config_reloads_total", result="failure") == 1
        status, headers, _, _ = await client.get("/size/1")
        assert status == 200 and dict(headers)[b"x-version"] == b"2"
        nursery.cancel_scope.cancel()


async def test_admin_endpoints(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, harness.proxy_yaml(f"127.0.0.1:{backend.port}")))
        client = await H2Client.connect(harness.listen_port(app))
        await client.get("/size/1")
        await harness.eventually(lambda: harness.metric(app, "meshproxy_request_duration_seconds_count", listener="test", direction="egress", route="main", destination_service="backend") == 1)
        base = f"http://{app.admin_address}"
        status, body = await trio.to_thread.run_sync(harness.http_get, base + "/ready")
        assert (status, body) == (200, b"ready\n")
        status, body = await trio.to_thread.run_sync(harness.http_get, base + "/metrics")
        text = body.decode()
        assert status == 200
        assert 'meshproxy_requests_total{destination_service="backend",direction="egress",grpc_response_status="-",listener="test",response_code="200",route="main"} 1.0' in text
        assert "/size/1" not in text  # no raw paths in labels
        status, body = await trio.to_thread.run_sync(harness.http_get, base + "/config_dump")
        dump = json.loads(body)
        assert dump["version"] == 1 and dump["config"]["listeners"][0]["name"] == "test"
        status, body = await trio.to_thread.run_sync(harness.http_get, base + "/clusters")
        clusters = json.loads(body)
        assert clusters[0]["name"] == "backend" and clusters[0]["endpoints"][0]["healthy"] is True
        assert (await trio.to_thread.run_sync(harness.http_get, base + "/nope"))[0] == 404
        nursery.cancel_scope.cancel()


@pytest.mark.needs("curl")
async def test_curl_prior_knowledge(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, harness.proxy_yaml(f"127.0.0.1:{backend.port}")))
        url = f"http://127.0.0.1:{harness.listen_port(app)}/size/100"
        result = await trio.run_process(
            ["curl", "-sS", "--http2-prior-knowledge", "-D", "-", url], capture_stdout=True, capture_stderr=True
        )
        out = result.stdout.decode()
        assert out.startswith("HTTP/2 200") and out.endswith("x" * 100)
        nursery.cancel_scope.cancel()


@pytest.mark.needs("h2load")
async def test_h2load_smoke(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, harness.proxy_yaml(f"127.0.0.1:{backend.port}")))
        url = f"http://127.0.0.1:{harness.listen_port(app)}/size/100"
        result = await trio.run_process(["h2load", "-n", "2000", "-c", "8", "-m", "16", url], capture_stdout=True)
        out = result.stdout.decode()
        assert "2000 succeeded, 0 failed, 0 errored" in out, out
        assert "status codes: 2000 2xx" in out, out
        labels = dict(listener="test", direction="egress", route="main", destination_service="backend")
        await harness.eventually(
            lambda: harness.metric(app, "meshproxy_requests_total", **labels, response_code="200", grpc_response_status="-") == 2000
        )
        nursery.cancel_scope.cancel()


@pytest.mark.needs("curl")
def test_sigterm_drains_in_flight_calls_then_exits_zero(tmp_path):
    backend_port = harness.free_port()
    backend_proc = subprocess.Popen(
        [sys.executable, "-m", "meshproxy.demo", "backend", "--port", str(backend_port)], stdout=subprocess.PIPE
    )
    try:
        assert backend_proc.stdout is not None
        backend_proc.stdout.readline()  # ready line
        admin, listen = harness.free_port(), harness.free_port()
        text = harness.proxy_yaml(f"127.0.0.1:{backend_port}", listen=f"127.0.0.1:{listen}", admin=f"127.0.0.1:{admin}")
        with harness.proxy_process(harness.write_config(tmp_path, text), admin) as proxy:
            # curl is the client: a real one that finishes its stream after GOAWAY.
            curl = subprocess.Popen(
                ["curl", "-sS", "--http2-prior-knowledge", "-w", "\n%{http_code}", f"http://127.0.0.1:{listen}/slow/1500"],
                stdout=subprocess.PIPE,
            )
            time.sleep(0.5)
            proxy.signal(signal.SIGTERM)
            time.sleep(0.2)
            assert harness.http_get(f"http://127.0.0.1:{admin}/ready")[0] == 503
            out, _ = curl.communicate(timeout=10)
            assert out == b"slow\n\n200"
            assert proxy.wait(10) == 0
            assert "draining" in proxy.log()
    finally:
        backend_proc.kill()
        backend_proc.wait()


def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(tmp_path):
    admin, listen = harness.free_port(), harness.free_port()
    text = harness.proxy_yaml(f"127.0.0.1:{harness.free_port()}", listen=f"127.0.0.1:{listen}", admin=f"127.0.0.1:{admin}")
    path = harness.write_config(tmp_path, text)
    with harness.proxy_process(path, admin) as proxy:

        def version() -> int:
            return int(json.loads(harness.http_get(f"http://127.0.0.1:{admin}/config_dump")[1])["version"])

        path.write_text(text.replace("timeout: 15s", "timeout: 3s"))
        proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while version() != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert version() == 2
        path.write_text(text.replace("cluster: backend", "cluster: paymnts"))
        proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "reload rejected" not in proxy.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"reload rejected: {path}: listeners[0].routes[0].cluster: unknown cluster 'paymnts' (known: backend)" in proxy.log()
        assert version() == 2
        metrics = harness.http_get(f"http://127.0.0.1:{admin}/metrics")[1].decode()
        assert "meshproxy_config_last_reload_success 0.0" in metrics
        assert harness.http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200


def test_address_in_use_is_one_clear_line_and_exit_1(tmp_path):
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = harness.proxy_yaml("127.0.0.1:1", listen=f"127.0.0.1:{port}")
        result = subprocess.run(
            [sys.executable, "-m", "meshproxy", "--conf", str(harness.write_config(tmp_path, text))],
            capture_output=True, text=True, timeout=20,
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"meshproxy: listener test: cannot listen on 127.0.0.1:{port}: Address already in use"


class DenyFilter(Filter):
    """A team's own filter, loaded by import path in the test below."""

    @classmethod
    def from_options(cls, options):
        Options(options).done()
        return cls()

    async def on_request(self, call):
        if header_value(call.headers, b"x-allowed") != b"yes":
            return Respond(403, "not allowed: café", reason="denied")
        return CONTINUE


async def test_own_filter_by_import_path_answers_http_and_grpc(tmp_path):
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        text = harness.proxy_yaml(
            f"127.0.0.1:{backend.port}",
            filters='- {name: "tests.test_http2:DenyFilter"}\n- {name: headers, response: {set: {x-seen: "1"}}}',
        )
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        client = await H2Client.connect(harness.listen_port(app))
        status, headers, body, _ = await client.get("/size/1")
        assert (status, body) == (403, "not allowed: café\n".encode())
        assert b"x-seen" not in dict(headers)  # the later filter never saw the call
        status, headers, _, _ = await client.get("/pkg.Svc/M", method="POST", extra=[(b"content-type", b"application/grpc")])
        h = dict(headers)
        assert status == 200 and h[b"grpc-status"] == b"7" and h[b"grpc-message"] == b"not allowed: caf%C3%A9"
        status, headers, body, _ = await client.get("/size/2", extra=[(b"x-allowed", b"yes")])
        assert (status, body, dict(headers)[b"x-seen"]) == (200, b"xx", b"1")
        await harness.eventually(lambda: harness.metric(app, "meshproxy_local_replies_total", listener="test", reason="denied") == 2)
        nursery.cancel_scope.cancel()


async def test_unix_socket_listener_and_endpoint(tmp_path):
    """front (TCP) -> cluster with a unix: endpoint = listener back (unix socket) -> backend (TCP)."""
    sock = tmp_path / "back.sock"
    async with trio.open_nursery() as nursery:
        backend = await harness.start_backend(nursery)
        text = harness.proxy_yaml(f"unix:{sock}")
        text = text.replace("clusters:\n", f"""  - name: back
    direction: ingress
    address: "unix:{sock}"
    routes:
      - match: {{prefix: /}}
        cluster: local
clusters:
  - name: local
    protocol: http2
    endpoints: ["127.0.0.1:{backend.port}"]
""")
        app = await harness.start_proxy(nursery, harness.write_config(tmp_path, text))
        client = await H2Client.connect(harness.listen_port(app))
        status, _, body, _ = await client.get("/size/7")
        assert (status, body) == (200, b"x" * 7)
        await harness.eventually(lambda: harness.metric(
            app, "meshproxy_requests_total", listener="back", direction="ingress", route="back.0",
            destination_service="local", response_code="200", grpc_response_status="-") == 1)
        nursery.cancel_scope.cancel()
    assert not sock.exists()  # removed when the listener stopped
