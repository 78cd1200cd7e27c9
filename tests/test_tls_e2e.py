"""TLS and mutual TLS on listeners and clusters, with real clients: grpcio, Apache thrift, raw sockets.

Certificates come from meshproxy.devcerts (a throwaway CA, built with
`cryptography`); a second CA and an expired certificate stand for the
failures a real mesh sees.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
import trio

from meshproxy import devcerts
from meshproxy.app import App
from meshproxy.config import ConfigError, load
from tests.harness import HOST, eventually, listen_port, metric, start_proxy, write_config
from tests.peers.thrift_peer import ThriftServer
from tests.test_grpc_e2e import MESSAGE_LIMIT, UNARY, grpc_server  # noqa: F401  (fixture)

FRONTEND = devcerts.spiffe_id("frontend")
SERVER = devcerts.spiffe_id("server")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("certs")
    paths = devcerts.write(d, server="server", client="frontend")
    ca = devcerts.new_ca()  # the CA the proxy does not trust
    ca_pem = ca.pem()
    (d / "other-ca.pem").write_bytes(ca_pem)
    cert, key = devcerts.issue(ca, "intruder", uris=(devcerts.spiffe_id("intruder"),))
    (d / "intruder.pem").write_bytes(cert)
    (d / "intruder-key.pem").write_bytes(key)
    trusted = devcerts.Authority(*_load_ca(paths["ca"], paths["ca_key"]))
    cert, key = devcerts.issue(trusted, "stale", uris=(devcerts.spiffe_id("stale"),), expired=True)
    (d / "expired.pem").write_bytes(cert)
    (d / "expired-key.pem").write_bytes(key)
    cert, key = devcerts.issue(trusted, "backend", uris=(devcerts.spiffe_id("backend"),), ips=("127.0.0.1",))
    (d / "backend.pem").write_bytes(cert)
    (d / "backend-key.pem").write_bytes(key)
    return paths | {name: d / f"{name}.pem" for name in ("other-ca", "intruder", "expired", "backend")} | {
        f"{name}_key": d / f"{name}-key.pem" for name in ("intruder", "expired", "backend")
    }


def _load_ca(cert: Path, key: Path) -> tuple[object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return x509.load_pem_x509_certificate(cert.read_bytes()), load_pem_private_key(key.read_bytes(), None)


def listener_tls(certs: dict[str, Path], mode: str, mutual: bool = True) -> str:
    ca = f", ca: {certs['ca']}" if mutual else ""
    return f"{{mode: {mode}, cert: {certs['server']}, key: {certs['server_key']}{ca}}}"


def proxy_config(listener_tls: str, backend: str, protocol: str = "http2", cluster_tls: str = "",
                 filters: str = "") -> str:
    thrift = "\n    thrift: {transport: framed}" if protocol == "thrift" else ""
    match = "{}" if protocol == "thrift" else "{prefix: /}"
    tls_line = f"\n    tls: {listener_tls}" if listener_tls else ""
    cluster_tls_line = f"\n    tls: {cluster_tls}" if cluster_tls else ""
    return f"""\
admin: {{address: "{HOST}:0"}}
listeners:
  - name: test
    direction: ingress
    address: "{HOST}:0"
    protocol: {protocol}{thrift}{tls_line}{filters}
    routes:
      - match: {match}
        cluster: backend
clusters:
  - name: backend
    protocol: {protocol}
    endpoints: ["{backend}"]{cluster_tls_line}
"""


async def start(nursery: trio.Nursery, tmp_path: Path, text: str, name: str = "meshproxy.yaml") -> App:
    return await start_proxy(nursery, write_config(tmp_path, text, name))


def grpc_call(port: int, certs: dict[str, Path] | None, cert: str = "client", key: str = "client_key",
              payload: bytes = b"hello", timeout: float = 5) -> tuple[grpc.StatusCode, bytes | str]:
    target = f"{HOST}:{port}"
    if certs is None:
        ch = grpc.insecure_channel(target, options=MESSAGE_LIMIT)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=certs["ca"].read_bytes(),
            private_key=certs[key].read_bytes() if key else None,
            certificate_chain=certs[cert].read_bytes() if cert else None,
        )
        ch = grpc.secure_channel(target, creds, options=MESSAGE_LIMIT)
    with ch:
        try:
            return grpc.StatusCode.OK, ch.unary_unary(UNARY)(payload, timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""


def run(fn: object, *args: object) -> object:
    return trio.to_thread.run_sync(lambda: fn(*args))  # type: ignore[operator]


# -- listeners ---------------------------------------------------------------------------


async def test_grpc_over_mutual_tls_strict_ingress(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], grpc_server: tuple[int, object]  # noqa: F811
) -> None:
    port, _ = grpc_server
    authz = f"""
    filters:
      - name: authz
        default: deny
        rules:
          - {{name: frontend-only, action: allow, principals: ["{FRONTEND}"]}}"""
    app = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "strict"), f"{HOST}:{port}", filters=authz))
    lp = listen_port(app)
    assert await run(grpc_call, lp, certs) == (grpc.StatusCode.OK, b"hello")
    # The identity came from the client certificate's SPIFFE URI SAN, and authz used it.
    assert metric(app, "meshproxy_authz_decisions_total", listener="test", rule="frontend-only", action="allow",
                  dry_run="false") == 1
    assert metric(app, "meshproxy_downstream_connections_security_total", listener="test", security="mutual_tls") == 1
    assert metric(app, "meshproxy_tls_handshakes_total", side="downstream", target="test", result="ok") == 1
    # Without a client certificate the handshake itself fails.
    code, _ = await run(grpc_call, lp, certs, "", "")
    assert code == grpc.StatusCode.UNAVAILABLE
    assert metric(app, "meshproxy_tls_handshakes_total", side="downstream", target="test", result="failed") >= 1


async def test_strict_refuses_plaintext_with_a_clear_close(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], grpc_server: tuple[int, object],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    port, _ = grpc_server
    app = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "strict"), f"{HOST}:{port}"))
    lp = listen_port(app)
    # grpcio reads the GOAWAY (its log shows the reason) and, as nothing was
    # sent, keeps reconnecting until the deadline.
    code, _ = await run(grpc_call, lp, None, "client", "client_key", b"x", 1.0)
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    def raw_preface() -> bytes:
        with socket.create_connection((HOST, lp), timeout=5) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out

    reply = await run(raw_preface)
    assert isinstance(reply, bytes)
    # SETTINGS, then GOAWAY (type 7) with INADEQUATE_SECURITY (0xc) and a reason.
    goaway = reply[9:]
    assert goaway[3] == 0x07 and int.from_bytes(goaway[13:17], "big") == 0x0C
    assert b"requires TLS" in goaway
    assert metric(app, "meshproxy_tls_handshakes_total", side="downstream", target="test", result="plaintext_refused") >= 2
    assert "refused a plaintext connection" in caplog.text


async def test_permissive_takes_tls_and_plaintext_on_one_port(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], grpc_server: tuple[int, object]  # noqa: F811
) -> None:
    port, _ = grpc_server
    app = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "permissive"), f"{HOST}:{port}"))
    lp = listen_port(app)
    assert await run(grpc_call, lp, certs) == (grpc.StatusCode.OK, b"hello")
    assert await run(grpc_call, lp, None) == (grpc.StatusCode.OK, b"hello")
    security = "meshproxy_downstream_connections_security_total"
    assert metric(app, security, listener="test", security="mutual_tls") == 1
    assert metric(app, security, listener="test", security="plaintext") == 1


@pytest.mark.parametrize("cert", ["intruder", "expired"])
async def test_wrong_ca_and_expired_client_certificates_are_rejected(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], grpc_server: tuple[int, object],  # noqa: F811
    caplog: pytest.LogCaptureFixture, cert: str,
) -> None:
    port, _ = grpc_server
    app = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "strict"), f"{HOST}:{port}"))
    with caplog.at_level(logging.WARNING):
        code, _ = await run(grpc_call, listen_port(app), certs, cert, f"{cert}_key")
    assert code == grpc.StatusCode.UNAVAILABLE
    expected = "certificate has expired" if cert == "expired" else "unable to get local issuer certificate"
    await eventually(lambda: f"certificate verify failed: {expected}" in caplog.text)
    assert "TLS handshake from 127.0.0.1:" in caplog.text


async def test_tls_without_client_certificates(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], grpc_server: tuple[int, object]  # noqa: F811
) -> None:
    port, _ = grpc_server
    app = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "strict", mutual=False), f"{HOST}:{port}"))
    assert await run(grpc_call, listen_port(app), certs, "", "") == (grpc.StatusCode.OK, b"hello")
    assert metric(app, "meshproxy_downstream_connections_security_total", listener="test", security="tls") == 1


async def test_large_bodies_and_many_calls_over_tls(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], grpc_server: tuple[int, object]  # noqa: F811
) -> None:
    port, _ = grpc_server
    app = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "strict"), f"{HOST}:{port}"))
    big = bytes(range(256)) * 8192  # 2 MiB: many TLS records each way

    def calls() -> None:
        creds = grpc.ssl_channel_credentials(certs["ca"].read_bytes(), certs["client_key"].read_bytes(),
                                             certs["client"].read_bytes())
        with grpc.secure_channel(f"{HOST}:{listen_port(app)}", creds, options=MESSAGE_LIMIT) as ch:
            assert ch.unary_unary(UNARY)(big, timeout=10) == big
            futures = [ch.unary_unary(UNARY).future(b"%d" % i, timeout=10) for i in range(200)]
            assert [f.result() for f in futures] == [b"%d" % i for i in range(200)]

    await run(calls)


# -- both hops: egress cluster with mTLS -> ingress listener with mTLS ---------------------


def cluster_tls(certs: dict[str, Path], mode: str = "mutual", identities: str = "") -> str:
    client = f", cert: {certs['client']}, key: {certs['client_key']}" if mode == "mutual" else ""
    ids = f", peer_identities: [\"{identities}\"]" if identities else ""
    return f"{{mode: {mode}, ca: {certs['ca']}{client}{ids}}}"


async def test_mtls_on_both_hops_egress_to_ingress(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], grpc_server: tuple[int, object]  # noqa: F811
) -> None:
    port, _ = grpc_server
    ingress = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "strict"), f"{HOST}:{port}"),
                          "ingress.yaml")
    egress = await start(nursery, tmp_path, proxy_config("", f"{HOST}:{listen_port(ingress)}",
                                                         cluster_tls=cluster_tls(certs, identities=SERVER)),
                         "egress.yaml")
    assert await run(grpc_call, listen_port(egress), None) == (grpc.StatusCode.OK, b"hello")
    assert metric(egress, "meshproxy_tls_handshakes_total", side="upstream", target="backend", result="ok") == 1
    assert metric(ingress, "meshproxy_downstream_connections_security_total", listener="test",
                  security="mutual_tls") == 1


async def test_egress_refuses_a_server_with_another_identity(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], grpc_server: tuple[int, object]  # noqa: F811
) -> None:
    port, _ = grpc_server
    ingress = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "strict"), f"{HOST}:{port}"),
                          "ingress.yaml")
    wrong = devcerts.spiffe_id("payments")
    egress = await start(nursery, tmp_path, proxy_config("", f"{HOST}:{listen_port(ingress)}",
                                                         cluster_tls=cluster_tls(certs, identities=wrong)),
                         "egress.yaml")
    code, details = await run(grpc_call, listen_port(egress), None)
    assert code == grpc.StatusCode.UNAVAILABLE and "server identity" in str(details)
    assert metric(egress, "meshproxy_tls_handshakes_total", side="upstream", target="backend", result="failed") == 1


async def test_simple_tls_cluster_to_a_tls_grpc_server(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path]
) -> None:
    """The upstream is grpcio itself serving TLS (not meshproxy): a real third-party TLS peer."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "echo.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req[::-1])}),))
    creds = grpc.ssl_server_credentials([(certs["backend_key"].read_bytes(), certs["backend"].read_bytes())])
    port = server.add_secure_port(f"{HOST}:0", creds)
    server.start()
    try:
        app = await start(nursery, tmp_path, proxy_config("", f"{HOST}:{port}", cluster_tls=cluster_tls(certs, "simple")))
        assert await run(grpc_call, listen_port(app), None) == (grpc.StatusCode.OK, b"olleh")
    finally:
        server.stop(0)


# -- Thrift ------------------------------------------------------------------------------


def thrift_tls_client(port: int, certs: dict[str, Path]) -> object:
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TSSLSocket, TTransport

    from tests.peers.gen.echo import Echo

    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    ctx.load_cert_chain(str(certs["client"]), str(certs["client_key"]))
    sock = TSSLSocket.TSSLSocket(HOST, port, ssl_context=ctx, server_hostname=HOST)
    trans = TTransport.TFramedTransport(sock)
    trans.open()
    try:
        c = Echo.Client(TBinaryProtocol.TBinaryProtocol(trans))
        return [c.echo(b"t%d" % i) for i in range(5)]
    finally:
        trans.close()


async def test_thrift_over_mutual_tls_both_hops(nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path]) -> None:
    with ThriftServer("framed", "binary") as backend:
        ingress = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "strict"), f"{HOST}:{backend.port}",
                                                              "thrift"), "ingress.yaml")
        # An Apache thrift TSSLSocket client straight to the ingress...
        assert await run(thrift_tls_client, listen_port(ingress), certs) == [b"t%d" % i for i in range(5)]
        # ...and through an egress whose cluster speaks mTLS to it.
        egress = await start(nursery, tmp_path, proxy_config("", f"{HOST}:{listen_port(ingress)}", "thrift",
                                                             cluster_tls=cluster_tls(certs)), "egress.yaml")
        from tests.peers.thrift_peer import client

        def plain() -> list[bytes]:
            with client(listen_port(egress)) as c:
                return [c.echo(b"p%d" % i) for i in range(5)]

        assert await run(plain) == [b"p%d" % i for i in range(5)]
        assert metric(ingress, "meshproxy_downstream_connections_security_total", listener="test",
                      security="mutual_tls") == 2


async def test_thrift_permissive_takes_tls_and_plaintext_on_one_port(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path]
) -> None:
    from tests.peers.thrift_peer import client

    with ThriftServer("framed", "binary") as backend:
        app = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "permissive"), f"{HOST}:{backend.port}",
                                                          "thrift"))
        port = listen_port(app)

        def plain() -> list[bytes]:
            with client(port) as c:
                return [c.echo(b"p%d" % i) for i in range(3)]

        assert await run(thrift_tls_client, port, certs) == [b"t%d" % i for i in range(5)]
        assert await run(plain) == [b"p%d" % i for i in range(3)]
        security = "meshproxy_downstream_connections_security_total"
        assert metric(app, security, listener="test", security="mutual_tls") == 1
        assert metric(app, security, listener="test", security="plaintext") == 1


# -- edges: close_notify, the first bytes, versions, names ---------------------------------


def handshake_by_hand(s: socket.socket, tls_obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                      split_first_byte: bool = False) -> None:
    first = True
    while True:
        try:
            tls_obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            out = outgoing.read()
            if first and split_first_byte:
                s.sendall(out[:1])  # a first segment of one byte: 0x16
                time.sleep(0.05)
                out = out[1:]
            first = False
            s.sendall(out)
            incoming.write(s.recv(65536))
    s.sendall(outgoing.read())


def tls_client_context(certs: dict[str, Path], **kw: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    ctx.load_cert_chain(str(certs["client"]), str(certs["client_key"]))
    ctx.set_alpn_protocols(["h2"])
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


async def test_a_peer_close_notify_ends_the_connection(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path]
) -> None:
    """Go, Java, nginx and Envoy send close_notify when they close; grpcio does not."""
    app = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "strict"), f"{HOST}:1"))
    port = listen_port(app)

    def close_politely() -> bytes:
        """close_notify, with the TCP connection left open: the proxy must close it."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls_obj = tls_client_context(certs).wrap_bio(incoming, outgoing, server_hostname=HOST)
        with socket.create_connection((HOST, port), timeout=3) as s:
            handshake_by_hand(s, tls_obj, incoming, outgoing)
            tls_obj.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            try:
                tls_obj.unwrap()
            except ssl.SSLWantReadError:
                pass
            s.sendall(outgoing.read())
            while s.recv(65536):  # until the proxy closes (a timeout here fails the test)
                pass
            return b"closed"

    active = "meshproxy_downstream_connections_active"
    assert await run(close_politely) == b"closed"
    await eventually(lambda: metric(app, active, listener="test") == 0, timeout=3)


async def test_permissive_first_bytes_edges(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], grpc_server: tuple[int, object],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    port, _ = grpc_server
    app = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "permissive"), f"{HOST}:{port}"))
    lp = listen_port(app)

    def probe() -> None:  # a health check: connect, close
        socket.create_connection((HOST, lp), timeout=5).close()

    def split_client_hello() -> str | None:
        """A TLS client whose first segment is the single byte 0x16."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls_obj = tls_client_context(certs).wrap_bio(incoming, outgoing, server_hostname=HOST)
        with socket.create_connection((HOST, lp), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handshake_by_hand(s, tls_obj, incoming, outgoing, split_first_byte=True)
            return tls_obj.selected_alpn_protocol()

    await run(probe)
    assert await run(split_client_hello) == "h2"
    assert await run(grpc_call, lp, None) == (grpc.StatusCode.OK, b"hello")
    assert metric(app, "meshproxy_tls_handshakes_total", side="downstream", target="test", result="ok") == 1
    assert metric(app, "meshproxy_tls_handshakes_total", side="downstream", target="test", result="timeout") == 0
    assert "refused" not in caplog.text


async def test_min_version_is_enforced(nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path]) -> None:
    text = proxy_config(listener_tls(certs, "strict").replace("}", ", min_version: '1.3'}"), f"{HOST}:1")
    app = await start(nursery, tmp_path, text)
    port = listen_port(app)

    def connect(version: ssl.TLSVersion) -> str:
        ctx = tls_client_context(certs, maximum_version=version)
        try:
            with socket.create_connection((HOST, port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=HOST) as s:
                return str(s.version())
        except ssl.SSLError as e:
            return f"refused: {e.reason}"

    assert await run(connect, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert str(await run(connect, ssl.TLSVersion.TLSv1_2)).startswith("refused")


async def test_a_simple_cluster_checks_the_server_name(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], grpc_server: tuple[int, object]  # noqa: F811
) -> None:
    port, _ = grpc_server
    ingress = await start(nursery, tmp_path, proxy_config(listener_tls(certs, "strict", mutual=False),
                                                          f"{HOST}:{port}"), "ingress.yaml")
    target = f"{HOST}:{listen_port(ingress)}"
    good = await start(nursery, tmp_path, proxy_config("", target, cluster_tls=cluster_tls(certs, "simple")),
                       "good.yaml")
    assert await run(grpc_call, listen_port(good), None) == (grpc.StatusCode.OK, b"hello")
    wrong = cluster_tls(certs, "simple").replace("}", ", server_name: api.example.com}")
    bad = await start(nursery, tmp_path, proxy_config("", target, cluster_tls=wrong), "bad.yaml")
    code, details = await run(grpc_call, listen_port(bad), None)
    assert code == grpc.StatusCode.UNAVAILABLE and "certificate verify failed" in str(details)


# -- reload, config ----------------------------------------------------------------------


def served_certificate(port: int, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((HOST, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=HOST) as s:
        cert = s.getpeercert()
    return str(dict(x[0] for x in cert["subject"])["commonName"])


async def test_reload_reads_rotated_certificates(
    nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path]
) -> None:
    d = tmp_path / "live"
    shutil.copytree(certs["ca"].parent, d)
    own = {"ca": d / "ca.pem", "server": d / "server.pem", "server_key": d / "server-key.pem"}
    app = await start(nursery, tmp_path, proxy_config(listener_tls(own, "strict", mutual=False), f"{HOST}:1"))
    port = listen_port(app)
    assert await run(served_certificate, port, own["ca"]) == "server"
    shutil.copy(d / "backend.pem", own["server"])
    shutil.copy(d / "backend-key.pem", own["server_key"])
    assert await app.reload()
    assert await run(served_certificate, port, own["ca"]) == "backend"


def test_config_errors_name_the_key(tmp_path: Path, certs: dict[str, Path]) -> None:
    def problems(tls: str) -> str:
        path = write_config(tmp_path, proxy_config(tls, f"{HOST}:1"))
        with pytest.raises(ConfigError) as e:
            load(str(path))
        return "\n".join(e.value.lines)

    assert "listeners[0].tls.cert: cannot read" in problems(f"{{mode: strict, cert: nope.pem, key: {certs['server_key']}}}")
    assert "listeners[0].tls.key: required for mode strict" in problems(f"{{mode: strict, cert: {certs['server']}}}")
    mismatch = problems(f"{{mode: strict, cert: {certs['server']}, key: {certs['client_key']}}}")
    assert "listeners[0].tls: cannot load certificate" in mismatch
    assert "listeners[0].tls.mode: expected one of disable, permissive, strict" in problems("{mode: on}")
    path = write_config(tmp_path, proxy_config("", f"{HOST}:1", cluster_tls="{mode: mutual, ca: " + str(certs["ca"]) + "}"))
    with pytest.raises(ConfigError) as e:
        load(str(path))
    assert "clusters[0].tls.cert: required for mode mutual" in "\n".join(e.value.lines)
    path = write_config(tmp_path, proxy_config("", "unix:/tmp/x.sock", cluster_tls="{mode: simple}"))
    with pytest.raises(ConfigError) as e:
        load(str(path))
    assert "clusters[0].tls: a unix endpoint has no host name to verify" in "\n".join(e.value.lines)


def test_relative_certificate_paths_are_from_the_config_directory(tmp_path: Path, certs: dict[str, Path]) -> None:
    conf_dir = tmp_path / "conf"
    shutil.copytree(certs["ca"].parent, conf_dir / "certs")
    path = write_config(conf_dir, proxy_config("{mode: strict, cert: certs/server.pem, key: certs/server-key.pem}",
                                               f"{HOST}:1"))
    assert load(str(path)).listeners[0].tls.cert == str(conf_dir / "certs" / "server.pem")
